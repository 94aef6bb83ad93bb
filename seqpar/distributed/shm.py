"""Collectives and ring steps through shared memory, for the CPU ranks of one TP group on one host.

On gloo every collective is a round of socket messages, 0.5-1 ms on a small VM whatever its size:
most of a decode step, with two collectives per layer. Ranks on one host instead write their payload
into one shared segment and read each other's:

    segment = [header | N control lines | N bell lines | buffer 0: N slots | buffer 1: N slots
               | N ring channels: ring_slots slots each]

A control line holds the words its rank writes (rounds, ring pieces sent, ring pieces taken, a
"sleeping" flag); a bell line holds the futex word its rank sleeps on, which the peers write.

Collectives. One collective, or one chunk of a payload larger than a slot, is one round:
  1. rank r copies its payload into its slot of buffer (round % 2) (reduce_scatter: the chunks
     for its peers only);
  2. it publishes the round's number in its control line and waits until every peer has published it;
  3. it reads what it needs from every slot: all_reduce sums the N slots, reduce_scatter sums chunk r
     of each (its own chunk r straight from its input), all_gather concatenates them.
A rank writes a buffer again two rounds later, when every peer has published the round in between,
which a peer does only after reading this one: one wait per round suffices.

Sums run in rank order (slot 0 + slot 1 + ...) on every rank, so every rank gets the same bits. At
N=2 that is gloo's result exactly (a + b == b + a); at N >= 3 gloo adds in another order, and the
results differ from its in the last bits (float32: within 1e-6 relative).

Ring steps (the collective matmuls of layers/overlap.py). Rank r owns channel r, a ring buffer of
`ring_slots` slots that it fills with pieces for rank r + 1, which empties it. `ring_exchange`
copies as many pieces of the outgoing tensor as there are free slots and takes whatever pieces have
arrived, then returns: the peer copies them out while this rank runs its matmul. `wait` moves the
rest. A slot is free again once the receiver's "taken" count has passed it. With the default 4 slots
of 1 MiB a [1024, 576] float32 chunk leaves in the first call.

Waiting polls for up to SPIN_S, yielding the core between polls (at once back on an idle core; a
descheduled rank runs when ranks outnumber cores), then sleeps on a futex on the rank's bell:
a rank waiting longer takes no CPU at all. Before sleeping it raises its "sleeping" flag; a rank
that publishes (a round, a ring piece sent or taken) rings the bell of a peer only if that peer's
flag is up, so collectives whose ranks arrive together make no system call. Sleeping earlier costs a
wake-up (tens of microseconds on a VM) on every collective whose ranks arrive a little apart;
polling longer only holds a core that nothing else wants. Sleeps are cut into slices of SLICE_S:
between them the waiter checks its peers' pidfds and raises PeerGone naming a peer that exited, and
raises TimeoutError after `timeout` seconds.

Memory order. The protocol needs, on every rank, that a peer which sees a published count also
sees the payload written before it. The payload is written by torch's copy, possibly by several
OpenMP threads; the count by the main thread afterwards, with a plain store (CPython's memoryview).
On x86-64 this holds without a fence: the OpenMP region ends in a barrier, a locked instruction
on each worker thread, which makes that thread's earlier stores visible to every core before the
main thread leaves the barrier; x86 stores become visible to all cores in one global order
(multi-copy atomic), and a core's loads are not reordered with each other, so a peer that loads
the count and then the payload (its own OpenMP threads start after that load) sees the new bytes.
Likewise a receiver's loads of a slot precede its store of "taken" (x86 never moves a store ahead
of an earlier load), so a sender never overwrites bytes still being read. On ARM or POWER none of
this holds: plain stores and loads reorder, the count could become visible before the payload and a
peer would sum stale bytes; it would need a store-release for the count and a load-acquire when
reading it (and POWER, not multi-copy atomic, a full barrier), which pure Python cannot issue.
The one ordering x86 does not give for free, a store followed by a load of another word, is what
"ring only a sleeping peer" needs (publisher: store count, load flag; sleeper: store flag, load
count), so both sides put a full fence (`_fence`: a locked instruction in libc) between the two.
The stress test in tests/test_shm.py checks every sum of thousands of rounds with random delays.

The segment's file /dev/shm/seqpar-<pid of rank 0>-<random> is unlinked as soon as every rank has
mapped it: nothing is left behind whatever later happens to the processes; the memory goes with the
last mapping. A set-up killed in between leaves the file; the next set-up on this host removes files
of this user whose pid is no longer alive. (A process in another pid namespace sharing this
/dev/shm looks dead here: should its file go during its own set-up, its peers fail to map it and
that group stays on gloo, as create() says.)

Needs Linux (futex, pidfd) on x86-64 (the store order above); elsewhere `ShmGroup.create` declines
and the group stays on gloo.
"""
from __future__ import annotations

