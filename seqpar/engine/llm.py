"""LLM: the public entry point. Validates everything, starts the ranks, and generates through the
engine (engine.py) from rank 0."""
from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import torch

from seqpar.compile.runner import check_single_stage
from seqpar.config import EngineConfig, ModelConfig, ParallelConfig
from seqpar.distributed.launch import in_torchrun
from seqpar.engine.cluster import Cluster
from seqpar.engine.engine import Engine
from seqpar.engine.outputs import RequestOutput
from seqpar.engine.policy import NEVER, SPPolicy
from seqpar.sampling_params import SamplingParams
from seqpar.worker.worker import COLLECTIVES
from seqpar.layers.quant import weight_rows
from seqpar.loader.resolve import gguf_source, resolve_model
from seqpar.report import sp_blockers

log = logging.getLogger("seqpar")
COMM_OPS = ("all_reduce", "reduce_scatter", "all_gather", "gather", "all_to_all", "send", "recv")


class LLM:
    """A Llama-family model served over tensor_parallel_size x pipeline_parallel_size ranks.
    See docs/architecture.md for the API."""

    def __init__(self, model: str = "smollm2", tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, sequence_parallel: str = "auto",
                 overlap: bool = False, compile: bool = False, dtype: str = "auto",
                 max_model_len: int | None = None, seed: int = 0, *, block_size: int = 16,
                 kv_cache_memory_bytes: int | None = None, enable_prefix_caching: bool = True,
                 gpu_memory_utilization: float = 0.9, sp_min_tokens: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int | None = None,
                 device: str | None = None, threads_per_rank: int | None = None,
                 shm: bool = True, enable_expert_parallel: bool = False,
                 quantization: str = "auto"):
        self.cluster = None
        parallel = ParallelConfig(tensor_parallel_size, pipeline_parallel_size, sequence_parallel,
                                  sp_min_tokens, overlap, shm, enable_expert_parallel)
        if compile:
            check_single_stage(pipeline_parallel_size)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model_dir = resolve_model(model)
        model_cfg = ModelConfig.from_dir(model_dir)
        if max_model_len is None:
            max_model_len = model_cfg.max_position_embeddings
        elif max_model_len > model_cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                             f"max_position_embeddings={model_cfg.max_position_embeddings}")
        self.cfg = EngineConfig(model_dir, model_cfg, parallel, dtype, max_model_len, max_num_seqs,
                                max_num_batched_tokens, seed, device, threads_per_rank,
                                block_size=block_size, kv_cache_memory_bytes=kv_cache_memory_bytes,
                                gpu_memory_utilization=gpu_memory_utilization,
                                enable_prefix_caching=enable_prefix_caching, compile=compile,
                                quantization=quantization, gguf_file=gguf_source(model))
        world = parallel.world_size
        if device.startswith("cuda") and world > torch.cuda.device_count() and not in_torchrun():
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {world} needs "
                             f"{world} GPUs; {torch.cuda.device_count()} visible")
        self.tokenizer = _load_tokenizer(model_dir)
        eos_ids = _eos_ids(model_dir, model_cfg, self.tokenizer)

        # Start the ranks: validation is over, nothing above started a process.
        self.cluster = Cluster(self.cfg)
        self.rank = self.cluster.rank
        with self.cluster.guard():
            blockers = sp_blockers(self.worker.model)
            if blockers and sequence_parallel != "off":
                log.warning("seqpar: this model runs without sequence parallelism: "
                            + "; ".join(blockers))
                sequence_parallel = "off"
            thresholds = self._thresholds(sequence_parallel)
        policy = SPPolicy(sequence_parallel, tensor_parallel_size, thresholds[0],
                          overlap=overlap, overlap_threshold=thresholds[1])
        self.engine = Engine(self.cfg, self.cluster, policy, self.tokenizer, eos_ids)
        self._p2p = [0, 0, 0, 0]  # the whole pipeline's [send calls, bytes, recv calls, bytes]
        self._ids = itertools.count()

    @property
    def worker(self):
        """Rank 0's Worker (its model, Comm and KV pool)."""
        return self.cluster.worker

    @property
    def policy(self) -> SPPolicy:
        """The per-step TP / SP / SP + overlap decision (mode and thresholds can be changed
        between calls: layers read each step's mode from its plan)."""
        return self.engine.policy

    @property
    def eos_ids(self) -> set[int]:
        return self.engine.eos_ids

    # ---- start-up ---------------------------------------------------------------------------

    def _thresholds(self, mode: str) -> tuple[int | None, int | None]:
        """(SP threshold, overlap threshold) in tokens for "auto": given, or measured on all ranks."""
        parallel = self.cfg.parallel
        if mode != "auto" or parallel.tensor_parallel_size == 1:
            return None, None
        if parallel.sp_min_tokens is not None:
            log.info(f"seqpar: SP threshold {parallel.sp_min_tokens} tokens (sp_min_tokens)")
            return parallel.sp_min_tokens, parallel.sp_min_tokens
        sp, overlap = self.cluster.call("measure")
        said = lambda t: "never" if t >= NEVER else f"{t} tokens"  # noqa: E731
        log.info(f"seqpar: measured thresholds: SP from {said(sp)}"
                 + (f", SP + overlap from {said(overlap)}" if parallel.overlap else ""))
        return sp, overlap

    # ---- generation ------------------------------------------------------------------------

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        self._check_open()
        # Every rank validates (the same inputs, the same verdict): under torchrun a prompt that
        # rank 0 rejects is rejected everywhere before any rank starts following.
        requests = self._normalize(prompts)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(requests)
        if len(params) != len(requests):
            raise ValueError(f"{len(params)} sampling params for {len(requests)} prompts")
        if self.cluster.torchrun and self.rank != 0:
            return self.cluster.follow_call()
        if self.cluster.torchrun:
            self.cluster.begin_call()
        engine = self.engine
        ids = [f"generate-{next(self._ids)}" for _ in requests]
        for request_id, (prompt, prompt_ids), p in zip(ids, requests, params):
            engine.add_request(request_id, prompt_ids, p, prompt)
        done = {}
        try:
            while len(done) < len(ids):
                for out in engine.step():
                    if out.finished:
                        done[out.request_id] = out
        finally:
            for request_id in ids:
                if request_id not in done:  # interrupted: leave nothing behind in the engine
                    engine.abort_request(request_id)
        if self.cfg.parallel.pipeline_parallel_size > 1 and not self.cluster.closed:
            for i, v in enumerate(self.cluster.call("report_p2p").tolist()):
                self._p2p[i] += v
        outputs = [done[i] for i in ids]
        if self.cluster.torchrun:
            outputs = self.cluster.end_call(outputs)
        return outputs

    def chat(self, messages, sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (list of {role, content}) or several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.chat_prompt_ids(conv)} for conv in conversations]
        return self.generate(prompts, sampling_params)

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """A conversation through the tokenizer's chat template, ready for the assistant's turn."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.cfg.model_dir} has no tokenizer with a chat template")
        return _as_ids(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                          tokenize=True))

    def _normalize(self, prompts) -> list[tuple[str | None, list[int]]]:
        """str | list[str] | list[int] | list[list[int]] | {"prompt_token_ids"|"prompt": ..} | list
        of those -> [(text or None, token ids)], each checked against the engine's limits."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts:
            raise ValueError("prompts must be a non-empty str, list of token ids, dict or list of those")
        requests = []
        for i, p in enumerate(prompts):
            if isinstance(p, dict):
                if "prompt_token_ids" in p:
                    p = list(p["prompt_token_ids"])
                elif "prompt" in p:
                    p = p["prompt"]
                else:
                    raise ValueError(f"prompt {i}: a dict needs 'prompt_token_ids' or 'prompt'")
            if isinstance(p, str):
                request = (p, self.encode(p, f"prompt {i}"))
            else:
                request = (None, [int(t) for t in p])
            self.engine.check_prompt(request[1], f"prompt {i}")
            requests.append(request)
        return requests

    def encode(self, text: str, what: str = "prompt") -> list[int]:
        """Token ids of a text prompt (ValueError when the model has no tokenizer)."""
        if self.tokenizer is None:
            raise ValueError(f"{what} is text but {self.cfg.model_dir} has no tokenizer files; "
                             "pass token ids instead")
        return _as_ids(self.tokenizer(text)["input_ids"])

    # ---- statistics and lifetime ------------------------------------------------------------

    def comm_stats(self) -> dict:
        """Calls and bytes per communication op, and step counts.

        Collectives are rank 0's: every rank of its TP group issues the same; with several stages,
        they are stage 0's. "send" / "recv" are the whole pipeline's point-to-point traffic,
        summed over all ranks at the end of each generate call: the activations crossing stage
        boundaries (hidden + residual, each rank its share) and the sampled tokens going from the
        last stage to rank 0.
        """
        self._check_open()
        stats = {op: {"calls": 0, "bytes": 0} for op in COMM_OPS}
        stats.update(self.worker.comm.snapshot())
        if self.cfg.parallel.pipeline_parallel_size > 1:
            calls, nbytes, rcalls, rbytes = self._p2p
            stats["send"] = {"calls": calls, "bytes": nbytes}
            stats["recv"] = {"calls": rcalls, "bytes": rbytes}
        stats["steps"] = dict(self.engine.steps)
        return stats

    def weight_stats(self) -> list[dict]:
        """What each kind of weight runs on rank 0 (every TP rank of a stage holds the same
        bytes; other stages hold their own layers): one dict per (name, checkpoint type, format)
        with "count", "kernel" and "bytes" (layers/quant.py weight_rows)."""
        self._check_open()
        return weight_rows(self.worker.model)

    def cache_stats(self) -> dict:
        """The paged KV cache: {"num_blocks", "block_size", "used_blocks" (held by unfinished
        requests), "prefix_queries", "prefix_hits" (prompt tokens looked up / served from the
        prefix cache), "preemptions"}."""
        self._check_open()
        return self.engine.cache_stats()

    @property
    def compile_s(self) -> float:
        """Seconds this rank spent in torch.compile (Dynamo + the SP pass + Inductor), over every
        graph compiled so far; 0.0 without compile. The other ranks compile the same graphs
        at the same time. Steps that compiled include this time in their wall time."""
        compiled = self.worker.compiled
        return 0.0 if compiled is None else compiled.compile_s

    def profile_memory(self, prompts, sampling_params: SamplingParams | None = None) -> list[int]:
        """Generate, and return each rank's peak activation memory (bytes) over the steps run."""
        self._check_open()
        if self.cluster.torchrun:
            raise RuntimeError("profile_memory runs with spawned ranks, not under torchrun")
        self.cluster.call("memory_on")
        self.generate(prompts, sampling_params)
        with self.cluster.guard():
            return self.cluster.call("report_memory")

    def time_collectives(self, ops: list[tuple[str, int, int]]) -> tuple[float, float]:
        """Run `ops` alone on stage 0's TP group, back to back, no compute: (wall seconds, CPU
        seconds its ranks spent). For benchmarks: the communication part of a step.

        ops: (name, rows, cols) per collective, a name of worker.COLLECTIVES and [rows, cols] the
        logical tensor comm_stats() counts for it (bench/analytic.py step_collectives lists a
        step's). Leaves comm_stats() as it was.
        """
        self._check_open()
        if self.cluster.torchrun:
            raise RuntimeError("time_collectives runs with spawned ranks, not under torchrun")
        if not ops:
            return 0.0, 0.0
        payload = torch.tensor([[COLLECTIVES.index(op), rows, cols] for op, rows, cols in ops],
                               dtype=torch.int64).view(-1)
        with self.cluster.guard():
            wall, cpu = self.cluster.call("time_collectives", payload)
        return wall, cpu

    def reset_comm_stats(self) -> None:
        self._check_open()
        self.cluster.call("reset_stats")
        self.engine.steps = {"sp": 0, "tp": 0, "padded_tokens": 0}
        self._p2p = [0, 0, 0, 0]

    def _check_open(self) -> None:
        if self.cluster is None:
            raise RuntimeError("this LLM failed to start")
        self.cluster.check_open()

    def close(self) -> None:
        if self.cluster is not None:
            self.cluster.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _as_ids(encoded) -> list[int]:
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return list(encoded)


def _load_tokenizer(model_dir: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((model_dir / n).is_file() for n in names):
        return None
    from transformers import AutoTokenizer  # slow import: only where a tokenizer exists
    return AutoTokenizer.from_pretrained(str(model_dir))


def _eos_ids(model_dir: Path, cfg: ModelConfig, tokenizer) -> set[int]:
    ids = set(cfg.eos_token_ids)
    gen = model_dir / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
