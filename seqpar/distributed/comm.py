"""Collectives on one tensor-parallel group, named verb + dimension, each with byte accounting.

Activations are flat [tokens, hidden]. "tokens" collectives split or join along dim 0 (sequence
parallelism); "vocab" collectives join along the last dim (vocab-parallel logits). Every op has a
world-size-1 bypass, so a single rank runs the same model code with no process group at all.

Bytes are counted as the logical payload of the collective (the full [T, H] tensor for all_reduce,
reduce_scatter and all_gather alike), so TP and SP steps compare directly: SP moves the same bytes
as TP, split into two halves. The bytes are the same whichever transport carries them.

The transport (transport.py: shared memory when every rank of a gloo group is on this host, gloo's
sockets otherwise, NCCL on CUDA) is picked when the Comm is built, which every rank of the group
does at the same point. While torch.compile traces, the token collectives and all_reduce emit the
custom ops of ops.py, which run the same verbs on the same transport, and the fences the SP pass
reads. Every op is counted under its name in collectives.Collective.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.distributed import ops
from seqpar.distributed.collectives import Collective
from seqpar.distributed.transport import group_dst, make_transport  # noqa: F401 (group_dst: for engine/)


class Comm:
    """One rank's view of its tensor-parallel group."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int, world_size: int,
                 shm: bool = True):
        """Collective on a gloo group: picks the transport (shm: through shared memory where the
        group allows it; False: always through the backend)."""
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self.stats: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        self.transport = None if world_size == 1 else make_transport(group, rank, world_size, shm)
        """How the collectives travel (transport.py); `transport.name` says which. None at world
        size 1."""
        self.handle = ops.register(self)
        """This Comm's name in compiled graphs (ops.py), e.g. "tp0"."""

    def count(self, op: Collective, nbytes: int) -> None:
        """One call of `op` moving `nbytes` (the logical payload); for collectives built on the
        transport outside this class (the ring collective matmuls of layers/overlap.py)."""
        entry = self.stats[op.value]
        entry[0] += 1
        entry[1] += nbytes

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum x over the group: [T, H] -> [T, H], into `out` (default x itself: in place). Use
        the return value: while compiling it is a new tensor (ops.all_reduce)."""
        if self.world_size == 1:
            return x if out is None else out.copy_(x)
        if torch.compiler.is_compiling():
            return self._traced_all_reduce(x)
        self.count(Collective.ALL_REDUCE, x.numel() * x.element_size())
        return self.transport.all_reduce(x, out)

    def reduce_scatter_tokens(self, x: torch.Tensor, padded: int) -> torch.Tensor:
        """Sum x over the group and keep this rank's token shard.

        x: [T, H] partial sums with T <= padded; rows T..padded are zero-padded first.
        Returns [padded / N, H]: rows [rank * padded / N, (rank + 1) * padded / N) of the sum.
        """
        if self.world_size > 1 and torch.compiler.is_compiling():
            return ops.reduce_scatter_tokens(x, padded, self.handle)
        if x.shape[0] < padded:
            x = F.pad(x, (0, 0, 0, padded - x.shape[0]))
        if self.world_size == 1:
            return x
        self.count(Collective.REDUCE_SCATTER, x.numel() * x.element_size())
        return self.transport.reduce_scatter(x.contiguous())

    def all_gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's token shard in rank order. [S, H] -> [N * S, H]."""
        if self.world_size == 1:
            return x
        if torch.compiler.is_compiling():
            return ops.all_gather_tokens(x, self.handle)
        self.count(Collective.ALL_GATHER, self.world_size * x.numel() * x.element_size())
        return self.transport.all_gather(x.contiguous())

    def all_to_all(self, x: torch.Tensor, send_splits: list[int] | None = None,
                   recv_splits: list[int] | None = None, total_rows: int | None = None
                   ) -> torch.Tensor:
        """Send rows send_splits[p] of x (in rank order) to peer p; receive recv_splits[p] rows
        from each. [sum(send_splits), ...] -> [sum(recv_splits), ...]; without splits, N equal
        chunks each way (the shape is kept).

        Counted as the logical payload, as all_gather counts its joined tensor: every rank's
        rows together, total_rows (the caller knows it from the plan) or N x this rank's rows.
        """
        if self.world_size == 1:
            return x
        x = x.contiguous()
        rows = total_rows if total_rows is not None else self.world_size * x.shape[0]
        self.count(Collective.ALL_TO_ALL, rows * math.prod(x.shape[1:]) * x.element_size())
        out = x.new_empty(x.shape[0] if recv_splits is None else sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x, recv_splits, send_splits, group=self.group)
        return out

    def gather_vocab(self, x: torch.Tensor) -> torch.Tensor | None:
        """Join vocab shards on rank 0: [S, V/N] -> [S, V] there, None on the other ranks."""
        if self.world_size == 1:
            return x
        self.count(Collective.GATHER, x.numel() * x.element_size() * self.world_size)
        parts = self.transport.gather(x.contiguous())
        return None if parts is None else torch.cat(parts, dim=-1)

    def ring_exchange(self, send: torch.Tensor, recv: torch.Tensor) -> list:
        """Start sending `send` to rank + 1 and receiving `recv` from rank - 1; returns handles.
        Keep `send` unchanged until ring_wait (shared memory may still be copying it)."""
        return self.transport.ring_exchange(send, recv)

    @staticmethod
    def ring_wait(handles: list) -> None:
        for handle in handles:
            handle.wait()

    def send(self, x: torch.Tensor, dst: int, tag: int = 0):
        """Start sending x to global rank `dst` (a neighbouring pipeline stage) on the world group.

        Returns the Work to wait on; x stays referenced by it until then. Counted as "send".
        """
        x = x.contiguous()
        self.count(Collective.SEND, x.numel() * x.element_size())
        return dist.isend(x, dst, tag=tag)

    def recv(self, x: torch.Tensor, src: int, tag: int = 0):
        """Start receiving into x from global rank `src` on the world group; returns the Work."""
        self.count(Collective.RECV, x.numel() * x.element_size())
        return dist.irecv(x, src, tag=tag)

    # ---- while torch.compile traces (compile/runner.py): the fences the SP pass reads ----------
    # Layers call the collectives above and tokenwise_end, and nothing else; the fences of ops.py
    # around the traced collectives are emitted here. Eager steps pay one is_compiling() test.

    def _traced_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """all_reduce as the op seqpar::all_reduce (a node the SP pass can rewrite) followed by
        the fence that opens a token-wise region. [T, H] -> [T, H], a new tensor."""
        return ops.tokenwise_begin(ops.all_reduce(x, self.handle))

    def tokenwise_end(self, x: torch.Tensor) -> torch.Tensor:
        """Mark a column-parallel input on a TP step (where an SP step all-gathers tokens): the
        identity, except while torch.compile traces, where it is the fence that closes a
        token-wise region for the SP pass. [T, in] -> [T, in]."""
        if self.world_size == 1 or not torch.compiler.is_compiling():
            return x
        return ops.tokenwise_end(x)

    def snapshot(self) -> dict:
        return {op: {"calls": c, "bytes": b} for op, (c, b) in sorted(self.stats.items())}

    def reset(self) -> None:
        self.stats.clear()

