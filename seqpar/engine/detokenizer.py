"""Incremental detokenization and stop strings: O(1) work per token, not a re-decode of the output."""
from __future__ import annotations


class Detokenizer:
    """One sequence's generated text, one token at a time (the tokenizers library's DecodeStream,
    which keeps only the few tokens a multi-byte character may still need).

    Only the text not yet handed out is kept (`pending`): at most the longest stop string's
    length minus one held back, plus the newest piece. A stop string cannot begin in text already
    handed out: while any tail of the text could begin one, that tail is held back."""

    def __init__(self, tokenizer, stop: list[str]):
        from tokenizers.decoders import DecodeStream  # with the tokenizer, which is optional

        self.backend = tokenizer.backend_tokenizer
        self.stream = DecodeStream(skip_special_tokens=True)
        self.stop = stop
        self.pending = ""
        """Decoded text not handed out yet."""
        self.stopped = False
        """A stop string appeared; `pending` ends before it."""

    def add(self, token: int) -> bool:
        """Decode one more token; True when a stop string has appeared (the text ends before it)."""
        piece = self.stream.step(self.backend, token)
        if piece:
            self.pending += piece
            if not self.stop:
                return False
            found = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
            if found:
                self.pending = self.pending[:min(found)]
                self.stopped = True
        return self.stopped

    def delta(self, finished: bool) -> str:
        """The text to hand out now: what is pending, less (while running) a tail that may be the
        beginning of a stop string."""
        hold = (0 if finished or self.stopped or not self.stop
                else partial_suffix(self.pending, self.stop))
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out


def partial_suffix(text: str, markers: list[str]) -> int:
    """The length of the longest tail of text that is a proper beginning of one of markers (the
    characters to hold back until the next piece shows whether a marker forms)."""
    return max((n for m in markers for n in range(min(len(m) - 1, len(text)), 0, -1)
                if text.endswith(m[:n])), default=0)
