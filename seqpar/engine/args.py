"""EngineArgs: every option of an engine, and the one way to start one (LLM and the server both
call EngineArgs.create_engine)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from seqpar.compile.runner import check_single_stage
from seqpar.config import EngineConfig, ModelConfig, ParallelConfig, SpeculativeConfig
from seqpar.distributed.launch import in_torchrun
from seqpar.engine.cluster import Cluster
from seqpar.engine.engine import Engine
from seqpar.engine.policy import NEVER, SPPolicy
from seqpar.engine.tokenizer import eos_token_ids, load_tokenizer
from seqpar.loader.resolve import gguf_source, resolve_model
from seqpar.report import sp_blockers

log = logging.getLogger("seqpar")


@dataclass
class EngineArgs:
    model: str = "smollm2"
    """An HF directory (config.json + *.safetensors), a .gguf file, or an alias (smollm2)."""
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    sequence_parallel: str = "auto"
    """off | on | auto (SP on steps above a threshold measured at start-up)."""
    overlap: bool = False
    """Collective matmul on SP steps."""
    compile: bool = False
    """torch.compile + the SP graph pass (one pipeline stage only)."""
    dtype: str = "auto"
    max_model_len: int | None = None
    """Longest prompt + output per sequence; default: the model's max_position_embeddings."""
    seed: int = 0
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    sp_min_tokens: int | None = None
    """With sequence_parallel="auto": this SP threshold instead of a measured one."""
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None
    device: str | None = None
    """cpu or cuda; default: cuda when available."""
    threads_per_rank: int | None = None
    shm: bool = True
    """Shared-memory collectives between CPU ranks on one host."""
    enable_expert_parallel: bool = False
    quantization: str = "auto"
    """auto | gguf | int8 | int4 | none (config.py QUANTIZATIONS; README "Quantized weights")."""
    speculative_config: dict | str | SpeculativeConfig | None = None
    """Speculative decoding, vLLM's keys (config.py SpeculativeConfig): {"method": "ngram",
    "num_speculative_tokens": k, "prompt_lookup_min": a, "prompt_lookup_max": b} or {"model": DIR,
    "num_speculative_tokens": k}; a dict, its JSON text, or None (off)."""

    def create_engine(self) -> Engine:
        """Validate everything, then start the ranks and build the engine on them. Nothing starts
        a process before validation is over (invariant 6)."""
        parallel = ParallelConfig(self.tensor_parallel_size, self.pipeline_parallel_size,
                                  self.sequence_parallel, self.sp_min_tokens, self.overlap,
                                  self.shm, self.enable_expert_parallel)
        spec = SpeculativeConfig.parse(self.speculative_config)
        if self.compile:
            check_single_stage(self.pipeline_parallel_size)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model_dir = resolve_model(self.model)
        model_cfg = ModelConfig.from_dir(model_dir)
        max_model_len = self.max_model_len
        if max_model_len is None:
            max_model_len = model_cfg.max_position_embeddings
        elif max_model_len > model_cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                             f"max_position_embeddings={model_cfg.max_position_embeddings}")
        cfg = EngineConfig(model_dir, model_cfg, parallel, self.dtype, max_model_len,
                           self.max_num_seqs, self.max_num_batched_tokens, self.seed, device,
                           self.threads_per_rank, block_size=self.block_size,
                           kv_cache_memory_bytes=self.kv_cache_memory_bytes,
                           gpu_memory_utilization=self.gpu_memory_utilization,
                           enable_prefix_caching=self.enable_prefix_caching, compile=self.compile,
                           quantization=self.quantization, gguf_file=gguf_source(self.model))
        if spec is not None:
            _check_speculative(spec, cfg)
        world = parallel.world_size
        if device.startswith("cuda") and world > torch.cuda.device_count() and not in_torchrun():
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {world} needs "
                             f"{world} GPUs; {torch.cuda.device_count()} visible")
        tokenizer = load_tokenizer(model_dir)
        eos_ids = eos_token_ids(model_dir, model_cfg, tokenizer)

        # Start the ranks: validation is over, nothing above started a process.
        cluster = Cluster(cfg)
        mode = self.sequence_parallel
        with cluster.guard():
            blockers = sp_blockers(cluster.worker.runner.model)
            if blockers and mode != "off":
                log.warning("seqpar: this model runs without sequence parallelism: "
                            + "; ".join(blockers))
                mode = "off"
            thresholds = _thresholds(cluster, cfg, mode)
            if cfg.num_blocks is None:  # profiled by the ranks (CUDA without a budget)
                cfg = replace(cfg, num_blocks=cluster.worker.runner.num_blocks)
            policy = SPPolicy(mode, self.tensor_parallel_size, thresholds[0],
                              overlap=self.overlap, overlap_threshold=thresholds[1])
            # Inside the guard: a draft model that fails to load closes the ranks.
            return Engine(cfg, cluster, policy, tokenizer, eos_ids, spec)


def _check_speculative(spec: SpeculativeConfig, cfg: EngineConfig) -> None:
    """Validate `spec` against the target engine (and read the draft's config.json) before any
    rank starts."""
    draft = None
    if spec.method == "draft_model":
        try:
            draft = ModelConfig.from_dir(resolve_model(spec.model))
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"speculative_config: draft model {spec.model}: {e}") from None
    spec.check_target(cfg.model, cfg.max_model_len, cfg.max_num_batched_tokens, draft)


def _thresholds(cluster: Cluster, cfg: EngineConfig, mode: str) -> tuple[int | None, int | None]:
    """(SP threshold, overlap threshold) in tokens for "auto": given, or measured on all ranks."""
    parallel = cfg.parallel
    if mode != "auto" or parallel.tensor_parallel_size == 1:
        return None, None
    if parallel.sp_min_tokens is not None:
        log.info(f"seqpar: SP threshold {parallel.sp_min_tokens} tokens (sp_min_tokens)")
        return parallel.sp_min_tokens, parallel.sp_min_tokens
    sp, overlap = cluster.call("diagnose", "measure")
    said = lambda t: "never" if t >= NEVER else f"{t} tokens"  # noqa: E731
    log.info(f"seqpar: measured thresholds: SP from {said(sp)}"
             + (f", SP + overlap from {said(overlap)}" if parallel.overlap else ""))
    return sp, overlap
