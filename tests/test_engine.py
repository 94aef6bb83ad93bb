"""Engine behaviour: collective accounting per mode, the auto policy, random plans, sampling."""
import random

import pytest

from models import chosen_logprobs
from seqpar import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm2(tiny):
    """tp=2 on a 2-layer Llama with hidden 48, SP mode switched per test."""
    with LLM(str(tiny("llama-gqa")), tensor_parallel_size=2, sequence_parallel="auto",
             threads_per_rank=1) as llm:
        yield llm


def prefill_stats(llm, mode: str, tokens: int) -> dict:
    llm.policy.mode = mode
    llm.reset_comm_stats()
    llm.generate([list(range(3, 3 + tokens))], SamplingParams(max_tokens=1, temperature=0))
    return llm.comm_stats()


def test_sp_prefill_uses_reduce_scatter_and_all_gather_only(llm2):
    layers, hidden, t, n = 2, 48, 7, 2
    padded = 8  # 7 tokens padded to a multiple of tp=2
    stats = prefill_stats(llm2, "on", t)
    assert stats["all_reduce"]["calls"] == 0, "an SP step must not all-reduce activations"
    # The embedding and each layer's attention-out and down projections reduce-scatter [T_pad, H].
    assert stats["reduce_scatter"] == {"calls": 1 + 2 * layers, "bytes": (1 + 2 * layers) * padded * hidden * 4}
    # QKV and gate_up all-gather [T_pad, H] per layer; then one gather of the sampled rows (K=1 per rank).
    assert stats["all_gather"] == {"calls": 2 * layers + 1,
                                   "bytes": 2 * layers * padded * hidden * 4 + n * 1 * hidden * 4}
    assert stats["steps"] == {"sp": 1, "tp": 0, "padded_tokens": padded - t}


def test_tp_prefill_uses_all_reduce_only(llm2):
    layers, hidden, t = 2, 48, 7
    stats = prefill_stats(llm2, "off", t)
    assert stats["reduce_scatter"]["calls"] == 0 and stats["all_gather"]["calls"] == 0
    assert stats["all_reduce"] == {"calls": 1 + 2 * layers, "bytes": (1 + 2 * layers) * t * hidden * 4}
    assert stats["steps"] == {"sp": 0, "tp": 1, "padded_tokens": 0}


def test_auto_keeps_decode_on_tp_when_measured_threshold_says_so(llm2):
    llm2.policy.mode = "auto"
    threshold = llm2.worker.sp_threshold
    # Measured at start-up on this gloo group: a 1-token all-reduce beats reduce-scatter +
    # all-gather (two latency-bound collectives instead of one).
    assert threshold > 1, f"measured threshold {threshold}: SP would run 1-token decodes"
    llm2.policy.threshold = threshold
    llm2.reset_comm_stats()
    llm2.generate([[5, 6, 7]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    stats = llm2.comm_stats()
    assert stats["steps"]["sp"] == 0 and stats["steps"]["tp"] == 5
    assert stats["reduce_scatter"]["calls"] == 0


@pytest.fixture(scope="module")
def llm1(tiny):
    with LLM(str(tiny("mistral")), threads_per_rank=1, seed=1) as llm:
        yield llm


def test_seeded_sampling_is_reproducible(llm1):
    p = SamplingParams(max_tokens=12, temperature=2.0, top_p=0.95, top_k=50, seed=123, ignore_eos=True)
    first = llm1.generate([[5, 6, 7]], p)[0].token_ids
    assert llm1.generate([[5, 6, 7], [9, 9]], p)[0].token_ids == first, "batching changed a seeded sample"
    other = SamplingParams(max_tokens=12, temperature=2.0, top_p=0.95, top_k=50, seed=124, ignore_eos=True)
    assert llm1.generate([[5, 6, 7]], other)[0].token_ids != first


def test_top_k_one_is_greedy(llm1):
    greedy = llm1.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    topk1 = llm1.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=1.5, top_k=1,
                                                      ignore_eos=True))
    assert topk1[0].token_ids == greedy[0].token_ids


def test_logprobs_top_k(llm1):
    out = llm1.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=1.0, logprobs=4,
                                                    ignore_eos=True))[0]
    for step, token in zip(out.logprobs, out.token_ids):
        assert token in step and 4 <= len(step) <= 5
        assert all(v <= 0 for v in step.values())
        top4 = sorted(step.values(), reverse=True)[:4]
        assert top4 == sorted(top4, reverse=True)


def test_finish_reasons(llm1):
    out = llm1.generate([[5, 6, 7]], GREEDY)[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4
    # Make the third greedy token an end-of-sequence token: generation stops there, with it.
    llm1.eos_ids.add(out.token_ids[2])
    try:
        stopped = llm1.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0))[0]
    finally:
        llm1.eos_ids.discard(out.token_ids[2])
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == out.token_ids[:out.token_ids.index(out.token_ids[2]) + 1]


def test_max_model_len_ends_generation(tiny):
    with LLM(str(tiny("mistral")), max_model_len=10, threads_per_rank=1) as llm:
        out = llm.generate([list(range(3, 11))], SamplingParams(max_tokens=20, temperature=0,
                                                                 ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 2


def test_prompt_forms(llm1):
    ids = [5, 6, 7]
    forms = [ids, [ids], {"prompt_token_ids": ids}, [{"prompt_token_ids": ids}]]
    results = [llm1.generate(f, GREEDY)[0].token_ids for f in forms]
    assert all(r == results[0] for r in results)
    with pytest.raises(ValueError, match="no tokenizer"):
        llm1.generate("hello", GREEDY)
