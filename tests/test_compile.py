"""compile=True at tp=2 against HF transformers.

Every family, compiled SP and SP + overlap, on one pair of ranks: the model's own forward traced
by Dynamo and rewritten by the SP pass, run without Inductor (the graph as the pass left it, real
collectives), a prefill and a decode step of odd token counts, every sampled row's log-probs
against HF's. Then end to end with Inductor (tens of seconds per graph on CPU, so two families:
llama-gqa: GQA, untied, Llama-3 rope scaling; qwen3: q/k norms): greedy tokens identical to HF,
eager TP and eager SP, logprobs within 2e-4, no recompile per token count; sp="auto", whose TP and
SP steps both run compiled, each kind on its own forward. The pass itself is checked on graphs in
tests/test_sp_pass.py.
"""
import multiprocessing
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from dist_helpers import run_ranks
from models import FAMILIES, chosen_logprobs, hf_reference, paged_kv
from seqpar import LLM, SamplingParams
from seqpar_bench.suite import MODES, Settings, _compiled_rounds

MAX_TOKENS = 4
SP_FROM = 5  # sp="auto": steps of at least this many tokens run SP
# Lengths 1, odd and prime: steps of 1..6 decodes and prefills of every parity.
PROMPTS = [[(7 * i + 3 * n) % 900 + 3 for i in range(n)] for n in (1, 3, 5, 13)]


def assert_close(outputs, expected, what):
    for i, (out, (tokens, logprobs)) in enumerate(zip(outputs, expected)):
        assert out.token_ids == tokens, f"{what}: prompt {i} greedy tokens differ"
        worst = max(abs(a - b) for a, b in zip(chosen_logprobs(out), logprobs))
        assert worst < 2e-4, f"{what}: prompt {i} logprob differs by {worst:.2e}"


def as_expected(outputs):
    return [(o.token_ids, chosen_logprobs(o)) for o in outputs]


