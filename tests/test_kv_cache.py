"""The paged KV cache against HF transformers: a pool of a dozen blocks under many requests
(queueing, preemption), shared prefixes (hits counted, outputs unchanged), the budget formula, the
pool-too-small error, and the Engine API (add / step / abort) underneath LLM.generate."""
import dataclasses

import pytest

from models import chosen_logprobs, hf_reference
from seqpar import LLM, SamplingParams
from seqpar.config import EngineConfig, ModelConfig, ParallelConfig, round_up

MAX_TOKENS = 6
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=1, ignore_eos=True)
# 10 prompts of 11-15 tokens: each fits one block of 16 and needs a second one while decoding.
PROMPTS = [[(13 * i + 7 * n) % 900 + 3 for i in range(n)] for n in (14, 15, 13, 15, 12, 14, 11, 15, 13, 14)]
_refs = {}


def reference(model_dir, prompts):
    key = (str(model_dir), tuple(map(tuple, prompts)))
    if key not in _refs:
        _refs[key] = hf_reference(model_dir, prompts, MAX_TOKENS)
    return _refs[key]


def assert_matches(outputs, expected, what):
    for i, (out, (tokens, logprobs)) in enumerate(zip(outputs, expected)):
        assert out.token_ids == tokens, f"{what}: prompt {i} greedy tokens differ from HF"
        worst = max(abs(a - b) for a, b in zip(chosen_logprobs(out), logprobs))
        assert worst < 2e-4, f"{what}: prompt {i} logprob differs from HF by {worst:.2e}"


