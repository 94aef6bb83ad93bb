"""The output half of the engine: sampled tokens -> what is new for each request.

Per request it owns the incremental detokenizer (and with it the stop strings), the decision to
stop (EOS, a stop string, max_tokens, max_model_len) and the logprobs to hand out. Each call does
work in proportion to what is new (a token, its piece of text, its logprobs), never to what the
request has generated so far, so a request of n tokens costs O(n) in all.
"""
from __future__ import annotations

from seqpar.engine.detokenizer import Detokenizer
from seqpar.engine.outputs import DeltaOutput, Logprobs
from seqpar.engine.sequence import Sequence


class _RequestState:
    __slots__ = ("detokenizer", "prompt_logprobs", "first")

    def __init__(self, detokenizer: Detokenizer | None, wants_prompt_logprobs: bool):
        self.detokenizer = detokenizer
        self.prompt_logprobs: list[Logprobs | None] | None = [None] if wants_prompt_logprobs \
            else None
        """[None] (the first prompt token), then one entry per prompt token as the prefill's
        chunks compute them; handed out whole in the first delta."""
        self.first = True


class OutputProcessor:
    """tokenizer: None (token ids only, no text); eos_ids: the tokens that end a request (unless
    ignore_eos); max_model_len: the longest prompt + output."""

    def __init__(self, tokenizer, eos_ids: set[int], max_model_len: int):
        self.tokenizer, self.eos_ids, self.max_model_len = tokenizer, eos_ids, max_model_len
        self.states: dict[str, _RequestState] = {}

    def add_request(self, seq: Sequence) -> None:
        detok = None if self.tokenizer is None else Detokenizer(self.tokenizer, seq.params.stop)
        self.states[seq.request_id] = _RequestState(detok, seq.params.prompt_logprobs is not None)

    def abort(self, request_id: str) -> None:
        self.states.pop(request_id, None)

    def add_prompt_logprobs(self, seq: Sequence, first_pos: int,
                            entries: list[Logprobs | None]) -> None:
        """One prefill chunk's prompt logprobs, as Sampler.prompt_logprobs returns them for the
        chunk's rows from prompt position first_pos: entries for positions first_pos + 1, ...
        ({token id: logprob} of the top-k and the prompt's own token), led by None for position
        0 when first_pos is 0. Positions already held (a preempted request's recompute) are
        skipped."""
        held = self.states[seq.request_id].prompt_logprobs
        start = 0 if first_pos == 0 else first_pos + 1  # the position of entries[0]
        if start > len(held):
            raise ValueError(f"request {seq.request_id!r}: prompt logprobs from position {start} "
                             f"arrived before position {len(held)}")
        held += entries[len(held) - start:]

    def process(self, seq: Sequence, token: int, logprob: Logprobs | None) -> DeltaOutput:
        """The delta for `token`, just appended to seq.token_ids, and whether it ends seq: the
        finish reason is set in the delta; the caller frees the request then (the state here is
        dropped already)."""
        state = self.states[seq.request_id]
        p = seq.params
        detok = state.detokenizer
        reason = None
        if detok is not None and detok.add(token):
            reason = "stop"
        elif token in self.eos_ids and not p.ignore_eos:
            reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        prompt_logprobs = None
        if state.first:
            state.first = False
            prompt_logprobs = state.prompt_logprobs
            if prompt_logprobs is not None and len(prompt_logprobs) != seq.num_prompt_tokens:
                # The step that samples the first token carries the prompt's last rows: the
                # engine adds them before this token (a bug otherwise, never a short answer).
                raise RuntimeError(f"request {seq.request_id!r}: its first token came with "
                                   f"{len(prompt_logprobs)} of its {seq.num_prompt_tokens} "
                                   "prompt logprobs")
        if reason is not None:
            del self.states[seq.request_id]
        return DeltaOutput(seq.request_id, [token],
                           "" if detok is None else detok.delta(reason is not None), reason,
                           None if logprob is None else [logprob], prompt_logprobs,
                           seq.num_cached_tokens)
