"""Run a function on N spawned CPU ranks joined by a gloo process group, and collect the results.

    results = run_ranks(fn, 2, arg)   # fn(rank, world_size, arg) on each rank -> [result of rank 0, ...]

`fn` must be a module-level function (spawn pickles it by name). A rank's exception fails the
calling test with that rank's traceback; a rank that hangs (mismatched collectives) is killed
after `timeout` seconds and the test fails saying which ranks never answered.
"""
from __future__ import annotations

import multiprocessing as mp
import pickle
import queue
import socket
import time
import traceback

import pytest

TIMEOUT_S = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world_size: int, port: int, results, args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size)
        out = fn(rank, world_size, *args)
        # Plain pickle copies tensors into the bytes: nothing refers to this process's memory
        # once it exits (the queue's default tensor sharing would).
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = TIMEOUT_S) -> list:
    """fn(rank, world_size, *args) on `world_size` spawned gloo ranks -> [each rank's return value]."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, results, args), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, object] = {}
    failure = None
    deadline = time.monotonic() + timeout
    try:
        # Drain the queue before joining: a child blocks at exit until its queued data is read.
        while len(done) < world_size and failure is None:
            try:
                rank, ok, payload = results.get(timeout=min(1.0, max(0.01, deadline - time.monotonic())))
            except queue.Empty:
                # A rank exits 0 only after reporting; any other code means it died without one.
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    failure = f"rank(s) {dead} exited with code(s) {[procs[r].exitcode for r in dead]}"
                elif time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in done]
                    failure = f"rank(s) {missing} still running after {timeout:.0f} s (hang?); killed"
                continue
            if ok:
                done[rank] = pickle.loads(payload)
            else:  # the other ranks are likely stuck in a collective with it: stop here
                failure = f"rank {rank} of {world_size} raised:\n{payload}"
    finally:
        grace = 5.0 if failure is None else 0.5  # after a failure the others may be stuck
        for p in procs:
            p.join(timeout=max(0.0, min(grace, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    if failure is not None:
        codes = [p.exitcode for p in procs]  # negative: killed by that signal (-9: by us)
        pytest.fail(f"{failure}\nexit codes by rank: {codes}", pytrace=False)
    return [done[r] for r in range(world_size)]
