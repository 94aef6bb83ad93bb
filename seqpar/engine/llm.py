"""LLM: the public entry point. Validates everything, starts the ranks, and generates through the
engine (engine.py) from rank 0."""
from __future__ import annotations

import itertools

import torch

from seqpar.distributed.collectives import Collective
from seqpar.engine.args import EngineArgs
from seqpar.engine.outputs import OutputCollector, RequestOutput
from seqpar.engine.policy import SPPolicy
from seqpar.engine.tokenizer import chat_prompt_ids, encode
from seqpar.layers.quant import weight_rows
from seqpar.sampling_params import SamplingParams
from seqpar.spec.speculator import spec_stats
from seqpar.worker.diagnostics import TIMED_COLLECTIVES


class LLM:
    """A Llama-family model served over tensor_parallel_size x pipeline_parallel_size ranks.

    LLM(model, **options): options are EngineArgs' fields (seqpar/engine/args.py), e.g.
    tensor_parallel_size, sequence_parallel, dtype, max_model_len. See docs/architecture.md."""

    def __init__(self, model: str = "smollm2", **options):
        self.engine = None
        self.engine = EngineArgs(model=model, **options).create_engine()
        self._ids = itertools.count()

    @property
    def cfg(self):
        return self.engine.cfg

    @property
    def cluster(self):
        """The ranks (None when the LLM failed to start)."""
        return None if self.engine is None else self.engine.cluster

    @property
    def rank(self) -> int:
        return self.cluster.rank

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def worker(self):
        """Rank 0's Worker (its Comm; its runner: the model shard and KV pool)."""
        return self.cluster.worker

    @property
    def policy(self) -> SPPolicy:
        """The per-step TP / SP / SP + overlap decision (mode and thresholds can be changed
        between calls: layers read each step's mode from its plan)."""
        return self.engine.policy

    @property
    def eos_ids(self) -> set[int]:
        return self.engine.eos_ids

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
        for p in params:
            self.engine.check_params(p)
        if self.cluster.torchrun and self.rank != 0:
            return self.cluster.follow_call()
        if self.cluster.torchrun:
            self.cluster.begin_call()
        engine = self.engine
        ids = [f"generate-{next(self._ids)}" for _ in requests]
        collectors = {}
        for request_id, (prompt, prompt_ids), p in zip(ids, requests, params):
            engine.add_request(request_id, prompt_ids, p, prompt)
            collectors[request_id] = OutputCollector(request_id, prompt, prompt_ids)
        done = {}
        try:
            while len(done) < len(ids):
                for delta in engine.step():
                    collectors[delta.request_id].add(delta)
                    if delta.finished:
                        done[delta.request_id] = collectors[delta.request_id].result()
        finally:
            for request_id in ids:
                if request_id not in done:  # interrupted: leave nothing behind in the engine
                    engine.abort_request(request_id)
        outputs = [done[i] for i in ids]
        if self.cluster.torchrun:
            outputs = self.cluster.end_call(outputs)
        return outputs

    def chat(self, messages, sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (list of {role, content}) or several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": self.chat_prompt_ids(conv)} for conv in conversations]
        return self.generate(prompts, sampling_params)

    def chat_prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """A conversation through the tokenizer's chat template, ready for the assistant's turn."""
        try:
            return chat_prompt_ids(self.tokenizer, messages, tools)
        except ValueError as e:
            raise ValueError(f"{self.cfg.model_dir}: {e}") from e

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
        try:
            return encode(self.tokenizer, text, what)
        except ValueError as e:
            raise ValueError(f"{self.cfg.model_dir}: {e}") from e

    # ---- statistics and lifetime ------------------------------------------------------------

    def comm_stats(self) -> dict:
        """Calls and bytes per communication op, and step counts (Engine.comm_stats)."""
        self._check_open()
        return self.engine.comm_stats()

    def weight_stats(self) -> list[dict]:
        """What each kind of weight runs on rank 0 (every TP rank of a stage holds the same
        bytes; other stages hold their own layers): one dict per (name, checkpoint type, format)
        with "count", "kernel" and "bytes" (layers/quant.py weight_rows)."""
        self._check_open()
        return weight_rows(self.worker.runner.model)

    def cache_stats(self) -> dict:
        """The paged KV cache: {"num_blocks", "block_size", "used_blocks" (held by unfinished
        requests), "prefix_queries", "prefix_hits" (prompt tokens looked up / served from the
        prefix cache), "preemptions"}."""
        self._check_open()
        return self.engine.cache_stats()

    def spec_stats(self) -> dict:
        """Speculative decoding since start: {"num_drafts" (verifications of at least one draft),
        "num_draft_tokens", "num_accepted_tokens", "mean_acceptance_length" (tokens a
        verification yields on average: 1 + accepted / drafts; None before any draft)}; zeros
        without speculative_config."""
        self._check_open()
        return spec_stats(self.engine)

    @property
    def compile_s(self) -> float:
        """Seconds this rank spent in torch.compile (Dynamo + the SP pass + Inductor), over every
        graph compiled so far; 0.0 without compile. The other ranks compile the same graphs
        at the same time. Steps that compiled include this time in their wall time."""
        compiled = self.worker.runner.compiled
        return 0.0 if compiled is None else compiled.compile_s

    def profile_memory(self, prompts, sampling_params: SamplingParams | None = None) -> list[int]:
        """Generate, and return each rank's peak activation memory (bytes) over the steps run."""
        self._check_open()
        if self.cluster.torchrun:
            raise RuntimeError("profile_memory runs with spawned ranks, not under torchrun")
        self.cluster.call("diagnose", "memory_on")
        self.generate(prompts, sampling_params)
        with self.cluster.guard():
            return self.cluster.call("diagnose", "report_memory")

    def time_collectives(self, ops: list[tuple[str, int, int]]) -> tuple[float, float]:
        """Run `ops` alone on stage 0's TP group, back to back, no compute: (wall seconds, CPU
        seconds its ranks spent). For benchmarks: the communication part of a step.

        ops: (name, rows, cols) per collective, the name of one of
        diagnostics.TIMED_COLLECTIVES and [rows, cols] the logical tensor comm_stats() counts for
        it (bench/analytic.py step_collectives lists a step's). Leaves comm_stats() as it was.
        """
        self._check_open()
        if self.cluster.torchrun:
            raise RuntimeError("time_collectives runs with spawned ranks, not under torchrun")
        if not ops:
            return 0.0, 0.0
        unknown = sorted({op for op, _, _ in ops} - {c.value for c in TIMED_COLLECTIVES})
        if unknown:
            raise ValueError(f"time_collectives times {[c.value for c in TIMED_COLLECTIVES]}, "
                             f"not {unknown}")
        payload = torch.tensor([[Collective(op).code, rows, cols] for op, rows, cols in ops],
                               dtype=torch.int64).view(-1)
        with self.cluster.guard():
            wall, cpu = self.cluster.call("diagnose", "time_collectives", payload)
        return wall, cpu

    def reset_comm_stats(self) -> None:
        self._check_open()
        self.engine.reset_comm_stats()

    def _check_open(self) -> None:
        if self.engine is None:
            raise RuntimeError("this LLM failed to start")
        self.cluster.check_open()

    def close(self) -> None:
        if self.engine is not None:
            self.cluster.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

