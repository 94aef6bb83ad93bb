"""The step plan: what every rank runs in one forward, decided on rank 0 and broadcast.

A plan is a flat batch of T tokens from several sequences (prefill chunks and single decode tokens
side by side), each sequence's block table into the paged KV cache and its start position, which
rows are sampled and how, and the step's mode. Everything else (positions, cache slots, padding,
attention masks, which rank owns which sampled row) is derived from those fields the same way on
every rank, so the ranks cannot disagree (docs/architecture.md, invariant 1).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import cached_property

import torch

from seqpar.config import round_up
from seqpar.layers.attention import AttentionMetadata, build_metadata


@dataclass(frozen=True)
class SampleSpec:
    """How the sampler rank draws one sampled row's token (worker/sampler.py)."""

    key: int
    """The request's number: names its random generator on the sampler rank."""
    seed: int
    """Seeds that generator when the sampler first meets the key."""
    temperature: float
    top_p: float
    top_k: int
    logprobs: int
    """Top log-probabilities to return; -1: none."""

    def encode(self) -> list[int]:
        floats = struct.unpack("<2q", struct.pack("<2d", self.temperature, self.top_p))
        return [self.key, self.seed, *floats, self.top_k, self.logprobs]

    @classmethod
    def decode(cls, values: list[int]) -> "SampleSpec":
        key, seed, t_bits, p_bits, top_k, logprobs = values
        temperature, top_p = struct.unpack("<2d", struct.pack("<2q", t_bits, p_bits))
        return cls(key, seed, temperature, top_p, top_k, logprobs)


SPEC_FIELDS = 6


@dataclass
class StepPlan:
    sp: bool
    """Sequence-parallel step: the residual stream is sharded along tokens between layers."""
    token_ids: torch.Tensor
    """[T] int64, the step's tokens, sequence after sequence."""
    starts: list[int]
    """Per sequence: tokens already in its KV cache (the position of its first token here)."""
    lens: list[int]
    """Per sequence: tokens it has in this step (a prefill chunk, or 1 when decoding)."""
    sample: list[bool]
    """Per sequence: whether its last row is sampled (its prompt is fully in after this step)."""
    block_tables: list[list[int]]
    """Per sequence: its KV-cache blocks, enough for start + len tokens."""
    world_size: int
    """TP group size N: on SP steps T is padded to a multiple of it."""
    block_size: int = 16
    """Tokens per KV-cache block (the engine's, not sent)."""
    overlap: bool = False
    """On an SP step: collective matmuls (layers/overlap.py) instead of gather/scatter + matmul."""
    specs: list[SampleSpec] = field(default_factory=list)
    """Per sampled sequence, in order: how to draw its token."""
    released: list[int] = field(default_factory=list)
    """Request keys that ended since the last plan: the sampler drops their generators."""

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
    def _sample_rows(self) -> list[int]:
        return [row + n - 1 for row, n, s in zip(self.first_rows, self.lens, self.sample) if s]

    @property
    def num_sampled(self) -> int:
        return len(self._sample_rows)

    @cached_property
    def sample_rows(self) -> torch.Tensor:
        """[S] rows (of T) whose logits are sampled, in sequence order."""
        return torch.tensor(self._sample_rows, dtype=torch.int64, device=self.device)

    @cached_property
    def _sp_ownership(self):
        # On an SP step rank r holds rows [r * T_pad / N, (r + 1) * T_pad / N). K = the most sampled
        # rows any rank owns; each rank contributes K rows (padding with its row 0) to one gather.
        shard = self.padded // self.world_size
        owned: list[list[int]] = [[] for _ in range(self.world_size)]
        gather_index = []
        for row in self._sample_rows:
            owner = row // shard
            gather_index.append((owner, len(owned[owner])))
            owned[owner].append(row - owner * shard)
        k = max(1, max(len(o) for o in owned))
        local = [o + [0] * (k - len(o)) for o in owned]
        return local, [owner * k + i for owner, i in gather_index]

    def local_sample_rows(self, rank: int) -> torch.Tensor:
        """[K] rows of this rank's shard to gather for sampling (SP steps)."""
        return torch.tensor(self._sp_ownership[0][rank], dtype=torch.int64, device=self.device)

    @property
    def sample_gather_index(self) -> torch.Tensor:
        """[S] index into the all-gathered [N * K, H] sampled rows, in sequence order."""
        return torch.tensor(self._sp_ownership[1], dtype=torch.int64, device=self.device)

    @property
    def max_logprobs(self) -> int:
        """The most top log-probabilities any sampled row asks for (0: none asks)."""
        return max([0, *(s.logprobs for s in self.specs)])

    def encode(self) -> torch.Tensor:
        """One int64 tensor: [sp, overlap, n_seqs, n_specs, n_released, starts, lens, sample,
        table lengths, tables, specs, released, token ids]."""
        meta = [int(self.sp), int(self.overlap), len(self.starts), len(self.specs),
                len(self.released), *self.starts, *self.lens, *map(int, self.sample),
                *map(len, self.block_tables)]
        for table in self.block_tables:
            meta.extend(table)
        for spec in self.specs:
            meta.extend(spec.encode())
        meta.extend(self.released)
        return torch.cat([torch.tensor(meta, dtype=torch.int64), self.token_ids.cpu()])

    @classmethod
    def decode(cls, data: torch.Tensor, world_size: int, block_size: int,
               device="cpu") -> "StepPlan":
        sp, overlap, n, n_specs, n_released = data[:5].tolist()
        at = 5 + 4 * n
        fields = [data[5 + i * n:5 + (i + 1) * n].tolist() for i in range(4)]
        tables = []
        for length in fields[3]:
            tables.append(data[at:at + length].tolist())
            at += length
        specs = [SampleSpec.decode(data[at + i * SPEC_FIELDS:at + (i + 1) * SPEC_FIELDS].tolist())
                 for i in range(n_specs)]
        at += SPEC_FIELDS * n_specs
        released = data[at:at + n_released].tolist()
        token_ids = data[at + n_released:].to(device)
        return cls(bool(sp), token_ids, fields[0], fields[1], [bool(x) for x in fields[2]], tables,
                   world_size, block_size, bool(overlap), specs, released)
