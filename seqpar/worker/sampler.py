"""Turning logits into tokens on the sampler rank (TP rank 0 of the last stage): sampled rows,
speculative verification and prompt log-probabilities."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar.sampling_params import SamplingParams
from seqpar.structured_output import allocate_bitmask, apply_bitmask

SEED_MIX = 1_000_003
"""An unseeded request's seed: the engine's seed x SEED_MIX + the request's key (a prime, so
distinct (seed, key) pairs rarely collide)."""


@dataclass
class SamplerOutput:
    """One step's sampled rows."""

    tokens: torch.Tensor
    """[R] int64, the chosen tokens."""
    logprobs: torch.Tensor | None
    """[R] float32, each chosen token's log-probability under the model's distribution (before
    temperature, filtering and grammar); None when no row asks for logprobs."""
    top_ids: torch.Tensor | None
    """[R, K] int64, each row's K most likely tokens (K: the most any row asks); None when K = 0."""
    top_logprobs: torch.Tensor | None
    """[R, K] float32, their log-probabilities (model distribution)."""


@dataclass
class _Request:
    params: SamplingParams
    generator: torch.Generator
    """On the CPU whatever the logits' device, so a seed draws the same uniforms everywhere."""
    prompt_ids: list[int] | None
    matcher: object | None
    """The request's grammar state (seqpar/structured_output.py Matcher), or None."""


