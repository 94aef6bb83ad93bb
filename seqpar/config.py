"""Configuration dataclasses. Each validates itself, so a bad setup fails before any rank starts."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from seqpar.layers import attention_kernels

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")
SP_MODES = ("off", "on", "auto")
log = logging.getLogger("seqpar")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def round_up(x: int, multiple: int) -> int:
    """x rounded up to a multiple of `multiple` (T_pad: tokens padded to N ranks; V_pad: vocab)."""
    return -(-x // multiple) * multiple


def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator, or a ValueError naming both numbers and what they count."""
    if numerator % denominator != 0:
        raise ValueError(f"{what}: {numerator} is not divisible by {denominator}")
    return numerator // denominator


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of one checkpoint, read from its HF config.json."""

    model_type: str
    """One of SUPPORTED_MODEL_TYPES."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    """Llama-3 style scaling ({"rope_type": "llama3", "factor": ..}) or None."""
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    """Bias on q/k/v: Qwen2 always; Llama and Qwen3 when attention_bias."""
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    """Qwen3: RMSNorm over head_dim on q and k before rotary."""
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    hidden_act: str = "silu"
    checkpoint_dtype: str = "float32"
    """The dtype the checkpoint was saved in (config.json `torch_dtype` / `dtype`)."""
    num_experts: int = 0
    """Routed experts per MoE layer; 0: a dense model."""
    num_experts_per_tok: int = 0
    """top_k: experts each token is routed to."""
    moe_intermediate_size: int = 0
    """One routed expert's MLP width (Mixtral: intermediate_size)."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE: the always-on shared expert's width, behind a sigmoid gate; 0: none."""
    norm_topk_prob: bool = False
    """Renormalize the top-k routing weights to sum to 1 (Mixtral always does)."""
    moe_layers: tuple[int, ...] = ()
    """The decoder layers with an MoE block; the others keep a dense MLP (intermediate_size)."""
    expert_parallel: bool = False
    """Whole experts per TP rank instead of each expert split: a layout choice, not the
    checkpoint's; EngineConfig sets it from ParallelConfig.enable_expert_parallel."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @classmethod
    def from_dir(cls, path: Path) -> "ModelConfig":
        cfg_file = Path(path) / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
        return cls.from_hf(raw, source=str(cfg_file))

    @classmethod
    def from_hf(cls, raw: dict, source: str = "config") -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported; "
                f"seqpar runs {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [k for k in required if k not in raw]
        if missing:
            raise ValueError(f"{source}: missing {', '.join(missing)}")
        # transformers 5 nests rope settings in rope_parameters; 4.x uses rope_theta + rope_scaling.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (default, llama3)")
        heads = raw["num_attention_heads"]
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        sliding = raw.get("sliding_window") if model_type in ("mistral", "mixtral") else None
        qwen = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")
        if model_type in qwen and raw.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true (per-layer sliding windows) is not supported")
        # Which projections carry a bias, as each family's HF modeling code builds them.
        attn_bias = bool(raw.get("attention_bias", False)) and model_type in ("llama", "qwen3",
                                                                               "qwen3_moe")
        qkv_bias = attn_bias or model_type == "qwen2" or (model_type == "qwen2_moe"
                                                           and raw.get("qkv_bias", True))
        return cls(
            model_type=model_type,
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope if rope_type == "llama3" else None,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=attn_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)) and model_type == "llama",
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            sliding_window=sliding,
            eos_token_ids=eos_ids,
            hidden_act=raw.get("hidden_act", "silu"),
            checkpoint_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            **(_moe_fields(raw, model_type, source) if model_type in MOE_MODEL_TYPES else {}),
        )


