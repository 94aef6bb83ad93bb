"""Turning the sampled rows' logits into tokens, on the sampler rank (TP rank 0 of the last stage)."""
from __future__ import annotations

import torch


class Sampler:
    """Draws the sampled rows' tokens on the sampler rank (TP rank 0 of the last stage), which
    holds the full-vocabulary logits: only token ids and log-probabilities leave it.

    Each request has its own generator, made from its seed the first time the sampler meets it
    and kept until the plan releases it, so a request draws the same tokens whatever shares its
    steps (and after a preemption, which recomputes without drawing)."""

    def __init__(self):
        self.generators: dict[int, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, plan) -> torch.Tensor:
        """logits [S, V] float32 -> [S, 2 + 2K] float64 rows: token, its logprob (NaN when not
        asked), then the top-K token ids and their logprobs (K = plan.max_logprobs).

        Log-probabilities are those of the model's distribution (before temperature and filtering).
        """
        for key in plan.released:
            self.generators.pop(key, None)
        specs, k = plan.specs, plan.max_logprobs
        out = torch.full((len(specs), 2 + 2 * k), float("nan"), dtype=torch.float64)
        if not specs:
            return out
        tokens = logits.argmax(dim=-1)
        for i, spec in enumerate(specs):
            if spec.temperature != 0:
                gen = self.generators.get(spec.key)
                if gen is None:
                    gen = self.generators[spec.key] = torch.Generator(logits.device).manual_seed(
                        spec.seed)
                tokens[i] = _draw(logits[i], spec, gen)
        out[:, 0] = tokens.cpu().double()
        if any(spec.logprobs >= 0 for spec in specs):
            logprobs = torch.log_softmax(logits, dim=-1)
            out[:, 1] = logprobs.gather(1, tokens[:, None])[:, 0].cpu().double()
            if k:
                top = torch.topk(logprobs, k, dim=-1)
                out[:, 2:2 + k] = top.indices.cpu().double()
                out[:, 2 + k:] = top.values.cpu().double()
        return out


def unpack(sampled: torch.Tensor, specs) -> list[tuple[int, dict[int, float] | None]]:
    """Rank 0: the sampler's rows -> per sampled sequence (token, {token id: logprob} or None):
    the top `logprobs` entries and the chosen token's."""
    k = (sampled.shape[1] - 2) // 2
    results = []
    for row, spec in zip(sampled.tolist(), specs):
        token = int(row[0])
        if spec.logprobs < 0:
            results.append((token, None))
            continue
        entry = {int(t): v for t, v in zip(row[2:2 + spec.logprobs], row[2 + k:2 + k + spec.logprobs])}
        entry[token] = row[1]
        results.append((token, entry))
    return results


def _draw(row: torch.Tensor, p, generator: torch.Generator) -> int:
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
