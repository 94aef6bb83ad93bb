"""Vocab-parallel embedding and LM head. The vocab is padded to a multiple of N and split in
contiguous ranges: rank r holds rows [r * V_pad / N, (r + 1) * V_pad / N)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar.config import round_up
from seqpar.distributed.comm import Comm
from seqpar.layers import sp
from seqpar.layers.linear import check_shape, dense_linear
from seqpar.layers.quant import (RAW_FORMATS, GGUFBlocks, Int8PerChannel, PackedInt4, merge_rows,
                                 requantize, storage_format)
from seqpar.loader.ggml_blocks import Affine, Blocks


def padded_rows(blocks: Blocks, rows: int) -> Blocks:
    """This rank's vocab rows of GGUF blocks, padded to `rows` with zero bytes (d = 0: rows of
    zeros, as the dense table's padded vocab rows)."""
    raw = np.zeros((rows, blocks.raw.shape[1]), np.uint8)
    raw[:blocks.rows] = blocks.raw
    return Blocks(raw, blocks.type_name)


class VocabParallelEmbedding(nn.Module):
    sp_role = sp.VOCAB_EMBEDDING

    def __init__(self, vocab_size: int, hidden: int, comm: Comm, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.comm = comm
        self.dtype = dtype
        self.vocab_size = vocab_size
        self.per_rank = round_up(vocab_size, comm.world_size) // comm.world_size  # V_pad / N
        self.start = comm.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.qweight: GGUFBlocks | None = None
        """Under "gguf", the file's blocks when their type is in RAW_TYPES: rows are looked up
        in them (dequantized, as llama.cpp's get_rows) and `weight` becomes None."""
        self.source_types: set[str] = set()

    looks_up = True  # layers/quant.py weight_rows: its storage holds rows, multiplied by nothing

    def planned_storage(self, quantization: str, types: set[str]) -> str:
        fmt = storage_format(quantization, types) if quantization == "gguf" else "dense"
        return fmt if fmt in RAW_FORMATS else "dense"

    @property
    def storage(self) -> str:
        return "dense" if self.qweight is None else self.qweight.format

    def finish_loading(self, quantization: str) -> None:
        blocks = self.weight.__dict__.get("gguf_blocks")
        if isinstance(blocks, Blocks) and \
                self.planned_storage(quantization, {blocks.type_name}) != "dense":
            self.qweight = GGUFBlocks(padded_rows(blocks, self.per_rank), self.weight.device)
            self.weight = None

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] of this rank's rows -> [T, H]."""
        if self.qweight is None:
            return F.embedding(ids, self.weight)
        return self.qweight.rows(ids).to(self.dtype)

    def weight_loader(self, param: nn.Parameter, tensor_slice, shard_id=None) -> None:
        check_shape(tensor_slice, (self.vocab_size, param.shape[1]))
        end = min(self.start + self.per_rank, self.vocab_size)
        param.data.zero_()  # rows past the real vocab stay zero
        if end > self.start:
            param.data[:end - self.start].copy_(tensor_slice[self.start:end])
            quantized = getattr(tensor_slice, "quantized", None)
            if quantized is not None:  # a GGUF type with a kernel: kept for finish_loading
                param.gguf_blocks = quantized(slice(self.start, end), slice(None))
                self.source_types.add(tensor_slice.type)

    def forward(self, ids: torch.Tensor, plan) -> torch.Tensor:
        """ids: [T] -> TP step: [T, H]; SP step: [T_pad / N, H] (this rank's token shard)."""
        if self.comm.world_size == 1:
            return self._lookup(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        x = self._lookup(local.masked_fill(outside, 0))
        x = x.masked_fill(outside.unsqueeze(-1), 0)  # [T, H] partial: only this rank's vocab rows
        return sp.reduce_tokens(self.comm, x, plan)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the sampled rows only: [S, H] -> [S, V] on rank 0 (None elsewhere).

    Under any quantization the head, the largest matmul of a decode step, multiplies a quantized
    copy of its rows (layers/quant.py): the GGUF file's own blocks when their type has a kernel
    (SmolLM2's Q8_0: GGUFBlocks, which the tied embedding looks its rows up in, no dense table
    kept; other types' values exactly by PackedInt4), else its dense rows quantized to int8 per
    row under "int8" (Int8PerChannel) or to 8 bits per group of 32 (PackedInt4); then the dense
    rows stay for the embedding lookup they may be tied to.
    Measured at 1 row on
    SmolLM2's [576 -> 49152] head, 1 thread: dense bf16 3.5 ms, the 8-bit copy 1.6 ms (torch's
    int8 per-channel kernel 1.7 ms)."""

    keeps_dense_weight = True  # a quantized copy comes on top of the dense rows

    looks_up = False  # it multiplies

    sp_role = sp.SAMPLED_ROWS

    def __init__(self, vocab_size: int, hidden: int, comm: Comm, dtype: torch.dtype = torch.float32,
                 tied_to: VocabParallelEmbedding | None = None):
        super().__init__(vocab_size, hidden, comm, dtype)
        # A plain attribute, not a submodule: the embedding stays where the model registers it.
        self.__dict__["tied_to"] = tied_to
        if tied_to is not None:
            self.weight = tied_to.weight

    def planned_storage(self, quantization: str, types: set[str]) -> str:
        if quantization == "none":
            return "dense"
        raw = super().planned_storage(quantization, types)
        return raw if raw != "dense" else "int8" if quantization == "int8" else "int4x2"

    def finish_loading(self, quantization: str) -> None:
        if quantization == "none":
            return
        if self.tied_to is not None and self.tied_to.qweight is not None:
            self.qweight, self.weight = self.tied_to.qweight, None  # the embedding's blocks
            self.source_types = self.tied_to.source_types
            return
        w = self.weight
        blocks = w.__dict__.get("gguf_blocks") if quantization == "gguf" else None
        if isinstance(blocks, Blocks):
            if self.planned_storage(quantization, {blocks.type_name}) in RAW_FORMATS:
                self.qweight = GGUFBlocks(padded_rows(blocks, w.shape[0]), w.device)
                return
            blocks = blocks.affine()
        if blocks is None and quantization == "int8":
            self.qweight = Int8PerChannel(w, w.dtype)
            return
        if blocks is None:
            blocks = requantize(w, 8)
        elif blocks.q.shape[0] < w.shape[0]:  # the padded vocab rows: zero weights
            pad = w.shape[0] - blocks.q.shape[0]
            zero = Affine(np.zeros((pad, blocks.q.shape[1]), np.uint8),
                          *[np.zeros((pad, blocks.scale.shape[1]), np.float32)] * 2,
                          bits=blocks.bits, group=blocks.group)
            blocks = merge_rows([(0, blocks), (blocks.q.shape[0], zero)])
        self.qweight = PackedInt4(merge_rows([(0, blocks)]), w.dtype, w.device)

    def forward(self, x: torch.Tensor, plan=None) -> torch.Tensor | None:
        # [S, V_pad / N]
        logits = dense_linear(x, self.weight) if self.qweight is None else self.qweight(x)
        full = self.comm.gather_vocab(logits)
        return None if full is None else full[:, :self.vocab_size]