def block_bytes(model_dir, tp=1, block_size=16):
    cfg = ModelConfig.from_dir(model_dir)
    return 2 * cfg.num_layers * max(1, cfg.num_kv_heads // tp) * block_size * cfg.head_dim * 4


@pytest.mark.parametrize("family,tp", [("llama-gqa", 1), ("mistral", 2), ("llama-mqa-tied", 3)])
def test_small_pool_queues_and_preempts(tiny, family, tp):
    model_dir = tiny(family)
    expected = reference(model_dir, PROMPTS)
    # 12 blocks of 16 tokens for 10 requests that need 2 blocks each: all are admitted in one
    # step, then decoding runs out of blocks and the newest are preempted and recomputed.
    with LLM(str(model_dir), tensor_parallel_size=tp, sequence_parallel="on" if tp > 1 else "off",
             kv_cache_memory_bytes=12 * block_bytes(model_dir, tp), max_model_len=64,
             max_num_batched_tokens=256, threads_per_rank=1) as llm:
        assert llm.cache_stats()["num_blocks"] == 12
        assert_matches(llm.generate(PROMPTS, GREEDY), expected, f"{family} tp={tp} 12 blocks")
        stats = llm.cache_stats()
        assert stats["preemptions"] > 0, stats
        assert stats["used_blocks"] == 0, "blocks still held after every request finished"


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_prefix_cache_hits_and_outputs(tiny, tp, pp):
    model_dir = tiny("qwen3")
    shared = [(5 * i) % 900 + 3 for i in range(40)]  # 2 full blocks + 8 tokens
    prompts = [shared + [100 + j, 200 + j] for j in range(3)] + [shared[:32]]
    expected = reference(model_dir, prompts)
    with LLM(str(model_dir), tensor_parallel_size=tp, pipeline_parallel_size=pp,
             sequence_parallel="on" if tp > 1 else "off", threads_per_rank=1) as llm:
        assert_matches(llm.generate(prompts[:1], GREEDY), expected[:1], "first, uncached")
        assert llm.cache_stats()["prefix_hits"] == 0
        outs = llm.generate(prompts[1:], GREEDY)
        assert_matches(outs, expected[1:], "sharing a cached prefix")
        stats = llm.cache_stats()
        # Two requests reuse 2 blocks each (32 tokens); the 32-token prompt reuses only its first
        # block: its last token must be computed, so its second block is computed again.
        assert [o.num_cached_tokens for o in outs] == [32, 32, 16]
        assert stats["prefix_hits"] == 32 + 32 + 16
        assert stats["prefix_queries"] == sum(map(len, prompts))
    if tp > 1:
        return
    with LLM(str(model_dir), enable_prefix_caching=False, threads_per_rank=1) as llm:
        assert_matches(llm.generate(prompts, GREEDY), expected, "prefix caching off")
        assert llm.cache_stats()["prefix_hits"] == 0


def test_kv_budget_formula_and_too_small_pool(tiny):
    model_dir = tiny("llama-gqa")
    cfg = ModelConfig.from_dir(model_dir)
    per_block = block_bytes(model_dir, tp=2, block_size=8)
    engine = EngineConfig(model_dir, cfg, ParallelConfig(2), "float32", 64, block_size=8,
                          kv_cache_memory_bytes=100 * per_block + per_block - 1)
    assert engine.kv_block_bytes == per_block and engine.num_blocks == 100
    # Frozen: a config with another block count is a new one, validated again.
    with pytest.raises(dataclasses.FrozenInstanceError):
        engine.num_blocks = 12
    assert dataclasses.replace(engine, num_blocks=12).num_blocks == 12
    with pytest.raises(ValueError, match=r"3 blocks x 8 tokens = 24 tokens .* fewer than "):
        dataclasses.replace(engine, num_blocks=3)
    # 3 blocks of 16 = 48 tokens < max_model_len 64: the error names both and the fix.
    with pytest.raises(ValueError, match=r"3 blocks x 16 tokens = 48 tokens .* fewer than "
                                         r"max_model_len=64 .* at least \d+ .*lower max_model_len"):
        LLM(str(model_dir), max_model_len=64, kv_cache_memory_bytes=3 * block_bytes(model_dir))


def test_engine_add_step_abort(tiny):
    model_dir = tiny("llama-gqa")
    expected = reference(model_dir, PROMPTS[:2])
    with LLM(str(model_dir), threads_per_rank=1) as llm:
        engine = llm.engine
        engine.add_request("a", PROMPTS[0], GREEDY)
        engine.add_request("b", PROMPTS[1], SamplingParams(max_tokens=50, temperature=0,
                                                           ignore_eos=True))
        with pytest.raises(ValueError, match="already running"):
            engine.add_request("a", PROMPTS[0], GREEDY)
        with pytest.raises(ValueError, match="longer than max_model_len=256"):
            engine.add_request("c", [5] * 257, GREEDY)
        seen, finished = {"a": [], "b": []}, False
        while not finished:
            for delta in engine.step():
                assert len(delta.token_ids) == 1, "one new token per step"
                seen[delta.request_id] += delta.token_ids
                finished = finished or (delta.request_id == "a" and delta.finished)
        assert seen["a"] == expected[0][0]
        assert engine.num_running() == 1 and llm.cache_stats()["used_blocks"] > 0
        engine.abort_request("b")
        assert not engine.has_unfinished() and engine.step() == []
        assert llm.cache_stats()["used_blocks"] == 0, "an aborted request kept its blocks"
        # The aborted request's blocks are reusable: the engine still serves.
        assert_matches(llm.generate(PROMPTS[1:2], GREEDY), expected[1:], "after an abort")


@pytest.mark.parametrize("heads,kv_heads,d,window", [(4, 2, 8, None), (6, 1, 8, 5), (3, 3, 8, None),
                                                     (4, 2, 64, None), (6, 1, 64, 5)])
def test_paged_attention_matches_per_sequence_sdpa(heads, kv_heads, d, window):
    """One flat step of decodes and prefill chunks, some with cached context, in scattered blocks:
    each sequence's output equals plain causal attention over its own keys (sliding window too).
    Head size 8 runs seqpar's own kernel, 64 vLLM's (layers/attention_kernels.py)."""
    import random

    import torch
    import torch.nn.functional as F

    from seqpar.worker.plan import StepPlan
    from seqpar.layers.attention import Attention

    rng, gen = random.Random(heads), torch.Generator().manual_seed(kv_heads)
    bs, num_blocks = 16, 64
    attn = Attention(heads, kv_heads, d, window)
    pool = torch.zeros(2, num_blocks, bs, kv_heads, d)
    attn.k_cache, attn.v_cache = pool.unbind(0)
    # (cached context, new tokens): decodes, a lone-looking uncached prefill, cached chunks.
    shapes = [(5, 1), (0, 1), (0, 6), (19, 3), (33, 1), (12, 37)]
    free = rng.sample(range(num_blocks), num_blocks)
    tables = [[free.pop() for _ in range(round_up(s + n, bs) // bs)] for s, n in shapes]
    full = [(torch.randn(s + n, heads, d, generator=gen), torch.randn(s + n, kv_heads, d, generator=gen),
             torch.randn(s + n, kv_heads, d, generator=gen)) for s, n in shapes]
    for (s, _), table, (_, k, v) in zip(shapes, tables, full):  # the cached context, as a past step wrote it
        slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(s)], dtype=torch.int64)
        attn.write_kv(k[:s], v[:s], slots)
    q = torch.cat([qf[s:] for (s, _), (qf, _, _) in zip(shapes, full)])
    k = torch.cat([kf[s:] for (s, _), (_, kf, _) in zip(shapes, full)])
    v = torch.cat([vf[s:] for (s, _), (_, _, vf) in zip(shapes, full)])
    plan = StepPlan(False, torch.zeros(q.shape[0], dtype=torch.int64), [s for s, _ in shapes],
                    [n for _, n in shapes], [True] * len(shapes), tables, 1, bs)
    out = attn(q, k, v, plan).view(-1, heads, d)
    row = 0
    for (s, n), (qf, kf, vf) in zip(shapes, full):
        pos_q, pos_k = torch.arange(s, s + n)[:, None], torch.arange(s + n)[None]
        mask = pos_k <= pos_q
        if window is not None:
            mask &= pos_k > pos_q - window
        g = heads // kv_heads
        ref = F.scaled_dot_product_attention(
            qf[s:].transpose(0, 1), kf.repeat_interleave(g, 1).transpose(0, 1),
            vf.repeat_interleave(g, 1).transpose(0, 1), attn_mask=mask).transpose(0, 1)
        torch.testing.assert_close(out[row:row + n], ref, atol=1e-5, rtol=1e-5)
        row += n

