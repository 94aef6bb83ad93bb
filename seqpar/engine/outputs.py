"""What a request gets back: the engine's per-step deltas, and the whole output built from them.

The engine emits only what is new for a request in each step (DeltaOutput), so a request of n
tokens costs O(n) on the engine thread in all; LLM.generate and the server's non-streaming
handlers fold the deltas into one RequestOutput (OutputCollector), the server's streams send each
delta as it is.
"""
from __future__ import annotations

from dataclasses import dataclass, field

Logprobs = dict[int, float]
"""One position's {token id: logprob}: the top-k tokens and the chosen (or prompt) token."""


@dataclass
class DeltaOutput:
    """What one step added to one request."""
    request_id: str
    token_ids: list[int]
    """The tokens generated in this step (one; or those a verification step kept)."""
    text: str
    """The text they add: incrementally detokenized, a stop string cut off; while a stop string
    may be forming, the characters that could begin it are held back to a later delta."""
    finish_reason: str | None
    """None while running; "stop" (EOS or a stop string), "length" (max_tokens or
    max_model_len) or "abort"."""
    logprobs: list[Logprobs] | None = None
    """Per new token (if asked)."""
    prompt_logprobs: list[Logprobs | None] | None = None
    """The whole prompt's, once, in the request's first delta (if asked): None for the first
    prompt token (nothing predicts it), then one entry per prompt token."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (at the request's last admission)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @staticmethod
    def merge(deltas: list["DeltaOutput"]) -> "DeltaOutput":
        """One delta for consecutive deltas of a request (a verification step's tokens)."""
        if len(deltas) == 1:
            return deltas[0]
        first, last = deltas[0], deltas[-1]
        logprobs = None if first.logprobs is None else [x for d in deltas for x in d.logprobs]
        return DeltaOutput(first.request_id, [t for d in deltas for t in d.token_ids],
                           "".join(d.text for d in deltas), last.finish_reason, logprobs,
                           first.prompt_logprobs, last.num_cached_tokens)


@dataclass
class RequestOutput:
    """A request's whole output (LLM.generate's result)."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Every generated token id."""
    text: str
    """The generated text, the stop string cut off."""
    finish_reason: str | None
    logprobs: list[Logprobs] | None = None
    """Per generated token (if asked)."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    prompt_logprobs: list[Logprobs | None] | None = None
    """Per prompt token, the first None (if asked)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class OutputCollector:
    """Folds one request's deltas into its RequestOutput: O(new) per delta (the text's pieces are
    joined once, in result())."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    logprobs: list[Logprobs] | None = None
    prompt_logprobs: list[Logprobs | None] | None = None
    finish_reason: str | None = None
    num_cached_tokens: int = 0

    def add(self, delta: DeltaOutput) -> None:
        self.token_ids += delta.token_ids
        if delta.text:
            self.pieces.append(delta.text)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += delta.logprobs
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.finish_reason = delta.finish_reason
        self.num_cached_tokens = delta.num_cached_tokens

    def result(self) -> RequestOutput:
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, self.token_ids,
                             "".join(self.pieces), self.finish_reason, self.logprobs,
                             self.num_cached_tokens, self.prompt_logprobs)
