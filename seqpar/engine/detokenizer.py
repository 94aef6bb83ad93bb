"""Incremental detokenization and stop strings: O(1) work per token, not a re-decode of the output."""
from __future__ import annotations


class Detokenizer:
    """One sequence's generated text, one token at a time (the tokenizers library's DecodeStream,
    which keeps only the few tokens a multi-byte character may still need)."""

    def __init__(self, tokenizer, stop: list[str]):
        from tokenizers.decoders import DecodeStream  # with the tokenizer, which is optional

        self.backend = tokenizer.backend_tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.stop = stop
        self.longest_stop = max(map(len, stop), default=0)
        self.full = ""
        """Everything decoded so far."""
        self.cut: int | None = None
        """Where a stop string begins in `full`, once one appeared."""

    def add(self, token: int) -> bool:
        """Decode one more token; True when a stop string has appeared (the text ends before it)."""
        piece = self.stream.step(self.backend, token)
        if not piece or not self.stop:
            self.full += piece or ""
            return False
        # Only a stop string that overlaps the new piece is new: search from there.
        begin = max(0, len(self.full) - self.longest_stop + 1)
        self.full += piece
        found = [i for i in (self.full.find(s, begin) for s in self.stop) if i >= 0]
        if found:
            self.cut = min(found)
        return self.cut is not None

    def text(self, finished: bool) -> str:
        """The text to show: up to a stop string; while running, without a tail that may be the
        beginning of one."""
        if self.cut is not None:
            return self.full[:self.cut]
        if finished or not self.stop:
            return self.full
        hold = max((n for s in self.stop for n in range(min(len(s) - 1, len(self.full)), 0, -1)
                    if self.full.endswith(s[:n])), default=0)
        return self.full[:len(self.full) - hold]
