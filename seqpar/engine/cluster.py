"""The ranks of one LLM: rank 0's Worker in this process, the others spawned or run by torchrun.

Spawned (the default): this process is rank 0 and spawns ranks 1..N-1, which follow rank 0's
commands until it shuts them down; a rank that fails makes the next call on rank 0 raise with that
rank's error, and every rank is ended (see guard()). Under torchrun every process runs the user's
script: rank 0 drives, the others follow inside the calls that run steps (generate, serve).
"""
from __future__ import annotations

import logging
import os
import weakref

import torch
import torch.distributed as dist

from seqpar.config import EngineConfig
from seqpar.distributed.launch import (END_CALL, RPC, SHUTDOWN, STEP, Spawner, free_port,
                                       in_torchrun)
from seqpar.worker.plan import StepDelta
from seqpar.worker.model_runner import Sampled
from seqpar.worker.worker import Worker, encode_call, follower, rank_threads

log = logging.getLogger("seqpar")

SHUTDOWN_TIMEOUT_S = 10.0
"""How long ranks asked to shut down get to exit before they are terminated."""
FAILURE_WAIT_S = 5.0
"""How long rank 0 waits for a failed rank's report before raising without it."""
_LAST_WORK: list = []
"""Under torchrun: the closing barrier's Work (see Cluster.close)."""


class Cluster:
    def __init__(self, cfg: EngineConfig):
        world = cfg.parallel.world_size
        self.torchrun = world > 1 and in_torchrun()
        if self.torchrun:
            self.rank = int(os.environ["RANK"])
            if int(os.environ["WORLD_SIZE"]) != world:
                raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} ranks; "
                                 f"tensor_parallel_size x pipeline_parallel_size = {world}")
            init_method = "env://"
        else:
            if world > 1 and dist.is_initialized():
                raise RuntimeError("a torch.distributed process group is already running in this "
                                   "process (another LLM with several ranks?); close it first")
            self.rank = 0
            init_method = f"tcp://127.0.0.1:{free_port()}"
        self.following = world > 1 and not self.torchrun
        """Whether the other ranks wait for commands now: always when spawned; under torchrun only
        inside a call that runs steps."""
        self._threads = torch.get_num_threads()
        if world > 1:
            torch.set_num_threads(rank_threads(cfg))
        self.closed = False
        # Ends the ranks when the Cluster is collected or the interpreter exits without close():
        # [spawner, owns the process group, control channel], shared with the finalizer.
        self._box = [None, world > 1 and not dist.is_initialized(), None]
        weakref.finalize(self, Cluster._shutdown, self._box)
        self.spawner: Spawner | None = None
        with self.guard():
            if world > 1 and not self.torchrun:
                self.spawner = self._box[0] = Spawner(world, follower, (cfg, init_method))
                self.spawner.wait_ready()
            self.worker = Worker(cfg, self.rank, init_method)
            self.channel = self._box[2] = self.worker.channel

    def run_step(self, delta: StepDelta) -> Sampled:
        """Start one step on every rank (each applies the delta to its batch state); rank 0's
        handle to its drawn tokens."""
        if self.channel.downstream:  # one rank alone (tp = pp = 1): no message to encode
            self.channel.send(STEP, delta.encode())
        return self.worker.runner.step(delta)

    def call(self, method: str, *args):
        """Run Worker.method(*args) on every rank; rank 0's result. Under torchrun outside a call
        that runs steps, every rank calls this itself."""
        if self.following:
            self.channel.send(RPC, encode_call(method, args))
        return getattr(self.worker, method)(*args)

    def begin_call(self) -> None:
        """Under torchrun: the other ranks now follow rank 0 (they entered Worker.follow)."""
        self.following = True

    def end_call(self, outputs) -> object:
        """Under torchrun: release the followers and hand them rank 0's outputs."""
        self.channel.send(END_CALL)
        box = [outputs]
        dist.broadcast_object_list(box, 0, group=self.channel.group)
        self.channel.flush()
        self.following = False
        return box[0]

    def follow_call(self):
        """Under torchrun, ranks other than 0: follow rank 0 through one call; its outputs."""
        self.worker.follow()
        box = [None]
        dist.broadcast_object_list(box, 0, group=self.channel.group)
        return box[0]

    def flush(self) -> None:
        """Wait for every command and activation sent so far to be taken (at idle moments)."""
        self.channel.flush()
        self.worker.outbox.flush()

    def guard(self) -> "_RankGuard":
        return _RankGuard(self)

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this LLM is closed")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.torchrun:
            # Every rank calls close(); no rank tears its connections down while another still
            # uses them (gloo aborts the process when a peer vanishes mid-teardown).
            work = dist.barrier(group=self.channel.group, async_op=True)
            work.wait()
            # The barrier's Work holds the works still in flight when it was queued (the last
            # call's broadcast, whose tensors Python made). If a gloo thread dropped the last
            # reference to it, that drop would need the GIL; at interpreter exit it cannot have
            # it and the process aborts ("terminate called without an active exception"). Kept
            # here, the last reference goes with this module, on the thread that holds the GIL.
            _LAST_WORK[:] = [work]
        Cluster._shutdown(self._box)
        torch.set_num_threads(self._threads)

    def alive(self) -> bool:
        """Whether every rank is still running."""
        return not self.closed and (self.spawner is None or self.spawner.alive())

    @staticmethod
    def _shutdown(box) -> None:
        spawner, owns_group, channel = box
        if spawner is not None:
            asked = False
            if channel is not None and spawner.alive():
                try:
                    channel.send(SHUTDOWN)
                    channel.flush()  # taken by the ranks below before the group goes
                    asked = True
                except RuntimeError as e:  # a rank already gone: stop() ends the rest
                    log.debug(f"seqpar: shutdown message not delivered: {e}")
            spawner.stop(timeout=SHUTDOWN_TIMEOUT_S if asked else 0.0)
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
        box[:] = [None, False, None]


class _RankGuard:
    """On rank 0 (spawn mode): turn a collective broken by a dying rank into that rank's error,
    and end every rank."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            return False
        cluster = self.cluster
        # A ValueError is the caller's own mistake, raised before any step ran; anything else
        # on rank 0 is most likely a collective broken by another rank, which says why.
        spawner = cluster._box[0]
        reason = (None if spawner is None or isinstance(exc, ValueError)
                  else spawner.failure(FAILURE_WAIT_S))
        cluster.closed = True
        cluster._box[2] = None  # the ranks cannot be asked politely any more
        Cluster._shutdown(cluster._box)
        if reason is not None:
            raise RuntimeError(reason) from exc
        return False
