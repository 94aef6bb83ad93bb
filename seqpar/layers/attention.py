"""Causal attention over a paged KV cache, one flat step of mixed prefills and decodes.

Each layer's keys and values live in one pool per rank, [num_blocks, block_size, kv_heads, D],
allocated once; a sequence's tokens sit in the blocks its block table lists (worker/plan.py). A
step writes its tokens' keys and values at their slots, then attends in at most two batched calls,
whatever the number of sequences:
- the decoding sequences (one query each) together: their blocks gathered into [B, L, kv, D]
  (L = their longest context, in whole blocks) and one SDPA call with a length mask; the query
  heads that share a KV head are laid out as that head's query rows, so no KV head is repeated;
- the prefill chunks together: queries padded to the longest chunk, [P, heads, q_max, D], their
  blocks gathered likewise, one SDPA call with a causal + length mask. A lone chunk with no
  cached context (the common long prefill) attends to its own keys with is_causal and no gather.
Splitting the two kinds keeps a 2048-token prefill from padding every decode query to 2048.

Pad rows never reach this layer: callers pass only the step's T real tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar.config import round_up
from seqpar.layers import sp


@dataclass
class _Batch:
    """One batched attention call's index tensors, shared by every layer of a step."""

    rows: torch.Tensor
    """[R] rows (of T) of the queries this call serves."""
    dest: torch.Tensor
    """[R] where each of those rows sits in the call's padded [B * q_max] query layout."""
    tables: torch.Tensor
    """[B, max_blocks] block ids of each sequence (padded with block 0, masked out)."""
    mask: torch.Tensor | None
    """[B, 1, q_max, L] bool, True = attend; None for a lone uncached chunk (is_causal)."""
    q_max: int


class AttentionMetadata:
    """A step's slot mapping and batched-call layouts, derived from its plan once per window."""

    def __init__(self, plan, window: int | None):
        self.slots = plan.slot_mapping
        decode = [i for i, n in enumerate(plan.lens) if n == 1]
        prefill = [i for i, n in enumerate(plan.lens) if n > 1]
        self.decode = _batch(plan, decode, window, lone_ok=False) if decode else None
        self.prefill = _batch(plan, prefill, window, lone_ok=True) if prefill else None


def _batch(plan, seqs: list[int], window: int | None, lone_ok: bool) -> _Batch:
    bs, dev = plan.block_size, plan.device
    starts = [plan.starts[i] for i in seqs]
    lens = [plan.lens[i] for i in seqs]
    q_max = max(lens)
    rows, dest = [], []
    for b, i in enumerate(seqs):
        rows.extend(range(plan.first_rows[i], plan.first_rows[i] + plan.lens[i]))
        dest.extend(range(b * q_max, b * q_max + plan.lens[i]))
    ends = [s + n for s, n in zip(starts, lens)]
    max_blocks = round_up(max(ends), bs) // bs
    # A table may already hold blocks for chunks still to come (pipeline steps in flight).
    tables = [plan.block_tables[i][:max_blocks] for i in seqs]
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in tables], dtype=torch.int64,
                          device=dev)
    lone = lone_ok and len(seqs) == 1 and starts[0] == 0 and (window is None or lens[0] <= window)
    mask = None
    if not lone:
        # query position [B, q_max, 1] against key position [1, 1, L]
        start = torch.tensor(starts, device=dev).view(-1, 1, 1)
        q_pos = start + torch.arange(q_max, device=dev).view(1, -1, 1)
        k_pos = torch.arange(max_blocks * bs, device=dev).view(1, 1, -1)
        # Pad query rows (past a chunk's end) attend to whatever; their outputs are never read.
        mask = k_pos <= q_pos
        if window is not None:
            mask &= k_pos > q_pos - window
        mask = mask.unsqueeze(1)
    return _Batch(torch.tensor(rows, device=dev), torch.tensor(dest, device=dev), tables, mask,
                  q_max)


class Attention(nn.Module):
    sp_role = sp.TOKEN_MIXING

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        """[num_blocks, block_size, kv_heads, D] each, attached by the worker (KV pools)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> torch.Tensor:
        """q: [T, hq, D]; k, v: [T, hkv, D] for the step's real tokens -> [T, hq * D]."""
        meta = plan.attention_metadata(self.sliding_window)
        hkv, d = self.num_kv_heads, self.head_dim
        # [num_blocks * block_size, hkv, D] views: a token's slot is one row.
        self.k_cache.view(-1, hkv, d).index_copy_(0, meta.slots, k)
        self.v_cache.view(-1, hkv, d).index_copy_(0, meta.slots, v)
        # A step of one kind of call (decodes only, or one uncached chunk) serves all T rows in
        # order: no rows to gather or scatter.
        if meta.prefill is None:
            return self._decode(q, meta.decode).reshape(q.shape[0], -1)
        lone = meta.prefill.mask is None
        if lone and meta.decode is None:
            return self._lone_chunk(q, k, v).reshape(q.shape[0], -1)
        out = torch.empty_like(q)
        if meta.decode is not None:
            out[meta.decode.rows] = self._decode(q[meta.decode.rows], meta.decode)
        rows = meta.prefill.rows
        if lone:
            out[rows] = self._lone_chunk(q[rows], k[rows], v[rows])
        else:
            out[rows] = self._prefill(q[rows], meta.prefill)
        return out.view(q.shape[0], -1)

    def _gather(self, batch: _Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's blocks as [B, hkv, L, D] key and value views (L = max_blocks * block_size)."""
        b, nb = batch.tables.shape
        bs = self.k_cache.shape[1]
        shape = (b, nb * bs, self.num_kv_heads, self.head_dim)
        # index_select copies whole [block_size, hkv, D] rows: ~3x faster than advanced indexing.
        blocks = batch.tables.view(-1)
        keys = self.k_cache.index_select(0, blocks).view(shape).transpose(1, 2)
        values = self.v_cache.index_select(0, blocks).view(shape).transpose(1, 2)
        return keys, values

    def _decode(self, q: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """q [B, hq, D] (one query per sequence) -> [B, hq, D]."""
        keys, values = self._gather(batch)
        b, hkv = q.shape[0], self.num_kv_heads
        # [B, hkv, hq / hkv, D]: the query heads of one KV head are its rows (GQA without a repeat).
        o = F.scaled_dot_product_attention(q.view(b, hkv, -1, self.head_dim), keys, values,
                                           attn_mask=batch.mask, scale=self.scale)
        return o.reshape(b, -1, self.head_dim)

    def _prefill(self, q: torch.Tensor, batch: _Batch) -> torch.Tensor:
        """q [R, hq, D] (the chunks' rows) -> [R, hq, D], through a [P, hq, q_max, D] layout."""
        keys, values = self._gather(batch)
        p = batch.tables.shape[0]
        padded = q.new_zeros(p * batch.q_max, *q.shape[1:])
        padded[batch.dest] = q
        o = F.scaled_dot_product_attention(
            padded.view(p, batch.q_max, *q.shape[1:]).transpose(1, 2), keys, values,
            attn_mask=batch.mask, scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)
        return o.transpose(1, 2).reshape(p * batch.q_max, *q.shape[1:])[batch.dest]

    def _lone_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One chunk with nothing cached before it: q [n, hq, D] against its own keys k, v
        [n, hkv, D], is_causal -> [n, hq, D]. [1, heads, n, D] with a batch dimension: the CPU
        picks its fused (flash) kernel; 3-D inputs with enable_gqa fall back to the math kernel
        (5x slower at 2048 tokens)."""
        o = F.scaled_dot_product_attention(
            q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
            is_causal=True, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        return o[0].transpose(0, 1)
