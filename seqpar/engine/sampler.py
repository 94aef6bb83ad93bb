"""Turning the sampled rows' logits into tokens, on rank 0."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_tokens: int = 16
    """Most tokens generated per prompt."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 (or -1) keeps the whole vocab."""
    logprobs: int | None = None
    """Return the log-probabilities of the top-k tokens (and the chosen one) at each step."""
    stop: str | list[str] | None = None
    """Strings that end generation; they are cut from the text."""
    ignore_eos: bool = False
    seed: int | None = None
    """Per-request seed; default: derived from the LLM's seed and the request's index."""

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 or positive, got {self.top_k}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator]) -> tuple[list[int], list[dict | None]]:
    """logits: [S, V] float32, one row per sequence -> (tokens, per row {token: logprob} or None).

    Log-probabilities are those of the model's distribution (before temperature and filtering).
    """
    greedy = logits.argmax(dim=-1).tolist()
    want_logprobs = any(p.logprobs is not None for p in params)
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    tokens, out = [], []
    for i, p in enumerate(params):
        token = greedy[i] if p.temperature == 0 else _draw(logits[i], p, generators[i])
        tokens.append(token)
        if p.logprobs is None:
            out.append(None)
            continue
        top = torch.topk(logprobs[i], p.logprobs) if p.logprobs else None
        entry = {} if top is None else dict(zip(top.indices.tolist(), top.values.tolist()))
        entry[token] = logprobs[i, token].item()
        out.append(entry)
    return tokens, out


def _draw(row: torch.Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    """Sample from one row [V] with temperature, top-k and top-p."""
    row = row / p.temperature
    if p.top_k > 0 and p.top_k < row.shape[0]:
        kth = torch.topk(row, p.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = row.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop tokens once the mass before them already reaches top_p; the first always stays.
        drop = (cum - sorted_logits.softmax(-1)) >= p.top_p
        row = row.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = row.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
