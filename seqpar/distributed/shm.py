"""Collectives through shared memory, for the CPU ranks of one TP group on one host.

On gloo every collective is a round of socket messages, 0.5-1 ms on a small VM whatever its size:
most of a decode step, with two collectives per layer. Ranks on one host instead write their payload
into one shared segment and read each other's:

    segment = [header | N control words, a cache line each | buffer 0: N slots | buffer 1: N slots]

One collective, or one chunk of a payload larger than a slot, is one round:
  1. rank r copies its payload into its slot of buffer (round % 2);
  2. it publishes the round's number in its control word and waits until every peer has published it;
  3. it reads what it needs from every slot: all_reduce sums the N slots, reduce_scatter sums chunk r
     of each, all_gather concatenates them.
A rank writes a buffer again two rounds later, when every peer has published the round in between,
which a peer does only after reading this one: one wait per round suffices.

Sums run in rank order (slot 0 + slot 1 + ...) on every rank, so every rank gets the same bits. At
N=2 that is gloo's result exactly (a + b == b + a); at N >= 3 gloo adds in another order, and the
results differ from its in the last bits (float32: within 1e-6 relative).

Waiting polls the peer's control word for up to SPIN_S, yielding the core between polls (at once
back on an idle core; a descheduled rank runs when ranks outnumber cores), then sleeps on a futex
on that word, which the peer wakes after publishing: a rank waiting longer takes no CPU at all.
Sleeping earlier costs a wake-up (tens of microseconds on a VM) on every collective whose ranks
arrive a little apart; polling longer only holds a core that nothing else wants. Before each
sleep, cut into slices of SLICE_S, the waiter checks its peers' pidfds and raises PeerGone naming
a peer that exited, and raises TimeoutError after `timeout` seconds.

The segment's file in /dev/shm is unlinked as soon as every rank has mapped it: nothing is left
behind whatever later happens to the processes; the memory goes with the last mapping.

The protocol relies on x86-64 store ordering (the payload's stores are visible before the control
word's) and on Linux (futex, pidfd); elsewhere `ShmGroup.create` declines and Comm stays on gloo.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import platform
import secrets
import select
import sys
import time
import weakref

import torch
import torch.distributed as dist

from seqpar.distributed.launch import DATA_TIMEOUT

log = logging.getLogger("seqpar")

SLOT_BYTES = 1 << 20
"""Payload bytes per rank and buffer; larger payloads go in several rounds. Measured in one process
(a peer always there), a [2048, 576] float32 all-reduce (4.5 MiB) takes 0.35 ms in 1 MiB rounds,
0.4 ms in 4 MiB ones, 0.5 ms in 256 KiB ones and 0.7 ms in one 16 MiB round."""
LINE = 64          # control words one cache line apart: a rank's writes never evict a peer's word
SPIN_S = 200e-6    # poll this long before sleeping: peers that arrive close together skip the futex
SLICE_S = 0.1      # futex sleeps this long between checks for dead peers and the deadline

_SYS_FUTEX = 202   # x86-64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_WAKE_ALL = ctypes.c_int(2**31 - 1)


class PeerGone(RuntimeError):
    """A peer of a shared-memory collective exited before arriving (launch.py names this class)."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_SLICE = _Timespec(0, int(SLICE_S * 1e9))


def _futex(addr: ctypes.c_void_p, op: int, value: ctypes.c_int, timeout=None) -> None:
    _libc.syscall(ctypes.c_long(_SYS_FUTEX), addr, ctypes.c_int(op), value, timeout, None,
                  ctypes.c_int(0))


def segment_bytes(world_size: int, slot_bytes: int) -> int:
    """The segment's size: header, N control words, two buffers of N slots (module docstring)."""
    assert slot_bytes % LINE == 0, f"slot_bytes={slot_bytes} is not a multiple of {LINE}"
    return LINE * (1 + world_size) + 2 * world_size * slot_bytes


def _unsupported() -> str | None:
    """Why this process cannot take part, or None."""
    if not sys.platform.startswith("linux") or platform.machine() != "x86_64":
        return f"needs Linux on x86-64, not {sys.platform} on {platform.machine()}"
    if not os.path.isdir("/dev/shm"):
        return "no /dev/shm"
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError) as e:
        return f"no pidfd_open: {e}"
    return None


