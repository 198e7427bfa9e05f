"""FastAPI twin of the gateway's chat-completions path, as the FastAPI articles would write it.

The same steps as ours, in the idiomatic async style and tuned as its authors would tune it:

- ``Bearer`` API key, argon2-hashed in PostgreSQL, verified once in a thread and then cached
  in-process for ``KEY_CACHE_TTL_S`` (concurrent first requests share one verification);
- Redis sliding-window rate limits per tenant and per key (one Lua call on ``redis.asyncio``),
  failing open when Redis is down, like ours;
- pydantic validation with the same limits (max_tokens, input size);
- the upstream call on ``httpx.AsyncClient`` or ``aiohttp`` (``TWIN_HTTP_CLIENT``), pools unlimited;
- JSON, or SSE relayed event by event while counting tokens for the audit;
- one audit row per call inserted with asyncpg in a ``BackgroundTasks`` task, after the response;
- ``POST /v1/fanout`` (``asyncio.gather``) and ``POST /bench/chain`` (the seeds' 4-step I/O chain).

That is the light twin. ``TWIN_FEATURES=full`` makes it feature-equal with the gateway's governed
path: PII redaction, a token quota, a hash-chained audit trail instead of plain rows, and
Prometheus metrics (``bench/fastapi_twin/governance.py``).

Settings (environment): ``TWIN_UPSTREAM_URL`` (the upstream's ``/v1`` base), ``TWIN_HTTP_CLIENT``,
``TWIN_DATABASE_URL`` (postgresql://), ``TWIN_REDIS_URL``, ``TWIN_UPSTREAM_TIMEOUT`` (seconds),
``TWIN_FEATURES`` (light | full), ``TWIN_TOKEN_QUOTA`` (tokens per tenant and day, full only).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import asyncpg
import orjson
import redis.asyncio as aioredis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import BackgroundTasks, Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError, model_validator
from redis.exceptions import RedisError

from bench.fastapi_twin import governance, storage
from bench.fastapi_twin.upstream import Upstream, UpstreamError, UpstreamStream, make_upstream

FULL = os.environ.get("TWIN_FEATURES", "light") == "full"
KEY_CACHE_TTL_S = 60.0
MAX_INPUT_CHARS = 16_000
MAX_TOKENS = 4096
# Sliding-window log over several buckets in one round trip, like the gateway's tenant bucket plus
# credential bucket. KEYS = bucket keys; ARGV = now_ms, window_ms, unique member, then one limit per
# key. Returns 1 when every bucket has room (and counts the hit in all of them), else 0.
SLIDING_WINDOW = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, 0, now - window)
  if redis.call('ZCARD', key) >= tonumber(ARGV[3 + i]) then return 0 end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now, ARGV[3])
  redis.call('PEXPIRE', key, window)
end
return 1
"""


@dataclass(frozen=True)
class Settings:
    upstream_url: str
    http_client: str
    database_url: str
    redis_url: str
    upstream_timeout_s: float
    full: bool
    token_quota: int

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            upstream_url=os.environ["TWIN_UPSTREAM_URL"],
            http_client=os.environ.get("TWIN_HTTP_CLIENT", "httpx"),
            database_url=os.environ["TWIN_DATABASE_URL"],
            redis_url=os.environ.get("TWIN_REDIS_URL", "redis://127.0.0.1:6379/0"),
            upstream_timeout_s=float(os.environ.get("TWIN_UPSTREAM_TIMEOUT", "60")),
            full=FULL,
            token_quota=int(os.environ.get("TWIN_TOKEN_QUOTA", str(10**15))),
        )


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_prefix: str
    rate_limit: int
    key_rate_limit: int
    window_s: int


