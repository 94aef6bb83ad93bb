"""Starting ranks and talking to them.

Two ways to run N ranks, one engine:
- spawn (the default): the user's process is rank 0, the driver; it spawns ranks 1..N-1 as daemon
  processes. A rank that raises sends its traceback to the driver and exits, which breaks the
  collectives the driver is in, so the driver raises with that rank's error. A rank whose driver
  dies is killed by the kernel (PR_SET_PDEATHSIG) and sees its sockets close.
- torchrun: every rank runs the user's script; rank 0 drives, the others follow its plans inside
  `generate` and return the same outputs.

Rank 0 sends commands to the others on a separate gloo "control" group with no practical timeout,
because followers wait there while the user's program does other things between calls.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import socket
import sys
import time
import traceback
from multiprocessing.connection import wait as wait_any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Commands rank 0 broadcasts to the followers.
STEP, RESET_STATS, END_CALL, SHUTDOWN, MEASURE, MEMORY_ON, MEMORY_REPORT = range(7)

DATA_TIMEOUT = datetime.timedelta(minutes=10)
CONTROL_TIMEOUT = datetime.timedelta(days=30)


def in_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                    and "MASTER_ADDR" in os.environ)


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


class ControlChannel:
    """Rank 0 -> all: a command and an int64 payload, two broadcasts on the control group."""

    def __init__(self, group):
        self.group = group
        self.header = torch.zeros(2, dtype=torch.int64)

    def send(self, cmd: int, payload: torch.Tensor | None = None) -> None:
        if self.group is None:
            return
        self.header[0], self.header[1] = cmd, 0 if payload is None else payload.numel()
        dist.broadcast(self.header, 0, group=self.group)
        if payload is not None and payload.numel():
            dist.broadcast(payload.contiguous(), 0, group=self.group)

    def recv(self) -> tuple[int, torch.Tensor | None]:
        dist.broadcast(self.header, 0, group=self.group)
        cmd, size = self.header.tolist()
        if size == 0:
            return cmd, None
        payload = torch.empty(size, dtype=torch.int64)
        dist.broadcast(payload, 0, group=self.group)
        return cmd, payload


def init_groups(backend: str, rank: int, world_size: int, init_method: str | None = None):
    """Join the world and make the control group. Returns (data group, control group)."""
    if world_size == 1:
        return None, None
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=DATA_TIMEOUT)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return dist.group.WORLD, control


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _follower_main(target, args, rank: int, errors) -> None:
    """Entry point of a spawned rank: run target(rank, *args); report any exception, then exit."""
    _die_with_parent()
    try:
        errors.put((rank, None))  # up: the driver may start the rendezvous
        target(rank, *args)
    except BaseException:  # report everything, even KeyboardInterrupt, so the driver can say why
        errors.put((rank, traceback.format_exc()))
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


@contextlib.contextmanager
def _main_module_hidden():
    """Spawn without re-running the user's script in each rank.

    multiprocessing's spawn re-imports __main__ in the child (so a script without an
    `if __name__ == "__main__"` guard would start LLMs recursively). The ranks run seqpar code only,
    so the child is told nothing about __main__ while the processes start.
    """
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if k in main.__dict__}
    try:
        main.__dict__.pop("__file__", None)
        main.__spec__ = None
        yield
    finally:
        main.__dict__.update(saved)
        if "__spec__" not in saved:
            del main.__spec__


class Spawner:
    """Ranks 1..N-1 of one LLM, spawned from the driver, and their error reports."""

    def __init__(self, world_size: int, target, args: tuple):
        ctx = mp.get_context("spawn")
        self.errors = ctx.SimpleQueue()
        self.procs = []
        with _main_module_hidden():
            for rank in range(1, world_size):
                p = ctx.Process(target=_follower_main, args=(target, args, rank, self.errors),
                                daemon=True, name=f"seqpar-rank{rank}")
                p.start()
                self.procs.append(p)

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until every spawned rank has started, or raise as soon as one fails."""
        pending = {p.name for p in self.procs}
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{sorted(pending)} did not start within {timeout:.0f} s")
            if not self.errors.empty():
                rank, tb = self.errors.get()
                if tb is not None:
                    raise RuntimeError(f"rank {rank} failed while starting:\n{tb}")
                pending.discard(f"seqpar-rank{rank}")
                continue
            problem = self._dead()
            if problem:
                raise RuntimeError(f"{problem} while starting")
            wait_any([p.sentinel for p in self.procs], timeout=0.1)

    def _dead(self) -> str | None:
        for p in self.procs:
            if p.exitcode is not None and p.exitcode != 0:
                how = (f"killed by signal {-p.exitcode}" if p.exitcode < 0
                       else f"exited with code {p.exitcode}")
                return f"{p.name} {how}"
        return None

    def failure(self, wait: float = 5.0) -> str | None:
        """The first rank error reported, waiting up to `wait` s for one; or why a rank vanished."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            while not self.errors.empty():
                rank, tb = self.errors.get()
                if tb is not None:
                    return f"rank {rank} failed:\n{tb}"
            problem = self._dead()
            if problem and self.errors.empty():
                return problem
            wait_any([p.sentinel for p in self.procs], timeout=0.1)
        return None

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the ranks to exit, then terminate and kill whatever is left."""
        for p in self.procs:
            p.join(timeout)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2)
            if p.is_alive():
                p.kill()
                p.join()
        self.procs = []
