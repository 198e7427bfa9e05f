"""Any OpenAI-compatible HTTP server (vLLM, OpenAI, llama.cpp server, TGI, ...) as a model family.

Runs on the gevent hub: every wait is a cooperative socket read bounded by a `gevent.Timeout`, so a slow
upstream costs a greenlet, never a worker. Failure handling, outermost first:

- circuit breaker (pybreaker, one per base_url per process): after `breaker_fail_max` consecutive failed
  *calls* (a call's retries count once) it answers 503 at once for `breaker_reset_s`, then lets one trial
  call through, which closes it again or re-opens it;
- retries (tenacity): connection errors, timeouts and 429/500/502/503/504 answers are retried with
  exponential backoff and jitter, only until the first token of a stream has been received, never after;
- time: `first_byte_timeout_s` bounds each attempt up to the response headers (non-streamed calls) or the
  first streamed token, and then every silence between stream events; `deadline_s` bounds the whole call,
  backoff included. A non-streamed completion only sends its headers once generated, so there
  first_byte_timeout_s must cover the whole generation.

Params: base_url, model, api_key_env, connect_timeout_s, first_byte_timeout_s, deadline_s, max_retries,
retry_backoff_s, breaker_fail_max, breaker_reset_s, pool_size, dimensions, encoding_format. The pool and the
breaker belong to the upstream, so the first model loaded for a base_url sets pool_size, connect_timeout_s and
the breaker settings for every model that shares it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import marshmallow as ma
import numpy as np
import structlog

from app import tracing
from app.errors import APIError
from app.inference.backends.base import (
    CHAT_OPTIONS,
    Backend,
    ChatChunk,
    ChatRequest,
    ChatResult,
    EmbeddingResult,
    ModelSpec,
)
from app.observability import outgoing_headers

if TYPE_CHECKING:
    import gevent
    import tenacity
    from geventhttpclient import HTTPClient
    from geventhttpclient.response import HTTPSocketPoolResponse

log = structlog.get_logger(__name__)

T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF_S = 2.0
# A longer pause asked for by the upstream is passed on to the client rather than waited out holding a slot.
MAX_HONOURED_RETRY_AFTER_S = 5.0
# Reading the chunked terminator after [DONE] keeps the connection reusable; past this, drop it instead.
DRAIN_TIMEOUT_S = 0.1
# Outcomes that say the upstream is unhealthy; 4xx answers and auth/config errors prove it is up.
BREAKER_FAILURE_CODES = frozenset(
    {"upstream_error", "upstream_timeout", "upstream_unavailable", "upstream_stream_interrupted"}
)
# Hop-by-hop headers, the ones this module sets, and credentials meant for the gateway, not the upstream.
NOT_FORWARDED = frozenset(
    {
        "accept",
        "accept-encoding",
        "authorization",
        "connection",
        "content-length",
        "content-type",
        "cookie",
        "expect",
        "host",
        "keep-alive",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class UpstreamStreamError(APIError):
    """The upstream failed after its stream had started, so it can be neither retried nor turned into a
    status code; the SSE layer sends it as an error event."""

    def __init__(self, message: str, *, status: int = 502, code: str = "upstream_stream_interrupted") -> None:
        super().__init__(status, message, code=code)


class _UpstreamStatus(Exception):
    """A non-2xx answer, kept raw until the retries are over so that the last one decides the mapping."""

    def __init__(
        self, status: int, message: str, code: str | None, param: str | None, retry_after_s: float | None
    ) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after_s = retry_after_s


class _Deadline:
    """The one clock of a call: every attempt, backoff and read must fit in what is left of it."""

    __slots__ = ("_at", "budget_s")

    def __init__(self, budget_s: float) -> None:
        self.budget_s = budget_s
        self._at = time.monotonic() + budget_s

    def remaining(self) -> float:
        return self._at - time.monotonic()

    def timeout(self, limit_s: float | None = None) -> gevent.Timeout:
        """A timer for the next blocking step: `limit_s` or the rest of the deadline, whichever ends first.

        It raises TimeoutError, an OSError, because geventhttpclient releases its pool slot on OSError but
        leaks it on other exceptions (gevent.Timeout itself included) while a request is being sent.
        """
        import gevent

        remaining = self.remaining()
        if remaining <= 0:
            raise TimeoutError(f"the {self.budget_s:g}s deadline was exceeded")
        if limit_s is not None and limit_s < remaining:
            return gevent.Timeout(limit_s, TimeoutError(f"no response within {limit_s:g}s"))
        return gevent.Timeout(remaining, TimeoutError(f"the {self.budget_s:g}s deadline was exceeded"))


class _TripWire(Exception):
    """Replays a failed call into pybreaker."""


def _succeed() -> None:
    """Replays a successful call into pybreaker."""


def _fail() -> None:
    raise _TripWire


class _Circuit:
    """pybreaker's counting and states, without its concurrency limit.

    `CircuitBreaker.call` holds the breaker's lock for the whole guarded call, which on the gevent hub would
    let one request at a time reach the upstream. So calls run outside it and only their verdict is replayed
    through `call` (a no-op or a raise, microseconds under the lock). Half-open admits a single trial call;
    the others keep failing fast until it settles.
    """

    def __init__(self, name: str, fail_max: int, reset_s: float) -> None:
        import pybreaker

        self.name = name
        self.reset_s = reset_s
        self._breaker = pybreaker.CircuitBreaker(fail_max=fail_max, reset_timeout=reset_s, name=name)
        self._lock = threading.Lock()
        self._opened_at = 0.0
        self._trial = False

    def seconds_until_half_open(self) -> float:
        return self._opened_at + self.reset_s - time.monotonic()

    def admit(self, model: str) -> bool:
        """Raise 503 while open; return True when this call is the half-open trial."""
        import pybreaker

        with self._lock:
            state = self._breaker.current_state
            if state == pybreaker.STATE_CLOSED:
                return False
            if state == pybreaker.STATE_OPEN:
                wait_s = self.seconds_until_half_open()
                if wait_s > 0:
                    raise _circuit_open(model, wait_s)
                self._breaker.half_open()
                log.info("upstream_circuit_half_open", upstream=self.name)
            if self._trial:
                raise _circuit_open(model, 1.0)
            self._trial = True
            return True

    def settle(self, healthy: bool | None, trial: bool) -> None:
        """Count a finished call; None (the caller went away, or a bug) only frees the trial slot."""
        import pybreaker

        with self._lock:
            if trial:
                self._trial = False
            if healthy is None:
                return
            before = self._breaker.current_state
            with contextlib.suppress(pybreaker.CircuitBreakerError, _TripWire):
                self._breaker.call(_succeed if healthy else _fail)
            after = self._breaker.current_state
            if after == before:
                return
            if after == pybreaker.STATE_OPEN:
                self._opened_at = time.monotonic()
                log.warning("upstream_circuit_opened", upstream=self.name, reset_s=self.reset_s)
            else:
                log.info("upstream_circuit_" + after.replace("-", "_"), upstream=self.name)


@dataclass
class _Upstream:
    """The connection pool and circuit breaker of one base_url in one process, shared by its models."""

    pid: int
    base_url: str
    client: HTTPClient
    circuit: _Circuit
    settings: tuple[Any, ...]
    users: int = 0


_UPSTREAMS: dict[tuple[int, str], _Upstream] = {}
_UPSTREAMS_LOCK = threading.Lock()


def _acquire_upstream(base_url: str, settings: tuple[int, float, float, int, float]) -> _Upstream:
    """This process's pool for base_url; the pid in the key keeps a forked worker off its parent's sockets."""
    from geventhttpclient import HTTPClient

    pool_size, connect_timeout_s, deadline_s, fail_max, reset_s = settings
    key = (os.getpid(), base_url)
    with _UPSTREAMS_LOCK:
        upstream = _UPSTREAMS.get(key)
        if upstream is None:
            client = HTTPClient.from_url(
                base_url,
                concurrency=pool_size,
                connection_timeout=connect_timeout_s,
                # Only a backstop: every read already runs under a gevent.Timeout within the deadline.
                network_timeout=deadline_s,
                headers={"User-Agent": "flask-ai-gateway"},
            )
            upstream = _Upstream(key[0], base_url, client, _Circuit(base_url, fail_max, reset_s), settings)
            _UPSTREAMS[key] = upstream
        elif upstream.settings != settings:
            log.warning(
                "upstream_settings_ignored", upstream=base_url, kept=upstream.settings, given=settings
            )
        upstream.users += 1
        return upstream


def _release_upstream(upstream: _Upstream) -> None:
    with _UPSTREAMS_LOCK:
        upstream.users -= 1
        if upstream.users <= 0:
            _UPSTREAMS.pop((upstream.pid, upstream.base_url), None)
            upstream.client.close()


class OpenAICompatibleParams(ma.Schema):
    """What `load` reads; its defaults live there."""

    base_url = ma.fields.String(
        required=True,
        validate=ma.validate.URL(schemes={"http", "https"}, require_tld=False),
        metadata={"description": "The upstream's OpenAI API root, e.g. http://host:8000/v1."},
    )
    model = ma.fields.String(validate=ma.validate.Length(min=1))
    api_key_env = ma.fields.String(validate=ma.validate.Length(min=1))
    first_byte_timeout_s = ma.fields.Float(validate=ma.validate.Range(min=0, min_inclusive=False))
    deadline_s = ma.fields.Float(validate=ma.validate.Range(min=0, min_inclusive=False))
    max_retries = ma.fields.Integer(validate=ma.validate.Range(min=0))
    retry_backoff_s = ma.fields.Float(validate=ma.validate.Range(min=0))
    encoding_format = ma.fields.String(validate=ma.validate.OneOf(("base64", "float")))
    pool_size = ma.fields.Integer(validate=ma.validate.Range(min=1))
    connect_timeout_s = ma.fields.Float(validate=ma.validate.Range(min=0, min_inclusive=False))
    breaker_fail_max = ma.fields.Integer(validate=ma.validate.Range(min=1))
    breaker_reset_s = ma.fields.Float(validate=ma.validate.Range(min=0, min_inclusive=False))
    dimensions = ma.fields.Integer(validate=ma.validate.Range(min=1))


class OpenAICompatibleBackend(Backend):
    family = "openai_compatible"
    params_schema = OpenAICompatibleParams
    capabilities = frozenset({"chat", "embeddings"})
    # Passed through as the client sent them: the upstream speaks OpenAI's API, and its own 400
    # (relayed with its param) is the best judge of what it supports.
    chat_options = CHAT_OPTIONS
    cpu_bound = False
    thread_safe = True

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self._upstream: _Upstream | None = None

    # lifecycle ---------------------------------------------------------------------------
    def load(self) -> None:
        """Check params and join the upstream's pool; no network call: the breaker copes with a dead one."""
        self.close()
        params = self.spec.params
        base_url = str(params.get("base_url") or "").rstrip("/")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self._base_url = base_url
        self._path = parts.path.rstrip("/")
        self._model = str(params.get("model") or self.spec.name)
        self._first_byte_timeout_s = float(params.get("first_byte_timeout_s", 30))
        self._deadline_s = float(params.get("deadline_s", 120))
        self._max_retries = int(params.get("max_retries", 2))
        self._backoff_s = float(params.get("retry_backoff_s", 0.05))
        self._encoding_format = str(params.get("encoding_format", "base64"))
        if self._encoding_format not in ("base64", "float"):
            raise ValueError(f"encoding_format must be 'base64' or 'float', got {self._encoding_format!r}")
        self._fixed_headers = {"Content-Type": "application/json"}
        key_env = params.get("api_key_env")
        key = os.environ.get(str(key_env)) if key_env else None
        if key:
            self._fixed_headers["Authorization"] = f"Bearer {key}"
        elif key_env:
            # Local servers (vLLM, Ollama) need no key; one that does answers 401, which we map to 502.
            log.warning("upstream_api_key_unset", model=self.spec.name, api_key_env=key_env)
        self._settings = (
            int(params.get("pool_size", 100)),
            float(params.get("connect_timeout_s", 3)),
            self._deadline_s,
            int(params.get("breaker_fail_max", 5)),
            float(params.get("breaker_reset_s", 30)),
        )
        self._upstream = _acquire_upstream(base_url, self._settings)

    def close(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None and upstream.pid == os.getpid():
            _release_upstream(upstream)

    def _pool(self) -> _Upstream:
        """This process's upstream; a worker forked after `load` builds its own on first use."""
        upstream = self._upstream
        if upstream is None:
            raise APIError(503, f"Model '{self.spec.name}' is not loaded.", code="model_not_ready")
        if upstream.pid != os.getpid():
            upstream = self._upstream = _acquire_upstream(self._base_url, self._settings)
        return upstream

    # chat --------------------------------------------------------------------------------
    def chat(self, request: ChatRequest) -> ChatResult:
        body = self._chat_body(request, stream=False)
        headers = self._headers(request.headers, request.request_id, "application/json")
        deadline = _Deadline(self._deadline_s)

        def call() -> ChatResult:
            answer = self._with_retries(
                deadline, lambda: self._post_json("/chat/completions", body, headers, deadline)
            )
            return _chat_result(answer, self.spec.name)

        return self._guarded(call)

    def chat_stream(self, request: ChatRequest) -> Iterator[ChatChunk]:
        """Open the stream now, up to its first token, and relay the rest lazily.

        Opening before our response starts is what lets an upstream refusal, a timeout or an
        open circuit answer with its real status (502/503/504, Retry-After) instead of a 200
        followed by an error event, and it is the window in which retries are still safe.
        """
        body = self._chat_body(request, stream=True)
        headers = self._headers(request.headers, request.request_id, "text/event-stream")
        deadline = _Deadline(self._deadline_s)
        stream, first = self._guarded(
            lambda: self._with_retries(deadline, lambda: self._open_stream(body, headers, deadline))
        )
        return self._relay(stream, first)

    def _relay(self, stream: _SSEStream, first: ChatChunk | None) -> Iterator[ChatChunk]:
        name = self.spec.name
        chunk = first
        try:
            while chunk is not None:
                yield chunk
                chunk = stream.next_chunk()
            stream.drain()
        except TimeoutError as exc:
            raise UpstreamStreamError(
                f"The upstream of model '{name}' stalled mid-stream: {_reason(exc)}.",
                status=504,
                code="upstream_timeout",
            ) from exc
        except _transport_errors() as exc:
            raise UpstreamStreamError(
                f"The upstream of model '{name}' broke off the stream: {_reason(exc)}."
            ) from exc
        finally:
            # Closes the socket unless the response was read to its end: half-read, it can't be reused.
            stream.response.release()
        yield ChatChunk(
            finish_reason=stream.finish_reason or "stop",
            prompt_tokens=stream.prompt_tokens,
            completion_tokens=stream.completion_tokens,
        )

    def _chat_body(self, request: ChatRequest, *, stream: bool) -> bytes:
        payload: dict[str, Any] = {"model": self._model, "messages": request.messages}
        optional = {
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "seed": request.seed,
            "user": request.user,
        }
        payload.update((key, value) for key, value in optional.items() if value is not None)
        payload.update(request.options)
        if request.stop:
            payload["stop"] = request.stop
        if stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        return json.dumps(payload, separators=(",", ":")).encode()

    def _open_stream(
        self, body: bytes, headers: dict[str, str], deadline: _Deadline
    ) -> tuple[_SSEStream, ChatChunk | None]:
        """One attempt, up to the first delta: everything in here may still be retried."""
        with deadline.timeout(self._first_byte_timeout_s):
            response = self._pool().client.request("POST", self._path + "/chat/completions", body, headers)
            try:
                if response.status_code != 200:
                    raise _status_error(response.status_code, response.read(), response.get("retry-after"))
                stream = _SSEStream(response, deadline, self._first_byte_timeout_s, self.spec.name)
                return stream, stream.next_chunk()
            except BaseException:
                response.release()
                raise

    # embeddings --------------------------------------------------------------------------
    def embedding_dimensions(self) -> int | None:
        dimensions = self.spec.params.get("dimensions")
        return int(dimensions) if dimensions is not None else None

    def embed(self, texts: list[str], dimensions: int | None = None) -> EmbeddingResult:
        payload: dict[str, Any] = {
            "model": self._model,
            "input": texts,
            "encoding_format": self._encoding_format,
        }
        if dimensions is not None:
            payload["dimensions"] = dimensions
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = self._headers({}, None, "application/json")
        deadline = _Deadline(self._deadline_s)

        def call() -> EmbeddingResult:
            answer = self._with_retries(
                deadline, lambda: self._post_json("/embeddings", body, headers, deadline)
            )
            return _embedding_result(answer, len(texts), dimensions, self.spec.name)

        return self._guarded(call)

    # plumbing ----------------------------------------------------------------------------
    def _headers(self, extra: Mapping[str, str], request_id: str | None, accept: str) -> dict[str, str]:
        """Later entries win: geventhttpclient merges header names case-insensitively, in order."""
        headers = outgoing_headers()
        headers.update((k, str(v)) for k, v in extra.items() if k.lower() not in NOT_FORWARDED)
        tracing.inject(headers)  # the span current now (the backend call's), not the request's
        if request_id:
            headers["X-Request-ID"] = request_id
        headers.update(self._fixed_headers)
        headers["Accept"] = accept
        return headers

    def _post_json(self, path: str, body: bytes, headers: dict[str, str], deadline: _Deadline) -> Any:
        """One non-streamed attempt: headers within first_byte_timeout_s, the body within the deadline."""
        with deadline.timeout(self._first_byte_timeout_s):
            response = self._pool().client.request("POST", self._path + path, body, headers)
        try:
            with deadline.timeout():
                raw = response.read()
        finally:
            response.release()
        if response.status_code != 200:
            raise _status_error(response.status_code, raw, response.get("retry-after"))
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise APIError(
                502, f"The upstream of model '{self.spec.name}' sent malformed JSON.", code="upstream_error"
            ) from exc

    def _guarded(self, call: Callable[[], T]) -> T:
        """Run one logical call behind the upstream's circuit breaker and give it one verdict."""
        circuit = self._pool().circuit
        trial = circuit.admit(self.spec.name)
        healthy: bool | None = None
        try:
            result = call()
        except APIError as exc:
            healthy = exc.code not in BREAKER_FAILURE_CODES
            if exc.status >= 500:
                log.warning(
                    "upstream_call_failed",
                    model=self.spec.name,
                    upstream=self._base_url,
                    status=exc.status,
                    code=exc.code,
                    error=exc.message,
                )
            raise
        else:
            healthy = True
            return result
        finally:
            circuit.settle(healthy, trial)

    def _with_retries(self, deadline: _Deadline, attempt: Callable[[], T]) -> T:
        """Retry transport failures and 429/5xx answers within max_retries and the deadline, then map the
        last failure to our error shape.

        The first attempt runs outside tenacity: building a `Retrying` and walking its action chain
        cost about a tenth of the gateway's CPU per request (py-spy under gunicorn, issue 9), and
        nearly every call succeeds at once. Only a retryable failure builds the retry loop, which
        then sees that failure as its own first attempt, so stop, wait and logging are unchanged."""
        try:
            try:
                return attempt()
            except Exception as exc:
                if not _retryable(exc):
                    raise
                first_failure = exc
            return self._retry(deadline, attempt, first_failure)
        except _UpstreamStatus as exc:
            raise _status_api_error(exc, self.spec.name) from exc
        except TimeoutError as exc:
            raise APIError(
                504,
                f"The upstream of model '{self.spec.name}' timed out: {_reason(exc)}.",
                code="upstream_timeout",
            ) from exc
        except _transport_errors() as exc:
            raise APIError(
                502,
                f"Could not reach the upstream of model '{self.spec.name}': {_reason(exc)}.",
                code="upstream_error",
            ) from exc

    def _retry(self, deadline: _Deadline, attempt: Callable[[], T], first_failure: Exception) -> T:
        """tenacity's loop after a failed first attempt, which it is handed as attempt 1."""
        import gevent
        import tenacity

        replayed = False

        def again() -> T:
            nonlocal replayed
            if not replayed:
                replayed = True
                raise first_failure
            return attempt()

        # Jitter added to each exponential step keeps a burst of failed calls from retrying in lockstep.
        backoff = tenacity.wait_exponential(
            multiplier=self._backoff_s, max=MAX_BACKOFF_S
        ) + tenacity.wait_random(0, self._backoff_s)

        def wait(state: tenacity.RetryCallState) -> float:
            asked = _asked_pause(state)
            return max(backoff(state), asked or 0.0)

        def stop(state: tenacity.RetryCallState) -> bool:
            return (
                state.attempt_number > self._max_retries
                or (_asked_pause(state) or 0.0) > MAX_HONOURED_RETRY_AFTER_S
                or state.upcoming_sleep >= deadline.remaining()
            )

        def before_sleep(state: tenacity.RetryCallState) -> None:
            log.warning(
                "upstream_retry",
                model=self.spec.name,
                upstream=self._base_url,
                attempt=state.attempt_number,
                wait_s=round(state.upcoming_sleep, 3),
                error=str(_outcome_error(state)),
            )

        retrying = tenacity.Retrying(
            stop=stop,
            wait=wait,
            retry=tenacity.retry_if_exception(_retryable),
            sleep=gevent.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        return retrying(again)


class _SSEStream:
    """One upstream text/event-stream response, read an event at a time with every socket wait bounded."""

    def __init__(
        self, response: HTTPSocketPoolResponse, deadline: _Deadline, idle_s: float, model: str
    ) -> None:
        self.response = response
        self._deadline = deadline
        self._idle_s = idle_s
        self._model = model
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.done = False

    def next_chunk(self) -> ChatChunk | None:
        """The next delta with content, tool calls or logprobs, or None once [DONE] has arrived."""
        while not self.done:
            chunk = self._apply(self._next_data())
            if chunk is not None:
                return chunk
        return None

    def drain(self) -> None:
        """Read the chunked terminator after [DONE], so the connection can go back to the pool."""
        if not self.response.message_complete:
            with contextlib.suppress(*_transport_errors()), self._deadline.timeout(DRAIN_TIMEOUT_S):
                self.response.read()

    def _next_data(self) -> bytes:
        """The data of the next event; comments and fields such as event:, id: or retry: are skipped."""
        lines: list[bytes] = []
        with self._deadline.timeout(self._idle_s):
            while True:
                line = self.response.readline(b"\n")
                if not line:
                    raise UpstreamStreamError(
                        f"The upstream of model '{self._model}' ended the stream before [DONE]."
                    )
                line = line.strip()
                if line.startswith(b"data:"):
                    lines.append(line[5:].strip())
                elif not line and lines:
                    return b"\n".join(lines)

    def _apply(self, data: bytes) -> ChatChunk | None:
        if data == b"[DONE]":
            self.done = True
            return None
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise UpstreamStreamError(
                f"The upstream of model '{self._model}' sent a malformed event."
            ) from exc
        try:
            if "error" in event:
                error = event["error"]
                message = error.get("message") if isinstance(error, dict) else error
                raise UpstreamStreamError(
                    f"The upstream of model '{self._model}' failed mid-stream: {message}"
                )
            usage = event.get("usage")
            if usage:
                self.prompt_tokens = int(usage["prompt_tokens"])
                self.completion_tokens = int(usage["completion_tokens"])
            found: ChatChunk | None = None
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                text = delta.get("content") or ""
                tool_calls = delta.get("tool_calls") or None
                logprobs = choice.get("logprobs") or None
                if not isinstance(text, str):
                    raise TypeError("content is not a string")
                if not isinstance(tool_calls, list | None) or not isinstance(logprobs, dict | None):
                    raise TypeError("tool_calls or logprobs of the wrong type")
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
                if text or tool_calls or logprobs:
                    found = ChatChunk(text=text, tool_calls=tool_calls, logprobs=logprobs)
            return found
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise UpstreamStreamError(
                f"The upstream of model '{self._model}' sent an event of unexpected shape."
            ) from exc


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Socket errors (timeouts included) and HTTP framing errors: the connection, not the content, failed."""
    from geventhttpclient.response import HTTPParseError

    return (OSError, HTTPParseError)


def _reason(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).rstrip(".")


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, _UpstreamStatus):
        return exc.status in RETRY_STATUSES
    return isinstance(exc, _transport_errors())


def _outcome_error(state: tenacity.RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None else None


def _asked_pause(state: tenacity.RetryCallState) -> float | None:
    """The Retry-After of the last answer, if it sent one."""
    return getattr(_outcome_error(state), "retry_after_s", None)


def _retry_after_s(value: Any) -> float | None:
    """Parse Retry-After, delta-seconds or HTTP-date (RFC 9110 10.2.3)."""
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _status_error(status: int, raw: bytes, retry_after: Any) -> _UpstreamStatus:
    """Read OpenAI's `{"error": {...}}`, vLLM's top-level `{"message": ...}` or plain text."""
    message, code, param = f"HTTP {status}", None, None
    try:
        body = json.loads(raw)
        error = body.get("error", body) if isinstance(body, dict) else body
        if isinstance(error, dict):
            message = str(error.get("message") or message)
            code = error.get("code") if isinstance(error.get("code"), str) else None
            param = error.get("param") if isinstance(error.get("param"), str) else None
        elif isinstance(error, str):
            message = error
    except ValueError:
        message = raw.decode("utf-8", "replace").strip() or message
    return _UpstreamStatus(status, message[:500], code, param, _retry_after_s(retry_after))


def _status_api_error(exc: _UpstreamStatus, model: str) -> APIError:
    """Our answer to the upstream's last non-2xx answer."""
    status = exc.status
    detail = f"The upstream of model '{model}' answered {status}: {exc.message}"
    if status in (401, 403):
        return APIError(
            502, detail + " (check the gateway's upstream credentials).", code="upstream_auth_error"
        )
    if status == 404:
        # The model is in our catalogue; a 404 means base_url or the upstream model name is misconfigured.
        return APIError(502, detail, code="upstream_not_found")
    if status in (429, 503):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))} if exc.retry_after_s else None
        return APIError(503, detail, code="upstream_unavailable", headers=headers)
    if status == 504:
        return APIError(504, detail, code="upstream_timeout")
    if status >= 500:
        return APIError(502, detail, code="upstream_error")
    # The caller's own mistake (400, 413, 422, ...): the upstream's words say best what to fix.
    return APIError(status, exc.message, code=exc.code, param=exc.param)


