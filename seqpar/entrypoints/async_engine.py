"""The async front of the engine: one thread owns the Engine, the event loop talks to it.

The Engine is not thread-safe, so exactly one thread (the engine thread) calls it. HTTP handlers,
on the event loop, post commands (add, abort, call) to a thread-safe inbox and await the outputs:

1. The engine thread takes every command waiting in the inbox, applies them in order, then runs
   one step if any request is unfinished; with nothing to run it sleeps on the inbox. Requests
   added while a step runs join the next step (continuous batching across clients).
2. Each step's outputs go back to the loop in one `call_soon_threadsafe`, which routes every
   output to the asyncio queue of the HTTP request that owns it (a request with n prompts, or
   n > 1, owns several engine requests and one queue).
3. A handler that stops listening (client gone, stream closed, error) aborts its unfinished
   engine requests, which frees their KV blocks before the next step.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from seqpar.sampling_params import SamplingParams


class QueueFull(Exception):
    """More requests wait than the server admits (--max-waiting)."""


class EngineDead(RuntimeError):
    """The engine stopped: a rank died, or the server is shutting down."""


@dataclass
class _Route:
    """Where one engine request's outputs go, and its timings (loop thread only)."""
    queue: asyncio.Queue
    arrival: float
    last: float = 0.0
    tokens: int = 0


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


class Stream:
    """The outputs of one HTTP request's engine requests, in step order, until all finished.

    Use as `async with stream: async for out in stream: ...`; leaving the block early (an error,
    a disconnect, a cancelled task) aborts what is unfinished.
    """

    def __init__(self, front: AsyncEngine, queue: asyncio.Queue, ids: list[str]):
        self._front = front
        self._queue = queue
        self.unfinished = set(ids)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.unfinished:
            raise StopAsyncIteration
        out = await self._queue.get()
        if isinstance(out, BaseException):
            self.unfinished.clear()
            raise out
        if out.finished:
            self.unfinished.discard(out.request_id)
        return out

    def close(self) -> None:
        if self.unfinished:
            self._front.abort(sorted(self.unfinished))
            self.unfinished.clear()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        self.close()


@dataclass
class _Command:
    kind: str  # "add" | "abort" | "call" | "stop"
    payload: object = None
    future: asyncio.Future | None = None


