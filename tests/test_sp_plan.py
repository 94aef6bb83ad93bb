"""The SP plan as code (layers/sp.py): module roles read by the SP blockers, the compiled path and
the docs; one collectives list behind comm_stats() and /metrics; imports that point down.

A new module kind is added here the way a model family would add it, by declaring its role once:
a token-wise one runs SP eagerly and compiled (the pass shards an op it has no table entry for,
because the module says it is token-wise); one that mixes tokens, inside a block of its own, keeps
SP off for the model with its name.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families

from dist_helpers import run_ranks
from models import build, paged_kv
from seqpar import LLM, SamplingParams
from seqpar.config import ModelConfig
from seqpar.distributed.collectives import Collective
from seqpar.distributed.comm import Comm
from seqpar.layers import sp
from seqpar.models import MODELS
from seqpar.report import sp_blockers, sp_plan_table

ROOT = Path(__file__).resolve().parents[1]


# ---- new module kinds ---------------------------------------------------------------------------

class LayerNorm(nn.Module):
    """A new token-wise module kind: a LayerNorm without bias. F.layer_norm is an op the SP pass
    has no table entry for; the declared role is what tells the pass it keeps rows apart."""

    sp_role = sp.TOKEN_WISE

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim, generator=torch.Generator()
                                                         .manual_seed(dim)), requires_grad=False)

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight)


class UndeclaredLayerNorm(LayerNorm):
    """The same module, its role not declared (a subclass declares again)."""


class PostNormMLP(nn.Module):
    """A decoder layer's MLP followed by a norm of its output (Gemma-2's post-feedforward norm): a
    residual-stream block around an all-tokens block and a token-wise one."""

    sp_role = sp.RESIDUAL_STREAM

    def __init__(self, mlp: nn.Module, norm: nn.Module):
        super().__init__()
        self.mlp, self.norm = mlp, norm

    def forward(self, x, plan):
        return self.norm(self.mlp(x, plan))  # [rows, H] -> [rows, H]


class MixingBlock(nn.Module):
    """A non-leaf block in the residual stream whose own forward mixes tokens (a running mean over
    the rows), declaring no role: on a token shard it would be wrong."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x, plan):
        y = self.mlp(x, plan)
        return y + 0.5 * y.cumsum(0) / torch.arange(1, y.shape[0] + 1, dtype=y.dtype)[:, None]


class RunningMean(nn.Module):
    """A token-mixing module kind, declared as such."""

    sp_role = sp.TOKEN_MIXING

    def forward(self, x):
        return x.cumsum(0) / torch.arange(1, x.shape[0] + 1, dtype=x.dtype)[:, None]


class MixedStream(nn.Module):
    """A declared residual-stream block holding a token-mixing module: misplaced."""

    sp_role = sp.RESIDUAL_STREAM

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp, self.mix = mlp, RunningMean()

    def forward(self, x, plan):
        return self.mix(self.mlp(x, plan))


def wrap_mlps(model, make) -> None:
    for layer in model.model.layers:
        layer.mlp = make(layer.mlp)


def meta_model(model_dir, tp=2):
    cfg = ModelConfig.from_dir(model_dir)
    with torch.device("meta"):
        return MODELS[cfg.model_type](cfg, Comm(None, 0, tp), torch.float32, 64)


# ---- the roles drive the blockers ------------------------------------------------------------

def test_token_mixing_inside_a_block_refuses_sp(tiny):
    model_dir = tiny("llama-gqa")
    assert sp_blockers(meta_model(model_dir)) == []
    # The block is not a leaf: its child (the MLP) is declared, its own forward mixes tokens.
    model = meta_model(model_dir)
    model.model.layers[1].mlp = MixingBlock(model.model.layers[1].mlp)
    assert sp_blockers(model) == ["MixingBlock: not declared token-wise, so SP would be unsafe"]
    # A module declared token-mixing, inside a residual-stream block, outside any block that
    # gathers every token.
    model = meta_model(model_dir)
    model.model.layers[0].mlp = MixedStream(model.model.layers[0].mlp)
    assert sp_blockers(model) == [
        "RunningMean (token-mixing, at model.layers.0.mlp.mix): needs every token but sits in the "
        "residual stream, which an SP step shards, so SP would be unsafe"]


