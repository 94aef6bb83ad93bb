"""Custom ops the compiled path puts in the graph: two no-op fences and opaque attention.

Fences mark where a token-wise region of the residual stream starts and ends, so the SP pass
(sp_pass.py) does not have to guess from norm variants:

    tokenwise_begin(x)  after a reduction over the TP group (row-parallel output, embedding)
    tokenwise_end(x)    at a column-parallel input (the matmul that needs every token)

Both return their input unchanged. Comm emits them (distributed/comm.py) only while torch.compile
traces (`torch.compiler.is_compiling()`), so eager steps pay nothing; the pass removes them from
the graph before Inductor sees it.

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


@custom_op("seqpar::tokenwise_begin", mutates_args=())
def tokenwise_begin(x: torch.Tensor) -> torch.Tensor:
    return x.clone()  # custom ops may not return an input alias; only reached without the pass


@tokenwise_begin.register_fake
def _(x):
    return torch.empty_like(x)


@custom_op("seqpar::tokenwise_end", mutates_args=())
def tokenwise_end(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


@tokenwise_end.register_fake
def _(x):
    return torch.empty_like(x)


FENCES = (torch.ops.seqpar.tokenwise_begin.default, torch.ops.seqpar.tokenwise_end.default)

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

    return overlap.all_gather_matmul(comm_of(handle), x, overlap.dense_matmul(weight),
                                     weight.shape[0], bias)


@all_gather_matmul.register_fake
def _(x, weight, bias, handle):
    return x.new_empty(x.shape[0] * comm_of(handle).world_size, weight.shape[0])


@custom_op("seqpar::matmul_reduce_scatter", mutates_args=())
def matmul_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, padded: int,
                          handle: str) -> torch.Tensor:
    """reduce_scatter(pad(linear(x, weight), padded)), the transfers hidden behind the matmuls:
    [T, in] -> [padded / N, out]."""
    from seqpar.layers import overlap

    return overlap.matmul_reduce_scatter(comm_of(handle), x, overlap.dense_matmul(weight), padded)


@matmul_reduce_scatter.register_fake
def _(x, weight, padded, handle):
    return x.new_empty(padded // comm_of(handle).world_size, weight.shape[0])
