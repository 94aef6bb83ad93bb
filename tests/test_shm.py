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
    padded = -(-T // n) * n
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
    big_padded = -(-BIG[0] // n) * n
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
    padded = -(-T // n) * n
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


def test_dead_peer_ends_the_wait():
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        group = _waiting_group(peer.pid, timeout=60)
        threading.Timer(0.3, peer.kill).start()  # dies while rank 0 waits in the all-reduce
        start = time.monotonic()
        with pytest.raises(PeerGone, match=rf"all_reduce on shared memory: rank 1 \(pid {peer.pid}\) "
                                           "exited while rank 0 waited for it"):
            group.all_reduce(torch.ones(4))
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
