"""One rank: its stage's shard of the model, its KV cache, and the loop that follows rank 0's plans.

Under pipeline parallelism a step flows through the stages: the first embeds the tokens, each later
stage receives (hidden, residual) from the same TP rank of the stage before, and the last sends the
sampled rows' logits to rank 0. What crosses a boundary is this rank's share of the residual
stream: on an SP step its token shard, [T_pad / N, H] each; on a TP step the full [T, H] replica.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.config import EngineConfig, round_up
from seqpar.distributed.collectives import Collective
from seqpar.distributed.comm import Comm, group_dst
from seqpar.distributed.launch import (END_CALL, RPC, SHUTDOWN, STEP, ControlChannel, Outbox,
                                       backend_for, init_groups)
from seqpar.worker.memory import PeakMemory, allocate_kv_pool, keep_freed_memory
from seqpar.worker.batch import BatchState
from seqpar.worker.plan import StepDelta, StepPlan
from seqpar.engine.policy import measure_thresholds
from seqpar.worker.sampler import Sampler, SamplerOutput
from seqpar.models import MODELS

# Point-to-point tags: activations between stages, sampled tokens from the last stage to rank 0.
TAG_HIDDEN, TAG_SAMPLED = 1, 2
TIMED_COLLECTIVES = (Collective.ALL_REDUCE, Collective.REDUCE_SCATTER, Collective.ALL_GATHER,
                     Collective.GATHER)
"""The collectives time_collectives runs."""


def rank_threads(cfg: EngineConfig) -> int:
    if cfg.threads_per_rank:
        return cfg.threads_per_rank
    return max(1, (os.cpu_count() or 1) // cfg.parallel.world_size)


def rank_device(device: str, rank: int) -> torch.device:
    """This rank's device. "cuda" means one GPU per rank of this host: LOCAL_RANK under torchrun
    (global rank mod GPU count would be wrong across nodes), the rank when spawned (one host). An
    explicit "cuda:K" is honoured for a single rank; several ranks cannot share it."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return dev
    if dev.index is not None:
        if rank != 0 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(f"device={device!r} names one GPU, but several ranks run; pass "
                             "device='cuda' (one GPU per rank, by local rank)")
        return dev
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


class Sampled:
    """A step's drawn tokens on rank 0 ([sum(1 + k_i), 2 + 2K] float64, see pack_sampled and
    Worker._sample), maybe still arriving from the last stage."""

    def __init__(self, tensor: torch.Tensor | None, work=None):
        self.tensor, self.work = tensor, work

    def wait(self) -> torch.Tensor | None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.tensor


