"""Mixtral, Qwen2-MoE and Qwen3-MoE: the Llama model with an MoE block (layers/moe.py) where the
config's sparse layers have their MLP; its dense layers keep LlamaMLP. Attention differs only by
config (Qwen2-MoE: q/k/v bias; Qwen3-MoE: q/k norms), as in the dense families.

Checkpoints in the hub layout, which transformers 5's save_pretrained also writes: one tensor per
expert and projection (Mixtral `block_sparse_moe.experts.E.w1/w2/w3` and `block_sparse_moe.gate`,
Qwen `mlp.experts.E.gate_proj/up_proj/down_proj`, `mlp.gate`, `mlp.shared_expert.*`,
`mlp.shared_expert_gate`). Under expert parallelism a rank reads only its own experts' tensors.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seqpar.layers import sp
from seqpar.layers.moe import SparseMoeBlock, local_experts
from seqpar.models.llama import LlamaForCausalLM

# checkpoint expert projection (after the Llama loader's renaming) -> (our parameter, projection)
EXPERT_PROJ = {("w1", None): ("w13", "gate"), ("w3", None): ("w13", "up"),
               ("w2", None): ("w2", "down"), ("gate_up_proj", 0): ("w13", "gate"),
               ("gate_up_proj", 1): ("w13", "up"), ("down_proj", None): ("w2", "down")}


class MoeForCausalLM(LlamaForCausalLM):
    sp_role = sp.RESIDUAL_STREAM

    def make_mlp(self, index: int, dtype: torch.dtype) -> nn.Module:
        if index in self.cfg.moe_layers:
            return SparseMoeBlock(self.cfg, self.comm, dtype)
        return super().make_mlp(index, dtype)

    def _target(self, ckpt_name: str):
        target = super()._target(ckpt_name.replace(".block_sparse_moe.", ".mlp."))
        if target is None:
            return None
        name, shard = target
        parts = name.split(".")
        if "experts" not in parts:
            return target
        i = parts.index("experts")
        known = (len(parts) == i + 4 and parts[i + 1].isdigit()
                 and (parts[i + 2], shard) in EXPERT_PROJ)
        if not known:
            return ckpt_name, None  # no place for it: reported by load_weights
        expert = int(parts[i + 1])
        if expert >= self.cfg.num_experts:
            return ckpt_name, None
        if expert not in local_experts(self.cfg, self.comm):
            return None  # another rank's expert (expert parallelism)
        param, proj = EXPERT_PROJ[parts[i + 2], shard]
        return ".".join(parts[:i + 1] + [param]), (expert, proj)
