"""Speculative decoding (issue 22): speculative_config validation before any rank starts, the
n-gram proposer against a brute-force search, the draft model against HF transformers' greedy
tokens and sampling distribution, the block manager's rollback of rejected drafts, the back-off
rule, statistics and server counters; and end to end: greedy outputs equal HF's with speculation
on (every family, tp 1-3, SP off / on / auto, preemption, prefix caching), a chi-square test of
sampled tokens, blocks freed."""
from __future__ import annotations

import multiprocessing
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers

from models import FAMILIES, MOE_FAMILIES, build, hf_next_logprobs, hf_reference, valid_tp
from seqpar import LLM, SamplingParams
from seqpar.cli import main
from seqpar.config import EngineConfig, ModelConfig, ParallelConfig, SpeculativeConfig
from seqpar.engine.block_manager import BlockManager
from seqpar.engine.sequence import Sequence
from seqpar.entrypoints.metrics import ServerMetrics, snapshot
from seqpar.spec.draft import DraftProposer, DraftRequest
from seqpar.spec.ngram import NgramProposer
from seqpar.spec.speculator import (FIRST_PAUSE, MAX_PAUSE, MIN_VERIFICATIONS, Backoff, SpecStats,
                                    Speculator)
from test_engine import chi2_bound, reference_distribution

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3}


# ---- speculative_config: parsed and checked before any rank starts ----------------------------

def test_config_defaults_and_forms():
    cfg = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 4})
    assert (cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (1, 5)
    assert SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 2, '
                                   '"prompt_lookup_min": 7}').prompt_lookup_max == 7
    draft = SpeculativeConfig.parse({"model": "/some/dir", "num_speculative_tokens": 2})
    assert draft.method == "draft_model" and draft.model == "/some/dir"
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse(cfg) is cfg


@pytest.mark.parametrize("value,match", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "method 'eagle' is not supported"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be"),
    ({"method": "ngram", "num_speculative_tokens": 2.5}, "num_speculative_tokens must be"),
    ({"method": "ngram"}, "num_speculative_tokens is required"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "unknown key.*lookahead"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 3}, "prompt_lookup_min=4 exceeds prompt_lookup_max=3"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 0}, "prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "needs method 'draft_model'"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs model"),
    ({"model": 3, "num_speculative_tokens": 2}, "needs model .*got 3"),
    ({"model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "prompt_lookup_max is for"),
    ({"model": "x", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
     "draft_tensor_parallel_size=2"),
    ({"num_speculative_tokens": 2}, "give method"),
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a dict"),
])
def test_config_errors_name_the_field(value, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.parse(value)


def fails_before_start(match, **kwargs):
    with pytest.raises(ValueError, match=match):
        LLM(threads_per_rank=1, **kwargs)
    assert multiprocessing.active_children() == [], "a rank was started for a bad configuration"


def test_engine_checks_before_start(tiny, tiny_root):
    target = str(tiny("llama-gqa"))  # vocab 1001
    fails_before_start("the draft model .* has vocab_size 1003, the target 1001", model=target,
                       speculative_config={"model": str(tiny("qwen2")), "num_speculative_tokens": 2})
    short = build("llama-gqa", tiny_root, max_position_embeddings=32)
    fails_before_start("max_position_embeddings=32, fewer than max_model_len=64", model=target,
                       max_model_len=64, speculative_config={"model": str(short),
                                                             "num_speculative_tokens": 2})
    fails_before_start("draft model /nowhere", model=target,
                       speculative_config={"model": "/nowhere", "num_speculative_tokens": 2})
    fails_before_start("num_speculative_tokens=8 needs verification steps of 9 tokens", model=target,
                       max_num_batched_tokens=8, speculative_config={**NGRAM,
                                                                     "num_speculative_tokens": 8})
    fails_before_start("unknown method|method 'medusa'", model=target,
                       speculative_config={"method": "medusa", "num_speculative_tokens": 2})


def test_spec_stats_are_zero_without_speculation(tiny):
    with LLM(str(tiny("qwen2")), threads_per_rank=1, max_model_len=32) as llm:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3))
        assert llm.spec_stats() == {"num_drafts": 0, "num_draft_tokens": 0,
                                    "num_accepted_tokens": 0, "mean_acceptance_length": None}


