"""Collective matmul: the two patterns SP leaves, decomposed so transfers overlap compute.

all_gather -> matmul (column-parallel input) and matmul -> reduce_scatter (row-parallel output)
each become N ring steps over the TP group. At every step a rank multiplies one token chunk while
the next chunk (or a partial sum) travels to its neighbour with async send/recv, so only the first
(or last) transfer is exposed. The bytes each rank sends are exactly those of the plain collective:
(N - 1) chunks of [T_pad / N, features].

The steps go through the group's transport (Comm.ring_exchange): on one host shared memory, where
ring_exchange copies the outgoing chunk into a ring buffer and returns, and the neighbour copies it
out while this rank multiplies; elsewhere gloo's or NCCL's async send/recv. On CUDA, torch's
symmetric-memory fused ops do the same in kernels; a backend can provide its own pair of
functions with these signatures.

Each is counted like its plain collective (one call, the logical payload in bytes), under
"all_gather_ring" / "reduce_scatter_ring"; each rank sends (N - 1) / N of it over the ring.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from seqpar.distributed.comm import Comm

Matmul = Callable[..., torch.Tensor]
"""A layer's local matmul (`ColumnParallelLinear.matmul`): matmul(x [M, in], bias=None,
out=None) -> [M, out], written into `out` when given."""


def dense_matmul(weight: torch.Tensor) -> Matmul:
    """The local matmul of a bare dense weight [out, in] (the compiled graph's ops hold one)."""
    def matmul(x, bias=None, out=None):
        return F.linear(x, weight, bias) if out is None else torch.matmul(x, weight.t(), out=out)
    return matmul


def all_gather_matmul(comm: Comm, x: torch.Tensor, matmul: Matmul, out_features: int,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """matmul(all_gather_tokens(x), bias) with the gather hidden behind the matmuls.

    x: [S, in] this rank's token shard (S = T_pad / N); matmul: [M, in] -> [M, out_features]
    -> [N * S, out]. At step i this rank holds the shard of rank (rank - i) mod N, multiplies it
    into those rows, and meanwhile passes it on to rank + 1 and receives the next one from
    rank - 1.
    """
    n, rank = comm.world_size, comm.rank
    if n == 1:
        return matmul(x, bias)
    s = x.shape[0]
    out = x.new_empty(n * s, out_features)
    current = x.contiguous()
    for i in range(n):
        pending = None
        if i < n - 1:
            incoming = torch.empty_like(current)
            pending = comm.ring_exchange(current, incoming)
        owner = (rank - i) % n
        matmul(current, out=out[owner * s:(owner + 1) * s])
        if pending is not None:
            comm.ring_wait(pending)
            current = incoming
    comm._count("all_gather_ring", n * x.numel() * x.element_size())
    return out if bias is None else out + bias


def matmul_reduce_scatter(comm: Comm, x: torch.Tensor, matmul: Matmul,
                          padded: int) -> torch.Tensor:
    """reduce_scatter_tokens(matmul(x), padded) with the transfers hidden behind matmuls.

    x: [T, in / N] (T <= padded; rows past T are zero); matmul: [M, in / N] -> [M, out]
    -> [padded / N, out].
    At step i this rank computes its partial product for the chunk of rank (rank - i - 1) mod N,
    adds the running sum received from rank - 1 and sends it on to rank + 1; after N - 1 steps the
    sum that arrives is for its own chunk and is complete once its own part is added.
    """
    n, rank = comm.world_size, comm.rank
    if x.shape[0] < padded:
        x = F.pad(x, (0, 0, 0, padded - x.shape[0]))
    if n == 1:
        return matmul(x)
    s = padded // n
    pending = None
    for i in range(n):
        chunk = (rank - i - 1) % n
        partial = matmul(x[chunk * s:(chunk + 1) * s])  # [S, out], overlaps the transfer
        if pending is not None:
            comm.ring_wait(pending)
            partial += incoming
        if i == n - 1:
            comm._count("reduce_scatter_ring", n * partial.numel() * partial.element_size())
            return partial
        incoming = torch.empty_like(partial)
        pending = comm.ring_exchange(partial, incoming)
