"""Diagnostics of a rank, apart from the steps: collective timing (the benchmark's "communication
alone", the SP policy's start-up measurement), memory probes (the peak activation memory of the
steps run while tracking is on) and the communication counters.

Rank 0 reaches them through one RPC, Worker.diagnose(what, *args) (cluster.call("diagnose",
what, ...)): every rank runs the same diagnosis, together.
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist

from seqpar.config import EngineConfig
from seqpar.distributed.collectives import Collective
from seqpar.distributed.comm import Comm, group_dst
from seqpar.distributed.launch import Topology
from seqpar.engine.policy import measure_thresholds
from seqpar.worker.memory import PeakMemory

TIMED_COLLECTIVES = (Collective.ALL_REDUCE, Collective.REDUCE_SCATTER, Collective.ALL_GATHER,
                     Collective.GATHER)
"""The collectives time_collectives runs."""
DIAGNOSES = ("measure", "time_collectives", "memory_on", "report_memory", "report_p2p",
             "reset_stats")
"""What Diagnostics.run runs (its methods of those names)."""


class Diagnostics:
    """One rank's diagnostics: its model (stage shard), TP Comm, topology and control group."""

    def __init__(self, cfg: EngineConfig, model: torch.nn.Module, comm: Comm, topo: Topology,
                 group, device: torch.device):
        self.cfg, self.model, self.comm, self.topo = cfg, model, comm, topo
        self.group, self.device = group, device
        """group: the control channel's group (every rank), None with one rank."""
        self.sp_threshold: int | None = None
        self.overlap_threshold: int | None = None
        self.sp_table: list[dict] | None = None
        """measure()'s results, kept for inspection (policy.measure_thresholds)."""
        self.peak_bytes: int | None = None
        """While not None: the largest peak activation memory of the steps run since memory_on()."""

    def run(self, what: str, *args):
        """Run the diagnosis `what` (one of DIAGNOSES) on this rank; its result."""
        if what not in DIAGNOSES:
            raise ValueError(f"unknown diagnosis {what!r}; one of {list(DIAGNOSES)}")
        return getattr(self, what)(*args)

    def memory(self):
        """The context a step runs in: a peak probe while tracking is on (memory_on)."""
        return contextlib.nullcontext() if self.peak_bytes is None else _PeakTracker(self)

    def report_memory(self) -> list[int] | None:
        """Gather every rank's peak since memory_on() to rank 0 (a list there, None elsewhere)."""
        mine = torch.tensor([self.peak_bytes or 0], dtype=torch.int64)
        self.peak_bytes = None
        group = self.group
        if group is None:
            return [int(mine)]
        world = dist.get_world_size(group)
        parts = [torch.zeros_like(mine) for _ in range(world)] if self.topo.rank == 0 else None
        dist.gather(mine, parts, dst=0, group=group)
        return None if parts is None else [int(p) for p in parts]

    def report_p2p(self) -> torch.Tensor:
        """Sum every rank's [send calls, send bytes, recv calls, recv bytes] on rank 0 (returned
        there) and zero those counters on every rank."""
        counts = [x for op in (Collective.SEND, Collective.RECV)
                  for x in self.comm.stats.pop(op.value, (0, 0))]
        total = torch.tensor(counts, dtype=torch.int64)
        dist.reduce(total, 0, group=self.group)
        return total

    def measure(self) -> tuple[int, int]:
        """Time TP / SP / SP + overlap on this group (every rank together); see engine/policy.py."""
        layer = self.model.model.layers[0]  # this stage's first decoder layer, as a step runs it
        self.sp_threshold, self.overlap_threshold, self.sp_table = measure_thresholds(
            layer.post_attention_layernorm, layer.mlp, self.comm,
            with_overlap=self.cfg.parallel.overlap)
        return self.sp_threshold, self.overlap_threshold

    def time_collectives(self, payload: torch.Tensor) -> list[float] | None:
        """Run a list of collectives alone, back to back on stage 0's TP group with no compute
        between them, and time them (the bench's "communication alone").

        payload: int64 (Collective.code, rows, cols) per collective of TIMED_COLLECTIVES;
        [rows, cols] is its
        logical tensor as comm_stats() counts it: all_gather joins [rows / N, cols] shards, gather
        joins [rows, cols / N] vocab shards. Inputs are made before the clock starts, as a step
        has them; outputs are allocated inside, as in a step. The ranks start together (a
        barrier); the communication counters are left as they were. Other stages do nothing.

        Returns on rank 0 [wall seconds, CPU seconds all the group's processes spent (every thread:
        gloo's too)]; None on the other ranks.
        """
        comm = self.comm
        if self.topo.stage != 0 or comm.world_size == 1:
            return [0.0, 0.0] if self.topo.rank == 0 else None
        n, gen = comm.world_size, torch.Generator().manual_seed(0)
        runs = {Collective.ALL_REDUCE: comm.all_reduce, Collective.ALL_GATHER: comm.all_gather_tokens,
                Collective.REDUCE_SCATTER: lambda x: comm.reduce_scatter_tokens(x, x.shape[0]),
                Collective.GATHER: comm.gather_vocab}
        inputs, calls = {}, []
        for code, rows, cols in payload.view(-1, 3).tolist():
            op = Collective.from_code(code)
            # This rank's input: all_gather's token shard, gather's vocab shard, else the whole.
            shape = (rows // n if op is Collective.ALL_GATHER else rows,
                     cols // n if op is Collective.GATHER else cols)
            if (op, shape) not in inputs:  # one per shape (all_reduce sums into it: values only)
                inputs[op, shape] = torch.randn(shape, generator=gen).to(self.device,
                                                                         self.cfg.torch_dtype)
            calls.append((runs[op], inputs[op, shape]))
        counters = {op: list(v) for op, v in comm.stats.items()}
        dist.barrier(group=comm.group)
        wall, cpu = time.perf_counter(), time.process_time()
        for run, x in calls:
            run(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        comm.stats.clear()
        comm.stats.update(counters)
        cpu_all = torch.tensor([cpu], dtype=torch.float64, device=self.device)
        dist.reduce(cpu_all, group_dst(comm.group, 0), group=comm.group)
        return [wall, cpu_all.item()] if self.topo.rank == 0 else None

    def memory_on(self) -> None:
        """Start tracking the peak activation memory of the steps that follow."""
        self.peak_bytes = 0

    def reset_stats(self) -> None:
        self.comm.reset()


class _PeakTracker(PeakMemory):
    """PeakMemory of one step, folded into the diagnostics' running peak."""

    def __init__(self, diagnostics: Diagnostics):
        super().__init__(diagnostics.device)
        self.diagnostics = diagnostics

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.diagnostics.peak_bytes = max(self.diagnostics.peak_bytes, self.peak)
        return False