def test_cli_flag(tiny, capsys):
    model = str(tiny("llama-mqa-tied"))
    assert main(["check", "--model", model, "--speculative-config",
                 '{"method": "ngram", "num_speculative_tokens": 0}']) == 2
    assert "num_speculative_tokens must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["generate", "--model", model, "--speculative-config", "{oops"]) == 2
    assert "speculative_config is not valid JSON" in capsys.readouterr().err
    assert main(["check", "--model", model, "--speculative-config", '{"method": "ngram", '
                 '"num_speculative_tokens": 2}']) == 0


# ---- the n-gram proposer ----------------------------------------------------------------------

def brute_force_lookup(tokens, k, low, high):
    """The longest suffix of n in [low, high] tokens that occurred before: the k tokens after its
    most recent occurrence that k tokens follow, else after its earliest occurrence."""
    for n in range(high, low - 1, -1):
        starts = [start for start in range(len(tokens) - n - 1, -1, -1)
                  if n < len(tokens) and tokens[start:start + n] == tokens[len(tokens) - n:]]
        if starts:
            full = [start for start in starts if start + n + k <= len(tokens)]
            start = full[0] if full else starts[-1]
            return tokens[start + n:start + n + k]
    return []


def test_ngram_matches_brute_force():
    rng = random.Random(0)
    proposed = 0
    for _ in range(3000):
        vocab = rng.choice([2, 3, 7, 1000])
        tokens = [rng.randrange(vocab) for _ in range(rng.randint(1, 60))]
        low = rng.randint(1, 4)
        high, k = rng.randint(low, 6), rng.randint(1, 5)
        limit = rng.choice([None, 0, 1, k])
        expected = brute_force_lookup(tokens, k if limit is None else min(k, limit), low, high)
        assert NgramProposer(k, low, high).propose(tokens, limit) == expected, (tokens, k, low,
                                                                                 high, limit)
        proposed += bool(expected)
    assert proposed > 1000  # the random cases do exercise matches


def test_ngram_keeps_each_requests_tokens_as_they_grow():
    rng = random.Random(3)
    proposer = NgramProposer(4, 1, 4)
    growing = {key: [rng.randrange(4) for _ in range(rng.randint(1, 5))] for key in range(3)}
    for _ in range(200):
        key = rng.randrange(3)
        growing[key] += [rng.randrange(4) for _ in range(rng.randint(1, 5))]
        assert proposer.propose(growing[key], None, key) == brute_force_lookup(growing[key], 4, 1, 4)
    proposer.remove(1)
    assert set(proposer.arrays) == {0, 2}


def test_ngram_examples():
    p = NgramProposer(3, 2, 3)
    # "7 8 9" occurs twice before the end; the most recent occurrence is followed by 4 5.
    assert p.propose([7, 8, 9, 1, 2, 3, 7, 8, 9, 4, 5, 6, 7, 8, 9]) == [4, 5, 6]
    assert p.propose([1, 2, 3, 4]) == []  # no suffix seen before
    assert p.propose([5, 1, 9, 5]) == []  # a 1-token match is below prompt_lookup_min
    assert p.propose([3, 3, 3, 3]) == [3]  # the match may run into the suffix itself
    # A run of one token: the most recent match with 3 tokens after it (start 2), not the last
    # one (start 4, one token after it).
    assert p.propose([3] * 8) == [3, 3, 3]
    # "1 2" at starts 0 and 2: the most recent, at 2, has two tokens after it; the one at 0 three.
    assert NgramProposer(3, 2, 2).propose([1, 2, 1, 2, 1, 2]) == [1, 2, 1]


# ---- the block manager's side of a verification step --------------------------------------------

def run_prompt(bm: BlockManager, seq: Sequence) -> None:
    """Admit `seq` and compute its prompt, as the scheduler and engine do, then append a sampled
    token."""
    cached = bm.match(seq)
    seq.computed = seq.scheduled = bm.admit(seq, cached)
    n = seq.num_tokens - seq.computed
    bm.allocate(seq, n)
    seq.scheduled += n
    seq.computed += n
    bm.register(seq)
    seq.token_ids.append(1000 + seq.key)


def verify(bm: BlockManager, seq: Sequence, k: int, accepted: int) -> None:
    """A verification step of the last token + k drafts, of which `accepted` are kept, then the
    target's own token."""
    bm.allocate(seq, 1 + k)
    seq.scheduled += 1 + k
    assert len(seq.block_table) * bm.block_size >= seq.scheduled
    seq.token_ids.extend(range(2000, 2000 + accepted + 1))
    bm.rollback(seq, seq.computed + 1 + accepted)


def test_rollback_frees_rejected_blocks_and_keys_accepted_ones():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    seq = Sequence("a", 0, list(range(10, 16)), SamplingParams(), 0)  # 6 tokens: 1 full block
    run_prompt(bm, seq)  # 7 tokens, 6 computed, 2 blocks
    assert (seq.computed, len(seq.block_table), seq.num_hashed) == (6, 2, 1)
    verify(bm, seq, k=5, accepted=1)  # 12 tokens scheduled (3 blocks), 8 kept (2 blocks)
    assert (seq.computed, seq.scheduled, seq.num_tokens) == (8, 8, 9)
    assert len(seq.block_table) == 2 and bm.used == 2
    assert seq.num_hashed == 2, "the full block of accepted tokens must be keyed"
    freed = next(iter(bm.free))
    assert freed not in seq.block_table and bm.keys[freed] is None, "rejected block handed out last"
    # A new prompt with the same first 8 tokens finds both blocks (keys consistent with tokens).
    twin = Sequence("b", 1, seq.token_ids[:8] + [5], SamplingParams(), 0)
    assert bm.match(twin) == seq.block_table[:2]
    verify(bm, seq, k=2, accepted=0)
    assert (seq.computed, seq.num_tokens, len(seq.block_table)) == (9, 10, 3)
    with pytest.raises(ValueError, match="rollback of a to 5 tokens"):
        bm.rollback(seq, 5)  # below what was computed before the step
    with pytest.raises(ValueError, match="append the accepted ones first"):
        bm.allocate(seq, 4)
        seq.scheduled += 4
        bm.rollback(seq, 12)  # only 10 tokens are known
    bm.release(seq)
    assert bm.used == 0


@pytest.mark.parametrize("caching", [True, False])
def test_random_verifications_keep_tables_consistent(caching):
    rng = random.Random(1)
    bm = BlockManager(num_blocks=128, block_size=4, enable_prefix_caching=caching)
    shared = [rng.randrange(50) for _ in range(9)]
    seqs = [Sequence(str(i), i, shared + [rng.randrange(50) for _ in range(rng.randint(0, 5))],
                     SamplingParams(), 0) for i in range(6)]
    for seq in seqs:
        run_prompt(bm, seq)
    for _ in range(12):
        for seq in seqs:
            k = rng.randint(1, 6)
            verify(bm, seq, k, rng.randint(0, k))
            assert len(seq.block_table) == -(-seq.computed // bm.block_size)
            assert seq.num_hashed == (seq.computed // bm.block_size if caching else 0)
    # Every block held is counted once per holder; shared prompt blocks are held by several.
    held = {b for s in seqs for b in s.block_table}
    assert bm.used == len(held)
    assert all(bm.refs[b] == sum(b in s.block_table for s in seqs) for b in held)
    for seq in seqs:
        bm.release(seq)
    assert bm.used == 0 and len(bm.free) == bm.num_blocks


# ---- the draft model ---------------------------------------------------------------------------

def target_config(model_dir, **overrides) -> EngineConfig:
    options = dict(dtype="float32", max_model_len=64, kv_cache_memory_bytes=1 << 20, max_num_seqs=4)
    return EngineConfig(model_dir, ModelConfig.from_dir(model_dir), ParallelConfig(),
                        **{**options, **overrides})


@pytest.mark.parametrize("budget", [64, 7])
def test_draft_proposals_follow_hf_through_rejections(tiny, tiny_root, budget):
    """The draft (a 1-layer model of the target's vocabulary) proposes as HF's forward on the
    same context says, also after the target rejected some of its drafts and appended its own
    token, so the rolled-back KV of the rejected drafts is never read: greedy requests HF's argmax
    (q a point mass on it), a sampled one (temperature 0.8) with q = HF's softmax(logits / 0.8) at
    every draft. With a budget of 7 tokens per forward, catch-ups are chunked."""
    target = tiny("llama-gqa")
    draft_dir = build("llama-gqa", tiny_root, num_hidden_layers=1)
    proposer = DraftProposer(draft_dir, 4, target_config(target, max_num_batched_tokens=budget))
    forwards = []
    proposer.model.register_forward_pre_hook(lambda _, args: forwards.append(args[0].num_tokens))
    rng = random.Random(2)
    contexts = [[5, 6, 7, 8, 9], [11, 12, 13], list(range(20, 38))]
    temperatures = [0.0, 0.8, 0.0]
    for round_ in range(5):
        limits = [4, 4 - round_ % 3, 4] if round_ else [4, 4, 4]
        drafts, probs = proposer.propose([DraftRequest(i, ctx, t, 5, n) for i, (ctx, t, n) in
                                          enumerate(zip(contexts, temperatures, limits))])
        for i, (ctx, t, n) in enumerate(zip(contexts, temperatures, limits)):
            assert len(drafts[i]) == n and probs[i].shape == (n, 1001)
            logprobs = torch.stack(hf_next_logprobs(draft_dir, [ctx + drafts[i][:j]
                                                                for j in range(n)]))
            if t == 0:
                assert drafts[i] == logprobs.argmax(-1).tolist(), f"round {round_}, seq {i}"
                assert torch.equal(probs[i], torch.eye(1001)[drafts[i]])
            else:
                worst = (probs[i] - torch.softmax(logprobs / t, -1)).abs().max()
                assert worst < 1e-5, f"round {round_}: q differs from HF's by {worst:.1e}"
            # The target keeps a random prefix of the drafts, then its own (different) token;
            # or (sequence 2, odd rounds) decodes 3 tokens of its own, as while backing off.
            keep = rng.randint(0, n)
            own = 3 if i == 2 and round_ % 2 else 1
            ctx.extend(drafts[i][:keep] + [rng.randrange(3, 1000) for _ in range(own)])
    assert max(forwards) <= budget and (budget > 18 or forwards.count(budget) > 0)
    proposer.remove(0)
    assert proposer.blocks.used == sum(len(s.block_table) for s in proposer.states.values())
    for key in list(proposer.states):
        proposer.remove(key)
    assert proposer.blocks.used == 0


def test_draft_pool_pressure_evicts_least_recent(tiny, tiny_root):
    """A draft pool of 4 + 1 * 2 blocks of 16 holds two 40-token sequences (3 blocks each): a
    third takes the blocks of the least recently used one, which recomputes when it proposes
    again (the same proposals as HF's)."""
    target = tiny("llama-gqa")
    draft_dir = build("llama-gqa", tiny_root, num_hidden_layers=1)
    cfg = target_config(target, max_num_seqs=1, kv_cache_memory_bytes=None, num_blocks=4)
    proposer = DraftProposer(draft_dir, 2, cfg)
    assert proposer.blocks.num_blocks == 4 + 1 * (1 + 1)
    contexts = [list(range(3, 43)), list(range(50, 90)), list(range(100, 140))]
    expected = hf_reference(draft_dir, contexts, 2)
    for i in (0, 1, 2, 0):
        drafts, probs = proposer.propose([DraftRequest(i, contexts[i], 0.0, 0, 2)])
        assert drafts == [expected[i][0]] and probs is None  # greedy drafts: no q to verify
    assert list(proposer.states) == [2, 0], "the least recently used caches make room"


def test_draft_proposes_no_position_past_max_model_len(tiny, tiny_root):
    target = tiny("llama-gqa")
    draft_dir = build("llama-gqa", tiny_root, num_hidden_layers=1)
    proposer = DraftProposer(draft_dir, 4, target_config(target, max_model_len=64))
    contexts = [list(range(3, 66)), list(range(3, 64)), list(range(3, 67))]  # 63, 61, 64 tokens
    drafts, _ = proposer.propose([DraftRequest(i, c, 0.0, 0, 4) for i, c in enumerate(contexts)])
    assert [len(d) for d in drafts] == [2, 4, 1]
    assert drafts[0] == hf_reference(draft_dir, contexts[:1], 2)[0][0]


def assert_fits(counts: np.ndarray, expected: np.ndarray) -> None:
    """Chi-square of observed counts against probabilities (test_engine's bound, 4 sigma), the
    categories expected fewer than 5 times pooled into one, as the test needs."""
    draws = counts.sum()
    big = expected * draws >= 5
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], expected[~big].sum()) * draws
    observed, wanted = observed[wanted > 0], wanted[wanted > 0]
    stat = ((observed - wanted) ** 2 / wanted).sum()
    assert stat < chi2_bound(observed.size - 1), (stat, observed, np.round(wanted))


def test_draft_sampling_matches_the_draft_distribution(tiny, tiny_root):
    """Sampled requests draw their first draft from softmax(logits / T) of the draft model (HF's
    logits as the reference), and q is that distribution; the same seed draws the same drafts."""
    target = tiny("mistral")
    draft_dir = build("mistral", tiny_root, num_hidden_layers=1)
    draws, temperature, prompt = 3000, 1.3, [5, 9, 14, 3]
    proposer = DraftProposer(draft_dir, 1, target_config(target, max_num_seqs=draws))
    drafts, probs = proposer.propose([DraftRequest(key, prompt, temperature, 1000 + key, 1)
                                      for key in range(draws)])
    model = transformers.AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].double().numpy()
    expected = reference_distribution(logits, temperature, 0, 1.0)
    assert np.abs(probs[0][0].double().numpy() - expected).max() < 1e-5
    assert_fits(np.bincount([d[0] for d in drafts], minlength=expected.size), expected)
    for key in range(draws):
        proposer.remove(key)
    again, _ = proposer.propose([DraftRequest(7, prompt, temperature, 1007, 1)])
    assert again == [drafts[7]], "a seeded draft must not depend on its batch"


