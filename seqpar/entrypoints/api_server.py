"""`seqpar serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over one LLM's engine.

One handler per endpoint; each turns its body into engine requests, submits them to the async
front (async_engine.py) and streams or collects their outputs. Every error is an OpenAI error
object `{"error": {"message", "type", "param", "code"}}`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import os
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

from seqpar.sampling_params import SamplingParams
from seqpar.entrypoints import protocol as P
from seqpar.entrypoints.async_engine import AsyncEngine, EngineDead, EngineRequest, QueueFull
from seqpar.entrypoints.metrics import ServerMetrics, snapshot

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
    """What the handlers share: the engine front, a tokenizer of the loop's own, the metrics."""

    def __init__(self, llm, model_name: str, max_waiting: int, on_death):
        self.llm = llm
        self.model_name = model_name
        self.max_model_len = llm.cfg.max_model_len
        # Shared with the engine thread's detokenizers: encoding, chat templates and decoding
        # only read a fast tokenizer (tokenizers' objects take shared borrows for them).
        self.tokenizer = llm.tokenizer
        self.metrics = ServerMetrics(model_name)
        self.front = AsyncEngine(llm.engine, max_waiting, lambda: _rank_failure(llm),
                                 self.metrics, on_death)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")

    def encode(self, text: str) -> list[int]:
        try:
            return self.llm.encode(text)
        except ValueError as e:  # no tokenizer
            raise APIError(400, str(e), param="prompt") from e

    def chat_ids(self, messages: list[P.ChatMessage]) -> list[int]:
        try:
            return self.llm.chat_prompt_ids([{"role": m.role, "content": m.text()}
                                             for m in messages])
        except ValueError as e:  # no tokenizer or no chat template
            raise APIError(400, f"{e}; use /v1/completions", param="messages") from e

    def token_text(self, token: int) -> str:
        return str(token) if self.tokenizer is None else self.tokenizer.decode([token])

    async def submit(self, requests: list[EngineRequest]):
        try:
            return await self.front.submit(requests)
        except ValueError as e:  # the engine refused a prompt: the message names the limit
            raise APIError(400, str(e), param="prompt") from e


def _rank_failure(llm) -> str | None:
    """Why one of the LLM's ranks died, None while they all live."""
    cluster = llm.cluster
    if cluster.alive():
        return None
    return (cluster.spawner and cluster.spawner.failure(5.0)) or "a rank died"


# ---- request -> engine requests --------------------------------------------------------------

def _refuse_unsupported(body) -> None:
    for name, off in P.UNSUPPORTED.items():
        if name in body.model_fields and getattr(body, name) not in off:
            raise APIError(400, f"{name}={getattr(body, name)!r} is not supported by this server",
                           param=name)


def _sampling(body, max_tokens: int, logprobs: int | None) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0,
            logprobs=logprobs, stop=body.stop, ignore_eos=body.ignore_eos, seed=body.seed)
    except ValueError as e:
        raise APIError(400, str(e)) from e


def _max_tokens(asked: int | None, max_model_len: int, ids: list[int]) -> int:
    """None: as many as fit in max_model_len (a prompt too long is refused by the engine)."""
    return asked if asked is not None else max(1, max_model_len - len(ids))


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
    cached = sum(getattr(out, "num_cached_tokens", 0) for out in finals if _index(out) % n == 0)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion,
                   prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached))


async def _deltas(stream):
    """(output, new text, new token ids, their logprobs) as each output arrives."""
    seen: dict[str, tuple[int, int]] = {}
    async for out in stream:
        chars, tokens = seen.get(out.request_id, (0, 0))
        seen[out.request_id] = (len(out.text), len(out.token_ids))
        logprobs = None if out.logprobs is None else out.logprobs[tokens:]
        yield out, out.text[chars:], out.token_ids[tokens:], logprobs


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _final_outputs(stream, request: Request) -> list | None:
    """Every engine request's last output, in choice order; None if the client left first
    (its requests are aborted then)."""
    async def collect():
        finals = {}
        async for out in stream:
            finals[out.request_id] = out
        return sorted(finals.values(), key=_index)

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

