"""Prompt-lookup proposals: the tokens that followed the most recent earlier occurrence of a
sequence's own last n tokens (n from prompt_lookup_max down to prompt_lookup_min), no second model.

One numpy pass per sequence: the positions whose token equals the last token are the candidate
match ends; each candidate's match length is grown backwards, one vectorized comparison per
suffix position, at most prompt_lookup_max of them. O(len + candidates x prompt_lookup_max).
"""
from __future__ import annotations

import numpy as np


class NgramProposer:
    def __init__(self, num_speculative_tokens: int, prompt_lookup_min: int, prompt_lookup_max: int):
        self.k = num_speculative_tokens
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def propose(self, token_ids, limit: int | None = None) -> list[int]:
        """Up to min(k, limit) tokens to follow `token_ids` (prompt + output so far); [] when no
        suffix of at least prompt_lookup_min tokens occurred before."""
        k = self.k if limit is None else min(self.k, limit)
        tokens = np.asarray(token_ids, dtype=np.int64)
        n_all = tokens.shape[0]
        if k <= 0 or n_all < self.min_n + 1:
            return []
        # Candidate match ends j < n_all - 1 (a match must be followed by a token).
        ends = np.flatnonzero(tokens[:-1] == tokens[-1])
        if ends.size == 0:
            return []
        length = np.ones(ends.shape, dtype=np.int64)  # matched suffix tokens per candidate
        alive = np.ones(ends.shape, dtype=bool)
        for m in range(1, min(self.max_n, n_all - 1)):
            # Compare tokens[j - m] with tokens[n_all - 1 - m] where the candidate still matches.
            ok = alive & (ends >= m)
            ok[ok] = tokens[ends[ok] - m] == tokens[n_all - 1 - m]
            alive = ok
            if not alive.any():
                break
            length += alive
        best = min(int(length.max()), self.max_n)
        if best < self.min_n:
            return []
        j = int(ends[np.flatnonzero(length >= best)[-1]])  # the most recent of the longest
        return tokens[j + 1:j + 1 + k].tolist()
