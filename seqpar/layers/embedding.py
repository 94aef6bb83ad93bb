"""Vocab-parallel embedding and LM head. The vocab is padded to a multiple of N and split in
contiguous ranges: rank r holds rows [r * V_pad / N, (r + 1) * V_pad / N)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqpar.config import round_up
from seqpar.distributed.comm import Comm
from seqpar.layers import sp
from seqpar.layers.linear import check_shape


class VocabParallelEmbedding(nn.Module):
    sp_role = sp.VOCAB_EMBEDDING

    def __init__(self, vocab_size: int, hidden: int, comm: Comm, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.comm = comm
        self.vocab_size = vocab_size
        self.per_rank = round_up(vocab_size, comm.world_size) // comm.world_size  # V_pad / N
        self.start = comm.rank * self.per_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, hidden, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, tensor_slice, shard_id=None) -> None:
        check_shape(tensor_slice, (self.vocab_size, param.shape[1]))
        end = min(self.start + self.per_rank, self.vocab_size)
        param.data.zero_()  # rows past the real vocab stay zero
        if end > self.start:
            param.data[:end - self.start].copy_(tensor_slice[self.start:end])

    def forward(self, ids: torch.Tensor, plan) -> torch.Tensor:
        """ids: [T] -> TP step: [T, H]; SP step: [T_pad / N, H] (this rank's token shard)."""
        if self.comm.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0)  # [T, H] partial: only this rank's vocab rows
        return sp.reduce_tokens(self.comm, x, plan)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the sampled rows only: [S, H] -> [S, V] on rank 0 (None elsewhere)."""

    sp_role = sp.SAMPLED_ROWS

    def __init__(self, vocab_size: int, hidden: int, comm: Comm, dtype: torch.dtype = torch.float32,
                 tied_to: VocabParallelEmbedding | None = None):
        super().__init__(vocab_size, hidden, comm, dtype)
        if tied_to is not None:
            self.weight = tied_to.weight

    def forward(self, x: torch.Tensor, plan=None) -> torch.Tensor | None:
        logits = F.linear(x, self.weight)  # [S, V_pad / N]
        full = self.comm.gather_vocab(logits)
        return None if full is None else full[:, :self.vocab_size]
