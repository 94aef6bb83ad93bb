"""Causal attention over a per-sequence KV cache, one flat step of mixed prefills and decodes.

Pad rows never reach this layer: callers pass only the step's T real tokens.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class KVCache:
    """One layer's keys and values on this rank, one growing buffer per sequence slot.

    Each buffer is [kv_heads, capacity, D]; capacity doubles when a sequence outgrows it, so memory
    follows the tokens actually cached and slots are reused by later sequences.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device, max_len: int):
        self.shape = (num_kv_heads, head_dim)
        self.dtype, self.device, self.max_len = dtype, device, max_len
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def append(self, slot: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v: [n, kv_heads, D] at positions start..start+n; return [kv_heads, start+n, D] views."""
        end = start + k.shape[0]
        buf_k = self.k.get(slot)
        if buf_k is None or buf_k.shape[1] < end:
            cap = min(self.max_len, max(end, 16, 2 * (0 if buf_k is None else buf_k.shape[1])))
            heads, d = self.shape
            new_k = torch.empty(heads, cap, d, dtype=self.dtype, device=self.device)
            new_v = torch.empty_like(new_k)
            if buf_k is not None and start > 0:
                new_k[:, :start] = buf_k[:, :start]
                new_v[:, :start] = self.v[slot][:, :start]
            self.k[slot], self.v[slot] = new_k, new_v
        self.k[slot][:, start:end] = k.transpose(0, 1)
        self.v[slot][:, start:end] = v.transpose(0, 1)
        return self.k[slot][:, :end], self.v[slot][:, :end]


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window
        self.cache: KVCache | None = None  # attached by the worker once the model is built

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> torch.Tensor:
        """q: [T, hq, D]; k, v: [T, hkv, D] for the step's real tokens -> [T, hq * D]."""
        out = torch.empty_like(q)
        gqa = self.num_heads != self.num_kv_heads
        for slot, start, n, row in plan.seq_iter():
            keys, values = self.cache.append(slot, start, k[row:row + n], v[row:row + n])
            mask = self._mask(start, n, q.device)
            # [1, hq, n, D] x [1, hkv, start+n, D]: with a batch dimension the CPU picks its fused
            # (flash) kernel; 3-D inputs with enable_gqa fall back to the math kernel, which
            # materializes [hq, n, start+n] scores (5x slower at 2048 tokens).
            o = F.scaled_dot_product_attention(
                q[None, row:row + n].transpose(1, 2), keys[None], values[None],
                attn_mask=mask, is_causal=mask is None and n > 1 and start == 0,
                scale=self.scale, enable_gqa=gqa)
            out[row:row + n] = o[0].transpose(0, 1)
        return out.view(q.shape[0], -1)

    def _mask(self, start: int, n: int, device) -> torch.Tensor | None:
        """Boolean [n, start+n] (True = attend) where is_causal cannot express it, else None."""
        window = self.sliding_window
        if (start == 0 or n == 1) and (window is None or start + n <= window):
            return None
        query_pos = torch.arange(start, start + n, device=device).unsqueeze(1)
        key_pos = torch.arange(start + n, device=device).unsqueeze(0)
        mask = key_pos <= query_pos
        if window is not None:
            mask &= key_pos > query_pos - window
        return mask