def test_draft_proposals_verified_keep_the_target_distribution(tiny, tiny_root):
    """The draft's proposals and q through Sampler.verify (rejection sampling) against HF's logits
    of the target after the prompt and after prompt + draft: the first token each of 3000 seeded
    requests keeps follows the target's softmax(logits / T) (chi-square), drafts accepted and
    rejected alike. A q that were not the distribution the drafts came from would bias it."""
    from seqpar.worker.sampler import Sampler

    target = tiny("mistral")
    model = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    draft_dir = tiny_root / "mistral-perturbed"
    if not (draft_dir / "config.json").is_file():  # a draft close to the target: accepts often
        draft = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in draft.parameters():
                p.add_(torch.randn_like(p), alpha=0.03)
        draft.save_pretrained(draft_dir)
    draws, temperature, prompt = 3000, 0.3, [5, 9, 14, 3]
    proposer = DraftProposer(draft_dir, 1, target_config(target, max_num_seqs=draws))
    drafts, probs = proposer.propose([DraftRequest(key, prompt, temperature, 77 + key, 1)
                                      for key in range(draws)])
    seen = sorted({d[0] for d in drafts})
    with torch.no_grad():  # the target after the prompt, and after the prompt + each draft
        after = model(torch.tensor([prompt + [t] for t in seen])).logits.float()
    first_row, second_rows = after[0, len(prompt) - 1], dict(zip(seen, after[:, -1]))
    sampler = Sampler(seed=0)
    for key in range(draws):
        sampler.add(key, SamplingParams(temperature=temperature, seed=key), prompt)
    logits = torch.stack([row for d in drafts for row in (first_row, second_rows[d[0]])])
    kept = sampler.verify(logits, list(range(draws)), drafts, probs)
    accepted = sum(k[0] == d[0] for d, k in zip(drafts, kept))
    assert 0.1 * draws < accepted < 0.9 * draws, f"{accepted} of {draws} drafts accepted"
    assert_fits(np.bincount([k[0] for k in kept], minlength=1000),
                reference_distribution(first_row.double().numpy(), temperature, 0, 1.0))


