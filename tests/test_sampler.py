"""The sampler (worker/sampler.py) against a plain per-row reference written here: filters and
draws row by row in float64, rejection sampling's output distribution by chi-square, the grammar
hook with a fake matcher, prompt logprobs against log_softmax."""
import numpy as np
import pytest
import torch

from seqpar import SamplingParams
from seqpar.sampling_params import StructuredOutputsParams
from seqpar.worker.sampler import SEED_MIX, Sampler
from test_engine import chi2_bound


def reference_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row [V] -> its sampling distribution [V] float64, token by token: temperature;
    top-k keeps every token at least as likely as the k-th; top-p keeps a token while the mass of
    the strictly more likely tokens is below top_p."""
    x = row.double() / p.temperature
    V = x.shape[0]
    if 0 < p.top_k < V:
        kth = sorted(x.tolist(), reverse=True)[p.top_k - 1]
        x = torch.where(x >= kth, x, float("-inf"))
    if p.top_p < 1:
        probs = x.softmax(0)
        # [V]: per token, the mass of the tokens strictly more likely (a [V, V] comparison).
        ahead = ((probs[None, :] > probs[:, None]) * probs[None, :]).sum(dim=1)
        assert (ahead - p.top_p).abs().min() > 1e-4, "top_p too close to a boundary to test"
        x = torch.where(ahead < p.top_p, x, float("-inf"))
    return x.softmax(0)


def reference_draw(probs: torch.Tensor, u: float) -> int:
    """The first token, in vocabulary order, whose cumulative probability exceeds u."""
    return int(np.searchsorted(np.cumsum(probs.numpy()), u * float(probs.sum()), side="right"))


def random_params(rng: np.random.Generator, seed: int) -> SamplingParams:
    """A mix of greedy, plain temperature, top-k, top-p and both, top_p away from the masses of
    the test's tied logits (multiples of 1/4)."""
    kind = rng.integers(5)
    return SamplingParams(
        temperature=0.0 if kind == 0 else float(rng.uniform(0.5, 1.5)),
        top_k=int(rng.integers(1, 12)) if kind in (2, 4) else 0,
        top_p=float(rng.uniform(0.2, 0.95)) if kind in (3, 4) else 1.0, seed=seed)


def tied_logits(rng: np.random.Generator, rows: int, vocab: int) -> torch.Tensor:
    """Logits rounded to quarters: many exact ties, which the filters must keep together."""
    return torch.tensor(np.round(rng.normal(0, 1.5, size=(rows, vocab)) * 4) / 4,
                        dtype=torch.float32)


def test_sample_matches_per_row_reference():
    """Mixed rows with many ties: each token equals the reference's draw from the reference
    distribution with the same uniform (the request's generator, seeded alike)."""
    rng = np.random.default_rng(0)
    sampler = Sampler()
    R, V = 300, 40
    logits = tied_logits(rng, R, V)
    params = []
    for key in range(R):
        for attempt in range(20):  # redraw a top_p too close to a mass boundary of this row
            p = random_params(rng, seed=1000 + key)
            try:
                if p.temperature:
                    reference_probs(logits[key], p)
                break
            except AssertionError:
                continue
        params.append(p)
        sampler.add(key, p)
    tokens = sampler.sample(logits, list(range(R))).tokens.tolist()
    for key, (row, p, token) in enumerate(zip(logits, params, tokens)):
        if p.temperature == 0:
            assert token == int(row.argmax()), key
            continue
        probs = reference_probs(row, p)
        u = torch.rand(1, generator=torch.Generator().manual_seed(p.seed)).item()
        assert token == reference_draw(probs, u), (key, p, token)


