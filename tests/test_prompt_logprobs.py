"""SamplingParams.prompt_logprobs through the whole engine, at tp 2 with every step SP, against
HF transformers' log-softmax of each prompt prefix (fp32): prompts longer than a step (chunked
prefill) in a batch, and a prompt whose blocks the prefix cache holds (its rows must still be
computed)."""
from __future__ import annotations

import pytest
import torch

from models import hf_next_logprobs
from seqpar import LLM, SamplingParams

K = 3


def _check(model, prompt: list[int], entries, k: int) -> None:
    """entries: None for the first prompt token, then per token {id: logprob} of the top k and
    the prompt's own token, each within fp32 tolerance of HF's log-softmax."""
    assert entries[0] is None and len(entries) == len(prompt)
    refs = hf_next_logprobs(model, [prompt[:i] for i in range(1, len(prompt))])
    for i, (ref, entry) in enumerate(zip(refs, entries[1:]), start=1):
        top = torch.topk(ref, k)
        want = {int(t): v.item() for t, v in zip(top.indices, top.values)}
        want[prompt[i]] = ref[prompt[i]].item()
        assert entry.keys() == want.keys(), i
        assert [entry[t] for t in want] == pytest.approx(list(want.values()), abs=2e-4), i


def test_prompt_logprobs_equal_hf_at_tp2_with_sp(tiny):
    model = tiny("llama-gqa")
    long, short = list(range(5, 26)), [7, 300, 12, 999]
    # 8 tokens a step: the 21-token prompt takes three chunks, sharing steps with the other.
    with LLM(str(model), tensor_parallel_size=2, sequence_parallel="on", threads_per_rank=1,
             max_model_len=64, max_num_batched_tokens=8, block_size=4) as llm:
        outs = llm.generate([long, short], [SamplingParams(max_tokens=2, prompt_logprobs=K),
                                            SamplingParams(max_tokens=2, prompt_logprobs=0)])
        _check(model, long, outs[0].prompt_logprobs, K)
        _check(model, short, outs[1].prompt_logprobs, 0)
        assert [o.prompt_token_ids for o in outs] == [long, short]

        # Cached now: a request without prompt logprobs takes the cached blocks; one with them
        # computes every row again.
        [plain] = llm.generate([long], SamplingParams(max_tokens=1))
        assert plain.num_cached_tokens == 20 and plain.prompt_logprobs is None
        [again] = llm.generate([long], SamplingParams(max_tokens=1, prompt_logprobs=K))
        assert again.num_cached_tokens == 0
        _check(model, long, again.prompt_logprobs, K)


def test_prompt_logprobs_reach_rank_0_from_the_last_stage(tiny):
    """pp 2: the sampler rank is the last stage's; its prompt-logprob rows travel to rank 0 with
    the drawn tokens (a receive rank 0 sizes before the step runs), chunk after chunk."""
    model = tiny("llama-gqa")
    long, short = list(range(5, 26)), [7, 300, 12, 999]
    with LLM(str(model), pipeline_parallel_size=2, threads_per_rank=1, max_model_len=64,
             max_num_batched_tokens=8, block_size=4) as llm:
        outs = llm.generate([long, short, short], [
            SamplingParams(max_tokens=3, prompt_logprobs=K, logprobs=1),
            SamplingParams(max_tokens=3, prompt_logprobs=0, temperature=0),
            SamplingParams(max_tokens=3, temperature=0)])
    _check(model, long, outs[0].prompt_logprobs, K)
    _check(model, short, outs[1].prompt_logprobs, 0)
    assert outs[2].prompt_logprobs is None
    assert outs[1].token_ids == outs[2].token_ids  # greedy, with and without prompt rows
