"""OpenAI-compatible upstream simulator: a real loopback HTTP server standing in for vLLM / OpenAI.

Tests and benchmarks need an upstream whose latency, streaming pace and failures are controllable and
deterministic, without a GPU or the network. This module is both the server
(``python -m bench.upstream_sim --port 0``) and a test helper (``run_simulator``) that runs it as a
subprocess, so the gateway under test talks real HTTP over real sockets.

Knobs are server defaults, set by CLI flag (``--latency-ms``), env var (``SIM_LATENCY_MS``) or at runtime
(``POST /sim/config`` with ``{"latency_ms": 5}``). The per-request ones can also be overridden for one
request with an ``X-Sim-*`` header such as ``X-Sim-Latency-Ms``:

- ``latency_ms``: delay before the response headers (every endpoint under /v1).
- ``ttft_ms``: streams: delay between the headers and the first chunk; non-stream: added to the wait.
- ``tokens_per_s``: token pace (0 = instant); non-stream waits for the whole generation time.
- ``tokens``: completion tokens per answer (fewer, with finish_reason "length", when max_tokens is lower).
- ``fault``: ``none``, an HTTP status (``500``, ``503``, ``429``, any 400-599), ``timeout`` (hang before
  the headers), ``malformed``, ``cut`` (drop the connection halfway through the body or stream) or
  ``stall`` (send the headers and half the body or stream, then hang with the connection open, as a
  wedged upstream does; only the client's own deadline ends it).
- ``fault_rate``: share of requests that get the server default ``fault``; a ``X-Sim-Fault`` header
  always applies to its own request.
- ``fail_first``: the first N requests carrying the same ``X-Sim-Key`` (no header = one shared key) fail
  with 503; counters restart on ``/sim/config`` and ``/sim/reset``.
- ``retry_after``: ``Retry-After`` header value sent with 429/503 faults (empty = none).
- Server-only: ``embedding_dim`` (default ``dimensions``), ``models`` (comma list for /v1/models), ``seed``.

Chat requests are answered the way OpenAI shapes them, deterministically, so pass-through can be tested:

- ``tools`` (unless ``tool_choice`` is ``"none"``): the reply calls the named function of ``tool_choice``,
  else the first tool, with arguments sampled from its ``parameters`` schema; ``content`` is null,
  ``finish_reason`` is ``"tool_calls"``, and streams send the call in pieces keyed by ``index``.
- ``response_format`` ``json_object`` / ``json_schema``: the content is JSON (sampled from the schema).
- ``logprobs`` (with ``top_logprobs``): every content token gets a log probability and alternatives.
- A ``tool`` message must answer a ``tool_calls`` id of an earlier assistant message, and an assistant
  message may have null content only with ``tool_calls``, as OpenAI checks (400 otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import queue
import random
import resource
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any

from aiohttp import web

REPO_ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_FAULT_CAP_S = 300.0
REQUEST_ID_HISTORY = 100
FLAG_FAULTS = frozenset({"none", "timeout", "malformed", "cut", "stall"})
SSE_DONE = b"data: [DONE]\n\n"


def _parse_fault(value: Any) -> str:
    """Accept the named faults or an HTTP error status, so typos fail loudly instead of silently passing."""
    text = str(value).strip().lower()
    if text in FLAG_FAULTS or (text.isdigit() and 400 <= int(text) <= 599):
        return text
    raise ValueError(f"fault must be one of {sorted(FLAG_FAULTS)} or an HTTP status 400-599, got {value!r}")


def _non_negative(kind: Callable[[Any], float]) -> Callable[[Any], float]:
    """Wrap a number parser so negative delays or counts are rejected at the edge."""

    def parse(value: Any) -> float:
        number = kind(value)
        if number < 0:
            raise ValueError(f"must be >= 0, got {value!r}")
        return number

    return parse


def _parse_rate(value: Any) -> float:
    rate = float(value)
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"fault_rate must be within [0, 1], got {value!r}")
    return rate


def _parse_models(value: Any) -> tuple[str, ...]:
    names = value.split(",") if isinstance(value, str) else list(value)
    models = tuple(str(name).strip() for name in names if str(name).strip())
    if not models:
        raise ValueError("models must name at least one model")
    return models


@dataclasses.dataclass(frozen=True, slots=True)
class Knobs:
    """Behaviour of the simulator; frozen so a request's resolved view can't leak into the defaults."""

    latency_ms: float = 50.0
    ttft_ms: float = 0.0
    tokens_per_s: float = 0.0
    tokens: int = 16
    fault: str = "500"
    fault_rate: float = 0.0
    fail_first: int = 0
    retry_after: str = ""
    embedding_dim: int = 384
    models: tuple[str, ...] = ("sim-model",)
    seed: int = 0


KNOB_PARSERS: dict[str, Callable[[Any], Any]] = {
    "latency_ms": _non_negative(float),
    "ttft_ms": _non_negative(float),
    "tokens_per_s": _non_negative(float),
    "tokens": _non_negative(int),
    "fault": _parse_fault,
    "fault_rate": _parse_rate,
    "fail_first": _non_negative(int),
    "retry_after": str,
    "embedding_dim": _non_negative(int),
    "models": _parse_models,
    "seed": int,
}
REQUEST_KNOBS: dict[str, str] = {
    name: "X-Sim-" + name.replace("_", "-")
    for name in (
        "latency_ms",
        "ttft_ms",
        "tokens_per_s",
        "tokens",
        "fault",
        "fault_rate",
        "fail_first",
        "retry_after",
    )
}


class _BadRequest(Exception):
    """Raised by validation so the dispatcher can answer 400 in OpenAI's error format."""


