"""How a request is sampled and when it stops: the settings a user passes per request."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A grammar the output must follow (vLLM's field names): exactly one of json, regex, choice,
    grammar, json_object. Compiled with xgrammar (seqpar/structured_output.py) and enforced by
    masking the logits where sampling happens, greedy or sampled."""
    json: str | dict | None = None
    """A JSON schema (a dict or its JSON text)."""
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    """The output is one of these strings."""
    grammar: str | None = None
    """An EBNF grammar (xgrammar's dialect of GBNF; the rule `root` is the start)."""
    json_object: bool = False
    """Any JSON object."""
    disable_any_whitespace: bool = False
    """JSON outputs: no whitespace between tokens beyond one space (a model cannot pad forever)."""

    def __post_init__(self):
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name)
                 is not None] + (["json_object"] if self.json_object else [])
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar, "
                             f"json_object; got {', '.join(given) or 'none'}")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))  # hashable: a cache key


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
    prompt_logprobs: int | None = None
    """Return the log-probabilities of each prompt token (and the top-k at its position); the
    first prompt token's entry is None."""
    structured_outputs: StructuredOutputsParams | None = None
    """Constrain the output to a grammar (see StructuredOutputsParams)."""

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
        if self.prompt_logprobs is not None and self.prompt_logprobs < 0:
            raise ValueError(f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}")
        if self.structured_outputs is not None and self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with structured_outputs: once the "
                             "grammar is complete, only EOS may follow")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