def _moe_fields(raw: dict, model_type: str, source: str) -> dict:
    """The MoE part of an HF config: Mixtral (num_local_experts, every layer sparse, experts as
    wide as intermediate_size) or Qwen2/3-MoE (num_experts or num_local_experts,
    moe_intermediate_size, dense layers
    by mlp_only_layers and decoder_sparse_step, as their HF decoder layers choose)."""
    layers = raw["num_hidden_layers"]
    # transformers 5 writes Qwen3-MoE's expert count as num_local_experts, as Mixtral's.
    experts = raw.get("num_local_experts", raw.get("num_experts"))
    needed = ["num_experts_per_tok"] + (["moe_intermediate_size"] if model_type != "mixtral" else [])
    missing = [k for k in needed if k not in raw] + ([] if experts else ["num_local_experts"])
    if missing:
        raise ValueError(f"{source}: missing {', '.join(missing)}")
    if model_type == "mixtral":
        width, sparse = raw["intermediate_size"], range(layers)
    else:
        width = raw["moe_intermediate_size"]
        step, dense = raw.get("decoder_sparse_step", 1), set(raw.get("mlp_only_layers") or ())
        sparse = [i for i in range(layers) if i not in dense and step > 0 and (i + 1) % step == 0]
    top_k = raw["num_experts_per_tok"]
    if not 1 <= top_k <= experts:
        raise ValueError(f"{source}: num_experts_per_tok={top_k} must be between 1 and the "
                         f"expert count {experts}")
    return dict(num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=width,
                shared_expert_intermediate_size=(raw.get("shared_expert_intermediate_size", 0)
                                                 if model_type == "qwen2_moe" else 0),
                norm_topk_prob=model_type == "mixtral" or bool(raw.get("norm_topk_prob", False)),
                moe_layers=tuple(sparse))


@dataclass(frozen=True)
class ParallelConfig:
    """How the ranks split the model."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    sequence_parallel: str = "auto"
    """"off": plain TP; "on": SP on every step; "auto": SP on steps above a measured token threshold."""
    sp_min_tokens: int | None = None
    """With "auto": run SP on steps of at least this many tokens instead of the measured threshold."""
    overlap: bool = False
    """Collective matmul on SP steps ("auto" measures from which token count it pays)."""
    shm: bool = True
    """CPU (gloo) ranks of a TP group on one host carry its collectives through shared memory
    instead of sockets (distributed/shm.py); False: always through gloo."""
    enable_expert_parallel: bool = False
    """MoE models: the experts divided whole among the TP group's ranks (an SP step all-to-alls
    each rank's tokens to their experts' owners and back) instead of each expert split."""

    def __post_init__(self):
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.sequence_parallel not in SP_MODES:
            raise ValueError(f"sequence_parallel must be one of {SP_MODES}, got {self.sequence_parallel!r}")
        if self.sp_min_tokens is not None and self.sp_min_tokens < 1:
            raise ValueError(f"sp_min_tokens must be >= 1, got {self.sp_min_tokens}")
        for name in ("shm", "enable_expert_parallel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def world_size(self) -> int:
        """tp x pp ranks; global rank = stage * tp + tp rank."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def stage_layers(self, num_layers: int, stage: int) -> range:
        """The decoder layers pipeline stage `stage` owns: contiguous, balanced by count; the
        first num_layers % pp stages take one more (the last stage also runs the LM head)."""
        base, extra = divmod(num_layers, self.pipeline_parallel_size)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (stage < extra))

    def check_model(self, model: ModelConfig) -> None:
        """Raise a ValueError naming the number that does not fit this model."""
        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        if pp > model.num_layers:
            raise ValueError(f"pipeline_parallel_size={pp} exceeds num_hidden_layers="
                             f"{model.num_layers}: every stage needs at least one layer")
        divide(model.num_heads, tp, f"tensor_parallel_size={tp}: num_attention_heads")
        if len(model.moe_layers) < model.num_layers:  # some layers keep a dense MLP
            divide(model.intermediate_size, tp, f"tensor_parallel_size={tp}: intermediate_size")
        if model.is_moe:
            self._check_experts(model)
        elif self.enable_expert_parallel:
            raise ValueError(f"enable_expert_parallel=True needs a mixture-of-experts model; "
                             f"{model.model_type} has no experts")
        kv = model.num_kv_heads
        if kv % tp != 0 and tp % kv != 0:
            raise ValueError(
                f"tensor_parallel_size={tp}: num_key_value_heads={kv} must be divisible by it, "
                f"or divide it (to replicate KV heads)"
            )
        if model.num_heads % kv != 0:
            raise ValueError(f"num_attention_heads={model.num_heads} is not a multiple of "
                             f"num_key_value_heads={kv}")

    def _check_experts(self, model: ModelConfig) -> None:
        tp = self.tensor_parallel_size
        if self.enable_expert_parallel:
            # Whole experts per rank, the same count on each: an uneven split is not supported.
            if model.num_experts % tp != 0:
                raise ValueError(f"enable_expert_parallel with tensor_parallel_size={tp}: "
                                 f"{model.num_experts} experts do not divide evenly over {tp} "
                                 f"ranks; use a tensor_parallel_size that divides "
                                 f"{model.num_experts}, or expert parallelism off")
        else:
            divide(model.moe_intermediate_size, tp,
                   f"tensor_parallel_size={tp}: moe_intermediate_size (each expert's width)")
            # Under EP the shared expert is replicated whole, so only TP splits it.
            if model.shared_expert_intermediate_size:
                divide(model.shared_expert_intermediate_size, tp,
                       f"tensor_parallel_size={tp}: shared_expert_intermediate_size")


