"""Structured outputs with xgrammar (the grammar engine vLLM and SGLang use; it runs on CPU).

A request's StructuredOutputsParams (sampling_params.py) becomes an xgrammar grammar:

1. validate(spec) parses it without a tokenizer (cheap): a schema, regex or grammar xgrammar
   cannot handle is a ValueError naming why, before the request is queued.
2. GrammarCompiler(tokenizer, vocab_size, stop ids).compile(spec), on the sampler rank: the
   grammar against the vocabulary, cached per grammar by xgrammar's compiler.
3. Per request, a Matcher: before each sampled token it fills the request's row of a token
   bitmask (allocate_bitmask) with the tokens the grammar allows next; apply_bitmask sets every
   other logit of those rows to -inf before greedy or sampled choice; the chosen token is then
   accepted, advancing the grammar. Once the grammar is complete it allows only the stop tokens
   (EOS), so a request ends there.
"""
from __future__ import annotations

import json
import re

import torch

from seqpar.sampling_params import StructuredOutputsParams


def _xgr():
    try:
        import xgrammar
    except ImportError as e:  # `make install` installs it; a bare `pip install -e .` may not
        raise ValueError("structured outputs need xgrammar: pip install --no-deps "
                         "xgrammar==0.2.9 apache-tvm-ffi") from e
    return xgrammar


def _source(spec: StructuredOutputsParams) -> tuple[str, str, dict]:
    """(kind, text, options): kind is "json_schema", "regex" or "ebnf"."""
    if spec.json is not None or spec.json_object:
        schema = {"type": "object"} if spec.json_object else spec.json
        text = schema if isinstance(schema, str) else json.dumps(schema)
        return "json_schema", text, {"any_whitespace": not spec.disable_any_whitespace}
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
    width, which may exceed the tokenizer's); stop_token_ids: the ids that end a request."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids):
        xgr = _xgr()
        self.vocab_size = vocab_size
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=sorted(stop_token_ids))
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
    """One request's place in its grammar."""

    def __init__(self, compiled):
        self._m = _xgr().GrammarMatcher(compiled)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Row `row` of bitmask [S, ceil(V / 32)] int32: bit t set where token t may come next."""
        self._m.fill_next_token_bitmask(bitmask, row)

    def accept(self, token: int) -> None:
        """Advance past the chosen token; RuntimeError if the grammar forbids it (a token chosen
        without the mask applied)."""
        if not self._m.accept_token(token):
            raise RuntimeError(f"token {token} breaks the request's grammar: it was chosen "
                               "without the grammar's mask")

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted."""
        return self._m.is_terminated()


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A bitmask [rows, ceil(vocab_size / 32)] int32 with every token allowed."""
    return _xgr().allocate_token_bitmask(rows, vocab_size)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """In place: logits [S, V] rows `rows` (those with a grammar) get -inf wherever bitmask
    [S, ceil(V / 32)] has the token's bit clear; the other rows are untouched."""
    if rows:
        _xgr().apply_token_bitmask_inplace(logits, bitmask.to(logits.device),
                                           vocab_size=logits.shape[-1], indices=rows)
