"""seqpar against HF transformers on the same weights: every family, tp 1-3, SP off / on / auto.

One LLM per (family, tp); the SP mode is switched between calls, which the engine allows because
layers read each step's mode from its plan (docs/architecture.md, invariant 4).
"""
import pytest

from models import FAMILIES, assert_matches, hf_reference
from seqpar import LLM, SamplingParams

MAX_TOKENS = 6
_reference = {}


def prompts_for(tp: int) -> list[list[int]]:
    """Lengths 1, tp-1, tp+1 and primes, so SP pads every possible remainder."""
    lengths = sorted({1, max(tp - 1, 1), tp + 1, 5, 7, 13, 23})
    return [[(7 * i + 3 * n) % 900 + 3 for i in range(n)] for n in lengths]


def reference(model_dir, prompts):
    key = (str(model_dir), tuple(map(tuple, prompts)))
    if key not in _reference:
        _reference[key] = hf_reference(model_dir, prompts, MAX_TOKENS)
    return _reference[key]


@pytest.mark.parametrize("tp", [1, 2, 3])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_matches_hf(tiny, family, tp):
    model_dir = tiny(family)
    prompts = prompts_for(tp)
    expected = reference(model_dir, prompts)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=2, ignore_eos=True)
    # A 16-token budget chunks the longer prompts, so steps mix prefill chunks and decodes.
    with LLM(str(model_dir), tensor_parallel_size=tp, sequence_parallel="auto",
             max_num_batched_tokens=16, threads_per_rank=1) as llm:
        measured = llm.policy.threshold
        # (mode, SP threshold, overlap, overlap threshold): the last mixes TP, SP and SP + overlap.
        modes = [("off", None, False, None), ("on", None, False, None), ("on", None, True, None),
                 ("auto", measured, False, None), ("auto", 8, True, 12)]
        for mode, threshold, overlap, overlap_threshold in modes if tp > 1 else modes[:1]:
            policy = llm.policy
            policy.mode, policy.threshold = mode, threshold
            policy.overlap, policy.overlap_threshold = overlap, overlap_threshold
            llm.reset_comm_stats()
            what = (f"{family} tp={tp} sp={mode}" + (f" threshold={threshold}" if threshold else "")
                    + (" overlap" if overlap else ""))
            # The whole batch at once, then each prompt alone (steps of exactly its length).
            assert_matches(llm.generate(prompts, params), expected, what + " batched")
            for prompt, exp in zip(prompts, expected):
                assert_matches(llm.generate([prompt], params), [exp], what + " alone")
            steps = llm.comm_stats()["steps"]
            if tp > 1 and mode == "on":
                assert steps["tp"] == 0 and steps["sp"] > 0
            stats = llm.comm_stats()
            if tp > 1 and mode == "auto" and threshold == 8:
                assert steps["tp"] > 0 and steps["sp"] > 0, "threshold 8 should mix TP and SP steps"
            if tp > 1 and overlap:
                assert stats["all_gather_ring"]["calls"] > 0 and stats["reduce_scatter_ring"]["calls"] > 0
            if mode == "on" and overlap:
                assert stats["reduce_scatter"]["calls"] == 1 * steps["sp"], "only the embedding scatters"
