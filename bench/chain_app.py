"""The gateway plus one team blueprint: the seeds' 4-step I/O chain, for the benchmark only.

Teams extend the gateway with their own blueprints; this one is registered only in this module
(``gunicorn -c gunicorn.conf.py bench.chain_app:app``), never by ``app.create_app``. It sits behind
the gateway's own API-key check and rate limit, like any inference route.

``POST /bench/chain`` ``{"plan": "rag" | "independent"}``: each step is one call to the upstream:
auth (``GET /models``, a token introspection), retrieval (``POST /embeddings``, a vector lookup), the
LLM (``POST /chat/completions``) and the store (``POST /embeddings`` of the answer, an upsert).
``rag`` runs auth and retrieval at once, then the LLM (it needs the context), then the store (it
needs the answer); ``independent`` is the seeds' version, all four at once. Concurrency is plain
gevent: one greenlet per step.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

import gevent
from flask import Blueprint, Response, request
from geventhttpclient import HTTPClient

from app import create_app
from app.errors import APIError
from app.identity.principal import require_scopes
from app.observability import request_id

UPSTREAM = urlsplit(os.environ["UPSTREAM_BASE_URL"])
blueprint = Blueprint("bench_chain", __name__)
_client: HTTPClient | None = None


def client() -> HTTPClient:
    """One pool per worker, created after fork (gevent patches the worker before the first request)."""
    global _client
    if _client is None:
        _client = HTTPClient.from_url(
            f"{UPSTREAM.scheme}://{UPSTREAM.netloc}/", concurrency=1000, network_timeout=30
        )
    return _client


def _step(name: str, method: str, path: str, payload: Any, timings: dict[str, float]) -> dict[str, Any]:
    started = time.perf_counter()
    body = None if payload is None else json.dumps(payload)
    headers = {"Content-Type": "application/json", "X-Request-ID": request_id() or ""}
    response = client().request(method, UPSTREAM.path.rstrip("/") + path, body=body, headers=headers)
    try:
        content = response.read()
    finally:
        response.release()
    if response.status_code != 200:
        raise APIError(502, f"chain step {name}: upstream answered {response.status_code}")
    timings[name] = round((time.perf_counter() - started) * 1000, 2)
    return json.loads(content)


def _together(*calls: tuple[Any, ...]) -> list[dict[str, Any]]:
    greenlets = [gevent.spawn(_step, *call) for call in calls]
    gevent.joinall(greenlets, raise_error=True)
    return [g.value for g in greenlets]


@blueprint.post("/bench/chain")
@require_scopes("inference:invoke")
def chain() -> Response:
    started = time.perf_counter()
    body = request.get_json(silent=True) or {}
    plan = body.get("plan", "rag")
    query = str(body.get("query", "what does the gateway do?"))[:2000]
    if plan not in ("rag", "independent"):
        raise APIError(400, "plan must be rag or independent", param="plan")
    timings: dict[str, float] = {}
    auth = ("auth", "GET", "/models", None, timings)
    retrieve = ("retrieve", "POST", "/embeddings", {"model": "sim-model", "input": query}, timings)

    def generate(context: str) -> tuple[Any, ...]:
        messages = [{"role": "system", "content": context}, {"role": "user", "content": query}]
        return ("llm", "POST", "/chat/completions", {"model": "sim-model", "messages": messages}, timings)

    def store(text: str) -> tuple[Any, ...]:
        return ("store", "POST", "/embeddings", {"model": "sim-model", "input": text}, timings)

    if plan == "rag":
        _, found = _together(auth, retrieve)
        answer = _step(*generate(f"context vector of {len(found['data'][0]['embedding'])} dims"))
        _step(*store(answer["choices"][0]["message"]["content"]))
    else:
        _together(auth, retrieve, generate("no context"), store(query))
    payload = {
        "plan": plan,
        "steps_ms": timings,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }
    return Response(json.dumps(payload), mimetype="application/json")


app = create_app()
app.register_blueprint(blueprint)
