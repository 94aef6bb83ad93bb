"""Shared-memory collectives (seqpar/distributed/shm.py) against gloo's, and their failure modes.

The distributed checks of one world size share one spawn. Every rank builds its inputs from a seed
of its own (`_data`), so the test process rebuilds them all and computes the references: the sums
in rank order, which shared memory must match bit for bit on every rank, and gloo's results, which
it must match exactly at N=2 and to float32 rounding at N=3 (gloo adds in another order there).
"""
from __future__ import annotations

import glob
import hashlib
import mmap
import os
import random
import subprocess
import sys
import threading
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_helpers import run_ranks
from seqpar import LLM, SamplingParams
from seqpar.config import round_up
from seqpar.distributed.comm import Comm
from seqpar.distributed import shm as shm_module
from seqpar.distributed.shm import PeerGone, ShmGroup, segment_bytes

T, H = 7, 13        # tokens and hidden: neither 2 nor 3 divides T, so reduce-scatter pads
SMALL_SLOT = 128    # 32 float32: every payload of the chunked group takes several rounds
REPEATS = 3         # each of the two buffers is written again
BIG = (1000, 600)   # 2.3 MiB float32, more than one default slot


def _data(rank: int, i: int, rows: int, cols: int = H, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * i + rank)
    return torch.randn(rows, cols, generator=g).to(dtype)


