"""Engine behaviour: collective accounting per mode, the auto policy, sampling against an
independent reference of the distribution, logprobs against HF transformers."""
import math

import numpy as np
import pytest
import torch

from models import hf_next_logprobs
from seqpar import LLM, SamplingParams
from seqpar.engine.policy import NEVER, SWEEP, SPPolicy
from seqpar.worker.sampler import Sampler

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
    assert stats["steps"] == {"sp": 1, "tp": 0, "sp_verify": 0, "tp_verify": 0,
                              "padded_tokens": padded - t}


def test_tp_prefill_uses_all_reduce_only(llm2):
    layers, hidden, t = 2, 48, 7
    stats = prefill_stats(llm2, "off", t)
    assert stats["reduce_scatter"]["calls"] == 0 and stats["all_gather"]["calls"] == 0
    assert stats["all_reduce"] == {"calls": 1 + 2 * layers, "bytes": (1 + 2 * layers) * t * hidden * 4}
    assert stats["steps"] == {"sp": 0, "tp": 1, "sp_verify": 0, "tp_verify": 0,
                              "padded_tokens": 0}


def test_auto_policy_decides_by_threshold():
    """"auto": TP below the threshold, SP from it, SP + overlap from the overlap threshold."""
    policy = SPPolicy("auto", world_size=2, threshold=4, overlap=True, overlap_threshold=64)
    assert [policy.decide(t) for t in (1, 3, 4, 63, 64, 1000)] == [
        (False, False), (False, False), (True, False), (True, False), (True, True), (True, True)]
    never = SPPolicy("auto", world_size=2, threshold=NEVER, overlap=True, overlap_threshold=NEVER)
    assert never.decide(1 << 20) == (False, False)
    assert SPPolicy("auto", world_size=1, threshold=1).decide(100) == (False, False)
    assert SPPolicy("on", world_size=2, overlap=True).decide(1) == (True, True)
    assert SPPolicy("off", world_size=2, threshold=1).decide(100) == (False, False)


def test_auto_keeps_decode_on_tp_below_threshold(llm2):
    """With a threshold of 5 tokens, a 5-token prompt's step runs SP and every 1-token decode
    step after it runs TP: the policy's decision reaches the ranks through the plan."""
    saved = llm2.policy.mode, llm2.policy.threshold
    llm2.policy.mode, llm2.policy.threshold = "auto", 5
    try:
        llm2.reset_comm_stats()
        llm2.generate([[5, 6, 7, 8, 9]],
                      SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        stats = llm2.comm_stats()
    finally:
        llm2.policy.mode, llm2.policy.threshold = saved
    assert stats["steps"] == {"sp": 1, "tp": 4, "sp_verify": 0, "tp_verify": 0,
                              "padded_tokens": 1}
    layers = 2  # the prefill step alone reduce-scatters: embedding + 2 per layer
    assert stats["reduce_scatter"]["calls"] == 1 + 2 * layers


def test_measured_thresholds_are_sane(llm2):
    """The start-up measurement (timings on a shared machine, so only its form is checked): both
    thresholds are swept token counts or NEVER, and the SP one is where the table says SP (with
    or without overlap) starts to beat TP for good."""
    worker = llm2.worker.diagnostics
    table = worker.sp_table
    assert [row["tokens"] for row in table] == list(SWEEP)
    assert all(row["tp_s"] > 0 and row["sp_s"] > 0 for row in table)
    assert worker.sp_threshold in (*SWEEP, NEVER) and worker.overlap_threshold in (*SWEEP, NEVER)
    wins = [min(r["sp_s"], r.get("overlap_s", math.inf)) < r["tp_s"] for r in table]
    expected = NEVER
    for row, win in zip(reversed(table), reversed(wins)):
        if not win:
            break
        expected = row["tokens"]
    assert worker.sp_threshold == expected


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


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float):
    """What temperature, top-k and top-p sampling should draw from, in float64: softmax(z / T),
    the top_k most likely kept, then the smallest most-likely-first prefix whose mass reaches
    top_p, renormalized."""
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, dtype=bool)
    keep[order[:top_k] if top_k > 0 else order] = True
    q = np.where(keep, p, 0.0) / p[keep].sum()
    if top_p < 1:
        mass_before = np.cumsum(q[order]) - q[order]
        assert np.all(np.abs(mass_before - top_p) > 1e-3), "top_p too close to a boundary to test"
        q[order[mass_before >= top_p]] = 0.0
    return q / q.sum()


def chi2_bound(df: int, z: float = 4.0) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at z standard deviations."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.6, 0, 1.0), (1.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.75), (1.3, 6, 0.8)])
def test_sampling_matches_reference_distribution(temperature, top_k, top_p):
    """Draws from one row of logits stay inside the allowed set and their frequencies fit the
    renormalized distribution (chi-square, fixed seed)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, size=16)
    expected = reference_distribution(logits, temperature, top_k, top_p)
    draws = 8000
    # One request (one generator, seeded once) sampled in `draws` rows of one step.
    sampler = Sampler()
    sampler.add(0, SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=0))
    row = torch.tensor(logits, dtype=torch.float32)
    tokens = sampler.sample(row.expand(draws, -1).contiguous(), [0] * draws).tokens.numpy()
    counts = np.bincount(tokens, minlength=len(logits))
    allowed = expected > 0
    outside = np.flatnonzero(counts * ~allowed)
    assert outside.size == 0, f"drew tokens outside the allowed set: {outside}"
    stat = ((counts[allowed] - draws * expected[allowed]) ** 2 / (draws * expected[allowed])).sum()
    assert stat < chi2_bound(int(allowed.sum()) - 1), (stat, counts, np.round(expected * draws))


def test_top_k_one_is_greedy(llm1):
    greedy = llm1.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    topk1 = llm1.generate([[5, 6, 7]], SamplingParams(max_tokens=8, temperature=1.5, top_k=1,
                                                      ignore_eos=True))
    assert topk1[0].token_ids == greedy[0].token_ids


def test_logprobs_top_k(llm2, tiny):
    """Per generated token: the top-4 entries and the chosen token's logprob equal HF's
    log_softmax on the same weights (tp=2, a vocab of 1001 split over two ranks with padding),
    the model's distribution before temperature."""
    prompt = [5, 6, 7]
    out = llm2.generate([prompt], SamplingParams(max_tokens=3, temperature=0.8, logprobs=4,
                                                 seed=7, ignore_eos=True))[0]
    prefixes = [prompt + out.token_ids[:i] for i in range(len(out.token_ids))]
    for step, token, ref in zip(out.logprobs, out.token_ids,
                                hf_next_logprobs(tiny("llama-gqa"), prefixes)):
        top = ref.topk(4)
        assert set(step) == set(top.indices.tolist()) | {token}
        for t, value in step.items():
            assert abs(value - ref[t].item()) < 1e-4, (t, value, ref[t].item())


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
