"""Server-sent events for chat streams: OpenAI's chunk format, heartbeats and clean shutdown.

A client that goes away is only visible when a write fails, so the writer sends `: ping`
comments while it waits for the model; the failed write raises GeneratorExit here, and the
`finally` blocks release the model slot and close the upstream connection.

A response can also be dropped before its first chunk, and then no generator `finally` ever runs:
an after_request hook raises (Flask answers 500 with a new response and discards ours, unclosed),
or the server closes the response without iterating it. `_Discard` covers both, through
`Response.call_on_close` and Flask's `got_request_exception` signal, and is idempotent with the
generator's own clean-up: the model slot and the quota reservation come back exactly once.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from flask import Flask, Response, g, got_request_exception, has_request_context, stream_with_context

from app.errors import APIError
from app.governance.policies.engine import OutputRedactor
from app.inference.backends.base import ChatChunk
from app.inference.offload import gevent_active

log = structlog.get_logger(__name__)
PING = object()
PENDING_DISCARDS = "_sse_discards"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


class Pump:
    """Pulls chunks in the background so the writer can send pings while the model thinks.

    The pump alone advances and closes the chunk iterator (a generator must never be closed
    from one thread while it runs in another). Under gevent, remote streams are stopped by
    killing the pump greenlet, which interrupts the blocked socket read at once; local
    streams stop at the next token, a few milliseconds away.
    """

    # Chunks read ahead of a slow client: past this the pump waits, and so does the upstream socket
    # (TCP back-pressure), instead of buffering a whole reply in the worker's memory.
    READ_AHEAD = 64

    def __init__(self, chunks: Iterator[ChatChunk], interruptible: bool) -> None:
        self._chunks = chunks
        self._stop = threading.Event()
        self._greenlet = None
        if interruptible and gevent_active():
            import gevent
            import gevent.queue

            # Greenlet to greenlet: gevent's own queue. The stdlib one, patched, builds four locks
            # per stream and waits on a Condition with a timer for every get: with 3,000 streams
            # of a token a second, its lock set-up and waits were ~10% of the worker's samples
            # (py-spy on the streams scenario); with gevent's queue they are gone from the profile.
            self._queue: queue.Queue[tuple[str, Any]] = gevent.queue.Queue(maxsize=self.READ_AHEAD)
            self._greenlet = gevent.spawn(self._run)
            self._thread = None
        else:
            self._queue = queue.Queue(maxsize=self.READ_AHEAD)
            self._thread = threading.Thread(target=self._run, daemon=True, name="sse-pump")
            self._thread.start()

    def _put(self, item: tuple[str, Any]) -> bool:
        """Wait for room, but never past `close`: the reader may be gone for good."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for chunk in self._chunks:
                if not self._put(("chunk", chunk)):
                    break
            self._put(("end", None))
        except Exception as exc:
            self._put(("error", exc))
        finally:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()

    def items(self, ping_interval: float) -> Iterator[Any]:
        while True:
            try:
                kind, value = self._queue.get(timeout=ping_interval)
            except queue.Empty:
                yield PING
                continue
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        self._stop.set()
        if self._greenlet is not None:
            self._greenlet.kill(block=True, timeout=5)
        elif self._thread is not None:
            self._thread.join(timeout=10)


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def chat_event_stream(
    chunks: Iterator[ChatChunk],
    *,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    prompt_tokens: int,
    interruptible: bool,
    ping_interval: float,
    redactor: OutputRedactor,
    on_finish: Callable[[int, int, Any, bool], None],
) -> Response:
    """The SSE response. `on_finish(prompt_tokens, completion_tokens, output, completed)` runs
    exactly once, however the stream ends; `output` is the text sent, or, when the model called
    tools, the message as a non-streamed reply would have had it (calls assembled from their pieces).

    Output passes through the tenant policy's redactor, which holds back only the few
    characters that could still grow into a match.
    """

    def chunk(
        delta: dict[str, Any], finish_reason: str | None = None, logprobs: dict[str, Any] | None = None
    ) -> str:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        body: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
        }
        if include_usage:
            body["usage"] = None
        return sse(body)

    finish = _Once(on_finish)
    started = threading.Event()

    def events() -> Iterator[str]:
        started.set()
        pump = Pump(chunks, interruptible)
        used_prompt, used_completion, completed = prompt_tokens, 0, False
        sent: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        try:
            yield chunk({"role": "assistant", "content": ""})
            finish_reason = "stop"
            for item in pump.items(ping_interval):
                if item is PING:
                    yield ": ping\n\n"
                    continue
                delta: dict[str, Any] = {}
                if item.text:
                    used_completion += 1
                    if text := redactor.feed(item.text):
                        sent.append(text)
                        delta["content"] = text
                if item.tool_calls:
                    delta["tool_calls"] = item.tool_calls
                    _assemble(calls, item.tool_calls)
                if delta or item.logprobs is not None:
                    yield chunk(delta, logprobs=item.logprobs)
                if item.finish_reason is not None:
                    finish_reason = item.finish_reason
                    used_prompt = item.prompt_tokens or used_prompt
                    used_completion = item.completion_tokens or used_completion
            if tail := redactor.flush():
                sent.append(tail)
                yield chunk({"content": tail})
            yield chunk({}, finish_reason)
            if include_usage:
                usage = {
                    "prompt_tokens": used_prompt,
                    "completion_tokens": used_completion,
                    "total_tokens": used_prompt + used_completion,
                }
                yield sse(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                )
            yield sse("[DONE]")
            completed = True
        except APIError as exc:
            log.warning("stream_failed", code=exc.code, error=exc.message)
            yield sse(exc.payload())
        except Exception:
            log.exception("stream_failed")
            yield sse(APIError(500, "The stream failed; quote the request_id to the operator.").payload())
        finally:
            pump.close()
            text = "".join(sent)
            output: Any = text
            if calls:
                output = {"role": "assistant", "content": text or None, "tool_calls": list(calls.values())}
            finish(used_prompt, used_completion, output, completed)

    body = stream_with_context(events())
    discard = _Discard(body, chunks, started, lambda: finish(prompt_tokens, 0, "", False))
    response = Response(body, mimetype="text/event-stream", headers=SSE_HEADERS)
    response.call_on_close(discard)
    if has_request_context():
        g.setdefault(PENDING_DISCARDS, []).append(discard)
    return response


