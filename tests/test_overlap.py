"""The ring collective matmuls alone, against all_gather + matmul and matmul + reduce_scatter,
on the shared-memory ring and on gloo's send/recv."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from dist_helpers import run_ranks
from seqpar.config import round_up
from seqpar.distributed.comm import Comm
from seqpar.layers.overlap import all_gather_matmul, dense_matmul, matmul_reduce_scatter

HIDDEN, OUT = 16, 12


def _ring_checks(rank: int, n: int, shm: bool) -> dict:
    comm = Comm(dist.group.WORLD, rank, n, shm=shm)
    gen = torch.Generator().manual_seed(0)
    results = {}
    for tokens in (1, n - 1, n + 1, 7, 4 * n):  # counts that n divides and that it does not
        padded = round_up(tokens, n)
        full = torch.randn(padded, HIDDEN, generator=gen)   # the gathered input, same on all ranks
        w = torch.randn(OUT, HIDDEN, generator=gen)
        bias = torch.randn(OUT, generator=gen)
        shard = full.chunk(n)[rank]                          # [padded / n, HIDDEN]
        ring = all_gather_matmul(comm, shard, dense_matmul(w), OUT, bias)
        plain = F.linear(comm.all_gather_tokens(shard), w, bias)
        # matmul -> reduce_scatter: every rank holds different partial inputs [tokens, HIDDEN].
        x = torch.randn(n, tokens, HIDDEN, generator=gen)[rank]
        ring_rs = matmul_reduce_scatter(comm, x, dense_matmul(w), padded)
        plain_rs = comm.reduce_scatter_tokens(F.linear(x, w), padded)
        results[tokens] = (ring, plain, ring_rs, plain_rs)
    comm.reset()
    all_gather_matmul(comm, shard, dense_matmul(w), OUT)
    matmul_reduce_scatter(comm, x, dense_matmul(w), padded)
    results["stats"] = comm.snapshot()
    results["shapes"] = (shard.shape, x.shape, padded)
    results["transport"] = comm.transport.name
    return results


@pytest.mark.parametrize("n, shm", [(2, True), (3, True), (2, False)])
def test_ring_collective_matmuls(n, shm):
    for rank, results in enumerate(run_ranks(_ring_checks, n, shm)):
        assert results["transport"] == ("shm" if shm else "gloo")
        for tokens in (1, n - 1, n + 1, 7, 4 * n):
            ring, plain, ring_rs, plain_rs = results[tokens]
            assert ring.shape == plain.shape
            torch.testing.assert_close(ring, plain, rtol=1e-5, atol=1e-5)
            assert ring_rs.shape == plain_rs.shape == (plain_rs.shape[0], OUT)
            torch.testing.assert_close(ring_rs, plain_rs, rtol=1e-5, atol=1e-5)
        # Counted like the plain collectives: one call each, the logical payload in bytes.
        (shard_shape, x_shape, padded) = results["shapes"]
        stats = results["stats"]
        assert stats["all_gather_ring"] == {"calls": 1, "bytes": n * shard_shape[0] * HIDDEN * 4}
        assert stats["reduce_scatter_ring"] == {"calls": 1, "bytes": padded * OUT * 4}


def test_world_size_one_is_plain_matmul():
    comm = Comm(None, 0, 1)
    x, w = torch.randn(5, HIDDEN), torch.randn(OUT, HIDDEN)
    torch.testing.assert_close(all_gather_matmul(comm, x, dense_matmul(w), OUT), F.linear(x, w))
    torch.testing.assert_close(matmul_reduce_scatter(comm, x, dense_matmul(w), 5), F.linear(x, w))