@pytest.mark.parametrize("family,overlap", [("llama-gqa", False), ("qwen3", True)])
def test_compiled_matches_eager_and_hf(tiny, family, overlap):
    model_dir = tiny(family)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, ignore_eos=True)
    hf = hf_reference(model_dir, PROMPTS, MAX_TOKENS)
    with LLM(str(model_dir), tensor_parallel_size=2, sequence_parallel="on",
             threads_per_rank=1) as eager:
        eager_sp = eager.generate(PROMPTS, params)
        eager.policy.mode = "off"  # the layers read each step's mode from its plan
        eager_tp = eager.generate(PROMPTS, params)
    # "auto" with a fixed threshold (no start-up measurement), run as "on" first. An 8-token
    # budget: chunked prefills of 6-8 tokens, decode steps of 1-4.
    with LLM(str(model_dir), tensor_parallel_size=2, sequence_parallel="auto",
             sp_min_tokens=SP_FROM, compile=True, overlap=overlap, max_num_batched_tokens=8,
             threads_per_rank=1) as llm:
        llm.policy.mode = "on"
        compiled = llm.generate(PROMPTS, params)
        alone = [llm.generate([p], params)[0] for p in PROMPTS[:2]]  # steps of 1..3 tokens
        stats = llm.comm_stats()
        forwards = llm.worker.compiled.forwards
        kinds_on = set(forwards)
        sp_runner = forwards[(True, overlap)]
        sp_graphs, sp_steps_on = len(sp_runner.backend.graphs), sp_runner.steps
        # "auto": one call of TP steps (decodes, below SP_FROM tokens) and SP steps (prefills).
        llm.policy.mode = "auto"
        llm.reset_comm_stats()
        mixed = llm.generate(PROMPTS, params)
        mixed_stats = llm.comm_stats()
        compile_s = llm.compile_s
    tp_runner = forwards[(False, False)]
    assert_close(compiled, hf, f"{family} compiled SP vs HF")
    assert_close(alone, hf[:2], f"{family} compiled SP, one prompt at a time, vs HF")
    assert_close(compiled, as_expected(eager_tp), f"{family} compiled SP vs eager TP")
    assert_close(compiled, as_expected(eager_sp), f"{family} compiled SP vs eager SP")
    assert_close(mixed, hf, f"{family} compiled sp=auto (TP and SP steps) vs HF")
    # "on": SP steps only, each on the compiled SP forward.
    assert kinds_on == {(True, overlap)}
    assert stats["steps"]["sp"] == sp_steps_on > 0 and stats["steps"]["tp"] == 0
    # Every token count ran on at most two graphs: S = T_pad / 2 dynamic, S = 1 specialised.
    assert 1 <= sp_graphs <= 2, [r.summary() for r in sp_runner.backend.reports]
    assert all(not r.left_alone and r.rewritten for r in sp_runner.backend.reports)
    assert stats.get("all_reduce", {"calls": 0})["calls"] == 0
    sp_steps = stats["steps"]["sp"]
    if overlap:  # o_proj / down_proj and qkv / gate_up as collective matmuls
        assert stats["reduce_scatter"]["calls"] == sp_steps  # the embedding's
        rings = stats["reduce_scatter_ring"]["calls"], stats["all_gather_ring"]["calls"]
        assert rings == (4 * sp_steps, 4 * sp_steps)
    else:
        assert stats["reduce_scatter"]["calls"] == 5 * sp_steps  # embedding + 2 x 2 layers
    # "auto": both kinds ran, every step compiled on its kind's forward, with no new SP graph
    # and at most two TP graphs (T dynamic, T = 1 specialised).
    tp_steps, sp_steps = mixed_stats["steps"]["tp"], mixed_stats["steps"]["sp"]
    assert tp_steps > 0 and sp_steps > 0, mixed_stats["steps"]
    assert set(forwards) == {(True, overlap), (False, False)}
    assert tp_runner.steps == tp_steps and sp_runner.steps - sp_steps_on == sp_steps
    assert len(sp_runner.backend.graphs) == sp_graphs
    assert 1 <= len(tp_runner.backend.graphs) <= 2, [r.summary() for r in tp_runner.backend.reports]
    assert mixed_stats["all_reduce"]["calls"] == 5 * tp_steps  # the TP graph's, counted per step
    assert compile_s == sp_runner.compile_s + tp_runner.compile_s
    assert sp_runner.compile_s > 0 and tp_runner.compile_s > 0


# Three sequences (prompts of 5, 4 and 2 tokens, then one token each): steps of 11 and 3 tokens.
SEQS = [[11, 200, 37, 5, 900], [64, 3, 777, 42], [8, 512]]
NEXT = [13, 99, 650]


def _plans(world):
    from seqpar.worker.plan import StepPlan

    lens = [len(p) for p in SEQS]
    tables, ones = [[i] for i in range(len(SEQS))], [True] * len(SEQS)  # a block each
    prefill = StepPlan(True, torch.tensor(sum(SEQS, [])), [0] * 3, lens, ones, tables, world)
    decode = StepPlan(True, torch.tensor(NEXT), lens, [1] * 3, ones, tables, world)
    return prefill, decode


def _compiled_logprobs(rank, world, model_dirs):
    """Per family and kind (SP, SP + overlap): the prefill's and the decode step's log-probs
    [3, V] on rank 0 from the compiled forward (no Inductor), and the graphs it compiled."""
    from seqpar.compile.runner import CompiledForward
    from seqpar.config import ModelConfig
    from seqpar.distributed.comm import Comm
    from seqpar.models import MODELS

    out = {}
    for family, model_dir in model_dirs.items():
        cfg = ModelConfig.from_dir(model_dir)
        model = MODELS[cfg.model_type](cfg, Comm(dist.group.WORLD, rank, world), torch.float32, 64)
        model.load_weights(model_dir)
        for overlap in (False, True):
            paged_kv(model)
            runner = CompiledForward(model, sp=True, inductor=False, overlap=overlap)
            steps = []
            for plan in _plans(world):
                plan.overlap = overlap
                logits = runner(plan)
                steps.append(None if logits is None else torch.log_softmax(logits, -1))
            out[family, overlap] = steps, len(runner.backend.graphs), runner.report.summary()
    return out


