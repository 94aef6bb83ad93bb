"""Tensor-parallel linear layers. Activations are flat [tokens, features].

Column-parallel layers split the output features over the TP ranks and, on a sequence-parallel
step, all-gather their token-sharded input first. Row-parallel layers split the input features and
finish with an all-reduce (TP step) or a reduce-scatter along tokens (SP step). Which one runs is
the step's (layers/sp.py's transitions read it from the plan at forward time), never fixed at
construction. Every local product goes through the layer's `matmul`.

Each parameter carries a `weight_loader(param, tensor_slice, shard_id)` that reads only this
rank's rows or columns from a lazily-sliced checkpoint tensor (safetensors `get_slice`, or a GGUF
tensor: loader/gguf.py).

Storage and the local matmul (layers/quant.py): every local matmul goes through `matmul(x)`, the
layers' own forward, the collective matmuls of overlap.py and callers that reduce by themselves
alike; nothing else multiplies by `.weight`. The weight is dense (`weight`, F.linear) or, after
`finish_loading`, quantized (`qweight`: a GGUF tensor's blocks kept as they are, or a dense shard
quantized to int8 / int4), when `weight` becomes None.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar.config import divide
from seqpar.distributed.comm import Comm
from seqpar.layers import sp
from seqpar.layers.quant import (GROUP, RAW_FORMATS, GGUFBlocks, Int8PerChannel, PackedInt4,
                                 merge_rows, requantize, storage_format)
from seqpar.loader.ggml_blocks import Blocks


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
        self.qweight: nn.Module | None = None
        """The quantized weight once finish_loading made one (then `weight` is None)."""
        self._parts: list = []  # (first local row, Affine) of GGUF shards, until finish_loading
        self.source_types: set[str] = set()
        """The checkpoint types the weight was loaded from ("Q4_1", "BF16", ...)."""

    @property
    def storage(self) -> str:
        """How the weight is held: "dense", or a quantized format (layers/quant.py KERNELS)."""
        return "dense" if self.qweight is None else self.qweight.format

    def planned_storage(self, quantization: str, types: set[str]) -> str:
        """The format finish_loading will give a weight loaded from checkpoint types `types`."""
        return storage_format(quantization, types)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """x [M, in] @ this rank's W^T (+ bias) -> [M, out]. out: an [M, out] view to write
        into (without bias)."""
        if self.qweight is None:
            if out is None:
                return dense_linear(x, self.weight, bias)
            return torch.matmul(x, self.weight.t(), out=out)
        y = self.qweight(x)
        if bias is not None:
            y = y + bias
        return y if out is None else out.copy_(y)

    def weight_loader(self, param: nn.Parameter, tensor_slice, shard_id=None) -> None:
        raise NotImplementedError

    def _load(self, param: nn.Parameter, tensor_slice, dst_start: int, rows: slice = slice(None),
              cols: slice = slice(None)) -> None:
        """Checkpoint tensor [rows, cols] -> param's rows from dst_start. A GGUF tensor of a type
        with a kernel keeps its blocks (decoded to integers) until finish_loading."""
        quantized = getattr(tensor_slice, "quantized", None)
        if param is self.weight:
            self.source_types.add(_type_name(tensor_slice))
        if param is self.weight and quantized is not None:
            self._parts.append((dst_start, quantized(rows, cols)))
            return
        part = tensor_slice[rows] if cols == slice(None) else tensor_slice[rows, cols]
        param.data[dst_start:dst_start + part.shape[0]].copy_(part)

    def finish_loading(self, quantization: str) -> None:
        """Give the loaded weight its final form: GGUF shards -> one GGUFBlocks (one type of
        RAW_TYPES, their bytes as the file's) or one PackedInt4 (all dense if any part came dense:
        a fused layer of mixed types); a dense weight -> Int8PerChannel or PackedInt4 under
        quantization "int8" / "int4"; else it stays dense."""
        parts, self._parts = sorted(self._parts, key=lambda p: p[0]), []
        w = self.weight
        types = {a.type_name if isinstance(a, Blocks) else None for _, a in parts}
        if parts and sum(_rows(a) for _, a in parts) == w.shape[0] and None not in types and \
                self.planned_storage("gguf", types) in RAW_FORMATS:
            raw = np.concatenate([a.raw for _, a in parts])  # row blocks in order: q, k, v
            self.qweight = GGUFBlocks(Blocks(raw, parts[0][1].type_name), w.device)
            self.weight = None
            return
        parts = [(start, a.affine() if isinstance(a, Blocks) else a) for start, a in parts]
        if parts and sum(a.q.shape[0] for _, a in parts) < w.shape[0]:
            for start, a in parts:
                w.data[start:start + a.q.shape[0]].copy_(torch.from_numpy(a.values()))
            parts = []
        if parts:
            self.qweight = PackedInt4(merge_rows(parts), w.dtype, w.device)
        elif quantization == "int8":
            self.qweight = Int8PerChannel(w, w.dtype)
        elif quantization == "int4":
            self.qweight = PackedInt4(requantize(w, 4, GROUP), w.dtype, w.device)
        else:
            return
        self.weight = None


def _rows(part) -> int:
    return part.rows if isinstance(part, Blocks) else part.q.shape[0]


def dense_linear(x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear: x [M, in] @ weight [out, in]^T (+ bias) -> [M, out]. One row (a batch-1 decode
    step) goes to torch.mv (aten::addmv) instead of F.linear's aten::mm, which is slow on one row:
    measured on the AMX host at 1 thread, bf16, SmolLM2's 30 layers 32 -> 24 ms and its
    [576 -> 49152] head 6.3 -> 2.6 ms (CPU time, weights streamed from memory); the outputs were
    bit-identical on those shapes in bf16 and float32. The compiled forward keeps F.linear, the
    matmul its SP pass knows."""
    if x.shape[0] != 1 or torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    y = torch.mv(weight, x[0]).unsqueeze(0)
    return y if bias is None else y.add_(bias)


def _type_name(tensor_slice) -> str:
    """A checkpoint tensor's type: GGUF's ("Q4_1"), safetensors' ("BF16"), or a tensor's dtype."""
    if isinstance(tensor_slice, torch.Tensor):
        return str(tensor_slice.dtype).replace("torch.", "")
    if hasattr(tensor_slice, "get_dtype"):  # safetensors
        return tensor_slice.get_dtype()
    return tensor_slice.type  # loader/gguf.py GGUFTensor


def finish_loading(model: nn.Module, quantization: str) -> None:
    """After a model's weights are loaded: every module with a `finish_loading` (the parallel
    linear layers, the LM head) takes its final form, except inside blocks that multiply by their
    layers' weights themselves and say so with `keep_dense = True` (MoE's shared expert)."""
    dense = {id(m) for block in model.modules() if getattr(block, "keep_dense", False)
             for m in block.modules()}
    for module in model.modules():
        if hasattr(module, "finish_loading") and id(module) not in dense:
            module.finish_loading(quantization)
    for param in model.parameters():  # the decoded blocks an embedding kept for its LM head
        param.__dict__.pop("gguf_blocks", None)


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
        self._load(param, tensor_slice, dst_start, rows=slice(src_start, src_start + rows))

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
        self._load(param, tensor_slice, 0, cols=slice(start, start + cols))