def _ranked_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """parts[0] + parts[1] + ..., the order shared memory adds in."""
    out = parts[0] + parts[1]
    for part in parts[2:]:
        out = out + part
    return out


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha1(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _collectives(rank: int, n: int) -> dict:
    world = dist.group.WORLD
    shm, gloo = Comm(world, rank, n), Comm(world, rank, n, shm=False)
    chunked = ShmGroup.create(world, rank, n, slot_bytes=SMALL_SLOT)
    padded = round_up(T, n)
    out = {}
    for i in range(REPEATS):
        x, shard, logits = _data(rank, i, T), _data(rank, i, 3), _data(rank, i, 2, 5)
        out[i] = {
            "all_reduce": [shm.all_reduce(x.clone()), gloo.all_reduce(x.clone()),
                           chunked.all_reduce(x.clone())],
            "reduce_scatter": [shm.reduce_scatter_tokens(x, padded),
                               gloo.reduce_scatter_tokens(x, padded),
                               chunked.reduce_scatter(F.pad(x, (0, 0, 0, padded - T)))],
            "all_gather": [shm.all_gather_tokens(shard), gloo.all_gather_tokens(shard),
                           chunked.all_gather(shard)],
            "gather": [shm.gather_vocab(logits), gloo.gather_vocab(logits), chunked.gather(logits)],
        }
    out["uses shm"] = (shm.transport.name, gloo.transport.name) == ("shm", "gloo")
    out["segments left"] = glob.glob(f"/dev/shm/seqpar-{os.getpid()}-*")  # rank 0 made two
    out["stats"] = (shm.snapshot(), gloo.snapshot())
    out["bf16"] = shm.all_reduce(_data(rank, 9, 5, dtype=torch.bfloat16))
    big = _data(rank, 7, *BIG)
    big_padded = round_up(BIG[0], n)
    summed = shm.all_reduce(big.clone())
    out["big"] = {
        "sha": _sha(summed),
        "all_reduce": (summed - gloo.all_reduce(big.clone())).abs().max().item(),
        "reduce_scatter": (shm.reduce_scatter_tokens(big, big_padded)
                           - gloo.reduce_scatter_tokens(big, big_padded)).abs().max().item(),
        "all_gather": torch.equal(shm.all_gather_tokens(big), gloo.all_gather_tokens(big)),
    }
    # One rank that cannot take part keeps every rank on gloo (a split would hang).
    with mock.patch.object(shm_module, "_unsupported",
                           lambda: "no shared memory here" if rank == n - 1 else None):
        declined = Comm(world, rank, n)
        out["declined"] = (declined.all_reduce(_data(rank, 5, 2)), declined.transport.name)
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_shm_collectives_match_gloo(n):
    results = run_ranks(_collectives, n)
    assert all(r["uses shm"] for r in results)
    assert results[0]["segments left"] == [], "a segment file outlived its set-up"
    # gloo adds in rank order too at N=2 (a + b == b + a); at N=3 its order differs.
    exact_gloo = n == 2
    padded = round_up(T, n)
    for i in range(REPEATS):
        xs = [_data(r, i, T) for r in range(n)]
        total = _ranked_sum(xs)
        total_padded = F.pad(total, (0, 0, 0, padded - T)).chunk(n)
        gathered = torch.cat([_data(r, i, 3) for r in range(n)])
        logits = [_data(r, i, 2, 5) for r in range(n)]
        for rank, res in enumerate(results):
            case = res[i]
            for name, want in (("all_reduce", total), ("reduce_scatter", total_padded[rank])):
                shm, gloo, chunked = case[name]
                assert torch.equal(shm, want), (name, rank)
                assert torch.equal(chunked, want), (name, rank)
                if exact_gloo:
                    assert torch.equal(gloo, want), (name, rank)
                else:
                    torch.testing.assert_close(gloo, want, rtol=1e-6, atol=1e-6)
            for got in case["all_gather"]:
                assert torch.equal(got, gathered)
            shm, gloo, chunked = case["gather"]
            if rank == 0:
                assert torch.equal(shm, torch.cat(logits, dim=-1)) and torch.equal(gloo, shm)
                assert torch.equal(torch.cat(chunked, dim=-1), shm)
            else:
                assert shm is None and gloo is None and chunked is None
    for res in results:
        shm_stats, gloo_stats = res["stats"]
        assert shm_stats == gloo_stats
        assert shm_stats["reduce_scatter"] == {"calls": REPEATS, "bytes": REPEATS * padded * H * 4}
        assert torch.equal(res["bf16"], _ranked_sum([_data(r, 9, 5, dtype=torch.bfloat16)
                                                     for r in range(n)]))
        big = res["big"]
        assert big["sha"] == results[0]["big"]["sha"], "ranks disagree on a sum"
        assert big["all_gather"]
        for name in ("all_reduce", "reduce_scatter"):
            assert big[name] <= (0.0 if exact_gloo else 1e-5), (name, big[name])
        summed, group = res["declined"]
        assert group == "gloo"
        torch.testing.assert_close(summed, _ranked_sum([_data(r, 5, 2) for r in range(n)]))


def _waiting_group(peer_pid: int, timeout: float) -> ShmGroup:
    """Rank 0 of a 2-rank segment whose rank 1, process `peer_pid`, never arrives."""
    slot = 256
    segment = mmap.mmap(-1, segment_bytes(2, slot))
    return ShmGroup(segment, 0, 2, slot, [os.getpid(), peer_pid], timeout)


def _ring_step(group: ShmGroup) -> None:
    """A ring step larger than the ring's slots: it waits on rank 1 to take its pieces."""
    x = torch.ones(4 * group.slot_bytes)
    for handle in group.ring_exchange(x, torch.empty_like(x)):
        handle.wait()


@pytest.mark.parametrize("op, run", [("all_reduce", lambda g: g.all_reduce(torch.ones(4))),
                                     ("ring_exchange", _ring_step)])
def test_dead_peer_ends_the_wait(op, run):
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        group = _waiting_group(peer.pid, timeout=60)
        threading.Timer(0.3, peer.kill).start()  # dies while rank 0 waits for it
        start = time.monotonic()
        with pytest.raises(PeerGone, match=rf"{op} on shared memory: rank 1 \(pid {peer.pid}\) "
                                           "exited while rank 0 waited for it"):
            run(group)
        assert time.monotonic() - start < 3
    finally:
        peer.kill()
        peer.wait()


def test_absent_peer_times_out():
    group = _waiting_group(os.getpid(), timeout=0.3)  # a peer that lives on and never comes
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"reduce_scatter on shared memory: rank 1 \(pid \d+\) "
                                           r"did not arrive within 0.3 s"):
        group.reduce_scatter(torch.ones(4, 2))
    assert time.monotonic() - start < 3


def test_engine_same_with_and_without_shm(tiny):
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=2)
    runs = []
    for shm in (True, False):
        # sp_min_tokens=4: the prefill runs SP, decoding TP.
        with LLM(str(tiny("llama-gqa")), tensor_parallel_size=2, sp_min_tokens=4,
                 threads_per_rank=1, shm=shm) as llm:
            outs = llm.generate(prompts, params)
            runs.append(([(o.token_ids, o.logprobs) for o in outs], llm.comm_stats(),
                         llm.worker.comm.transport.name))
    (outs_on, stats_on, used_on), (outs_off, stats_off, used_off) = runs
    assert (used_on, used_off) == ("shm", "gloo")
    assert stats_on["steps"]["sp"] >= 1 and stats_on["steps"]["tp"] >= 1
    assert stats_on == stats_off
    assert outs_on == outs_off  # N=2: the same sums bit for bit, so the same logprobs


def test_shm_option_is_validated(tiny):
    with pytest.raises(ValueError, match=r"shm must be True or False, got 'yes'"):
        LLM(str(tiny("qwen2")), tensor_parallel_size=2, threads_per_rank=1, shm="yes")