class Sampler:
    """Per-request sampling state on the sampler rank, and the step's draws.

    Rows are handled together: a step's greedy rows take one max reduction (_greedy); its
    sampled rows are divided by their temperatures, filtered by top-k and top-p (topk calls on
    the rows that filter, a sort only for rows whose top-p nucleus is wide, nothing when no row
    filters) and softmaxed as one [S, V] tensor.

    Reproducible draws. Each request owns a CPU torch.Generator seeded once, at `add`, from its
    seed (an unseeded request: engine seed x SEED_MIX + key). Per sampled row the sampler draws
    exactly ONE uniform u in [0, 1) from that request's generator (a Python loop of R tiny
    calls: one batched call from a shared generator would make a request's uniforms depend on
    which rows share its step) and picks the first token, in vocabulary order, whose cumulative
    probability in the row's filtered distribution exceeds u (inverse CDF: a row-local cumsum
    and searchsorted). So a request's tokens depend only on its seed, its logits and how many
    rows it drew before, never on the other rows of its steps. verify draws k + 1 uniforms per
    sequence with k drafts, in a fixed order (acceptance tests first, then the final token).

    grammar: factory(key, params) -> matcher | None, called at `add` for a request with
    structured_outputs; a matcher has fill_bitmask(bitmask, row), accept(token), rollback(n) and
    is_terminated() (seqpar/structured_output.py). Rows with a matcher are masked with xgrammar's
    token bitmask before the choice, greedy or sampled, and the chosen token is accepted."""

    def __init__(self, seed: int = 0, grammar=None):
        self.seed = seed
        self.grammar = grammar
        self.requests: dict[int, _Request] = {}

    # ---- per-request state ----

    def add(self, key: int, params: SamplingParams, prompt_ids: list[int] | None = None) -> None:
        if key in self.requests:
            raise ValueError(f"sampler: request key {key} is already added")
        seed = params.seed if params.seed is not None else self.seed * SEED_MIX + key
        matcher = None
        if params.structured_outputs is not None:
            if self.grammar is None:
                raise ValueError(f"sampler: request {key} has structured_outputs but the sampler "
                                 "has no grammar factory")
            matcher = self.grammar(key, params)
        self.requests[key] = _Request(params, torch.Generator("cpu").manual_seed(seed),
                                      None if prompt_ids is None else list(prompt_ids), matcher)

    def remove(self, key: int) -> None:
        if self.requests.pop(key, None) is None:
            raise KeyError(f"sampler: request key {key} was never added (or already removed)")

    def _get(self, key: int) -> _Request:
        try:
            return self.requests[key]
        except KeyError:
            raise KeyError(f"sampler: no request with key {key}; add() it first") from None

    # ---- one step's sampled rows ----

    def sample(self, logits: torch.Tensor, keys: list[int]) -> SamplerOutput:
        """logits [R, V] float32 (one row per key, a key may repeat) -> SamplerOutput."""
        if logits.dim() != 2 or logits.shape[0] != len(keys):
            raise ValueError(f"sampler: logits {tuple(logits.shape)} for {len(keys)} keys; "
                             "expected one row [R, V] per key")
        reqs = [self._get(k) for k in keys]
        params = [r.params for r in reqs]
        asked = [p.logprobs for p in params if p.logprobs is not None]
        logprobs = top_ids = top_values = None
        if asked:
            all_logprobs = torch.log_softmax(logits, dim=-1)  # [R, V], the model's distribution
            if max(asked):
                top_values, top_ids = all_logprobs.topk(max(asked), dim=-1)
        masked = self._mask_grammar(logits, reqs)
        rows = [i for i, p in enumerate(params) if p.temperature != 0]
        if not rows:  # every row greedy (the common decode step): one reduction, no scatter
            tokens = _greedy(masked)  # [R]
        else:
            greedy = [i for i, p in enumerate(params) if p.temperature == 0]
            tokens = torch.empty(len(keys), dtype=torch.int64, device=logits.device)  # [R]
            if greedy:
                _put(tokens, greedy, _greedy(_take(masked, greedy)))
            probs = _filtered_probs(_take(masked, rows), [params[i] for i in rows])  # [S, V]
            u = torch.cat([torch.rand(1, generator=reqs[i].generator) for i in rows])
            _put(tokens, rows, _inverse_cdf(probs, u.to(probs.device)))
        if masked is not logits:  # some rows follow a grammar: advance their matchers
            for r, token in zip(reqs, tokens.tolist()):
                if r.matcher is not None:
                    r.matcher.accept(token)
        if asked:
            logprobs = all_logprobs.gather(1, tokens[:, None])[:, 0]
        return SamplerOutput(tokens, logprobs, top_ids, top_values)

    def _mask_grammar(self, logits: torch.Tensor, reqs: list[_Request]) -> torch.Tensor:
        """logits, or a copy whose grammar rows allow only what their matchers allow next."""
        rows = [i for i, r in enumerate(reqs) if r.matcher is not None]
        if not rows:
            return logits
        bitmask = allocate_bitmask(len(reqs), logits.shape[1])
        for i in rows:
            reqs[i].matcher.fill_bitmask(bitmask, i)
        return _masked(logits, bitmask, rows)

    # ---- speculative verification ----

    def verify(self, logits: torch.Tensor, keys: list[int], drafts: list[list[int]],
               draft_probs: list[torch.Tensor] | None = None) -> list[list[int]]:
        """logits [sum(k_i + 1), V] float32: per sequence i, k_i + 1 rows, row j the target's
        distribution for the token after drafts[i][:j]. draft_probs: per sequence [k_i, V], the
        draft model's distribution q at each drafted position; None: n-gram drafts (q one-hot).
        -> per sequence its accepted drafts plus one token (the correction, or the bonus token
        when all are accepted).

        Greedy requests accept the longest prefix of drafts equal to the argmax, then the argmax.
        Sampled requests use rejection sampling (Leviathan et al. 2023): p is the target's
        distribution after temperature, top-k and top-p (the filters of `sample`); draft x at
        position j is accepted when u_j < p(x) / q(x); at the first rejection the token is
        drawn from normalize(max(0, p - q)); with all k accepted, the bonus token is drawn from
        p at row k. Each sequence draws k + 1 uniforms from its generator (u_0..u_(k-1), then
        the final token's), whatever is accepted, so the output distribution is p's.

        Grammar: row j is masked for the state after drafts[:j] (accepted tentatively, up to the
        first draft the grammar forbids, which is then rejected since its p is 0); the drafts
        not kept are rolled back before the final token is accepted. If a kept draft completes
        the grammar (is_terminated()), the sequence ends there, without a final token."""
        sizes = [len(d) + 1 for d in drafts]
        if len(keys) != len(drafts) or logits.dim() != 2 or logits.shape[0] != sum(sizes):
            raise ValueError(f"verify: logits {tuple(logits.shape)} for {len(keys)} keys and "
                             f"drafts of lengths {[len(d) for d in drafts]}: expected "
                             f"[sum(k_i + 1) = {sum(sizes)}, V] and one draft list per key")
        if draft_probs is not None and [tuple(q.shape[:1]) for q in draft_probs] != [
                (len(d),) for d in drafts]:
            raise ValueError("verify: draft_probs must be one [k_i, V] tensor per sequence")
        reqs = [self._get(k) for k in keys]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        row_reqs = [r for r, n in zip(reqs, sizes) for _ in range(n)]  # [N]
        masked, tentative = logits, [0] * len(reqs)
        if any(r.matcher is not None for r in reqs):
            bitmask = allocate_bitmask(len(row_reqs), logits.shape[1])
            tentative = [_fill_drafts(r.matcher, d, bitmask, s) if r.matcher else 0
                         for r, d, s in zip(reqs, drafts, starts)]
            masked = _masked(logits, bitmask, [j for j, r in enumerate(row_reqs) if r.matcher])
        argmax = _greedy(masked).tolist()  # [N]
        rows = [j for j, r in enumerate(row_reqs) if r.params.temperature != 0]
        probs = None
        if rows:
            probs = torch.zeros_like(masked)
            _put(probs, rows, _filtered_probs(_take(masked, rows), [row_reqs[j].params
                                                                     for j in rows]))
        out = []
        for i, (r, d, s) in enumerate(zip(reqs, drafts, starts)):  # decisions are per sequence
            if r.params.temperature == 0:
                n = next((j for j, t in enumerate(d) if t != argmax[s + j]), len(d))
                tokens = d[:n] + [argmax[s + n]]
            else:
                q = None if draft_probs is None else draft_probs[i].to(probs.device, probs.dtype)
                tokens = _reject(probs[s:s + len(d) + 1], d, q, r.generator)
            out.append(self._keep(r, tokens, tentative[i]))
        return out

    def _keep(self, r: _Request, tokens: list[int], tentative: int) -> list[int]:
        """Settle a grammar request's state on tokens (its accepted drafts + one token)."""
        if r.matcher is None:
            return tokens
        kept = len(tokens) - 1
        if kept > tentative:
            raise AssertionError("verify accepted a draft the grammar did not accept")
        if kept == tentative and r.matcher.is_terminated():
            return tokens[:kept]  # the last kept draft completed the grammar
        r.matcher.rollback(tentative - kept)
        r.matcher.accept(tokens[-1])
        return tokens

    # ---- prompt log-probabilities ----

    def prompt_logprobs(self, logits: torch.Tensor, key: int,
                        first_pos: int) -> list[dict[int, float] | None]:
        """logits [m, V]: the model's outputs at prompt positions first_pos .. first_pos + m - 1;
        row i scores prompt token first_pos + i + 1. -> one entry per prompt token scored,
        {token id: logprob} of the top `params.prompt_logprobs` and the prompt's own token (the
        model's distribution), preceded by None for token 0 when first_pos == 0 (nothing scores
        it). So the entries are for prompt positions from first_pos + 1 (from 0 when first_pos
        is 0); a row past the prompt's last token (the completing row, sampled instead) adds
        nothing."""
        r = self._get(key)
        k = r.params.prompt_logprobs
        if k is None or r.prompt_ids is None:
            raise ValueError(f"prompt_logprobs: request {key} has "
                             f"{'no prompt_logprobs' if k is None else 'no prompt ids'} at add()")
        if logits.dim() != 2 or not 0 <= first_pos < len(r.prompt_ids):
            raise ValueError(f"prompt_logprobs: logits {tuple(logits.shape)} at position "
                             f"{first_pos} for a prompt of {len(r.prompt_ids)} tokens")
        targets = r.prompt_ids[first_pos + 1:first_pos + 1 + logits.shape[0]]
        entries: list[dict[int, float] | None] = [None] if first_pos == 0 else []
        if not targets:
            return entries
        logprobs = torch.log_softmax(logits[:len(targets)], dim=-1)  # [n, V]
        own = logprobs.gather(1, torch.tensor(targets, device=logits.device)[:, None])[:, 0]
        top_values, top_ids = logprobs.topk(k, dim=-1)
        for ids, values, t, v in zip(top_ids.tolist(), top_values.tolist(), targets,
                                     own.tolist()):
            entry = dict(zip(ids, values))
            entry[t] = v
            entries.append(entry)
        return entries


