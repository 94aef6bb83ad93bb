"""Continuous batching on rank 0: which sequences and how many of their tokens run in each step."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from seqpar.engine.plan import StepPlan
from seqpar.engine.sampler import SamplingParams


@dataclass
class Sequence:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    computed: int = 0
    """Tokens already in the KV cache."""
    scheduled: int = 0
    """Tokens handed to steps (>= computed; more while a step with this sequence is in flight)."""
    slot: int = -1
    finish_reason: str | None = None
    text: str = ""

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids


class Scheduler:
    """Decodes first (one token each), then prompt chunks, within a token budget per step.

    Under pipeline parallelism several steps are in flight at once. A sequence runs again only on
    tokens not yet handed to a step: a decoding one after its last sample, a prompt's next chunk
    right away (stages run steps in issue order, so its KV cache is written in order).
    """

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, world_size: int):
        self.max_tokens = max_num_batched_tokens
        self.world_size = world_size
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, parts: int = 1) -> tuple[list[Sequence], list[int]]:
        """Pick this step's (sequences, token counts); empty when no sequence can run now.

        parts: steps that may still be issued before one completes. This step takes at most
        1/parts of the sequences ready to run, so the steps in flight share them evenly.
        """
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            seq.slot = self.free_slots.pop()
            self.running.append(seq)
        budget = self.max_tokens
        seqs, counts = [], []
        ready = [s for s in self.running if s.scheduled < len(s.all_ids)]
        # Decoding sequences first so they never starve behind long prompts; then prompts with
        # no step in flight.
        ordered = sorted(ready, key=lambda s: (s.scheduled < len(s.prompt_ids),
                                               s.scheduled > s.computed))
        for seq in ordered[:-(-len(ordered) // parts)]:
            if budget == 0:
                break
            n = min(len(seq.all_ids) - seq.scheduled, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return seqs, counts

    def build_plan(self, seqs: list[Sequence], counts: list[int], sp: bool, overlap: bool = False,
                   device="cpu") -> StepPlan:
        """The step running `counts` more tokens of each of `seqs`; hands those tokens over."""
        ids = []
        for seq, n in zip(seqs, counts):
            ids.extend(seq.all_ids[seq.scheduled:seq.scheduled + n])
        plan = StepPlan(
            sp=sp, token_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            slots=[s.slot for s in seqs], starts=[s.scheduled for s in seqs], lens=counts,
            sample=[s.scheduled + n == len(s.all_ids) for s, n in zip(seqs, counts)],
            world_size=self.world_size, overlap=sp and overlap)
        for seq, n in zip(seqs, counts):
            seq.scheduled += n
        return plan

    def complete(self, seqs: list[Sequence], counts: list[int]) -> None:
        """A step's tokens are in the KV cache (its samples are appended next)."""
        for seq, n in zip(seqs, counts):
            seq.computed += n

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.running.remove(seq)
        self.free_slots.append(seq.slot)
