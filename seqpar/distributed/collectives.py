"""The communication ops Comm counts, one name each: Comm's byte accounting, `LLM.comm_stats()`,
the benchmark's collective timing and the server's /metrics all read this one list."""
from __future__ import annotations

from enum import Enum


class Collective(str, Enum):
    """A communication op by its name in comm_stats(). Bytes are the logical payload (comm.py):
    the whole tensor the op produces or reduces, whichever rank's share travels."""

    ALL_REDUCE = "all_reduce"
    """TP step: partial sums [T, H] summed on every rank."""
    REDUCE_SCATTER = "reduce_scatter"
    """SP step: partial sums [T_pad, H] summed, each rank keeping its T_pad / N rows."""
    ALL_GATHER = "all_gather"
    """SP step: token shards [T_pad / N, H] joined into [T_pad, H] on every rank."""
    REDUCE_SCATTER_RING = "reduce_scatter_ring"
    """SP + overlap: a matmul and the reduce-scatter after it as one ring (layers/overlap.py)."""
    ALL_GATHER_RING = "all_gather_ring"
    """SP + overlap: the all-gather before a matmul and the matmul as one ring."""
    ALL_TO_ALL = "all_to_all"
    """Expert parallelism on an SP step: rows to the experts' owners and back (layers/moe.py)."""
    GATHER = "gather"
    """Vocab shards of the sampled rows' logits [S, V / N] joined on rank 0."""
    SEND = "send"
    """Point-to-point to the next pipeline stage (or the sampled tokens to rank 0)."""
    RECV = "recv"
    """Point-to-point from the previous pipeline stage."""

    @property
    def code(self) -> int:
        """Its position in this list: how it travels in an int64 payload (time_collectives)."""
        return list(Collective).index(self)

    @classmethod
    def from_code(cls, code: int) -> "Collective":
        return list(cls)[code]