def _masked(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """A copy of logits [N, V] whose rows `rows` allow only their bitmask's tokens (the caller's
    logits stay the model's, for logprobs)."""
    masked = logits.clone()
    apply_bitmask(masked, bitmask, rows)
    return masked


def _allowed(bitmask_row: torch.Tensor, token: int) -> bool:
    """Whether bit `token` of one bitmask row [ceil(V / 32)] int32 is set."""
    return bool((int(bitmask_row[token // 32]) >> (token % 32)) & 1)


def _fill_drafts(matcher, draft: list[int], bitmask: torch.Tensor, start: int) -> int:
    """Fill bitmask rows start .. start + k for a sequence's k drafts + 1, row j for the grammar
    state after drafts[:j], accepting drafts tentatively; stops at the first draft the grammar
    forbids or once it completes. -> how many drafts it accepted."""
    accepted = 0
    for j, token in enumerate(draft + [None]):
        matcher.fill_bitmask(bitmask, start + j)
        if token is None or not _allowed(bitmask[start + j], token):
            break
        matcher.accept(token)
        accepted += 1
        if matcher.is_terminated():
            break
    return accepted


def _reject(p: torch.Tensor, draft: list[int], q: torch.Tensor | None,
            generator: torch.Generator) -> list[int]:
    """Rejection sampling of one sequence: p [k + 1, V] target probabilities, q [k, V] draft
    probabilities (None: one-hot on the drafts) -> accepted drafts + the correction / bonus."""
    k = len(draft)
    u = torch.rand(k + 1, generator=generator).tolist()  # float32, as sample() draws
    if k:
        index = torch.tensor(draft, device=p.device)[:, None]
        p_x = p[:k].gather(1, index)[:, 0].tolist()  # [k] target probability of each draft
        q_x = [1.0] * k if q is None else q.gather(1, index)[:, 0].tolist()
    for j in range(k):
        if q_x[j] <= 0:
            raise ValueError(f"verify: draft token {draft[j]} at position {j} has draft "
                             "probability 0; a draft must come from its own q")
        if not u[j] * q_x[j] < p_x[j]:  # rejected with probability 1 - min(1, p / q)
            if q is None:
                residual = p[j].clone()
                residual[draft[j]] = 0  # max(0, p - onehot(x))
            else:
                residual = (p[j] - q[j]).clamp_(min=0)
            if not residual.sum() > 0:  # p <= q everywhere: only rounding can reject here
                residual = p[j]
            token = _inverse_cdf(residual[None], torch.tensor([u[k]], device=p.device))
            return draft[:j] + [int(token)]
    return draft + [int(_inverse_cdf(p[k][None], torch.tensor([u[k]], device=p.device)))]


def _greedy(logits: torch.Tensor) -> torch.Tensor:
    """logits [R, V] -> [R] int64, per row the first index of its largest logit (argmax's
    answer). max(dim) finds the same index, and on the CPU 3x (one thread) to 15x (two) faster
    than argmax over a vocab-wide row (measured: [32, 49152] float32, torch 2.13)."""
    return logits.max(dim=-1).indices


def _take(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x's rows `rows` (ascending): x itself when they are all of them, else a copy."""
    if len(rows) == x.shape[0]:
        return x
    return x.index_select(0, torch.tensor(rows, device=x.device))


def _put(x: torch.Tensor, rows: list[int], values: torch.Tensor) -> None:
    """x[rows] = values, in place (nothing to do when values is x itself)."""
    if values is not x:
        x.index_copy_(0, torch.tensor(rows, device=x.device), values)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """logits [S, V] of sampled rows -> [S, V] float32 probabilities after temperature, top-k and
    top-p. Both filters keep the tokens at or above a threshold logit, so ties are kept together:
    top-k keeps every token at least as likely as the k-th most likely; top-p, on the top-k
    survivors, keeps token t while the mass of the tokens strictly more likely than t is below
    top_p (the most likely token always stays)."""
    S, V = logits.shape
    dev = logits.device
    x = logits / torch.tensor([p.temperature for p in params], device=dev)[:, None]  # a copy
    top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
    rows = [i for i, p in enumerate(params) if top_k[i] < V or p.top_p < 1]
    if not rows:
        return x.softmax(dim=-1)
    xs = _take(x, rows)  # [F, V], the rows that filter (x itself when all do)
    ks = [top_k[i] for i in rows]
    if min(ks) < V:
        top = xs.topk(max(k for k in ks if k < V), dim=-1).values  # [F, kmax], descending
        kth = top.gather(1, torch.tensor([[min(k, top.shape[1]) - 1] for k in ks], device=dev))
        kth.masked_fill_(torch.tensor([[k == V] for k in ks], device=dev), float("-inf"))
        xs.masked_fill_(xs < kth, float("-inf"))
    nucleus = [j for j, i in enumerate(rows) if params[i].top_p < 1]  # rows of xs with top-p
    if nucleus:
        xp = _take(xs, nucleus)
        top_p = torch.tensor([[params[rows[j]].top_p] for j in nucleus], device=dev)  # [P, 1]
        xp.masked_fill_(xp < _top_p_threshold(xp, top_p), float("-inf"))
        _put(xs, nucleus, xp)
    _put(x, rows, xs)
    return x.softmax(dim=-1)


def _top_p_threshold(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """x [F, V] logits (-inf: filtered out), top_p [F, 1] -> [F, 1] the lowest logit top-p keeps.

    The nucleus of a real model's row is usually small: look for the cut among the 64 most likely
    tokens (a topk), then among 512 for the rows whose cut lies beyond, and sort the whole row
    only for the rows whose cut lies beyond that (a topk of thousands costs more than a sort)."""
    F, V = x.shape
    norm = torch.logsumexp(x, dim=-1, keepdim=True)  # [F, 1] over the whole row
    threshold = torch.empty(F, 1, dtype=x.dtype, device=x.device)
    todo = torch.arange(F, device=x.device)
    c = min(V, 64)
    while True:
        xt = x if todo.numel() == F else x.index_select(0, todo)
        top = xt.topk(c, dim=-1).values if c < V else xt.sort(dim=-1, descending=True).values
        probs = (top - norm[todo]).exp()  # [F', c] descending
        before = probs.cumsum(dim=-1) - probs  # mass strictly ahead in this order
        kept = (before < top_p[todo]).sum(dim=-1, keepdim=True)  # >= 1: before[0] = 0
        last = top.gather(1, kept - 1)
        # Resolved: the cut falls inside the c tokens, or nothing beyond them has mass.
        done = (kept < c)[:, 0] | torch.isneginf(top[:, -1]) | (c == V)
        threshold[todo[done]] = last[done]
        todo = todo[~done]
        if todo.numel() == 0:
            return threshold
        c = min(V, c * 8) if c * 8 <= 512 else V


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """probs [S, V] (rows need not sum to exactly 1), u [S] in [0, 1) -> [S] int64: per row the
    first token in vocabulary order whose cumulative probability exceeds u x the row's total; a
    token of probability 0 is never chosen."""
    cdf = probs.cumsum(dim=-1)  # [S, V], non-decreasing
    total = cdf[:, -1:]
    # Kept below the total, so the search ends on a token that adds mass, never past the end.
    target = torch.minimum(u[:, None].to(cdf.dtype) * total,
                           torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True)[:, 0]
