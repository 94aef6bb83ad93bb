"""Random step plans across ranks: no hang, no mismatch."""
import random

from models import chosen_logprobs
from seqpar import LLM, SamplingParams


def test_random_plans_across_three_ranks(tiny):
    """A few hundred random steps (random batches, chunking and per-step modes) on 3 ranks:
    nothing hangs, and every output equals the plain-TP run of the same requests."""
    rng = random.Random(0)
    with LLM(str(tiny("qwen3")), tensor_parallel_size=3, sequence_parallel="off",
             threads_per_rank=1) as llm:
        steps = 0
        while steps < 300:
            prompts = [[rng.randrange(3, 1000) for _ in range(rng.randint(1, 20))]
                       for _ in range(rng.randint(1, 6))]
            params = SamplingParams(max_tokens=rng.randint(1, 8), temperature=0, logprobs=0,
                                    ignore_eos=True)
            llm.engine.scheduler.max_tokens = rng.randint(1, 24)  # chunked prefills
            llm.policy.mode = "off"
            expected = llm.generate(prompts, params)
            choose = random.Random(rng.random())
            # Rank 0 alone decides each step (TP, SP or SP + overlap); the plan carries it.
            llm.policy.decide = lambda tokens: (choose.random() < 0.6, choose.random() < 0.5)
            llm.reset_comm_stats()
            got = llm.generate(prompts, params)
            del llm.policy.decide
            counts = llm.comm_stats()["steps"]
            steps += counts["sp"] + counts["tp"]
            for e, g in zip(expected, got):
                assert g.token_ids == e.token_ids
                assert max(abs(a - b) for a, b in zip(chosen_logprobs(g), chosen_logprobs(e))) < 2e-4