import ctypes
import glob
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
RING_SLOTS = 4     # slots per ring channel: a ring step of up to 4 MiB leaves in ring_exchange
LINE = 64          # control words one cache line apart: a rank's writes never evict a peer's word
SPIN_S = 200e-6    # poll this long before sleeping: peers that arrive close together skip the futex
SLICE_S = 0.1      # futex sleeps this long between checks for dead peers and the deadline
SEGMENT_PREFIX = "/dev/shm/seqpar-"

# Words of a control line (int64 each).
_WORDS = LINE // 8
_ROUNDS, _SENT, _TAKEN, _SLEEPING = range(4)
_BELL = LINE // 4  # int32 stride of the bell lines

_SYS_FUTEX = 202   # x86-64
_FUTEX_WAIT, _FUTEX_WAKE = 0, 1
_ONE = ctypes.c_int(1)  # the bell's only sleeper is its rank


class PeerGone(RuntimeError):
    """A peer of a shared-memory collective exited before arriving (launch.py names this class)."""


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_SLICE = _Timespec(0, int(SLICE_S * 1e9))


def _futex(addr: ctypes.c_void_p, op: int, value: ctypes.c_int, timeout=None) -> None:
    _libc.syscall(ctypes.c_long(_SYS_FUTEX), addr, ctypes.c_int(op), value, timeout, None,
                  ctypes.c_int(0))


if _libc is not None:
    # A full memory fence: glibc's spin lock takes the lock with a locked exchange, which on x86
    # drains this core's store buffer before any later load (and POSIX lists spin lock among the
    # functions that synchronize memory). About 0.3 us; see "Memory order" above.
    _FENCE_LOCK = ctypes.c_int(0)
    _libc.pthread_spin_init(ctypes.byref(_FENCE_LOCK), 0)
    _lock, _unlock, _lock_ref = _libc.pthread_spin_lock, _libc.pthread_spin_unlock, ctypes.byref(_FENCE_LOCK)

    def _fence() -> None:
        _lock(_lock_ref)
        _unlock(_lock_ref)


def segment_bytes(world_size: int, slot_bytes: int, ring_slots: int = RING_SLOTS) -> int:
    """The segment's size: header, N control and N bell lines, two buffers of N slots, N ring
    channels of ring_slots slots (module docstring)."""
    assert slot_bytes % LINE == 0, f"slot_bytes={slot_bytes} is not a multiple of {LINE}"
    return LINE * (1 + 2 * world_size) + (2 + ring_slots) * world_size * slot_bytes


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


def remove_stale_segments() -> list[str]:
    """Unlink this user's segment files whose creator, the pid in the name, is no longer alive
    (a set-up killed between creating and unlinking its file). Returns the paths removed."""
    removed = []
    for path in glob.glob(SEGMENT_PREFIX + "*"):
        pid = path[len(SEGMENT_PREFIX):].split("-")[0]
        try:
            if not pid.isdigit() or os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid), 0)  # raises ProcessLookupError once the pid is gone
        except ProcessLookupError:
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:  # another set-up removed it first
                pass
        except OSError:  # the file vanished, or the pid is alive under another user
            continue
    if removed:
        log.info("seqpar: removed %d stale shared-memory segment(s): %s", len(removed),
                 ", ".join(removed))
    return removed


