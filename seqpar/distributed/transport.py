"""How one TP group's collectives travel: shared memory, gloo's sockets, or the backend's own.

`make_transport` picks one when the group's Comm is built (every rank of the group builds its Comm
at the same point, so the shared-memory set-up, a collective, is safe there):

    shm      gloo group, every rank on this host, shm=True (shm.py: a few microseconds a collective)
    gloo     gloo group otherwise: token collectives from point-to-point sends (GlooTransport)
    nccl     and any other backend: its native collectives (BackendTransport)

Every transport has the same five methods on contiguous tensors, the same shape on every rank:
all_reduce(x, out) -> out, reduce_scatter(x [R, *]) -> [R / N, *], all_gather(x [S, *]) ->
[N * S, *], gather(x) -> the N tensors in rank order on rank 0 (None elsewhere), and
ring_exchange(send, recv) -> handles to wait() on (send to rank + 1, receive from rank - 1).
Comm (comm.py) adds the padding, the world-size-1 bypass and the byte accounting.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.distributed.shm import ShmGroup, sum_into


def make_transport(group: dist.ProcessGroup | None, rank: int, world_size: int, shm: bool):
    """The transport of `group`; collective on a gloo group with shm=True (see module docstring).

    group None (a model built without ranks, e.g. for a report): the default group's collectives,
    should any run."""
    if group is not None and dist.get_backend(group) == "gloo":
        if shm and (shared := ShmGroup.create(group, rank, world_size)) is not None:
            return shared
        return GlooTransport(group, rank, world_size)
    return BackendTransport(group, rank, world_size)


def group_dst(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """The global rank of a rank inside `group` (p2p and gather take global ranks)."""
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


class BackendTransport:
    """The process group's own collectives (NCCL on CUDA)."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world_size: int):
        self.group, self.rank, self.world_size = group, rank, world_size
        self.name = dist.get_backend(group) if dist.is_initialized() else "none"

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is not None and out is not x:
            x = out.copy_(x)
        dist.all_reduce(x, group=self.group)
        return x

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(x.shape[0] // self.world_size, *x.shape[1:])
        dist.reduce_scatter_tensor(out, x, group=self.group)
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(self.world_size * x.shape[0], *x.shape[1:])
        dist.all_gather_into_tensor(out, x, group=self.group)
        return out

    def gather(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        dst = group_dst(self.group, 0)
        if self.rank == 0:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.gather(x, parts, dst=dst, group=self.group)
            return parts
        dist.gather(x, None, dst=dst, group=self.group)
        return None

    def ring_exchange(self, send: torch.Tensor, recv: torch.Tensor) -> list:
        n = self.world_size
        nxt = group_dst(self.group, (self.rank + 1) % n)
        prev = group_dst(self.group, (self.rank - 1) % n)
        return [dist.isend(send, nxt, group=self.group), dist.irecv(recv, prev, group=self.group)]


class GlooTransport(BackendTransport):
    """gloo across hosts. Its allgather and reduce_scatter are several times slower than its
    allreduce for [T, H] activations (measured: 8192x576 fp32 on 2 ranks, allgather 80 ms vs
    allreduce 16 ms); point to point is not, so the token collectives are built from that."""

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        # Each peer sends this rank its chunk: receive N - 1 chunks [R/N, *] (not a full [R, *]
        # buffer as all_to_all would) and sum into one of them.
        mine = list(x.chunk(self.world_size))
        got = [c if p == self.rank else torch.empty_like(c) for p, c in enumerate(mine)]
        self._exchange(mine, got)
        out = got[1 if self.rank == 0 else 0]  # a received buffer
        sum_into(out, got)
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_empty(self.world_size * x.shape[0], *x.shape[1:])
        chunks = out.chunk(self.world_size)
        chunks[self.rank].copy_(x)
        self._exchange([x] * self.world_size, chunks)
        return out

    def _exchange(self, sends: list[torch.Tensor], recvs: list[torch.Tensor]) -> None:
        """Point to point with every peer p at once: send sends[p], receive into recvs[p]."""
        reqs = []
        for peer in range(self.world_size):
            if peer != self.rank:
                dst = group_dst(self.group, peer)
                reqs.append(dist.isend(sends[peer], dst, group=self.group))
                reqs.append(dist.irecv(recvs[peer], dst, group=self.group))
        for req in reqs:
            req.wait()
