"""The mixture-of-experts block: a replicated router plus the experts, where the MLP sits.

Two layouts of the experts over the TP group (ModelConfig.expert_parallel, fixed at start-up):
- TP (default): every rank holds every expert, each split along its width like the dense MLP
  (rank r: columns [r * I/N, (r + 1) * I/N)), so each rank's output is a partial sum.
- expert parallel (EP): rank r holds experts [r * E/N, (r + 1) * E/N) whole.

Per step (the step's layout, layers/sp.py, read at forward time, the same on every rank):
- TP step: x [T, H] holds the same values on every rank (the all-reduce before it gives every rank
  the same sum), so every rank routes every token identically; each runs its experts (or its
  columns of all of them) on the tokens routed there; one all-reduce sums the partial outputs.
- SP step without EP: all-gather [T_pad/N -> T_pad, H], route and run the T real rows, then
  reduce-scatter: the dense MLP's collectives.
- SP step with EP: each rank routes only its own token shard, sends every (token, expert) pair's
  row to the expert's owner (all-to-all "dispatch"), runs its experts on what it received, and
  sends the results back (all-to-all "combine"), where the routing weights sum them per token.
  No rank gathers the whole batch; each token is routed on exactly one rank, so top-k ties
  cannot split the ranks.
On SP + overlap steps the block runs the plain SP collectives (no collective matmul for experts).

Qwen2-MoE's shared expert (a dense MLP behind a sigmoid gate, on every token) is split by columns
like the dense MLP under TP. Under EP it is replicated whole, so an SP + EP step runs it on the
rank's own tokens with no collective; a TP step runs each rank's share of its columns.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar.config import ModelConfig, divide
from seqpar.distributed.comm import Comm
from seqpar.layers import sp
from seqpar.layers.linear import MergedColumnParallelLinear, RowParallelLinear, check_shape
from seqpar.layers.token_ops import silu_and_mul


class ReplicatedLinear(nn.Module):
    """y = x W^T with the whole W on every rank: [R, in] -> [R, out] on whatever rows it is given.
    The checkpoint tensor loads whole (the model's default loader)."""

    sp_role = sp.TOKEN_WISE

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class Router(ReplicatedLinear):
    """Softmax top-k routing: [R, H] -> weights [R, k] (x's dtype) and expert ids [R, k].

    The softmax runs in float32, as HF's routers do; renormalize: the k weights sum to 1."""

    sp_role = sp.TOKEN_WISE

    def __init__(self, hidden: int, num_experts: int, top_k: int, renormalize: bool,
                 dtype: torch.dtype):
        super().__init__(hidden, num_experts, dtype)
        self.top_k, self.renormalize = top_k, renormalize

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(F.linear(x, self.weight), dim=-1, dtype=torch.float32)  # [R, E]
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights /= weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), ids


def local_experts(cfg: ModelConfig, comm: Comm) -> range:
    """The experts this rank holds: all of them (TP), or its E/N whole ones (EP)."""
    if not cfg.expert_parallel:
        return range(cfg.num_experts)
    per_rank = divide(cfg.num_experts, comm.world_size,
                      f"enable_expert_parallel, tensor_parallel_size={comm.world_size}: experts")
    return range(comm.rank * per_rank, (comm.rank + 1) * per_rank)


