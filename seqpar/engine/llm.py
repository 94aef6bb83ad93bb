"""LLM: the public entry point. Validates, starts the ranks, and drives generation from rank 0."""
from __future__ import annotations

import logging
import os
import sys
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from seqpar.compile.runner import check_single_stage
from seqpar.config import EngineConfig, ModelConfig, ParallelConfig
from seqpar.distributed.launch import (END_CALL, MEASURE, MEMORY_ON, MEMORY_REPORT, P2P_REPORT,
                                       RESET_STATS, SHUTDOWN, STEP, TIME_COMM, Spawner, free_port,
                                       in_torchrun)
from seqpar.engine.policy import NEVER, SPPolicy
from seqpar.engine.sampler import SamplingParams, sample
from seqpar.engine.scheduler import Scheduler, Sequence
from seqpar.engine.worker import COLLECTIVES, Worker, follower, rank_threads
from seqpar.loader.resolve import resolve_model
from seqpar.report import sp_blockers

log = logging.getLogger("seqpar")
COMM_OPS = ("all_reduce", "reduce_scatter", "all_gather", "gather", "send", "recv")


@dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    """"stop" (EOS or a stop string) or "length" (max_tokens or max_model_len)."""
    logprobs: list[dict[int, float]] | None = None


@dataclass
class _Request:
    prompt: str | None
    ids: list[int]


