"""Worker admission: a bounded number of requests in flight and a bounded wait; cheap routes take
turns inside it, so liveness never waits behind a crowd of them.

The gate (MAX_IN_FLIGHT, MAX_PENDING, MAX_PENDING_WAIT), like Envoy's circuit breakers: a worker
works on at most MAX_IN_FLIGHT requests at once; up to MAX_PENDING more wait, first come first
served, at most MAX_PENDING_WAIT seconds each; anything past that is answered at once with 503
`server_overloaded` and `Retry-After: 1`, in the gateway's error shape. Past its capacity a worker
that accepts everything makes every request slower until all of them time out (the 1,000 req/s
row of bench/results/REPORT.md: 3 answers a second); one that refuses the excess keeps serving
what it admitted at full speed, and the client or its load balancer retries elsewhere.

The gate is a WSGI middleware in front of Flask, so a refusal costs no routing, no hook, no
authentication, no Redis: a semaphore try, a counter and a prebuilt body with the request id
spliced in (a few microseconds). The probes (/healthz, /readyz, /v2/health/*) and /metrics are
never gated: an overloaded worker is alive, and saying so is what keeps it from being restarted.
A request holds its place from the moment it enters the app until the app has returned its
response: for JSON that is the whole request; an SSE stream is counted while it authenticates,
reserves quota and waits for its first token, and not while it streams (its body is sent after
the app has returned). So thousands of long streams stay open without holding the gate: they are
bounded by gunicorn's worker_connections and each model's max_concurrency, while the gate bounds
the work that is actually competing for the worker's CPU. For the gate to shed anything,
MAX_IN_FLIGHT + MAX_PENDING must stay below WORKER_CONNECTIONS (gunicorn stops accepting at that
many open connections, and queued connections wait in the kernel, unrefused).

Cheap routes take turns, so liveness never waits behind a crowd of them.

A gevent worker runs every request's Python on one hub. A cheap route (listing models, reading
the registry, administration) is pure CPU between a few short Redis or database round trips, so
running 200 of them at once does not serve them faster than running 8: it only makes every turn of
the hub 200 request-slices long, and /healthz, waiting for its turn, answered in seconds
(2,000 GET /v1/models from 200 clients: healthz p99 2.2 s, bench/liveness.py).

So a request enters the app's dispatch (hooks, authentication, rate limit, view) only while it
holds one of CHEAP_ROUTE_CONCURRENCY slots; the rest wait, first come first served, parked
off the hub's run queue. Views marked `unbounded` skip the slots: the probes, which must answer
whatever the load, and the model calls, which spend their time waiting on a model or an upstream
and are bounded by each model's own `max_concurrency` and `max_queue`. The slot is released when
the view has returned its response, so a streamed body never holds one.

The default, 4, still keeps the CPU busy across a slot holder's round trips: at the same
throughput, 8 slots gave healthz p99 228 ms and 4 gave 149 ms (bench/liveness.py, loaded machine).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from flask import Flask, Response, request
from prometheus_client import Counter, Gauge

from app.observability import VALID_REQUEST_ID

F = TypeVar("F", bound=Callable[..., Any])
GATEWAY_BLUEPRINTS = frozenset({"inference", "governance", "health"})
UNGATED_PATHS = ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics")
_OVERLOADED_BODY = (
    b'{"error":{"message":"This server is at capacity; retry shortly.","type":"service_unavailable",'
    b'"param":null,"code":"server_overloaded"},"request_id":"%s"}'
)

IN_FLIGHT = Gauge(
    "gateway_admission_in_flight",
    "Requests admitted by the worker gate and not yet answered (streams: until their first byte).",
    multiprocess_mode="livesum",
)
PENDING = Gauge(
    "gateway_admission_pending",
    "Requests waiting for a place in the worker gate.",
    multiprocess_mode="livesum",
)
REJECTED = Counter(
    "gateway_admission_rejected_total",
    "Requests refused with 503 server_overloaded by the worker gate.",
    ("reason",),
)


def unbounded(view: F) -> F:
    """Mark a view (innermost decorator) as taking no cheap-route slot."""
    view.admission_unbounded = True  # type: ignore[attr-defined]
    return view


def init_app(app: Flask) -> None:
    """Hold a slot around the dispatch (hooks and view) of the gateway's bounded views.

    Installed on the app instance rather than by subclassing Flask, because the gateway may be
    mounted on an app someone else created: only our blueprints' views take slots, so the host's
    routes are dispatched exactly as before.
    """
    # threading's semaphore is gevent's under the worker (patched), and a real one elsewhere.
    slots = threading.BoundedSemaphore(int(app.config["CHEAP_ROUTE_CONCURRENCY"]))
    app.extensions["admission_slots"] = slots
    dispatch = app.full_dispatch_request

    def full_dispatch_request() -> Response:
        rule = request.url_rule
        view = app.view_functions.get(rule.endpoint) if rule is not None else None
        ours = request.blueprint in GATEWAY_BLUEPRINTS
        if not ours or getattr(view, "admission_unbounded", False):
            return dispatch()
        with slots:
            return dispatch()

    app.full_dispatch_request = full_dispatch_request  # type: ignore[method-assign]


class AdmissionGate:
    """At most `max_in_flight` requests at once, `max_pending` waiting up to `wait_s` each.

    The primitives come from `threading`, so under gevent they are cooperative and elsewhere real.
    """

    def __init__(self, max_in_flight: int, max_pending: int, wait_s: float) -> None:
        self.max_in_flight = max_in_flight
        self.max_pending = max_pending
        self.wait_s = wait_s
        self.in_flight = 0
        self.pending = 0
        self._slots = threading.Semaphore(max_in_flight)
        self._lock = threading.Lock()

    def enter(self) -> str | None:
        """Take a place; None when admitted, else why not ("queue_full" or "wait_timeout")."""
        if not self._slots.acquire(blocking=False):
            with self._lock:
                if self.pending >= self.max_pending:
                    return "queue_full"
                self.pending += 1
            PENDING.inc()
            try:
                admitted = self._slots.acquire(timeout=self.wait_s)
            finally:
                with self._lock:
                    self.pending -= 1
                PENDING.dec()
            if not admitted:
                return "wait_timeout"
        with self._lock:
            self.in_flight += 1
        IN_FLIGHT.inc()
        return None

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1
        IN_FLIGHT.dec()
        self._slots.release()


class GatedApp:
    """WSGI middleware: the gate in front of the whole Flask app, probes excepted."""

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]], gate: AdmissionGate, prefix: str) -> None:
        self.wsgi_app = wsgi_app
        self.gate = gate
        self.prefix = prefix
        self.ungated = frozenset(prefix + path for path in UNGATED_PATHS)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in self.ungated or (self.prefix and not (path + "/").startswith(self.prefix + "/")):
            return self.wsgi_app(environ, start_response)  # a probe, or a host app's own route
        refused = self.gate.enter()
        if refused is not None:
            return _overloaded(environ, start_response, refused)
        try:
            return self.wsgi_app(environ, start_response)
        finally:
            self.gate.leave()


def _overloaded(environ: dict[str, Any], start_response: Callable[..., Any], reason: str) -> list[bytes]:
    REJECTED.labels(reason=reason).inc()
    supplied = environ.get("HTTP_X_REQUEST_ID")
    # The ids observability.py accepts; anything else gets a fresh one, so it can't break the JSON.
    request_id = supplied if supplied and VALID_REQUEST_ID.match(supplied) else uuid.uuid4().hex
    body = _OVERLOADED_BODY % request_id.encode()
    start_response(
        "503 SERVICE UNAVAILABLE",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Retry-After", "1"),
            ("X-Request-ID", request_id),
        ],
    )
    return [body]


def install_gate(app: Flask) -> None:
    """Wrap the app's WSGI callable outside every other middleware (tracing's included), so a
    refused request costs none of them; only the auth throttle's early refusal is outside it (it
    never waits, and a flood it refuses should not take the gate's slots or bookkeeping)."""
    gate = AdmissionGate(
        int(app.config["MAX_IN_FLIGHT"]),
        int(app.config["MAX_PENDING"]),
        float(app.config["MAX_PENDING_WAIT_S"]),
    )
    app.extensions["admission_gate"] = gate
    app.wsgi_app = GatedApp(app.wsgi_app, gate, str(app.config.get("GATEWAY_URL_PREFIX") or ""))  # type: ignore[method-assign]