SPEC_METHODS = ("ngram", "draft_model")
"""Speculative decoding's proposers: "ngram" (prompt lookup in the request's own tokens) or
"draft_model" (a small model of the same vocabulary, seqpar/spec/draft.py)."""
SPEC_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model",
             "draft_tensor_parallel_size")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (`speculative_config`, vLLM's names): every decoding sequence proposes
    up to num_speculative_tokens tokens, and one target step verifies them all (seqpar/spec/)."""

    method: str
    """One of SPEC_METHODS; a config with a `model` and no method is "draft_model"."""
    num_speculative_tokens: int
    """k: tokens proposed per sequence and step (a verification step runs k + 1 rows of it)."""
    prompt_lookup_min: int | None = None
    """ngram: the shortest suffix matched (default 1)."""
    prompt_lookup_max: int | None = None
    """ngram: the longest suffix matched, tried first (default max(5, prompt_lookup_min))."""
    model: str | None = None
    """draft_model: the draft's HF directory, .gguf file or alias; its vocab must be the target's."""
    draft_tensor_parallel_size: int = 1
    """draft_model: the draft runs unsharded in rank 0's process; only 1 is supported."""

    def __post_init__(self):
        if self.method not in SPEC_METHODS:
            raise ValueError(f"speculative_config: method {self.method!r} is not supported; "
                             f"seqpar runs {', '.join(SPEC_METHODS)}")
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"speculative_config: num_speculative_tokens must be an integer >= 1, "
                             f"got {k!r}")
        if self.method == "ngram":
            if self.model is not None:
                raise ValueError(f"speculative_config: model={self.model!r} needs method "
                                 "'draft_model'; method 'ngram' uses no second model")
            low = 1 if self.prompt_lookup_min is None else self.prompt_lookup_min
            high = max(5, low) if self.prompt_lookup_max is None else self.prompt_lookup_max
            for name, value in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"speculative_config: {name} must be an integer >= 1, "
                                     f"got {value!r}")
            if low > high:
                raise ValueError(f"speculative_config: prompt_lookup_min={low} exceeds "
                                 f"prompt_lookup_max={high}")
            object.__setattr__(self, "prompt_lookup_min", low)
            object.__setattr__(self, "prompt_lookup_max", high)
        else:
            if not self.model or not isinstance(self.model, (str, os.PathLike)):
                raise ValueError(f"speculative_config: method 'draft_model' needs model (the "
                                 f"draft's directory, .gguf file or alias), got {self.model!r}")
            for name in ("prompt_lookup_min", "prompt_lookup_max"):
                if getattr(self, name) is not None:
                    raise ValueError(f"speculative_config: {name} is for method 'ngram', not "
                                     "'draft_model'")
            if self.draft_tensor_parallel_size != 1:
                raise ValueError(f"speculative_config: draft_tensor_parallel_size="
                                 f"{self.draft_tensor_parallel_size!r}: the draft runs unsharded "
                                 "on rank 0; only 1 is supported")

    @classmethod
    def parse(cls, value: "dict | str | SpeculativeConfig | None") -> "SpeculativeConfig | None":
        """`speculative_config` as given (a dict, its JSON text, a SpeculativeConfig or None) ->
        a validated config or None; a ValueError names the key or value at fault."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a dict (or its JSON text), got "
                             f"{type(value).__name__}")
        unknown = sorted(set(value) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {', '.join(unknown)}; seqpar "
                             f"reads {', '.join(SPEC_KEYS)}")
        if "num_speculative_tokens" not in value:
            raise ValueError("speculative_config: num_speculative_tokens is required")
        raw = dict(value)
        if raw.get("method") is None:
            if raw.get("model") is None:
                raise ValueError("speculative_config: give method ('ngram') or a draft model")
            raw["method"] = "draft_model"
        return cls(**raw)

    def check_target(self, target: ModelConfig, max_model_len: int, max_num_batched_tokens: int,
                     draft: ModelConfig | None = None) -> None:
        """Raise a ValueError naming what does not fit the target engine: a verification step of
        k + 1 rows must fit the step's token budget and a sequence; a draft model must share the
        target's vocabulary and reach max_model_len positions."""
        k = self.num_speculative_tokens
        if k + 1 > min(max_num_batched_tokens, max_model_len):
            raise ValueError(f"speculative_config: num_speculative_tokens={k} needs verification "
                             f"steps of {k + 1} tokens per sequence; max_num_batched_tokens="
                             f"{max_num_batched_tokens} and max_model_len={max_model_len} must "
                             f"hold them")
        if self.method != "draft_model":
            return
        if draft is None:
            raise ValueError("speculative_config: check_target needs the draft model's config")
        if draft.vocab_size != target.vocab_size:
            raise ValueError(f"speculative_config: the draft model {self.model} has vocab_size "
                             f"{draft.vocab_size}, the target {target.vocab_size}: a draft must "
                             "share the target's tokenizer")
        if draft.max_position_embeddings < max_model_len:
            raise ValueError(f"speculative_config: the draft model {self.model} has "
                             f"max_position_embeddings={draft.max_position_embeddings}, fewer "
                             f"than max_model_len={max_model_len}")


