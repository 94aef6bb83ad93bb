"""compile=True end to end at tp=2: the compiled SP forward (Dynamo + the SP pass + Inductor)
against eager TP, eager SP and HF transformers: greedy tokens identical, logprobs within 2e-4,
token counts 2 does not divide, and no recompile per token count.

Inductor on CPU takes tens of seconds per graph, so two families run end to end here (llama-gqa:
GQA, untied, Llama-3 rope scaling; qwen3: q/k norms); the pass itself is checked on graphs in
tests/test_sp_pass.py.
"""
import pytest

from models import chosen_logprobs, hf_reference
from seqpar import LLM, SamplingParams

MAX_TOKENS = 4
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
def test_compiled_sp_matches_eager_and_hf(tiny, family, overlap, capfd):
    model_dir = tiny(family)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, ignore_eos=True)
    hf = hf_reference(model_dir, PROMPTS, MAX_TOKENS)
    with LLM(str(model_dir), tensor_parallel_size=2, sequence_parallel="on",
             threads_per_rank=1) as eager:
        eager_sp = eager.generate(PROMPTS, params)
    with LLM(str(model_dir), tensor_parallel_size=2, sequence_parallel="on", compile=True,
             overlap=overlap, max_num_batched_tokens=8, threads_per_rank=1) as llm:
        compiled = llm.generate(PROMPTS, params)  # 8-token budget: chunked prefills + decodes
        alone = [llm.generate([p], params)[0] for p in PROMPTS[:2]]  # steps of 1..3 tokens
        stats = llm.comm_stats()
        runner = llm.worker.compiled
        # The same engine with SP off runs eager TP (the compiled forward serves SP steps).
        llm.policy.mode = "off"
        eager_tp = llm.generate(PROMPTS, params)
    assert_close(compiled, hf, f"{family} compiled SP vs HF")
    assert_close(alone, hf[:2], f"{family} compiled SP, one prompt at a time, vs HF")
    assert_close(compiled, as_expected(eager_tp), f"{family} compiled SP vs eager TP")
    assert_close(compiled, as_expected(eager_sp), f"{family} compiled SP vs eager SP")
    # Every token count ran on at most two graphs: S = T_pad / 2 dynamic, S = 1 specialised.
    assert 1 <= len(runner.backend.graphs) <= 2, [r.summary() for r in runner.backend.reports]
    assert all(not r.left_alone and r.rewritten for r in runner.backend.reports)
    assert stats["steps"]["sp"] > 0 and stats["steps"]["tp"] == 0
    assert stats.get("all_reduce", {"calls": 0})["calls"] == 0
    sp_steps = stats["steps"]["sp"]
    if overlap:  # o_proj / down_proj and qkv / gate_up as collective matmuls
        assert stats["reduce_scatter"]["calls"] == sp_steps  # the embedding's
        rings = stats["reduce_scatter_ring"]["calls"], stats["all_gather_ring"]["calls"]
        assert rings == (4 * sp_steps, 4 * sp_steps)
    else:
        assert stats["reduce_scatter"]["calls"] == 5 * sp_steps  # embedding + 2 x 2 layers
    assert runner.compile_s > 0
    # The log says what the pass did (the seqpar logger writes to stderr).
    assert "seqpar sp pass: 2 region(s) rewritten, 0 left TP" in capfd.readouterr().err
