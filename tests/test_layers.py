"""Each parallel primitive against its unsharded reference, one at a time.

Distributed checks run on spawned gloo CPU ranks, world sizes 2 and 3: every rank builds the same
full weights from a fixed seed, loads its shard through the parameters' weight_loader, runs a TP
step and an SP step, and hands its shards and outputs back; the asserts compare them with slices
of the full weights and of plain F.linear / F.embedding outputs here in the test process. All
distributed checks of one world size share one spawn (a process group costs seconds).

Token-wise layers (RMSNorm, rotary) and the step plan need no ranks and run in-process.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from dist_helpers import run_ranks
from seqpar.config import round_up
from seqpar.distributed.comm import Comm
from seqpar.worker.plan import StepPlan
from seqpar.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from seqpar.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                  QKVParallelLinear, RowParallelLinear)
from seqpar.layers.norm import RMSNorm
from seqpar.layers.rotary import RotaryEmbedding

WORLD_SIZES = (2, 3)
T = 7           # tokens per step: neither 2 nor 3 divides it, so SP steps pad
H = 12          # hidden size
D = 4           # head dim
INTER = 24      # column out / row in features
MERGED = [12, 18]
VOCAB = 1001    # neither 2 nor 3 divides it
S = 3           # rows fed to the LM head


def _qkv_configs(n: int) -> list[tuple[int, int]]:
    """(query heads, KV heads): KV heads split over ranks, and one KV head replicated on all."""
    return [(2 * n, n), (2 * n, 1)]


def _case(n: int) -> dict:
    """Full (unsharded) weights and inputs, identical in every rank and in the test process."""
    g = torch.Generator().manual_seed(1000 + n)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    per_rank = round_up(VOCAB, n) // n
    # Token ids on both sides of every rank's vocab boundary, plus the first and last id.
    edges = sorted({0, VOCAB - 1} | {b for k in range(1, n) for b in (k * per_rank - 1, k * per_rank)})
    ids = edges + torch.randint(0, VOCAB, (T - len(edges),), generator=g).tolist()
    case = {
        "parts": r(n, T, H), "shards": r(n, 3, H), "vparts": r(n, 2, 5),
        "x": r(T, H), "x_row": r(T, INTER), "x_head": r(S, H),
        "ids": torch.tensor(ids)[torch.randperm(T, generator=g)],
        "col_w": r(INTER, H), "col_b": r(INTER),
        "gate_w": r(MERGED[0], H), "up_w": r(MERGED[1], H),
        "row_w": r(H, INTER), "row_b": r(H),
        "emb_w": r(VOCAB, H), "head_w": r(VOCAB, H),
    }
    for heads, kv in _qkv_configs(n):
        case[heads, kv] = {"q": (r(heads * D, H), r(heads * D)), "k": (r(kv * D, H), r(kv * D)),
                           "v": (r(kv * D, H), r(kv * D))}
    return case


def _plans(ids: torch.Tensor, n: int) -> tuple[StepPlan, StepPlan]:
    """(TP plan, SP plan) for one sequence of len(ids) prefill tokens."""
    tables = [list(range(round_up(len(ids), 16) // 16))]
    make = lambda sp: StepPlan(sp=sp, token_ids=ids, starts=[0], lens=[len(ids)],  # noqa: E731
                               logit_rows=[1], block_tables=tables, world_size=n)
    return make(False), make(True)


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    return F.pad(x, (0, 0, 0, rows - x.shape[0]))


def _token_shard(x: torch.Tensor, plan: StepPlan, rank: int) -> torch.Tensor:
    """This rank's rows of x zero-padded to T_pad: [T_pad / N, ...]."""
    return _pad(x, plan.padded).chunk(plan.world_size)[rank]


