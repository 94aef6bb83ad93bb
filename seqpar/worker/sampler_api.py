"""A stand-in for the Sampler API of CONTRACTS.md 3 (add / remove / sample by request key) over
the pre-rework sampler, until branch `sampler` brings the real one; then this file goes."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from seqpar.worker.plan import SampleSpec
from seqpar.worker.sampler import Sampler as RowSampler


@dataclass
class SamplerOutput:
    tokens: torch.Tensor
    """[R] int64."""
    logprobs: torch.Tensor
    """[R]: the chosen token's log-probability (NaN where the row asks none)."""
    top_ids: torch.Tensor | None
    """[R, K] (K = the most any row asks; None when none asks)."""
    top_values: torch.Tensor | None


class Sampler:
    def __init__(self):
        self.rows = RowSampler()
        self.specs: dict[int, SampleSpec] = {}
        self._released: list[int] = []

    def add(self, key: int, params, prompt_ids: list[int]) -> None:
        logprobs = -1 if params.logprobs is None else params.logprobs
        self.specs[key] = SampleSpec(key, params.seed, params.temperature, params.top_p,
                                     params.top_k, logprobs)

    def remove(self, key: int) -> None:
        del self.specs[key]
        self._released.append(key)

    def sample(self, logits: torch.Tensor, keys: list[int]) -> SamplerOutput:
        specs = [self.specs[k] for k in keys]
        k = max([0, *(s.logprobs for s in specs)])
        plan = SimpleNamespace(specs=specs, released=self._released, max_logprobs=k)
        self._released = []
        out = self.rows(logits, plan)  # [R, 2 + 2K] float64
        return SamplerOutput(out[:, 0].long(), out[:, 1], out[:, 2:2 + k].long() if k else None,
                             out[:, 2 + k:] if k else None)
