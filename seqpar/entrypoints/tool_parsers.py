"""Tool calls out of the model's text, as OpenAI's `tool_calls`, streamed or whole.

Each request with tools gets one extractor, fed the text deltas as they come:
`feed(text) -> (content, [DeltaToolCall])`, then `finish()` for what is left. A call's first
DeltaToolCall carries its id, type and name (arguments ""), the next ones pieces of its
arguments, as OpenAI streams them; a whole response joins them (assemble()).

- tool_choice "auto" (with --enable-auto-tool-choice): the --tool-call-parser reads the calls
  the model chose to write: `hermes` (Qwen2 / Qwen3, Hermes: `<tool_call>{"name": ...,
  "arguments": {...}}</tool_call>` among free text) or `llama3_json` (Llama 3.x: the whole turn
  is `{"name": ..., "parameters": {...}}`, several joined by ";", maybe after <|python_tag|>).
- tool_choice "required" or a named function: the output is forced by a grammar
  (tool_choice_constraint), so it always parses: for "required" a JSON array of
  {"name", "parameters"}, for a named function its arguments object itself.
"""
from __future__ import annotations

import json
import uuid

from seqpar.engine.detokenizer import partial_suffix
from seqpar.entrypoints import protocol as P
from seqpar.sampling_params import StructuredOutputsParams

PARSERS = ("hermes", "llama3_json")


def _header(index: int, name: str) -> P.DeltaToolCall:
    return P.DeltaToolCall(index=index, id=f"call_{uuid.uuid4().hex[:24]}", type="function",
                           function=P.DeltaFunctionCall(name=name, arguments=""))


def _arguments(index: int, text: str) -> P.DeltaToolCall:
    return P.DeltaToolCall(index=index, function=P.DeltaFunctionCall(arguments=text))


class _Calls:
    """Numbers the calls an extractor finds and turns each into its deltas."""

    def __init__(self):
        self.count = 0

    def whole(self, name, arguments) -> list[P.DeltaToolCall] | None:
        """A complete call's two deltas; None when name / arguments are not a call's."""
        if not isinstance(name, str) or not isinstance(arguments, (dict, str)):
            return None
        text = arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                       ensure_ascii=False)
        index, self.count = self.count, self.count + 1
        return [_header(index, name), _arguments(index, text)]


class HermesParser(_Calls):
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self):
        super().__init__()
        self.buffer = ""
        self.inside = False
        """Between a START and its END."""

    def feed(self, text: str) -> tuple[str, list[P.DeltaToolCall]]:
        self.buffer += text
        content, deltas = [], []
        while True:
            if not self.inside:
                i = self.buffer.find(self.START)
                if i < 0:
                    keep = partial_suffix(self.buffer, [self.START])
                    content.append(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                content.append(self.buffer[:i])
                self.buffer, self.inside = self.buffer[i + len(self.START):], True
            else:
                j = self.buffer.find(self.END)
                if j < 0:
                    break
                raw, self.buffer, self.inside = self.buffer[:j], self.buffer[j + len(self.END):], False
                call = self._parse(raw)
                if call is None:  # not a call after all: the model's text, as it wrote it
                    content.append(self.START + raw + self.END)
                else:
                    deltas += call
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[P.DeltaToolCall]]:
        if not self.inside:
            rest, self.buffer = self.buffer, ""
            return rest, []
        # A call the model ended (EOS) before writing END: a call if its JSON is whole.
        raw, self.buffer, self.inside = self.buffer, "", False
        call = self._parse(raw)
        return ("", call) if call is not None else (self.START + raw, [])

    def _parse(self, raw: str) -> list[P.DeltaToolCall] | None:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            return None
        return self.whole(obj.get("name"), obj.get("arguments", {})) \
            if isinstance(obj, dict) else None