class ApiError(Exception):
    """Rendered as OpenAI's error object, like the gateway's errors."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.code, self.param, self.headers = code, param, dict(headers or {})


def _error_body(message: str, kind: str, code: str | None, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# --- request and response models ---------------------------------------------------------------


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    user: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def input_size(self) -> ChatCompletionRequest:
        chars = sum(
            len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content)
            for m in self.messages
        )
        if chars > MAX_INPUT_CHARS:
            raise ValueError(f"messages: {chars} characters of input, more than {MAX_INPUT_CHARS}")
        return self


class FanoutCall(BaseModel):
    model: str
    operation: Literal["chat"] = "chat"
    input: dict[str, Any]


class FanoutRequest(BaseModel):
    mode: Literal["all"] = "all"
    deadline_ms: int = Field(default=60_000, ge=1, le=600_000)
    calls: list[FanoutCall] = Field(min_length=1, max_length=32)


class ChainRequest(BaseModel):
    plan: Literal["rag", "independent"] = "rag"
    query: str = Field(default="what does the gateway do?", max_length=2000)


# --- application state ---------------------------------------------------------------------------


class State:
    """Everything the lifespan opens; one per worker process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.upstream: Upstream = make_upstream(
            settings.http_client, settings.upstream_url, settings.upstream_timeout_s
        )
        self.redis = aioredis.Redis(
            connection_pool=aioredis.BlockingConnectionPool.from_url(
                settings.redis_url, max_connections=64, timeout=5, socket_timeout=0.5
            )
        )
        self.window = self.redis.register_script(SLIDING_WINDOW)
        self.pool: asyncpg.Pool
        self.hasher = PasswordHasher()
        self.keys: dict[str, tuple[float, asyncio.Future[Principal]]] = {}
        self.members = itertools.count()
        self.quota = governance.Quota(self.redis, settings.token_quota) if settings.full else None
        self.chain: governance.AuditChain | None = None

    async def open(self) -> None:
        self.pool = await asyncpg.create_pool(self.settings.database_url, min_size=2, max_size=20)
        await storage.ensure_schema(self.pool)
        if self.settings.full:
            self.chain = governance.AuditChain(self.pool)
            await self.chain.open()

    def audit(self, background: BackgroundTasks, rows: list[storage.AuditRow]) -> None:
        """Light: plain rows inserted after the response. Full: onto the hash chain's queue."""
        if self.chain is None:
            background.add_task(storage.write_audit, self.pool, rows)
            return
        for row in rows:
            self.chain.record(dict(zip(storage.AUDIT_FIELDS, row, strict=True)))

    async def close(self) -> None:
        if self.chain is not None:
            await self.chain.close()
        await self.upstream.aclose()
        await self.pool.close()
        await self.redis.aclose()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state = State(Settings.from_env())
    await state.open()
    app.state.twin = state
    try:
        yield
    finally:
        await state.close()


app = FastAPI(title="fastapi-twin", lifespan=lifespan, docs_url=None, redoc_url=None)
if FULL:
    app.add_middleware(governance.MetricsMiddleware)


@app.exception_handler(ApiError)
async def api_error_handler(request: Request, exc: ApiError) -> Response:
    return Response(
        orjson.dumps(_error_body(exc.message, exc.kind, exc.code, exc.param)),
        status_code=exc.status,
        media_type="application/json",
        headers=exc.headers,
    )


@app.exception_handler(RequestValidationError)
async def validation_error_handler(request: Request, exc: RequestValidationError) -> Response:
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"] if part != "body") or None
    return Response(
        orjson.dumps(_error_body(first["msg"], "invalid_request_error", "invalid_value", param)),
        status_code=400,
        media_type="application/json",
    )


def get_state(request: Request) -> State:
    return request.app.state.twin


# --- authentication and rate limit (dependencies) ------------------------------------------------


async def _verify_key(state: State, key: str) -> Principal:
    prefix, _, secret = key.removeprefix("tw-").partition(".")
    row = await storage.find_key(state.pool, prefix) if secret else None
    if row is None:
        raise ApiError(401, "Invalid API key.", "authentication_error", "invalid_api_key")
    try:
        # argon2 is deliberately slow CPU work: off the event loop.
        await run_in_threadpool(state.hasher.verify, row["secret_hash"], secret)
    except (VerificationError, InvalidHashError):
        raise ApiError(401, "Invalid API key.", "authentication_error", "invalid_api_key") from None
    return Principal(row["tenant"], prefix, row["rate_limit"], row["key_rate_limit"], row["window_s"])


async def authenticate(
    state: Annotated[State, Depends(get_state)],
    authorization: Annotated[str | None, Header()] = None,
) -> Principal:
    if not authorization or not authorization.startswith("Bearer "):
        raise ApiError(401, "Missing Bearer API key.", "authentication_error", "missing_api_key")
    key = authorization[7:].strip()
    now = time.monotonic()
    cached = state.keys.get(key)
    if cached is None or cached[0] < now:
        future = asyncio.ensure_future(_verify_key(state, key))
        state.keys[key] = cached = (now + KEY_CACHE_TTL_S, future)
    try:
        return await asyncio.shield(cached[1])
    except ApiError:
        state.keys.pop(key, None)
        raise


async def rate_limited(
    state: Annotated[State, Depends(get_state)],
    principal: Annotated[Principal, Depends(authenticate)],
) -> Principal:
    now_ms = int(time.time() * 1000)
    try:
        allowed = await state.window(
            keys=[f"twin:rl:tenant:{principal.tenant}", f"twin:rl:key:{principal.key_prefix}"],
            args=[
                now_ms,
                principal.window_s * 1000,
                f"{now_ms}:{os.getpid()}:{next(state.members)}",
                principal.rate_limit,
                principal.key_rate_limit,
            ],
        )
    except RedisError:
        return principal  # fail open, as the gateway does (RATELIMIT_FAIL_OPEN)
    if not allowed:
        raise ApiError(
            429,
            "Rate limit exceeded.",
            "rate_limit_error",
            "rate_limit_exceeded",
            headers={"Retry-After": str(principal.window_s)},
        )
    return principal