class ShmGroup:
    """One rank's mapping of its TP group's segment, and the collectives on it."""

    @classmethod
    def create(cls, group: dist.ProcessGroup, rank: int, world_size: int,
               slot_bytes: int = SLOT_BYTES, timeout: float = DATA_TIMEOUT.total_seconds()
               ) -> ShmGroup | None:
        """Map one segment for `group`; collective: every rank of the group calls it.

        Returns None on every rank (the reason logged by rank 0) unless every rank could map rank
        0's segment and all share one pid namespace (their pids are what a waiter watches). Rank 0
        unlinks the segment's file before returning, whatever happened.
        """
        size = segment_bytes(world_size, slot_bytes)
        reason, path, mm = _unsupported(), None, None
        nonce = secrets.randbits(63)
        try:
            if rank == 0 and reason is None:
                path = f"/dev/shm/seqpar-{os.getpid()}-{secrets.token_hex(4)}"
                try:
                    mm = _map(path, size, create=True)
                    mm[:8] = nonce.to_bytes(8, "little")
                except OSError as e:
                    reason, path = f"cannot make a {size}-byte segment in /dev/shm: {e}", None
            box = [path, nonce]
            dist.broadcast_object_list(box, dist.get_global_rank(group, 0), group=group)
            path, nonce = box
            if rank != 0 and reason is None and path is not None:
                # A rank on another host fails here: the file is not there, or not rank 0's.
                try:
                    mm = _map(path, size, create=False)
                    if int.from_bytes(mm[:8], "little") != nonce:
                        reason = "not on rank 0's host"
                except OSError as e:
                    reason = f"cannot map rank 0's segment {path}: {e}"
            pidns = os.stat("/proc/self/ns/pid").st_ino if reason is None else None
            ranks = [None] * world_size
            dist.all_gather_object(ranks, (reason, os.getpid(), pidns), group=group)
        finally:
            if rank == 0 and path is not None:
                os.unlink(path)  # every rank has mapped it by now, or failed
        problems = [f"rank {r}: {why}" for r, (why, _, _) in enumerate(ranks) if why is not None]
        if not problems and len({ns for _, _, ns in ranks}) > 1:
            problems = ["the ranks are in different pid namespaces"]
        if problems:
            if rank == 0:
                log.info("seqpar: TP collectives on gloo, not shared memory: %s", "; ".join(problems))
            return None
        return cls(mm, rank, world_size, slot_bytes, [pid for _, pid, _ in ranks], timeout)

    def __init__(self, mm: mmap.mmap, rank: int, world_size: int, slot_bytes: int,
                 pids: list[int], timeout: float):
        self.rank, self.world_size, self.slot_bytes = rank, world_size, slot_bytes
        self.pids, self.timeout = pids, timeout
        self.peers = [p for p in range(world_size) if p != rank]
        self._buf = torch.frombuffer(mm, dtype=torch.uint8)
        # Control word of rank p: int64 at index p * LINE / 8, the number of rounds it published.
        self._ctrl = memoryview(mm)[LINE:LINE * (1 + world_size)].cast("q")
        self._stride = LINE // 8
        # The futex is the word's low half (little-endian): it changes with every round.
        words = [ctypes.c_char.from_buffer(mm, LINE * (1 + p)) for p in range(world_size)]
        self._addr = [ctypes.c_void_p(ctypes.addressof(w)) for w in words]
        self._pidfds = {os.pidfd_open(pids[p]): p for p in self.peers}
        weakref.finalize(self, _close_all, list(self._pidfds))
        self._exits = select.poll()  # a pidfd turns readable when its process exits
        for fd in self._pidfds:
            self._exits.register(fd, select.POLLIN)
        self._rounds = 0
        """Rounds this rank has published; the next one uses buffer (rounds + 1) % 2."""
        self._views: dict[torch.dtype, list[list[torch.Tensor]]] = {}

    # ---- collectives: contiguous tensors, the same shape on every rank ----------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group, in place. [*] -> [*]."""
        flat = x.view(-1)
        step = self.slot_bytes // x.element_size()
        for a in range(0, flat.numel(), step):
            piece = flat[a:a + step]
            k = piece.numel()
            slots = self._slots(x.dtype)
            slots[self.rank][:k].copy_(piece)
            self._sync("all_reduce")
            sum_into(piece, [s[:k] for s in slots])
        return x

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group and keep chunk `rank` of dim 0. [R, *] -> [R / N, *]."""
        n, r = self.world_size, self.rank
        assert x.shape[0] % n == 0, f"reduce_scatter: {x.shape[0]} rows do not split over {n} ranks"
        rows = x.view(n, -1)  # [N, m]: row p is rank p's chunk
        out = x.new_empty(x.shape[0] // n, *x.shape[1:])
        flat = out.view(-1)
        m = rows.shape[1]
        step = self.slot_bytes // x.element_size() // n
        for a in range(0, m, step):
            k = min(step, m - a)
            slots = self._slots(x.dtype)
            # [N, k]: columns a..a+k of every rank's chunk
            slots[r][:n * k].view(n, k).copy_(rows[:, a:a + k])
            self._sync("reduce_scatter")
            sum_into(flat[a:a + k], [s[r * k:(r + 1) * k] for s in slots])
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along dim 0, in rank order. [S, *] -> [N * S, *]."""
        return self._gather(x, keep=True, op="all_gather")

    def gather(self, x: torch.Tensor, dst: int) -> torch.Tensor | None:
        """all_gather's [N * S, *] on rank `dst`, None on the others (which only write)."""
        return self._gather(x, keep=self.rank == dst, op="gather")

    def _gather(self, x: torch.Tensor, keep: bool, op: str) -> torch.Tensor | None:
        n = self.world_size
        src = x.view(-1)
        m = src.numel()
        out = x.new_empty(n * x.shape[0], *x.shape[1:]) if keep else None
        step = self.slot_bytes // x.element_size()
        for a in range(0, m, step):
            k = min(step, m - a)
            slots = self._slots(x.dtype)
            slots[self.rank][:k].copy_(src[a:a + k])
            self._sync(op)
            if keep:
                grid = out.view(n, m)  # row p: rank p's x
                for p in range(n):
                    grid[p, a:a + k].copy_(slots[p][:k])
        return out

    # ---- rounds ------------------------------------------------------------------------------

    def _slots(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The next round's N slots as 1-D `dtype` tensors of slot_bytes each."""
        if dtype not in self._views:
            size, base = self.slot_bytes, LINE * (1 + self.world_size)
            self._views[dtype] = [
                [self._buf[base + (b * self.world_size + p) * size:][:size].view(dtype)
                 for p in range(self.world_size)] for b in range(2)]
        return self._views[dtype][(self._rounds + 1) % 2]

    def _sync(self, op: str) -> None:
        """Publish this rank's slot for the next round, then wait until every peer has too."""
        now = self._rounds + 1
        ctrl, stride = self._ctrl, self._stride
        ctrl[self.rank * stride] = now  # after the payload's stores (x86-64 keeps store order)
        _futex(self._addr[self.rank], _FUTEX_WAKE, _WAKE_ALL)
        for p in self.peers:
            if ctrl[p * stride] < now:
                self._wait(op, p, now)
        self._rounds = now

    def _wait(self, op: str, peer: int, now: int) -> None:
        ctrl, i = self._ctrl, peer * self._stride
        spin_end = time.perf_counter() + SPIN_S
        while ctrl[i] < now:
            if time.perf_counter() > spin_end:
                break
            os.sched_yield()  # returns at once on an idle core; else lets a descheduled rank run
        else:
            return
        deadline = time.monotonic() + self.timeout
        while (seen := ctrl[i]) < now:
            gone = self._exits.poll(0)
            if gone:
                p = self._pidfds[gone[0][0]]
                raise PeerGone(f"{op} on shared memory: rank {p} (pid {self.pids[p]}) exited "
                               f"while rank {self.rank} waited for it")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{op} on shared memory: rank {peer} (pid {self.pids[peer]}) "
                                   f"did not arrive within {self.timeout:g} s")
            # Sleeps while the word still holds `seen`; the peer wakes it after publishing.
            _futex(self._addr[peer], _FUTEX_WAIT, ctypes.c_int(seen & 0xFFFFFFFF),
                   ctypes.byref(_SLICE))


def _map(path: str, size: int, create: bool) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0), 0o600)
    try:
        if create:
            os.posix_fallocate(fd, 0, size)  # a full /dev/shm fails here, not with SIGBUS later
        return mmap.mmap(fd, size)
    except OSError:
        if create:
            os.unlink(path)
        raise
    finally:
        os.close(fd)


def sum_into(out: torch.Tensor, parts: list[torch.Tensor]) -> None:
    """out = parts[0] + parts[1] + ..., added in this order on every rank. out may be parts[0]
    or parts[1] (a + b is b + a bit for bit), not a later part."""
    torch.add(parts[0], parts[1], out=out)
    for part in parts[2:]:
        out += part


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
