"""One rank's process: its device and threads, its process groups and Comm, the control channel
from rank 0, and the loop that follows rank 0's commands: steps go to the model runner
(model_runner.py), diagnoses to diagnostics.py."""
from __future__ import annotations

import os
import pickle

import torch
import torch.distributed as dist

from seqpar.config import EngineConfig, round_up
from seqpar.distributed.comm import Comm
from seqpar.distributed.launch import (END_CALL, RPC, SHUTDOWN, STEP, ControlChannel, Outbox,
                                       backend_for, init_groups)
from seqpar.worker.diagnostics import Diagnostics
from seqpar.worker.memory import keep_freed_memory
from seqpar.worker.model_runner import ModelRunner
from seqpar.worker.plan import StepDelta


def rank_threads(cfg: EngineConfig) -> int:
    if cfg.threads_per_rank:
        return cfg.threads_per_rank
    return max(1, (os.cpu_count() or 1) // cfg.parallel.world_size)


def rank_device(device: str, rank: int) -> torch.device:
    """This rank's device. "cuda" means one GPU per rank of this host: LOCAL_RANK under torchrun
    (global rank mod GPU count would be wrong across nodes), the rank when spawned (one host). An
    explicit "cuda:K" is honoured for a single rank; several ranks cannot share it."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if dev.index is not None:
        if rank != 0 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"device={device!r} names one GPU, but several ranks run; pass "
                             "device='cuda' (one GPU per rank, by local rank)")
        return dev
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


class Worker:
    """The rank's process role around its ModelRunner (the model shard, KV pool and steps) and its
    Diagnostics; rank 0's Cluster calls it in-process, the other ranks run follow()."""

    def __init__(self, cfg: EngineConfig, rank: int, init_method: str | None = None):
        parallel = cfg.parallel
        self.device = rank_device(cfg.device, rank)
        if self.device.type == "cpu":
            keep_freed_memory()  # activations live in host memory (memory.py says why)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.topo = topo = init_groups(backend_for(cfg.device), rank, parallel.tensor_parallel_size,
                                       parallel.pipeline_parallel_size, init_method)
        self.comm = Comm(topo.tp_group, topo.tp_rank, topo.tp_size, shm=parallel.shm)
        self.channel = ControlChannel(topo)
        self.outbox = Outbox(depth=topo.pp_size + 1)  # activations / logits sent on
        self.runner = ModelRunner(cfg, self.comm, topo, self.outbox, self.device)
        self.diagnostics = Diagnostics(cfg, self.runner.model, self.comm, topo, self.channel.group,
                                       self.device)
        self.runner.probe = self.diagnostics.memory
        if parallel.world_size > 1:
            dist.barrier()  # every rank loaded: a failed load surfaces here

    def diagnose(self, what: str, *args):
        """Run a diagnosis (worker/diagnostics.py DIAGNOSES) on this rank: the one RPC for them."""
        return self.diagnostics.run(what, *args)

    def follow(self) -> None:
        """Run rank 0's commands until it ends the call (torchrun) or shuts down."""
        while True:
            cmd, payload = self.channel.recv()
            if cmd == STEP:
                self.runner.step(StepDelta.decode(payload))
            elif cmd == RPC:
                method, args = decode_call(payload)
                getattr(self, method)(*args)
            elif cmd in (END_CALL, SHUTDOWN):
                # The ranks below have the command (and every step's data) before this returns.
                self.channel.flush()
                self.outbox.flush()
                return
            else:
                raise RuntimeError(f"unknown command {cmd} from rank 0")


def encode_call(method: str, args: tuple) -> torch.Tensor:
    """An RPC (a Worker method and its arguments) as the int64 payload the control channel carries:
    [byte count, pickled bytes padded to 8-byte words]."""
    data = pickle.dumps((method, args))
    words = torch.zeros(round_up(len(data), 8), dtype=torch.uint8)
    words[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return torch.cat([torch.tensor([len(data)]), words.view(torch.int64)])


def decode_call(payload: torch.Tensor) -> tuple[str, tuple]:
    size = int(payload[0])
    return pickle.loads(payload[1:].view(torch.uint8)[:size].numpy().tobytes())


def follower(rank: int, cfg: EngineConfig, init_method: str) -> None:
    """Spawned rank's body: build, then follow until rank 0 shuts down."""
    torch.set_num_threads(rank_threads(cfg))
    worker = Worker(cfg, rank, init_method)
    worker.follow()  # the process then exits, closing its connections; no teardown handshake
