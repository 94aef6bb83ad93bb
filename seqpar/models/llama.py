"""The Llama family (Llama 2/3, SmolLM2, Mistral, Qwen2, Qwen3) as one tensor-parallel model.

It reads like a single-device model: every collective lives inside the parallel layers and the
transitions of layers/sp.py, which read the step's layout (TP, SP, SP + overlap) from the plan at
forward time; each module class declares its SP role there. Shapes below: T real tokens, T_pad the
padded count (a multiple of N on SP steps), S sampled rows, "rows" = T on a TP step and T_pad / N
on an SP step (this rank's token shard of the residual stream).

Under pipeline parallelism a rank builds only its stage's part: a contiguous range of decoder
layers, plus the embedding on the first stage and the final norm and LM head on the last.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn as nn

from seqpar.config import ModelConfig
from seqpar.distributed.comm import Comm
from seqpar.layers import sp
from seqpar.layers.attention import Attention
from seqpar.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from seqpar.layers.linear import (MergedColumnParallelLinear, QKVParallelLinear,
                                  RowParallelLinear, check_shape, finish_loading)
from seqpar.layers.norm import RMSNorm
from seqpar.layers.rotary import RotaryEmbedding
from seqpar.layers.token_ops import silu_and_mul
from seqpar.loader.checkpoint import open_checkpoint


class LlamaAttention(nn.Module):
    sp_role = sp.ALL_TOKENS_BLOCK  # qkv_proj gathers, o_proj reduces: attention sees every token

    def __init__(self, cfg: ModelConfig, comm: Comm, rotary: RotaryEmbedding, dtype: torch.dtype):
        super().__init__()
        d = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, d, cfg.num_heads, cfg.num_kv_heads, comm,
                                          bias=cfg.qkv_bias, dtype=dtype)
        self.o_proj = RowParallelLinear(cfg.num_heads * d, cfg.hidden_size, comm, bias=cfg.o_bias,
                                        dtype=dtype)
        hq, hkv = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.rotary = rotary
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, dtype)
        else:
            self.q_norm = self.k_norm = None
        self.attn = Attention(hq, hkv, d, cfg.sliding_window)

    def forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        # [rows, H] -> [T_pad or T, (hq + 2 hkv) * D]; pad rows are dropped before attention.
        qkv = self.qkv_proj(x, plan)
        if qkv.shape[0] != plan.num_tokens:
            qkv = qkv[:plan.num_tokens]
        return self.o_proj(self.attend(qkv, plan), plan)  # [T, hq * D] -> [rows, H]

    def attend(self, qkv: torch.Tensor, plan) -> torch.Tensor:
        """The middle between the projections, on the step's T real tokens:
        qkv [T, (hq + 2 hkv) * D] -> [T, hq * D]. The compiled forward traces the split, norms and
        rotary with it and calls `self.attn` (the KV cache and SDPA) as an opaque op
        (compile/runner.py), so eager and compiled steps share all of it."""
        hq, hkv = self.attn.num_heads, self.attn.num_kv_heads
        heads = qkv.view(qkv.shape[0], hq + 2 * hkv, self.attn.head_dim)  # [T, hq + 2 hkv, D]
        if self.q_norm is None:
            # q and k lie side by side in each row of qkv: rotated as one [T, hq + hkv, D]
            # (in place, on the eager CPU path: qkv is this call's own).
            qk = self.rotary(plan.positions, heads[:, :hq + hkv], inplace=True)
            q, k = qk.split([hq, hkv], dim=1)
            v = heads[:, hq + hkv:]
        else:
            q, k, v = heads.split([hq, hkv, hkv], dim=1)
            q, k = self.rotary(plan.positions, self.q_norm(q), self.k_norm(k), inplace=True)
        return self.attn(q, k, v, plan)


class LlamaMLP(nn.Module):
    sp_role = sp.ALL_TOKENS_BLOCK

    def __init__(self, cfg: ModelConfig, comm: Comm, dtype: torch.dtype):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (silu)")
        i = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [i, i], comm,
                                                       bias=cfg.mlp_bias, dtype=dtype)
        self.down_proj = RowParallelLinear(i, cfg.hidden_size, comm, bias=cfg.mlp_bias, dtype=dtype)

    def forward(self, x: torch.Tensor, plan) -> torch.Tensor:
        # Token-wise throughout, so on an SP step pad rows ride along: [T_pad, 2I/N] -> [rows, H].
        # The activation (a view of gate_up) is made inside down_proj, which drops it once its
        # product is taken: the MLP's peak is gate_up + the down output, not more.
        return self.down_proj.forward_from(lambda: self._act(x, plan), plan)

    def _act(self, x: torch.Tensor, plan) -> torch.Tensor:
        """silu(gate) * up written over gate: [rows, H] -> [T', I/N], a view into gate_up
        [T', 2I/N], so no [T', I/N] temporaries sit next to it."""
        return silu_and_mul(self.gate_up_proj(x, plan))


class LlamaDecoderLayer(nn.Module):
    sp_role = sp.RESIDUAL_STREAM

    def __init__(self, cfg: ModelConfig, comm: Comm, rotary: RotaryEmbedding, dtype: torch.dtype,
                 mlp: nn.Module):
        """mlp: the block after attention, [rows, H] -> [rows, H] (LlamaMLP, or an MoE block)."""
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(cfg, comm, rotary, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = mlp

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, plan):
        """h, residual: [rows, H] -> [rows, H], [rows, H]. Norms run on this rank's rows only.

        h and residual are overwritten: the norms write in place, and the post-attention norm's
        output goes into h (the caller's loop holds it anyway), so the MLP runs next to two
        [rows, H] stream tensors, not four.
        """
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            self.input_layernorm.add_norm_(h, residual, out=h)
        attn_out = self.self_attn(h, plan)
        self.post_attention_layernorm.add_norm_(attn_out, residual, out=h)
        del attn_out
        return self.mlp(h, plan), residual


class LlamaModel(nn.Module):
    """Embedding (first stage), decoder layers `layers` (as self.layers[0..]) and the final norm
    (last stage); the parts a stage does not own are None."""

    sp_role = sp.RESIDUAL_STREAM

    def __init__(self, cfg: ModelConfig, comm: Comm, dtype: torch.dtype, max_positions: int,
                 layers: range, mlp_for):
        """mlp_for(layer index in the whole model) -> that layer's MLP block."""
        super().__init__()
        first, last = layers.start == 0, layers.stop == cfg.num_layers
        self.embed_tokens = (VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, comm, dtype)
                             if first else None)
        rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, comm, rotary, dtype, mlp_for(i))
                                    for i in layers)
        self.rotary_step = rotary.step
        """An eager forward runs its layers inside rotary_step(): cos / sin once per step."""
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype) if last else None


