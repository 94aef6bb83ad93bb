"""The sequence-parallel plan as code: the step layouts, the transitions between them that the
layers call, and the role each module kind declares.

Layouts. How a step lays the residual stream out over the N ranks of the TP group: the plan's
`sp` says whether the stream is scattered, `overlap` whether an SP step runs rings (the same on
every rank; the transitions read the two flags directly, several times per layer on every step):
  TP          every rank holds all T rows;
  SP          rank r holds rows [r * T_pad / N, (r + 1) * T_pad / N) (T_pad: T rounded up to N);
  SP_OVERLAP  SP, with each gather + matmul and matmul + reduce-scatter pair run as one ring
              collective matmul (layers/overlap.py).
(The policy's start-up timing runs the model's MLP sublayer in each, engine/policy.py.)

Transitions. The only places where what a layer communicates depends on the step; the layers
call them and never branch on `plan.sp` / `plan.overlap` themselves:
  gather_tokens    into a region that needs every token (a column-parallel input, the MoE router)
  reduce_tokens    partial sums back to the stream (after a row-parallel matmul, the embedding's
                   lookup, the MoE block)
  column_matmul    gather_tokens + a local matmul, or one ring
  row_matmul       a local matmul + reduce_tokens, or one ring
  sampled_rows     the last stage's tail: the sampled rows, normed, on every rank
  routes_own_rows  whether an expert-parallel MoE block routes its own rows (all-to-all dispatch)

Roles. Every module class declares, in its own class body, `sp_role = <one of the Roles below>`:
how it runs on an SP step. A subclass declares again, since it may change what its forward does;
torch's containers (ModuleList, ModuleDict, Sequential) count as CONTAINER. What reads them:
- report.sp_blockers: a model runs SP only if every module of it, leaf or not, declares a role,
  and every module that needs all tokens sits inside a block that gathers them (a module in the
  residual stream that mixes tokens would be wrong on a token shard); `seqpar check` prints each
  module kind's role;
- compile/sp_pass.py: a TOKEN_WISE module's ops join a token-wise region whatever they are, those
  of a TOKEN_MIXING or POSITIONAL module never do, and an edge into a COLUMN_PARALLEL module is
  where a region is gathered (so the pass needs no table entry for an op it has not seen, e.g. a
  quantized matmul);
- docs/architecture.md's SP plan table is generated from them (report.sp_plan_table).
Adding a module kind means declaring its role once. The compiled path sees a module's role
through Dynamo's module stack, which records calls of the module itself (`module(x)`); ops run in
its other methods count as the caller's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from seqpar.distributed.comm import Comm
from seqpar.layers.overlap import Matmul, gather_matmul, matmul_scatter


@dataclass(frozen=True)
class Layout:
    """A step layout, by the plan's two flags."""
    name: str
    sp: bool
    """The residual stream is sharded along tokens between layers."""
    overlap: bool
    """Column / row-parallel matmuls run as ring collective matmuls (SP steps)."""


TP = Layout("TP", sp=False, overlap=False)
SP = Layout("SP", sp=True, overlap=False)
SP_OVERLAP = Layout("SP + overlap", sp=True, overlap=True)


# ---- transitions ---------------------------------------------------------------------------

def gather_tokens(comm: Comm, x: torch.Tensor, plan) -> torch.Tensor:
    """Into a region that needs every token. TP: x [T, in] as it is (while compiling, the fence
    that closes a token-wise region); SP: all-gather [T_pad / N, in] -> [T_pad, in]."""
    return comm.all_gather_tokens(x) if plan.sp else comm.tokenwise_end(x)


def reduce_tokens(comm: Comm, partial: torch.Tensor, plan) -> torch.Tensor:
    """Partial sums [T, out] (T <= T_pad) back to the stream. TP: all-reduce -> [T, out] on every
    rank; SP: reduce-scatter along tokens -> this rank's [T_pad / N, out]."""
    return comm.reduce_scatter_tokens(partial, plan.padded) if plan.sp else comm.all_reduce(partial)


def column_matmul(comm: Comm, x: torch.Tensor, matmul: Matmul, width: int, plan) -> torch.Tensor:
    """A column-parallel matmul on every token: x [rows, in] (rows = T on a TP step, T_pad / N on
    an SP step) -> [T or T_pad, width]. SP + overlap: one ring, the gather behind the matmuls."""
    if plan.sp and plan.overlap:
        return gather_matmul(comm, x, matmul, width)
    return matmul(gather_tokens(comm, x, plan))


def row_matmul(comm: Comm, make_input: Callable[[], torch.Tensor], matmul: Matmul,
               plan) -> torch.Tensor:
    """A row-parallel matmul's output back to the stream: make_input() [T, in / N] ->
    [T, out] (TP) or [T_pad / N, out] (SP). SP + overlap: one ring, the reduction behind the
    matmuls.

    The input is made here so that, without a ring, it is dropped once the local product is
    taken, before the reduction allocates its buffers: a caller that builds it only for this
    matmul (the MLP's activation, [T, I / N]) does not keep it alive next to them."""
    if plan.sp and plan.overlap:
        return matmul_scatter(comm, make_input(), matmul, plan.padded)
    return reduce_tokens(comm, matmul(make_input()), plan)