def test_every_family_compiled_sp_matches_hf(tiny):
    import transformers

    dirs = {f: tiny(f) for f in sorted(FAMILIES)}
    results = run_ranks(_compiled_logprobs, 2, dirs, timeout=300)[0]
    for family, model_dir in dirs.items():
        hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():  # rows: each prompt's last token, then the token after it
            full = [torch.log_softmax(hf(torch.tensor([p + [t]])).logits[0], -1)
                    for p, t in zip(SEQS, NEXT)]
        expected = [torch.stack([f[len(p) - 1] for f, p in zip(full, SEQS)]),
                    torch.stack([f[len(p)] for f, p in zip(full, SEQS)])]
        for overlap in (False, True):
            steps, graphs, summary = results[family, overlap]
            what = f"{family} compiled SP{' + overlap' if overlap else ''}"
            assert graphs == 1, f"{what}: recompiled for the second token count"  # S = 6, S = 2
            assert "0 left TP" in summary, (what, summary)
            for step, got, want in zip(("prefill", "decode"), steps, expected):
                worst = (got - want).abs().max().item()
                assert worst < 1e-4, f"{what}: {step} log-probs differ from HF by {worst:.2e}"


def test_import_leaves_compile_out():
    """`import seqpar` loads neither the SP pass nor the compile ops (nor the backend)."""
    code = ("import sys, seqpar; print(sorted(m for m in sys.modules if m.startswith("
            "('seqpar.compile.sp_pass', 'seqpar.compile.ops', 'seqpar.compile.backend'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_compile_with_pipeline_stages_fails_before_any_rank(tiny):
    with pytest.raises(ValueError, match="compile=True with pipeline_parallel_size=2: .* SP pass"):
        LLM(str(tiny("llama-gqa")), tensor_parallel_size=1, pipeline_parallel_size=2, compile=True)
    assert not multiprocessing.active_children() and not dist.is_initialized()


def test_bench_compiles_before_the_timed_runs():
    """`seqpar bench`'s compiled modes: an untimed call compiles first, so no timed run (even
    with no warm-up rounds) holds a compile; the records carry its seconds. A stand-in subject
    that compiles for 10 s on each shape it has not seen, no ranks."""
    class Subject:
        def __init__(self, recompiles=False):
            self.seen, self.compile, self.recompiles = set(), 0.0, recompiles

        def call(self, method, shape=None):
            if method == "compile_s":
                return self.compile
            if shape not in self.seen or self.recompiles:
                self.seen.add(shape)
                self.compile += 10.0
                return 10.5
            return 0.5

    modes = [m for m in MODES if m.name in ("sp=off", "compile")]
    s = Settings(models=[], tps=[2], modes=modes, tokens=[], batches=[], prompt_len=0,
                 new_tokens=0, runs=3, warmup=0, memory_runs=0, threads=2, log=lambda *a: None)
    # recompiles: a subject that compiles on every call (a shape its guards keep missing)
    for recompiles in (False, True):
        hosts = {"sp=off": Subject(), "compile": Subject(recompiles)}
        g = SimpleNamespace(modes=modes, host=lambda m: hosts[m.name])
        for shape, compile_s in ((16, 10.0), (33, 10.0), (16, 10.0 * recompiles)):
            times, fields = _compiled_rounds(s, g, modes,
                                             lambda m: g.host(m).call("prefill", shape))
            assert list(fields) == ["compile"]
            assert fields["compile"]["compile_s"] == compile_s
            assert fields["compile"]["compile_in_runs_s"] == 30.0 * recompiles
            assert times["compile"] == [10.5 if recompiles else 0.5] * 3
