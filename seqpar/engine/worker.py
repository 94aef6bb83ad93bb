"""One rank: its shard of the model, its KV cache, and the loop that follows rank 0's plans."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from seqpar.config import EngineConfig
from seqpar.distributed.comm import Comm
from seqpar.distributed.launch import (END_CALL, MEASURE, MEMORY_ON, MEMORY_REPORT, RESET_STATS,
                                       SHUTDOWN, STEP, ControlChannel, backend_for, init_groups)
from seqpar.engine.memory import PeakMemory
from seqpar.engine.plan import StepPlan
from seqpar.engine.policy import measure_thresholds
from seqpar.layers.attention import KVCache
from seqpar.models import MODELS


def rank_threads(cfg: EngineConfig) -> int:
    if cfg.threads_per_rank:
        return cfg.threads_per_rank
    return max(1, (os.cpu_count() or 1) // cfg.parallel.world_size)


class Worker:
    def __init__(self, cfg: EngineConfig, rank: int, init_method: str | None = None):
        world = cfg.parallel.world_size
        self.cfg = cfg
        self.device = torch.device(f"cuda:{rank % torch.cuda.device_count()}"
                                   if cfg.device == "cuda" else cfg.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        group, control = init_groups(backend_for(cfg.device), rank, world, init_method)
        self.comm = Comm(group, rank, world)
        self.channel = ControlChannel(control)
        dtype = cfg.torch_dtype
        with torch.device(self.device):
            self.model = MODELS[cfg.model.model_type](cfg.model, self.comm, dtype, cfg.max_model_len)
        self.model.load_weights(cfg.model_dir)
        self.model.eval()
        for layer in self.model.model.layers:
            attn = layer.self_attn.attn
            attn.cache = KVCache(attn.num_kv_heads, attn.head_dim, dtype, self.device,
                                 cfg.max_model_len)
        self.sp_threshold: int | None = None
        self.peak_bytes: int | None = None
        """While not None: the largest peak activation memory of the steps run since MEMORY_ON."""
        if world > 1:
            dist.barrier(group=group)  # every rank loaded: a failed load surfaces here

    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        if self.peak_bytes is None:
            return self.model(plan)
        with PeakMemory(self.device) as memory:
            out = self.model(plan)
        self.peak_bytes = max(self.peak_bytes, memory.peak)
        return out

    def report_memory(self) -> list[int] | None:
        """Gather every rank's peak since MEMORY_ON to rank 0 (a list there, None elsewhere)."""
        mine = torch.tensor([self.peak_bytes or 0], dtype=torch.int64)
        self.peak_bytes = None
        group = self.channel.group
        if group is None:
            return [int(mine)]
        parts = [torch.zeros_like(mine) for _ in range(self.comm.world_size)] if self.comm.rank == 0 else None
        dist.gather(mine, parts, dst=0, group=group)
        return None if parts is None else [int(p) for p in parts]

    def measure(self) -> tuple[int, int]:
        """Time TP / SP / SP + overlap on this group (every rank together); see engine/policy.py."""
        cfg = self.cfg
        self.sp_threshold, self.overlap_threshold, self.sp_table = measure_thresholds(
            self.comm, cfg.model.hidden_size, 2 * cfg.model.intermediate_size // self.comm.world_size,
            cfg.torch_dtype, self.device, with_overlap=cfg.parallel.overlap)
        return self.sp_threshold, self.overlap_threshold

    def follow(self) -> None:
        """Run rank 0's commands until it ends the call (torchrun) or shuts down."""
        world = self.comm.world_size
        while True:
            cmd, payload = self.channel.recv()
            if cmd == STEP:
                self.execute(StepPlan.decode(payload, world, self.device))
            elif cmd == MEASURE:
                self.measure()
            elif cmd == RESET_STATS:
                self.comm.reset()
            elif cmd == MEMORY_ON:
                self.peak_bytes = 0
            elif cmd == MEMORY_REPORT:
                self.report_memory()
            elif cmd in (END_CALL, SHUTDOWN):
                return
            else:
                raise RuntimeError(f"unknown command {cmd} from rank 0")


def follower(rank: int, cfg: EngineConfig, init_method: str) -> None:
    """Spawned rank's body: build, then follow until rank 0 shuts down."""
    torch.set_num_threads(rank_threads(cfg))
    worker = Worker(cfg, rank, init_method)
    worker.follow()  # the process then exits, closing its connections; no teardown handshake