# ---- a new token-wise kind runs SP, eager and compiled ----------------------------------------

def _new_kinds(rank, world, model_dir):
    """On 2 ranks: llama-gqa with a post-MLP LayerNorm in every layer, its sampled logits for a
    7-token prefill (2 does not divide 7) and a 1-token decode: eager TP, eager SP, compiled SP
    and, on rank 0, unsharded (tp=1, the reference); compiled with the LayerNorm's role
    undeclared; and with the token-mixing block instead, eager TP and SP."""
    from seqpar.compile.runner import CompiledForward
    from seqpar.worker.plan import StepPlan

    cfg = ModelConfig.from_dir(model_dir)
    comm = Comm(dist.group.WORLD, rank, world)
    hidden = cfg.hidden_size

    def model_with(make, group=comm):
        model = MODELS[cfg.model_type](cfg, group, torch.float32, 64)
        model.load_weights(model_dir)
        wrap_mlps(model, make)
        return model

    def steps(model, sp_on, forward=None):
        """Logits of a 7-token prefill, then a decode step of 1 token after it (rank 0)."""
        paged_kv(model)
        out = []
        for ids, start in ((torch.tensor([3, 17, 40, 99, 5, 61, 8]), 0), (torch.tensor([12]), 7)):
            plan = StepPlan(sp_on, ids, [start], [len(ids)], [True], [[0]], model.comm.world_size)
            out.append((forward or model)(plan))
        return out

    results = {}
    norm = lambda mlp: PostNormMLP(mlp, LayerNorm(hidden))  # noqa: E731
    model = model_with(norm)
    results["blockers"] = sp_blockers(model)
    results["tp"], results["sp"] = steps(model, False), steps(model, True)
    torch._dynamo.reset()
    compiled = CompiledForward(model, sp=True, inductor=False)
    results["compiled"] = steps(model, True, compiled)
    results["report"] = compiled.report.summary()
    if rank == 0:
        results["unsharded"] = steps(model_with(norm, Comm(None, 0, 1)), False)

    undeclared = model_with(lambda mlp: PostNormMLP(mlp, UndeclaredLayerNorm(hidden)))
    results["undeclared_blockers"] = sp_blockers(undeclared)
    torch._dynamo.reset()
    compiled = CompiledForward(undeclared, sp=True, inductor=False)
    results["undeclared_compiled"] = steps(undeclared, True, compiled)
    results["undeclared_report"] = compiled.report.summary()

    mixing = model_with(MixingBlock)
    results["mixing"] = steps(mixing, False), steps(mixing, True)
    torch._dynamo.reset()
    return results


def test_new_token_wise_module_runs_sp_eager_and_compiled(tiny):
    r = run_ranks(_new_kinds, 2, tiny("llama-gqa"), timeout=300)[0]

    def close(a, b, what):
        for step, (x, y) in enumerate(zip(a, b)):
            worst = (x - y).abs().max().item()
            assert worst < 1e-4, f"{what}, step {step}: logits differ by {worst:.2e}"

    close(r["tp"], r["unsharded"], "eager TP vs unsharded")
    assert r["blockers"] == []
    close(r["sp"], r["tp"], "eager SP vs eager TP")
    close(r["compiled"], r["tp"], "compiled SP vs eager TP")
    # The pass sharded through the LayerNorm: the residual stream, every layer's regions joined,
    # and the last MLP output are both rewritten, nothing left TP.
    assert "2 region(s) rewritten, 0 left TP" in r["report"], r["report"]
    # Undeclared, the same module blocks eager SP, and the pass leaves the stream TP at its op
    # (still correct: the regions it cannot prove token-wise keep their all-reduces).
    assert r["undeclared_blockers"] == [
        "UndeclaredLayerNorm: not declared token-wise, so SP would be unsafe"]
    assert "left TP (layer_norm" in r["undeclared_report"], r["undeclared_report"]
    close(r["undeclared_compiled"], r["tp"], "compiled, undeclared norm, vs eager TP")
    # The blocked block is blocked for a reason: on token shards its output is wrong.
    tp, sp_out = r["mixing"]
    assert (tp[0] - sp_out[0]).abs().max().item() > 1e-3, "the mixing block must change under SP"


