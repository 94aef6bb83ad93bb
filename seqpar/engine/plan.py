"""The step plan: what every rank runs in one forward, decided on rank 0 and broadcast.

A plan is a flat batch of T tokens from several sequences (prefill chunks and single decode tokens
side by side), the sequences' KV-cache slots and start positions, which rows are sampled, and the
step's mode. Everything else (positions, padding, which rank owns which sampled row) is derived from
those fields the same way on every rank, so the ranks cannot disagree (invariant 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class StepPlan:
    sp: bool
    """Sequence-parallel step: the residual stream is sharded along tokens between layers."""
    token_ids: torch.Tensor
    """[T] int64, the step's tokens, sequence after sequence."""
    slots: list[int]
    """Per sequence: its KV-cache slot."""
    starts: list[int]
    """Per sequence: tokens already in its KV cache (the position of its first token here)."""
    lens: list[int]
    """Per sequence: tokens it has in this step (a prefill chunk, or 1 when decoding)."""
    sample: list[bool]
    """Per sequence: whether its last row is sampled (its prompt is fully in after this step)."""
    world_size: int
    """TP group size N: on SP steps T is padded to a multiple of it."""
    overlap: bool = False
    """On an SP step: collective matmuls (layers/overlap.py) instead of gather/scatter + matmul."""

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def padded(self) -> int:
        """T_pad: T rounded up to a multiple of N on SP steps, T otherwise."""
        n = self.world_size if self.sp else 1
        return -(-self.num_tokens // n) * n

    def seq_iter(self):
        """(slot, start, n, first row) per sequence."""
        row = 0
        for slot, start, n in zip(self.slots, self.starts, self.lens):
            yield slot, start, n, row
            row += n

    @cached_property
    def positions(self) -> torch.Tensor:
        """[T] int64: the position of every token in its sequence."""
        return torch.cat([torch.arange(s, s + n) for s, n in zip(self.starts, self.lens)]).to(
            self.token_ids.device)

    @cached_property
    def _sample_rows(self) -> list[int]:
        return [row + n - 1 for (_, _, n, row), s in zip(self.seq_iter(), self.sample) if s]

    @cached_property
    def sample_rows(self) -> torch.Tensor:
        """[S] rows (of T) whose logits are sampled, in sequence order."""
        return torch.tensor(self._sample_rows, dtype=torch.int64, device=self.token_ids.device)

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
        return torch.tensor(self._sp_ownership[0][rank], dtype=torch.int64, device=self.token_ids.device)

    @property
    def sample_gather_index(self) -> torch.Tensor:
        """[S] index into the all-gathered [N * K, H] sampled rows, in sequence order."""
        return torch.tensor(self._sp_ownership[1], dtype=torch.int64, device=self.token_ids.device)

    def encode(self) -> torch.Tensor:
        """One int64 tensor: [sp, overlap, n_seqs, slots, starts, lens, sample, token ids]."""
        meta = [int(self.sp), int(self.overlap), len(self.slots), *self.slots, *self.starts, *self.lens,
                *map(int, self.sample)]
        return torch.cat([torch.tensor(meta, dtype=torch.int64), self.token_ids.cpu()])

    @classmethod
    def decode(cls, data: torch.Tensor, world_size: int, device="cpu") -> "StepPlan":
        sp, overlap, n = data[:3].tolist()
        values = data[3:3 + 4 * n].tolist()  # only the per-sequence fields, not the token ids
        fields = [values[i * n:(i + 1) * n] for i in range(4)]
        token_ids = data[3 + 4 * n:].to(device)
        return cls(bool(sp), token_ids, fields[0], fields[1], fields[2], [bool(x) for x in fields[3]],
                   world_size, bool(overlap))
