"""What a request gets back: the engine's per-step outputs and LLM.generate's results."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Generated token ids so far."""
    text: str
    """Generated text so far: incrementally detokenized, the stop string cut off; while a stop
    string may be forming, the characters that could begin it are held back."""
    finish_reason: str | None
    """None while running; "stop" (EOS or a stop string), "length" (max_tokens or
    max_model_len) or "abort"."""
    logprobs: list[dict[int, float]] | None = None
    """Per generated token {token id: logprob} of the top-k and the chosen one (if asked)."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