# ---- the SP plan table in the docs is the code's ---------------------------------------------

def test_docs_sp_plan_table_is_generated_from_the_roles():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    found = re.search(r"<!-- sp-plan-table: [^>]*-->\n(.*?)\n<!-- end sp-plan-table -->", doc,
                      re.S)
    assert found, "docs/architecture.md has no generated SP plan table"
    table = sp_plan_table()
    assert found.group(1) == table, "docs/architecture.md's SP plan table is stale; paste:\n" + table
    for kind in ("RMSNorm", "QKVParallelLinear", "RowParallelLinear", "Attention", "SparseMoeBlock",
                 "ParallelLMHead", "LlamaDecoderLayer"):
        assert kind in table


# ---- one collectives list: comm_stats() and /metrics -----------------------------------------

def test_metrics_count_every_collective_like_comm_stats(tiny_root):
    """qwen2-moe (MoE layers and a dense one) at tp=2 with expert parallelism: SP + overlap steps
    (rings, all-to-all dispatch and combine, the embedding's reduce-scatter, the tail's
    all-gather), plain SP steps, TP steps; then /metrics' comm counters, rendered as the server
    renders them, against comm_stats() for every collective."""
    from seqpar.entrypoints.metrics import ServerMetrics, snapshot

    prompts = [[(5 * i + n) % 900 + 3 for i in range(n)] for n in (3, 7)]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    with LLM(str(build("qwen2-moe", tiny_root)), tensor_parallel_size=2, sequence_parallel="on",
             overlap=True, enable_expert_parallel=True, threads_per_rank=1) as llm:
        llm.generate(prompts, params)
        llm.policy.overlap = False
        llm.generate(prompts, params)
        llm.policy.mode = "off"
        llm.generate(prompts, params)
        stats = llm.comm_stats()
        text = ServerMetrics("tiny").render(snapshot(llm.engine)).decode()
    metrics = {(sample.name, sample.labels.get("collective")): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples}
    for op in Collective:
        for unit in ("bytes", "calls"):
            exposed = metrics.get((f"seqpar:comm_{unit}_total", op.value))
            assert exposed == stats[op.value][unit], (op.value, unit, exposed)
    used = {op for op in Collective if stats[op.value]["calls"] > 0}
    assert used == set(Collective) - {Collective.SEND, Collective.RECV}, used  # pp=1: no p2p


# ---- imports point down ----------------------------------------------------------------------

ABOVE = ("seqpar.engine", "seqpar.worker", "seqpar.entrypoints", "seqpar.compile", "seqpar_bench",
         "seqpar.cli", "seqpar.report", "benchmarks")


def imports_of(path: Path, package: str) -> set[str]:
    """Every module a file imports, at any depth of its code (function-level imports too),
    relative imports resolved against `package`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            names.update([base] + [f"{base}.{alias.name}" for alias in node.names])
    return names


def test_imports_point_down():
    bad = []
    for room, allowed in (("distributed", ("seqpar.distributed",)),
                          ("layers", None), ("models", None)):
        for path in sorted((ROOT / "seqpar" / room).rglob("*.py")):
            package = f"seqpar.{room}"
            for name in imports_of(path, package):
                if not name.startswith("seqpar") and not name.startswith("benchmarks"):
                    continue
                above = (not name.startswith(allowed) if allowed
                         else name.startswith(ABOVE))
                if above and name != "seqpar":
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert bad == []