def test_filter_masks_match_reference():
    """The vectorized filters keep exactly the reference's tokens (ties included), with the
    reference's renormalised probabilities."""
    from seqpar.worker.sampler import _filtered_probs
    rng = np.random.default_rng(1)
    logits = tied_logits(rng, 100, 1000)  # nuclei within 64, within 512 and needing a sort
    params, rows = [], []
    for row in logits:
        p = random_params(rng, seed=0)
        if p.temperature == 0:
            continue
        try:
            reference_probs(row, p)
        except AssertionError:
            continue
        params.append(p)
        rows.append(row)
    got = _filtered_probs(torch.stack(rows), params)
    for i, (row, p) in enumerate(zip(rows, params)):
        ref = reference_probs(row, p)
        assert torch.equal(got[i] > 0, ref > 0), (i, p)
        torch.testing.assert_close(got[i].double(), ref, atol=1e-6, rtol=1e-5)
    # A top-p whose nucleus is beyond 64 * 8 tokens: the whole row is sorted.
    flat = -torch.arange(2000.0)[None] * 1e-4
    for top_p in np.linspace(0.45, 0.4505, 6):  # the masses are 5e-4 apart: one is 1e-4 clear
        p = SamplingParams(top_p=float(top_p))
        try:
            ref = reference_probs(flat[0], p)
            break
        except AssertionError:
            continue
    kept = _filtered_probs(flat, [p])[0] > 0
    assert torch.equal(kept, ref > 0) and 800 < int(kept.sum()) < 1000


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.2, 5, 0.8)])
def test_many_requests_fit_the_distribution(temperature, top_k, top_p):
    """4000 requests, each its own seed, draw one token each from the same row in one step: the
    frequencies fit the reference distribution (chi-square)."""
    rng = np.random.default_rng(2)
    row = torch.tensor(rng.normal(0, 1.5, size=16), dtype=torch.float32)
    expected = reference_probs(row, SamplingParams(temperature=temperature, top_k=top_k,
                                                   top_p=top_p)).numpy()
    n = 4000
    sampler = Sampler(seed=3)
    for key in range(n):
        sampler.add(key, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
    tokens = sampler.sample(row.expand(n, -1).contiguous(), list(range(n))).tokens.numpy()
    counts = np.bincount(tokens, minlength=16)
    allowed = expected > 0
    assert counts[~allowed].sum() == 0
    stat = ((counts[allowed] - n * expected[allowed]) ** 2 / (n * expected[allowed])).sum()
    assert stat < chi2_bound(int(allowed.sum()) - 1), (stat, counts, np.round(expected * n))


def test_batch_independence():
    """A seeded request draws the same tokens alone and among other rows (before and after it,
    greedy, filtered, other seeds), and an unseeded one's seed comes from the engine seed."""
    rng = np.random.default_rng(4)
    V, steps = 100, 12
    own = torch.randn(steps, V, generator=torch.Generator().manual_seed(5))
    mine = SamplingParams(temperature=0.9, top_p=0.9, top_k=30, seed=11)
    alone = Sampler()
    alone.add(7, mine)
    busy = Sampler()
    busy.add(7, mine)
    for key in range(20):
        busy.add(100 + key, random_params(rng, seed=key))
    solo, mixed = [], []
    for step in range(steps):
        solo.append(int(alone.sample(own[step:step + 1], [7]).tokens))
        picked = rng.choice(20, size=int(rng.integers(1, 20)), replace=False)
        others = [100 + int(k) for k in picked]
        at = int(rng.integers(len(others) + 1))
        keys = others[:at] + [7] + others[at:]
        logits = torch.randn(len(keys), V)
        logits[at] = own[step]
        mixed.append(int(busy.sample(logits, keys).tokens[at]))
    assert solo == mixed
    # Unseeded: seeded from engine seed x SEED_MIX + key, so two samplers agree.
    p = SamplingParams(temperature=1.0)
    a, b, c = Sampler(seed=2), Sampler(seed=2), Sampler()
    for s in (a, b):
        s.add(3, p)
    c.add(3, SamplingParams(temperature=1.0, seed=2 * SEED_MIX + 3))
    row = torch.zeros(8, V)
    assert a.sample(row, [3] * 8).tokens.tolist() == b.sample(row, [3] * 8).tokens.tolist() \
        == c.sample(row, [3] * 8).tokens.tolist()


def test_logprobs_and_greedy():
    """Logprobs are the model's (before temperature and filters), top-K for the most asked;
    greedy-only rows take the argmax; nothing is computed for logprobs when none asks."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    sampler = Sampler()
    sampler.add(0, SamplingParams(temperature=0, logprobs=3))
    sampler.add(1, SamplingParams(temperature=0.5, top_k=2, logprobs=0))
    sampler.add(2, SamplingParams(temperature=0))
    out = sampler.sample(logits, [0, 1, 2])
    ref = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs, ref.gather(1, out.tokens[:, None])[:, 0])
    assert out.top_ids.shape == (3, 3)
    assert torch.equal(out.top_ids, ref.topk(3).indices)
    assert out.tokens[0] == logits[0].argmax() and out.tokens[2] == logits[2].argmax()
    assert out.tokens[1] in logits[1].topk(2).indices
    plain = sampler.sample(logits[[2, 0]], [2, 2])
    assert plain.logprobs is None and plain.top_ids is None
    assert plain.tokens.tolist() == [int(logits[2].argmax()), int(logits[0].argmax())]


def test_greedy_takes_the_first_of_tied_maxima():
    """Greedy rows (sample and verify) pick the first token of the row's largest logit, as a
    plain Python scan does, with ties far apart in a vocab-wide row and rows masked to -inf."""
    V = 49152
    logits = torch.zeros(4, V)
    logits[0, [40000, 7, 30000]] = 2.0  # ties: the first in vocabulary order wins
    logits[1, V - 1] = 1.0
    logits[2] = float("-inf")
    logits[2, [5000, 9000]] = -1.0
    logits[3, 1:] = -3.0  # token 0 alone at the top
    first = [max(range(V), key=lambda t, row=row.tolist(): (row[t], -t)) for row in logits]
    sampler = Sampler()
    sampler.add(0, SamplingParams(temperature=0))
    assert sampler.sample(logits, [0] * 4).tokens.tolist() == first == [7, V - 1, 5000, 0]
    assert sampler.verify(logits, [0], [[7, V - 1, 4]]) == [[7, V - 1, 5000]]


def test_errors_name_the_problem():
    sampler = Sampler()
    sampler.add(1, SamplingParams())
    with pytest.raises(ValueError, match="already added"):
        sampler.add(1, SamplingParams())
    with pytest.raises(KeyError, match="no request with key 2"):
        sampler.sample(torch.zeros(1, 4), [2])
    with pytest.raises(ValueError, match="one row"):
        sampler.sample(torch.zeros(2, 4), [1])
    with pytest.raises(ValueError, match="no grammar factory"):
        sampler.add(3, SamplingParams(structured_outputs=StructuredOutputsParams(regex="a")))
    sampler.remove(1)
    with pytest.raises(KeyError, match="never added"):
        sampler.remove(1)


# ---- verify ----

def one_hot_logits(tokens: list[int], vocab: int) -> torch.Tensor:
    """Rows whose argmax is tokens[j] (second best: token + 1)."""
    logits = torch.zeros(len(tokens), vocab)
    for j, t in enumerate(tokens):
        logits[j, t] = 5.0
        logits[j, (t + 1) % vocab] = 4.0
    return logits


def test_verify_greedy_accepts_the_matching_prefix():
    sampler = Sampler()
    for key in range(5):
        sampler.add(key, SamplingParams(temperature=0))
    argmax = [[3, 5, 7, 9], [3, 5, 7, 9], [3, 5, 7, 9], [4], [1, 2]]
    drafts = [[3, 5, 7], [3, 4, 7], [1, 5, 7], [], [1]]
    logits = torch.cat([one_hot_logits(a, 12) for a in argmax])
    assert sampler.verify(logits, list(range(5)), drafts) == [
        [3, 5, 7, 9], [3, 5], [3], [4], [1, 2]]
    with pytest.raises(ValueError, match="sum"):
        sampler.verify(logits[:-1], list(range(5)), drafts)


def test_verify_without_drafts_draws_as_sample():
    """A sequence with no drafts (speculation backed off) gets the token sample() would draw."""
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(9))
    params = SamplingParams(temperature=0.9, top_k=10, top_p=0.9, seed=4)
    a, b = Sampler(), Sampler()
    a.add(0, params)
    b.add(0, params)
    drawn = [a.sample(row[None], [0]).tokens.tolist() for row in logits]
    assert drawn == [b.verify(row[None], [0], [[]])[0] for row in logits]


def run_rejection(p_logits: torch.Tensor, params: SamplingParams, q: torch.Tensor | None,
                  trials: int) -> list[list[int]]:
    """`trials` verifications of k = rows - 1 drafts against the same target rows; drafts drawn
    from q (numpy, fixed seed), or when q is None (an n-gram's one-hot q) from the unfiltered
    softmax of the target's logits (a proposer that is often right, never exactly p)."""
    rng = np.random.default_rng(6)
    k = p_logits.shape[0] - 1
    source = torch.softmax(p_logits[:k], dim=-1) if q is None else q
    draws = []
    for j in range(k):
        dist = source[j].double().numpy()
        draws.append(rng.choice(len(dist), size=trials, p=dist / dist.sum()))
    drafts = np.stack(draws, axis=1).tolist()
    sampler = Sampler()
    sampler.add(0, params)
    return sampler.verify(p_logits.repeat(trials, 1), [0] * trials, drafts,
                          None if q is None else [q] * trials)


def assert_fits(tokens: list[int], expected: torch.Tensor):
    counts = np.bincount(tokens, minlength=expected.shape[0])
    e = expected.numpy()
    allowed = e > 0
    assert counts[~allowed].sum() == 0, counts
    n = len(tokens)
    stat = ((counts[allowed] - n * e[allowed]) ** 2 / (n * e[allowed])).sum()
    assert stat < chi2_bound(int(allowed.sum()) - 1), (stat, counts, np.round(e * n))


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0),
                                    SamplingParams(temperature=0.8, top_k=4)])