def parse_knobs(values: dict[str, Any]) -> dict[str, Any]:
    """Validate and coerce knob values coming from JSON, headers or kwargs."""
    unknown = set(values) - set(KNOB_PARSERS)
    if unknown:
        raise _BadRequest(f"unknown knobs: {sorted(unknown)}")
    parsed = {}
    for name, value in values.items():
        try:
            parsed[name] = KNOB_PARSERS[name](value)
        except (TypeError, ValueError) as exc:
            raise _BadRequest(f"invalid {name}: {exc}") from exc
    return parsed


def error_body(status: int, message: str) -> dict[str, Any]:
    """Build an OpenAI-style error object so clients exercise their real error parsing."""
    if status == 429:
        kind, code = "rate_limit_error", "rate_limit_exceeded"
    elif status >= 500:
        kind, code = "server_error", None
    else:
        kind, code = "invalid_request_error", None
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(status: int, message: str, retry_after: str = "") -> web.Response:
    headers = {"Retry-After": retry_after} if retry_after and status in (429, 503) else None
    return web.json_response(error_body(status, message), status=status, headers=headers)


def count_words(content: Any) -> int:
    """Whitespace word count of a message content (plain string or list of text parts)."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        return sum(
            len(part["text"].split())
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return 0


def pseudo_embedding(text: str, dimensions: int) -> list[float]:
    """Unit vector derived from a hash of the text: same text, same vector, no model needed."""
    raw = hashlib.shake_256(text.encode()).digest(2 * dimensions)
    values = struct.unpack(f"<{dimensions}h", raw)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _sse(obj: Any) -> bytes:
    return f"data: {_dumps(obj)}\n\n".encode()


@dataclasses.dataclass
class Stats:
    """Counters reported by GET /sim/stats; gauges such as open connections are read live instead.

    connections_total counts client connections that carried at least one non-/sim request.
    """

    requests_total: int = 0
    by_path: Counter[str] = dataclasses.field(default_factory=Counter)
    by_key: Counter[str] = dataclasses.field(default_factory=Counter)
    faults: Counter[str] = dataclasses.field(default_factory=Counter)
    streams_total: int = 0
    streams_completed: int = 0
    disconnects: int = 0
    connections_total: int = 0
    max_in_flight: int = 0
    request_ids: deque[str] = dataclasses.field(default_factory=lambda: deque(maxlen=REQUEST_ID_HISTORY))
    traceparents: deque[str] = dataclasses.field(default_factory=lambda: deque(maxlen=REQUEST_ID_HISTORY))


class _CountingServer(web.Server):
    """Low-level aiohttp server that remembers which connections have not yet carried an API request.

    That lets stats count client connections (proving keep-alive reuse) without counting the
    one-shot connections of the /sim/* control calls.
    """

    def __init__(
        self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self._unused: set[Any] = set()

    def connection_made(self, handler: Any, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._unused.add(handler)

    def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
        self._unused.discard(handler)
        super().connection_lost(handler, exc)

    def unclaim_all(self) -> None:
        """After a stats reset, kept-alive connections count again on their next API request."""
        self._unused = set(self.connections)

    def claim(self, handler: Any) -> bool:
        """True the first time a connection carries an API request."""
        if handler in self._unused:
            self._unused.discard(handler)
            return True
        return False


@dataclasses.dataclass(frozen=True, slots=True)
class _Completion:
    """What one chat request will produce, computed once so stream and non-stream agree.

    `tokens` are the content's pieces, or those of the tool call's arguments when `tool_call` is set.
    """

    cid: str
    created: int
    model: str
    prompt_tokens: int
    tokens: tuple[str, ...]
    finish_reason: str
    tool_call: dict[str, Any] | None = None
    top_logprobs: int | None = None  # None: no logprobs asked for

    def message(self) -> dict[str, Any]:
        if self.tool_call is None:
            return {"role": "assistant", "content": "".join(self.tokens)}
        call = {
            **self.tool_call,
            "function": {**self.tool_call["function"], "arguments": "".join(self.tokens)},
        }
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def logprobs(self, start: int = 0, stop: int | None = None) -> dict[str, Any] | None:
        """OpenAI's logprobs object for content tokens [start, stop); None unless asked for."""
        if self.top_logprobs is None or self.tool_call is not None:
            return None
        entries = []
        for index in range(start, len(self.tokens) if stop is None else stop):
            token = self.tokens[index]
            alternatives = [token] + [f"alt{j}" for j in range(1, self.top_logprobs)]
            entries.append(
                {
                    **_logprob(token, index, 0),
                    "top_logprobs": [
                        _logprob(t, index, j) for j, t in enumerate(alternatives[: self.top_logprobs])
                    ],
                }
            )
        return {"content": entries, "refusal": None}

    def usage(self) -> dict[str, int]:
        n = len(self.tokens)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": n,
            "total_tokens": self.prompt_tokens + n,
        }


class UpstreamSim:
    """Request handling and state of one simulator process; runs on a single event loop, so no locks."""

    def __init__(self, knobs: Knobs) -> None:
        self.initial = knobs
        self.knobs = knobs
        self.stats = Stats()
        self.closing = False
        self.in_flight = 0
        self.in_flight_streams = 0
        self._fail_seen: Counter[str] = Counter()
        self._rng = random.Random(knobs.seed)
        self._routes: dict[tuple[str, str], Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]] = {
            ("GET", "/v1/models"): self._models,
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("GET", "/health"): self._health,
        }
        self.server = _CountingServer(self.handle, handler_cancellation=True, access_log=None)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Entry point for every request: control API, counting, then the OpenAI route."""
        try:
            if request.path.startswith("/sim/"):
                return await self._control(request)
            self._count(request)
            route = self._routes.get((request.method, request.path))
            if route is None:
                return error_response(404, f"no route for {request.method} {request.path}")
            return await self._run_route(route, request)
        except _BadRequest as exc:
            return error_response(400, str(exc))

    async def _run_route(
        self, route: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], request: web.BaseRequest
    ) -> web.StreamResponse:
        self.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.in_flight)
        try:
            return await route(request)
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the client goes away (handler_cancellation=True).
            if not self.closing:
                self.stats.disconnects += 1
            raise
        finally:
            self.in_flight -= 1

    def _count(self, request: web.BaseRequest) -> None:
        stats = self.stats
        stats.requests_total += 1
        if self.server.claim(request.protocol):
            stats.connections_total += 1
        stats.by_path[request.path] += 1
        key = request.headers.get("X-Sim-Key")
        if key is not None:
            stats.by_key[key] += 1
        request_id = request.headers.get("X-Request-ID")
        if request_id is not None:
            stats.request_ids.append(request_id)
        traceparent = request.headers.get("traceparent")
        if traceparent is not None:
            stats.traceparents.append(traceparent)

    def _resolve(self, request: web.BaseRequest) -> tuple[Knobs, str]:
        """Apply X-Sim-* header overrides and pick this request's fault ("none" when healthy)."""
        raw = {
            name: request.headers[header]
            for name, header in REQUEST_KNOBS.items()
            if header in request.headers
        }
        knobs = dataclasses.replace(self.knobs, **parse_knobs(raw)) if raw else self.knobs
        if knobs.fail_first:
            key = request.headers.get("X-Sim-Key", "")
            self._fail_seen[key] += 1
            if self._fail_seen[key] <= knobs.fail_first:
                return knobs, "503"
        # An explicit X-Sim-Fault header means "this request fails" unless it also names a rate.
        rate = 1.0 if "fault" in raw and "fault_rate" not in raw else knobs.fault_rate
        if knobs.fault != "none" and rate > 0 and (rate >= 1.0 or self._rng.random() < rate):
            return knobs, knobs.fault
        return knobs, "none"

    async def _json_body(self, request: web.BaseRequest) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError as exc:
            raise _BadRequest(f"request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise _BadRequest("request body must be a JSON object")
        return body

    async def _health(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.BaseRequest) -> web.StreamResponse:
        knobs, fault = self._resolve(request)
        created = int(time.time())
        payload = {
            "object": "list",
            "data": [
                {"id": m, "object": "model", "created": created, "owned_by": "upstream-sim"}
                for m in knobs.models
            ],
        }
        return await self._respond(request, knobs, fault, payload, delay_s=knobs.latency_ms / 1000)

    async def _embeddings(self, request: web.BaseRequest) -> web.StreamResponse:
        knobs, fault = self._resolve(request)
        body = await self._json_body(request)
        texts = _embedding_inputs(body.get("input"))
        dimensions = body.get("dimensions", knobs.embedding_dim)
        if not isinstance(dimensions, int) or not 1 <= dimensions <= 8192:
            raise _BadRequest("dimensions must be an integer in [1, 8192]")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(texts):
            vector = pseudo_embedding(text, dimensions)
            encoded: Any = (
                base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector
            )
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        prompt_tokens = sum(count_words(text) for text in texts)
        payload = {
            "object": "list",
            "data": data,
            "model": body.get("model") or knobs.models[0],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        return await self._respond(request, knobs, fault, payload, delay_s=knobs.latency_ms / 1000)

    async def _chat(self, request: web.BaseRequest) -> web.StreamResponse:
        knobs, fault = self._resolve(request)
        body = await self._json_body(request)
        completion = _plan_completion(body, knobs)
        if body.get("stream"):
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return await self._stream(request, knobs, fault, completion, include_usage)
        delay_s = knobs.latency_ms / 1000 + knobs.ttft_ms / 1000
        if knobs.tokens_per_s > 0:
            delay_s += len(completion.tokens) / knobs.tokens_per_s
        payload = {
            "id": completion.cid,
            "object": "chat.completion",
            "created": completion.created,
            "model": completion.model,
            "choices": [
                {
                    "index": 0,
                    "message": completion.message(),
                    "logprobs": completion.logprobs(),
                    "finish_reason": completion.finish_reason,
                }
            ],
            "usage": completion.usage(),
        }
        return await self._respond(request, knobs, fault, payload, delay_s=delay_s)

    async def _pre_response_fault(self, knobs: Knobs, fault: str) -> web.Response | None:
        """Handle the faults that replace the whole response; None means carry on with a 200."""
        if fault.isdigit():
            self.stats.faults[fault] += 1
            return error_response(int(fault), f"simulated upstream error {fault}", knobs.retry_after)
        if fault == "timeout":
            self.stats.faults[fault] += 1
            await asyncio.sleep(TIMEOUT_FAULT_CAP_S)
            return error_response(504, "simulated timeout reached its cap")
        return None

    async def _respond(
        self, request: web.BaseRequest, knobs: Knobs, fault: str, payload: dict[str, Any], delay_s: float
    ) -> web.StreamResponse:
        """Send a non-stream JSON answer after delay_s, applying body faults (malformed / cut)."""
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        failed = await self._pre_response_fault(knobs, fault)
        if failed is not None:
            return failed
        body = _dumps(payload).encode()
        if fault == "malformed":
            self.stats.faults[fault] += 1
            return web.Response(body=body[: len(body) // 2], content_type="application/json")
        if fault not in ("cut", "stall"):
            return web.Response(body=body, content_type="application/json")
        self.stats.faults[fault] += 1
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = len(body)
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        if fault == "stall":
            await asyncio.sleep(TIMEOUT_FAULT_CAP_S)
        _close_transport(request)
        return response

    async def _stream(
        self, request: web.BaseRequest, knobs: Knobs, fault: str, completion: _Completion, include_usage: bool
    ) -> web.StreamResponse:
        """Server-sent events in OpenAI's exact chunk layout, paced by ttft_ms and tokens_per_s."""
        if knobs.latency_ms > 0:
            await asyncio.sleep(knobs.latency_ms / 1000)
        failed = await self._pre_response_fault(knobs, fault)
        if failed is not None:
            return failed
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        self.stats.streams_total += 1
        self.in_flight_streams += 1
        try:
            await response.prepare(request)
            await self._write_stream(request, response, knobs, fault, completion, include_usage)
        except ConnectionResetError:
            self.stats.disconnects += 1
        finally:
            self.in_flight_streams -= 1
        return response

    async def _write_stream(
        self,
        request: web.BaseRequest,
        response: web.StreamResponse,
        knobs: Knobs,
        fault: str,
        completion: _Completion,
        include_usage: bool,
    ) -> None:
        base = {
            "id": completion.cid,
            "object": "chat.completion.chunk",
            "created": completion.created,
            "model": completion.model,
        }
        usage_tail = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, index: int | None = None) -> bytes:
            logprobs = completion.logprobs(index, index + 1) if index is not None else None
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return _sse({**base, "choices": [choice], **usage_tail})

        call = completion.tool_call

        def piece(index: int) -> bytes:
            if call is None:
                return chunk({"content": tokens[index]}, index=index)
            return chunk({"tool_calls": [{"index": 0, "function": {"arguments": tokens[index]}}]})

        if knobs.ttft_ms > 0:
            await asyncio.sleep(knobs.ttft_ms / 1000)
        tokens = completion.tokens
        emitted = len(tokens) // 2 if fault in ("cut", "stall") else len(tokens)
        if fault in ("cut", "malformed", "stall"):
            self.stats.faults[fault] += 1
        if call is None:
            pending = [chunk({"role": "assistant", "content": ""})]
        else:
            header = {**call, "index": 0, "function": {"name": call["function"]["name"], "arguments": ""}}
            pending = [chunk({"role": "assistant", "content": None, "tool_calls": [header]})]
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index in range(emitted):
            if knobs.tokens_per_s > 0 and index > 0:
                await response.write(b"".join(pending))
                pending.clear()
                wait = start + index / knobs.tokens_per_s - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            if fault == "malformed" and index == 0:
                truncated = f'{{"id":"{completion.cid}","choices":[{{"delta":{{"content":"'
                pending.append(f"data: {truncated}\n\n".encode())
            else:
                pending.append(piece(index))
        if fault in ("cut", "stall"):
            await response.write(b"".join(pending))
            if fault == "stall":
                await asyncio.sleep(TIMEOUT_FAULT_CAP_S)
            _close_transport(request)
            return
        pending.append(chunk({}, completion.finish_reason))
        if include_usage:
            pending.append(_sse({**base, "choices": [], "usage": completion.usage()}))
        pending.append(SSE_DONE)
        await response.write(b"".join(pending))
        await response.write_eof()
        self.stats.streams_completed += 1

    async def _control(self, request: web.BaseRequest) -> web.StreamResponse:
        """The /sim/* API that tests use to read counters and change behaviour at runtime."""
        route = (request.method, request.path)
        if route == ("GET", "/sim/stats"):
            return web.json_response(self.snapshot())
        if route == ("GET", "/sim/config"):
            return web.json_response(self.config())
        if route == ("POST", "/sim/config"):
            changes = parse_knobs(await self._json_body(request))
            self.knobs = dataclasses.replace(self.knobs, **changes)
            self._restart_counters()
            return web.json_response(self.config())
        if route == ("POST", "/sim/reset"):
            self.knobs = self.initial
            self.stats = Stats(max_in_flight=self.in_flight)
            self.server.unclaim_all()
            self._restart_counters()
            return web.json_response(self.config())
        return error_response(404, f"no route for {request.method} {request.path}")

    def _restart_counters(self) -> None:
        self._fail_seen.clear()
        self._rng = random.Random(self.knobs.seed)

    def config(self) -> dict[str, Any]:
        config = dataclasses.asdict(self.knobs)
        config["models"] = list(self.knobs.models)
        return config

    def snapshot(self) -> dict[str, Any]:
        stats = self.stats
        return {
            "requests_total": stats.requests_total,
            "by_path": dict(stats.by_path),
            "by_key": dict(stats.by_key),
            "faults": dict(stats.faults),
            "streams_total": stats.streams_total,
            "streams_completed": stats.streams_completed,
            "disconnects": stats.disconnects,
            "in_flight": self.in_flight,
            "in_flight_streams": self.in_flight_streams,
            "max_in_flight": stats.max_in_flight,
            # Minus the connection asking for the stats.
            "open_connections": len(self.server.connections) - 1,
            "connections_total": stats.connections_total,
            "request_ids": list(stats.request_ids),
            "traceparents": list(stats.traceparents),
        }


def _close_transport(request: web.BaseRequest) -> None:
    """Drop the connection after flushing what was written, like an upstream dying mid-response."""
    transport = request.transport
    if transport is not None:
        transport.close()


def _embedding_inputs(value: Any) -> list[str]:
    """Normalise OpenAI's input shapes (string, strings, token ids, lists of token ids) to texts."""
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value and all(isinstance(item, int) for item in value):
        texts = [" ".join(map(str, value))]
    elif isinstance(value, list) and value:
        texts = [item if isinstance(item, str) else " ".join(map(str, item)) for item in value]
    else:
        raise _BadRequest("input must be a non-empty string or list")
    return texts


def _plan_completion(body: dict[str, Any], knobs: Knobs) -> _Completion:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty list")
    _check_tool_messages(messages)
    prompt_tokens = sum(count_words(m.get("content")) for m in messages if isinstance(m, dict))
    tool_call = _plan_tool_call(body)
    pieces = _plan_content(body, knobs) if tool_call is None else _split(tool_call.pop("arguments"))
    count = len(pieces)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    finish_reason = "stop" if tool_call is None else "tool_calls"
    if isinstance(limit, int) and 0 < limit < count:
        count, finish_reason = limit, "length"
    return _Completion(
        cid=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=body.get("model") or knobs.models[0],
        prompt_tokens=prompt_tokens,
        tokens=pieces[:count],
        finish_reason=finish_reason,
        tool_call=tool_call,
        top_logprobs=_top_logprobs(body),
    )


def _check_tool_messages(messages: list[Any]) -> None:
    """OpenAI's rules: a tool message answers an earlier call; only tool calls excuse null content."""
    called: set[str] = set()
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _BadRequest(f"messages[{index}] must be an object")
        calls = message.get("tool_calls") or []
        if message.get("role") == "assistant":
            called.update(c.get("id") for c in calls if isinstance(c, dict))
        if message.get("content") is None and not (message.get("role") == "assistant" and calls):
            raise _BadRequest(f"messages[{index}].content must not be null")
        if message.get("role") == "tool" and message.get("tool_call_id") not in called:
            raise _BadRequest(
                f"messages[{index}]: a message with role 'tool' must be a response to a preceding "
                "message with 'tool_calls'"
            )


def _plan_tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
    """The call the reply makes (with its arguments still joined), or None for a text reply."""
    tools = body.get("tools")
    choice = body.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
        for t in tools
    ):
        raise _BadRequest("tools must be a list of function tools")
    functions = {t["function"].get("name"): t["function"] for t in tools}
    name = next(iter(functions))
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in functions:
            raise _BadRequest(f"tool_choice names an unknown function {name!r}")
    arguments = sample_json(functions[name].get("parameters") or {"type": "object"})
    return {
        "id": "call_" + hashlib.sha256(_dumps(body.get("messages")).encode()).hexdigest()[:24],
        "type": "function",
        "function": {"name": name},
        "arguments": _dumps(arguments),
    }


def _plan_content(body: dict[str, Any], knobs: Knobs) -> tuple[str, ...]:
    response_format = body.get("response_format") or {"type": "text"}
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    words = tuple(f"tok{i}" if i == 0 else f" tok{i}" for i in range(knobs.tokens))
    if kind == "text":
        return words
    if kind == "json_object":
        return _split(_dumps({"content": "".join(words)}))
    if kind == "json_schema" and isinstance(response_format.get("json_schema"), dict):
        return _split(_dumps(sample_json(response_format["json_schema"].get("schema") or {"type": "object"})))
    raise _BadRequest("response_format must have type text, json_object or json_schema (with json_schema)")


def _top_logprobs(body: dict[str, Any]) -> int | None:
    if not body.get("logprobs"):
        if body.get("top_logprobs") is not None:
            raise _BadRequest("top_logprobs requires logprobs to be true")
        return None
    top = body.get("top_logprobs") or 0
    if not isinstance(top, int) or not 0 <= top <= 20:
        raise _BadRequest("top_logprobs must be an integer in [0, 20]")
    return top


def _logprob(token: str, position: int, rank: int) -> dict[str, Any]:
    """Deterministic values: the chosen token is the likeliest, alternatives fall off by rank."""
    return {"token": token, "logprob": -0.01 * (position + 1) - rank, "bytes": list(token.encode())}


def _split(text: str, size: int = 4) -> tuple[str, ...]:
    """JSON text in token-sized pieces, so streams and max_tokens truncation behave as for words."""
    return tuple(text[i : i + size] for i in range(0, len(text), size)) or ("",)


def sample_json(schema: Any) -> Any:
    """A value matching the common JSON Schema keywords (type, properties, items, enum, const,
    anyOf/oneOf, minimum), as a model constrained to the schema would produce."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return sample_json(schema[key][0])
    kind = schema.get("type", "object")
    if isinstance(kind, list):
        kind = kind[0]
    if kind == "object":
        return {name: sample_json(sub) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [sample_json(schema.get("items") or {"type": "string"})] * max(1, schema.get("minItems", 1))
    if kind == "string":
        return "tok0"
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return True
    return None


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    """Stop once the process that started us is gone, so a killed test run leaves no orphan server."""
    while os.getppid() == parent_pid:
        await asyncio.sleep(1.0)
    stop.set()


async def serve(host: str, port: int, knobs: Knobs, backlog: int = 4096, parent_pid: int = 0) -> None:
    """Listen until SIGINT/SIGTERM (or parent exit); prints the READY line that run_simulator waits for."""
    loop = asyncio.get_running_loop()
    sim = UpstreamSim(knobs)
    listener = await loop.create_server(sim.server, host, port, backlog=backlog, reuse_address=True)
    bound_port = listener.sockets[0].getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"READY http://{shown_host}:{bound_port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watchdog = asyncio.create_task(_watch_parent(parent_pid, stop)) if parent_pid else None
    await stop.wait()
    if watchdog is not None:
        watchdog.cancel()
    sim.closing = True
    listener.close()
    # No graceful drain: idle keep-alive connections would each hold shutdown for the full timeout.
    await sim.server.shutdown(0.1)


def _raise_fd_limit() -> None:
    """Thousands of concurrent connections need more descriptors than the usual soft limit of 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when it happens to be installed (faster accept/write paths); plain asyncio otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def build_parser() -> argparse.ArgumentParser:
    """CLI flags mirror the knobs; each default comes from SIM_<NAME> in the environment when set."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.upstream_sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default=os.environ.get("SIM_HOST", "127.0.0.1"))
    parser.add_argument(
        "--port", type=int, default=os.environ.get("SIM_PORT", "0"), help="0 = pick a free port"
    )
    parser.add_argument("--backlog", type=int, default=os.environ.get("SIM_BACKLOG", "4096"))
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this parent process is gone")
    defaults = Knobs()
    for field in dataclasses.fields(Knobs):
        default = getattr(defaults, field.name)
        shown = ",".join(default) if isinstance(default, tuple) else str(default)
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=field.name,
            type=KNOB_PARSERS[field.name],
            default=os.environ.get("SIM_" + field.name.upper(), shown),
            help=f"default {shown!r}, env SIM_{field.name.upper()}",
        )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    knobs = Knobs(**{field.name: getattr(args, field.name) for field in dataclasses.fields(Knobs)})
    _raise_fd_limit()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(args.host, args.port, knobs, args.backlog, args.parent_pid))


class Simulator:
    """Handle on a simulator subprocess; control calls use urllib so they work with or without gevent."""

    def __init__(self, process: subprocess.Popen[str], url: str) -> None:
        self.process = process
        self.url = url
        self.base_url = f"{url}/v1"

    @classmethod
    def start(cls, host: str = "127.0.0.1", ready_timeout: float = 20.0, **knobs: Any) -> Simulator:
        """Spawn ``python -m bench.upstream_sim`` and wait for its READY line."""
        args = [sys.executable, "-m", "bench.upstream_sim", "--host", host, "--port", "0"]
        args += ["--parent-pid", str(os.getpid())]
        for name, value in knobs.items():
            if name not in KNOB_PARSERS:
                raise TypeError(f"unknown simulator knob {name!r}")
            shown = ",".join(value) if isinstance(value, list | tuple) else str(value)
            args += ["--" + name.replace("_", "-"), shown]
        # Ambient SIM_* variables would silently change what a test asked for.
        env = {key: value for key, value in os.environ.items() if not key.startswith("SIM_")}
        process = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
        assert process.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=_pump_lines, args=(process.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                _stop_process(process)
                raise TimeoutError(f"upstream simulator not READY within {ready_timeout}s") from None
            if not line:
                raise RuntimeError(f"upstream simulator exited with code {process.wait()} before READY")
            if line.startswith("READY "):
                return cls(process, line.split()[1])

    def _call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def stats(self) -> dict[str, Any]:
        """Counters and gauges from GET /sim/stats."""
        return self._call("GET", "/sim/stats")

    def configure(self, **knobs: Any) -> dict[str, Any]:
        """Change server defaults (POST /sim/config); returns the full new config."""
        payload = {name: list(value) if isinstance(value, tuple) else value for name, value in knobs.items()}
        return self._call("POST", "/sim/config", payload)

    def reset(self) -> dict[str, Any]:
        """Zero the counters and restore the knobs the process started with."""
        return self._call("POST", "/sim/reset", {})

    def stop(self) -> None:
        _stop_process(self.process)


def _pump_lines(stream: IO[str], lines: queue.Queue[str]) -> None:
    """Forward the child's stdout lines; an empty string marks EOF (the child died)."""
    with stream:
        for line in stream:
            lines.put(line.strip() or " ")
    lines.put("")


def _stop_process(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def run_simulator(host: str = "127.0.0.1", ready_timeout: float = 20.0, **knobs: Any) -> Iterator[Simulator]:
    """Run the simulator as a subprocess for the duration of a ``with`` block."""
    simulator = Simulator.start(host, ready_timeout, **knobs)
    try:
        yield simulator
    finally:
        simulator.stop()


if __name__ == "__main__":
    main()
