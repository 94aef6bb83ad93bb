"""Tensor-parallel linear layers. Activations are flat [tokens, features].

Column-parallel layers split the output features over the TP ranks and, on a sequence-parallel
step, all-gather their token-sharded input first. Row-parallel layers split the input features and
finish with an all-reduce (TP step) or a reduce-scatter along tokens (SP step). Which one runs is
the step's (layers/sp.py's transitions read it from the plan at forward time), never fixed at
construction. Every local product goes through the layer's `matmul`.

Each parameter carries a `weight_loader(param, tensor_slice, shard_id)` that reads only this
rank's rows or columns from a lazily-sliced checkpoint tensor (safetensors `get_slice`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar.config import divide
from seqpar.distributed.comm import Comm
from seqpar.layers import sp


class _ParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, comm: Comm, bias: bool,
                 dtype: torch.dtype):
        super().__init__()
        self.comm = comm
        self.local_out = out_features
        """This rank's output features (of matmul's output)."""
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.bias = None

    def matmul(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's local product, no bias, no collective: x [R, in] -> [R, out] (local
        features), written into `out` when given (rows of a ring collective matmul's output)."""
        return F.linear(x, self.weight) if out is None else torch.mm(x, self.weight.t(), out=out)

    def weight_loader(self, param: nn.Parameter, tensor_slice, shard_id=None) -> None:
        raise NotImplementedError


def check_shape(tensor_slice, expected: tuple) -> None:
    """Raise a ValueError when a checkpoint tensor's full shape is not what the config implies."""
    shape = tuple(tensor_slice.get_shape() if hasattr(tensor_slice, "get_shape") else tensor_slice.shape)
    if shape != tuple(expected):
        raise ValueError(f"shape {list(shape)} in the checkpoint, {list(expected)} expected from the config")


class ColumnParallelLinear(_ParallelLinear):
    """y = x W^T with W's output rows split over ranks. [T, in] -> [T, out / N] on each rank."""

    sp_role = sp.COLUMN_PARALLEL

    def __init__(self, in_features: int, out_features: int, comm: Comm, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        self.out_per_rank = divide(out_features, comm.world_size, "output features")
        super().__init__(in_features, self.out_per_rank, comm, bias, dtype)

    def forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        """x [rows, in] -> [T (TP) or T_pad (SP), out / N]."""
        y = sp.column_matmul(self.comm, x, self.matmul, self.local_out, plan)
        return y if self.bias is None else y.add_(self.bias)

    def _load_rows(self, param: nn.Parameter, tensor_slice, dst_start: int, src_start: int,
                   rows: int) -> None:
        param.data[dst_start:dst_start + rows].copy_(tensor_slice[src_start:src_start + rows])

    def weight_loader(self, param, tensor_slice, shard_id=None) -> None:
        rows = param.shape[0]
        check_shape(tensor_slice, (rows * self.comm.world_size, *param.shape[1:]))
        self._load_rows(param, tensor_slice, 0, self.comm.rank * rows, rows)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one matmul (gate and up): [T, in] -> [T, sum(out) / N].

    Rank r's weight is [gate rows of r; up rows of r], so silu(gate) * up stays rank-local.
    """

    sp_role = sp.COLUMN_PARALLEL

    def __init__(self, in_features: int, out_sizes: list[int], comm: Comm, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        self.local_sizes = [divide(o, comm.world_size, "output features") for o in out_sizes]
        super().__init__(in_features, sum(out_sizes), comm, bias, dtype)

    def weight_loader(self, param, tensor_slice, shard_id=None) -> None:
        size = self.local_sizes[shard_id]
        offset = sum(self.local_sizes[:shard_id])
        check_shape(tensor_slice, (size * self.comm.world_size, *param.shape[1:]))
        self._load_rows(param, tensor_slice, offset, self.comm.rank * size, size)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one matmul, split by heads: [T, H] -> [T, (hq + 2 hkv) * D].

    hq = heads / N query heads per rank. With fewer KV heads than ranks, each KV head is
    replicated on N / kv ranks: rank r holds KV head r // (N / kv), the one its query heads use.
    """

    sp_role = sp.COLUMN_PARALLEL

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, comm: Comm,
                 bias: bool = False, dtype: torch.dtype = torch.float32):
        n = comm.world_size
        self.head_dim = head_dim
        self.total_heads = {"q": num_heads, "k": num_kv_heads, "v": num_kv_heads}
        self.num_heads = divide(num_heads, n, f"tensor_parallel_size={n}: num_attention_heads")
        if num_kv_heads >= n:
            self.num_kv_heads = divide(num_kv_heads, n, f"tensor_parallel_size={n}: num_key_value_heads")
            self.kv_head_start = comm.rank * self.num_kv_heads
        else:
            replicas = divide(n, num_kv_heads, f"num_key_value_heads={num_kv_heads}: tensor_parallel_size")
            self.num_kv_heads = 1
            self.kv_head_start = comm.rank // replicas
        local_out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        _ParallelLinear.__init__(self, hidden, local_out, comm, bias, dtype)

    def weight_loader(self, param, tensor_slice, shard_id=None) -> None:
        d = self.head_dim
        check_shape(tensor_slice, (self.total_heads[shard_id] * d, *param.shape[1:]))
        q_rows, kv_rows = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            self._load_rows(param, tensor_slice, 0, self.comm.rank * q_rows, q_rows)
        else:
            dst = q_rows if shard_id == "k" else q_rows + kv_rows
            self._load_rows(param, tensor_slice, dst, self.kv_head_start * d, kv_rows)


class RowParallelLinear(_ParallelLinear):
    """y = x W^T with W's input columns split over ranks, partial sums reduced.

    [T, in / N] -> TP step: [T, out] (all-reduce); SP step: [T_pad / N, out] (reduce-scatter,
    rows past T zero-padded first).
    """

    sp_role = sp.ROW_PARALLEL

    def __init__(self, in_features: int, out_features: int, comm: Comm, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        self.in_per_rank = divide(in_features, comm.world_size, "input features")
        super().__init__(self.in_per_rank, out_features, comm, bias, dtype)

    def forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        return self.forward_from(lambda: x, plan)

    def forward_from(self, make_input, plan) -> torch.Tensor:
        """forward(make_input(), plan), the input made only when needed so that it can be dropped
        before the reduction (sp.row_matmul): for callers that build it only for this layer."""
        y = sp.row_matmul(self.comm, make_input, self.matmul, plan)
        return y if self.bias is None else y.add_(self.bias)  # once, after the reduction

    def weight_loader(self, param, tensor_slice, shard_id=None) -> None:
        if param.dim() == 1:  # the bias is whole on every rank
            check_shape(tensor_slice, param.shape)
            param.data.copy_(tensor_slice[:])
            return
        cols = param.shape[1]
        check_shape(tensor_slice, (param.shape[0], cols * self.comm.world_size))
        start = self.comm.rank * cols
        param.data.copy_(tensor_slice[:, start:start + cols])