def test_rejection_sampling_keeps_the_target_distribution(one_hot, params):
    """k = 2 drafts from q (a random draft distribution, or n-gram one-hot): the token at each of
    the first two positions follows the target's filtered p there (chi-square), and drafts are
    accepted as often as sum(min(p, q)) predicts."""
    gen = torch.Generator().manual_seed(8)
    V = 8
    p_logits = torch.randn(3, V, generator=gen) * 1.2
    q = None if one_hot else torch.softmax(torch.randn(2, V, generator=gen), dim=-1)
    out = run_rejection(p_logits, params, q, trials=8000)
    p = [reference_probs(row, params).float() for row in p_logits]
    assert_fits([t[0] for t in out], p[0])
    second = [t[1] for t in out if len(t) > 1]
    assert len(second) > 1000
    assert_fits(second, p[1])
    if q is not None:
        accepted = sum(len(t) > 1 for t in out) / len(out)
        assert abs(accepted - float(torch.minimum(p[0], q[0]).sum())) < 0.03


# ---- grammar hook ----

class FakeMatcher:
    """Allows tokens {10 + s, 20 + s} and 0 (the stop token, which completes the grammar) after
    s accepted tokens."""

    def __init__(self):
        self.accepted: list[int] = []

    def allowed(self) -> set[int]:
        s = len(self.accepted)
        return {10 + s, 20 + s, 0}

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        bits = np.zeros(bitmask.shape[1], dtype=np.uint32)
        for t in self.allowed():
            bits[t // 32] |= np.uint32(1 << (t % 32))
        bitmask[row] = torch.from_numpy(bits.view(np.int32))

    def accept(self, token: int) -> None:
        assert token in self.allowed() and not self.is_terminated(), (token, self.accepted)
        self.accepted.append(token)

    def rollback(self, n: int) -> None:
        del self.accepted[len(self.accepted) - n:]

    def is_terminated(self) -> bool:
        return bool(self.accepted) and self.accepted[-1] == 0


GRAMMAR = SamplingParams(temperature=0, structured_outputs=StructuredOutputsParams(regex="x"))


def grammar_sampler():
    matchers = {}

    def factory(key, params):
        matchers[key] = FakeMatcher()
        return matchers[key]
    return Sampler(grammar=factory), matchers


def test_grammar_masks_sampled_and_greedy_rows():
    sampler, matchers = grammar_sampler()
    sampler.add(0, GRAMMAR)
    sampler.add(1, SamplingParams(temperature=1.0, seed=1,
                                  structured_outputs=StructuredOutputsParams(regex="x")))
    sampler.add(2, SamplingParams(temperature=0, logprobs=0))
    V = 70
    logits = torch.zeros(3, V)
    logits[:, 40] = 9.0  # the favourite, outside the grammar
    logits[0, 20:30] = 3.0
    logits[1, 0] = -30.0  # the stop token: practically never drawn
    ref = torch.log_softmax(logits, dim=-1)
    for step in range(5):
        out = sampler.sample(logits, [0, 1, 2])
        assert out.tokens[0] == 20 + step and out.tokens[2] == 40
        assert int(out.tokens[1]) in {10 + step, 20 + step}
        # Logprobs stay the model's, before the grammar's mask.
        torch.testing.assert_close(out.logprobs, ref.gather(1, out.tokens[:, None])[:, 0])
    assert matchers[0].accepted == [20, 21, 22, 23, 24]
    assert matchers[1].accepted == [int(t) for t in matchers[1].accepted]
    assert len(matchers[1].accepted) == 5
    sampler.remove(0)
    assert 0 not in sampler.requests


def test_grammar_in_verify_masks_each_position_and_rolls_back():
    sampler, matchers = grammar_sampler()
    for key in range(3):
        sampler.add(key, GRAMMAR)
    V = 64
    # Seq 0: drafts 10, 11 match the masked argmax; row 2's favourite 50 is forbidden, so the
    # masked argmax 22 corrects draft 12. Seq 1: draft 99 -> forbidden 41 at position 1.
    # Seq 2: the stop token 0 completes the grammar: no token after it.
    rows0 = one_hot_logits([10, 11, 50, 7], V)
    rows0[2, 22] = 1.0
    rows1 = one_hot_logits([10, 41, 5], V)
    rows1[1, 21] = 1.0
    rows2 = one_hot_logits([10, 0, 3], V)
    out = sampler.verify(torch.cat([rows0, rows1, rows2]), [0, 1, 2], [[10, 11, 12], [10, 41],
                                                                      [10, 0]])
    assert out == [[10, 11, 22], [10, 21], [10, 0]]
    assert [matchers[k].accepted for k in range(3)] == [[10, 11, 22], [10, 21], [10, 0]]


def test_prompt_logprobs():
    torch.manual_seed(0)
    prompt = [4, 9, 2, 7, 7, 1]
    sampler = Sampler()
    sampler.add(5, SamplingParams(prompt_logprobs=2), prompt_ids=prompt)
    logits = torch.randn(6, 20)
    ref = torch.log_softmax(logits, dim=-1)
    # Chunk [0, 3): rows score tokens 1..3; chunk [3, 6) completes the prompt: its last row is
    # the sampled one and scores nothing.
    first = sampler.prompt_logprobs(logits[:3], 5, 0)
    last = sampler.prompt_logprobs(logits[3:], 5, 3)
    assert first[0] is None and len(first) == 4 and len(last) == 2
    for pos, entry in zip(range(1, 6), first[1:] + last):
        row = ref[pos - 1]
        top = set(row.topk(2).indices.tolist())
        assert set(entry) == top | {prompt[pos]}
        for t, v in entry.items():
            assert abs(v - row[t].item()) < 1e-6
    with pytest.raises(ValueError, match="no prompt_logprobs"):
        sampler.add(6, SamplingParams(), prompt_ids=prompt)
        sampler.prompt_logprobs(logits, 6, 0)


def test_grammar_hook_with_xgrammar_matchers(tiny_root):
    """Real matchers (seqpar/structured_output.py on xgrammar), random logits: greedy and
    sampled requests sharing steps write text matching their regex, then EOS."""
    import re

    from transformers import AutoTokenizer

    from seqpar.structured_output import GrammarCompiler
    from tokenized import build_with_bytelevel_tokenizer

    regex = r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)"
    eos, vocab = 2, 1001
    tokenizer = AutoTokenizer.from_pretrained(build_with_bytelevel_tokenizer("llama-gqa",
                                                                             tiny_root))
    compiler = GrammarCompiler(tokenizer, vocab, {eos})
    sampler = Sampler(grammar=lambda key, params: compiler.matcher(params.structured_outputs))
    spec = StructuredOutputsParams(regex=regex)
    for key, temperature in enumerate([0.0, 1.0, 1.0]):
        sampler.add(key, SamplingParams(temperature=temperature, seed=key, structured_outputs=spec))
    sampler.add(3, SamplingParams(temperature=1.0, seed=3))  # no grammar, same steps
    gen = torch.Generator().manual_seed(0)
    outputs = {key: [] for key in range(4)}
    live = [0, 1, 2, 3]
    for _ in range(40):
        out = sampler.sample(torch.randn(len(live), vocab, generator=gen) * 3, live)
        for key, token in zip(live, out.tokens.tolist()):
            outputs[key].append(token)
        live = [k for k in live if outputs[k][-1] != eos and (k != 3 or len(outputs[k]) < 5)]
        if live == [3] or not live:
            break
    for key in range(3):
        assert outputs[key][-1] == eos, outputs[key]
        assert re.fullmatch(regex, tokenizer.decode(outputs[key][:-1])), outputs[key]
