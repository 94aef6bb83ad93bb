"""The token-wise glue of a decoder layer on seqpar's fused CPU kernels (seqpar/csrc/token_ops.cpp):
RMSNorm with its residual add (layers/norm.py), rotary embedding in place (layers/rotary.py) and
SiLU-and-mul (here), one kernel each where the torch code runs 5-10 ops. A batch-1 decode step
of SmolLM2 spends more time dispatching those small ops than computing them, so the eager CPU
path takes the kernels; the torch code stays the reference, and the path of torch.compile (whose
graph Inductor fuses and the SP pass reads), of other devices and of a failed build
(attention_kernels.available() logs why). Results match the torch code but for float rounding
(the kernel's header says where).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from seqpar.layers import attention_kernels as kernels

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""The storage dtypes the kernels have."""


def fused(x: torch.Tensor) -> bool:
    """Whether the token-wise glue on x runs on the fused kernels: an eager step (not while
    torch.compile traces) on a CPU tensor of a dtype they have, [rows, D] or [A, B, D] with
    contiguous rows, once the library is built."""
    return (not torch.compiler.is_compiling() and x.is_cpu and x.dtype in DTYPES
            and x.dim() in (2, 3) and x.stride(-1) == 1 and kernels.available())


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up written over gate: [R, 2W] -> a [R, W] view into it (gate_up's gate
    half, so no [R, W] temporary sits next to gate_up)."""
    if gate_up.dim() == 2 and fused(gate_up):
        gate = gate_up[:, :gate_up.shape[1] // 2]
        torch.ops.seqpar_kernels.silu_and_mul(gate, gate_up)
        return gate
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate, inplace=True).mul_(up)
