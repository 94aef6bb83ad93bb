"""Starting ranks and talking to them.

Two ways to run N ranks, one engine:
- spawn (the default): the user's process is rank 0, the driver; it spawns ranks 1..N-1 as daemon
  processes. A rank that raises sends its traceback to the driver and exits, which breaks the
  collectives the driver is in, so the driver raises with that rank's error. A rank whose driver
  dies ends itself (a thread watching a pidfd of the driver) and sees its sockets close.
- torchrun: every rank runs the user's script; rank 0 drives, the others follow its plans inside
  `generate` and return the same outputs.

Ranks: world = tp x pp; global rank = stage * tp + tp rank. Each stage has its own TP group;
pipeline stages talk point to point, (s, r) -> (s + 1, r).

Rank 0 sends commands to the others on a separate gloo "control" group with no practical timeout,
because followers wait there while the user's program does other things between calls. Commands
travel down a tree of point-to-point sends, never a world-wide collective: rank 0 -> the other
ranks of stage 0 and rank (1, 0); (s, r) -> (s + 1, r). So a step's plan reaches a stage together
with its activations, and rank 0 can issue the next step while later stages still run earlier ones.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import select
import socket
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Commands rank 0 sends the followers (down the command tree).
# RPC: run a Worker method on every rank (measurements, statistics, profiling).
STEP, RPC, END_CALL, SHUTDOWN = range(4)

DATA_TIMEOUT = datetime.timedelta(minutes=10)
CONTROL_TIMEOUT = datetime.timedelta(days=30)


def in_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ
                                                    and "MASTER_ADDR" in os.environ)


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


@dataclass(frozen=True)
class Topology:
    """Where one rank sits in the tp x pp grid, and its process groups."""

    rank: int
    tp_size: int
    pp_size: int
    tp_group: object = None
    """This stage's TP group (None at tp=1)."""
    control: object = None
    """World-wide gloo group for commands (None with a single rank)."""

    @property
    def stage(self) -> int:
        return self.rank // self.tp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def prev(self) -> int | None:
        """Global rank of the same TP rank one stage up (None on the first stage)."""
        return self.rank - self.tp_size if self.stage > 0 else None

    @property
    def next(self) -> int | None:
        """Global rank of the same TP rank one stage down (None on the last stage)."""
        return self.rank + self.tp_size if self.stage < self.pp_size - 1 else None

    @property
    def sampler_source(self) -> int:
        """The rank whose logits rank 0 samples: TP rank 0 of the last stage."""
        return (self.pp_size - 1) * self.tp_size

    def command_links(self) -> tuple[int | None, list[int]]:
        """(upstream, downstream ranks) of this rank in the command tree (module docstring)."""
        down = list(range(1, self.tp_size)) if self.rank == 0 else []
        if self.next is not None:
            down.append(self.next)
        if self.rank == 0:
            return None, down
        return (0 if self.stage == 0 else self.prev), down


def init_groups(backend: str, rank: int, tp_size: int, pp_size: int,
                init_method: str | None = None) -> Topology:
    """Join the world, make each stage's TP group and the control group (same order on every rank)."""
    world_size = tp_size * pp_size
    if world_size == 1:
        return Topology(rank, tp_size, pp_size)
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=DATA_TIMEOUT)
    tp_group = dist.group.WORLD if pp_size == 1 else None
    if pp_size > 1 and tp_size > 1:
        # new_group is collective over the world: every rank creates every stage's group.
        for stage in range(pp_size):
            group = dist.new_group(list(range(stage * tp_size, (stage + 1) * tp_size)))
            if stage == rank // tp_size:
                tp_group = group
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return Topology(rank, tp_size, pp_size, tp_group, control)


class Outbox:
    """Sends in flight. Each must be waited before its Work is dropped, but waiting at once would
    hold the sender until a receiver still busy with an earlier step takes it. So the sends of the
    last `depth` messages stay pending and older ones are waited: by then they have been received."""

    def __init__(self, depth: int):
        self.depth = depth
        self.pending: deque[list] = deque()

    def add(self, works: list) -> None:
        self.pending.append([w for w in works if w is not None])
        while len(self.pending) > self.depth:
            self._wait_oldest()

    def flush(self) -> None:
        while self.pending:
            self._wait_oldest()

    def _wait_oldest(self) -> None:
        for work in self.pending.popleft():
            work.wait()


