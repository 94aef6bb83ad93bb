"""The Speculator: what rank 0's engine asks for drafts and tells what the target accepted.

Per decoding sequence it proposes up to k tokens (fewer near max_tokens or max_model_len, none
while the request backs off), the engine verifies them in one target step (the sequence's last
token plus its drafts as rows, Sampler.verify) and reports how many were accepted.

Back-off (why a request stops proposing): a verification step costs more than a decode step (k
more rows in every layer, and with a draft model k draft steps before it), so proposals must be
accepted often enough to pay. Per request an exponential average of the drafts accepted per
verification (weight 1/2 on the newest) is kept; once at least MIN_VERIFICATIONS verifications are
in, an average below `min_accepted` pauses the request's proposals for `pause` of its decode
steps, then it tries again from a fresh average. The pause starts at FIRST_PAUSE steps and doubles
at each back-off in a row up to MAX_PAUSE; an average that pays resets it. A request whose drafts
are never accepted thus spends at most MIN_VERIFICATIONS verifications per MAX_PAUSE decode
steps on speculation in the long run (2 in 130 steps), and a repetitive one keeps proposing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from seqpar.config import EngineConfig, SpeculativeConfig
from seqpar.engine.sequence import Sequence
from seqpar.spec.draft import DraftProposer, DraftRequest
from seqpar.spec.ngram import NgramProposer

MIN_VERIFICATIONS = 2
FIRST_PAUSE = 4
MAX_PAUSE = 128
MIN_ACCEPTED = 0.5
"""Default drafts a verification must accept on average to pay: at that rate a verification step
that costs up to 1.5 decode steps (draft steps included) breaks even. An estimate, not a
measurement: the engine can set Backoff.min_accepted from its own step times."""


@dataclass
class _Trial:
    average: float = 0.0
    verifications: int = 0
    pause: int = FIRST_PAUSE
    """Decode steps the next back-off lasts."""
    paused: int = 0
    """Decode steps left in the current back-off."""


class Backoff:
    """The back-off rule of the module docstring, per request key."""

    def __init__(self, min_accepted: float = MIN_ACCEPTED):
        self.min_accepted = min_accepted
        self.trials: dict[int, _Trial] = {}

    def ready(self, key: int) -> bool:
        """Whether the request may propose in this decode step (call once per decode step: a
        paused request's pause counts down)."""
        trial = self.trials.get(key)
        if trial is None or trial.paused == 0:
            return True
        trial.paused -= 1
        return False

    def record(self, key: int, accepted: int) -> None:
        """A verification of this request accepted `accepted` drafts."""
        trial = self.trials.setdefault(key, _Trial())
        trial.average = accepted if trial.verifications == 0 else (trial.average + accepted) / 2
        trial.verifications += 1
        if trial.verifications < MIN_VERIFICATIONS:
            return
        if trial.average < self.min_accepted:
            trial.paused, trial.pause = trial.pause, min(2 * trial.pause, MAX_PAUSE)
            trial.average, trial.verifications = 0.0, 0
        else:
            trial.pause = FIRST_PAUSE

    def remove(self, key: int) -> None:
        self.trials.pop(key, None)


@dataclass
class SpecStats:
    num_drafts: int = 0
    """Verifications of at least one draft token."""
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def as_dict(self) -> dict:
        """The counters and mean_acceptance_length: tokens a verification yields on average, the
        accepted drafts plus the target's own token (None before any draft)."""
        mean = (1 + self.num_accepted_tokens / self.num_drafts) if self.num_drafts else None
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "mean_acceptance_length": mean}


class Speculator:
    def __init__(self, config: SpeculativeConfig, target: EngineConfig,
                 device: torch.device | str = "cpu"):
        self.config, self.k = config, config.num_speculative_tokens
        self.max_model_len = target.max_model_len
        self.ngram = self.draft = None
        if config.method == "ngram":
            self.ngram = NgramProposer(self.k, config.prompt_lookup_min, config.prompt_lookup_max)
        else:
            self.draft = DraftProposer(config.model, self.k, target, device)
        self.backoff = Backoff()
        self.stats = SpecStats()

    def limit(self, seq: Sequence) -> int:
        """Drafts worth proposing for `seq` now: k, fewer when its max_tokens or max_model_len
        leaves room for fewer (a verification yields up to drafts + 1 tokens), 0 while it backs
        off. Call once per decode step of the sequence."""
        room = min(seq.params.max_tokens - seq.num_output_tokens,
                   self.max_model_len - seq.num_tokens) - 1
        if room <= 0 or not self.backoff.ready(seq.key):
            return 0
        return min(self.k, room)

    def propose(self, seqs: list[Sequence]) -> tuple[list[list[int]], list[torch.Tensor] | None]:
        """Per decoding sequence its drafts ([] for none), and with a draft model q per draft
        ([len(drafts), V] each; None for n-gram drafts and when every draft was greedy: a point
        mass each)."""
        limits = [self.limit(seq) for seq in seqs]
        if self.ngram is not None:
            return [self.ngram.propose(s.token_ids, n, s.key) if n else [] for s, n in
                    zip(seqs, limits)], None
        return self.draft.propose([DraftRequest(s.key, s.token_ids, s.params.temperature, s.seed,
                                                n) for s, n in zip(seqs, limits)])

    def record(self, key: int, num_draft_tokens: int, num_accepted: int) -> None:
        """A verification of `num_draft_tokens` drafts of request `key` accepted `num_accepted`."""
        if num_draft_tokens == 0:
            return
        self.stats.num_drafts += 1
        self.stats.num_draft_tokens += num_draft_tokens
        self.stats.num_accepted_tokens += num_accepted
        self.backoff.record(key, num_accepted)

    def remove(self, key: int) -> None:
        """The request ended: drop its back-off state and draft cache."""
        self.backoff.remove(key)
        (self.ngram or self.draft).remove(key)


def spec_stats(engine) -> dict:
    """`llm.spec_stats()` / the server's counters: the engine's Speculator's statistics, zeros
    when it speculates not at all."""
    speculator = getattr(engine, "speculator", None)
    return (SpecStats() if speculator is None else speculator.stats).as_dict()