def _completion_logprobs(server: Server, ids: list[int], logprobs: list[dict], k: int,
                         offset: int) -> P.CompletionLogprobs:
    result = P.CompletionLogprobs()
    for token, step in zip(ids, logprobs):
        text = server.token_text(token)
        top = sorted(step.items(), key=lambda kv: -kv[1])[:k]
        result.tokens.append(text)
        result.token_logprobs.append(step.get(token))
        result.top_logprobs.append({server.token_text(t): lp for t, lp in top})
        result.text_offset.append(offset)
        offset += len(text)
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

    @app.get("/health")
    async def health():
        if server.front.error is not None:
            return error_response(503, f"the engine stopped: {server.front.error}")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        snap = None
        if server.front.error is None:
            snap = await server.front.call(lambda engine: snapshot(server.llm))
        return Response(server.metrics.render(snap), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def models() -> P.ModelList:
        card = P.ModelCard(id=server.model_name, root=str(server.llm.cfg.model_dir),
                           max_model_len=server.max_model_len)
        return P.ModelList(data=[card])

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
        params = [_sampling(body, _max_tokens(body.max_tokens, server.max_model_len, ids), k)
                  for _, ids in prompts]
        request_id = f"cmpl-{uuid.uuid4().hex}"
        stream = await server.submit(_engine_requests(request_id, prompts, params, body.n))
        prompt_lens = [len(ids) for _, ids in prompts]
        make = lambda choices, usage=None: P.CompletionResponse(  # noqa: E731
            id=request_id, model=server.model_name, choices=choices, usage=usage)

        def logprobs_of(ids, lps, offset):
            return None if k is None else _completion_logprobs(server, ids, lps, k, offset)

        if body.stream:
            async def chunks():
                finals, offsets = [], {}
                async for out, text, ids, lps in _deltas(stream):
                    if not (text or ids or out.finished):
                        continue
                    offset = offsets.get(out.request_id, 0)
                    offsets[out.request_id] = offset + len(text)
                    yield make([P.CompletionChoice(index=_index(out), text=text,
                                                   logprobs=logprobs_of(ids, lps, offset),
                                                   finish_reason=out.finish_reason)])
                    if out.finished:
                        finals.append(out)
                if body.stream_options and body.stream_options.include_usage:
                    yield make([], _usage(prompt_lens, finals, body.n))
            return _sse(chunks(), stream)

        finals = await _final_outputs(stream, request)
        if finals is None:
            return Response(status_code=499)  # nobody reads it: the client went away
        return make([P.CompletionChoice(index=_index(out), text=out.text,
                                        logprobs=logprobs_of(out.token_ids, out.logprobs, 0),
                                        finish_reason=out.finish_reason) for out in finals],
                    _usage(prompt_lens, finals, body.n))

    @v1.post("/chat/completions")
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        _refuse_unsupported(body)
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, f"response_format={body.response_format!r} is not supported",
                           param="response_format")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        ids = server.chat_ids(body.messages)
        k = (body.top_logprobs or 0) if body.logprobs else None
        asked = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
        params = _sampling(body, _max_tokens(asked, server.max_model_len, ids), k)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stream = await server.submit(_engine_requests(request_id, [(None, ids)], [params], body.n))

        def logprobs_of(ids, lps):
            return None if k is None else _chat_logprobs(server, ids, lps, k)

        if body.stream:
            def make(choices, usage=None):
                return P.ChatCompletionChunk(id=request_id, model=server.model_name,
                                             choices=choices, usage=usage)

            async def chunks():
                # The role first, once per choice, then content deltas as tokens come.
                yield make([P.ChatChunkChoice(index=i, delta=P.Delta(role="assistant", content=""))
                            for i in range(body.n)])
                finals = []
                async for out, text, ids, lps in _deltas(stream):
                    if not (text or ids or out.finished):
                        continue
                    yield make([P.ChatChunkChoice(index=_index(out),
                                                  delta=P.Delta(content=text or None),
                                                  logprobs=logprobs_of(ids, lps),
                                                  finish_reason=out.finish_reason)])
                    if out.finished:
                        finals.append(out)
                if body.stream_options and body.stream_options.include_usage:
                    yield make([], _usage([len(ids)], finals, body.n))
            return _sse(chunks(), stream)

        finals = await _final_outputs(stream, request)
        if finals is None:
            return Response(status_code=499)
        choices = [P.ChatChoice(index=_index(out), message=P.AssistantMessage(content=out.text),
                                logprobs=logprobs_of(out.token_ids, out.logprobs),
                                finish_reason=out.finish_reason) for out in finals]
        return P.ChatCompletionResponse(id=request_id, model=server.model_name, choices=choices,
                                        usage=_usage([len(ids)], finals, body.n))

    app.include_router(v1)
    _add_error_handlers(app)
    return app


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


def serve(args, llm_kwargs: dict) -> int:
    """Run `seqpar serve` until SIGTERM / SIGINT (exit 0) or a rank's death (exit 1)."""
    import uvicorn

    from seqpar import LLM
    from seqpar.distributed.launch import in_torchrun

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0..65535)")
    if args.max_waiting < 1:
        raise ValueError(f"--max-waiting must be >= 1, got {args.max_waiting}")
    rank = int(os.environ.get("RANK", "0")) if in_torchrun() else 0
    sock = _bind(args.host, args.port) if rank == 0 else None
    # The ranks spawned below inherit ignored SIGINT and SIGTERM: a Ctrl-C (or a service manager)
    # signals the whole process group, and only this process should act on it, by closing the
    # ranks in order. A rank still dies with this process (launch.die_with_parent).
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        llm = LLM(**llm_kwargs, seed=args.seed)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    with llm:
        if rank != 0:
            # torchrun signals every rank; this one ends when rank 0 stops serving.
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            llm.cluster.follow_call()  # rank 0's steps, until rank 0's end_call below
            return 0
        death: list[str] = []
        uv = None

        def on_death(reason: str) -> None:
            death.append(reason)
            uv.should_exit = True

        name = args.served_model_name or llm_kwargs["model"]
        app = build_app(Server(llm, name, args.max_waiting, on_death), args.api_key)
        uv = uvicorn.Server(uvicorn.Config(app, log_level="info", access_log=False,
                                           timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
        host, port = sock.getsockname()[:2]
        print(f"seqpar serve: {name} on http://{host}:{port} (OpenAI API under /v1)",
              file=sys.stderr, flush=True)
        # uvicorn turns SIGTERM / SIGINT into a graceful shutdown, then raises the signal again
        # under the handlers it found: these swallow it, so the ranks close below and we exit 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        if llm.cluster.torchrun:
            llm.cluster.begin_call()  # the other ranks follow (follow_call above) until end_call
        uv.run(sockets=[sock])
        if llm.cluster.torchrun and not death:
            llm.cluster.end_call(None)
    if death:
        print(f"seqpar serve: error: {death[0]}", file=sys.stderr)
        return 1
    return 0
