"""The group's transport as picked by Comm, and the collectives as custom ops (distributed/ops.py):
eager, and inside torch.compile graphs, against sums of every rank's inputs rebuilt here."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_helpers import run_ranks
from seqpar.distributed import ops
from seqpar.distributed.comm import Comm

H = 5
TOKENS = (7, 9)  # neither divides by 2: reduce-scatter pads; two counts: one dynamic graph


def _data(rank: int, t: int) -> torch.Tensor:
    return torch.randn(t, H, generator=torch.Generator().manual_seed(100 * t + rank))


def _step(comm: Comm, x: torch.Tensor, padded: int):
    """A TP all_reduce, then SP's reduce_scatter -> token-wise op -> all_gather, as layers call them."""
    summed = comm.all_reduce(x * 2)                          # [T, H]
    shard = comm.reduce_scatter_tokens(x, padded) + 1        # [padded / N, H]
    return summed, shard, comm.all_gather_tokens(shard) * 3  # [padded, H]


def _ops_ranks(rank: int, n: int, compile: bool) -> dict:
    comm = Comm(dist.group.WORLD, rank, n)
    out = {"transports": (comm.transport.name, Comm(dist.group.WORLD, rank, n, shm=False).transport.name,
                          Comm(None, rank, n).transport.name)}
    for t in TOKENS:
        x = _data(rank, t)
        keep = x.clone()
        padded = -(-t // n) * n
        out["eager", t] = (torch.ops.seqpar.all_reduce(x, comm.handle),
                           torch.ops.seqpar.reduce_scatter_tokens(x, padded, comm.handle),
                           torch.ops.seqpar.all_gather_tokens(x, comm.handle))
        assert torch.equal(x, keep), "a functional op changed its input"
        # torch's own checks of a custom op: schema, fake kernel against the real one (AOT: below).
        for op, args in ((torch.ops.seqpar.all_reduce, (x, comm.handle)),
                         (torch.ops.seqpar.reduce_scatter_tokens, (x, padded, comm.handle)),
                         (torch.ops.seqpar.all_gather_tokens, (x, comm.handle))):
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    if not compile:
        return out
    comm.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append([node.target for node in gm.graph.nodes if node.op == "call_function"])
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)  # runs the fakes

    compiled = torch.compile(_step, backend=backend, fullgraph=True, dynamic=True)
    for t in TOKENS:
        out["compiled", t] = compiled(comm, _data(rank, t), -(-t // n) * n)
    out["graphs"] = [[ops.COLLECTIVES.get(target) for target in g if target in ops.COLLECTIVES]
                     for g in graphs]
    out["compiled stats"] = comm.snapshot()
    comm.reset()
    for t in TOKENS:
        _step(comm, _data(rank, t), -(-t // n) * n)
    out["eager stats"] = comm.snapshot()
    # Inductor's C++ code around the opaque ops.
    out["inductor"] = torch.compile(_step, backend="inductor", fullgraph=True)(
        comm, _data(rank, 7), -(-7 // n) * n)
    return out


def _ranked_sum(parts):
    out = parts[0] + parts[1]
    for part in parts[2:]:
        out = out + part
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_collective_ops_eager_and_compiled(n):
    """Eager at N = 2 and 3; compiled (aot_eager with dynamic shapes, and Inductor) at N = 2."""
    compile = n == 2
    results = run_ranks(_ops_ranks, n, compile, timeout=240)
    for rank, res in enumerate(results):
        # Picked at construction: shared memory, gloo when told, the default group's without one.
        assert res["transports"] == ("shm", "gloo", "gloo")
        for t in TOKENS:
            padded = -(-t // n) * n
            xs = [_data(r, t) for r in range(n)]
            total = _ranked_sum(xs)
            shard = F.pad(total, (0, 0, 0, padded - t)).chunk(n)[rank]
            all_reduce, reduce_scatter, all_gather = res["eager", t]
            assert torch.equal(all_reduce, total)
            assert torch.equal(reduce_scatter, shard)
            assert torch.equal(all_gather, torch.cat(xs))
            want = (_ranked_sum([2 * x for x in xs]), shard + 1,
                    3 * torch.cat([F.pad(_ranked_sum(xs), (0, 0, 0, padded - t)).chunk(n)[r] + 1
                                   for r in range(n)]))
            if not compile:
                continue
            for got, expected in zip(res["compiled", t], want):
                assert torch.equal(got, expected), (rank, t)
            if t == 7:
                for got, expected in zip(res["inductor"], want):
                    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
        if not compile:
            continue
        # One graph for both token counts, each collective a seqpar op in it.
        assert res["graphs"] == [["all_reduce", "reduce_scatter", "all_gather"]]
        # Counted when the ops run, exactly as the eager verbs count.
        assert res["compiled stats"] == res["eager stats"]
        assert res["eager stats"]["all_reduce"]["calls"] == len(TOKENS)


def test_world_size_one_has_no_transport():
    single = Comm(None, 0, 1)
    assert single.transport is None
    x = torch.randn(3, H)
    assert single.all_reduce(x) is x  # the bypass


def test_handles_name_live_comms_only():
    a, b = Comm(None, 0, 1), Comm(None, 0, 1)
    assert a.handle != b.handle and ops.comm_of(a.handle) is a
    gone = b.handle
    del b
    with pytest.raises(KeyError, match=rf"no live Comm has handle '{gone}'"):
        ops.comm_of(gone)
    assert Comm(None, 0, 1).handle == gone  # the smallest free id: stable across runs