class Worker:
    def __init__(self, cfg: EngineConfig, rank: int, init_method: str | None = None):
        parallel = cfg.parallel
        self.cfg = cfg
        self.device = rank_device(cfg.device, rank)
        if self.device.type == "cpu":
            keep_freed_memory()  # activations live in host memory (memory.py says why)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.topo = topo = init_groups(backend_for(cfg.device), rank, parallel.tensor_parallel_size,
                                       parallel.pipeline_parallel_size, init_method)
        self.comm = Comm(topo.tp_group, topo.tp_rank, topo.tp_size, shm=parallel.shm)
        self.channel = ControlChannel(topo)
        self.outbox = Outbox(depth=topo.pp_size + 1)  # activations / logits sent on
        dtype = cfg.torch_dtype
        self.layers = parallel.stage_layers(cfg.model.num_layers, topo.stage)
        with torch.device(self.device):
            self.model = MODELS[cfg.model.model_type](cfg.model, self.comm, dtype, cfg.max_model_len,
                                                      self.layers)
        self.model.load_weights(cfg.model_dir, cfg.quantization, cfg.gguf_file)
        self.model.eval()
        self.sampler = Sampler(cfg.seed) if topo.rank == topo.sampler_source else None
        self.sampler_keys: set[int] = set()
        """Keys the sampler holds state for (kept over a preemption, dropped when released)."""
        self.batch = BatchState(cfg.max_num_seqs, round_up(cfg.max_model_len, cfg.block_size)
                                // cfg.block_size, cfg.block_size, parallel.tensor_parallel_size,
                                self.device)
        self.compiled = None
        """compile=True: runs every step compiled, one forward per kind of step (TP, SP,
        SP + overlap), each built on its first step; a single stage (LLM checks)."""
        if cfg.compile:
            from seqpar.compile.runner import CompiledModel
            self.compiled = CompiledModel(self.model)
        if cfg.num_blocks is None:  # CUDA default: what the device has left after a test step
            cfg.num_blocks = self._profile_num_blocks()
        self.kv_pool = self._allocate_kv(cfg.num_blocks)
        self.sp_threshold: int | None = None
        self.peak_bytes: int | None = None
        """While not None: the largest peak activation memory of the steps run since memory_on()."""
        if parallel.world_size > 1:
            dist.barrier()  # every rank loaded: a failed load surfaces here

    def _allocate_kv(self, num_blocks: int) -> torch.Tensor:
        """This stage's KV pool (memory.allocate_kv_pool), bound to its Attention layers."""
        return allocate_kv_pool(self.model, num_blocks, self.cfg.block_size, self.cfg.torch_dtype,
                                self.device)

    def _profile_num_blocks(self) -> int:
        """CUDA without a budget: blocks that fit in gpu_memory_utilization of the device after the
        weights and the activation peak of a max_num_batched_tokens prefill, the same on every
        rank (the smallest)."""
        cfg = self.cfg
        tokens = min(cfg.max_num_batched_tokens, cfg.max_model_len)
        blocks = round_up(tokens, cfg.block_size) // cfg.block_size
        pool = self._allocate_kv(blocks)
        plan = StepPlan(False, torch.zeros(tokens, dtype=torch.int64, device=self.device), [0],
                        [tokens], [True], [list(range(blocks))], self.comm.world_size,
                        cfg.block_size)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        with torch.inference_mode():
            if self.topo.prev is None and self.topo.next is None:
                self.model(plan)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        del pool
        _, total = torch.cuda.mem_get_info(self.device)
        weights = torch.cuda.memory_allocated(self.device)
        budget = int(total * cfg.gpu_memory_utilization) - weights - peak
        count = torch.tensor([max(0, budget // cfg.kv_block_bytes)], device=self.device)
        if self.cfg.parallel.world_size > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
        cfg.set_num_blocks(int(count.item()))
        return cfg.num_blocks

    def step(self, delta: StepDelta) -> Sampled | None:
        """Apply one step's delta to this rank's batch state and run the step (execute)."""
        plan = self.batch.apply(delta)
        if self.sampler is not None:
            for key in delta.released:
                self.sampler.remove(key)
                self.sampler_keys.discard(key)
            for r in delta.new:
                if r.key not in self.sampler_keys:  # else back from a preemption: state kept
                    self.sampler.add(r.key, r.params, r.token_ids[:r.num_prompt_tokens])
                    self.sampler_keys.add(r.key)
        return self.execute(plan)

    def execute(self, plan: StepPlan) -> Sampled | None:
        """Run this rank's stage of one step. Rank 0 gets the sampled tokens as a Sampled handle:
        with several stages they arrive later, from the last one. Other ranks get None."""
        topo = self.topo
        pending = self._expect_sampled(plan) if topo.rank == 0 and topo.pp_size > 1 else None
        with torch.inference_mode(), self._memory():
            h = residual = None
            if topo.prev is not None:
                rows = plan.padded // plan.world_size if plan.sp else plan.num_tokens
                buf = torch.empty(2, rows, self.cfg.model.hidden_size, dtype=self.cfg.torch_dtype,
                                  device=self.device)
                self.comm.recv(buf, topo.prev, TAG_HIDDEN).wait()
                h, residual = buf.unbind(0)
            if self.compiled is not None:
                out = self.compiled(plan)
            else:
                out = self.model(plan, h, residual)
            if topo.next is not None:
                # [2, rows, H]: one message for hidden + residual.
                self.outbox.add([self.comm.send(torch.stack(out), topo.next, TAG_HIDDEN)])
                return pending
            sampled = None if self.sampler is None else self._sample(out, plan)
        if topo.rank == 0:
            return Sampled(sampled)
        if sampled is not None and sampled.shape[0] > 0:
            self.outbox.add([self.comm.send(sampled, 0, TAG_SAMPLED)])
        return None

    def _sample(self, logits: torch.Tensor, plan: StepPlan) -> torch.Tensor:
        """The sampler rank: logits [R, V] of the step's logit rows -> the drawn sequences'
        tokens, packed for rank 0: per drawing sequence with k drafts (0 when it does not
        verify) 1 + k rows (pack_sampled's), the tokens verification kept first, NaN rows after
        them."""
        keys = [k for k, draw in zip(plan.keys, plan.draws) if draw]
        width = self.top_logprobs(keys)
        if not any(plan.num_drafts):
            if len(keys) < logits.shape[0]:  # some rows are not drawn from (prompts)
                logits = logits[plan.draw_rows]
            return pack_sampled(self.sampler.sample(logits, keys) if keys else None, len(keys),
                                width)
        drafts = [k for k, draw in zip(plan.num_drafts, plan.draws) if draw]
        offsets = [0]  # per drawing sequence: its first row of the packed output
        for k in drafts:
            offsets.append(offsets[-1] + 1 + k)
        packed = pack_sampled(None, offsets[-1], width)
        plain = [i for i, k in enumerate(drafts) if k == 0]
        if plain:
            out = self.sampler.sample(logits[[plan.draw_rows[i] for i in plain]],
                                      [keys[i] for i in plain])
            packed[[offsets[i] for i in plain]] = pack_sampled(out, len(plain), width)
        verifying = [i for i, k in enumerate(drafts) if k]
        rows = [r for i in verifying for r in range(plan.draw_rows[i] - drafts[i],
                                                    plan.draw_rows[i] + 1)]
        vlogits = logits[rows]  # [sum(k_i + 1), V]: per sequence the rows after each draft
        held = [self.batch.requests[keys[i]] for i in verifying]
        lists = [h.token_ids[h.computed - drafts[i]:h.computed] for h, i in zip(held, verifying)]
        q = None
        if plan.draft_probs:  # sampled draft-model drafts (greedy ones and n-gram: one-hot)
            q = [plan.draft_probs.get(keys[i]) for i in verifying]
            q = [F.one_hot(torch.tensor(d), logits.shape[1]).float() if x is None else x
                 for x, d in zip(q, lists)]
        kept = self.sampler.verify(vlogits, [keys[i] for i in verifying], lists, q)
        at = 0
        for i, tokens in zip(verifying, kept):
            n, first = len(tokens), offsets[i]
            packed[first:first + n, 0] = torch.tensor(tokens, dtype=torch.float64)
            asked = self.batch.requests[keys[i]].params.logprobs
            if asked is not None:  # row j of the sequence scores its j-th kept token
                out = logprob_rows(vlogits[at:at + n], tokens, width)
                packed[first:first + n] = pack_sampled(out, n, width)
            at += drafts[i] + 1
        return packed

    def top_logprobs(self, keys: list[int]) -> int:
        """K: the most top log-probabilities any of these requests asks for (0: none)."""
        asked = (self.batch.requests[k].params.logprobs for k in keys)
        return max([0, *(n for n in asked if n is not None)])

    def _expect_sampled(self, plan: StepPlan) -> Sampled:
        """Rank 0: post the receive of a step's drawn tokens before running its first stage."""
        keys = [k for k, draw in zip(plan.keys, plan.draws) if draw]
        rows = sum(1 + k for k, draw in zip(plan.num_drafts or [0] * len(plan.draws), plan.draws)
                   if draw)
        sampled = torch.empty(rows, 2 + 2 * self.top_logprobs(keys), dtype=torch.float64)
        if sampled.shape[0] == 0:
            return Sampled(sampled)
        return Sampled(sampled, self.comm.recv(sampled, self.topo.sampler_source, TAG_SAMPLED))

    def _memory(self):
        return contextlib.nullcontext() if self.peak_bytes is None else _PeakTracker(self)

    def report_memory(self) -> list[int] | None:
        """Gather every rank's peak since memory_on() to rank 0 (a list there, None elsewhere)."""
        mine = torch.tensor([self.peak_bytes or 0], dtype=torch.int64)
        self.peak_bytes = None
        group = self.channel.group
        if group is None:
            return [int(mine)]
        world = dist.get_world_size(group)
        parts = [torch.zeros_like(mine) for _ in range(world)] if self.topo.rank == 0 else None
        dist.gather(mine, parts, dst=0, group=group)
        return None if parts is None else [int(p) for p in parts]

    def report_p2p(self) -> torch.Tensor:
        """Sum every rank's [send calls, send bytes, recv calls, recv bytes] on rank 0 (returned
        there) and zero those counters on every rank."""
        counts = [x for op in (Collective.SEND, Collective.RECV)
                  for x in self.comm.stats.pop(op.value, (0, 0))]
        total = torch.tensor(counts, dtype=torch.int64)
        dist.reduce(total, 0, group=self.channel.group)
        return total

    def measure(self) -> tuple[int, int]:
        """Time TP / SP / SP + overlap on this group (every rank together); see engine/policy.py."""
        layer = self.model.model.layers[0]  # this stage's first decoder layer, as a step runs it
        self.sp_threshold, self.overlap_threshold, self.sp_table = measure_thresholds(
            layer.post_attention_layernorm, layer.mlp, self.comm,
            with_overlap=self.cfg.parallel.overlap)
        return self.sp_threshold, self.overlap_threshold

    def time_collectives(self, payload: torch.Tensor) -> list[float] | None:
        """Run a list of collectives alone, back to back on stage 0's TP group with no compute
        between them, and time them (the bench's "communication alone").

        payload: int64 (Collective.code, rows, cols) per collective of TIMED_COLLECTIVES;
        [rows, cols] is its
        logical tensor as comm_stats() counts it: all_gather joins [rows / N, cols] shards, gather
        joins [rows, cols / N] vocab shards. Inputs are made before the clock starts, as a step
        has them; outputs are allocated inside, as in a step. The ranks start together (a
        barrier); the communication counters are left as they were. Other stages do nothing.

        Returns on rank 0 [wall seconds, CPU seconds all the group's processes spent (every thread:
        gloo's too)]; None on the other ranks.
        """
        comm = self.comm
        if self.topo.stage != 0 or comm.world_size == 1:
            return [0.0, 0.0] if self.topo.rank == 0 else None
        n, gen = comm.world_size, torch.Generator().manual_seed(0)
        runs = {Collective.ALL_REDUCE: comm.all_reduce, Collective.ALL_GATHER: comm.all_gather_tokens,
                Collective.REDUCE_SCATTER: lambda x: comm.reduce_scatter_tokens(x, x.shape[0]),
                Collective.GATHER: comm.gather_vocab}
        inputs, calls = {}, []
        for code, rows, cols in payload.view(-1, 3).tolist():
            op = Collective.from_code(code)
            # This rank's input: all_gather's token shard, gather's vocab shard, else the whole.
            shape = (rows // n if op is Collective.ALL_GATHER else rows,
                     cols // n if op is Collective.GATHER else cols)
            if (op, shape) not in inputs:  # one per shape (all_reduce sums into it: values only)
                inputs[op, shape] = torch.randn(shape, generator=gen).to(self.device,
                                                                         self.cfg.torch_dtype)
            calls.append((runs[op], inputs[op, shape]))
        counters = {op: list(v) for op, v in comm.stats.items()}
        dist.barrier(group=comm.group)
        wall, cpu = time.perf_counter(), time.process_time()
        for run, x in calls:
            run(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        comm.stats.clear()
        comm.stats.update(counters)
        cpu_all = torch.tensor([cpu], dtype=torch.float64, device=self.device)
        dist.reduce(cpu_all, group_dst(comm.group, 0), group=comm.group)
        return [wall, cpu_all.item()] if self.topo.rank == 0 else None

    def memory_on(self) -> None:
        """Start tracking the peak activation memory of the steps that follow."""
        self.peak_bytes = 0

    def reset_stats(self) -> None:
        self.comm.reset()

    def follow(self) -> None:
        """Run rank 0's commands until it ends the call (torchrun) or shuts down."""
        while True:
            cmd, payload = self.channel.recv()
            if cmd == STEP:
                self.step(StepDelta.decode(payload))
            elif cmd == RPC:
                method, args = decode_call(payload)
                getattr(self, method)(*args)
            elif cmd in (END_CALL, SHUTDOWN):
                # The ranks below have the command (and every step's data) before this returns.
                self.channel.flush()
                self.outbox.flush()
                return
            else:
                raise RuntimeError(f"unknown command {cmd} from rank 0")


def pack_sampled(out: SamplerOutput | None, rows: int, k: int) -> torch.Tensor:
    """The sampler's output as one [D, 2 + 2K] float64 tensor for rank 0: per drawn row its
    token, the token's logprob (NaN when not asked), then K top token ids and K logprobs."""
    packed = torch.full((rows, 2 + 2 * k), float("nan"), dtype=torch.float64)
    if out is None:
        return packed
    packed[:, 0] = out.tokens.cpu().double()
    if out.logprobs is not None:
        packed[:, 1] = out.logprobs.cpu().double()
    if k and out.top_ids is not None:
        have = min(k, out.top_ids.shape[1])
        packed[:, 2:2 + have] = out.top_ids[:, :have].cpu().double()
        packed[:, 2 + k:2 + k + have] = out.top_logprobs[:, :have].cpu().double()
    return packed


def logprob_rows(logits: torch.Tensor, tokens: list[int], k: int) -> SamplerOutput:
    """Verified tokens' logprobs: logits [n, V] (row j the target's after the j-th token before
    it), tokens [n] -> SamplerOutput with each token's logprob and the K top (model distribution,
    as Sampler.sample reports them)."""
    logprobs = torch.log_softmax(logits, dim=-1)  # [n, V]
    ids = torch.tensor(tokens, device=logits.device)
    top = logprobs.topk(k, dim=-1) if k else None
    return SamplerOutput(ids, logprobs.gather(1, ids[:, None])[:, 0],
                         None if top is None else top.indices, None if top is None else top.values)


def unpack_sampled(sampled: torch.Tensor, asked: list[int | None], drafts: list[int] | None = None
                   ) -> list[list[tuple[int, dict[int, float] | None]]]:
    """Rank 0: the packed rows -> per drawing sequence its tokens (one, or with drafts[i] > 0 the
    1 to drafts[i] + 1 that verification kept), each (token, {token id: logprob} or None): the
    top `asked` entries and the chosen token's; asked: per sequence, its logprobs setting."""
    k = (sampled.shape[1] - 2) // 2
    rows, results, at = sampled.tolist(), [], 0
    for i, n in enumerate(asked):
        size = 1 + (drafts[i] if drafts else 0)
        tokens = []
        for row in rows[at:at + size]:
            if row[0] != row[0]:  # NaN: past the kept tokens
                break
            token = int(row[0])
            entry = None
            if n is not None:
                entry = {int(t): v for t, v in zip(row[2:2 + n], row[2 + k:2 + k + n])}
                entry[token] = row[1]
            tokens.append((token, entry))
        results.append(tokens)
        at += size
    return results


def encode_call(method: str, args: tuple) -> torch.Tensor:
    """An RPC (a Worker method and its arguments) as the int64 payload the control channel carries:
    [byte count, pickled bytes padded to 8-byte words]."""
    data = pickle.dumps((method, args))
    words = torch.zeros(round_up(len(data), 8), dtype=torch.uint8)
    words[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return torch.cat([torch.tensor([len(data)]), words.view(torch.int64)])


def decode_call(payload: torch.Tensor) -> tuple[str, tuple]:
    size = int(payload[0])
    return pickle.loads(payload[1:].view(torch.uint8)[:size].numpy().tobytes())


class _PeakTracker(PeakMemory):
    """PeakMemory of one step, folded into the worker's running peak."""

    def __init__(self, worker: Worker):
        super().__init__(worker.device)
        self.worker = worker

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.worker.peak_bytes = max(self.worker.peak_bytes, self.peak)
        return False


def follower(rank: int, cfg: EngineConfig, init_method: str) -> None:
    """Spawned rank's body: build, then follow until rank 0 shuts down."""
    torch.set_num_threads(rank_threads(cfg))
    worker = Worker(cfg, rank, init_method)
    worker.follow()  # the process then exits, closing its connections; no teardown handshake
