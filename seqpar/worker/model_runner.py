"""The model runner of one rank: its stage's shard of the model, its KV pool, the step's input
state (batch.py) and, on the sampler rank, the sampler; it runs the forward and draws the tokens.

Under pipeline parallelism a step flows through the stages: the first embeds the tokens, each later
stage receives (hidden, residual) from the same TP rank of the stage before, and the last sends the
sampled rows' logits to rank 0. What crosses a boundary is this rank's share of the residual
stream: on an SP step its token shard, [T_pad / N, H] each; on a TP step the full [T, H] replica.
"""
from __future__ import annotations

import contextlib
from itertools import accumulate

import torch
import torch.distributed as dist
import torch.nn.functional as F

from seqpar.config import EngineConfig, round_up
from seqpar.distributed.comm import Comm
from seqpar.distributed.launch import Outbox, Topology
from seqpar.worker.memory import allocate_kv_pool
from seqpar.worker.batch import BatchState
from seqpar.worker.plan import StepDelta, StepPlan
from seqpar.worker.sampler import Sampler, SamplerOutput
from seqpar.structured_output import GrammarFactory
from seqpar.models import MODELS

# Point-to-point tags: activations between stages, sampled tokens from the last stage to rank 0.
TAG_HIDDEN, TAG_SAMPLED = 1, 2


class Sampled:
    """A step's drawn tokens on rank 0 ([sum(1 + k_i), 2 + 2K] float64, see pack_sampled and
    ModelRunner._sample; then the step's prompt-logprob rows, pack_entries), maybe still arriving
    from the last stage."""

    def __init__(self, tensor: torch.Tensor | None, work=None):
        self.tensor, self.work = tensor, work

    def wait(self) -> torch.Tensor | None:
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.tensor


