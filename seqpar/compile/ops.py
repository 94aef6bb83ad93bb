"""Custom ops the compiled path puts in the graph: opaque attention and the ring collective
matmuls. (The fences around token-wise regions, and the collectives, are distributed/ops.py's.)

`attention(q, k, v, layer)` hides attention over the paged KV cache (the cache writes and the
batched SDPA calls, laid out by the step's block tables) from the compiler: one opaque node per
layer, so the whole forward is one graph and the residual stream stays sharded across layers. Its
eager body is `ATTEND[0]`, set by the runner for the step being run (runner.py), so the per-step
plan never enters the graph. The projections' split, q/k norms and rotary stay in the graph.
"""
from __future__ import annotations

import torch
from torch.library import custom_op

from seqpar.distributed.ops import comm_of

# callable(layer, q [rows, hq, D], k, v [rows, hkv, D]) -> [rows, hq * D] for the step being run
# (runner.py)
ATTEND: list = [None]


@custom_op("seqpar::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return ATTEND[0](layer, q, k, v)


@attention.register_fake
def _(q, k, v, layer):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])


# ---- collective matmuls (layers/overlap.py) as graph ops, for the pass's overlap option --------
# `handle` names the Comm they run on (distributed/ops.py).

@custom_op("seqpar::all_gather_matmul", mutates_args=())
def all_gather_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      handle: str) -> torch.Tensor:
    """linear(all_gather(x), weight, bias), the gather hidden behind the matmuls:
    [S, in] -> [N * S, out]."""
    from seqpar.layers import overlap

    return overlap.all_gather_matmul(comm_of(handle), x, weight, bias)


@all_gather_matmul.register_fake
def _(x, weight, bias, handle):
    return x.new_empty(x.shape[0] * comm_of(handle).world_size, weight.shape[0])


@custom_op("seqpar::matmul_reduce_scatter", mutates_args=())
def matmul_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, padded: int,
                          handle: str) -> torch.Tensor:
    """reduce_scatter(pad(linear(x, weight), padded)), the transfers hidden behind the matmuls:
    [T, in] -> [padded / N, out]."""
    from seqpar.layers import overlap

    return overlap.matmul_reduce_scatter(comm_of(handle), x, weight, padded)


@matmul_reduce_scatter.register_fake
def _(x, weight, padded, handle):
    return x.new_empty(padded // comm_of(handle).world_size, weight.shape[0])
