"""Continuous batching on rank 0: which sequences and how many of their tokens run in each step.

Each step takes, within a token budget (max_num_batched_tokens): first the running sequences that
decode (one token each, so they never starve behind long prompts), then running prompts' next
chunks, then waiting requests in arrival order while blocks and sequence slots last. A sequence
that needs a new KV block when none is free preempts the most recently admitted running sequence:
its blocks are freed and it goes back to the front of the queue, to be recomputed (its prompt and
the tokens generated so far, as one prefill) when blocks free up. Nothing is dropped.

Under pipeline parallelism several steps are in flight at once. A sequence runs again only on
tokens not yet handed to a step: a decoding one after its last sample, a prompt's next chunk right
away (stages run steps in issue order, so its KV cache is written in order). A sequence with a
step in flight is never preempted (that step still writes its blocks).
"""
from __future__ import annotations

from collections import deque

from seqpar.config import EngineConfig, round_up
from seqpar.engine.block_manager import BlockManager
from seqpar.worker.plan import StepDelta, StepWriter
from seqpar.engine.sequence import Sequence


class Scheduler:
    def __init__(self, cfg: EngineConfig):
        self.max_tokens = cfg.max_num_batched_tokens
        self.max_seqs = cfg.max_num_seqs
        self.world_size = cfg.parallel.tensor_parallel_size
        self.blocks = BlockManager(cfg.num_blocks, cfg.block_size, cfg.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        """In admission order: the last is the first to preempt."""
        self.preemptions = 0
        self.writer = StepWriter()
        """What the ranks hold of each request; writes each step's delta."""
        self.lookahead = 0
        """Speculative decoding's k: budget each decoding sequence keeps for its drafts, so that
        whether a request verifies drafts does not depend on the prompts sharing its steps (a
        seeded request draws the same tokens in any batch, KV pressure aside)."""
        self._draining: list[Sequence] = []
        """Finished sequences whose blocks a step in flight still writes."""

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, parts: int = 1) -> tuple[list[Sequence], list[int]]:
        """Pick this step's (sequences, token counts); empty when no sequence can run now.

        parts: steps that may still be issued before one completes. This step takes at most
        1/parts of the sequences ready to run (running or waiting), so the steps in flight share
        them evenly.
        """
        budget = self.max_tokens
        seqs, counts = [], []
        ready = [s for s in self.running if s.scheduled < s.num_tokens]
        # Decoding sequences first, then prompts with no step in flight, then the rest; older
        # sequences first within each kind (sort is stable).
        ready.sort(key=lambda s: (s.scheduled < s.num_prompt_tokens, s.in_flight))
        starved = False
        limit = round_up(len(ready) + len(self.waiting), parts) // parts
        preemptions = self.preemptions
        for seq in ready[:limit]:
            if budget == 0:
                break
            if self.preemptions != preemptions and seq not in self.running:
                continue  # preempted below, for an older sequence of this step
            n = min(seq.num_tokens - seq.scheduled, budget)
            if not self._make_room(seq, n, taken=seqs):
                starved = True
                continue
            self.blocks.allocate(seq, n)
            seqs.append(seq)
            counts.append(n)
            budget -= n
            if seq.scheduled + n == seq.num_tokens and seq.num_output_tokens:  # decoding
                budget -= min(budget, self.lookahead)
        # New requests only while every running sequence got its blocks: admitting one would
        # take blocks an older sequence waits for.
        while (not starved and self.waiting and budget > 0 and len(self.running) < self.max_seqs
               and len(seqs) < limit):
            seq = self.waiting[0]
            # Prompt logprobs need every prompt row's logits: a cached prefix would skip them.
            cached = [] if seq.params.prompt_logprobs is not None else self.blocks.match(seq)
            n = min(seq.num_tokens - len(cached) * self.blocks.block_size, budget)
            if not self.blocks.can_admit(cached, n):
                break
            self.waiting.popleft()
            seq.computed = seq.scheduled = seq.num_cached_tokens = self.blocks.admit(seq, cached)
            self.blocks.allocate(seq, n)
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return seqs, counts

    def _make_room(self, seq: Sequence, n: int, taken: list[Sequence]) -> bool:
        """Free blocks for `seq` to take n more tokens, preempting the newest running sequences
        that are neither in flight nor already in this step; False if `seq` cannot run now (it
        may have preempted itself)."""
        need = self.blocks.blocks_needed(seq, n)
        while not self.blocks.can_allocate(need):
            victims = [s for s in self.running if not s.in_flight and s not in taken]
            if not victims:
                return False
            victim = victims[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first, to be recomputed."""
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.computed = seq.scheduled = 0
        self.writer.drop(seq.key)
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def write_step(self, seqs: list[Sequence], counts: list[int], logit_rows: list[int],
                   sp: bool, overlap: bool = False, drafts: list[list[int]] | None = None
                   ) -> StepDelta:
        """The delta of the step running `counts` more tokens of each of `seqs`, the last
        logit_rows[i] rows of each with logits, drafts[i] the draft tokens ending seqs[i]'s
        chunk (verification); hands those tokens over."""
        delta = self.writer.write(seqs, counts, logit_rows, sp, sp and overlap, drafts)
        for seq, n in zip(seqs, counts):
            seq.scheduled += n
        return delta

    def complete(self, seqs: list[Sequence], counts: list[int]) -> None:
        """A step's tokens are in the KV cache (its samples are appended next)."""
        for seq, n in zip(seqs, counts):
            seq.computed += n
            self.blocks.register(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence: it leaves the queue or the running set; its blocks are freed now, or,
        if a step still writes them, when that step completes (free_finished)."""
        seq.finish_reason = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
            if not seq.in_flight:
                self.blocks.release(seq)
            else:
                self._draining.append(seq)
        self.writer.finish(seq.key)

    def free_finished(self) -> None:
        """Free the blocks of finished sequences whose last step has completed."""
        done = [s for s in self._draining if not s.in_flight]
        for seq in done:
            self._draining.remove(seq)
            self.blocks.release(seq)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)
