"""When sequence parallelism (and collective-matmul overlap) pays: the per-step decision and the
start-up measurement behind it.

Per sublayer a TP step costs matmuls on T rows, an all-reduce of [T, H] and a residual-add + RMSNorm
over all T rows on every rank; an SP step costs the same matmuls on T_pad rows, a reduce-scatter
and an all-gather of [T_pad, H], and the token-wise pass over T_pad / N rows; SP + overlap replaces
the gather/scatter + matmul pairs by ring collective matmuls. Small steps (decode) are
latency-bound, where one all-reduce beats two collectives; large steps win by the token-wise work
saved and, with overlap, by hiding transfers. The thresholds are measured on the real group at
start-up, with this model's MLP shapes, so they hold for this machine, backend, model and dtype.
"""
from __future__ import annotations

import logging
import statistics
import time

import torch
import torch.nn.functional as F

from seqpar.config import round_up
from seqpar.distributed.comm import Comm
from seqpar.layers.norm import RMSNorm
from seqpar.layers.overlap import all_gather_matmul, dense_matmul, matmul_reduce_scatter

log = logging.getLogger("seqpar")

SWEEP = (1, 4, 16, 64, 256, 1024, 2048)
NEVER = 1 << 40  # a threshold no step reaches


def median_time(fn, reps: int = 5) -> float:
    """Median wall seconds of `reps` calls of fn, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_thresholds(comm: Comm, hidden: int, mlp_per_rank: int, dtype: torch.dtype, device,
                       with_overlap: bool, sweep=SWEEP, reps: int = 3) -> tuple[int, int, list[dict]]:
    """Time one MLP sublayer as TP, SP and (optionally) SP + overlap per token count, on all ranks.

    Returns (sp_threshold, overlap_threshold, table). sp_threshold: the smallest swept T from which
    SP or SP + overlap beats TP at every larger swept T; overlap_threshold: likewise for SP +
    overlap beating both others. NEVER where none. Decided on rank 0 and broadcast, so every rank
    holds the same numbers.
    """
    n = comm.world_size
    gen = torch.Generator(device="cpu").manual_seed(0)
    w_in = torch.randn(mlp_per_rank, hidden, generator=gen).to(device, dtype) * hidden ** -0.5
    w_out = torch.randn(hidden, mlp_per_rank, generator=gen).to(device, dtype) * mlp_per_rank ** -0.5
    norm = RMSNorm(hidden, 1e-6, dtype).to(device)
    norm.weight.data.fill_(1.0)

    table = []
    for t in sweep:
        padded = round_up(t, n)
        x = torch.randn(t, hidden, generator=gen).to(device, dtype)
        shard = torch.randn(padded // n, hidden, generator=gen).to(device, dtype)

        def tp_layer():
            y = comm.all_reduce(F.linear(F.silu(F.linear(x, w_in)), w_out))
            norm(y, x)

        def sp_layer():
            full = comm.all_gather_tokens(shard)
            y = comm.reduce_scatter_tokens(F.linear(F.silu(F.linear(full, w_in)), w_out), padded)
            norm(y, shard)

        def overlap_layer():
            h = F.silu(all_gather_matmul(comm, shard, dense_matmul(w_in), w_in.shape[0]))
            norm(matmul_reduce_scatter(comm, h, dense_matmul(w_out), padded), shard)

        row = {"tokens": t, "tp_s": median_time(tp_layer, reps),
               "sp_s": median_time(sp_layer, reps)}
        if with_overlap:
            row["overlap_s"] = median_time(overlap_layer, reps)
        table.append(row)
    comm.reset()

    def threshold(wins) -> int:
        found = NEVER
        for row in reversed(table):
            if not wins(row):
                break
            found = row["tokens"]
        return found

    ovl = lambda row: row.get("overlap_s", float("inf"))  # noqa: E731
    sp_threshold = threshold(lambda r: min(r["sp_s"], ovl(r)) < r["tp_s"])
    overlap_threshold = threshold(lambda r: ovl(r) < min(r["sp_s"], r["tp_s"]))
    decided = torch.tensor([sp_threshold, overlap_threshold], dtype=torch.int64)
    if comm.group is not None:
        torch.distributed.broadcast(decided, torch.distributed.get_global_rank(comm.group, 0),
                                    group=comm.group)
    sp_threshold, overlap_threshold = decided.tolist()
    return sp_threshold, overlap_threshold, table


class SPPolicy:
    """Decides each step's mode on rank 0. Says once, per reason, why steps run without SP.

    mode "on": every step SP (with overlap if `overlap`); "off": TP; "auto": SP from `threshold`
    tokens, and with `overlap`, SP + overlap from `overlap_threshold` tokens.
    """

    def __init__(self, mode: str, world_size: int, threshold: int | None = None,
                 overlap: bool = False, overlap_threshold: int | None = None):
        self.mode, self.world_size, self.threshold = mode, world_size, threshold
        self.overlap, self.overlap_threshold = overlap, overlap_threshold
        self._said: set[str] = set()

    def decide(self, num_tokens: int) -> tuple[bool, bool]:
        """(sequence parallel, overlap) for a step of num_tokens tokens."""
        if self.world_size == 1 or self.mode == "off":
            return False, False
        if self.mode == "on":
            return True, self.overlap
        if num_tokens < self.threshold:
            self._say("SP never paid in the start-up measurement" if self.threshold >= NEVER else
                      f"steps below {self.threshold} tokens run TP (measured threshold)")
            return False, False
        overlap = self.overlap and num_tokens >= (self.overlap_threshold or NEVER)
        if self.overlap and not overlap:
            self._say("overlap never paid in the start-up measurement"
                      if (self.overlap_threshold or NEVER) >= NEVER else
                      f"SP steps below {self.overlap_threshold} tokens run without overlap "
                      "(measured threshold)")
        return True, overlap

    def _say(self, reason: str) -> None:
        if reason not in self._said:
            self._said.add(reason)
            log.info("seqpar: %s", reason)