Caller = Annotated[Principal, Depends(rate_limited)]
TwinState = Annotated[State, Depends(get_state)]


def _request_id(request: Request) -> str:
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def _upstream_failure(exc: UpstreamError) -> ApiError:
    if exc.timeout:
        return ApiError(504, "The upstream model timed out.", "server_error", "upstream_timeout")
    return ApiError(502, f"The upstream model failed: {exc}", "server_error", "upstream_error")


def _audit_row(
    rid: str,
    principal: Principal,
    route: str,
    model: str,
    status: int,
    usage: Mapping[str, Any],
    started: float,
) -> storage.AuditRow:
    return (
        rid,
        principal.tenant,
        principal.key_prefix,
        route,
        model,
        status,
        usage.get("prompt_tokens"),
        usage.get("completion_tokens"),
        (time.perf_counter() - started) * 1000,
    )


# --- routes --------------------------------------------------------------------------------------


@app.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    background: BackgroundTasks,
    principal: Caller,
    state: TwinState,
) -> Response:
    started = time.perf_counter()
    rid = _request_id(request)
    payload = body.model_dump(exclude_none=True)
    headers = {"X-Request-ID": rid}
    reservation = await _reserve(state, principal, payload)
    try:
        if body.stream:
            return await _stream(state, principal, body, payload, headers, started, background, reservation)
        try:
            status, content = await state.upstream.request("POST", "/chat/completions", payload, headers)
        except UpstreamError as exc:
            raise _upstream_failure(exc) from None
        if status != 200:
            raise ApiError(502, f"The upstream model answered {status}.", "server_error", "upstream_error")
    except BaseException:
        await _settle(state, principal, reservation, {})
        raise
    usage = orjson.loads(content).get("usage") or {}
    await _settle(state, principal, reservation, usage)
    state.audit(background, [_audit_row(rid, principal, "chat", body.model, 200, usage, started)])
    return Response(content, media_type="application/json", headers={"X-Request-ID": rid})


Reservation = tuple[str, int] | None


async def _reserve(state: State, principal: Principal, payload: dict[str, Any]) -> Reservation:
    """Full: redact PII in the messages, then reserve the call's worst case against the quota."""
    if state.quota is None:
        return None
    payload["messages"] = governance.redact_messages(payload["messages"])
    prompt_chars = sum(len(str(m.get("content", ""))) for m in payload["messages"])
    tokens = payload.get("max_tokens", MAX_TOKENS) + prompt_chars // 4 + 1
    try:
        key = await state.quota.reserve(principal.tenant, tokens)
    except RedisError:
        return None  # fail open, as the gateway does
    if key is None:
        raise ApiError(429, "Token quota exhausted.", "insufficient_quota", "insufficient_quota")
    return key, tokens


async def _settle(
    state: State, principal: Principal, reservation: Reservation, usage: Mapping[str, Any]
) -> None:
    if state.quota is None or reservation is None:
        return
    key, reserved = reservation
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    with contextlib.suppress(RedisError):
        await state.quota.settle(key, principal.tenant, reserved, prompt, completion)


async def _stream(
    state: State,
    principal: Principal,
    body: ChatCompletionRequest,
    payload: dict[str, Any],
    headers: dict[str, str],
    started: float,
    background: BackgroundTasks,
    reservation: Reservation,
) -> Response:
    rid = headers["X-Request-ID"]
    try:
        stream = await state.upstream.open_stream("/chat/completions", payload, headers)
    except UpstreamError as exc:
        raise _upstream_failure(exc) from None
    if stream.status != 200:
        await stream.read()
        await stream.aclose()
        raise ApiError(502, f"The upstream model answered {stream.status}.", "server_error", "upstream_error")
    usage: dict[str, Any] = {"completion_tokens": 0}

    async def after_stream() -> None:
        await _settle(state, principal, reservation, usage)
        row = _audit_row(rid, principal, "chat", body.model, 200, usage, started)
        if state.chain is None:
            await storage.write_audit(state.pool, [row])
        else:
            state.chain.record(dict(zip(storage.AUDIT_FIELDS, row, strict=True)))

    background.add_task(after_stream)
    return StreamingResponse(
        _relay(stream, usage),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "X-Request-ID": rid},
    )


