"""The engine: requests in, one flat step at a time, tokens out.

    engine.add_request("a", prompt_ids, SamplingParams(...))
    while engine.has_unfinished():
        for delta in engine.step():    # what is new for each request that got a token (or
            ...                        # finished) in this step: outputs.DeltaOutput
    engine.abort_request("a")          # frees its KV blocks at once

It owns the scheduler (and through it the block manager) and drives the ranks (Cluster). It is
not thread-safe: one thread calls it (LLM.generate's loop, or the server's engine thread).
Under pipeline parallelism up to pp steps are in flight, one per stage: step() issues steps until
that many are out, then completes the oldest.

Speculative decoding (a Speculator, rank 0 only): each decode step of a sequence may become a
verification step. The Speculator proposes k drafts; the step runs the sequence's last token and
the drafts (1 + k rows, k + 1 logit rows), within the step's token budget and the free blocks
(speculation never preempts: drafts that find no room are dropped). The sampler rank verifies
(Sampler.verify) and sends back the tokens kept; rank 0 appends them through the output processor
(a stop string, EOS or max_tokens may end the request inside the run), rolls the KV of the
rejected drafts back (BlockManager.rollback; the ranks follow through the next delta's rollback
field) and tells the Speculator how many it accepted.
"""
from __future__ import annotations

from collections import deque

from seqpar.config import EngineConfig, SpeculativeConfig, round_up
from seqpar.distributed.collectives import Collective
from seqpar.engine.cluster import Cluster
from seqpar.engine.output_processor import OutputProcessor
from seqpar.engine.outputs import DeltaOutput
from seqpar.engine.policy import SPPolicy
from seqpar.sampling_params import SamplingParams
from seqpar.structured_output import validate as validate_grammar
from seqpar.worker.sampler import SEED_MIX
from seqpar.worker.model_runner import prompt_logprob_rows, unpack_sampled
from seqpar.engine.scheduler import Scheduler
from seqpar.engine.sequence import Sequence
from seqpar.spec.speculator import Speculator

STEP_COUNTS = {"sp": 0, "tp": 0, "sp_verify": 0, "tp_verify": 0, "padded_tokens": 0}
"""comm_stats()["steps"]: steps run SP / TP, of those the verification steps (some sequence
verifies drafts), and the padding rows SP steps added."""

MAX_LOGPROBS = 20
"""Most top tokens a request may ask per position, generated or prompt (vLLM's default
max_logprobs, OpenAI's top_logprobs limit): each is two more columns of every sampled row."""