class Experts(nn.Module):
    """This rank's experts, stacked: w13 [E_local, 2W, H] (each expert's gate rows, then its up
    rows) and w2 [E_local, H, W]; W = I / N under TP, I under EP.

    Checkpoint tensors come one per expert and projection (the hub layout); shard id
    (expert, "gate" | "up" | "down"), expert numbered in the whole model."""

    sp_role = sp.TOKEN_WISE  # each routed row through its expert

    def __init__(self, cfg: ModelConfig, comm: Comm, dtype: torch.dtype):
        super().__init__()
        self.comm = comm
        self.experts = local_experts(cfg, comm)
        self.full_width = cfg.moe_intermediate_size
        self.width = self.full_width if cfg.expert_parallel else divide(
            self.full_width, comm.world_size,
            f"tensor_parallel_size={comm.world_size}: moe_intermediate_size")
        # TP: this rank's columns of every expert; EP: whole experts, from column 0.
        self.column = 0 if cfg.expert_parallel else comm.rank * self.width
        e, w, h = len(self.experts), self.width, cfg.hidden_size
        self.w13 = nn.Parameter(torch.empty(e, 2 * w, h, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, h, w, dtype=dtype), requires_grad=False)
        self.w13.shard_ids = [(x, p) for x in self.experts for p in ("gate", "up")]
        self.w2.shard_ids = [(x, "down") for x in self.experts]
        self.w13.weight_loader = self.w2.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, tensor_slice, shard_id) -> None:
        expert, proj = shard_id
        local, w, c = expert - self.experts.start, self.width, self.column
        if proj == "down":  # [H, I]: this rank's columns
            check_shape(tensor_slice, (param.shape[1], self.full_width))
            param.data[local].copy_(tensor_slice[:, c:c + w])
            return
        check_shape(tensor_slice, (self.full_width, param.shape[2]))  # [I, H]: this rank's rows
        rows = slice(0, w) if proj == "gate" else slice(w, 2 * w)
        param.data[local, rows].copy_(tensor_slice[c:c + w])

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [R, H]: rows grouped by local expert, counts[e] rows for expert e in turn.
        Returns [R, H]: each row through its expert (this rank's columns of it under TP)."""
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n:
                h = silu_and_mul(F.linear(x[start:start + n], self.w13[e]))  # [n, W]
                torch.mm(h, self.w2[e].t(), out=out[start:start + n])
            start += n
        return out


class SharedExpert(nn.Module):
    """Qwen2-MoE's shared expert, a dense SiLU MLP: split by columns over the TP group (TP), or
    whole on every rank (EP: built on a single-rank Comm, so its layers load whole tensors).
    Its linear layers only hold the weights: its forward runs no collective. They stay dense
    under any quantization: forward slices their columns itself."""

    sp_role = sp.TOKEN_WISE
    keep_dense = True

    def __init__(self, cfg: ModelConfig, comm: Comm, dtype: torch.dtype):
        super().__init__()
        self.comm = comm
        self.replicated = cfg.expert_parallel
        shards = Comm(None, 0, 1) if self.replicated else comm
        i, h = cfg.shared_expert_intermediate_size, cfg.hidden_size
        self.gate_up_proj = MergedColumnParallelLinear(h, [i, i], shards, dtype=dtype)
        self.down_proj = RowParallelLinear(i, h, shards, dtype=dtype)

    def forward(self, x: torch.Tensor, whole: bool) -> torch.Tensor:
        """[R, H] -> [R, H]: this rank's part of the output's sum over the group, or (whole,
        replicated only) all of it. A replicated expert's part is its own share of the columns,
        so a TP step does 1/N of the work on each rank."""
        gate_up, down = self.gate_up_proj.weight, self.down_proj.weight  # [2W, H], [H, W]
        if self.replicated and not whole:
            i, n, r = down.shape[1], self.comm.world_size, self.comm.rank
            lo, hi = r * i // n, (r + 1) * i // n  # uneven shares where N does not divide I
            gate_up = torch.cat([gate_up[lo:hi], gate_up[i + lo:i + hi]])
            down = down[:, lo:hi]
        return F.linear(silu_and_mul(F.linear(x, gate_up)), down)


class SparseMoeBlock(nn.Module):
    """Router + experts (+ the gated shared expert): [rows, H] -> [rows, H], rows = T on a TP step,
    T_pad / N on an SP step; the same collectives as the dense MLP, except on SP + EP steps."""

    sp_role = sp.EXPERT_BLOCK

    def __init__(self, cfg: ModelConfig, comm: Comm, dtype: torch.dtype):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (silu)")
        self.comm = comm
        self.expert_parallel = cfg.expert_parallel
        self.num_experts, self.top_k = cfg.num_experts, cfg.num_experts_per_tok
        self.gate = Router(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
                           cfg.norm_topk_prob, dtype)
        self.experts = Experts(cfg, comm, dtype)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = SharedExpert(cfg, comm, dtype)
            self.shared_expert_gate = ReplicatedLinear(cfg.hidden_size, 1, dtype)

    def forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        if sp.routes_own_rows(plan, self.expert_parallel):
            return self._dispatch_combine(x, plan)
        full = sp.gather_tokens(self.comm, x, plan)[:plan.num_tokens]  # [T, H]: pad rows dropped
        return sp.reduce_tokens(self.comm, self._partial(full), plan)

    def _partial(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H], the same on every rank -> this rank's part of the block's output [T, H]."""
        weights, ids = self.gate(x)  # [T, k] each
        k, first, local = self.top_k, self.experts.experts.start, len(self.experts.experts)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(k)  # [T * k] pairs
        expert, weights = ids.flatten() - first, weights.flatten()
        if self.expert_parallel:  # only the pairs routed to this rank's experts
            mine = (expert >= 0) & (expert < local)
            token, expert, weights = token[mine], expert[mine], weights[mine]
        order = torch.argsort(expert, stable=True)  # pairs grouped by expert
        token, weights = token[order], weights[order]
        counts = torch.bincount(expert, minlength=local).tolist()
        out = x.new_zeros(x.shape)
        out.index_add_(0, token, self.experts(x[token], counts).mul_(weights[:, None]))
        return self._add_shared(out, x, whole=False)

    def _dispatch_combine(self, x: torch.Tensor, plan) -> torch.Tensor:
        """SP + EP: x [T_pad/N, H], this rank's token shard -> its rows of the output."""
        comm, n, k = self.comm, self.comm.world_size, self.top_k
        local = len(self.experts.experts)
        real = max(0, min(x.shape[0], plan.num_tokens - comm.rank * x.shape[0]))
        mine = x[:real]  # [t, H]: pad rows are routed nowhere
        weights, ids = self.gate(mine)  # [t, k]
        expert = ids.flatten()  # [t * k] pairs
        order = torch.argsort(expert, stable=True)  # grouped by expert, so by owner rank
        token = order // k
        # [N owners, E/N experts each]: this rank's pairs per expert, in owner order
        counts = torch.bincount(expert, minlength=self.num_experts).view(n, local)
        # Each owner learns how many rows each rank sends each of its experts: [N sources, E/N].
        got_counts = comm.all_to_all(counts)
        send, recv = counts.sum(1).tolist(), got_counts.sum(1).tolist()
        pairs = plan.num_tokens * k  # every rank's pairs together: the dispatch's payload
        got = comm.all_to_all(mine[token], send, recv, total_rows=pairs)  # [R, H]
        # got is ordered by (source rank, expert): group it by expert for the matmuls, and back.
        owner_expert = torch.arange(local, device=x.device).repeat(n)
        regroup = torch.argsort(owner_expert.repeat_interleave(got_counts.flatten()), stable=True)
        done = torch.empty_like(got)
        done[regroup] = self.experts(got[regroup], got_counts.sum(0).tolist())
        back = comm.all_to_all(done, recv, send, total_rows=pairs)  # [t * k, H], in `order`
        out = x.new_zeros(x.shape)
        out[:real].index_add_(0, token, back.mul_(weights.flatten()[order, None]))
        self._add_shared(out[:real], mine, whole=True)
        return out

    def _add_shared(self, out: torch.Tensor, x: torch.Tensor, whole: bool) -> torch.Tensor:
        """out += sigmoid(gate(x)) * shared(x): x [R, H], out [R, H] (this rank's part of it)."""
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.shared_expert_gate(x))  # [R, 1]: per token, linear in parts
            out.addcmul_(gate, self.shared_expert(x, whole))
        return out