class ShmGroup:
    """One rank's mapping of its TP group's segment: the group's transport (transport.py) when
    every rank is on this host."""

    name = "shm"

    @classmethod
    def create(cls, group: dist.ProcessGroup, rank: int, world_size: int,
               slot_bytes: int = SLOT_BYTES, ring_slots: int = RING_SLOTS,
               timeout: float = DATA_TIMEOUT.total_seconds()) -> ShmGroup | None:
        """Map one segment for `group`; collective: every rank of the group calls it.

        Returns None on every rank (the reason logged by rank 0) unless every rank could map rank
        0's segment and all share one pid namespace (their pids are what a waiter watches). Rank 0
        unlinks the segment's file before returning, whatever happened.
        """
        size = segment_bytes(world_size, slot_bytes, ring_slots)
        reason, path, mm = _unsupported(), None, None
        nonce = secrets.randbits(63)
        try:
            if rank == 0 and reason is None:
                remove_stale_segments()
                path = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
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
        return cls(mm, rank, world_size, slot_bytes, [pid for _, pid, _ in ranks], timeout,
                   ring_slots)

    def __init__(self, mm: mmap.mmap, rank: int, world_size: int, slot_bytes: int,
                 pids: list[int], timeout: float, ring_slots: int = RING_SLOTS):
        n = world_size
        self.rank, self.world_size, self.slot_bytes, self.ring_slots = rank, n, slot_bytes, ring_slots
        self.pids, self.timeout = pids, timeout
        self.peers = [p for p in range(n) if p != rank]
        self.next, self.prev = (rank + 1) % n, (rank - 1) % n
        self._buf = torch.frombuffer(mm, dtype=torch.uint8)
        # Word w of rank p's control line: int64 at index p * _WORDS + w.
        self._ctrl = memoryview(mm)[LINE:LINE * (1 + n)].cast("q")
        bells = LINE * (1 + n)
        # Rank p's bell: int32 at index p * _BELL, the futex it sleeps on.
        self._bells = memoryview(mm)[bells:bells + LINE * n].cast("i")
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        self._bell_addr = [ctypes.c_void_p(base + bells + p * LINE) for p in range(n)]
        self._pidfds = {os.pidfd_open(pids[p]): p for p in self.peers}
        weakref.finalize(self, _close_all, list(self._pidfds))
        self._exits = select.poll()  # a pidfd turns readable when its process exits
        for fd in self._pidfds:
            self._exits.register(fd, select.POLLIN)
        self._rounds = 0
        """Rounds this rank has published; the next one uses buffer (rounds + 1) % 2."""
        self._views: dict[torch.dtype, list[list[torch.Tensor]]] = {}
        ring = LINE * (1 + 2 * n) + 2 * n * slot_bytes
        channel = [[self._buf[ring + (c * ring_slots + j) * slot_bytes:][:slot_bytes]
                    for j in range(ring_slots)] for c in (rank, self.prev)]
        self._ring_out, self._ring_in = channel  # [ring_slots] uint8 slots each
        self._transfer: _Transfer | None = None
        """The ring exchange in flight (at most one)."""
        self._rung = 0
        self.sleeps = 0
        """Times this rank slept on its bell (futex calls, one per slice)."""
        self.wakes = 0
        """Times this rank rang a sleeping peer's bell."""

    # ---- collectives: contiguous tensors, the same shape on every rank ----------------------

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Sum x over the group into `out` (default x itself, in place). [*] -> [*]."""
        out = x if out is None else out
        src, dst = x.view(-1), out.view(-1)
        step = self.slot_bytes // x.element_size()
        for a in range(0, src.numel(), step):
            piece = src[a:a + step]
            k = piece.numel()
            slots = self._slots(x.dtype)
            slots[self.rank][:k].copy_(piece)
            self._sync("all_reduce")
            sum_into(dst[a:a + k], [s[:k] for s in slots])
        return out

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
            # [N, k]: columns a..a+k of every peer's chunk. Row r, this rank's own chunk, only it
            # would read: it is summed straight from x instead, and never copied.
            mine = slots[r][:n * k].view(n, k)
            mine[:r].copy_(rows[:r, a:a + k])
            mine[r + 1:].copy_(rows[r + 1:, a:a + k])
            self._sync("reduce_scatter")
            sum_into(flat[a:a + k], [rows[p, a:a + k] if p == r else s[r * k:(r + 1) * k]
                                     for p, s in enumerate(slots)])
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along dim 0, in rank order. [S, *] -> [N * S, *]."""
        return self._gather(x, keep=True, op="all_gather")

    def gather(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's x, in rank order, on rank 0; None on the others (which only write)."""
        full = self._gather(x, keep=self.rank == 0, op="gather")  # [N * S, *] on rank 0
        return None if full is None else list(full.chunk(self.world_size))

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

    # ---- ring steps ----------------------------------------------------------------------------

    def ring_exchange(self, send: torch.Tensor, recv: torch.Tensor) -> list:
        """Start sending `send` to rank + 1 and receiving `recv` (same bytes) from rank - 1: moves
        what fits now and returns [handle]; handle.wait() moves the rest."""
        assert self._transfer is None, "a ring exchange is still in flight on this group"
        assert recv.is_contiguous() and send.nbytes == recv.nbytes, \
            f"ring_exchange: sending {send.nbytes} bytes but receiving {recv.nbytes}"
        t = _Transfer(self, send, recv)
        self._transfer = t
        self._ring_move(t)
        return [t]

    def _ring_move(self, t: _Transfer) -> bool:
        """Move what can move without waiting: pieces of the outgoing bytes into free slots of this
        rank's channel, pieces that arrived on rank - 1's into recv. True if anything moved."""
        ctrl, size, slots = self._ctrl, self.slot_bytes, self.ring_slots
        sent, taken_next = self.rank * _WORDS + _SENT, self.next * _WORDS + _TAKEN
        taken, sent_prev = self.rank * _WORDS + _TAKEN, self.prev * _WORDS + _SENT
        moved = False
        while t.sent < t.nbytes and ctrl[sent] - ctrl[taken_next] < slots:
            piece, k = ctrl[sent], min(size, t.nbytes - t.sent)
            self._ring_out[piece % slots][:k].copy_(t.out[t.sent:t.sent + k])
            ctrl[sent] = piece + 1  # after the piece's stores (see "Memory order")
            self._notify((self.next,))
            t.sent += k
            moved = True
        while t.got < t.nbytes and ctrl[sent_prev] > ctrl[taken]:
            piece, k = ctrl[taken], min(size, t.nbytes - t.got)
            t.inc[t.got:t.got + k].copy_(self._ring_in[piece % slots][:k])
            ctrl[taken] = piece + 1  # the slot is rank - 1's again
            self._notify((self.prev,))
            t.got += k
            moved = True
        return moved

    def _ring_ready(self, t: _Transfer) -> bool:
        """Whether a piece can move: a free slot to fill, or an arrived piece to take."""
        ctrl = self._ctrl
        return ((t.sent < t.nbytes and ctrl[self.rank * _WORDS + _SENT]
                 - ctrl[self.next * _WORDS + _TAKEN] < self.ring_slots)
                or (t.got < t.nbytes and ctrl[self.prev * _WORDS + _SENT]
                    > ctrl[self.rank * _WORDS + _TAKEN]))

    def _ring_finish(self, t: _Transfer) -> None:
        while t.sent < t.nbytes or t.got < t.nbytes:
            if not self._ring_move(t):
                # Waiting on rank - 1 for a piece, else on rank + 1 for a free slot.
                peer = self.prev if t.got < t.nbytes else self.next
                self._block(lambda: self._ring_ready(t), "ring_exchange", peer)
        self._transfer = None

    # ---- rounds and waiting --------------------------------------------------------------------

    def _slots(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """The next round's N slots as 1-D `dtype` tensors of slot_bytes each."""
        if dtype not in self._views:
            size, base = self.slot_bytes, LINE * (1 + 2 * self.world_size)
            self._views[dtype] = [
                [self._buf[base + (b * self.world_size + p) * size:][:size].view(dtype)
                 for p in range(self.world_size)] for b in range(2)]
        return self._views[dtype][(self._rounds + 1) % 2]

    def _sync(self, op: str) -> None:
        """Publish this rank's slot for the next round, then wait until every peer has too."""
        now = self._rounds + 1
        ctrl = self._ctrl
        ctrl[self.rank * _WORDS + _ROUNDS] = now  # after the payload's stores ("Memory order")
        self._notify(self.peers)
        for p in self.peers:
            i = p * _WORDS + _ROUNDS
            if ctrl[i] < now:
                self._block(lambda: ctrl[i] >= now, op, p)
        self._rounds = now

    def _notify(self, peers) -> None:
        """After publishing a word: ring the bell of each of `peers` that sleeps, only those."""
        _fence()  # the word's store before the flags' loads (a sleeper fences the other way)
        for q in peers:
            if self._ctrl[q * _WORDS + _SLEEPING]:
                # A value this rank never wrote before, and no other rank writes (the low part is
                # this rank): the sleeper's futex sees a change whoever rang last.
                self._rung += 1
                self._bells[q * _BELL] = (self._rung * self.world_size + self.rank) & 0x7FFFFFFF
                _futex(self._bell_addr[q], _FUTEX_WAKE, _ONE)
                self.wakes += 1

    def _block(self, ready, op: str, peer: int) -> None:
        """Return once ready() holds (it reads words `peer` publishes): poll, then sleep."""
        spin_end = time.perf_counter() + SPIN_S
        while time.perf_counter() < spin_end:
            os.sched_yield()  # returns at once on an idle core; else lets a descheduled rank run
            if ready():
                return
        deadline = time.monotonic() + self.timeout
        flag = self.rank * _WORDS + _SLEEPING
        self._ctrl[flag] = 1
        try:
            while True:
                # The flag's store before the loads below: a publisher that missed the flag
                # published before them, so ready() sees it; one that saw it rings the bell,
                # which then differs from `seen` (the futex returns at once) or wakes the sleep.
                _fence()
                seen = self._bells[self.rank * _BELL]
                if ready():
                    return
                self._check(op, peer, deadline)
                self.sleeps += 1
                _futex(self._bell_addr[self.rank], _FUTEX_WAIT, ctypes.c_int(seen),
                       ctypes.byref(_SLICE))
        finally:
            self._ctrl[flag] = 0

    def _check(self, op: str, peer: int, deadline: float) -> None:
        """Raise if a peer exited (PeerGone) or `peer` is past the deadline (TimeoutError)."""
        gone = self._exits.poll(0)
        if gone:
            p = self._pidfds[gone[0][0]]
            raise PeerGone(f"{op} on shared memory: rank {p} (pid {self.pids[p]}) exited "
                           f"while rank {self.rank} waited for it")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{op} on shared memory: rank {peer} (pid {self.pids[peer]}) "
                               f"did not arrive within {self.timeout:g} s")


class _Transfer:
    """One ring exchange in flight: the bytes of `send` going out, of `recv` coming in."""

    def __init__(self, group: ShmGroup, send: torch.Tensor, recv: torch.Tensor):
        self.group = group
        # Copied piece by piece into the channel, so `send` may change once ring_exchange returns
        # only if it all left there; callers keep it until wait() (as with gloo's isend).
        self.out = send.contiguous().view(-1).view(torch.uint8)
        self.inc = recv.view(-1).view(torch.uint8)
        self.nbytes = recv.nbytes
        self.sent = self.got = 0
        """Bytes copied into this rank's channel / out of rank - 1's."""

    def wait(self) -> None:
        self.group._ring_finish(self)


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