class _Once:
    """`on_finish`, run by whichever of the stream's end and a discard comes first."""

    def __init__(self, fn: Callable[[int, int, Any, bool], None]) -> None:
        self._fn: Callable[[int, int, Any, bool], None] | None = fn
        self._lock = threading.Lock()

    def __call__(self, prompt: int, completion: int, output: Any, completed: bool) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
        if fn is not None:
            fn(prompt, completion, output, completed)


class _Discard:
    """Clean-up for a stream whose generator never started: nothing was generated or sent, so
    the chunks are closed (freeing the model slot) and the reservation released in full."""

    def __init__(
        self,
        body: Iterator[str],
        chunks: Iterator[ChatChunk],
        started: threading.Event,
        finish: Callable[[], None],
    ) -> None:
        self._body = body
        self._chunks = chunks
        self._started = started
        self._finish = finish

    def __call__(self) -> None:
        # Unwinds stream_with_context's extra push of the request context, so a discarded body is
        # not left to the garbage collector, which would pop that context inside a later request.
        close_body = getattr(self._body, "close", None)
        if close_body is not None:
            close_body()
        if self._started.is_set():
            return  # the generator's own finally has released everything
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        self._finish()


def _discard_dropped_streams(sender: Flask, exception: BaseException, **_: Any) -> None:
    """The view returned a stream but the request failed afterwards: Flask sends a new error
    response and never closes ours. Runs inside the failed request's context."""
    for discard in g.pop(PENDING_DISCARDS, []):
        discard()


got_request_exception.connect(_discard_dropped_streams)


def _assemble(calls: dict[int, dict[str, Any]], pieces: list[dict[str, Any]]) -> None:
    """Merge streamed tool-call pieces by `index`: the first names the call, the rest add arguments.
    Pieces come from an upstream, so odd types are skipped rather than trusted."""
    for piece in pieces:
        if not isinstance(piece, dict):
            continue
        index = piece["index"] if isinstance(piece.get("index"), int) else 0
        function = piece.get("function") if isinstance(piece.get("function"), dict) else {}
        call = calls.setdefault(
            index, {"id": None, "type": "function", "function": {"name": None, "arguments": ""}}
        )
        if isinstance(piece.get("id"), str):
            call["id"] = piece["id"]
        if isinstance(function.get("name"), str):
            call["function"]["name"] = function["name"]
        if isinstance(function.get("arguments"), str):
            call["function"]["arguments"] += function["arguments"]