class Llama3JsonParser(_Calls):
    TAG = "<|python_tag|>"

    def __init__(self):
        super().__init__()
        self.buffer = ""
        self.mode: str | None = None
        """None until the turn's first characters decide: "text" or "calls"."""

    def feed(self, text: str) -> tuple[str, list[P.DeltaToolCall]]:
        if self.mode == "text":
            return text, []
        self.buffer += text
        if self.mode is None:
            head = self.buffer.lstrip()
            if not head or (self.TAG.startswith(head) and head != self.TAG):
                return "", []  # undecided yet
            self.mode = "calls" if head.startswith(("{", self.TAG)) else "text"
            if self.mode == "text":
                out, self.buffer = self.buffer, ""
                return out, []
        return "", []  # calls are parsed whole at the end

    def finish(self) -> tuple[str, list[P.DeltaToolCall]]:
        text, self.buffer = self.buffer, ""
        if self.mode != "calls":
            return text, []
        body = text.strip().removeprefix(self.TAG).strip()
        decoder, pos, deltas = json.JSONDecoder(), 0, []
        while pos < len(body):
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except json.JSONDecodeError:
                obj = None
            call = None if not isinstance(obj, dict) else \
                self.whole(obj.get("name"), obj.get("parameters", obj.get("arguments", {})))
            if call is None:  # not calls after all: give the text back
                self.count = 0
                return text, []
            deltas += call
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return "", deltas


class NamedFunction(_Calls):
    """The whole output is the named function's arguments (forced by the grammar): stream them
    as they come."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def feed(self, text: str) -> tuple[str, list[P.DeltaToolCall]]:
        deltas = []
        if self.count == 0:
            self.count = 1
            deltas.append(_header(0, self.name))
        if text:
            deltas.append(_arguments(0, text))
        return "", deltas

    def finish(self) -> tuple[str, list[P.DeltaToolCall]]:
        return "", [] if self.count else self.feed("")[1]  # no text at all: the header alone


class RequiredFunctions(_Calls):
    """The output is a JSON array of {"name", "parameters"} (forced by the grammar), parsed whole;
    cut short (max_tokens), the calls it completed before the cut (a model may go on adding
    calls), or the text as it is when it completed none."""

    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []

    def feed(self, text: str) -> tuple[str, list[P.DeltaToolCall]]:
        self.pieces.append(text)
        return "", []

    def finish(self) -> tuple[str, list[P.DeltaToolCall]]:
        text = "".join(self.pieces)
        deltas = []
        for call in _array_items(text):
            if isinstance(call, dict):
                deltas += self.whole(call.get("name"), call.get("parameters", {})) or []
        return ("", deltas) if deltas else (text, [])


def _array_items(text: str) -> list:
    """The complete items of a JSON array, whole or cut short anywhere. Raw control characters
    in strings are read (xgrammar's JSON grammar lets them through; strict JSON refuses them)."""
    decoder, items = json.JSONDecoder(strict=False), []
    pos = text.find("[") + 1
    while pos:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:  # the closing "]", or an item the cut left open
            break
        items.append(item)
    return items


def extractor(tool_choice, parser: str | None):
    """The extractor for a request's tool_choice ("auto" with the server's parser, "required", a
    NamedToolChoice), None when the text is plain content ("none")."""
    if tool_choice == "auto":
        return {"hermes": HermesParser, "llama3_json": Llama3JsonParser}[parser]()
    if tool_choice == "required":
        return RequiredFunctions()
    if isinstance(tool_choice, P.NamedToolChoice):
        return NamedFunction(tool_choice.function.name)
    return None


def tool_choice_constraint(tools: list[P.ToolDefinition], tool_choice
                           ) -> StructuredOutputsParams | None:
    """The grammar that forces "required" or a named function's call (None for "none" / "auto"):
    a JSON array of at least one {"name": one of the tools, "parameters": its schema}, or the
    named function's arguments object. Compact JSON (no free whitespace): a call needs no
    layout, and a model cannot pad it forever."""
    def schema(tool: P.ToolDefinition) -> dict:
        return tool.function.parameters or {"type": "object"}

    if tool_choice == "required":
        calls = [{"type": "object", "properties": {"name": {"enum": [t.function.name]},
                                                   "parameters": schema(t)},
                  "required": ["name", "parameters"]} for t in tools]
        return StructuredOutputsParams(json={"type": "array", "minItems": 1,
                                             "items": {"anyOf": calls}},
                                       disable_any_whitespace=True)
    if isinstance(tool_choice, P.NamedToolChoice):
        [tool] = [t for t in tools if t.function.name == tool_choice.function.name]
        return StructuredOutputsParams(json=schema(tool), disable_any_whitespace=True)
    return None


def assemble(deltas: list[P.DeltaToolCall]) -> list[P.ToolCall]:
    """A whole response's calls from their deltas."""
    calls: list[P.ToolCall] = []
    for d in deltas:
        if d.id is not None:
            calls.append(P.ToolCall(id=d.id, function=P.FunctionCall(name=d.function.name,
                                                                     arguments="")))
        calls[d.index].function.arguments += d.function.arguments or ""
    return calls
