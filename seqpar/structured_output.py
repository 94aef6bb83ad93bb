"""Structured outputs with xgrammar (the grammar engine vLLM and SGLang use; it runs on CPU).

A request's StructuredOutputsParams (sampling_params.py) becomes an xgrammar grammar:

1. validate(spec) parses it without a tokenizer (cheap): a schema, regex or grammar xgrammar
   cannot handle is a ValueError naming why, before the request is queued.
2. GrammarCompiler(tokenizer, vocab_size, stop ids).compile(spec), on the sampler rank: the
   grammar against the vocabulary, cached per grammar by xgrammar's compiler.
3. Per request, a Matcher: before each sampled token it fills the request's row of a token
   bitmask (allocate_bitmask) with the tokens the grammar allows next; apply_bitmask sets every
   other logit of those rows to -inf before greedy or sampled choice; the chosen token is then
   accepted, advancing the grammar (a speculative step accepts drafts tentatively and rolls the
   rejected ones back).
4. GrammarFactory: the sampler rank's `factory(key, params) -> Matcher | None`, with the
   compiler built from the model directory's tokenizer the first time a request has a grammar.

How a request ends: the compiler's stop tokens are the engine's EOS ids (eos_token_ids, the same
function rank 0 uses). Once the grammar is complete its mask allows only those, so the sampler
draws an EOS and rank 0 finishes the request with "stop" as for any EOS; nothing else needs to
travel back. (A grammar that may end or go on, like `a+`, allows EOS beside its other tokens.)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from seqpar.config import ModelConfig
from seqpar.sampling_params import SamplingParams, StructuredOutputsParams


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # `make install` installs it; a bare `pip install -e .` may not
        raise ValueError("structured outputs need xgrammar: pip install --no-deps "
                         "xgrammar==0.2.9 apache-tvm-ffi") from e
    return xgrammar


MAX_JSON_WHITESPACE = 20
"""Longest run of whitespace a JSON output may have between tokens: pretty-printed JSON (a
newline and the indent of a few levels) fits; a model that would pad forever (a small model
greedy on a newline) has to go on writing the value."""


def _source(spec: StructuredOutputsParams) -> tuple[str, str, dict]:
    """(kind, text, options): kind is "json_schema", "regex" or "ebnf"."""
    if spec.json is not None or spec.json_object:
        schema = {"type": "object"} if spec.json_object else spec.json
        text = schema if isinstance(schema, str) else json.dumps(schema)
        if spec.disable_any_whitespace:
            return "json_schema", text, {"any_whitespace": False}
        return "json_schema", text, {"any_whitespace": True,
                                     "max_whitespace_cnt": MAX_JSON_WHITESPACE}
    if spec.regex is not None:
        return "regex", spec.regex, {}
    if spec.choice is not None:
        # An EBNF alternation of string literals; JSON's escapes are EBNF's (\" \\ \n \uXXXX).
        alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in spec.choice)
        return "ebnf", f"root ::= {alternatives}", {}
    return "ebnf", spec.grammar, {}


_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def _why(e: Exception) -> str:
    """xgrammar's message without its C++ source location."""
    return _CPP_PREFIX.sub("", str(e).strip())


def _build(spec: StructuredOutputsParams, builders: dict):
    """builders[kind](text, **options), a failure a ValueError naming why."""
    kind, text, options = _source(spec)
    try:
        return builders[kind](text, **options)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"structured_outputs: xgrammar cannot compile this "
                         f"{kind.replace('_', ' ')}: {_why(e)}") from e


def validate(spec: StructuredOutputsParams) -> None:
    """ValueError naming why xgrammar cannot build this grammar (no tokenizer needed)."""
    grammar = _xgr().Grammar
    _build(spec, {"json_schema": grammar.from_json_schema, "regex": grammar.from_regex,
                  "ebnf": grammar.from_ebnf})