def _setup_logging() -> None:
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class LLM:
    """A Llama-family model served over tensor_parallel_size x pipeline_parallel_size ranks.
    See DESIGN.md for the API."""

    def __init__(self, model: str = "smollm2", tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, sequence_parallel: str = "auto",
                 overlap: bool = False, compile: bool = False, dtype: str = "float32",
                 max_model_len: int | None = None, seed: int = 0, *, sp_min_tokens: int | None = None,
                 max_num_seqs: int = 64, max_num_batched_tokens: int | None = None,
                 device: str | None = None, threads_per_rank: int | None = None, shm: bool = True):
        _setup_logging()
        self._spawner = None
        self._closed = True
        parallel = ParallelConfig(tensor_parallel_size, pipeline_parallel_size, sequence_parallel,
                                  sp_min_tokens, overlap, shm)
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
                                max_num_batched_tokens, seed, device, threads_per_rank)
        self.cfg.extra["compile"] = compile  # read by Worker: seqpar/compile/runner.py
        world = parallel.world_size
        if device.startswith("cuda") and world > torch.cuda.device_count() and not in_torchrun():
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = {world} needs "
                             f"{world} GPUs; {torch.cuda.device_count()} visible")
        self.tokenizer = _load_tokenizer(model_dir)
        self.eos_ids = _eos_ids(model_dir, model_cfg, self.tokenizer)

        # Start the ranks: validation is over, nothing above started a process.
        self._torchrun = world > 1 and in_torchrun()
        if self._torchrun:
            self.rank = int(os.environ["RANK"])
            if int(os.environ["WORLD_SIZE"]) != world:
                raise ValueError(f"torchrun started {os.environ['WORLD_SIZE']} ranks; "
                                 f"tensor_parallel_size x pipeline_parallel_size = {world}")
            init_method = "env://"
        else:
            if world > 1 and dist.is_initialized():
                raise RuntimeError("a torch.distributed process group is already running in this "
                                   "process (another LLM with several ranks?); close it first")
            self.rank = 0
            init_method = f"tcp://127.0.0.1:{free_port()}"
        self._threads = torch.get_num_threads()
        if world > 1:
            torch.set_num_threads(rank_threads(self.cfg))
        self._closed = False
        # Ends the ranks when the LLM is collected or the interpreter exits without close().
        # [spawner, owns the process group, control channel]: what _shutdown must end, shared
        # with the finalizer.
        self._spawner_box = [None, world > 1 and not dist.is_initialized(), None]
        weakref.finalize(self, LLM._shutdown, self._spawner_box)
        with self._guard():
            if world > 1 and not self._torchrun:
                self._spawner = Spawner(world, follower, (self.cfg, init_method))
                self._spawner_box[0] = self._spawner
                self._spawner.wait_ready()
            self.worker = Worker(self.cfg, self.rank, init_method)
            self.channel = self._spawner_box[2] = self.worker.channel
            blockers = sp_blockers(self.worker.model)
            if blockers and sequence_parallel != "off":
                log.warning("seqpar: this model runs without sequence parallelism: "
                            + "; ".join(blockers))
                sequence_parallel = "off"
            thresholds = self._thresholds(sequence_parallel)
        self.policy = SPPolicy(sequence_parallel, tensor_parallel_size, thresholds[0],
                               overlap=overlap, overlap_threshold=thresholds[1])
        self.steps = {"sp": 0, "tp": 0, "padded_tokens": 0}
        self._p2p = [0, 0, 0, 0]  # the whole pipeline's [send calls, bytes, recv calls, bytes]
        self._max_in_flight = pipeline_parallel_size  # steps in flight at once (benchmarks lower it)
        self._next_index = 0

    # ---- start-up ---------------------------------------------------------------------------

    def _thresholds(self, mode: str) -> tuple[int | None, int | None]:
        """(SP threshold, overlap threshold) in tokens for "auto": given, or measured on all ranks."""
        parallel = self.cfg.parallel
        if mode != "auto" or parallel.tensor_parallel_size == 1:
            return None, None
        if parallel.sp_min_tokens is not None:
            log.info(f"seqpar: SP threshold {parallel.sp_min_tokens} tokens (sp_min_tokens)")
            return parallel.sp_min_tokens, parallel.sp_min_tokens
        if not self._torchrun:
            self.channel.send(MEASURE)
        sp, overlap = self.worker.measure()
        said = lambda t: "never" if t >= NEVER else f"{t} tokens"  # noqa: E731
        log.info(f"seqpar: measured thresholds: SP from {said(sp)}"
                 + (f", SP + overlap from {said(overlap)}" if parallel.overlap else ""))
        return sp, overlap

    # ---- generation ------------------------------------------------------------------------

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        self._check_open()
        if self._torchrun and self.rank != 0:
            # Follow rank 0's plans for this call, then return the outputs it broadcasts.
            self.worker.follow()
            box = [None]
            dist.broadcast_object_list(box, 0, group=self.channel.group)
            return box[0]
        requests = self._normalize(prompts)
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(requests)
        if len(params) != len(requests):
            raise ValueError(f"{len(params)} sampling params for {len(requests)} prompts")
        with self._guard():
            outputs = self._run(requests, params)
            if self._torchrun:
                self.channel.send(END_CALL)
                dist.broadcast_object_list([outputs], 0, group=self.channel.group)
                self.channel.flush()
        return outputs

    def chat(self, messages, sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (list of {role, content}) or several."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.cfg.model_dir} has no tokenizer with a chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": _as_ids(self.tokenizer.apply_chat_template(
            conv, add_generation_prompt=True, tokenize=True))} for conv in conversations]
        return self.generate(prompts, sampling_params)

    def _run(self, requests: list[_Request], params: list[SamplingParams]) -> list[RequestOutput]:
        cfg = self.cfg
        sched = Scheduler(cfg.max_num_seqs, cfg.max_num_batched_tokens,
                          cfg.parallel.tensor_parallel_size)
        seqs = []
        for req, p in zip(requests, params):
            gen = torch.Generator().manual_seed(p.seed if p.seed is not None
                                                else cfg.seed * 1_000_003 + self._next_index)
            self._next_index += 1
            seq = Sequence(len(seqs), req.ids, p, gen)
            seqs.append(seq)
            sched.add(seq)
        # Up to pp steps in flight, one per stage (pp independent batches): a step depends only on
        # its own sequences' last samples, so stage 0 runs the next step while later stages still
        # run earlier ones. With one stage this is: schedule, run, sample.
        depth = self._max_in_flight
        in_flight = deque()
        while sched.has_work():
            while len(in_flight) < depth:
                step_seqs, counts = sched.schedule(parts=depth - len(in_flight))
                if not step_seqs:
                    break  # every runnable sequence waits for a step in flight
                total = sum(counts)
                plan = sched.build_plan(step_seqs, counts, *self.policy.decide(total),
                                        device=self.worker.device)
                self.steps["sp" if plan.sp else "tp"] += 1
                self.steps["padded_tokens"] += plan.padded - total
                self.channel.send(STEP, plan.encode())
                in_flight.append((plan, step_seqs, counts, self.worker.execute(plan)))
            plan, step_seqs, counts, pending = in_flight.popleft()
            logits = pending.wait()
            sched.complete(step_seqs, counts)
            sampled = [seq for seq, flag in zip(step_seqs, plan.sample) if flag]
            tokens, logprobs = sample(logits, [s.params for s in sampled],
                                      [s.generator for s in sampled])
            for seq, token, lp in zip(sampled, tokens, logprobs):
                self._append(sched, seq, token, lp)
        if cfg.parallel.pipeline_parallel_size > 1:
            self.channel.send(P2P_REPORT)
            for i, v in enumerate(self.worker.report_p2p().tolist()):
                self._p2p[i] += v
        # Every send has been received by now (all logits are back): release them.
        self.channel.flush()
        self.worker.outbox.flush()
        return [RequestOutput(req.prompt, req.ids, s.output_ids, s.text, s.finish_reason,
                              s.logprobs if s.params.logprobs is not None else None)
                for req, s in zip(requests, seqs)]

    def _append(self, sched: Scheduler, seq: Sequence, token: int, logprob: dict | None) -> None:
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        p = seq.params
        reason = None
        if token in self.eos_ids and not p.ignore_eos:
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or len(seq.all_ids) >= self.cfg.max_model_len:
            reason = "length"
        if p.stop and self.tokenizer is not None:
            text = self._decode(seq.output_ids)
            cut = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
            if cut >= 0:
                seq.text = text[:cut]
                sched.finish(seq, "stop")
                return
        if reason is not None:
            seq.text = self._decode(seq.output_ids)
            sched.finish(seq, reason)

    def _decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=True)

    def _normalize(self, prompts) -> list[_Request]:
        """str | list[str] | list[int] | list[list[int]] | {"prompt_token_ids"|"prompt": ..} | list of those."""
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
                if self.tokenizer is None:
                    raise ValueError(f"prompt {i} is text but {self.cfg.model_dir} has no tokenizer "
                                     "files; pass token ids instead")
                req = _Request(p, _as_ids(self.tokenizer(p)["input_ids"]))
            else:
                req = _Request(None, [int(t) for t in p])
            self._check_prompt(i, req.ids)
            requests.append(req)
        return requests

    def _check_prompt(self, i: int, ids: list[int]) -> None:
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        if len(ids) > self.cfg.max_model_len:
            raise ValueError(f"prompt {i} has {len(ids)} tokens, longer than "
                             f"max_model_len={self.cfg.max_model_len}")
        vocab = self.cfg.model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocab (size {vocab})")

    # ---- statistics and lifetime ------------------------------------------------------------

    def comm_stats(self) -> dict:
        """Calls and bytes per communication op, and step counts.

        Collectives are rank 0's: every rank of its TP group issues the same; with several stages,
        they are stage 0's. "send" / "recv" are the whole pipeline's point-to-point traffic,
        summed over all ranks at the end of each generate call: the activations crossing stage
        boundaries (hidden + residual, each rank its share) and the sampled logits going from the
        last stage to rank 0.
        """
        self._check_open()
        stats = {op: {"calls": 0, "bytes": 0} for op in COMM_OPS}
        stats.update(self.worker.comm.snapshot())
        if self.cfg.parallel.pipeline_parallel_size > 1:
            calls, nbytes, rcalls, rbytes = self._p2p
            stats["send"] = {"calls": calls, "bytes": nbytes}
            stats["recv"] = {"calls": rcalls, "bytes": rbytes}
        stats["steps"] = dict(self.steps)
        return stats

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
        if self._torchrun:
            raise RuntimeError("profile_memory runs with spawned ranks, not under torchrun")
        self.channel.send(MEMORY_ON)
        self.worker.peak_bytes = 0
        self.generate(prompts, sampling_params)
        with self._guard():
            self.channel.send(MEMORY_REPORT)
            return self.worker.report_memory()

    def time_collectives(self, ops: list[tuple[str, int, int]]) -> tuple[float, float]:
        """Run `ops` alone on stage 0's TP group, back to back, no compute: (wall seconds, CPU
        seconds its ranks spent). For benchmarks: the communication part of a step.

        ops: (name, rows, cols) per collective, a name of worker.COLLECTIVES and [rows, cols] the
        logical tensor comm_stats() counts for it (bench/analytic.py step_collectives lists a
        step's). Leaves comm_stats() as it was.
        """
        self._check_open()
        if self._torchrun:
            raise RuntimeError("time_collectives runs with spawned ranks, not under torchrun")
        if not ops:
            return 0.0, 0.0
        payload = torch.tensor([[COLLECTIVES.index(op), rows, cols] for op, rows, cols in ops],
                               dtype=torch.int64).view(-1)
        with self._guard():
            self.channel.send(TIME_COMM, payload)
            wall, cpu = self.worker.time_collectives(payload)
        return wall, cpu

    def reset_comm_stats(self) -> None:
        self._check_open()
        self.worker.comm.reset()
        self.steps = {"sp": 0, "tp": 0, "padded_tokens": 0}
        self._p2p = [0, 0, 0, 0]
        if not self._torchrun:
            self.channel.send(RESET_STATS)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this LLM is closed")

    def _guard(self):
        return _RankGuard(self)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._torchrun:
            # Every rank calls close(); no rank tears its connections down while another still
            # uses them (gloo aborts the process when a peer vanishes mid-teardown).
            dist.barrier(group=self.channel.group)
        LLM._shutdown(self._spawner_box)
        torch.set_num_threads(self._threads)

    @staticmethod
    def _shutdown(box) -> None:
        spawner, owns_group, channel = box
        if spawner is not None:
            asked = False
            try:
                if channel is not None and spawner.alive():
                    channel.send(SHUTDOWN)
                    channel.flush()  # taken by the ranks below before the group goes
                    asked = True
            except Exception:
                pass  # a rank already gone: stop() ends the rest
            spawner.stop(timeout=10.0 if asked else 0.0)
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
        box[:] = [None, False, None]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _RankGuard:
    """On rank 0 (spawn mode): turn a collective broken by a dying rank into that rank's error."""

    def __init__(self, llm: LLM):
        self.llm = llm

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            return False
        spawner = self.llm._spawner
        # A ValueError is the caller's own mistake, raised before any step ran; anything else
        # on rank 0 is most likely a collective broken by another rank, which says why.
        reason = None if spawner is None or isinstance(exc, ValueError) else spawner.failure(5.0)
        self.llm._closed = True
        self.llm._spawner_box[2] = None  # the ranks cannot be asked politely any more
        LLM._shutdown(self.llm._spawner_box)
        if reason is not None:
            raise RuntimeError(reason) from exc
        return False


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
        import json
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