class LlamaForCausalLM(nn.Module):
    sp_role = sp.RESIDUAL_STREAM  # and the sampled-row tail (logits)

    # checkpoint projection name -> (our fused parameter, shard id)
    FUSED = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
             "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    def __init__(self, cfg: ModelConfig, comm: Comm, dtype: torch.dtype, max_positions: int,
                 layers: range | None = None):
        """layers: the decoder layers this pipeline stage owns (default: all, a single stage)."""
        super().__init__()
        self.cfg, self.comm = cfg, comm
        self.layers = range(cfg.num_layers) if layers is None else layers
        self.model = LlamaModel(cfg, comm, dtype, max_positions, self.layers,
                                lambda index: self.make_mlp(index, dtype))
        self.lm_head = None
        if self.layers.stop == cfg.num_layers:
            # Tied to the embedding when this stage holds it; a last stage without it loads the
            # embedding's weights into its own head (see _target).
            tied = self.model.embed_tokens if cfg.tie_word_embeddings else None
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, comm, dtype, tied_to=tied)

    def make_mlp(self, index: int, dtype: torch.dtype) -> nn.Module:
        """The MLP block of decoder layer `index` (a subclass puts MoE blocks in some layers)."""
        return LlamaMLP(self.cfg, self.comm, dtype)

    @torch.inference_mode()
    def forward(self, plan, h: torch.Tensor | None = None, residual: torch.Tensor | None = None):
        """Run this stage's part of one step.

        h, residual: [rows, H] each from the previous stage; None on the first stage, which embeds
        the tokens. Returns (h, residual) on a stage before the last; on the last, float32 logits
        [S, V] of the sampled rows on its TP rank 0, None on its other TP ranks.
        """
        h, residual = self.hidden_states(plan, h, residual)
        if self.lm_head is None:
            return h, residual
        return self.logits(plan, h, residual)

    def hidden_states(self, plan, h: torch.Tensor | None = None,
                      residual: torch.Tensor | None = None):
        """The residual stream after this stage's layers: (h, residual), [rows, H] each. With
        compile=True this is the part torch.compile traces (compile/runner.py)."""
        if self.model.embed_tokens is not None:
            h = self.model.embed_tokens(plan.token_ids, plan)  # [rows, H]
        # Compiled, the graph computes the tables once itself.
        with contextlib.nullcontext() if torch.compiler.is_compiling() else self.model.rotary_step():
            for layer in self.model.layers:
                h, residual = layer(h, residual, plan)
        return h, residual

    def logits(self, plan, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor | None:
        """The last stage's tail: final norm and LM head on the sampled rows only.
        h, residual [rows, H] -> float32 [S, V] on TP rank 0, None on the other TP ranks."""
        logits = self.lm_head(sp.sampled_rows(self.comm, plan, h, residual, self.model.norm))
        return None if logits is None else logits.float()

    def load_weights(self, model_dir: Path, quantization: str = "none",
                     gguf_file: Path | None = None) -> None:
        """Read this rank's shard of every parameter from the checkpoint's safetensors files, or
        under quantization "gguf" from the GGUF file itself; then each linear layer takes its
        final form (layers/quant.py: dense, the GGUF's blocks, or quantized "int8" / "int4")."""
        params = dict(self.named_parameters(remove_duplicate=False))
        expected = {(name, shard) for name, shard in self._expected_shards(params)}
        loaded = set()
        files = [gguf_file] if quantization == "gguf" else sorted(Path(model_dir).glob("*.safetensors"))
        for file in files:
            with open_checkpoint(file) as f:
                for ckpt_name in f.keys():
                    target = self._target(ckpt_name)
                    if target is None:
                        continue
                    name, shard = target
                    if name not in params:
                        raise ValueError(f"{file.name}: tensor {ckpt_name} has no place in a "
                                         f"{self.cfg.model_type} model with this config")
                    param = params[name]
                    loader = getattr(param, "weight_loader", _load_whole)
                    try:
                        loader(param, f.get_slice(ckpt_name), shard)
                    except ValueError as e:
                        raise ValueError(f"{file.name}: {ckpt_name}: {e}") from None
                    loaded.add((name, shard))
        missing = sorted(f"{self._ckpt_layer_name(n)}{'' if s is None else f' [{s}]'}"
                         for n, s in expected - loaded)
        if missing:
            raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensors, e.g. "
                             f"{', '.join(missing[:5])}")
        finish_loading(self, quantization)

    def _target(self, ckpt_name: str):
        """(our parameter, shard id) for a checkpoint tensor, or None when this stage skips it."""
        if "rotary_emb" in ckpt_name:
            return None
        if self.cfg.tie_word_embeddings and ckpt_name == "lm_head.weight":
            return None  # the embedding's weights provide it
        parts = ckpt_name.split(".")
        if parts[:2] == ["model", "layers"] and len(parts) > 2:
            # Another stage's layer is skipped unread; ours is numbered from the stage's first.
            index = int(parts[2])
            if index not in self.layers:
                # another stage's layer; one past the config's count is an error, below
                return None if index < self.cfg.num_layers else (ckpt_name, None)
            parts[2] = str(index - self.layers.start)
        elif ckpt_name.startswith("model.embed_tokens."):
            if self.model.embed_tokens is None:
                tied_head = self.cfg.tie_word_embeddings and self.lm_head is not None
                return ("lm_head.weight", None) if tied_head else None
        elif ckpt_name.startswith(("model.norm.", "lm_head.")) and self.lm_head is None:
            return None
        for i, part in enumerate(parts):
            if part in self.FUSED:
                fused, shard = self.FUSED[part]
                return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard
        return ".".join(parts), None

    def _expected_shards(self, params):
        inverse = {}
        for proj, (fused, shard) in self.FUSED.items():
            inverse.setdefault(fused, []).append(shard)
        for name in params:
            if name == "lm_head.weight" and self.lm_head.weight is getattr(
                    self.model.embed_tokens, "weight", None):
                continue  # tied: loaded as the embedding
            fused = name.split(".")[-2]
            # A parameter filled from several checkpoint tensors of its own kind names them.
            for shard in getattr(params[name], "shard_ids", None) or inverse.get(fused, [None]):
                yield name, shard

    def _ckpt_layer_name(self, name: str) -> str:
        """Our parameter name -> the checkpoint's layer numbering (for messages)."""
        parts = name.split(".")
        if parts[:2] == ["model", "layers"]:
            parts[2] = str(int(parts[2]) + self.layers.start)
        return ".".join(parts)


def _load_whole(param: torch.nn.Parameter, tensor_slice, shard_id=None) -> None:
    """Replicated parameters (norm weights): every rank reads the whole tensor."""
    check_shape(tensor_slice, param.shape)
    param.data.copy_(tensor_slice[:])
