"""The floor of the flood measurement: a WSGI app that answers every request with the throttle's 429.

``gunicorn -c gunicorn.conf.py bench.floor_app:app`` runs it on the gateway's own worker class and
settings (gevent, keep-alive, request limits), so a request to it costs what gunicorn's gevent worker
costs to accept, parse and answer one request and nothing of ours: what a refusal can't go below
on this server. bench/auth_bench.py measures it beside the gateway's refusal of the same flood.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

BODY = json.dumps(
    {
        "error": {
            "message": "Too many failed authentications from this client; retry in 60 s.",
            "type": "rate_limit_error",
            "param": None,
            "code": "auth_failures_throttled",
        },
        "request_id": "0" * 32,
    }
).encode()
HEADERS = [
    ("Content-Type", "application/json"),
    ("Content-Length", str(len(BODY))),
    ("Retry-After", "60"),
    ("X-Request-ID", "0" * 32),
]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    path = environ.get("PATH_INFO", "")
    if path == "/healthz":
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", "2")])
        return [b"{}"]
    start_response("429 TOO MANY REQUESTS", HEADERS)
    return [BODY]