# ---- back-off, statistics, server counters ----------------------------------------------------

def test_backoff_pauses_a_request_whose_drafts_fail():
    backoff = Backoff(min_accepted=0.5)
    pauses = []
    for _ in range(6):  # a request whose drafts are never accepted
        for _ in range(MIN_VERIFICATIONS):
            assert backoff.ready(0)
            backoff.record(0, 0)
        paused = 0
        while not backoff.ready(0):
            paused += 1
        pauses.append(paused)
    assert pauses == [min(FIRST_PAUSE << i, MAX_PAUSE) for i in range(6)]
    for _ in range(50):  # a request whose drafts pay never pauses
        assert backoff.ready(1)
        backoff.record(1, 2)
    backoff.record(0, 3)  # a good average resets the pause
    backoff.record(0, 3)
    assert backoff.trials[0].pause == FIRST_PAUSE


def test_speculator_limits_and_stats(tiny):
    model_dir = tiny("qwen2")
    spec = Speculator(SpeculativeConfig.parse({**NGRAM, "num_speculative_tokens": 4}),
                      target_config(model_dir, max_model_len=20))
    seq = Sequence("a", 0, [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_tokens=5), 0)
    assert spec.propose([seq]) == ([[3, 1, 2]], None)  # the match runs into the suffix
    seq.token_ids += [3, 1, 2]  # 3 output tokens of 5: one more verification yields at most 2
    assert spec.propose([seq])[0] == [[3]]
    long = Sequence("b", 1, [4, 5] * 9, SamplingParams(max_tokens=100), 0)  # 18 of 20 tokens
    assert spec.limit(long) == 1
    spec.record(0, 4, 3)
    spec.record(0, 1, 0)
    spec.record(1, 0, 0)  # no drafts: no verification to count
    assert spec.stats.as_dict() == {"num_drafts": 2, "num_draft_tokens": 5,
                                    "num_accepted_tokens": 3, "mean_acceptance_length": 2.5}
    assert SpecStats().as_dict()["mean_acceptance_length"] is None


