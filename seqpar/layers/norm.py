"""RMSNorm with the residual add fused in. Token-wise: it runs on whatever rows this rank holds."""
from __future__ import annotations

import torch
import torch.nn as nn

from seqpar.layers import sp, token_ops


class RMSNorm(nn.Module):
    sp_role = sp.TOKEN_WISE

    def __init__(self, dim: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the model dtype, as the reference implementations do.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def _fused(self, x: torch.Tensor) -> bool:
        """The eager CPU path: one kernel (layers/token_ops.py) for the ops of _norm (and the
        residual add before it)."""
        return self.weight.dtype == x.dtype and token_ops.fused(x)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x) if no residual, else (norm(x + residual), x + residual). x: [rows, ..., dim]."""
        if residual is None:
            if not self._fused(x):
                return self._norm(x)
            out = torch.empty_like(x)
            torch.ops.seqpar_kernels.rms_norm(out, x, self.weight, self.eps)
            return out
        if not self._fused(x):
            x = x + residual
            return self._norm(x), x
        return self.add_norm_(x, residual.clone(), torch.empty_like(x))

    def add_norm_(self, x: torch.Tensor, residual: torch.Tensor, out: torch.Tensor):
        """forward(x, residual) written in place: residual += x, out = norm(residual).

        x, residual, out: [rows, dim]; out may be x. Returns (out, residual). The eager decoder
        layer uses it so the residual stream stays two [rows, dim] tensors through a layer instead
        of a new pair per norm (the transients of _norm are freed before the next matmul).
        """
        if self._fused(x):
            torch.ops.seqpar_kernels.add_rms_norm(out, residual, x, self.weight, self.eps)
            return out, residual
        residual += x
        return out.copy_(self._norm(residual)), residual