class ControlChannel:
    """Rank 0's commands, a header [cmd, payload size] then an int64 payload, passed down the
    command tree on the control group. Each rank forwards a command before acting on it."""

    def __init__(self, topo: Topology):
        self.group = topo.control
        self.upstream, self.downstream = topo.command_links()
        self.outbox = Outbox(depth=topo.pp_size + 1)

    def send(self, cmd: int, payload: torch.Tensor | None = None) -> None:
        """Rank 0: start sending a command down the tree (returns before the receivers take it)."""
        if self.group is None:
            return
        n = 0 if payload is None else payload.numel()
        self._forward(torch.tensor([cmd, n], dtype=torch.int64), payload.contiguous() if n else None)

    def recv(self) -> tuple[int, torch.Tensor | None]:
        """Any other rank: wait for the next command from upstream, pass it on, return it."""
        header = torch.empty(2, dtype=torch.int64)
        dist.recv(header, self.upstream, group=self.group)
        cmd, size = header.tolist()
        payload = None
        if size:
            payload = torch.empty(size, dtype=torch.int64)
            dist.recv(payload, self.upstream, group=self.group)
        self._forward(header, payload)
        return cmd, payload

    def flush(self) -> None:
        """Wait until every command sent has been taken by its receivers."""
        self.outbox.flush()

    def _forward(self, header: torch.Tensor, payload: torch.Tensor | None) -> None:
        works = []
        for dst in self.downstream:
            works.append(dist.isend(header, dst, group=self.group))
            if payload is not None:
                works.append(dist.isend(payload, dst, group=self.group))
        if works:
            self.outbox.add(works)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """End this process when its parent process dies (a spawned rank or bench subject).

    Not PR_SET_PDEATHSIG: that fires when the *thread* that spawned us exits, so an LLM built in a
    worker thread would lose its ranks when that thread ends. A daemon thread waits on a pidfd of
    the parent instead (polls the parent pid where pidfds are missing)."""
    parent = os.getppid()

    def watch():
        try:
            fd = os.pidfd_open(parent)
        except (AttributeError, OSError):
            while os.getppid() == parent:
                time.sleep(0.5)
            os._exit(1)
        if os.getppid() == parent:  # else it died before the pidfd existed
            select.select([fd], [], [])
        os._exit(1)

    threading.Thread(target=watch, name="seqpar-parent-watch", daemon=True).start()


def _follower_main(target, args, rank: int, errors) -> None:
    """Entry point of a spawned rank: run target(rank, *args); report any exception, then exit."""
    die_with_parent()
    try:
        errors.put((rank, None))  # up: the driver may start the rendezvous
        target(rank, *args)
    except BaseException:  # report everything, even KeyboardInterrupt, so the driver can say why
        errors.put((rank, traceback.format_exc()))
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


@contextlib.contextmanager
def main_module_hidden():
    """Spawn without re-running the user's script in each process (ranks, bench subjects).

    multiprocessing's spawn re-imports __main__ in the child (so a script without an
    `if __name__ == "__main__"` guard would start LLMs recursively). The children run seqpar code
    only, so each is told nothing about __main__ while the processes start.
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


def _is_peer_loss(traceback_text: str) -> bool:
    """A rank's error that only says a peer went away (gloo's wording, or shm.py's PeerGone)."""
    return any(s in traceback_text for s in ("Connection closed by peer", "Connection reset by peer",
                                             "PeerGone"))


class Spawner:
    """Ranks 1..N-1 of one LLM, spawned from the driver, and their error reports."""

    def __init__(self, world_size: int, target, args: tuple):
        ctx = mp.get_context("spawn")
        self.errors = ctx.SimpleQueue()
        self.procs = []
        with main_module_hidden():
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

    def _dead(self, exclude: set[str] = frozenset()) -> str | None:
        for p in self.procs:
            if p.name in exclude:
                continue
            if p.exitcode is not None and p.exitcode != 0:
                how = (f"killed by signal {-p.exitcode}" if p.exitcode < 0
                       else f"exited with code {p.exitcode}")
                return f"{p.name} {how}"
        return None

    def failure(self, wait: float = 5.0) -> str | None:
        """Why the ranks broke, waiting up to `wait` s to find out; None if nothing is known.

        When one rank dies its peers fail too, with "connection closed/reset" errors of their own;
        the root cause is preferred: a rank's own exception, then a rank that died without a
        report (killed by a signal), and only then a peer's connection error.
        """
        reports: dict[int, str] = {}
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            while not self.errors.empty():
                rank, tb = self.errors.get()
                if tb is not None:
                    reports.setdefault(rank, tb)
            own = {r: tb for r, tb in reports.items() if not _is_peer_loss(tb)}
            if own:
                rank = min(own)
                return f"rank {rank} failed:\n{own[rank]}"
            silent = self._dead(exclude={f"seqpar-rank{r}" for r in reports})
            if silent:
                return silent
            wait_any([p.sentinel for p in self.procs], timeout=0.1)
        if reports:
            rank = min(reports)
            return f"rank {rank} failed:\n{reports[rank]}"
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
