"""Tool calls out of model text (seqpar/entrypoints/tool_parsers.py): each parser streamed one
character at a time gives what it gives on the whole text, and the grammars that force
"required" and named calls make a random model's output parse into calls whose arguments
validate against the function's schema (jsonschema)."""
from __future__ import annotations

import json

import pytest

from seqpar.entrypoints import protocol as P
from seqpar.entrypoints.tool_parsers import (HermesParser, Llama3JsonParser, NamedFunction,
                                             RequiredFunctions, assemble, extractor,
                                             tool_choice_constraint)

jsonschema = pytest.importorskip("jsonschema")

TOOLS = [P.ToolDefinition(function=P.FunctionDefinition(
             name="get_weather", parameters={
                 "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
                 "required": ["city"], "additionalProperties": False})),
         P.ToolDefinition(function=P.FunctionDefinition(
             name="add", parameters={
                 "type": "object", "properties": {"a": {"type": "integer", "maximum": 99},
                                                  "b": {"type": "integer", "maximum": 99}},
                 "required": ["a", "b"], "additionalProperties": False}))]


def _run(make, text: str, step: int | None) -> tuple[str, list[tuple[str, dict]]]:
    """(content, [(name, arguments)]) from feeding text whole (step None) or step chars at once."""
    parser = make()
    content, deltas = "", []
    pieces = [text] if step is None else [text[i:i + step] for i in range(0, len(text), step)]
    for piece in pieces:
        c, d = parser.feed(piece)
        content, deltas = content + c, deltas + d
    c, d = parser.finish()
    calls = assemble(deltas + d)
    return content + c, [(c.function.name, json.loads(c.function.arguments)) for c in calls]


CASES = [
    # (parser, text, content, calls)
    (HermesParser, 'Sure. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
                   '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nice"}}\n'
                   '</tool_call> Done.',
     "Sure.  Done.", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Nice"})]),
    (HermesParser, "a < b and <tool_call>not json</tool_call>",
     "a < b and <tool_call>not json</tool_call>", []),
    (HermesParser, '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}',  # EOS before END
     "", [("add", {"a": 1, "b": 2})]),
    (HermesParser, "no calls <tool_", "no calls <tool_", []),
    (Llama3JsonParser, '{"name": "add", "parameters": {"a": 1, "b": 2}}; '
                       '{"name": "get_weather", "parameters": {"city": "Nice"}}',
     "", [("add", {"a": 1, "b": 2}), ("get_weather", {"city": "Nice"})]),
    (Llama3JsonParser, '<|python_tag|>{"name": "add", "arguments": {"a": 3, "b": 4}}',
     "", [("add", {"a": 3, "b": 4})]),
    (Llama3JsonParser, "  The answer is {not a call}", "  The answer is {not a call}", []),
    (Llama3JsonParser, '{"name": "add", "parameters": {"a": 1', '{"name": "add", "parameters": '
                                                               '{"a": 1', []),
    (RequiredFunctions, '[{"name": "add", "parameters": {"a": 5, "b": 6}}]',
     "", [("add", {"a": 5, "b": 6})]),
    # Cut short by max_tokens while adding calls: the calls completed before the cut.
    (RequiredFunctions, '[{"name": "add", "parameters": {"a": 5, "b": 6}},\n {"name": "add", '
                        '"parameters": {"a": 7, "b": 8}}, {"name": "add", "param',
     "", [("add", {"a": 5, "b": 6}), ("add", {"a": 7, "b": 8})]),
    (RequiredFunctions, '[{"name": "add", "param', '[{"name": "add", "param', []),
    (lambda: NamedFunction("add"), '{"a": 7, "b": 8}', "", [("add", {"a": 7, "b": 8})]),
]


@pytest.mark.parametrize("make,text,content,calls", CASES)
def test_parsers_stream_as_they_parse_whole(make, text, content, calls):
    for step in (None, 1, 3):
        assert _run(make, text, step) == (content, calls), step


def test_calls_stream_as_openai_sends_them():
    parser = extractor(P.NamedToolChoice(function=P.FunctionName(name="add")), None)
    first, second = parser.feed('{"a": 1,')[1], parser.feed(' "b": 2}')[1]
    header, piece = first
    assert (header.index, header.type, header.function.name, header.function.arguments) == \
        (0, "function", "add", "")
    assert header.id.startswith("call_") and piece.id is None and piece.function.name is None
    assert [d.function.arguments for d in (piece, *second)] == ['{"a": 1,', ' "b": 2}']
    assert extractor("none", None) is None
    assert isinstance(extractor("auto", "llama3_json"), Llama3JsonParser)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_calls_always_parse_and_validate(tmp_path_factory, temperature):
    """The grammars of "required" and a named function on HF's tiny random model (masked at
    each step as the sampler rank does): the output always parses into calls whose arguments
    validate against the function's schema."""
    from test_structured_output import _generate, _text
    from tokenized import build_with_bytelevel_tokenizer
    from transformers import AutoTokenizer

    from seqpar.structured_output import GrammarCompiler

    model = build_with_bytelevel_tokenizer("llama-gqa", tmp_path_factory.getbasetemp() / "tools")
    tokenizer = AutoTokenizer.from_pretrained(model)
    compiler = GrammarCompiler(tokenizer, 1001, {2})
    prompt = tokenizer("call a tool")["input_ids"]
    schemas = {t.function.name: t.function.parameters for t in TOOLS}
    for seed in range(2):
        for choice in ("required", P.NamedToolChoice(function=P.FunctionName(name="add"))):
            spec = tool_choice_constraint(TOOLS, choice)
            out = _generate(model, prompt, compiler.matcher(spec), 120, temperature, seed)
            assert out[-1] == 2, "the grammar completed"
            content, calls = _run(lambda: extractor(choice, None), _text(tokenizer, out), 2)
            assert content == "" and calls
            for name, arguments in calls:
                jsonschema.validate(arguments, schemas[name])