async def _relay(stream: UpstreamStream, usage: dict[str, Any]) -> AsyncIterator[bytes]:
    """Re-emit each SSE event as it arrives, counting content chunks (or taking the usage chunk)."""
    try:
        async for line in stream.lines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data != b"[DONE]":
                event = orjson.loads(data)
                if event.get("usage"):
                    usage.update(event["usage"])
                choices = event.get("choices")
                if choices and (choices[0].get("delta") or {}).get("content"):
                    usage["completion_tokens"] += 1
            yield b"data: " + data + b"\n\n"
    except UpstreamError as exc:
        error = _error_body(f"The upstream stream failed: {exc}", "server_error", "upstream_error", None)
        yield b"data: " + orjson.dumps(error) + b"\n\n"
    finally:
        await stream.aclose()


@app.post("/v1/fanout")
async def fanout(
    body: FanoutRequest, request: Request, background: BackgroundTasks, principal: Caller, state: TwinState
) -> Response:
    """Every call at once with ``asyncio.gather``; a failed call does not fail the others."""
    started = time.perf_counter()
    rid = _request_id(request)
    deadline_s = body.deadline_ms / 1000
    rows: list[storage.AuditRow] = []

    async def one(index: int, call: FanoutCall) -> dict[str, Any]:
        result: dict[str, Any] = {"index": index, "model": call.model, "result": None, "error": None}
        try:
            chat = ChatCompletionRequest.model_validate({**call.input, "model": call.model, "stream": False})
            status, content = await asyncio.wait_for(
                state.upstream.request(
                    "POST", "/chat/completions", chat.model_dump(exclude_none=True), {"X-Request-ID": rid}
                ),
                deadline_s,
            )
        except ValidationError as exc:
            result.update(status="error", error=_error_body(str(exc), "invalid_request_error", None, None))
        except TimeoutError:
            result.update(status="deadline_exceeded")
        except UpstreamError as exc:
            result.update(status="error", error=_error_body(str(exc), "server_error", "upstream_error", None))
        else:
            if status == 200:
                answer = orjson.loads(content)
                result.update(status="ok", result=answer)
                rows.append(_audit_row(rid, principal, "fanout", call.model, 200, answer["usage"], started))
            else:
                message = f"The upstream model answered {status}."
                result.update(
                    status="error", error=_error_body(message, "server_error", "upstream_error", None)
                )
        result["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return result

    results = await asyncio.gather(*(one(i, call) for i, call in enumerate(body.calls)))
    state.audit(background, rows)
    answer = {
        "object": "fanout.result",
        "mode": body.mode,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
        "results": results,
    }
    return Response(orjson.dumps(answer), media_type="application/json", headers={"X-Request-ID": rid})


@app.post("/bench/chain")
async def chain(body: ChainRequest, request: Request, principal: Caller, state: TwinState) -> Response:
    """The seeds' auth -> vector lookup -> LLM -> store chain, each step an upstream call.

    ``rag``: auth and retrieval at once, then the LLM (it needs the context), then the store (it
    needs the answer): three round trips. ``independent``: the seeds' version, all four at once.
    """
    started = time.perf_counter()
    rid = _request_id(request)
    headers = {"X-Request-ID": rid}
    timings: dict[str, float] = {}

    async def step(name: str, method: str, path: str, payload: Any | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            status, content = await state.upstream.request(method, path, payload, headers)
        except UpstreamError as exc:
            raise _upstream_failure(exc) from None
        if status != 200:
            raise ApiError(
                502, f"chain step {name}: upstream answered {status}", "server_error", "upstream_error"
            )
        timings[name] = round((time.perf_counter() - t0) * 1000, 2)
        return orjson.loads(content)

    def auth() -> Awaitable[dict[str, Any]]:
        return step("auth", "GET", "/models", None)

    def retrieve() -> Awaitable[dict[str, Any]]:
        return step("retrieve", "POST", "/embeddings", {"model": "sim-model", "input": body.query})

    def generate(context: str) -> Awaitable[dict[str, Any]]:
        messages = [{"role": "system", "content": context}, {"role": "user", "content": body.query}]
        return step("llm", "POST", "/chat/completions", {"model": "sim-model", "messages": messages})

    def store(text: str) -> Awaitable[dict[str, Any]]:
        return step("store", "POST", "/embeddings", {"model": "sim-model", "input": text})

    async def rag() -> None:
        _, found = await asyncio.gather(auth(), retrieve())
        answer = await generate(f"context vector of {len(found['data'][0]['embedding'])} dims")
        await store(answer["choices"][0]["message"]["content"])

    async def independent() -> None:
        await asyncio.gather(auth(), retrieve(), generate("no context"), store(body.query))

    await (rag() if body.plan == "rag" else independent())
    answer = {
        "plan": body.plan,
        "steps_ms": timings,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    return Response(orjson.dumps(answer), media_type="application/json", headers={"X-Request-ID": rid})
