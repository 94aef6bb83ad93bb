"""The SP graph pass at the graph level, on 2 gloo ranks: collective counts before and after,
graph.lint(), token-mixing regions left alone, and the rewritten graph's numbers against eager TP.

Two models: seqpar's own (fenced layers, opaque attention), and a gpt-fast-style TP model below
that knows nothing of seqpar (plain functional all_reduce, no fences), where the pass finds the
regions from the collectives and matmuls alone. The graphs run without Inductor here (the pass's
output executed as is, with real collectives); tests/test_compile.py runs Inductor end to end.
"""
from __future__ import annotations

import operator

import pytest
import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed import _functional_collectives as funcol

from dist_helpers import run_ranks
from models import FAMILIES, paged_kv

C10D = torch.ops._c10d_functional


def count(gm: fx.GraphModule) -> dict[str, int]:
    """Collectives and fences in a graph. seqpar's model has Comm's ops (seqpar::all_reduce ...,
    on the group's own transport: shared memory here); a plain TP model torch's functional
    collectives; each kind counts both, and "c10d" counts torch's alone."""
    seqpar = torch.ops.seqpar
    targets = {"all_reduce": (C10D.all_reduce, C10D.all_reduce.default, seqpar.all_reduce.default),
               "reduce_scatter": (C10D.reduce_scatter_tensor, C10D.reduce_scatter_tensor.default,
                                  seqpar.reduce_scatter_tokens.default),
               "all_gather": (C10D.all_gather_into_tensor, C10D.all_gather_into_tensor.default,
                              seqpar.all_gather_tokens.default),
               "c10d": (C10D.all_reduce, C10D.all_reduce.default, C10D.reduce_scatter_tensor,
                        C10D.reduce_scatter_tensor.default, C10D.all_gather_into_tensor,
                        C10D.all_gather_into_tensor.default),
               "fence": (seqpar.tokenwise_begin.default, seqpar.tokenwise_end.default),
               "all_gather_matmul": (seqpar.all_gather_matmul.default,),
               "matmul_reduce_scatter": (seqpar.matmul_reduce_scatter.default,)}
    counts = {name: sum(1 for n in gm.graph.nodes
                        if n.op == "call_function" and n.target in target)
              for name, target in targets.items()}
    counts["in_place"] = sum(1 for n in gm.graph.nodes if _writes_in_place(n))
    return counts


def _writes_in_place(node: fx.Node) -> bool:
    """An op as Dynamo records it that writes its first input: `x += y`, `silu(x, inplace=True)`,
    `x.mul_(y)`."""
    if node.op == "call_function":
        return (node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv)
                or node.kwargs.get("inplace") is True)
    return (node.op == "call_method" and node.target.endswith("_")
            and not node.target.startswith("_"))


class CountingBackend:
    """Records the collectives Dynamo captured, runs the pass, records them after, runs the graph
    as is (no Inductor): what the pass did, checked node by node."""

    def __init__(self, shard_outputs: bool = False, overlap: bool = False, rewrite: bool = True):
        self.shard_outputs, self.overlap, self.rewrite = shard_outputs, overlap, rewrite
        self.before, self.after, self.reports = [], [], []

    def __call__(self, gm, example_inputs):
        from seqpar.compile.sp_pass import sequence_parallel_pass

        self.before.append(count(gm))
        self.reports.append(sequence_parallel_pass(gm, self.shard_outputs, rewrite=self.rewrite,
                                                   overlap=self.overlap))
        gm.graph.lint()
        self.after.append(count(gm))
        return gm.forward


# ---- a gpt-fast-style TP model: plain functional all_reduce, no seqpar parts --------------------

class GFRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.eps) * self.weight


