"""Collectives on one tensor-parallel group, named verb + dimension, each with byte accounting.

Activations are flat [tokens, hidden]. "tokens" collectives split or join along dim 0 (sequence
parallelism); "vocab" collectives join along the last dim (vocab-parallel logits). Every op has a
world-size-1 bypass, so a single rank runs the same model code with no process group at all.

Bytes are counted as the logical payload of the collective (the full [T, H] tensor for all_reduce,
reduce_scatter and all_gather alike), so TP and SP steps compare directly: SP moves the same bytes
as TP, split into two halves. The bytes are the same whichever transport carries them.

On gloo, when every rank of the group is on one host, the collectives go through a shared-memory
segment (shm.py) instead of sockets: a few microseconds each instead of 0.5-1 ms. The segment is
set up by the group's first collective (every rank reaches it together); a Comm that only ever uses
the point-to-point ops (ring_exchange, send, recv, which stay on gloo) never makes one.
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.distributed.shm import ShmGroup, sum_into


class Comm:
    """One rank's view of its tensor-parallel group."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world_size: int,
                 shm: bool = True):
        """shm: carry the collectives through shared memory where the group allows it (gloo,
        every rank on this host); False: always through the backend."""
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.stats: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        # gloo's allgather and reduce_scatter are several times slower than its allreduce for
        # [T, H] activations (measured: 8192x576 fp32 on 2 ranks, allgather 80 ms vs allreduce
        # 16 ms). Point-to-point and all_to_all are not, so on gloo the token collectives are
        # built from those; NCCL has fast native ones.
        self._p2p = group is not None and dist.get_backend(group) == "gloo"
        self._shm_pending = shm and self._p2p
        self.shm: ShmGroup | None = None
        """The group's shared-memory collectives, once set up; None: the backend's."""

    def _count(self, op: str, nbytes: int) -> None:
        entry = self.stats[op]
        entry[0] += 1
        entry[1] += nbytes

    def _shared(self) -> ShmGroup | None:
        """The shared-memory collectives, set up by the first collective that asks (every rank
        asks in the same one, DESIGN.md invariant 1); None: the backend's."""
        if self._shm_pending:
            self._shm_pending = False
            self.shm = ShmGroup.create(self.group, self.rank, self.world_size)
        return self.shm

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group, in place. [T, H] -> [T, H]."""
        if self.world_size == 1:
            return x
        if torch.compiler.is_compiling():
            return self._traced_all_reduce(x)
        self._count("all_reduce", x.numel() * x.element_size())
        if (shm := self._shared()) is not None:
            return shm.all_reduce(x)
        dist.all_reduce(x, group=self.group)
        return x

    def reduce_scatter_tokens(self, x: torch.Tensor, padded: int) -> torch.Tensor:
        """Sum x over the group and keep this rank's token shard.

        x: [T, H] partial sums with T <= padded; rows T..padded are zero-padded first.
        Returns [padded / N, H]: rows [rank * padded / N, (rank + 1) * padded / N) of the sum.
        """
        if x.shape[0] < padded:
            x = F.pad(x, (0, 0, 0, padded - x.shape[0]))
        if self.world_size == 1:
            return x
        n = self.world_size
        self._count("reduce_scatter", x.numel() * x.element_size())
        x = x.contiguous()
        if (shm := self._shared()) is not None:
            return shm.reduce_scatter(x)
        if self._p2p:
            # Each peer sends this rank its chunk: receive N - 1 chunks [padded/N, H] (not a
            # full [padded, H] buffer as all_to_all would) and sum into one of them.
            mine = list(x.chunk(n))
            got = [c if p == self.rank else torch.empty_like(c) for p, c in enumerate(mine)]
            self._exchange(mine, got)
            out = got[1 if self.rank == 0 else 0]  # a received buffer
            sum_into(out, got)
            return out
        out = x.new_empty(padded // n, *x.shape[1:])
        dist.reduce_scatter_tensor(out, x, group=self.group)
        return out

    def all_gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's token shard in rank order. [S, H] -> [N * S, H]."""
        if self.world_size == 1:
            return x
        n = self.world_size
        x = x.contiguous()
        self._count("all_gather", n * x.numel() * x.element_size())
        if (shm := self._shared()) is not None:
            return shm.all_gather(x)
        out = x.new_empty(n * x.shape[0], *x.shape[1:])
        if self._p2p:
            chunks = out.chunk(n)
            chunks[self.rank].copy_(x)
            self._exchange([x] * n, chunks)
            return out
        dist.all_gather_into_tensor(out, x, group=self.group)
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

    def gather_vocab(self, x: torch.Tensor) -> torch.Tensor | None:
        """Join vocab shards on rank 0: [S, V/N] -> [S, V] there, None on the other ranks."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        self._count("gather", x.numel() * x.element_size() * self.world_size)
        if (shm := self._shared()) is not None:
            full = shm.gather(x, dst=0)  # [N * S, V/N] on rank 0
            return None if full is None else torch.cat(full.chunk(self.world_size), dim=-1)
        if self.rank == 0:
            parts = [torch.empty_like(x) for _ in range(self.world_size)]
            dist.gather(x, parts, dst=group_dst(self.group, 0), group=self.group)
            return torch.cat(parts, dim=-1)
        dist.gather(x, None, dst=group_dst(self.group, 0), group=self.group)
        return None

    def ring_exchange(self, send: torch.Tensor, recv: torch.Tensor) -> list:
        """Start sending `send` to rank + 1 and receiving `recv` from rank - 1; returns handles."""
        n = self.world_size
        nxt, prev = group_dst(self.group, (self.rank + 1) % n), group_dst(self.group, (self.rank - 1) % n)
        return [dist.isend(send, nxt, group=self.group), dist.irecv(recv, prev, group=self.group)]

    @staticmethod
    def ring_wait(handles: list) -> None:
        for handle in handles:
            handle.wait()

    def count_ring(self, op: str, nbytes: int) -> None:
        """One ring collective (see layers/overlap.py), counted like the plain one: its logical
        payload, of which each rank sends (N - 1) / N over the ring, as a ring collective does."""
        self._count(op, nbytes)

    def send(self, x: torch.Tensor, dst: int, tag: int = 0):
        """Start sending x to global rank `dst` (a neighbouring pipeline stage) on the world group.

        Returns the Work to wait on; x stays referenced by it until then. Counted as "send".
        """
        x = x.contiguous()
        self._count("send", x.numel() * x.element_size())
        return dist.isend(x, dst, tag=tag)

    def recv(self, x: torch.Tensor, src: int, tag: int = 0):
        """Start receiving into x from global rank `src` on the world group; returns the Work."""
        self._count("recv", x.numel() * x.element_size())
        return dist.irecv(x, src, tag=tag)

    # ---- while torch.compile traces (compile/runner.py): the nodes the SP pass reads -----------
    # Layers call the collectives above and tokenwise_end, and nothing else; what the graph needs
    # (functional collectives, the fences of compile/ops.py) is emitted here. Eager steps pay one
    # is_compiling() test. The compiled steps' collectives are counted by the runner, per step.

    def _traced_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """all_reduce as a functional all_reduce (a node the SP pass can rewrite) followed by the
        fence that opens a token-wise region. [T, H] -> [T, H], a new tensor."""
        from torch.distributed import _functional_collectives as funcol

        from seqpar.compile import ops  # registers the fences

        group = self.group if self.group is not None else dist.group.WORLD
        return ops.tokenwise_begin(funcol.all_reduce(x, "sum", group))

    def tokenwise_end(self, x: torch.Tensor) -> torch.Tensor:
        """Mark a column-parallel input on a TP step (where an SP step all-gathers tokens): the
        identity, except while torch.compile traces, where it is the fence that closes a
        token-wise region for the SP pass. [T, in] -> [T, in]."""
        if self.world_size == 1 or not torch.compiler.is_compiling():
            return x
        from seqpar.compile import ops

        return ops.tokenwise_end(x)

    def snapshot(self) -> dict:
        return {op: {"calls": c, "bytes": b} for op, (c, b) in sorted(self.stats.items())}

    def reset(self) -> None:
        self.stats.clear()


def group_dst(group: dist.ProcessGroup | None, group_rank: int) -> int:
    """The global rank of a rank inside `group` (p2p and gather take global ranks)."""
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank
