"""One request as the engine tracks it: its tokens, its KV blocks, its progress and its text."""
from __future__ import annotations

from dataclasses import dataclass, field

from seqpar.sampling_params import SamplingParams


@dataclass(eq=False)
class Sequence:
    request_id: str
    key: int
    """The engine's number for it: names it on the ranks (batch state, sampler; an unseeded
    request's seed derives from it there)."""
    token_ids: list[int]
    """The prompt, then every generated token (appended as they come)."""
    params: SamplingParams
    seed: int
    """Its seed: the params' own, or the engine's seed x SEED_MIX + key (worker/sampler.py, which
    derives the same for an unseeded request on the sampler rank)."""
    prompt: str | None = None
    computed: int = 0
    """Tokens whose keys and values are in the KV cache."""
    scheduled: int = 0
    """Tokens handed to steps (>= computed; more while a step with this sequence is in flight)."""
    block_table: list[int] = field(default_factory=list)
    num_hashed: int = 0
    """Leading blocks of block_table keyed in the prefix cache."""
    hashed_key: int | None = None
    """The prefix key of block num_hashed - 1 (the parent of the next one)."""
    num_cached_tokens: int = 0
    """Prompt tokens the prefix cache served at its (last) admission."""
    finish_reason: str | None = None
    num_prompt_tokens: int = field(init=False)
    """The prompt's length (the tokens after it were generated)."""

    def __post_init__(self):
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def prompt_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def in_flight(self) -> bool:
        """A step holding some of its tokens has not completed yet."""
        return self.scheduled > self.computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