class AsyncEngine:
    """engine: the Engine (add_request / step / abort_request / has_unfinished / num_waiting).
    max_waiting: most requests waiting for admission; an add beyond it raises QueueFull.
    rank_failure: returns why a rank died, or None while all live (polled while idle).
    metrics: on_output(route, out, now) on the loop thread, on_step(seconds) on the engine thread.
    on_death(reason): called from the engine thread once when the engine fails."""

    IDLE_POLL_S = 0.5
    """How often an idle engine thread checks that the ranks are alive."""

    def __init__(self, engine, max_waiting: int, rank_failure: Callable[[], str | None],
                 metrics, on_death: Callable[[str], None]):
        self.engine = engine
        self.max_waiting = max_waiting
        self._rank_failure = rank_failure
        self._metrics = metrics
        self._on_death = on_death
        self._inbox: deque[_Command] = deque()
        self._wake = threading.Condition()
        self._routes: dict[str, _Route] = {}  # loop thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="seqpar-engine", daemon=True)
        self.error: str | None = None
        """Why the engine stopped (a rank's error), None while it runs."""

    # ---- loop side ---------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort everything, end the engine thread (blocking) and fail streams still open."""
        if self._thread.is_alive():
            self._post(_Command("stop"))
            self._thread.join(timeout)
        self._fail_all("the server is shutting down")

    async def submit(self, requests: list[EngineRequest]) -> Stream:
        """Add requests to the engine (all or none); raises the engine's ValueError (a bad
        prompt), QueueFull, or EngineDead."""
        queue: asyncio.Queue = asyncio.Queue()
        now = time.perf_counter()
        ids = [r.request_id for r in requests]
        for rid in ids:
            self._routes[rid] = _Route(queue, now)
        try:
            await self._ask(_Command("add", requests))
        except BaseException:
            # Refused (nothing was added), or the handler was cancelled after posting the add:
            # aborting an id the engine never took is a no-op.
            self.abort(ids)
            raise
        return Stream(self, queue, ids)

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._routes.pop(rid, None)
        self._post(_Command("abort", request_ids))

    async def call(self, fn: Callable):
        """fn(engine) on the engine thread between steps (statistics read there)."""
        return await self._ask(_Command("call", fn))

    def _ask(self, cmd: _Command) -> asyncio.Future:
        if self.error is not None:
            raise EngineDead(self.error)
        cmd.future = self._loop.create_future()
        self._post(cmd)
        return cmd.future

    def _post(self, cmd: _Command) -> None:
        with self._wake:
            self._inbox.append(cmd)
            self._wake.notify()

    def _deliver(self, outputs: list) -> None:
        now = time.perf_counter()
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue  # aborted while its step ran
            self._metrics.on_output(route, out, now)
            if out.finished:
                del self._routes[out.request_id]
            route.queue.put_nowait(out)

    def _fail_all(self, reason: str) -> None:
        error = EngineDead(reason)
        for route in {id(r.queue): r for r in self._routes.values()}.values():
            route.queue.put_nowait(error)
        self._routes.clear()

    # ---- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                commands = self._take(wait=not engine.has_unfinished())
                if any(cmd.kind == "stop" for cmd in commands):
                    for cmd in commands:
                        self._answer(cmd, EngineDead("the server is shutting down"))
                    return
                for cmd in commands:
                    self._apply(cmd)
                if engine.has_unfinished():
                    start = time.perf_counter()
                    outputs = engine.step()
                    self._metrics.on_step(time.perf_counter() - start)
                    if outputs:
                        self._loop.call_soon_threadsafe(self._deliver, outputs)
        except BaseException as e:  # a rank died (the engine names it), or a bug: stop serving
            self._die(str(e) if isinstance(e, EngineDead) else f"{type(e).__name__}: {e}")

    def _take(self, wait: bool) -> list[_Command]:
        with self._wake:
            while wait and not self._inbox:
                self._wake.wait(self.IDLE_POLL_S)
                if not self._inbox:
                    failure = self._rank_failure()
                    if failure is not None:
                        raise EngineDead(failure)
            commands = list(self._inbox)
            self._inbox.clear()
        return commands

    def _apply(self, cmd: _Command) -> None:
        engine = self.engine
        if cmd.kind == "abort":
            for rid in cmd.payload:
                engine.abort_request(rid)
            return
        try:
            if cmd.kind == "call":
                result = cmd.payload(engine)
            else:
                result = self._add(cmd.payload)
        except (ValueError, QueueFull) as e:
            result = e
        self._answer(cmd, result)

    def _add(self, requests: list[EngineRequest]) -> None:
        waiting = self.engine.num_waiting()
        if waiting + len(requests) > self.max_waiting:
            raise QueueFull(f"{waiting} requests are waiting, the server admits at most "
                            f"{self.max_waiting} (--max-waiting); retry later")
        added = []
        try:
            for r in requests:
                self.engine.add_request(r.request_id, r.prompt_ids, r.params, prompt=r.prompt)
                added.append(r.request_id)
        except ValueError:
            for rid in added:
                self.engine.abort_request(rid)
            raise

    def _answer(self, cmd: _Command, result) -> None:
        if cmd.future is not None:
            self._loop.call_soon_threadsafe(_resolve, cmd.future, result)

    def _die(self, reason: str) -> None:
        self.error = reason
        with self._wake:
            pending = list(self._inbox)
            self._inbox.clear()
        for cmd in pending:
            self._answer(cmd, EngineDead(reason))
        self._loop.call_soon_threadsafe(self._fail_all, reason)
        self._on_death(reason)


def _resolve(future: asyncio.Future, result) -> None:
    if future.done():
        return  # the handler was cancelled meanwhile
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