def _rank_checks(rank: int, n: int) -> dict:
    """Runs on every rank: the shards it loaded and the outputs it computed."""
    c = _case(n)
    comm = Comm(dist.group.WORLD, rank, n)
    tp, sp = _plans(c["ids"], n)
    out = {}

    # Collectives, then their accounting.
    comm.reset()
    out["reduce_scatter"] = comm.reduce_scatter_tokens(c["parts"][rank].clone(), sp.padded)
    out["reduce_scatter_even"] = comm.reduce_scatter_tokens(c["parts"][rank, :2 * n].clone(), 2 * n)
    out["all_gather"] = comm.all_gather_tokens(c["shards"][rank])
    out["gather_vocab"] = comm.gather_vocab(c["vparts"][rank])
    out["all_reduce"] = comm.all_reduce(c["parts"][rank].clone())
    out["stats"] = comm.snapshot()
    comm.reset()
    out["stats_after_reset"] = comm.snapshot()

    x_sp = _token_shard(c["x"], sp, rank)  # [T_pad / N, H]

    col = ColumnParallelLinear(H, INTER, comm, bias=True)
    col.weight.weight_loader(col.weight, c["col_w"], None)
    col.bias.weight_loader(col.bias, c["col_b"], None)
    out["col"] = (col.weight.clone(), col.bias.clone(), col(c["x"], tp), col(x_sp, sp))

    merged = MergedColumnParallelLinear(H, MERGED, comm)
    merged.weight.weight_loader(merged.weight, c["gate_w"], 0)
    merged.weight.weight_loader(merged.weight, c["up_w"], 1)
    out["merged"] = (merged.weight.clone(), merged(c["x"], tp), merged(x_sp, sp))

    for heads, kv in _qkv_configs(n):
        qkv = QKVParallelLinear(H, D, heads, kv, comm, bias=True)
        for shard_id, (w, b) in c[heads, kv].items():
            qkv.weight.weight_loader(qkv.weight, w, shard_id)
            qkv.bias.weight_loader(qkv.bias, b, shard_id)
        out[heads, kv] = (qkv.weight.clone(), qkv.bias.clone(), qkv(c["x"], tp), qkv(x_sp, sp))

    row = RowParallelLinear(INTER, H, comm, bias=True)
    row.weight.weight_loader(row.weight, c["row_w"], None)
    row.bias.weight_loader(row.bias, c["row_b"], None)
    x_row = c["x_row"].chunk(n, dim=1)[rank]  # [T, INTER / N]: this rank's input features
    out["row"] = (row.weight.clone(), row.bias.clone(), row(x_row, tp), row(x_row, sp))
    # Column then row, as in an MLP: TP [T, H] -> [T, H]; SP [T_pad / N, H] -> [T_pad / N, H].
    out["col_row"] = (row(col(c["x"], tp), tp), row(col(x_sp, sp), sp))

    emb = VocabParallelEmbedding(VOCAB, H, comm)
    emb.weight.weight_loader(emb.weight, c["emb_w"], None)
    out["emb"] = (emb.weight.clone(), emb(c["ids"], tp), emb(c["ids"], sp))

    head = ParallelLMHead(VOCAB, H, comm)
    head.weight.weight_loader(head.weight, c["head_w"], None)
    tied = ParallelLMHead(VOCAB, H, comm, tied_to=emb)
    out["head"] = (head.weight.clone(), head(c["x_head"], sp), tied(c["x_head"], tp))
    return out


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda n: f"N={n}")
def ranks(request):
    """(N, full case, [per-rank results]) — one spawn per world size for the whole module."""
    n = request.param
    return n, _case(n), run_ranks(_rank_checks, n)


def _rows(t: torch.Tensor, rank: int, n: int, dim: int = 0) -> torch.Tensor:
    """Rank's contiguous 1/N of t along dim (the plain reference slicing)."""
    size = t.shape[dim] // n
    return t.narrow(dim, rank * size, size)


# --- Comm -----------------------------------------------------------------------------------------