def _circuit_open(model: str, wait_s: float) -> APIError:
    return APIError(
        503,
        f"The upstream of model '{model}' is failing; calls are suspended for a moment.",
        code="upstream_unavailable",
        headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
    )


def _shape_error(model: str, what: str) -> APIError:
    return APIError(502, f"The upstream of model '{model}' sent {what}.", code="upstream_error")


def _chat_result(body: Any, model: str) -> ChatResult:
    try:
        choice = body["choices"][0]
        message = choice["message"]
        text = message.get("content")
        tool_calls = message.get("tool_calls") or None
        logprobs = choice.get("logprobs") or None
        usage = body.get("usage") or {}
        if not isinstance(text, str | None):
            raise TypeError("content is not a string")
        if not isinstance(tool_calls, list | None) or not isinstance(logprobs, dict | None):
            raise TypeError("tool_calls or logprobs of the wrong type")
        return ChatResult(
            # content null is only OpenAI's answer for a reply that is all tool calls.
            text=text if text is not None or tool_calls else "",
            finish_reason=choice.get("finish_reason") or "stop",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            tool_calls=tool_calls,
            logprobs=logprobs,
        )
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise _shape_error(model, "a chat completion of unexpected shape") from exc


def _embedding_result(body: Any, count: int, dimensions: int | None, model: str) -> EmbeddingResult:
    try:
        items = sorted(body["data"], key=lambda item: item.get("index", 0))
        vectors = np.vstack([_vector(item["embedding"]) for item in items]).astype(np.float32, copy=False)
        prompt_tokens = int((body.get("usage") or {}).get("prompt_tokens") or 0)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise _shape_error(model, "embeddings of unexpected shape") from exc
    if vectors.shape[0] != count:
        raise _shape_error(model, f"{vectors.shape[0]} embeddings for {count} inputs")
    if dimensions is not None and vectors.shape[1] != dimensions:
        raise _shape_error(model, f"{vectors.shape[1]}-dimensional embeddings, {dimensions} were asked for")
    return EmbeddingResult(vectors=vectors, prompt_tokens=prompt_tokens)


def _vector(value: Any) -> np.ndarray:
    """base64 little-endian float32 (OpenAI's compact form) or a JSON list of numbers."""
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4")
    return np.asarray(value, dtype=np.float32)
