"""When sequence parallelism pays: the per-step SP decision and the start-up measurement behind it.

Per decoder layer a TP step costs 2 all-reduces of [T, H] plus 2 residual-add + RMSNorm passes over
all T rows on every rank; an SP step costs 2 reduce-scatters and 2 all-gathers of [T_pad, H] plus
those token-wise passes over T_pad / N rows. Small steps (decode) are latency-bound, where one
all-reduce beats two collectives; large steps win by the token-wise work saved. The threshold is
measured on the real group at start-up, so it holds for this machine, backend, model and dtype.
"""
from __future__ import annotations

import logging
import statistics
import time

import torch

from seqpar.distributed.comm import Comm
from seqpar.layers.norm import RMSNorm

log = logging.getLogger("seqpar")

SWEEP = (1, 4, 16, 64, 256, 1024, 4096)
NEVER = 1 << 40  # a threshold no step reaches


def measure_sp_threshold(comm: Comm, hidden: int, dtype: torch.dtype, device,
                         sweep=SWEEP, reps: int = 3) -> tuple[int, list[dict]]:
    """Time one layer's TP and SP communication + token-wise work per token count, on every rank.

    Returns (threshold, table): the smallest swept T from which SP is faster at every larger swept
    T (NEVER if none), decided on rank 0 and broadcast so every rank holds the same number.
    """
    n = comm.world_size
    norm = RMSNorm(hidden, 1e-6, dtype).to(device)
    norm.weight.data.fill_(1.0)

    def timed(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    table = []
    for t in sweep:
        padded = -(-t // n) * n
        x = torch.randn(t, hidden, dtype=dtype, device=device)
        xp = torch.randn(padded, hidden, dtype=dtype, device=device)
        shard = xp[: padded // n].clone()

        def tp_layer():
            for _ in range(2):
                y = comm.all_reduce(x.clone())
                norm(y, x)

        def sp_layer():
            for _ in range(2):
                y = comm.reduce_scatter_tokens(xp, padded)
                norm(y, shard)
                comm.all_gather_tokens(y)

        table.append({"tokens": t, "tp_s": timed(tp_layer), "sp_s": timed(sp_layer)})
    comm.reset()
    threshold = NEVER
    for row in reversed(table):
        if row["sp_s"] >= row["tp_s"]:
            break
        threshold = row["tokens"]
    decided = torch.tensor([threshold], dtype=torch.int64)
    if comm.group is not None:
        torch.distributed.broadcast(decided, torch.distributed.get_global_rank(comm.group, 0),
                                    group=comm.group)
    return int(decided.item()), table


class SPPolicy:
    """Decides each step's mode on rank 0. Says once, per reason, why steps run without SP."""

    def __init__(self, mode: str, world_size: int, threshold: int | None = None):
        self.mode, self.world_size, self.threshold = mode, world_size, threshold
        self._said: set[str] = set()

    def decide(self, num_tokens: int) -> bool:
        if self.world_size == 1:
            return False
        if self.mode == "on":
            return True
        if self.mode == "off":
            return False
        if num_tokens >= self.threshold:
            return True
        reason = ("SP never paid in the start-up measurement" if self.threshold >= NEVER else
                  f"steps below {self.threshold} tokens run TP (measured threshold)")
        self._say(reason)
        return False

    def _say(self, reason: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            log.info("seqpar: sequence parallelism off for some steps: %s", reason)