def test_comm_collectives(ranks):
    n, c, res = ranks
    total = c["parts"].sum(0)                                   # [T, H]
    t_pad = round_up(T, n)
    for rank, out in enumerate(res):
        assert out["reduce_scatter"].shape == (t_pad // n, H)
        assert_close(out["reduce_scatter"], _rows(_pad(total, t_pad), rank, n))
        assert_close(out["reduce_scatter_even"], _rows(c["parts"][:, :2 * n].sum(0), rank, n))
        assert_close(out["all_gather"], torch.cat(list(c["shards"])))
        assert_close(out["all_reduce"], total)
        if rank == 0:
            assert_close(out["gather_vocab"], torch.cat(list(c["vparts"]), dim=-1))
        else:
            assert out["gather_vocab"] is None
    # Pad rows (all on the last rank here) come back zero.
    last = res[-1]["reduce_scatter"]
    assert (last[T - (n - 1) * (t_pad // n):] == 0).all() and t_pad > T


def test_comm_stats(ranks):
    """Calls, and bytes of the logical full tensor, per collective (the module docstring)."""
    n, _, res = ranks
    t_pad, f32 = round_up(T, n), 4
    expected = {
        "all_reduce": {"calls": 1, "bytes": T * H * f32},
        "reduce_scatter": {"calls": 2, "bytes": (t_pad + 2 * n) * H * f32},
        "all_gather": {"calls": 1, "bytes": n * 3 * H * f32},
        "gather": {"calls": 1, "bytes": 2 * 5 * n * f32},
    }
    for out in res:
        assert out["stats"] == expected
        assert out["stats_after_reset"] == {}


def test_comm_world_size_one_bypass():
    comm = Comm(None, 0, 1)
    x = torch.randn(5, H)
    assert comm.all_reduce(x) is x
    assert comm.all_gather_tokens(x) is x
    assert comm.gather_vocab(x) is x
    assert comm.reduce_scatter_tokens(x, 5) is x
    assert comm.snapshot() == {}
    # A single rank runs the layers with no process group at all.
    tp, sp = _plans(torch.arange(5), 1)
    col, row = ColumnParallelLinear(H, INTER, comm), RowParallelLinear(INTER, H, comm)
    torch.nn.init.normal_(col.weight), torch.nn.init.normal_(row.weight)
    for plan in (tp, sp):
        assert_close(row(col(x, plan), plan), F.linear(F.linear(x, col.weight), row.weight))
    assert comm.snapshot() == {}


# --- Linear layers --------------------------------------------------------------------------------

def test_column_parallel_linear(ranks):
    n, c, res = ranks
    _, sp = _plans(c["ids"], n)
    full_tp = F.linear(c["x"], c["col_w"], c["col_b"])                     # [T, INTER]
    full_sp = F.linear(_pad(c["x"], sp.padded), c["col_w"], c["col_b"])   # [T_pad, INTER]
    for rank, out in enumerate(res):
        w, b, y_tp, y_sp = out["col"]
        assert_close(w, _rows(c["col_w"], rank, n))
        assert_close(b, _rows(c["col_b"], rank, n))
        assert_close(y_tp, _rows(full_tp, rank, n, dim=1))
        assert_close(y_sp, _rows(full_sp, rank, n, dim=1))


def test_merged_column_parallel_linear(ranks):
    """Rank r holds [gate rows of r; up rows of r], so silu(gate) * up stays rank-local."""
    n, c, res = ranks
    _, sp = _plans(c["ids"], n)
    for rank, out in enumerate(res):
        w, y_tp, y_sp = out["merged"]
        w_ref = torch.cat([_rows(c["gate_w"], rank, n), _rows(c["up_w"], rank, n)])
        assert_close(w, w_ref)
        for x, y in ((c["x"], y_tp), (_pad(c["x"], sp.padded), y_sp)):
            gate, up = F.linear(x, c["gate_w"]), F.linear(x, c["up_w"])
            assert_close(y, torch.cat([_rows(gate, rank, n, 1), _rows(up, rank, n, 1)], dim=1))


def _head_rows(heads: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(h * D, (h + 1) * D) for h in heads])


@pytest.mark.parametrize("config", [0, 1], ids=["kv_split", "kv_replicated"])
def test_qkv_parallel_linear(ranks, config):
    n, c, res = ranks
    heads, kv = _qkv_configs(n)[config]
    _, sp = _plans(c["ids"], n)
    full = c[heads, kv]
    group = heads // kv  # query heads sharing one KV head
    for rank, out in enumerate(res):
        w, b, y_tp, y_sp = out[heads, kv]
        q_heads = list(range(rank * heads // n, (rank + 1) * heads // n))
        # The KV heads this rank's query heads attend with (one replicated head when kv < N).
        kv_heads = sorted({h // group for h in q_heads})
        sel = {"q": _head_rows(q_heads), "k": _head_rows(kv_heads), "v": _head_rows(kv_heads)}
        assert_close(w, torch.cat([full[s][0][sel[s]] for s in "qkv"]))
        assert_close(b, torch.cat([full[s][1][sel[s]] for s in "qkv"]))
        for x, y in ((c["x"], y_tp), (_pad(c["x"], sp.padded), y_sp)):
            ref = [F.linear(x, *full[s])[:, sel[s]] for s in "qkv"]
            assert_close(y, torch.cat(ref, dim=1))


def test_row_parallel_linear(ranks):
    n, c, res = ranks
    _, sp = _plans(c["ids"], n)
    full = F.linear(c["x_row"], c["row_w"], c["row_b"])   # [T, H]; bias once, after the sum
    # SP: pad rows reduce to zero and then get the bias, like the unsharded padded input.
    full_sp = F.linear(_pad(c["x_row"], sp.padded), c["row_w"], c["row_b"])
    mlp = F.linear(F.linear(c["x"], c["col_w"], c["col_b"]), c["row_w"], c["row_b"])
    mlp_sp = F.linear(F.linear(_pad(c["x"], sp.padded), c["col_w"], c["col_b"]), c["row_w"], c["row_b"])
    for rank, out in enumerate(res):
        w, b, y_tp, y_sp = out["row"]
        assert_close(w, _rows(c["row_w"], rank, n, dim=1))
        assert_close(b, c["row_b"])
        assert_close(y_tp, full)
        assert_close(y_sp, _rows(full_sp, rank, n))
        chain_tp, chain_sp = out["col_row"]
        assert_close(chain_tp, mlp)
        assert_close(chain_sp, _rows(mlp_sp, rank, n))


@pytest.mark.parametrize("n,heads,kv", [(4, 8, 2), (6, 6, 3), (4, 4, 4)])
def test_qkv_shards_more_ranks(n, heads, kv):
    """Loading needs no collectives, so shards of 1 < kv < N (not reachable with N = 2, 3) are
    checked in-process, one Comm per rank."""
    g = torch.Generator().manual_seed(n)
    full = {s: torch.randn((heads if s == "q" else kv) * D, H, generator=g) for s in "qkv"}
    for rank in range(n):
        qkv = QKVParallelLinear(H, D, heads, kv, Comm(None, rank, n))
        for shard_id, w in full.items():
            qkv.weight.weight_loader(qkv.weight, w, shard_id)
        q_heads = list(range(rank * heads // n, (rank + 1) * heads // n))
        kv_heads = sorted({h // (heads // kv) for h in q_heads})
        sel = {"q": _head_rows(q_heads), "k": _head_rows(kv_heads), "v": _head_rows(kv_heads)}
        assert_close(qkv.weight, torch.cat([full[s][sel[s]] for s in "qkv"]))


def test_parallel_linear_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="25"):
        ColumnParallelLinear(H, 25, Comm(None, 0, 2))
    with pytest.raises(ValueError, match="25"):
        RowParallelLinear(25, H, Comm(None, 0, 2))
    with pytest.raises(ValueError, match="4"):   # 4 KV heads over 3 ranks
        QKVParallelLinear(H, D, 6, 4, Comm(None, 0, 3))
    with pytest.raises(ValueError, match="2"):   # 3 ranks cannot share 2 KV heads evenly
        QKVParallelLinear(H, D, 6, 2, Comm(None, 0, 3))


# --- Vocab-parallel embedding and LM head ---------------------------------------------------------

def _vocab_shard(w: torch.Tensor, rank: int, n: int) -> torch.Tensor:
    """Rows [r * V_pad / N, (r + 1) * V_pad / N) of w zero-padded to V_pad."""
    per_rank = round_up(w.shape[0], n) // n
    return _pad(w, per_rank * n)[rank * per_rank:(rank + 1) * per_rank]


def test_vocab_parallel_embedding(ranks):
    n, c, res = ranks
    _, sp = _plans(c["ids"], n)
    per_rank = round_up(VOCAB, n) // n
    assert set((c["ids"] // per_rank).tolist()) == set(range(n))  # every rank has ids to look up
    full = F.embedding(c["ids"], c["emb_w"])  # [T, H]
    for rank, out in enumerate(res):
        w, y_tp, y_sp = out["emb"]
        assert_close(w, _vocab_shard(c["emb_w"], rank, n))
        assert_close(y_tp, full)
        assert_close(y_sp, _rows(_pad(full, sp.padded), rank, n))


def test_parallel_lm_head(ranks):
    n, c, res = ranks
    for rank, out in enumerate(res):
        w, logits, tied_logits = out["head"]
        assert_close(w, _vocab_shard(c["head_w"], rank, n))
        if rank == 0:
            assert logits.shape == (S, VOCAB)
            assert_close(logits, F.linear(c["x_head"], c["head_w"]))
            assert_close(tied_logits, F.linear(c["x_head"], c["emb_w"]))
        else:
            assert logits is None and tied_logits is None


# --- Token-wise layers ----------------------------------------------------------------------------

def test_rms_norm_with_residual():
    torch.manual_seed(0)
    eps = 0.1  # large enough that where eps enters shows in the output
    norm = RMSNorm(H, eps=eps)
    torch.nn.init.normal_(norm.weight)
    x, residual = torch.randn(5, H), torch.randn(5, H)
    y, new_residual = norm(x, residual)
    h = x + residual
    assert_close(new_residual, h)
    assert_close(y, norm.weight * h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps))
    assert_close(norm(h), y)


def test_rms_norm_bf16_matches_transformers():
    """Statistics in float32, the result cast back before the weight, as LlamaRMSNorm does."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ref = LlamaRMSNorm(H, eps=1e-5).to(torch.bfloat16)
    torch.nn.init.normal_(ref.weight)
    norm = RMSNorm(H, eps=1e-5, dtype=torch.bfloat16)
    norm.weight.data.copy_(ref.weight)
    x, residual = torch.randn(5, H, dtype=torch.bfloat16), torch.randn(5, H, dtype=torch.bfloat16)
    y, h = norm(x, residual)
    assert y.dtype == h.dtype == torch.bfloat16
    assert torch.equal(y, ref(x + residual))


def test_rotary_llama3_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, theta, max_pos = 64, 500000.0, 32768
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=head_dim, max_position_embeddings=max_pos, rope_theta=theta,
                      rope_scaling=scaling)
    torch.manual_seed(0)
    positions = torch.randint(0, max_pos, (16,))
    q, k = torch.randn(16, 4, head_dim), torch.randn(16, 2, head_dim)   # [T, heads, D]

    hf = LlamaRotaryEmbedding(cfg)
    cos, sin = hf(q, positions[None])                                  # [1, T, D]
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_out, k_out = RotaryEmbedding(head_dim, max_pos, theta, scaling)(positions, q, k)
    assert_close(q_out, q_ref[0].transpose(0, 1))
    assert_close(k_out, k_ref[0].transpose(0, 1))
    # The scaling matters at these positions, so the check above covers it.
    q_plain, _ = RotaryEmbedding(head_dim, max_pos, theta, None)(positions, q, k)
    assert not torch.allclose(q_plain, q_out, atol=1e-3)


# --- The eager CPU path's fused kernels (layers/token_ops.py) against torch / transformers ---------

def _assert_rounding_apart(got: torch.Tensor, want: torch.Tensor) -> None:
    """got within float rounding of want: one step of a 16-bit dtype (a rounding that went the
    other way), a few of float32 (several roundings, each of them a little off)."""
    eps = torch.finfo(want.dtype).eps
    steps = 4 if want.dtype == torch.float32 else 1
    assert_close(got, want.detach(), rtol=steps * eps, atol=steps * eps * 1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_rms_norm_matches_transformers(dtype):
    """RMSNorm's kernel (the residual add, then the norm, out written over x) against LlamaRMSNorm
    on x + residual: rows of SmolLM2's width, a decode row and a batch, and a strided row view."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from seqpar.layers import token_ops

    torch.manual_seed(0)
    width = 576
    ref = LlamaRMSNorm(width, eps=1e-5).to(dtype)
    torch.nn.init.normal_(ref.weight)
    norm = RMSNorm(width, eps=1e-5, dtype=dtype)
    norm.weight.data.copy_(ref.weight)
    for rows in (1, 33):
        x = torch.randn(rows, width, dtype=dtype) * 4
        residual = torch.randn(rows, width, dtype=dtype)
        assert token_ops.fused(x)
        want_sum = x + residual
        want = ref(want_sum)
        out, summed = norm.add_norm_(x.clone(), residual, out=x)  # out over x, as the layer does
        assert out is x and summed is residual
        assert torch.equal(summed, want_sum)  # the add rounds once, as torch's
        _assert_rounding_apart(out, want)  # the mean of squares sums in another order
        _assert_rounding_apart(norm(want_sum), want)
        y, h = norm(x, residual)
        assert torch.equal(h, want_sum + x)
        _assert_rounding_apart(y, ref(h))
    wide = torch.randn(3, 2 * width, dtype=dtype)  # [3, width] rows 2 * width apart
    _assert_rounding_apart(norm(wide[:, :width]), ref(wide[:, :width]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_in_place_matches_transformers(dtype):
    """The rotary kernel, in place on q and k inside a fused qkv row as attention passes them,
    against transformers' apply_rotary_pos_emb; v untouched."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, hq, hkv, max_pos, t = 64, 4, 2, 4096, 5
    cfg = LlamaConfig(hidden_size=hq * head_dim, num_attention_heads=hq, num_key_value_heads=hkv,
                      head_dim=head_dim, max_position_embeddings=max_pos, rope_theta=10000.0)
    torch.manual_seed(0)
    positions = torch.randint(0, max_pos, (t,))
    qkv = torch.randn(t, (hq + 2 * hkv) * head_dim, dtype=dtype)
    heads = qkv.view(t, hq + 2 * hkv, head_dim)
    q, k, v = (part.clone() for part in heads.split([hq, hkv, hkv], dim=1))
    cos, sin = LlamaRotaryEmbedding(cfg)(q, positions[None])  # [1, T, D]
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    want = torch.cat([q_ref[0].transpose(0, 1), k_ref[0].transpose(0, 1)], dim=1)
    got = RotaryEmbedding(head_dim, max_pos, 10000.0, None)(positions, heads[:, :hq + hkv],
                                                            inplace=True)
    assert got.data_ptr() == qkv.data_ptr()  # rotated where it lay
    # transformers computes its cos / sin per call, seqpar tabulates them: float32 rounding apart
    tol = 1e-5 if dtype == torch.float32 else 0.0
    assert_close(got, want, atol=tol, rtol=tol)
    assert torch.equal(heads[:, hq + hkv:], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_silu_and_mul_matches_torch(dtype):
    """silu(gate) * up written over gate by the kernel, against F.silu; the range's ends
    included (exp overflows for gate < -88)."""
    from seqpar.layers.token_ops import silu_and_mul

    torch.manual_seed(0)
    width = 1536
    gate_up = torch.randn(3, 2 * width, dtype=dtype) * 4
    gate_up[0, :8] = torch.tensor([-100.0, -88.5, -87.0, -20.0, 0.0, 20.0, 88.5, 100.0])
    gate, up = gate_up.clone().chunk(2, dim=-1)
    want = F.silu(gate) * up
    got = silu_and_mul(gate_up)
    assert got.data_ptr() == gate_up.data_ptr() and got.shape == (3, width)  # over gate
    _assert_rounding_apart(got, want)


def test_token_ops_torch_path_without_kernels(monkeypatch):
    """Where the kernels cannot be built, norm, rotary and silu-and-mul run their torch code, to
    the same results."""
    from seqpar.layers import attention_kernels, token_ops

    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-5, dtype=torch.bfloat16)
    torch.nn.init.normal_(norm.weight)
    rotary = RotaryEmbedding(64, 128, 10000.0, None)
    x, residual = torch.randn(2, 3, 64, dtype=torch.bfloat16).unbind(0)
    positions = torch.tensor([5, 90, 7])

    def run():
        heads = x.view(3, 1, 64).repeat(1, 2, 1)
        return (*norm(x, residual), rotary(positions, heads, inplace=True),
                token_ops.silu_and_mul(torch.cat([x, residual], dim=1)))

    fused = run()
    monkeypatch.setattr(attention_kernels, "available", lambda: False)
    assert not token_ops.fused(x)
    for got, want in zip(run(), fused):
        _assert_rounding_apart(got, want)


# --- Step plan (pure Python) ----------------------------------------------------------------------

def _random_plan(rng: random.Random, n: int, sp: bool = True, block_size: int = 4) -> StepPlan:
    seqs = rng.randint(1, 6)
    lens = [rng.choice([1, rng.randint(1, 9)]) for _ in range(seqs)]
    starts = [rng.randint(0, 50) for _ in lens]
    # m logit rows per sequence: mostly 0 or 1, sometimes up to its whole chunk.
    rows = [rng.choice([0, 1, 1, rng.randint(0, t)]) for t in lens]
    tables = [rng.sample(range(200), round_up(s + t, block_size) // block_size)
              for s, t in zip(starts, lens)]
    return StepPlan(sp=sp, token_ids=torch.tensor([rng.randrange(1000) for _ in range(sum(lens))]),
                    starts=starts, lens=lens, logit_rows=rows, block_tables=tables, world_size=n,
                    block_size=block_size, overlap=sp and rng.random() < 0.5)


def test_step_plan_fields():
    tables = [[3], [0], [7, 2]]
    plan = StepPlan(sp=True, token_ids=torch.arange(10, 18), starts=[0, 5, 15],
                    lens=[3, 1, 4], logit_rows=[1, 0, 3], block_tables=tables, world_size=3)
    assert plan.num_tokens == 8 and plan.padded == 9
    assert plan.positions.tolist() == [0, 1, 2, 5, 15, 16, 17, 18]
    assert plan.sample_rows.tolist() == [2, 5, 6, 7]
    # Block 3's slots 0-2; block 0's slot 5; block 7's slot 15, then block 2's slots 0-2.
    meta = plan.attn_metadata
    assert meta.slot_mapping.tolist() == [48, 49, 50, 5, 127, 32, 33, 34]
    assert meta.query_start_loc.tolist() == [0, 3, 4, 8] and meta.seq_lens.tolist() == [3, 6, 19]
    assert meta.block_tables.tolist() == [[3, 0], [0, 0], [7, 2]]  # padded with block 0
    assert (meta.max_query_len, meta.max_seq_len) == (4, 19)
    assert StepPlan(False, plan.token_ids, [0, 5, 15], [3, 1, 4], [True] * 3, tables, 3).padded == 8


@pytest.mark.parametrize("n", [2, 3, 4])
def test_step_plan_sp_sample_gather(n):
    """Each rank picks K rows of its [T_pad / N] shard; the gathered [N * K] rows, indexed by
    sample_gather_index, are exactly the sampled rows, in sequence order."""
    rng = random.Random(n)
    for _ in range(50):
        plan = _random_plan(rng, n)
        hidden = torch.arange(plan.padded, dtype=torch.float32)[:, None].repeat(1, 2)  # row id
        shards = hidden.chunk(n)                                                        # [T_pad / N, 2]
        local = [plan.local_sample_rows(r) for r in range(n)]
        assert len({len(rows) for rows in local}) == 1  # the all-gather needs one K on every rank
        gathered = torch.cat([shard[rows] for shard, rows in zip(shards, local)])      # [N * K, 2]
        assert_close(gathered[plan.sample_gather_index], hidden[plan.sample_rows])
        # The logit rows: each sequence's last m rows, counted here from the lengths alone.
        want, end = [], 0
        for t, m in zip(plan.lens, plan.logit_rows):
            end += t
            want += list(range(end - m, end))
        assert plan.sample_rows.tolist() == want
