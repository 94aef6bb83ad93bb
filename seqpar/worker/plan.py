"""The step format: what rank 0 tells every rank about one step, and the step each rank runs.

Every rank keeps the batch's state (worker/batch.py): the requests it holds, their token ids,
block tables and progress. A request reaches the ranks once, when it is scheduled first (or again
after a preemption); each later step carries only what changed. One step's message, a StepDelta,
encoded as one int64 tensor (`StepDelta.encode`, the control channel's payload):

    header    [step, checksum, sp, overlap, n_rollback, n_dropped, n_released, n_new,
              n_scheduled]
    rollback  [n_rollback x 2] key, tokens kept: after a speculative verification the request
              keeps that many of its token ids, computed tokens and the blocks holding them (the
              rejected drafts' are dropped)
    dropped   [n_dropped] keys the ranks stop holding (finished, aborted or preempted; a
              preempted request comes back later as a new one, recomputed)
    released  [n_released] keys that ended for good: the sampler rank drops their state
    new       [n_new x 5] key, tokens known, prompt tokens, tokens computed, blocks; then their
              token ids and block ids, request after request
    scheduled [n_scheduled x 6] key, num_tokens, num_logit_rows, drafts, new blocks, new token
              ids; then the new block ids and new token ids, request after request
    params    [byte count, pickled list of the new requests' SamplingParams, 8-byte words]
              (only when n_new > 0)

Applied in that order: rollbacks, drops, new requests, then each scheduled request appends its new blocks
and token ids (the tokens rank 0 has and the ranks do not: decoded or draft tokens) and runs
`num_tokens` tokens from its computed count. `num_logit_rows` m: the last m rows of its chunk get
full-vocab logits on the sampler rank (1: a sampled row, 0: a mid-prompt chunk; more for
verification or prompt logprobs). A row is drawn from (sampled) when the chunk reaches the last
token the ranks know. `drafts` k > 0: a verification step, the chunk's last k tokens are draft
tokens and its last k + 1 logit rows go to Sampler.verify.

Invariant 1 (every rank runs the same plan) holds by construction, and is checked: `step` counts
the messages, and `checksum` is rank 0's digest of the batch after the step (every held key with
its tokens computed, `batch_checksum`); a rank whose state differs after applying the delta raises
(a missed or misapplied delta), it never runs a drifted step.

A StepPlan is one rank's view of the step it runs: the flat batch of T tokens, per sequence its
start, length and logit rows, and the step's mode. Positions, cache slots, padding, attention
metadata and which rank owns which logit row all derive from it the same way on every rank.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from functools import cached_property

import torch

from seqpar.config import round_up
from seqpar.layers.attention import AttentionMetadata, build_metadata

CHECKSUM_MOD = (1 << 61) - 1
HEADER, NEW_FIELDS, SCHED_FIELDS = 9, 5, 6


def key_digest(key: int, computed: int) -> int:
    """One held request's share of the batch checksum (a sum of these, mod CHECKSUM_MOD: order
    free, so both sides keep it up to date per change)."""
    return ((key + 1) * 0x9E3779B97F4A7C15 + (computed + 1) * 0xC2B2AE3D27D4EB4F
            + key * computed) % CHECKSUM_MOD


class ChecksumMismatch(RuntimeError):
    """A rank's batch state disagrees with rank 0's: a delta was missed or misapplied."""


@dataclass
class NewRequest:
    """A request the ranks do not hold yet: everything they keep about it."""

    key: int
    token_ids: list[int]
    """Every token rank 0 knows: the prompt, then any generated so far (recomputed after a
    preemption)."""
    num_prompt_tokens: int
    computed: int
    """Tokens already in the KV cache (a prefix-cache hit), where its first step starts."""
    block_ids: list[int]
    params: object
    """Its SamplingParams (unseeded: the sampler seeds it from the engine's seed and the key)."""


@dataclass
class StepDelta:
    """One step's message (module docstring): what changed since the last, per scheduled request
    in the step's row order."""

    step: int
    checksum: int
    sp: bool
    overlap: bool
    rollback: list[tuple[int, int]] = field(default_factory=list)
    """(key, tokens kept) per request whose last verification rejected drafts."""
    dropped: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    new: list[NewRequest] = field(default_factory=list)
    keys: list[int] = field(default_factory=list)
    """Per scheduled request, in row order: its key."""
    num_tokens: list[int] = field(default_factory=list)
    num_logit_rows: list[int] = field(default_factory=list)
    new_blocks: list[list[int]] = field(default_factory=list)
    new_tokens: list[list[int]] = field(default_factory=list)
    num_drafts: list[int] = field(default_factory=list)
    """Per scheduled request: draft tokens ending its chunk (0: no verification)."""
    draft_probs: dict[int, object] | None = None
    """{key: q [k, V]} of sampled draft-model drafts, for the sampler rank when it is rank 0
    (one pipeline stage): handed over in process, never encoded."""

    def encode(self) -> torch.Tensor:
        meta = [self.step, self.checksum, int(self.sp), int(self.overlap), len(self.rollback),
                len(self.dropped), len(self.released), len(self.new), len(self.keys),
                *(x for pair in self.rollback for x in pair), *self.dropped, *self.released]
        for r in self.new:
            meta += [r.key, len(r.token_ids), r.num_prompt_tokens, r.computed, len(r.block_ids)]
        for r in self.new:
            meta += r.token_ids
            meta += r.block_ids
        for row in zip(self.keys, self.num_tokens, self.num_logit_rows, self.num_drafts,
                       self.new_blocks, self.new_tokens):
            meta += [*row[:4], len(row[4]), len(row[5])]
        for blocks, tokens in zip(self.new_blocks, self.new_tokens):
            meta += blocks
            meta += tokens
        data = torch.tensor(meta, dtype=torch.int64)
        if not self.new:
            return data
        blob = pickle.dumps([r.params for r in self.new])
        words = torch.zeros(round_up(len(blob), 8), dtype=torch.uint8)
        words[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        return torch.cat([data, torch.tensor([len(blob)]), words.view(torch.int64)])

    @classmethod
    def decode(cls, data: torch.Tensor) -> "StepDelta":
        values = data.tolist()
        step, checksum, sp, overlap, n_back, n_drop, n_rel, n_new, n_sched = values[:HEADER]
        at = HEADER
        rollback = [tuple(values[at + 2 * i:at + 2 * i + 2]) for i in range(n_back)]
        at += 2 * n_back
        dropped, released = values[at:at + n_drop], values[at + n_drop:at + n_drop + n_rel]
        at += n_drop + n_rel
        heads = [values[at + i * NEW_FIELDS:at + (i + 1) * NEW_FIELDS] for i in range(n_new)]
        at += n_new * NEW_FIELDS
        new = []
        for key, n_known, n_prompt, computed, n_blocks in heads:
            tokens = values[at:at + n_known]
            blocks = values[at + n_known:at + n_known + n_blocks]
            at += n_known + n_blocks
            new.append(NewRequest(key, tokens, n_prompt, computed, blocks, None))
        rows = [values[at + i * SCHED_FIELDS:at + (i + 1) * SCHED_FIELDS] for i in range(n_sched)]
        at += n_sched * SCHED_FIELDS
        delta = cls(step, checksum, bool(sp), bool(overlap), rollback, dropped, released, new,
                    [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                    num_drafts=[r[3] for r in rows])
        for *_, n_blocks, n_tokens in rows:
            delta.new_blocks.append(values[at:at + n_blocks])
            delta.new_tokens.append(values[at + n_blocks:at + n_blocks + n_tokens])
            at += n_blocks + n_tokens
        if new:
            size = values[at]
            blob = data[at + 1:].view(torch.uint8)[:size].numpy().tobytes()
            for r, params in zip(new, pickle.loads(blob)):
                r.params = params
        elif at != len(values):
            raise ValueError(f"step message {step}: {len(values) - at} words past its end")
        return delta


@dataclass
class _Held:
    """Rank 0's record of what the ranks hold of one request."""

    known: int
    """Token ids the ranks have."""
    blocks: int
    """Block ids the ranks have."""
    computed: int
    """Tokens handed to steps, as the ranks count them."""


class StepWriter:
    """Rank 0's side of the format: remembers what the ranks hold and writes each step's delta.

    The scheduler tells it about preemptions (`drop`) and finished requests (`finish`) as they
    happen; `write` then makes the next step's message from the sequences and token counts the
    scheduler picked (engine/sequence.Sequence: key, token_ids, block_table, scheduled)."""

    def __init__(self):
        self.held: dict[int, _Held] = {}
        self.sent: set[int] = set()
        """Keys the sampler rank has met (until released)."""
        self.step = 0
        self.checksum = 0
        self._dropped: list[int] = []
        self._released: list[int] = []
        self._rollback: list[tuple[int, int]] = []

    def drop(self, key: int) -> None:
        """The ranks stop holding a request (preempted: its state there restarts when it does)."""
        held = self.held.pop(key, None)
        if held is not None:
            self.checksum = (self.checksum - key_digest(key, held.computed)) % CHECKSUM_MOD
            self._dropped.append(key)

    def rollback(self, key: int, keep: int, blocks: int) -> None:
        """After a verification: the ranks keep `keep` of the request's tokens (computed and
        known) and its first `blocks` blocks (BlockManager.rollback's, rank 0's side)."""
        held = self.held[key]
        self.checksum = (self.checksum - key_digest(key, held.computed)
                         + key_digest(key, keep)) % CHECKSUM_MOD
        held.known = held.computed = keep
        held.blocks = blocks
        self._rollback.append((key, keep))

    def finish(self, key: int) -> None:
        """A request ended for good."""
        self.drop(key)
        if key in self.sent:
            self.sent.discard(key)
            self._released.append(key)

    def write(self, seqs, counts: list[int], logit_rows: list[int], sp: bool,
              overlap: bool, drafts: list[list[int]] | None = None) -> StepDelta:
        """The step running counts[i] tokens of seqs[i] from its `scheduled` count, the last
        logit_rows[i] rows of each with logits; drafts[i]: draft tokens that follow seqs[i]'s
        tokens (the last of its chunk) to verify."""
        delta = StepDelta(self.step, 0, sp, overlap, self._rollback, self._dropped,
                          self._released)
        self._dropped, self._released, self._rollback = [], [], []
        self.step += 1
        for i, (seq, n, m) in enumerate(zip(seqs, counts, logit_rows)):
            key, end = seq.key, seq.scheduled + n
            draft = drafts[i] if drafts else []
            ids = seq.token_ids + draft if draft else seq.token_ids
            held = self.held.get(key)
            if held is None:
                delta.new.append(NewRequest(key, list(ids), seq.num_prompt_tokens,
                                            seq.scheduled, list(seq.block_table), seq.params))
                held = self.held[key] = _Held(len(ids), len(seq.block_table), seq.scheduled)
                self.sent.add(key)
                self.checksum = (self.checksum + key_digest(key, held.computed)) % CHECKSUM_MOD
                delta.new_blocks.append([])
                delta.new_tokens.append([])
            else:
                delta.new_blocks.append(seq.block_table[held.blocks:])
                delta.new_tokens.append(ids[held.known:end])
                held.blocks, held.known = len(seq.block_table), max(held.known, end)
            if held.computed != seq.scheduled:
                raise RuntimeError(f"request {key}: the ranks computed {held.computed} tokens, "
                                   f"the scheduler {seq.scheduled}")
            self.checksum = (self.checksum - key_digest(key, held.computed)
                             + key_digest(key, end)) % CHECKSUM_MOD
            held.computed = end
            delta.keys.append(key)
            delta.num_tokens.append(n)
            delta.num_logit_rows.append(m)
            delta.num_drafts.append(len(draft))
        delta.checksum = self.checksum
        return delta


def batch_checksum(computed: dict[int, int]) -> int:
    """The checksum of a whole batch state {key: tokens computed} (what the ranks check)."""
    return sum(key_digest(k, c) for k, c in computed.items()) % CHECKSUM_MOD


@dataclass
class StepPlan:
    sp: bool
    """Sequence-parallel step: the residual stream is sharded along tokens between layers."""
    token_ids: torch.Tensor
    """[T] int64, the step's tokens, sequence after sequence."""
    starts: list[int]
    """Per sequence: tokens already in its KV cache (the position of its first token here)."""
    lens: list[int]
    """Per sequence: tokens it has in this step (a prefill chunk, 1 when decoding, 1 + k when
    verifying k draft tokens)."""
    logit_rows: list[int]
    """Per sequence: m, its last m rows get full-vocab logits on the sampler rank (booleans read
    as 0 / 1)."""
    block_tables: list[list[int]] | None
    """Per sequence: its KV-cache blocks, enough for start + len tokens (None when the batch
    state hands over the metadata ready-made: `with_metadata`)."""
    world_size: int
    """TP group size N: on SP steps T is padded to a multiple of it."""
    block_size: int = 16
    """Tokens per KV-cache block (the engine's, not sent)."""
    overlap: bool = False
    """On an SP step: collective matmuls (layers/overlap.py) instead of gather/scatter + matmul."""
    keys: list[int] = field(default_factory=list)
    """Per sequence: its request's key (empty in plans built by hand, which sample nothing)."""
    draws: list[bool] = field(default_factory=list)
    """Per sequence: whether the sampler draws its next token from its last logit row."""
    num_drafts: list[int] = field(default_factory=list)
    """Per sequence: draft tokens ending its chunk, verified from its last k + 1 logit rows."""
    draft_probs: dict[int, object] | None = None
    """StepDelta.draft_probs (rank 0 only)."""

    def with_metadata(self, positions: torch.Tensor, meta: AttentionMetadata) -> "StepPlan":
        """Hand over the step's positions [T] and attention metadata made elsewhere (the batch
        state's buffers) instead of building them from the block tables."""
        self.__dict__["positions"], self.__dict__["attn_metadata"] = positions, meta
        return self

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def padded(self) -> int:
        """T_pad: T rounded up to a multiple of N on SP steps, T otherwise."""
        return round_up(self.num_tokens, self.world_size if self.sp else 1)

    @property
    def device(self) -> torch.device:
        return self.token_ids.device

    @cached_property
    def first_rows(self) -> list[int]:
        """Per sequence: the row (of T) of its first token in this step."""
        rows, row = [], 0
        for n in self.lens:
            rows.append(row)
            row += n
        return rows

    @cached_property
    def positions(self) -> torch.Tensor:
        """[T] int64: the position of every token in its sequence."""
        return torch.cat([torch.arange(s, s + n) for s, n in zip(self.starts, self.lens)]).to(
            self.device)

    @cached_property
    def attn_metadata(self) -> AttentionMetadata:
        """The step's attention layout (slots, query runs, sequence lengths, block tables), built
        once per step and shared by every layer."""
        return build_metadata(self.starts, self.lens, self.block_tables, self.block_size,
                              self.device)

    @cached_property
    def _logit_rows(self) -> list[int]:
        rows = []
        for row, n, m in zip(self.first_rows, self.lens, self.logit_rows):
            if not 0 <= m <= n:
                raise ValueError(f"a sequence with {n} rows in this step asks for {int(m)} "
                                 "logit rows")
            rows.extend(range(row + n - m, row + n))
        return rows

    @property
    def num_sampled(self) -> int:
        """R: the rows with logits."""
        return len(self._logit_rows)

    @cached_property
    def sample_rows(self) -> torch.Tensor:
        """[R] rows (of T) with logits, in sequence order (each sequence's last m rows)."""
        return torch.tensor(self._logit_rows, dtype=torch.int64, device=self.device)

    @cached_property
    def draw_rows(self) -> list[int]:
        """Indexes (of the R logit rows) the sampler draws from: each drawing sequence's last."""
        rows, at = [], 0
        for m, draw in zip(self.logit_rows, self.draws):
            at += m
            if draw:
                rows.append(at - 1)
        return rows

    @cached_property
    def drawn_drafts(self) -> list[int]:
        """Per drawing sequence: its draft count k (0: sampled, not verified); rank 0 gets
        1 + k packed rows from each."""
        drafts = self.num_drafts or [0] * len(self.draws)  # plans built by hand carry none
        return [k for k, draw in zip(drafts, self.draws) if draw]

    @cached_property
    def _sp_ownership(self):
        # On an SP step rank r holds rows [r * T_pad / N, (r + 1) * T_pad / N). K = the most logit
        # rows any rank owns; each rank contributes K rows (padding with its row 0) to one gather.
        shard = self.padded // self.world_size
        owned: list[list[int]] = [[] for _ in range(self.world_size)]
        gather_index = []
        for row in self._logit_rows:
            owner = row // shard
            gather_index.append((owner, len(owned[owner])))
            owned[owner].append(row - owner * shard)
        k = max(1, max(len(o) for o in owned))
        local = [o + [0] * (k - len(o)) for o in owned]
        return local, [owner * k + i for owner, i in gather_index]

    def local_sample_rows(self, rank: int) -> torch.Tensor:
        """[K] rows of this rank's shard to gather for the logits (SP steps)."""
        return torch.tensor(self._sp_ownership[0][rank], dtype=torch.int64, device=self.device)

    @property
    def sample_gather_index(self) -> torch.Tensor:
        """[R] index into the all-gathered [N * K, H] logit rows, in sequence order."""
        return torch.tensor(self._sp_ownership[1], dtype=torch.int64, device=self.device)