KV_SHARE_OF_FREE_MEMORY = 0.25
"""CPU default KV budget: this share of the memory available at start-up, split over the ranks. A
quarter leaves room for the weights (loaded after the budget is taken), activations and the rest
of the machine; the pool's pages are only touched as blocks fill, but prefix caching keeps
finished blocks, so over time the whole budget is really used."""


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 avx512_bf16 / amx_bf16, Arm bf16): there bf16
    matmuls run several times the fp32 rate; elsewhere they are emulated and slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


_said_dtype: set[str] = set()


def resolve_dtype(dtype: str, checkpoint_dtype: str, device: str) -> str:
    """dtype="auto" -> the checkpoint's dtype, as vLLM does; on a CPU a 16-bit checkpoint runs in
    bf16 where the CPU has it natively (float16 has no fast CPU path), else in float32 (said once)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use auto or one of {list(DTYPES)}")
        return dtype
    chosen = checkpoint_dtype if checkpoint_dtype in DTYPES else "float32"
    if device.startswith("cpu") and chosen != "float32":
        chosen = "bfloat16" if cpu_has_native_bf16() else "float32"
        if chosen != checkpoint_dtype and checkpoint_dtype not in _said_dtype:
            _said_dtype.add(checkpoint_dtype)
            log.info(f"seqpar: dtype auto: the checkpoint is {checkpoint_dtype}; this CPU runs it "
                     f"in {chosen}" + ("" if chosen == "bfloat16" else " (no native bf16)"))
    return chosen


QUANT_MODES = ("auto", "gguf", "int8", "int4", "none")
QUANT_GROUP = 32
"""Input features per scale of the int4 formats (layers/quant.py GROUP): GGUF's group, and
quantization="int4"'s default. 32 divides SmolLM2's hidden size 576 and its shares at tp 1-3;
64 and 128 do not."""
_said_quant: set[str] = set()


def _say_once(key: str, message: str, level=logging.INFO) -> None:
    if key not in _said_quant:
        _said_quant.add(key)
        log.log(level, message)


def raw_blocks_only(kept: dict[str, str]) -> bool:
    """Whether every quantized tensor a GGUF file keeps (name -> type) is multiplied in its own
    blocks by gguf_mm (layers/quant.py GGUFBlocks), whose activations are float32 as llama.cpp's;
    torch's int4 kernel, which the other types take, is fast in bfloat16 only."""
    from seqpar.loader.ggml_blocks import RAW_TYPES
    return bool(kept) and set(kept.values()) <= RAW_TYPES and attention_kernels.available()