# ---- stress: thousands of rounds with random per-rank delays, every result exact ---------------

STRESS_ROUNDS = 2000
STRESS_SLOT = 256          # 64 float32: most payloads take several rounds / ring pieces
# Most rounds in step; some late by less than the spin window, some by more (the peers sleep).
DELAYS = (0,) * 6 + (20e-6, 400e-6)


def _pattern(rank: int, i: int, k: int) -> torch.Tensor:
    """Rank `rank`'s payload of round i: small integers, so every sum is exact in float32 whatever
    the order, and no two rounds or ranks send the same bytes (a stale slot shows)."""
    return ((torch.arange(k) * (rank + 1) + 7 * i + 1) % 1009).float()


def _stress(rank: int, n: int, rounds: int) -> dict:
    torch.set_num_threads(2 if n == 2 else 1)  # big copies then run on OpenMP threads
    with mock.patch.object(shm_module, "remove_stale_segments",
                           wraps=shm_module.remove_stale_segments) as cleanup:
        small = ShmGroup.create(dist.group.WORLD, rank, n, slot_bytes=STRESS_SLOT, ring_slots=2)
    big = ShmGroup.create(dist.group.WORLD, rank, n)
    rng = random.Random(1000 * n + rank)  # each rank its own delays
    wrong = []
    for i in range(rounds):
        group, k = (big, 300_000) if i % 200 == 199 else (small, 1 + (i * 37) % 200)
        if (delay := rng.choice(DELAYS)):
            time.sleep(delay)
        op = ("all_reduce", "reduce_scatter", "all_gather", "gather", "ring")[i % 5]
        x = _pattern(rank, i, n * k)
        every = [_pattern(r, i, n * k) for r in range(n)]
        if op == "all_reduce":
            got, want = group.all_reduce(x), _ranked_sum(every)
        elif op == "reduce_scatter":
            got, want = group.reduce_scatter(x.view(n, k)), _ranked_sum(every).view(n, k)[rank:rank + 1]
        elif op == "all_gather":
            got, want = group.all_gather(x.view(1, -1)), torch.stack(every)
        elif op == "gather":
            parts = group.gather(x.view(1, -1))
            got, want = (None, None) if rank else (torch.cat(parts), torch.stack(every))
        else:  # a ring step with "a matmul" (a delay) between its start and its wait
            got = torch.empty_like(x)
            handles = group.ring_exchange(x, got)
            if (delay := rng.choice(DELAYS)):
                time.sleep(delay)
            for h in handles:
                h.wait()
            want = every[(rank - 1) % n]
        if got is not None and not torch.equal(got, want):
            wrong.append((i, op))
    return {"wrong": wrong, "sleeps": small.sleeps + big.sleeps, "cleanups": cleanup.call_count}


@pytest.mark.parametrize("n", [2, 3])
def test_shm_stress_random_delays(n):
    start = time.monotonic()
    results = run_ranks(_stress, n, STRESS_ROUNDS, timeout=120)
    for rank, res in enumerate(results):
        assert res["wrong"] == [], f"rank {rank}: wrong results at (round, op) {res['wrong'][:10]}"
    # The delays make ranks sleep on the futex, not only spin: both paths ran.
    assert sum(r["sleeps"] for r in results) > 0
    # Rank 0's set-up removed dead processes' files first (test_stale_segments_only_of_dead_pids
    # checks which; a file here could go to any seqpar set-up running on this host meanwhile).
    assert [r["cleanups"] for r in results] == [1] + [0] * (n - 1)
    print(f"stress n={n}: {STRESS_ROUNDS} rounds in {time.monotonic() - start:.1f} s")


def test_stale_segments_only_of_dead_pids():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{shm_module.SEGMENT_PREFIX}{dead.pid}-0000"
    alive = f"{shm_module.SEGMENT_PREFIX}{os.getpid()}-0000"
    for path in (stale, alive):
        open(path, "wb").close()
    try:
        assert stale in shm_module.remove_stale_segments()
        assert not os.path.exists(stale) and os.path.exists(alive)
    finally:
        for path in (stale, alive):
            if os.path.exists(path):
                os.unlink(path)


def test_bell_rung_only_for_a_sleeping_peer():
    group = _waiting_group(os.getpid(), timeout=1)
    bell = group._bells[1 * shm_module._BELL]
    group._notify([1])  # rank 1 is not sleeping: no futex call
    assert group.wakes == 0 and group._bells[1 * shm_module._BELL] == bell
    group._ctrl[1 * shm_module._WORDS + shm_module._SLEEPING] = 1
    group._notify([1])
    assert group.wakes == 1 and group._bells[1 * shm_module._BELL] != bell
