"""When sequence parallelism (and collective-matmul overlap) pays: the per-step decision and the
start-up measurement behind it.

Per sublayer a TP step costs matmuls on T rows, an all-reduce of [T, H] and a residual-add + RMSNorm
over all T rows on every rank; an SP step costs the same matmuls on T_pad rows, a reduce-scatter
and an all-gather of [T_pad, H], and the token-wise pass over T_pad / N rows; SP + overlap replaces
the gather/scatter + matmul pairs by ring collective matmuls. Small steps (decode) are
latency-bound, where one all-reduce beats two collectives; large steps win by the token-wise work
saved and, with overlap, by hiding transfers. The thresholds are measured on the real group at
start-up, on this rank's own MLP sublayer (the model's modules and weights, the code a step runs),
so they hold for this machine, backend, model, dtype and weight format.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from seqpar.config import round_up
from seqpar.distributed.comm import Comm
from seqpar.layers import sp

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


@dataclass(frozen=True)
class _SublayerPlan:
    """What an MLP sublayer reads of a step (the step plan's names): a step of `num_tokens`
    tokens in the layout `sp`, `overlap`."""
    sp: bool
    overlap: bool
    num_tokens: int
    world_size: int

    @property
    def padded(self) -> int:
        return round_up(self.num_tokens, self.world_size if self.sp else 1)


# the timing table's key per layout
_KEYS = {sp.TP: "tp_s", sp.SP: "sp_s", sp.SP_OVERLAP: "overlap_s"}


def measure_thresholds(norm: nn.Module, mlp: nn.Module, comm: Comm, with_overlap: bool,
                       sweep=SWEEP, reps: int = 3) -> tuple[int, int, list[dict]]:
    """Time one MLP sublayer, `norm(mlp(x, plan), residual)` (a decoder layer's MLP block and the
    norm after it, as the model has them), as TP, SP and (optionally) SP + overlap per token count,
    on all ranks of the group together.

    Returns (sp_threshold, overlap_threshold, table). sp_threshold: the smallest swept T from which
    SP or SP + overlap beats TP at every larger swept T; overlap_threshold: likewise for SP +
    overlap beating both others. NEVER where none. Decided on rank 0 and broadcast, so every rank
    holds the same numbers. Leaves comm's counters at zero.
    """
    n = comm.world_size
    weight = norm.weight  # [H]
    gen = torch.Generator(device="cpu").manual_seed(0)
    layouts = [sp.TP, sp.SP] + ([sp.SP_OVERLAP] if with_overlap else [])
    table = []
    for t in sweep:
        row = {"tokens": t}
        for layout in layouts:
            plan = _SublayerPlan(layout.sp, layout.overlap, t, n)
            rows = plan.padded // n if plan.sp else t  # this rank's rows of the stream
            x, residual = (torch.randn(rows, weight.shape[0], generator=gen).to(weight)
                           for _ in range(2))
            row[_KEYS[layout]] = median_time(lambda: norm(mlp(x, plan), residual), reps)
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