def resolve_quantization(cfg: "EngineConfig") -> str:
    """quantization -> "gguf", "int8", "int4" or "none", or a ValueError naming what does not fit
    (before any rank starts).

    auto: a GGUF file's quantized tensors stay quantized where torch's packed kernels are fast
    (CPU, bfloat16 activations, eager), else everything is dequantized (said once, with why);
    a 16/32-bit checkpoint runs dense. gguf / int8 / int4: as asked (int8 / int4 quantize the
    dense checkpoint at load; for a GGUF file, its dequantized weights)."""
    mode, tp = cfg.quantization, cfg.parallel.tensor_parallel_size
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization {mode!r} is not supported; use one of {list(QUANT_MODES)}")
    types: dict[str, str] = {}
    if cfg.gguf_file is not None:
        from seqpar.loader.ggml_blocks import KERNEL_TYPES
        from seqpar.loader.gguf import tensor_types
        types = tensor_types(cfg.gguf_file)
    kept = cfg.gguf_kept_types()
    if mode == "gguf" and cfg.gguf_file is None:
        raise ValueError(f"quantization='gguf' needs a .gguf model; {cfg.model_dir} is an HF "
                         "directory (use int8, int4 or none)")
    if mode == "auto":
        if cfg.gguf_file is None or not kept:
            return "none"
        why = ("device " + cfg.device if not cfg.device.startswith("cpu") else
               "compile=True" if cfg.compile else
               f"dtype {cfg.dtype}" if cfg.dtype != "bfloat16" and not raw_blocks_only(kept)
               else None)
        if why:
            _say_once(f"auto-{why}", f"seqpar: quantization auto: {why} has no packed-weight "
                      f"kernels here (CPU bfloat16, eager); {cfg.gguf_file.name} runs dequantized")
            return "none"
        mode = "gguf"
    if mode == "none":
        return mode
    if not cfg.device.startswith("cpu"):
        raise ValueError(f"quantization={mode!r} runs torch's CPU kernels; device {cfg.device} "
                         "needs quantization='none'")
    if cfg.compile:
        raise ValueError(f"compile=True runs dense weights only; quantization={mode!r} runs eager")
    # seqpar's own kernels (gguf_mm, int8_mm) take float32 activations as well as bfloat16
    own = (mode == "gguf" and raw_blocks_only(kept)) or (
        mode == "int8" and attention_kernels.available())
    if cfg.dtype != "bfloat16" and not own:
        _say_once(f"dtype-{cfg.dtype}", f"seqpar: quantization={mode!r} with dtype {cfg.dtype}: "
                  "torch's int4 CPU kernel (and its int8 one, where seqpar's own are not built) is "
                  "vectorized for bfloat16 only (float32 measured 30-100x slower than dense); "
                  "dtype='bfloat16' runs it fast",
                  logging.WARNING)
    m = cfg.model
    if mode == "gguf":
        others = sorted({t for t in types.values() if t not in KERNEL_TYPES and t not in
                         ("F32", "F16", "BF16")})
        for t in others:
            names = [n for n, x in types.items() if x == t]
            _say_once(f"type-{t}", f"seqpar: GGUF type {t} has no kernel in seqpar: {len(names)} "
                      f"tensor(s) (e.g. {names[0]}) are dequantized to {cfg.dtype}",
                      logging.WARNING)
        grouped = {kind for kind in ("o_proj", "down_proj")
                   if any(n.endswith(f"{kind}.weight") for n in kept)}
    else:
        grouped = {"o_proj", "down_proj"} if mode == "int4" else set()
        if mode == "int4" and m.hidden_size % QUANT_GROUP:
            raise ValueError(f"quantization='int4': hidden_size {m.hidden_size} is not a "
                             f"multiple of the group size {QUANT_GROUP}")
    # Row-parallel layers split their input features: each rank's share must hold whole groups.
    dense_mlp = len(m.moe_layers) < m.num_layers
    widths = {"o_proj": m.num_heads * m.head_dim, "down_proj": m.intermediate_size}
    for kind in sorted(grouped):
        if kind == "down_proj" and not dense_mlp:
            continue
        k = widths[kind]
        if k % (tp * QUANT_GROUP):
            raise ValueError(
                f"tensor_parallel_size={tp} cuts the quantization groups of {kind}: its {k} "
                f"input features / {tp} ranks = {k / tp:g} per rank, not a multiple of the group "
                f"size {QUANT_GROUP}; use a tensor_parallel_size whose share is, or "
                f"quantization='int8' / 'none'")
    return mode


