"""`seqpar serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over one engine.

One handler per endpoint; each turns its body into engine requests, submits them to the async
front (async_engine.py) and streams the engine's deltas as they come (or folds them into whole
outputs). Every error is an OpenAI error object `{"error": {"message", "type", "param", "code"}}`.
The server holds the engine and its tokenizer only (no offline LLM).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import os
import re
import signal
import socket
import sys
import uuid
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from seqpar.engine.outputs import OutputCollector
from seqpar.engine.tokenizer import as_ids, chat_prompt_ids
from seqpar.entrypoints import protocol as P
from seqpar.entrypoints.async_engine import AsyncEngine, EngineDead, EngineRequest, QueueFull
from seqpar.entrypoints.metrics import ServerMetrics, snapshot
from seqpar.entrypoints.tool_parsers import assemble, extractor, tool_choice_constraint
from seqpar.sampling_params import SamplingParams, StructuredOutputsParams

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}
GRACEFUL_SHUTDOWN_S = 5
"""On SIGTERM / SIGINT, how long open requests may finish before they are cancelled."""


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    info = P.ErrorInfo(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"),
                       param=param, code=code)
    return JSONResponse(P.ErrorResponse(error=info).model_dump(), status_code=status)


def _error_json(status: int, message: str) -> str:
    info = P.ErrorInfo(message=message, type=ERROR_TYPES[status])
    return P.ErrorResponse(error=info).model_dump_json()


# ---- the server's state ----------------------------------------------------------------------

class Server:
    """What the handlers share: the engine front, the tokenizer, the metrics, the tool options."""

    def __init__(self, engine, model_name: str, max_waiting: int, on_death,
                 tool_parser: str | None = None):
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = engine.cfg.max_model_len
        # Shared with the engine thread's detokenizers: encoding, chat templates and decoding
        # only read a fast tokenizer (tokenizers' objects take shared borrows for them).
        self.tokenizer = engine.tokenizer
        self.tool_parser = tool_parser
        """The --tool-call-parser for tool_choice "auto"; None: "auto" is refused."""
        self.metrics = ServerMetrics(model_name)
        self.front = AsyncEngine(engine, max_waiting, lambda: _rank_failure(engine.cluster),
                                 self.metrics, on_death)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise APIError(400, "the prompt is text but the model has no tokenizer files; send "
                                "token ids instead", param="prompt")
        return as_ids(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def chat_ids(self, messages: list[P.ChatMessage], tools: list[P.ToolDefinition] | None,
                 add_generation_prompt: bool = True) -> list[int]:
        try:
            return chat_prompt_ids(self.tokenizer, [_template_message(m) for m in messages],
                                   [t.model_dump(exclude_none=True) for t in tools or []] or None,
                                   add_generation_prompt)
        except ValueError as e:  # no tokenizer or no chat template
            raise APIError(400, f"{e}; use /v1/completions", param="messages") from e

    def token_text(self, token: int) -> str:
        return str(token) if self.tokenizer is None else self.tokenizer.decode([token])

    def check_length(self, ids: list[int], max_tokens: int | None, param: str) -> int:
        """max_tokens (None: as many as fit), after a 400 naming both numbers when the prompt
        and max_tokens do not fit in max_model_len (a prompt too long alone is the prompt's)."""
        try:
            self.engine.check_prompt(ids)
        except ValueError as e:  # the message names the limit
            raise APIError(400, str(e), param="prompt") from e
        if max_tokens is None:
            return max(1, self.max_model_len - len(ids))
        if len(ids) + max_tokens > self.max_model_len:
            raise APIError(400, f"{param}={max_tokens} and the prompt's {len(ids)} tokens make "
                                f"{len(ids) + max_tokens} tokens, more than this model's "
                                f"max_model_len={self.max_model_len}; lower {param} or shorten "
                                "the prompt", param=param)
        return max_tokens

    def check_params(self, params: SamplingParams, fields: dict[str, str]) -> None:
        """What the engine cannot honour (a grammar xgrammar cannot build...) as a 400 naming
        the request's field: fields maps the SamplingParams field the engine's message begins
        with ("structured_outputs", "logprobs", "prompt_logprobs") to the request's."""
        try:
            self.engine.check_params(params)
        except ValueError as e:
            culprit = re.match(r"\w*", str(e)).group()
            raise APIError(400, str(e), param=fields.get(culprit, culprit)) from e

    async def submit(self, requests: list[EngineRequest]):
        try:
            return await self.front.submit(requests)
        except ValueError as e:  # the engine refused a prompt: the message names the limit
            raise APIError(400, str(e), param="prompt") from e


def _rank_failure(cluster) -> str | None:
    """Why one of the engine's ranks died, None while they all live."""
    if cluster.alive():
        return None
    return (cluster.spawner and cluster.spawner.failure(5.0)) or "a rank died"


def _template_message(m: P.ChatMessage) -> dict:
    """A message as chat templates read it: tool calls' arguments as objects (templates render
    them with tojson), not OpenAI's JSON text."""
    message = {"role": m.role, "content": m.text()}
    if m.name is not None:
        message["name"] = m.name
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        message["tool_calls"] = [
            {"id": c.id, "type": c.type,
             "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
            for c in m.tool_calls]
    return message


def _json_or_text(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ---- request -> engine requests --------------------------------------------------------------

def _refuse_unsupported(body) -> None:
    for name, off in P.UNSUPPORTED.items():
        if name in body.model_fields and getattr(body, name) not in off:
            raise APIError(400, f"{name}={getattr(body, name)!r} is not supported by this server",
                           param=name)


def _structured(body, tool_constraint: StructuredOutputsParams | None = None
                ) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's grammar and the field that asked for it: structured_outputs,
    response_format or (chat) a tool_choice that forces calls; two at once is a 400."""
    given = []
    if body.structured_outputs is not None:
        given.append(("structured_outputs", body.structured_outputs))
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        given.append(("response_format", StructuredOutputsParams(json_object=True)))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs "
                                "json_schema.schema", param="response_format")
        given.append(("response_format", StructuredOutputsParams(json=fmt.json_schema.json_schema)))
    if tool_constraint is not None:
        given.append(("tool_choice", tool_constraint))
    if len(given) > 1:
        raise APIError(400, f"{given[0][0]} and {given[1][0]} both constrain the output; send "
                            "one of them", param=given[1][0])
    return given[0][1] if given else None, given[0][0] if given else None


def _sampling(body, max_tokens: int, logprobs: int | None, **extra) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
            logprobs=logprobs, stop=body.stop, ignore_eos=body.ignore_eos, seed=body.seed, **extra)
    except ValueError as e:
        raise APIError(400, str(e)) from e


def _engine_requests(request_id: str, prompts: list[tuple[str | None, list[int]]],
                     params: list[SamplingParams], n: int) -> list[EngineRequest]:
    """n requests per prompt; choice index i*n + j is request f"{request_id}-{i*n+j}". With a seed,
    the j-th sample of a prompt uses seed + j, so the n samples differ."""
    if n < 1:
        raise APIError(400, f"n must be >= 1, got {n}", param="n")
    requests = []
    for i, ((text, ids), p) in enumerate(zip(prompts, params)):
        for j in range(n):
            pj = p if j == 0 or p.seed is None else dataclasses.replace(p, seed=p.seed + j)
            requests.append(EngineRequest(f"{request_id}-{i * n + j}", ids, pj, text))
    return requests


def _index(out) -> int:
    return int(out.request_id.rsplit("-", 1)[1])


def _usage(prompt_lens: list[int], finals: list, n: int) -> P.Usage:
    prompt = sum(prompt_lens)
    completion = sum(len(out.token_ids) for out in finals)
    cached = sum(out.num_cached_tokens for out in finals if _index(out) % n == 0)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion,
                   prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached))


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _final_outputs(stream, request: Request, prompts: dict[str, tuple]) -> list | None:
    """Every engine request's whole output (folded from its deltas), in choice order; None if
    the client left first (its requests are aborted then). prompts: request id -> (text, ids)."""
    async def collect():
        collectors = {rid: OutputCollector(rid, *prompt) for rid, prompt in prompts.items()}
        async for delta in stream:
            collectors[delta.request_id].add(delta)
        return sorted((c.result() for c in collectors.values()), key=_index)

    async with stream:
        done_task = asyncio.ensure_future(collect())
        gone_task = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone_task.cancel()
            if not done_task.done():
                done_task.cancel()
        return done_task.result() if done_task.done() and not done_task.cancelled() else None


def _sse(chunks, stream) -> StreamingResponse:
    """Server-sent events: one `data:` line per chunk, then [DONE]. A client that goes away
    cancels the body and so aborts its requests (Stream.__aexit__)."""
    async def body():
        async with stream:
            try:
                async for chunk in chunks:
                    yield f"data: {chunk.model_dump_json()}\n\n"
            except EngineDead as e:
                yield f"data: {_error_json(503, str(e))}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(body(), media_type="text/event-stream")


# ---- logprobs in OpenAI's two shapes ---------------------------------------------------------

def _completion_logprobs(server: Server, ids: list[int], logprobs: list[dict | None], k: int,
                         offset: int) -> P.CompletionLogprobs:
    """Legacy completions' logprobs of ids, text offsets counted from offset. An entry None (the
    first prompt token's, with echo) has no logprob and no top tokens."""
    result = P.CompletionLogprobs()
    for token, step in zip(ids, logprobs):
        text = server.token_text(token)
        result.tokens.append(text)
        result.text_offset.append(offset)
        offset += len(text)
        if step is None:
            result.token_logprobs.append(None)
            result.top_logprobs.append(None)
            continue
        top = sorted(step.items(), key=lambda kv: -kv[1])[:k]
        result.token_logprobs.append(step.get(token))
        result.top_logprobs.append({server.token_text(t): lp for t, lp in top})
    return result


def _chat_logprobs(server: Server, ids: list[int], logprobs: list[dict], k: int) -> P.ChatLogprobs:
    def entry(cls, token, lp, **extra):
        text = server.token_text(token)
        return cls(token=text, logprob=lp, bytes=list(text.encode()), **extra)

    content = [entry(P.TokenLogprob, token, step.get(token, float("-inf")),
                     top_logprobs=[entry(P.TopLogprob, t, lp)
                                   for t, lp in sorted(step.items(), key=lambda kv: -kv[1])[:k]])
               for token, step in zip(ids, logprobs)]
    return P.ChatLogprobs(content=content)


# ---- the app ---------------------------------------------------------------------------------

def build_app(server: Server, api_key: str | None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        server.front.start(asyncio.get_running_loop())
        yield
        server.front.stop()

    app = FastAPI(title="seqpar", lifespan=lifespan)

    async def check_api_key(authorization: str | None = Header(default=None)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header "
                                "'Authorization: Bearer <key>' with the server's --api-key",
                           code="invalid_api_key")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])
    keyed = APIRouter(dependencies=[Depends(check_api_key)])

    @app.get("/health")
    async def health():
        if server.front.error is not None:
            return error_response(503, f"the engine stopped: {server.front.error}")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        snap = None
        if server.front.error is None:
            snap = await server.front.call(snapshot)
        return Response(server.metrics.render(snap), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models() -> P.ModelList:
        card = P.ModelCard(id=server.model_name, root=str(server.engine.cfg.model_dir),
                           max_model_len=server.max_model_len)
        return P.ModelList(data=[card])

    @keyed.post("/tokenize")
    async def tokenize(body: P.TokenizeCompletionRequest | P.TokenizeChatRequest
                       ) -> P.TokenizeResponse:
        server.check_model(body.model)
        if isinstance(body, P.TokenizeChatRequest):
            ids = server.chat_ids(body.messages, body.tools, body.add_generation_prompt)
        else:
            ids = server.encode(body.prompt, body.add_special_tokens)
        strs = server.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
        return P.TokenizeResponse(count=len(ids), max_model_len=server.max_model_len, tokens=ids,
                                  token_strs=strs)

    @keyed.post("/detokenize")
    async def detokenize(body: P.DetokenizeRequest) -> P.DetokenizeResponse:
        server.check_model(body.model)
        if server.tokenizer is None:
            raise APIError(400, "the model has no tokenizer files", param="tokens")
        vocab = server.engine.cfg.model.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocab (size {vocab})",
                           param="tokens")
        return P.DetokenizeResponse(prompt=server.tokenizer.decode(body.tokens))

    @v1.post("/completions")
    async def completions(body: P.CompletionRequest, request: Request):
        server.check_model(body.model)
        _refuse_unsupported(body)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        prompts = [(p, server.encode(p)) if isinstance(p, str) else (None, list(p))
                   for p in prompt]
        k = body.logprobs
        # Echo with logprobs scores the prompt too (what log-likelihood evaluations read).
        asked = [x for x in (body.prompt_logprobs, k if body.echo else None) if x is not None]
        prompt_k = max(asked) if asked else None
        grammar, grammar_field = _structured(body)
        fields = {"structured_outputs": grammar_field,
                  "prompt_logprobs": "prompt_logprobs" if body.prompt_logprobs is not None
                  else "echo"}
        params = [_sampling(body, server.check_length(ids, body.max_tokens, "max_tokens"), k,
                            prompt_logprobs=prompt_k, structured_outputs=grammar)
                  for _, ids in prompts]
        for p in params[:1]:  # the same settings for every prompt
            server.check_params(p, fields)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        requests = _engine_requests(request_id, prompts, params, body.n)
        stream = await server.submit(requests)
        prompt_lens = [len(ids) for _, ids in prompts]
        make = lambda choices, usage=None: P.CompletionResponse(  # noqa: E731
            id=request_id, model=server.model_name, choices=choices, usage=usage)

        def choice(out, first: bool, offset: int) -> P.CompletionChoice:
            """A choice of out (a delta, or a whole output); the first of a choice starts with
            the prompt under echo. offset: where out's text begins in the choice's text."""
            text, ids, lps = out.text, out.token_ids, out.logprobs
            if body.echo and first:
                prompt_text, prompt_ids = prompts[_index(out) // body.n]
                if prompt_text is None:
                    prompt_text = "" if server.tokenizer is None else \
                        server.tokenizer.decode(prompt_ids)
                text = prompt_text + text
                if k is not None:  # the prompt's logprobs were asked with echo (prompt_k)
                    ids, lps = prompt_ids + ids, out.prompt_logprobs + lps
            return P.CompletionChoice(
                index=_index(out), text=text, finish_reason=out.finish_reason,
                logprobs=None if k is None else _completion_logprobs(server, ids, lps, k, offset),
                prompt_logprobs=_prompt_logprobs(out.prompt_logprobs)
                if body.prompt_logprobs is not None and first else None)

        if body.stream:
            async def chunks():
                finals, offsets = {}, {}
                async for out in stream:
                    if not (out.text or out.token_ids or out.finished):
                        continue
                    first = out.request_id not in offsets
                    part = choice(out, first, offsets.get(out.request_id, 0))
                    offsets[out.request_id] = offsets.get(out.request_id, 0) + len(part.text)
                    yield make([part])
                    finals.setdefault(out.request_id, OutputCollector(out.request_id, None, []))
                    finals[out.request_id].add(out)
                if body.stream_options and body.stream_options.include_usage:
                    yield make([], _usage(prompt_lens, [f.result() for f in finals.values()],
                                          body.n))
            return _sse(chunks(), stream)

        finals = await _final_outputs(stream, request, {r.request_id: (r.prompt, r.prompt_ids)
                                                        for r in requests})
        if finals is None:
            return Response(status_code=499)  # nobody reads it: the client went away
        return make([choice(out, True, 0) for out in finals], _usage(prompt_lens, finals, body.n))

    @v1.post("/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        _refuse_unsupported(body)
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        tools = body.tools or []
        tool_choice = _tool_choice(server, body, tools)
        ids = server.chat_ids(body.messages, tools)
        k = (body.top_logprobs or 0) if body.logprobs else None
        asked, field = (body.max_tokens, "max_tokens") if body.max_completion_tokens is None \
            else (body.max_completion_tokens, "max_completion_tokens")
        grammar, grammar_field = _structured(body, tool_choice_constraint(tools, tool_choice))
        params = _sampling(body, server.check_length(ids, asked, field), k,
                           structured_outputs=grammar)
        server.check_params(params, {"structured_outputs": grammar_field,
                                     "logprobs": "top_logprobs"})
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        requests = _engine_requests(request_id, [(None, ids)], [params], body.n)
        stream = await server.submit(requests)
        calls_end_turn = tool_choice in ("auto", "required")

        def logprobs_of(ids, lps):
            return None if k is None else _chat_logprobs(server, ids, lps, k)

        def finish_reason(out, made_calls: bool) -> str | None:
            return "tool_calls" if made_calls and calls_end_turn and out.finish_reason == "stop" \
                else out.finish_reason

        if body.stream:
            def make(choices, usage=None):
                return P.ChatCompletionChunk(id=request_id, model=server.model_name,
                                             choices=choices, usage=usage)

            async def chunks():
                # The role first, once per choice, then content and tool-call deltas as they come.
                yield make([P.ChatChunkChoice(index=i, delta=P.Delta(role="assistant", content=""))
                            for i in range(body.n)])
                extractors = {i: extractor(tool_choice, server.tool_parser) for i in range(body.n)}
                finals, made_calls = {}, set()
                async for out in stream:
                    if not (out.text or out.token_ids or out.finished):
                        continue
                    i = _index(out)
                    content, calls = _extract(extractors[i], out.text, out.finished)
                    made_calls.update(i for _ in calls[:1])
                    parts = [P.ChatChunkChoice(index=i, delta=P.Delta(content=content or None),
                                               logprobs=logprobs_of(out.token_ids, out.logprobs))]
                    if calls and not (content or out.logprobs):
                        parts = []  # the tokens went into calls: no empty content chunk
                    parts += [P.ChatChunkChoice(index=i, delta=P.Delta(tool_calls=[call]))
                              for call in calls]
                    if out.finished:
                        parts[-1:] = [parts[-1].model_copy(update={
                            "finish_reason": finish_reason(out, i in made_calls)})] if parts \
                            else [P.ChatChunkChoice(index=i, delta=P.Delta(),
                                                    finish_reason=finish_reason(out, i in made_calls))]
                    for part in parts:
                        yield make([part])
                    finals.setdefault(out.request_id, OutputCollector(out.request_id, None, []))
                    finals[out.request_id].add(out)
                if body.stream_options and body.stream_options.include_usage:
                    yield make([], _usage([len(ids)], [f.result() for f in finals.values()],
                                          body.n))
            return _sse(chunks(), stream)

        finals = await _final_outputs(stream, request, {r.request_id: (None, ids)
                                                        for r in requests})
        if finals is None:
            return Response(status_code=499)
        choices = []
        for out in finals:
            content, calls = _extract(extractor(tool_choice, server.tool_parser), out.text, True)
            message = P.AssistantMessage(content=content or (None if calls else ""),
                                         tool_calls=assemble(calls))
            choices.append(P.ChatChoice(index=_index(out), message=message,
                                        logprobs=logprobs_of(out.token_ids, out.logprobs),
                                        finish_reason=finish_reason(out, bool(calls))))
        return P.ChatCompletionResponse(id=request_id, model=server.model_name, choices=choices,
                                        usage=_usage([len(ids)], finals, body.n))

    app.include_router(v1)
    app.include_router(keyed)
    _add_error_handlers(app)
    return app


def _tool_choice(server: Server, body: P.ChatCompletionRequest, tools: list):
    """The request's tool_choice, defaulted as OpenAI does and checked against the tools and the
    server's options."""
    choice = body.tool_choice if body.tool_choice is not None else ("auto" if tools else "none")
    if not tools and choice != "none":
        raise APIError(400, f"tool_choice={_said(choice)} needs tools", param="tool_choice")
    if isinstance(choice, P.NamedToolChoice):
        names = [t.function.name for t in tools]
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names the function {choice.function.name!r}, which "
                                f"is not among the tools ({', '.join(names)})", param="tool_choice")
    if choice == "auto" and server.tool_parser is None:
        raise APIError(400, 'tool_choice "auto" (the default when tools are given) needs the '
                            "server started with --enable-auto-tool-choice and --tool-call-parser; "
                            'send tool_choice "none", "required" or a named function',
                       param="tool_choice")
    return choice


def _said(choice) -> str:
    return repr(choice) if isinstance(choice, str) else f"function {choice.function.name!r}"


def _extract(ext, text: str, finished: bool) -> tuple[str, list[P.DeltaToolCall]]:
    """(content, tool-call deltas) of a new piece of text; ext None: all content."""
    if ext is None:
        return text, []
    content, calls = ext.feed(text)
    if finished:
        rest, more = ext.finish()
        content, calls = content + rest, calls + more
    return content, calls


def _joined(head: P.CompletionLogprobs, tail: P.CompletionLogprobs) -> P.CompletionLogprobs:
    return P.CompletionLogprobs(text_offset=head.text_offset + tail.text_offset,
                                token_logprobs=head.token_logprobs + tail.token_logprobs,
                                tokens=head.tokens + tail.tokens,
                                top_logprobs=head.top_logprobs + tail.top_logprobs)


def _prompt_logprobs(entries: list[dict | None] | None) -> list[dict[str, float] | None] | None:
    """vLLM's prompt_logprobs field: per prompt token {token id: logprob}, the first None."""
    if entries is None:
        return None
    return [None if e is None else {str(t): lp for t, lp in e.items()} for e in entries]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(QueueFull)
    async def queue_full(request, e: QueueFull):
        return error_response(429, str(e), code="queue_full")

    @app.exception_handler(EngineDead)
    async def engine_dead(request, e: EngineDead):
        return error_response(503, f"the engine stopped: {e}")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, e: RequestValidationError):
        # A body that is not JSON, or a field of the wrong type: name the first few fields.
        errors = e.errors()
        if errors and errors[0]["type"] == "json_invalid":
            return error_response(400, f"the request body is not valid JSON: {errors[0]['msg']}")
        if errors and tuple(errors[0]["loc"]) == ("body",):
            return error_response(400, "the request body must be a JSON object (send "
                                       "Content-Type: application/json)")
        where = lambda err: ".".join(str(x) for x in err["loc"][1:]) or "body"  # noqa: E731
        message = "; ".join(f"{where(err)}: {err['msg']}" for err in errors[:3])
        param = where(errors[0]) if errors else None
        return error_response(400, message or "invalid request body", param=param)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error_response(e.status_code, str(e.detail))


# ---- the process -----------------------------------------------------------------------------

def _bind(host: str, port: int) -> socket.socket:
    """Listen before any rank starts, so a taken port fails at once (it names the address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(args, engine_kwargs: dict) -> int:
    """Run `seqpar serve` until SIGTERM / SIGINT (exit 0) or a rank's death (exit 1)."""
    import uvicorn

    from seqpar.distributed.launch import in_torchrun
    from seqpar.engine.args import EngineArgs

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0..65535)")
    if args.max_waiting < 1:
        raise ValueError(f"--max-waiting must be >= 1, got {args.max_waiting}")
    if args.enable_auto_tool_choice != (args.tool_call_parser is not None):
        raise ValueError("--enable-auto-tool-choice and --tool-call-parser go together: the "
                         "parser reads the calls a model writes under tool_choice \"auto\"")
    engine_args = EngineArgs(**engine_kwargs, seed=args.seed)
    rank = int(os.environ.get("RANK", "0")) if in_torchrun() else 0
    sock = _bind(args.host, args.port) if rank == 0 else None
    # The ranks spawned below inherit ignored SIGINT and SIGTERM: a Ctrl-C (or a service manager)
    # signals the whole process group, and only this process should act on it, by closing the
    # ranks in order. A rank still dies with this process (launch.die_with_parent).
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        engine = engine_args.create_engine()
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    cluster = engine.cluster
    try:
        if rank != 0:
            # torchrun signals every rank; this one ends when rank 0 stops serving.
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            cluster.follow_call()  # rank 0's steps, until rank 0's end_call below
            return 0
        death: list[str] = []
        uv = None

        def on_death(reason: str) -> None:
            death.append(reason)
            uv.should_exit = True

        name = args.served_model_name or engine_kwargs["model"]
        server = Server(engine, name, args.max_waiting, on_death, args.tool_call_parser)
        uv = uvicorn.Server(uvicorn.Config(build_app(server, args.api_key), log_level="info",
                                           access_log=False,
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
        host, port = sock.getsockname()[:2]
        print(f"seqpar serve: {name} on http://{host}:{port} (OpenAI API under /v1)",
              file=sys.stderr, flush=True)
        # uvicorn turns SIGTERM / SIGINT into a graceful shutdown, then raises the signal again
        # under the handlers it found: these swallow it, so the ranks close below and we exit 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        if cluster.torchrun:
            cluster.begin_call()  # the other ranks follow (follow_call above) until end_call
        uv.run(sockets=[sock])
        if cluster.torchrun and not death:
            cluster.end_call(None)
    finally:
        cluster.close()
    if death:
        print(f"seqpar serve: error: {death[0]}", file=sys.stderr)
        return 1
    return 0
