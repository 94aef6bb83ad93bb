"""Rotary position embedding (rotate-half layout), with Llama-3 frequency scaling."""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from seqpar.layers import sp, token_ops


def _llama3_scale(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    sp_role = sp.POSITIONAL

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        if scaling is not None:
            inv_freq = _llama3_scale(inv_freq, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)  # [max_positions, D]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)
        self._step: list | None = None
        """Inside `step()`: [] or [positions, dtype, cos, sin] of the step's first call; outside,
        None (nothing is kept)."""

    @contextlib.contextmanager
    def step(self):
        """One eager forward: its layers share this module and the step's positions, so the
        [T, 1, D] cos / sin rows are gathered and cast once, not once per layer. Dropped on exit,
        so a later step (whatever its positions tensor) builds its own."""
        self._step = []
        try:
            yield
        finally:
            self._step = None

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor | None = None,
                inplace: bool = False):
        """positions: [T]; q: [T, hq, D]; k: [T, hkv, D] -> rotated (q, k). Without k: q alone
        rotated (q and k as one [T, hq + hkv, D] tensor: half the ops of two calls).
        inplace: q and k may be overwritten (a caller's temporaries); the eager CPU path then
        rotates them in place with one kernel each (layers/token_ops.py). Use the return values."""
        if (inplace and q.dim() == 3 and token_ops.fused(q) and positions.dtype == torch.int64
                and (k is None or token_ops.fused(k))):
            for x in (q,) if k is None else (q, k):
                torch.ops.seqpar_kernels.rotary_embedding(x, positions, self.cos, self.sin)
            return q if k is None else (q, k)
        cos, sin = self.tables(positions, q.dtype)
        if k is None:
            return rotate(q, cos, sin)
        return rotate(q, cos, sin), rotate(k, cos, sin)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [T, 1, D] in dtype for positions [T] (reused within a `step()`)."""
        cached = self._step
        if cached and cached[0] is positions and cached[1] == dtype:
            return cached[2], cached[3]
        cos = self.cos[positions].unsqueeze(1).to(dtype)
        sin = self.sin[positions].unsqueeze(1).to(dtype)
        if cached is not None and not torch.compiler.is_compiling():
            cached[:] = [positions, dtype, cos, sin]
        return cos, sin


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by cos, sin [T, 1, D] (rotate-half pairs: i with i + D/2)."""
    return x * cos + _rotate_half(x) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)