class FakeEngine:
    """What snapshot() reads of an engine, with a Speculator's statistics."""

    def __init__(self, stats: SpecStats):
        self.speculator = SimpleNamespace(stats=stats)
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0}

    def cache_stats(self):
        return {"num_blocks": 1, "used_blocks": 0, "preemptions": 0, "prefix_queries": 0,
                "prefix_hits": 0}

    def comm_stats(self):
        from seqpar.distributed.collectives import Collective
        return {"steps": {"sp": 0, "tp": 0},
                **{op.value: {"calls": 0, "bytes": 0} for op in Collective}}

    def num_running(self):
        return 0

    def num_waiting(self):
        return 0


def test_metrics_expose_spec_counters():
    from prometheus_client.parser import text_string_to_metric_families

    metrics = ServerMetrics("tiny")
    text = metrics.render(snapshot(FakeEngine(SpecStats(3, 11, 7)))).decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["seqpar:spec_decode_num_draft_tokens_total"] == 11
    assert samples["seqpar:spec_decode_num_accepted_tokens_total"] == 7


# ---- end to end: the engine's verification steps ----------------------------------------------

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
# Repetitive prompts, so that n-gram lookups propose, and one plain prompt.
PROMPTS = [[7, 8, 9, 10] * 4 + [7, 8], [30 + i % 5 for i in range(23)], [100, 200, 300]]


