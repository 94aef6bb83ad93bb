"""What runs where: the parallel plan of a model x tp x pp, per module kind, without starting ranks.

Every module kind declares, in SP_ROLES, how it runs on an SP step: token-wise modules (norms, the
residual add) on this rank's token shard; column-parallel inputs all-gathered, row-parallel
outputs reduce-scattered; attention, which mixes tokens, only between an all-gather and a
reduce-scatter. The layers do this themselves (they read the step's plan); the table is what they
declare, and it is used twice: `seqpar check` prints it, and an LLM whose model has a leaf module
of a kind not declared here runs TP and says why (sp_blockers), since SP could be wrong there.
A new module kind (an MoE block, say) adds one entry. With compile=True the SP pass decides from
the traced graph itself; `seqpar check --compile` prints what it rewrote and left alone.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from seqpar.compile.runner import check_single_stage
from seqpar.config import EngineConfig, ModelConfig, ParallelConfig
from seqpar.distributed.comm import Comm
from seqpar.layers.attention import Attention
from seqpar.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from seqpar.layers.linear import (ColumnParallelLinear, MergedColumnParallelLinear,
                                  QKVParallelLinear, RowParallelLinear)
from seqpar.layers.moe import Experts, ReplicatedLinear, Router, SparseMoeBlock
from seqpar.layers.norm import RMSNorm
from seqpar.layers.quant import Int8PerChannel, PackedInt4, format_weight_rows, weight_rows
from seqpar.layers.rotary import RotaryEmbedding

# module kind -> how it runs on an SP step
SP_ROLES: dict[type, str] = {
    VocabParallelEmbedding: "reduce-scatter along tokens instead of all-reduce",
    ParallelLMHead: "all-gathers only the sampled rows, then gathers vocab shards",
    RMSNorm: "token-wise: residual add + norm on this rank's T_pad/N rows",
    QKVParallelLinear: "all-gather tokens right before the matmul",
    MergedColumnParallelLinear: "all-gather tokens right before the matmul",
    ColumnParallelLinear: "all-gather tokens right before the matmul",
    RowParallelLinear: "reduce-scatter along tokens instead of all-reduce",
    Attention: "mixes tokens: runs on the gathered T real tokens (pad rows dropped), sharded by heads",
    RotaryEmbedding: "position-wise, inside attention on gathered tokens",
    SparseMoeBlock: "where the MLP sits: see the MoE block's steps below",
    Router: "token-wise, replicated: routes the rows the MoE block gives it",
    Experts: "row-wise: each routed row through its expert",
    ReplicatedLinear: "token-wise, replicated (the shared expert's gate)",
    PackedInt4: "a linear layer's quantized weight: its local matmul, row-wise",
    Int8PerChannel: "a linear layer's quantized weight: its local matmul, row-wise",
}


def sp_blockers(model: nn.Module) -> list[str]:
    """Leaf module kinds in `model` that SP_ROLES does not declare (empty: SP is safe). A composite
    (decoder layer, attention block, MLP) is judged by its parts."""
    unknown = {type(m).__name__ for m in model.modules()
               if type(m) not in SP_ROLES and next(m.children(), None) is None}
    return sorted(f"{name}: not declared token-wise, so SP would be unsafe" for name in unknown)


def stage_layout(parallel: ParallelConfig, cfg: ModelConfig) -> list[str]:
    """One line per pipeline stage: its ranks and the layers and parts it owns."""
    tp, lines = parallel.tensor_parallel_size, []
    for stage in range(parallel.pipeline_parallel_size):
        layers = parallel.stage_layers(cfg.num_layers, stage)
        parts = [f"layers {layers.start}-{layers.stop - 1}" if len(layers) > 1
                 else f"layer {layers.start}"]
        if stage == 0:
            parts.append("embedding")
        if layers.stop == cfg.num_layers:
            parts += ["final norm", "LM head"]
        ranks = f"rank {stage * tp}" if tp == 1 else f"ranks {stage * tp}-{stage * tp + tp - 1}"
        lines.append(f"{'stage ' + str(stage):<10} {ranks}: {', '.join(parts)}")
    return lines


def support_report(model: str, tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                   sequence_parallel: str = "auto", sp_min_tokens: int | None = None,
                   overlap: bool = False, compile: bool = False, dtype: str = "auto",
                   max_model_len: int | None = None, device: str | None = None,
                   enable_expert_parallel: bool = False, **engine_options) -> str:
    """Validate the configuration (raising ValueError naming the number at fault) and describe it.
    engine_options: the other EngineConfig fields (block_size, kv_cache_memory_bytes, ...)."""
    from seqpar.loader.resolve import gguf_source, resolve_model
    from seqpar.models import MODELS

    parallel = ParallelConfig(tensor_parallel_size, pipeline_parallel_size, sequence_parallel,
                              sp_min_tokens, overlap,
                              enable_expert_parallel=enable_expert_parallel)
    model_dir = resolve_model(model)
    cfg = ModelConfig.from_dir(model_dir)
    engine = EngineConfig(model_dir, cfg, parallel, dtype, max_model_len or cfg.max_position_embeddings,
                          device=device or "cpu", compile=compile, gguf_file=gguf_source(model),
                          **engine_options)
    tp = parallel.tensor_parallel_size
    with torch.device("meta"):
        net = MODELS[cfg.model_type](engine.model, Comm(None, 0, tp), engine.torch_dtype,
                                     engine.max_model_len)
    qkv = net.model.layers[0].self_attn.qkv_proj
    lines = [
        f"model      {model_dir}",
        f"           {cfg.model_type}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_heads} heads / {cfg.num_kv_heads} KV heads x {cfg.head_dim}, "
        f"intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}"
        f"{', tied embeddings' if cfg.tie_word_embeddings else ''}",
        f"parallel   tp={tp} pp={parallel.pipeline_parallel_size} sp={sequence_parallel}: "
        f"{parallel.world_size} rank(s)",
        f"per rank   {qkv.num_heads} query heads, {qkv.num_kv_heads} KV head(s)"
        + (f" (each KV head replicated on {tp // cfg.num_kv_heads} ranks)"
           if cfg.num_kv_heads < tp else "")
        + f", {cfg.intermediate_size // tp} MLP columns, vocab rows "
          f"{net.model.embed_tokens.per_rank} (vocab padded to "
          f"{net.model.embed_tokens.per_rank * tp})",
        *stage_layout(parallel, cfg),
        "",
        "module kind                  SP  on an SP step",
    ]
    seen = []
    for module in net.modules():
        if type(module) in SP_ROLES and type(module) not in seen:
            seen.append(type(module))
    for kind in seen:
        lines.append(f"{kind.__name__:<28} yes {SP_ROLES[kind]}")
    blockers = sp_blockers(net)
    for b in blockers:
        lines.append(f"{'':<28} no  {b}")
    lines += [
        "",
        "per layer  TP step: 2 x all_reduce [T, H]",
        "           SP step: 2 x (all_gather [T_pad/N -> T_pad, H], reduce_scatter "
        "[T_pad, H -> T_pad/N])",
        "           residual stream between layers: TP [T, H] on every rank; SP [T_pad/N, H]",
        *_moe_lines(engine.model, tp),
    ]
    if parallel.pipeline_parallel_size > 1:
        lines += [
            "boundary   per step, rank (s, r) -> (s+1, r): hidden + residual, TP step 2 x [T, H];",
            "           SP step 2 x [T_pad/N, H] (1/N of TP's bytes); then last stage's TP rank 0 ->",
            "           rank 0: the sampled rows' logits [S, V]",
        ]
    if tp == 1:
        lines.append("sequence parallelism: not applicable at tp=1 (no collectives)")
    elif blockers:
        lines.append("sequence parallelism: OFF for this model (see above); it runs TP")
    else:
        lines.append("sequence parallelism: supported by every module kind")
    lines += ["", f"weights    quantization={engine.quantization}, dtype {engine.dtype}; rank 0 "
                  "of stage 0 (every TP rank holds the same bytes)", *_weight_lines(net, engine)]
    if compile:
        lines += ["", *_compile_lines(parallel, cfg, engine)]
    return "\n".join(lines)


def _weight_lines(net: nn.Module, engine: EngineConfig) -> list[str]:
    """Per kind of weight: its checkpoint type, storage format, kernel and bytes on a rank."""
    types = {}
    if engine.gguf_file is not None:
        from seqpar.loader.gguf import tensor_types
        types = tensor_types(engine.gguf_file)
    else:
        from seqpar.loader.checkpoint import open_checkpoint
        for file in sorted(engine.model_dir.glob("*.safetensors")):
            with open_checkpoint(file) as f:
                types.update({n: f.get_slice(n).get_dtype() for n in f.keys()})
    sources: dict[str, set[str]] = {}
    for ckpt_name, kind in types.items():
        target = net._target(ckpt_name)
        if target is not None:
            sources.setdefault(target[0].rsplit(".", 1)[0], set()).add(kind)
    return format_weight_rows(weight_rows(net, sources, engine.quantization))


def _moe_lines(cfg: ModelConfig, tp: int) -> list[str]:
    """The MoE block's layout and what it runs per kind of step (layers/moe.py)."""
    if not cfg.is_moe:
        return []
    e, k, w = cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    dense = cfg.num_layers - len(cfg.moe_layers)
    lines = [f"MoE        {len(cfg.moe_layers)} MoE layers{f' ({dense} dense)' if dense else ''}: "
             f"{e} experts x {w} wide, top-{k}"
             + (f", a shared expert {cfg.shared_expert_intermediate_size} wide" if
                cfg.shared_expert_intermediate_size else "")]
    if cfg.expert_parallel:
        lines += [f"  per rank {e // tp} whole experts (expert parallel); router and shared expert "
                  "replicated",
                  "  TP step: route all T tokens (same on every rank) -> own experts on the pairs "
                  "routed to them -> all_reduce [T, H]",
                  "  SP step: route own T_pad/N tokens -> all_to_all dispatch [T x k, H] -> own "
                  "experts -> all_to_all combine [T x k, H]; no all-gather"]
    else:
        lines += [f"  per rank every expert, {w // tp} of its {w} columns; router replicated",
                  "  TP step: route all T tokens (same on every rank) -> expert columns -> "
                  "all_reduce [T, H]",
                  "  SP step: all_gather [T_pad/N -> T_pad, H] -> route + experts on the T real "
                  "rows -> reduce_scatter, as the dense MLP"]
    return lines


def _compile_lines(parallel: ParallelConfig, cfg: ModelConfig, engine: EngineConfig) -> list[str]:
    """What the SP graph pass does to this model's compiled forward (seqpar/compile/check.py)."""
    check_single_stage(parallel.pipeline_parallel_size)
    if parallel.tensor_parallel_size == 1:
        return ["compiled   torch.compile (Inductor); no collectives at tp=1, nothing for the SP pass"]
    from seqpar.compile.check import pass_report

    sp = parallel.sequence_parallel != "off"
    report = pass_report(cfg, parallel.tensor_parallel_size, engine.torch_dtype,
                         engine.max_model_len, sp=sp)
    head = ("compiled   torch.compile (Inductor) + the SP graph pass on the traced forward:" if sp
            else "compiled   torch.compile (Inductor), SP off: the pass only reports")
    return [head, *("           " + line for line in report.summary().splitlines())]