@dataclass(frozen=True)
class EngineConfig:
    """Everything one LLM instance needs, validated together. Frozen: __post_init__ resolves the
    "auto" fields and the defaults once; a changed config is a new one (dataclasses.replace, which
    validates again), e.g. the engine's, once the ranks have profiled the block count."""

    model_dir: Path
    model: ModelConfig
    parallel: ParallelConfig
    dtype: str = "auto"
    """auto (the checkpoint's, see resolve_dtype) | float32 | bfloat16 | float16; resolved to a
    concrete dtype in __post_init__."""
    max_model_len: int = 4096
    """Longest prompt + generation per sequence."""
    max_num_seqs: int = 64
    """Sequences running at once."""
    max_num_batched_tokens: int | None = None
    """Tokens per step; longer prefills are chunked. Default: max_model_len."""
    seed: int = 0
    device: str = "cpu"
    threads_per_rank: int | None = None
    """torch threads per rank; default: the machine's cores split evenly over the ranks."""
    block_size: int = 16
    """Tokens per paged-KV block."""
    kv_cache_memory_bytes: int | None = None
    """KV pool bytes per rank. Default: on CPU KV_SHARE_OF_FREE_MEMORY of the available memory
    split over the ranks (capped at what max_num_seqs full-length sequences can use); on CUDA
    gpu_memory_utilization of the device after the weights and a profiled activation peak."""
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of prompt prefixes already computed (hash of parent + tokens)."""
    compile: bool = False
    """Run every step through torch.compile and the SP graph pass (seqpar/compile/)."""
    quantization: str = "auto"
    """Weight storage (layers/quant.py): auto | gguf | int8 | int4 | none; resolved in
    __post_init__ to gguf, int8, int4 or none (resolve_quantization)."""
    gguf_file: Path | None = None
    """The GGUF file model_dir was converted from, if any: quantization "gguf" reads it."""
    num_blocks: int | None = None
    """Blocks in every rank's pool: given, or from kv_cache_memory_bytes here; None on CUDA
    without a budget until the ranks have profiled the device (the engine's config then carries
    their count)."""

    def __post_init__(self):
        resolve = functools.partial(object.__setattr__, self)  # frozen: set once, here
        asked = self.dtype
        resolve("dtype", resolve_dtype(self.dtype, self.model.checkpoint_dtype, self.device))
        if self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")
        if self.max_num_batched_tokens is None:
            resolve("max_num_batched_tokens", self.max_model_len)
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        self.parallel.check_model(self.model)
        resolve("quantization", resolve_quantization(self))
        if (asked == "auto" and self.quantization == "int4" and self.dtype == "float32"
                and self.device.startswith("cpu") and cpu_has_native_bf16()):
            # torch's int4 kernel is fast in bfloat16 only: auto picks it for it.
            _say_once("dtype-auto-quant", f"seqpar: dtype auto with quantization="
                      f"{self.quantization!r}: activations in bfloat16, where the kernels are fast")
            resolve("dtype", "bfloat16")
        if (asked == "auto" and self.quantization == "gguf" and self.dtype != "float32"
                and raw_blocks_only(self.gguf_kept_types())):
            # gguf_mm quantizes float32 activations as llama.cpp does: auto runs them unrounded.
            _say_once("dtype-auto-gguf", "seqpar: dtype auto with the GGUF file's own blocks: "
                      "activations in float32, as llama.cpp computes them")
            resolve("dtype", "float32")
        if self.compile and self.model.is_moe:  # the compiled forward has no MoE block yet
            raise ValueError(f"compile=True does not support mixture-of-experts models "
                             f"({self.model.model_type}, {self.model.num_experts} experts); "
                             f"run it eager")
        if self.model.expert_parallel != self.parallel.enable_expert_parallel:
            resolve("model", dataclasses.replace(
                self.model, expert_parallel=self.parallel.enable_expert_parallel))
        budget = self.kv_cache_memory_bytes
        if budget is not None and budget < 1:
            raise ValueError(f"kv_cache_memory_bytes must be >= 1, got {budget}")
        if self.num_blocks is not None:
            self.check_num_blocks(self.num_blocks)
            return
        if budget is None and not self.device.startswith("cuda"):
            ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", self.parallel.world_size))
            budget = int(available_memory_bytes() * KV_SHARE_OF_FREE_MEMORY) // ranks_here
            useful = self.max_num_seqs * round_up(self.max_model_len, self.block_size)
            budget = min(budget, useful // self.block_size * self.kv_block_bytes)
        if budget is not None:
            resolve("num_blocks", self.check_num_blocks(budget // self.kv_block_bytes))

    def gguf_kept_types(self) -> dict[str, str]:
        """The GGUF file's tensors with a kernel, kept quantized under "gguf" (HF name -> type);
        {} without a GGUF file."""
        if self.gguf_file is None:
            return {}
        from seqpar.loader.ggml_blocks import KERNEL_TYPES
        from seqpar.loader.gguf import tensor_types
        return {n: t for n, t in tensor_types(self.gguf_file).items() if t in KERNEL_TYPES}

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_block_bytes(self) -> int:
        """Bytes of one KV block on a rank of the stage with the most layers (every rank has the
        same number of blocks, so the fullest stage sets it): K and V x layers x KV heads per rank
        x block_size x head_dim x dtype bytes. KV heads fewer than ranks are replicated: 1 each."""
        m, parallel = self.model, self.parallel
        layers = max(len(parallel.stage_layers(m.num_layers, s))
                     for s in range(parallel.pipeline_parallel_size))
        kv_heads = max(1, m.num_kv_heads // parallel.tensor_parallel_size)
        return 2 * layers * kv_heads * self.block_size * m.head_dim * self.torch_dtype.itemsize

    def check_num_blocks(self, num_blocks: int) -> int:
        """num_blocks, or a ValueError when a pool of that many blocks cannot hold one
        max_model_len sequence."""
        capacity = num_blocks * self.block_size
        if capacity < self.max_model_len:
            need = round_up(self.max_model_len, self.block_size) // self.block_size
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks x {self.block_size} tokens = {capacity} "
                f"tokens per rank, fewer than max_model_len={self.max_model_len} tokens of one "
                f"sequence: raise kv_cache_memory_bytes to at least {need * self.kv_block_bytes} "
                f"({self.kv_block_bytes} bytes per block) or lower max_model_len to {capacity}")
        return num_blocks