def e2e_cases():
    """Every family once, tp 1-3 and SP off / on / auto in turn, n-gram and draft in turn; and
    two pipeline stages once per method."""
    families = list(FAMILIES) + list(MOE_FAMILIES)
    cases = []
    for i, family in enumerate(families):
        tps = valid_tp(family)
        tp = tps[i % len(tps)]
        sp = ("off", "on", "auto")[i % 3] if tp > 1 else "off"
        cases.append((family, tp, 1, sp, ("ngram", "draft")[i % 2]))
    return cases + [("qwen3", 1, 2, "off", "ngram"), ("llama-gqa", 1, 2, "off", "draft")]


def perturbed(family: str, root):
    """A draft close to the target: its weights plus noise of 5% of each tensor's spread. An
    unrelated random model's argmax almost never matches the target's (no draft accepted); this
    one's often does, and often does not, so verification steps both accept and reject."""
    path = root / f"{family}-perturbed"
    if not (path / "config.json").is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(build(family, root),
                                                                  dtype=torch.float32)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.std())
        model.save_pretrained(path)
    return path


def spec_config(method: str, family: str, root) -> dict:
    if method == "ngram":
        return NGRAM
    return {"model": str(perturbed(family, root)), "num_speculative_tokens": 3}


@pytest.mark.parametrize("family,tp,pp,sp,method", e2e_cases())
def test_greedy_outputs_equal_hf(tiny, tiny_root, family, tp, pp, sp, method):
    model_dir = tiny(family)
    with LLM(str(model_dir), tensor_parallel_size=tp, pipeline_parallel_size=pp,
             sequence_parallel=sp, sp_min_tokens=4, threads_per_rank=1, max_model_len=64,
             speculative_config=spec_config(method, family, tiny_root)) as llm:
        outputs = llm.generate(PROMPTS, GREEDY)
        stats, cache, comm = llm.spec_stats(), llm.cache_stats(), llm.comm_stats()
    expected = hf_reference(model_dir, PROMPTS, GREEDY.max_tokens)
    for i, (out, (tokens, _)) in enumerate(zip(outputs, expected)):
        assert out.token_ids == tokens, f"{family} tp={tp} pp={pp} sp={sp} {method}: prompt {i}"
    assert stats["num_draft_tokens"] > 0 and stats["num_accepted_tokens"] > 0, stats
    assert cache["used_blocks"] == 0
    if sp == "on":  # every verification step ran sequence-parallel, and was counted as such
        assert comm["steps"]["sp_verify"] > 0 and comm["steps"]["tp_verify"] == 0, comm["steps"]


