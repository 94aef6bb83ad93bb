"""Benchmark subjects, each in its own process(es), driven from the bench process over pipes.

Every subject (a seqpar LLM, HF transformers, PyTorch DTensor TP+SP) lives in processes of its
own, so several can stay loaded at once and the bench can interleave them run by run: only the
subject being measured works, the others wait on their pipe and take no CPU. Times are taken
inside the subject's process, around the work alone (no pipe round-trip).

    host = Host(HFSubject, world=1, threads=2, args=(model_dir,))
    seconds = host.call("prefill", ids)          # rank 0's answer
    peaks = host.call_all("memory", ids)          # every rank's answer
    host.close()
"""
from __future__ import annotations

import multiprocessing as mp
import time
import traceback

from seqpar.distributed.launch import die_with_parent, free_port, main_module_hidden

ANSWER_S = 7200.0
"""How long a subject may work on one call (a full-size prefill sweep point on 2 cores)."""
AFTER_FAILURE_S = 10.0
"""Once one rank has failed, how long its peers get to answer (they may be stuck in a collective
with it)."""
POLL_S = 0.5
CLOSE_S = 30.0
"""How long close() waits for a subject's processes to exit before killing them."""


def _serve(subject_cls, rank: int, world: int, port: int, threads: int, conn, args) -> None:
    die_with_parent()  # a subject outlives nothing: the bench's death ends it
    import torch
    torch.set_num_threads(threads)
    try:
        if world > 1:
            import torch.distributed as dist
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world)
        subject = subject_cls(rank, world, *args)
        conn.send(("ok", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        method, call_args = conn.recv()
        if method == "close":
            try:
                subject.close()
            finally:
                conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(subject, method)(*call_args)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class SubjectError(RuntimeError):
    pass


class Host:
    """`world` processes running one subject class; rank r is `subject_cls(r, world, *args)`.

    The processes are not daemonic: a seqpar LLM spawns its own ranks from inside its host.
    """

    def __init__(self, subject_cls, world: int = 1, threads: int = 1, args: tuple = (),
                 name: str = "subject"):
        self.name = name
        ctx = mp.get_context("spawn")
        port = free_port()
        self.conns, self.procs = [], []
        with main_module_hidden():
            for rank in range(world):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_serve, args=(subject_cls, rank, world, port, threads,
                                                        child, args), name=f"bench-{name}-{rank}")
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
        try:
            self._collect()  # every rank built its subject (or one says why not)
        except BaseException:
            self.kill()
            raise

    def _collect(self) -> list:
        results, errors = [], []
        for rank, conn in enumerate(self.conns):
            deadline = time.monotonic() + (AFTER_FAILURE_S if errors else ANSWER_S)
            while not conn.poll(POLL_S):
                if not self.procs[rank].is_alive() or time.monotonic() > deadline:
                    break
            if conn.poll(0):
                try:
                    status, value = conn.recv()
                except EOFError:
                    status, value = "error", "process exited"
            else:
                status, value = "error", (f"no answer (exit code {self.procs[rank].exitcode})")
            if status == "error":
                errors.append(f"{self.name} rank {rank}:\n{value}")
            results.append(value)
        if errors:
            self.kill()
            raise SubjectError("\n".join(errors))
        return results

    def call_all(self, method: str, *args) -> list:
        """Run subject.method(*args) on every rank at once; every rank's return value."""
        for conn in self.conns:
            conn.send((method, args))
        return self._collect()

    def call(self, method: str, *args):
        return self.call_all(method, *args)[0]

    def close(self, timeout: float = CLOSE_S) -> None:
        try:
            for conn in self.conns:
                conn.send(("close", ()))
            self._collect()
        except (BrokenPipeError, EOFError, SubjectError, OSError):
            pass
        for proc in self.procs:
            proc.join(timeout)
        self.kill()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