class Engine:
    def __init__(self, cfg: EngineConfig, cluster: Cluster, policy: SPPolicy, tokenizer,
                 eos_ids: set[int], spec: SpeculativeConfig | None = None):
        self.cfg, self.cluster, self.policy = cfg, cluster, policy
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.scheduler = Scheduler(cfg)
        self.spec = spec
        self.speculator = None
        """Proposes draft tokens (rank 0 only: the other ranks follow its deltas)."""
        if spec is not None and cluster.rank == 0:
            self.speculator = Speculator(spec, cfg, cluster.worker.device)
            self.scheduler.lookahead = spec.num_speculative_tokens
        self.requests: dict[str, Sequence] = {}
        self.output = OutputProcessor(tokenizer, eos_ids, cfg.max_model_len)
        self.in_flight: deque = deque()
        self.max_in_flight = cfg.parallel.pipeline_parallel_size
        """Steps in flight at once: one per stage (fewer only to measure what they buy)."""
        self.steps = dict(STEP_COUNTS)
        self.p2p = [0, 0, 0, 0]
        """The whole pipeline's [send calls, bytes, recv calls, bytes], summed over the ranks
        whenever the engine goes idle (pp > 1)."""
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0}
        """Totals since start: prompt tokens of admitted requests and tokens generated."""
        self._keys = 0

    # ---- requests ----------------------------------------------------------------------------

    def check_prompt(self, ids: list[int], what: str = "prompt") -> None:
        """ValueError naming the limit a prompt breaks: empty, longer than max_model_len, or a
        token id outside the vocab."""
        if not ids:
            raise ValueError(f"{what} is empty")
        if len(ids) > self.cfg.max_model_len:
            raise ValueError(f"{what} has {len(ids)} tokens, longer than "
                             f"max_model_len={self.cfg.max_model_len}")
        vocab = self.cfg.model.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"{what}: token id {bad[0]} is outside the vocab (size {vocab})")

    def check_params(self, params: SamplingParams) -> None:
        """ValueError for settings this engine cannot honour, its message beginning with the
        field's name: more than MAX_LOGPROBS top tokens, a grammar xgrammar cannot build."""
        for field in ("logprobs", "prompt_logprobs"):
            k = getattr(params, field)
            if k is not None and k > MAX_LOGPROBS:
                raise ValueError(f"{field}={k}: at most {MAX_LOGPROBS} top tokens per position")
        if params.structured_outputs is not None:
            if self.tokenizer is None:  # the sampler rank compiles grammars against its vocab
                raise ValueError("structured_outputs needs the model's tokenizer; "
                                 f"{self.cfg.model_dir} has no tokenizer files")
            validate_grammar(params.structured_outputs)
        if (self.spec is not None and self.spec.method == "draft_model" and params.temperature != 0
                and self.cfg.parallel.pipeline_parallel_size > 1):
            # The draft's q would have to travel to the last stage's sampler rank (not done).
            raise ValueError(f"temperature={params.temperature}: a draft model's proposals for "
                             "sampled requests are not verified with pipeline_parallel_size > 1 "
                             "yet; use temperature=0 or n-gram speculation there")

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        """Queue a request (ValueError, and nothing queued, for a bad prompt, settings the engine
        cannot honour or a duplicate id)."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already running")
        ids = [int(t) for t in prompt_ids]
        self.check_prompt(ids)
        self.check_params(params)
        key, self._keys = self._keys, self._keys + 1
        seed = params.seed if params.seed is not None else self.cfg.seed * SEED_MIX + key
        seq = Sequence(request_id, key, ids, params, seed, prompt)
        self.requests[request_id] = seq
        self.output.add_request(seq)
        self.stats["prompt_tokens"] += len(ids)
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        """End a request now and free its KV blocks (unknown or finished ids: nothing to do)."""
        seq = self.requests.pop(request_id, None)
        if seq is not None:
            self.output.abort(request_id)
            self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self.in_flight)

    def num_running(self) -> int:
        return self.scheduler.num_running

    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # ---- steps -------------------------------------------------------------------------------

    def step(self) -> list[DeltaOutput]:
        """Run one step (issuing more while stages are free) and return what is new for each
        request that got a token or finished in it; [] when nothing could run."""
        self.cluster.check_open()
        with self.cluster.guard():
            self._issue()
            if not self.in_flight:
                if self.requests:  # a pool that holds one max_model_len sequence always can
                    raise RuntimeError(f"no step could be scheduled for {len(self.requests)} "
                                       f"requests ({self.cache_stats()})")
                return []
            draws, seqs, counts, drafts, prompt, pending = self.in_flight.popleft()
            sampled = pending.wait()
            plain = [(s, n) for s, n, d in zip(seqs, counts, drafts) if not d]
            self.scheduler.complete([s for s, _ in plain], [n for _, n in plain])
            outputs = []
            chosen = [(seq, d) for seq, draw, d in zip(seqs, draws, drafts) if draw]
            drawn = unpack_sampled(sampled, [seq.params.logprobs for seq, _ in chosen],
                                   [len(d) for _, d in chosen])
            self._add_prompt_logprobs(prompt, sampled[sum(1 + len(d) for _, d in chosen):])
            for (seq, draft), tokens in zip(chosen, drawn):
                if draft:
                    out = self._verified(seq, draft, tokens)
                    if out is not None:
                        outputs.append(out)
                elif not seq.finished:  # an abort while its step was in flight: drop the token
                    outputs.append(self._append(seq, *tokens[0]))
            self.scheduler.free_finished()
            if not self.has_unfinished():
                self.cluster.flush()  # every send has been received by now: release them
                if self.cfg.parallel.pipeline_parallel_size > 1:
                    for i, v in enumerate(self.cluster.call("diagnose", "report_p2p").tolist()):
                        self.p2p[i] += v
        return outputs

    def _issue(self) -> None:
        while len(self.in_flight) < self.max_in_flight:
            seqs, counts = self.scheduler.schedule(parts=self.max_in_flight - len(self.in_flight))
            if not seqs:
                return  # every runnable sequence waits for a step in flight, or for blocks
            # One logit row per sequence whose chunk reaches its last token: its next is drawn.
            draws = [seq.scheduled + n == seq.num_tokens for seq, n in zip(seqs, counts)]
            drafts, probs = self._propose(seqs, counts)
            total = sum(counts)  # the drafts' rows included: the policy sees the real step
            sp, overlap = self.policy.decide(total)
            # Every row of a prompt chunk for prompt logprobs, until the first token is out.
            rows = [n if seq.params.prompt_logprobs is not None and seq.num_output_tokens == 0
                    else int(d) + len(x) for seq, n, d, x in zip(seqs, counts, draws, drafts)]
            prompt = [(seq, *scored) for seq, n, m in zip(seqs, counts, rows) if (
                scored := prompt_logprob_rows(seq.params, seq.num_prompt_tokens, seq.scheduled,
                                              n, m)) is not None]
            delta = self.scheduler.write_step(seqs, counts, rows, sp, overlap, drafts)
            delta.draft_probs = probs
            mode = "sp" if sp else "tp"
            self.steps[mode] += 1
            if any(drafts):
                self.steps[mode + "_verify"] += 1
            self.steps["padded_tokens"] += round_up(total, self.cfg.parallel.tensor_parallel_size
                                                    if sp else 1) - total
            self.in_flight.append((draws, seqs, counts, drafts, prompt,
                                   self.cluster.run_step(delta)))

    def _add_prompt_logprobs(self, prompt: list, rows) -> None:
        """Hand a step's prompt-logprob rows (after its drawn rows; pack_entries) to the output
        processor, before the first tokens are appended. prompt: per sequence with such rows
        (seq, first_pos, rows), in step order."""
        at = 0
        for seq, first_pos, n in prompt:
            entries = [tokens[0][1] for tokens in unpack_sampled(
                rows[at:at + n], [seq.params.prompt_logprobs] * n)]
            at += n
            if not seq.finished:  # aborted while its step was in flight
                self.output.add_prompt_logprobs(seq, first_pos,
                                                [None] * (first_pos == 0) + entries)

    def _propose(self, seqs: list[Sequence], counts: list[int]
                 ) -> tuple[list[list[int]], dict | None]:
        """Drafts for the step's decoding sequences (counts grow by them, in place): per
        sequence its drafts ([] for none), and {key: q [k, V]} of the sampled draft-model
        drafts (None when there are none). Drafts go within the step's token budget and the
        free blocks, never by preempting."""
        drafts: list[list[int]] = [[] for _ in seqs]
        if self.speculator is None:
            return drafts, None
        decoding = [i for i, (seq, n) in enumerate(zip(seqs, counts))
                    if n == 1 and seq.scheduled + 1 == seq.num_tokens and seq.num_output_tokens]
        if not decoding:
            return drafts, None
        proposed, q = self.speculator.propose([seqs[i] for i in decoding])
        room = self.cfg.max_num_batched_tokens - sum(counts)
        blocks, probs = self.scheduler.blocks, {}
        for j, i in enumerate(decoding):
            seq, draft = seqs[i], proposed[j][:room]
            while draft and not blocks.can_allocate(blocks.blocks_needed(seq, 1 + len(draft))):
                draft.pop()
            if not draft:
                continue
            blocks.allocate(seq, 1 + len(draft))
            drafts[i] = draft
            counts[i] += len(draft)
            room -= len(draft)
            if q is not None and seq.params.temperature != 0:
                probs[seq.key] = q[j][:len(draft)]
        return drafts, probs or None

    def _append(self, seq: Sequence, token: int, logprob: dict | None) -> DeltaOutput:
        seq.token_ids.append(token)
        self.stats["generation_tokens"] += 1
        out = self.output.process(seq, token, logprob)
        if out.finished:
            self._finish(seq, out.finish_reason)
            del self.requests[seq.request_id]
        return out

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.finish(seq, reason)
        if self.speculator is not None:
            self.speculator.remove(seq.key)

    def _verified(self, seq: Sequence, draft: list[int], tokens: list[tuple[int, dict | None]]
                  ) -> DeltaOutput | None:
        """A verification step of `seq` completed: append the tokens it kept (its accepted
        drafts, then the target's own token) up to the first that ends the request, keep the KV
        of the accepted ones only (the ranks follow in the next delta), and return one delta
        with them all (None: aborted meanwhile)."""
        start = seq.num_tokens  # its last token and the drafts ran from position start - 1
        blocks = self.scheduler.blocks
        if seq.finished:  # aborted while in flight: no token; its blocks go in free_finished
            blocks.rollback(seq, seq.computed)
            return None
        accepted = next((j for j, (t, _) in enumerate(tokens[:len(draft)]) if t != draft[j]),
                        min(len(tokens), len(draft)))
        self.speculator.record(seq.key, len(draft), accepted)  # before a finish removes the key
        outs = []
        for token, logprob in tokens:
            outs.append(self._append(seq, token, logprob))
            if outs[-1].finished:
                break
        # The accepted drafts' KV stays, but never the last token's: the next step feeds it (it is
        # the target's own token, or an accepted draft when a grammar ended on it). A finished
        # request's blocks are released after this.
        keep = min(start + accepted, seq.num_tokens - 1)
        blocks.rollback(seq, keep)
        if not seq.finished:
            self.scheduler.writer.rollback(seq.key, keep, len(seq.block_table))
        return DeltaOutput.merge(outs)

    # ---- statistics --------------------------------------------------------------------------

    def comm_stats(self) -> dict:
        """Calls and bytes per communication op, and step counts.

        Collectives are rank 0's: every rank of its TP group issues the same; with several stages,
        they are stage 0's. "send" / "recv" are the whole pipeline's point-to-point traffic,
        summed over all ranks each time the engine goes idle: the activations crossing stage
        boundaries (hidden + residual, each rank its share) and the sampled tokens going from the
        last stage to rank 0.
        """
        stats = {op.value: {"calls": 0, "bytes": 0} for op in Collective}
        stats.update(self.cluster.worker.comm.snapshot())
        if self.cfg.parallel.pipeline_parallel_size > 1:
            calls, nbytes, rcalls, rbytes = self.p2p
            stats["send"] = {"calls": calls, "bytes": nbytes}
            stats["recv"] = {"calls": rcalls, "bytes": rbytes}
        stats["steps"] = dict(self.steps)
        return stats

    def reset_comm_stats(self) -> None:
        self.cluster.call("diagnose", "reset_stats")
        self.steps = dict(STEP_COUNTS)
        self.p2p = [0, 0, 0, 0]

    def cache_stats(self) -> dict:
        blocks = self.scheduler.blocks
        return {"num_blocks": blocks.num_blocks, "block_size": blocks.block_size,
                "used_blocks": blocks.used, "prefix_queries": blocks.queries,
                "prefix_hits": blocks.hits, "preemptions": self.scheduler.preemptions}