def test_engine_deltas_stream_accepted_tokens(tiny):
    """A verification step's delta carries every token it accepted (streaming emits them as they
    come); the deltas add up to HF's greedy tokens."""
    model_dir = tiny("qwen2")
    with LLM(str(model_dir), threads_per_rank=1, max_model_len=64,
             speculative_config=NGRAM) as llm:
        engine = llm.engine
        engine.add_request("r", PROMPTS[0], GREEDY)
        deltas = []
        while engine.has_unfinished():
            deltas += [d.token_ids for d in engine.step()]
    expected = hf_reference(model_dir, PROMPTS[:1], GREEDY.max_tokens)[0][0]
    assert [t for d in deltas for t in d] == expected
    assert max(map(len, deltas)) > 1, "no step accepted a draft"


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_greedy_under_preemption_and_prefix_caching(tiny, tiny_root, method):
    """8 blocks of 16 for 10 requests of 20-24 prompt tokens (a full block each, for the
    prefix cache) and 24 output tokens: decoding with drafts runs out of blocks, sequences are
    preempted mid-speculation and recomputed; the second round reuses cached prefixes."""
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    model_dir = tiny("llama-gqa")
    prompts = [[(13 * i + 7 * n) % 900 + 3 for i in range(n)] + [4, 5, 6] * 6
               for n in (5, 6, 4, 6, 3, 5, 2, 6, 4, 5)]
    cfg = ModelConfig.from_dir(model_dir)
    block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * 16 * cfg.head_dim * 4
    with LLM(str(model_dir), kv_cache_memory_bytes=8 * block_bytes, max_model_len=64,
             max_num_batched_tokens=256, threads_per_rank=1,
             speculative_config=spec_config(method, "llama-gqa", tiny_root)) as llm:
        first = llm.generate(prompts, params)
        assert llm.cache_stats()["preemptions"] > 0
        second = llm.generate(prompts, params)
        cache, stats = llm.cache_stats(), llm.spec_stats()
    expected = hf_reference(model_dir, prompts, params.max_tokens)
    for outputs in (first, second):
        assert [o.token_ids for o in outputs] == [tokens for tokens, _ in expected]
    assert sum(o.num_cached_tokens for o in second) > 0 and cache["used_blocks"] == 0
    assert stats["num_accepted_tokens"] > 0