def sampled_rows(comm: Comm, plan, h: torch.Tensor, residual: torch.Tensor,
                 norm: Callable) -> torch.Tensor:
    """The last stage's tail: the sampled rows of the stream, through the final norm:
    h, residual [rows, H] -> [S, H] on every rank; norm(x, residual) -> (normed, sum).

    SP: each rank norms the sampled rows it owns ([K, H], K = the most rows any rank owns), then
    one all-gather brings every rank's [K, H] together: [N * K, H] -> [S, H]."""
    if plan.sp:
        local = plan.local_sample_rows(comm.rank)
        x, _ = norm(h[local], residual[local])
        return comm.all_gather_tokens(x)[plan.sample_gather_index]
    rows = plan.sample_rows
    x, _ = norm(h[rows], residual[rows])
    return x


def routes_own_rows(plan, expert_parallel: bool) -> bool:
    """The MoE dispatch: whether an MoE block routes only this rank's rows of the stream and sends
    them to the experts' owners (all-to-all), rather than gathering every token. Only experts
    split whole over the ranks (EP) on an SP step do; a TP step routes all T tokens on every
    rank, and SP without EP gathers them (gather_tokens) like the MLP."""
    return expert_parallel and plan.sp


# ---- roles -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Role:
    """How a module kind runs on each kind of step."""

    name: str
    tp_step: str
    """What it does on a TP step (the SP plan table's words)."""
    sp_step: str
    """What it does on an SP step."""
    token_wise: bool | None = None
    """True: row i of its output depends only on row i of its inputs, so it runs on whatever
    rows it is given, and the SP pass may shard its ops; False: it mixes tokens (or reads the
    step's per-token data), and the pass never shards it; None: judged by its parts (blockers) and
    op by op (the pass)."""
    needs_all_tokens: bool = False
    """Valid only inside a block that gathers every token (ALL_TOKENS_BLOCK): it mixes tokens or
    reads the step's per-token data ([T] positions)."""
    gathers_all_tokens: bool = False
    """Its children run between its gather and its reduction, on every token."""
    gathers_input: bool = False
    """Its input is gathered before it runs: where the SP pass closes a token-wise region."""
    container: bool = False
    """Holds modules for others to call: its children are where it sits."""


TOKEN_WISE = Role(
    "token-wise", "the rows it is given (all T)",
    "the rows it is given: this rank's T_pad/N in the stream, every token inside a block that "
    "gathered them", token_wise=True)
COLUMN_PARALLEL = Role(
    "column-parallel", "matmul on `[T, in]`, output features split",
    "all-gather tokens `[T_pad/N, in] -> [T_pad, in]`, then the matmul; with overlap one ring "
    "collective matmul", gathers_input=True)
ROW_PARALLEL = Role(
    "row-parallel", "matmul, all-reduce `[T, out]`",
    "matmul, reduce-scatter along tokens -> `[T_pad/N, out]`; with overlap one ring collective "
    "matmul")
VOCAB_EMBEDDING = Role(
    "vocab embedding", "vocab-sharded lookup, all-reduce `[T, H]`",
    "the same lookup, reduce-scatter along tokens -> `[T_pad/N, H]`")
TOKEN_MIXING = Role(
    "token-mixing", "on the T tokens, heads split",
    "mixes tokens: runs on the gathered T real tokens (pad rows dropped), sharded by heads",
    token_wise=False, needs_all_tokens=True)
POSITIONAL = Role(
    "positional", "reads the step's positions `[T]`, inside attention",
    "reads the positions of the gathered T real tokens: only inside a block that gathered them",
    token_wise=False, needs_all_tokens=True)
ALL_TOKENS_BLOCK = Role(
    "all-tokens block", "column-parallel in, row-parallel out, T rows in between",
    "opens with a gather, closes with a reduce-scatter: every token in between",
    gathers_all_tokens=True)
EXPERT_BLOCK = Role(
    "expert block", "router replicated, experts split by width (or whole per rank with EP), "
    "all-reduce `[T, H]`",
    "all-gather -> router + experts -> reduce-scatter; with EP each rank routes its own T_pad/N "
    "rows, all-to-all to the experts' owners and back")
RESIDUAL_STREAM = Role(
    "residual stream", "`[T, H]` on every rank; its own ops (the residual add) token-wise",
    "`[T_pad/N, H]` per rank, never gathered between layers")
SAMPLED_ROWS = Role(
    "sampled rows", "the sampled rows `[S, H]`, vocab shards gathered on rank 0",
    "each rank norms the sampled rows it owns, one all-gather of `[K, H]` per rank, then as TP")
CONTAINER = Role(
    "container", "its parts' roles, where it sits", "its parts' roles, where it sits",
    container=True)

ROLES = (TOKEN_WISE, COLUMN_PARALLEL, ROW_PARALLEL, VOCAB_EMBEDDING, TOKEN_MIXING, POSITIONAL,
         ALL_TOKENS_BLOCK, EXPERT_BLOCK, RESIDUAL_STREAM, SAMPLED_ROWS, CONTAINER)
"""Every role, in the order the SP plan table lists them."""

TORCH_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
"""torch's own module kinds that only hold (or chain) others."""


def role_of(kind: type) -> Role | None:
    """The role a module class declares in its own body (not inherited), or None."""
    if kind in TORCH_CONTAINERS:
        return CONTAINER
    role = vars(kind).get("sp_role")
    return role if isinstance(role, Role) else None