class GrammarCompiler:
    """Compiles grammars against one tokenizer's vocabulary. vocab_size: the model's (its logits'
    width, which may exceed the tokenizer's: the ids past the tokenizer's are never allowed; a
    tokenizer larger than the model has its extra ids dropped); stop_token_ids: the ids that end a
    request, the only ones a complete grammar allows."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids):
        xgr = _xgr()
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        if not self.stop_token_ids:
            raise ValueError("structured outputs need an EOS token id to end a completed grammar; "
                             "the model's config and tokenizer name none")
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=self.stop_token_ids)
        # xgrammar's own cache: one compilation per distinct grammar text and options.
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=True)

    def compile(self, spec: StructuredOutputsParams):
        """The xgrammar CompiledGrammar of spec (ValueError naming why it cannot be built)."""
        c = self.compiler
        return _build(spec, {"json_schema": c.compile_json_schema, "regex": c.compile_regex,
                             "ebnf": c.compile_grammar})

    def matcher(self, spec: StructuredOutputsParams) -> Matcher:
        return Matcher(self.compile(spec))


class Matcher:
    """One request's place in its grammar, on the sampler rank (worker/sampler.py drives it: per
    row fill_bitmask, apply_bitmask, choose, accept; a verification fills one row per draft,
    accepting drafts tentatively, and rolls back the ones it rejects)."""

    def __init__(self, compiled):
        self._m = _xgr().GrammarMatcher(compiled)  # unlimited rollback (xgrammar's default)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of bitmask [R, ceil(V / 32)] int32: bit t set where token t may come next
        (RuntimeError once terminated: nothing may come after the stop token)."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        """Advance past the chosen token; RuntimeError if the grammar forbids it (a token chosen
        without the mask applied)."""
        if not self._m.accept_token(token):
            raise RuntimeError(f"token {token} breaks the request's grammar: it was chosen "
                               "without the grammar's mask")

    def rollback(self, n: int) -> None:
        """Undo the last n accepted tokens (the drafts a verification rejected)."""
        if n:
            self._m.rollback(n)

    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted."""
        return self._m.is_terminated()


class GrammarFactory:
    """The sampler rank's grammar hook: `factory(key, params)` is the request's Matcher, or None
    when its params have no structured_outputs.

    The compiler is built the first time a request has a grammar, from the model directory's
    tokenizer: xgrammar indexes the vocabulary (0.5 s for SmolLM2's 49152 tokens), after the
    tokenizer's load (seconds where transformers is not imported yet: the first JSON schema
    took 6 s in all on the loaded 2-core machine). Its stop tokens are the engine's EOS ids
    (see the module docstring). Compiled grammars are cached: a schema seen before takes 0.1 ms,
    a new regex 10 ms."""

    def __init__(self, model_dir: Path, model: ModelConfig):
        self.model_dir, self.model = Path(model_dir), model
        self._compiler: GrammarCompiler | None = None

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            # The engine's own loading: the same tokenizer and EOS ids as rank 0's.
            from seqpar.engine.tokenizer import eos_token_ids, load_tokenizer

            tokenizer = load_tokenizer(self.model_dir)
            if tokenizer is None:  # rank 0 refuses such requests first (Engine.check_params)
                raise ValueError(f"structured outputs need the model's tokenizer; {self.model_dir} "
                                 "has no tokenizer files")
            self._compiler = GrammarCompiler(
                tokenizer, self.model.vocab_size,
                eos_token_ids(self.model_dir, self.model, tokenizer))
        return self._compiler

    def __call__(self, key: int, params: SamplingParams) -> Matcher | None:
        """key: the request's engine number (unused: a matcher holds its own state)."""
        spec = params.structured_outputs
        return None if spec is None else self.compiler.matcher(spec)


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A bitmask [rows, ceil(vocab_size / 32)] int32 with every token allowed."""
    return _xgr().allocate_token_bitmask(rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: logits [S, V] rows `rows` (those with a grammar) get -inf wherever bitmask
    [S, ceil(V / 32)] has the token's bit clear; the other rows are untouched."""
    if rows:
        _xgr().apply_token_bitmask_inplace(logits, bitmask.to(logits.device),
                                           vocab_size=logits.shape[-1], indices=rows)
