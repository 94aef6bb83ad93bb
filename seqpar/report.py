"""What runs where: the parallel plan of a model x tp x pp, per module kind, without starting ranks.

Every module kind declares its SP role in its class body (layers/sp.py): token-wise modules (norms,
the router) run on whatever rows they are given, column-parallel inputs are all-gathered,
row-parallel outputs reduce-scattered, token-mixing modules (attention) run only inside a block
that gathered every token. The layers act on it through sp.py's transitions; here it is read
three times: `seqpar check` prints each kind's role; sp_blockers refuses SP for a model with a
module (leaf or not) that declares none, or that mixes tokens in the residual stream (an LLM then
runs TP and says why); sp_plan_table renders the roles as docs/architecture.md's table. With
compile=True the SP pass reads the same roles on the traced graph; `seqpar check --compile`
prints what it rewrote and left alone.
"""
from __future__ import annotations

import importlib
import pkgutil

import torch
import torch.nn as nn

import seqpar.layers
import seqpar.models
from seqpar.compile.runner import check_single_stage
from seqpar.config import EngineConfig, ModelConfig, ParallelConfig
from seqpar.distributed.comm import Comm
from seqpar.layers import sp
from seqpar.layers.quant import format_weight_rows, weight_rows


def sp_blockers(model: nn.Module) -> list[str]:
    """Why SP would be unsafe for `model` (empty: it is safe), one line per module kind at fault:
    a module, leaf or not, whose class declares no SP role (its forward could do anything to the
    token rows); one that needs every token sitting outside a block that gathers them."""
    found = set()

    def walk(module: nn.Module, path: str, all_tokens: bool) -> None:
        kind = type(module).__name__
        role = sp.role_of(type(module))
        if role is None:
            found.add(f"{kind}: not declared token-wise, so SP would be unsafe")
        elif role.needs_all_tokens and not all_tokens:
            found.add(f"{kind} ({role.name}, at {path}): needs every token but sits in the "
                      "residual stream, which an SP step shards, so SP would be unsafe")
        inner = all_tokens if role is not None and role.container else (
            role is not None and role.gathers_all_tokens)
        for name, child in module.named_children():
            walk(child, f"{path}.{name}" if path else name, inner)

    walk(model, "", False)
    return sorted(found)


def declared_kinds() -> list[tuple[type, sp.Role]]:
    """Every module class of seqpar.layers and seqpar.models with its declared role, and torch's
    containers, in the order of sp.ROLES, then of their files."""
    kinds = [(kind, sp.CONTAINER) for kind in sp.TORCH_CONTAINERS]
    for package in (seqpar.layers, seqpar.models):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            for kind in vars(importlib.import_module(info.name)).values():
                if (isinstance(kind, type) and issubclass(kind, nn.Module)
                        and kind.__module__ == info.name and sp.role_of(kind) is not None):
                    kinds.append((kind, sp.role_of(kind)))
    return sorted(kinds, key=lambda kr: sp.ROLES.index(kr[1]))


def sp_plan_table() -> str:
    """docs/architecture.md's SP plan table (markdown), one row per role, from the declarations."""
    lines = ["| role | module kinds | TP step | SP step |", "| --- | --- | --- | --- |"]
    kinds = declared_kinds()
    for role in sp.ROLES:
        names = ", ".join(kind.__name__ for kind, r in kinds if r is role)
        lines.append(f"| {role.name} | {names} | {role.tp_step} | {role.sp_step} |")
    return "\n".join(lines)


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
        f"{'module kind':<28} {'SP role':<17} on an SP step",
    ]
    seen = []
    for module in net.modules():
        role = sp.role_of(type(module))
        if role is not None and not role.container and type(module) not in seen:
            seen.append(type(module))
            step = role.sp_step.replace("`", "")  # the table's markdown
            lines.append(f"{type(module).__name__:<28} {role.name:<17} {step}")
    blockers = sp_blockers(net)
    for b in blockers:
        lines.append(f"{'':<28} {'blocks SP':<17} {b}")
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