def test_sampled_tokens_follow_the_target_distribution(tiny, tiny_root):
    """Rejection sampling keeps the target's distribution: the (first, second) token pairs of
    3000 seeded requests (the second comes from a verification of draft-model proposals: 3
    tokens, so that one draft fits after the first) fit p(t1) p(t2 | t1) from HF transformers
    (chi-square); a seed reproduces its tokens."""
    model_dir = tiny("mistral")
    prompt, temperature, top_k, draws = [5, 9, 14, 3], 0.3, 4, 3000
    params = [SamplingParams(max_tokens=3, temperature=temperature, top_k=top_k, seed=s,
                             ignore_eos=True) for s in range(draws)]
    with LLM(str(model_dir), threads_per_rank=1, max_model_len=32,
             speculative_config={"model": str(perturbed("mistral", tiny_root)),
                                 "num_speculative_tokens": 2}) as llm:
        outputs = llm.generate([prompt] * draws, params)
        again = llm.generate([prompt], params[11])[0].token_ids
        assert llm.spec_stats()["num_drafts"] > 0
    assert again == outputs[11].token_ids
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        first = reference_distribution(model(torch.tensor([prompt])).logits[0, -1].double().numpy(),
                                       temperature, top_k, 1.0)
        firsts = np.flatnonzero(first)
        rows = model(torch.tensor([prompt + [int(t)] for t in firsts])).logits[:, -1].double()
    pairs = {}
    for t1, row in zip(firsts, rows.numpy()):
        second = reference_distribution(row, temperature, top_k, 1.0)
        for t2 in np.flatnonzero(second):
            pairs[int(t1), int(t2)] = first[t1] * second[t2]
    counts = {}
    for out in outputs:
        pair = tuple(out.token_ids[:2])
        assert pair in pairs, f"drew {pair}, outside the top-{top_k} support"
        counts[pair] = counts.get(pair, 0) + 1
    assert_fits(np.array([counts.get(p, 0) for p in pairs]), np.array(list(pairs.values())))


def test_logprobs_of_verified_tokens_equal_hf(tiny):
    """Tokens a verification step kept carry their logprobs (row j of the sequence's k + 1 logit
    rows scores its j-th kept token): the chosen tokens' equal HF's, and each entry holds the
    asked top-2 plus the chosen token."""
    model_dir = tiny("qwen2")
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, logprobs=2)
    with LLM(str(model_dir), threads_per_rank=1, max_model_len=64,
             speculative_config=NGRAM) as llm:
        outputs = llm.generate(PROMPTS, params)
        assert llm.spec_stats()["num_accepted_tokens"] > 0
    for out, (tokens, logprobs) in zip(outputs, hf_reference(model_dir, PROMPTS, 10)):
        assert out.token_ids == tokens
        assert len(out.logprobs) == len(tokens)
        for token, entry, expected in zip(tokens, out.logprobs, logprobs):
            assert abs(entry[token] - expected) < 1e-4 and 2 <= len(entry) <= 3


def test_step_delta_carries_drafts_and_rollbacks():
    from seqpar.worker.plan import StepDelta

    delta = StepDelta(7, 123, True, False, rollback=[(4, 17), (9, 3)], dropped=[2],
                      keys=[4, 5], num_tokens=[4, 1], num_logit_rows=[4, 1],
                      new_blocks=[[11], []], new_tokens=[[1, 2, 3], [8]], num_drafts=[3, 0])
    again = StepDelta.decode(delta.encode())
    assert (again.rollback, again.num_drafts, again.dropped, again.new_tokens) == (
        [(4, 17), (9, 3)], [3, 0], [2], [[1, 2, 3], [8]])
