"""One request, several model calls in parallel (`asyncio.gather`, the Flask way).

The calls run on a `concurrent.futures.ThreadPoolExecutor`; under gevent its threads are
greenlets, so ten upstream calls cost one call's latency. Each call goes through the same
service function, with the same policy and quota steps, as its own endpoint.

Cancelling (mode=first, deadlines): calls to remote models are killed, which closes their
upstream connection at once. Calls to local models are left to finish in their OS thread
(their result is discarded): interrupting a running llama.cpp or torch call would free its
slot while the model is still busy with it.
"""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from functools import partial
from typing import Any

import marshmallow as ma
import structlog
from flask import copy_current_request_context, g

from app.admission import unbounded
from app.errors import APIError, flatten_messages
from app.identity.principal import Principal, current_principal, require_scopes
from app.inference import blp, service
from app.inference.catalogue import catalogue
from app.inference.offload import gevent_active
from app.inference.schemas import (
    ChatCompletionRequestSchema,
    EmbeddingRequestSchema,
    FanoutRequestSchema,
    FanoutResponseSchema,
    InferenceRequestSchema,
)
from app.observability import request_id

log = structlog.get_logger(__name__)

OPERATIONS: dict[str, tuple[type[ma.Schema], Any]] = {
    "chat": (ChatCompletionRequestSchema, lambda principal, model, body: service.run_chat(principal, body)),
    "embeddings": (
        EmbeddingRequestSchema,
        lambda principal, model, body: service.run_embeddings(principal, body),
    ),
    "infer": (
        InferenceRequestSchema,
        lambda principal, model, body: service.run_infer(principal, model, None, body),
    ),
}


class _Call:
    def __init__(self, index: int, spec: dict[str, Any], started: float, overall_deadline: float) -> None:
        self.index = index
        self.model = spec["model"]
        self.operation = spec["operation"]
        self.input = spec["input"]
        own = spec.get("deadline_ms")
        self.deadline = min(overall_deadline, started + own / 1000) if own else overall_deadline
        self.greenlet: Any = None
        self.interruptible = False
        self.result: dict[str, Any] | None = None

    def run(self, principal: Principal, rid: str | None) -> dict[str, Any]:
        g.principal, g.request_id = principal, rid
        if gevent_active():
            import gevent

            self.greenlet = gevent.getcurrent()
        schema_cls, operation = OPERATIONS[self.operation]
        try:
            body = schema_cls().load({**self.input, "model": self.model})
        except ma.ValidationError as exc:
            details = flatten_messages(exc.messages)
            raise APIError(
                422,
                f"{details[0]['param']}: {details[0]['message']}",
                param=details[0]["param"],
                details=details,
            ) from None
        body.pop("stream", None)
        if self.operation != "infer":
            self.interruptible = not catalogue().get(self.model).cpu_bound
        return operation(principal, self.model, body)

    def record(
        self, status: str, latency_s: float, result: Any = None, error: dict[str, Any] | None = None
    ) -> None:
        self.result = {
            "index": self.index,
            "model": self.model,
            "status": status,
            "latency_ms": round(latency_s * 1000, 2),
            "result": result,
            "error": error,
        }

    def cancel(self, future: Future, status: str, latency_s: float) -> None:
        future.cancel()
        if self.interruptible and self.greenlet is not None:
            self.greenlet.kill(block=False)
        self.record(status, latency_s)


@blp.route("/v1/fanout", methods=["POST"])
@require_scopes("inference:invoke")
@blp.arguments(FanoutRequestSchema)
@blp.response(200, FanoutResponseSchema)
@unbounded
def fanout(body: dict[str, Any]) -> dict[str, Any]:
    """Run several model calls at once. `all`: every result with its status and latency (a failed
    call does not fail the rest); `first`: the first success, the rest cancelled."""
    principal, rid = current_principal(), request_id()
    started = time.monotonic()
    overall = started + body["deadline_ms"] / 1000
    calls = [_Call(i, spec, started, overall) for i, spec in enumerate(body["calls"])]
    executor = ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="fanout")
    futures = {
        executor.submit(copy_current_request_context(partial(call.run, principal, rid))): call
        for call in calls
    }
    pending = set(futures)
    try:
        while pending:
            now = time.monotonic()
            for future in [f for f in pending if futures[f].deadline <= now]:
                futures[future].cancel(future, "deadline_exceeded", now - started)
                pending.discard(future)
            if not pending:
                break
            timeout = max(0.0, min(futures[f].deadline for f in pending) - now)
            done, pending = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            for future in done:
                call = futures[future]
                latency = time.monotonic() - started
                try:
                    call.record("ok", latency, result=future.result())
                except APIError as exc:
                    call.record("error", latency, error={**exc.payload()["error"], "status": exc.status})
                except Exception:
                    log.exception("fanout_call_failed", model=call.model)
                    error = APIError(500, "The call failed; quote the request_id to the operator.")
                    call.record("error", latency, error={**error.payload()["error"], "status": 500})
            if body["mode"] == "first" and any(c.result and c.result["status"] == "ok" for c in calls):
                for future in pending:
                    futures[future].cancel(future, "cancelled", time.monotonic() - started)
                pending = set()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    results = [c.result for c in calls]
    if body["mode"] == "first":
        winners = [r for r in results if r and r["status"] == "ok"]
        results = sorted(winners, key=lambda r: r["latency_ms"])[:1] + [
            r for r in results if r and r["status"] != "ok"
        ]
    return {
        "object": "fanout.result",
        "mode": body["mode"],
        "latency_ms": round((time.monotonic() - started) * 1000, 2),
        "results": results,
    }