class ModelRunner:
    """One rank's model work: build its stage's shard, own the KV pool and the step's input state
    (BatchState), run each step's forward and, on the sampler rank, draw its tokens."""

    def __init__(self, cfg: EngineConfig, comm: Comm, topo: Topology, outbox: Outbox,
                 device: torch.device):
        """Build this rank's stage of the model on `device`, load its shard and allocate its KV
        pool. comm: its TP group; outbox: where its sends to the next stage / rank 0 wait."""
        parallel = cfg.parallel
        self.cfg, self.comm, self.topo, self.outbox, self.device = cfg, comm, topo, outbox, device
        self.probe = contextlib.nullcontext
        """The context each step runs in: the Worker binds its Diagnostics' memory probe."""
        dtype = cfg.torch_dtype
        self.layers = parallel.stage_layers(cfg.model.num_layers, topo.stage)
        with torch.device(self.device):
            self.model = MODELS[cfg.model.model_type](cfg.model, comm, dtype, cfg.max_model_len,
                                                      self.layers)
        self.model.load_weights(cfg.model_dir, cfg.quantization, cfg.gguf_file)
        self.model.eval()
        self.sampler = None
        if topo.rank == topo.sampler_source:  # the grammar compiler is built on first use
            self.sampler = Sampler(cfg.seed, grammar=GrammarFactory(cfg.model_dir, cfg.model))
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
        self.num_blocks = cfg.num_blocks
        """Blocks in this rank's pool, the same on every rank (the engine's config carries it)."""
        if self.num_blocks is None:  # CUDA default: what the device has left after a test step
            self.num_blocks = self._profile_num_blocks()
        self.kv_pool = self._allocate_kv(self.num_blocks)

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
        return cfg.check_num_blocks(int(count.item()))

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
        """The sampler rank: logits [R, V] of the step's logit rows -> packed for rank 0: per
        drawing sequence with k drafts (0 when it does not verify) 1 + k rows (pack_sampled's),
        the tokens verification kept first, NaN rows after them; then the prompt-logprob rows
        (pack_entries)."""
        keys = [k for k, draw in zip(plan.keys, plan.draws) if draw]
        prompt = self.prompt_rows(plan)
        width = self.top_logprobs(keys, prompt)
        packed = self._draw(logits, plan, keys, width)
        if not prompt:
            return packed
        offsets = [0, *accumulate(plan.logit_rows)]  # per sequence: its first of the R rows
        parts = [packed]
        for i, first_pos, _, k in prompt:
            entries = self.sampler.prompt_logprobs(logits[offsets[i]:offsets[i + 1]],
                                                   plan.keys[i], first_pos)
            prompt_ids = self.batch.requests[plan.keys[i]].token_ids
            parts.append(pack_entries([e for e in entries if e is not None],
                                      prompt_ids[first_pos + 1:], k, width))
        return torch.cat(parts)

    def _draw(self, logits: torch.Tensor, plan: StepPlan, keys: list[int],
              width: int) -> torch.Tensor:
        """The drawn sequences' rows of _sample: sampled, or verified where the step carries
        drafts."""
        if not any(plan.num_drafts):
            if len(keys) < logits.shape[0]:  # some rows are not drawn from (prompts)
                logits = logits[plan.draw_rows]
            return pack_sampled(self.sampler.sample(logits, keys) if keys else None, len(keys),
                                width)
        drafts = plan.drawn_drafts
        offsets = [0, *accumulate(1 + k for k in drafts)]  # per drawing sequence: first row
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

    def prompt_rows(self, plan: StepPlan) -> list[tuple[int, int, int, int]]:
        """The step's sequences with prompt-logprob rows: (index, first_pos, prompt tokens
        scored, top tokens asked), see prompt_logprob_rows."""
        rows = []
        for i, (key, start, n, m) in enumerate(zip(plan.keys, plan.starts, plan.lens,
                                                   plan.logit_rows)):
            held = self.batch.requests[key]
            scored = prompt_logprob_rows(held.params, held.num_prompt_tokens, start, n, m)
            if scored is not None:
                rows.append((i, *scored, held.params.prompt_logprobs))
        return rows

    def top_logprobs(self, keys: list[int], prompt=()) -> int:
        """K: the most top log-probabilities any of these requests asks for, for its drawn row or
        its prompt rows (prompt: prompt_rows) (0: none)."""
        asked = [self.batch.requests[k].params.logprobs for k in keys]
        return max([0, *(n for n in asked if n is not None), *(k for *_, k in prompt)])

    def _expect_sampled(self, plan: StepPlan) -> Sampled:
        """Rank 0: post the receive of a step's drawn tokens (and prompt-logprob rows) before
        running its first stage."""
        keys = [k for k, draw in zip(plan.keys, plan.draws) if draw]
        prompt = self.prompt_rows(plan)
        rows = sum(1 + k for k in plan.drawn_drafts) + sum(scored for _, _, scored, _ in prompt)
        sampled = torch.empty(rows, 2 + 2 * self.top_logprobs(keys, prompt),
                              dtype=torch.float64)
        if sampled.shape[0] == 0:
            return Sampled(sampled)
        return Sampled(sampled, self.comm.recv(sampled, self.topo.sampler_source, TAG_SAMPLED))

    def _memory(self):
        return self.probe()


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


def prompt_logprob_rows(params, num_prompt_tokens: int, start: int, n: int,
                        m: int) -> tuple[int, int] | None:
    """A sequence running tokens [start, start + n) with m logit rows: (first_pos, prompt tokens
    its rows score) when it asks for prompt logprobs and its logit rows begin inside the prompt,
    else None. Row j (position first_pos + j) scores prompt token first_pos + j + 1; the row of
    the prompt's last token scores nothing (it is sampled from). A recompute after a preemption
    that already sampled has one logit row, past the prompt: None."""
    first_pos = start + n - m
    if params.prompt_logprobs is None or m == 0 or first_pos >= num_prompt_tokens:
        return None
    return first_pos, min(m, num_prompt_tokens - 1 - first_pos)


def pack_entries(entries: list[dict[int, float]], targets: list[int], k: int,
                 width: int) -> torch.Tensor:
    """Prompt-logprob entries (Sampler.prompt_logprobs', without the leading None) for the prompt
    tokens `targets` as rows laid out like pack_sampled's ([E, 2 + 2 * width] float64): the
    prompt token and its logprob, then the k top ids and logprobs (an entry lists its top k
    first, then the prompt token when it is not among them)."""
    packed = torch.full((len(entries), 2 + 2 * width), float("nan"), dtype=torch.float64)
    for row, entry, target in zip(packed, entries, targets):
        row[0], row[1] = target, entry[target]
        for j, (t, v) in enumerate(list(entry.items())[:k]):
            row[2 + j], row[2 + width + j] = t, v
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