class GFBlock(nn.Module):
    """Attention + MLP, weights sharded as gpt-fast's tp.py does: wqkv / w1 / w3 by output
    features, wo / w2 by input features, each followed by an all_reduce."""

    def __init__(self, dim, heads, hidden, world, mix_tokens=False):
        super().__init__()
        self.heads, self.head_dim = heads // world, dim // heads
        local = self.heads * self.head_dim
        self.wqkv = nn.Linear(dim, 3 * local, bias=False)
        self.wo = nn.Linear(local, dim, bias=False)
        self.w1 = nn.Linear(dim, hidden // world, bias=False)
        self.w3 = nn.Linear(dim, hidden // world, bias=False)
        self.w2 = nn.Linear(hidden // world, dim, bias=False)
        self.attention_norm, self.ffn_norm = GFRMSNorm(dim), GFRMSNorm(dim)
        self.mix_tokens, self.world = mix_tokens, world

    def reduce(self, x):
        return funcol.all_reduce(x, "sum", dist.group.WORLD) if self.world > 1 else x

    def forward(self, x):  # x: [T, dim]
        t = x.shape[0]
        q, k, v = self.wqkv(self.attention_norm(x)).split(self.heads * self.head_dim, dim=-1)
        q, k, v = (y.view(t, self.heads, self.head_dim).transpose(0, 1) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(0, 1).reshape(t, -1)
        y = self.reduce(self.wo(y))
        if self.mix_tokens:
            y = y + 0.01 * torch.cumsum(y, dim=0)  # token-mixing: SP must not shard this
        h = x + y
        m = self.w2(F.silu(self.w1(self.ffn_norm(h))) * self.w3(self.ffn_norm(h)))
        return h + self.reduce(m)


class GFTransformer(nn.Module):
    def __init__(self, world, layers=2, dim=32, heads=4, hidden=64, vocab=50, mix_layer=None):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(GFBlock(dim, heads, hidden, world, i == mix_layer)
                                    for i in range(layers))
        self.norm = GFRMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):  # ids: [T] -> logits [T, vocab]
        x = self.tok_embeddings(ids)
        for layer in self.layers:
            x = layer(x)
        return self.output(self.norm(x))


def _gf_ranks(rank, world, mix_layer, lengths, overlap=False):
    torch.manual_seed(0)  # same full weights on every rank; each keeps its shard
    full = GFTransformer(1, mix_layer=mix_layer)
    model = GFTransformer(world, mix_layer=mix_layer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            src = dict(full.named_parameters())[name]
            if name.endswith(("wo.weight", "w2.weight")):
                p.copy_(src.chunk(world, dim=1)[rank])
            elif name.endswith(("w1.weight", "w3.weight")):
                p.copy_(src.chunk(world, dim=0)[rank])
            elif name.endswith("wqkv.weight"):
                p.copy_(torch.cat([part.chunk(world, dim=0)[rank] for part in src.chunk(3, dim=0)]))
            else:
                p.copy_(src)
    torch._dynamo.reset()
    backend = CountingBackend(overlap=overlap)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    worst = 0.0
    with torch.no_grad():
        for t in lengths:
            ids = torch.arange(t) * 7 % 50
            torch._dynamo.maybe_mark_dynamic(ids, 0)
            worst = max(worst, (compiled(ids) - full(ids)).abs().max().item())
    return backend.before, backend.after, [r.summary() for r in backend.reports], \
        [[(r.rewritten, r.reason) for r in rep.regions] for rep in backend.reports], worst


@pytest.mark.parametrize("lengths", [[5, 8, 3]], ids=["odd-lengths"])
def test_gpt_fast_model_regions_from_collectives(lengths):
    (before, after, summaries, regions, worst), _ = run_ranks(_gf_ranks, 2, None, lengths,
                                                               timeout=240)
    # One dynamic graph for every length (5 and 3 do not divide by 2: padded inside the graph).
    assert len(before) == 1, f"recompiled: {summaries}"
    assert before[0]["all_reduce"] == 4  # 2 layers x (attention, MLP)
    # The residual stream joins all four regions into one component: all rewritten.
    assert after[0]["all_reduce"] == 0 and after[0]["reduce_scatter"] == 4
    # all_gather before each column matmul the stream reaches: ffn_norm twice per layer (the
    # model calls it once for w1 and once for w3), attention_norm -> wqkv of layer 1 (layer 0's
    # reads the embedding, before any all_reduce: replicated, it stays as is), the LM head.
    assert after[0]["all_gather"] == 2 * 2 + 1 + 1, summaries
    assert regions[0] == [(True, "")]
    assert worst < 1e-4, f"SP graph differs from the unsharded model by {worst}"


def test_gpt_fast_token_mixing_left_alone():
    (before, after, summaries, regions, worst), _ = run_ranks(_gf_ranks, 2, 1, [6, 9], timeout=240)
    assert before[0]["all_reduce"] == after[0]["all_reduce"] == 4
    assert after[0]["reduce_scatter"] == after[0]["all_gather"] == 0
    assert len(regions[0]) == 1 and not regions[0][0][0]
    assert "cumsum" in regions[0][0][1], summaries[0]
    assert "left TP" in summaries[0] and "cumsum" in summaries[0]
    assert worst < 1e-4


# ---- seqpar's own model, fenced ---------------------------------------------------------------

class TokenMixingNorm(nn.Module):
    """A norm that also mixes tokens (a running sum over the rows): SP must leave it TP."""

    def __init__(self, norm):
        super().__init__()
        self.norm = norm

    def forward(self, x, residual=None):
        return self.norm(x + 0.01 * torch.cumsum(x, dim=0), residual)

    def add_norm_(self, x, residual, out):  # the eager decoder layer's in-place form
        return self.norm.add_norm_(x + 0.01 * torch.cumsum(x, dim=0), residual, out)


def _seqpar_ranks(rank, world, model_dir, lengths, mix=False, overlap=False, sp=True):
    from seqpar.compile.runner import CompiledForward
    from seqpar.config import ModelConfig
    from seqpar.distributed.comm import Comm
    from seqpar.worker.plan import StepPlan
    from seqpar.models import MODELS

    cfg = ModelConfig.from_dir(model_dir)
    comm = Comm(dist.group.WORLD, rank, world)
    model = MODELS[cfg.model_type](cfg, comm, torch.float32, 64)
    model.load_weights(model_dir)
    if mix:
        layer = model.model.layers[1]
        layer.post_attention_layernorm = TokenMixingNorm(layer.post_attention_layernorm)

    torch._dynamo.reset()
    runner = CompiledForward(model, sp=sp, inductor=False)
    runner.backend = backend = _Wrapped(runner.backend, overlap, rewrite=sp)
    runner._compiled = torch.compile(runner._graph, backend=backend, fullgraph=True)
    worst = 0.0
    for t in lengths:
        ids = torch.arange(t) * 5 % 90 + 3
        plans = {sp: StepPlan(sp, ids, [0], [t], [True], [[0]], world) for sp in (False, True)}
        paged_kv(model)
        eager = model(plans[False])
        paged_kv(model)
        compiled = runner(plans[sp])
        if rank == 0:
            worst = max(worst, (eager - compiled).abs().max().item())
    return backend.before, backend.after, [r.summary() for r in backend.reports], worst, \
        dict(comm.snapshot())


class _Wrapped(CountingBackend):
    """CountingBackend in the runner's place, keeping the attributes the runner reads."""

    def __init__(self, inner, overlap=False, rewrite=True):
        super().__init__(shard_outputs=True, overlap=overlap, rewrite=rewrite)
        self.inner = inner
        self.graphs = []

    def __call__(self, gm, example_inputs):
        out = super().__call__(gm, example_inputs)
        self.graphs.append(gm)
        return out


def _seqpar_families(rank, world, model_dirs, lengths):
    """_seqpar_ranks for several models in one pair of ranks (spawning costs seconds)."""
    return {name: _seqpar_ranks(rank, world, path, lengths) for name, path in model_dirs.items()}


def test_seqpar_model_fenced_regions(tiny):
    """Every family at tp=2 (biases, q/k norms, sliding window, tied and untied, GQA/MQA)."""
    layers = 2
    results = run_ranks(_seqpar_families, 2, {f: tiny(f) for f in sorted(FAMILIES)}, [7, 4, 12],
                        timeout=300)[0]
    for family, (before, after, summaries, worst, stats) in results.items():
        # 7 and 12 share one graph (S dynamic); 4 -> S = 2 too; no recompile per count.
        assert len(before) == 1, (family, summaries)
        # embedding + 2 per layer; fences: begin after each all_reduce, end before qkv, gate_up
        assert before[0]["all_reduce"] == 1 + 2 * layers, family
        assert before[0]["fence"] == (1 + 2 * layers) + 2 * layers, family
        # Comm's ops on the shared-memory transport, none of torch's functional collectives
        # ... and no in-place write left: the residual add, the norm's copy and the MLP's
        # silu_ / mul_ over gate_up's gate half are out of place, for Inductor to fuse freely
        # (an in-place write to a view made it compute silu over all of gate_up, 4x slower).
        assert before[0]["in_place"] > 0, family
        assert after[0] == {"all_reduce": 0, "reduce_scatter": 1 + 2 * layers,
                            "all_gather": 2 * layers, "c10d": 0, "fence": 0,
                            "all_gather_matmul": 0, "matmul_reduce_scatter": 0,
                            "in_place": 0}, (family, summaries)
        # Two components: the residual stream (every layer's residual add joins its regions)
        # and the last MLP output, which meets the residual only after the graph (sampling tail).
        assert "2 region(s) rewritten, 0 left TP" in summaries[0], (family, summaries[0])
        assert worst < 1e-4, f"{family}: compiled SP logits differ from eager TP by {worst}"
        assert stats["reduce_scatter"]["calls"] == 3 * (1 + 2 * layers), family


def test_seqpar_model_token_mixing_left_alone(tiny):
    before, after, summaries, worst, stats = run_ranks(
        _seqpar_ranks, 2, tiny("llama-gqa"), [7, 12], True, timeout=240)[0]
    assert len(before) == 1
    # The residual stream (one component across layers) holds the cumsum: it stays TP, its four
    # all_reduces kept; the last MLP output, a separate component, is still rewritten.
    assert after[0]["all_reduce"] == 4 and after[0]["reduce_scatter"] == 1, summaries
    assert "1 region(s) rewritten, 1 left TP" in summaries[0], summaries[0]
    assert "left TP (cumsum" in summaries[0], summaries[0]
    assert worst < 1e-4, f"compiled logits differ from eager TP by {worst}"


def test_check_reports_the_pass(tiny):
    """`seqpar check --compile`: the pass runs on the forward traced on the meta device over a
    fake process group, in this process, and its report is part of the support report."""
    from seqpar.report import support_report

    text = support_report(str(tiny("qwen2")), tensor_parallel_size=2, compile=True)
    assert "seqpar sp pass: 2 region(s) rewritten, 0 left TP" in text
    assert ("4 all_reduce -> reduce_scatter, 4 all_gather before linear "
            "(layers.0.self_attn.qkv_proj)") in text
    assert not dist.is_initialized()
    off = support_report(str(tiny("qwen2")), tensor_parallel_size=2, sequence_parallel="off",
                         compile=True)
    assert "0 region(s) rewritten, 2 left TP" in off and "left TP (SP off)" in off
    with pytest.raises(ValueError, match="pipeline_parallel_size=2"):
        support_report(str(tiny("qwen2")), tensor_parallel_size=2, pipeline_parallel_size=2,
                       compile=True)


def test_gpt_fast_overlap_collective_matmuls():
    (before, after, summaries, regions, worst), _ = run_ranks(_gf_ranks, 2, None, [5, 8], True,
                                                               timeout=240)
    assert len(before) == 1 and before[0]["all_reduce"] == 4
    # Every reduce_scatter follows a plain linear (wo, w2): one ring each. Every all_gather
    # feeds plain linears (w1, w3, wqkv, output): one ring per linear.
    assert after[0]["matmul_reduce_scatter"] == 4 and after[0]["reduce_scatter"] == 0, summaries
    assert after[0]["all_gather_matmul"] == 6 and after[0]["all_gather"] == 0, summaries
    assert "10 as collective matmuls" in summaries[0]
    assert worst < 1e-4, f"overlapped SP graph differs from the unsharded model by {worst}"


def test_seqpar_model_overlap_collective_matmuls(tiny):
    layers = 2
    before, after, summaries, worst, stats = run_ranks(
        _seqpar_ranks, 2, tiny("llama-mqa-tied"), [7, 12], False, True, timeout=240)[0]
    # The embedding's all_reduce follows no matmul: a plain reduce_scatter; o_proj and down_proj
    # (their biases are added after the reduction) become rings, and so do qkv (with its bias)
    # and gate_up after their all_gathers.
    assert after[0]["reduce_scatter"] == 1 and after[0]["matmul_reduce_scatter"] == 2 * layers
    assert after[0]["all_gather"] == 0 and after[0]["all_gather_matmul"] == 2 * layers, summaries
    assert worst < 1e-4, f"compiled SP + overlap logits differ from eager TP by {worst}"
    assert stats["reduce_scatter_ring"]["calls"] == 2 * 2 * layers


def test_seqpar_model_compiled_tp(tiny):
    """compile=True with SP off: the same graph, analysed but not rewritten; fences removed."""
    before, after, summaries, worst, stats = run_ranks(
        _seqpar_ranks, 2, tiny("mistral"), [7, 3], False, False, False, timeout=240)[0]
    assert len(before) == 1
    assert after[0] == {"all_reduce": 5, "reduce_scatter": 0, "all_gather": 0, "c10d": 0,
                        "fence": 0, "all_gather_matmul": 0, "matmul_reduce_scatter": 0,
                        "in_place": 0}
    assert "0 region(s) rewritten, 2 left TP" in summaries[0]
    # 2 lengths, each run eager and compiled: 5 all_reduces per step in both
    assert stats["all_reduce"]["calls"] == 2 * 2 * 5
    assert worst < 1e-4
