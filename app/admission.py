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

import collections
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from flask import Flask, Response, request
from prometheus_client import Counter, Gauge

from app.observability import VALID_REQUEST_ID

# Set in the WSGI environ by a refusal: close the connection after this answer. The gunicorn worker
# (gunicorn_worker.py, which must not import the app) spells the same key.
CLOSE_CONNECTION = "gateway.close_connection"

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
LIMIT = Gauge(
    "gateway_admission_limit",
    "Requests the worker gate admits at once now: MAX_IN_FLIGHT, or less while the hub lags.",
    multiprocess_mode="livesum",
)
HUB_LAG = Gauge(
    "gateway_hub_lag_seconds",
    "How late the worker's event loop last ran a timer (sampled every 10 ms when the adaptive limit is on).",
    multiprocess_mode="livemax",
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
    """At most `limit` requests at once, `max_pending` waiting up to `wait_s` each, first come first
    served. `limit` is `max_in_flight` unless a `LagLimit` moves it (see below).

    Written with a counter and a queue of events rather than a semaphore because the limit moves:
    a semaphore's count can't shrink while its permits are held. The primitives come from
    `threading`, so under gevent they are cooperative and elsewhere real.
    """

    def __init__(self, max_in_flight: int, max_pending: int, wait_s: float) -> None:
        self.max_in_flight = max_in_flight
        self.limit = max_in_flight
        self.max_pending = max_pending
        self.wait_s = wait_s
        self.in_flight = 0
        self._waiting: collections.deque[threading.Event] = collections.deque()
        self._lock = threading.Lock()
        LIMIT.inc(max_in_flight)

    @property
    def pending(self) -> int:
        return len(self._waiting)

    def enter(self) -> str | None:
        """Take a place; None when admitted, else why not ("queue_full" or "wait_timeout")."""
        with self._lock:
            if self.in_flight < self.limit and not self._waiting:
                self.in_flight += 1
                IN_FLIGHT.inc()
                return None
            if len(self._waiting) >= self.max_pending:
                return "queue_full"
            turn = threading.Event()
            self._waiting.append(turn)
        PENDING.inc()
        try:
            turn.wait(self.wait_s)
        except BaseException:  # killed while waiting (a timeout, the worker stopping)
            with self._lock:
                if turn.is_set():
                    self.in_flight -= 1  # a place was handed over; give it to the next one
                    IN_FLIGHT.dec()
                    self._admit_waiting()
                else:
                    self._waiting.remove(turn)
            raise
        finally:
            PENDING.dec()
        with self._lock:
            if turn.is_set():  # handed a place by `_admit_waiting` (counted there)
                return None
            self._waiting.remove(turn)
        return "wait_timeout"

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1
            IN_FLIGHT.dec()
            self._admit_waiting()

    def set_limit(self, limit: int) -> None:
        with self._lock:
            LIMIT.inc(limit - self.limit)
            self.limit = limit
            self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self._waiting and self.in_flight < self.limit:
            self.in_flight += 1
            IN_FLIGHT.inc()
            self._waiting.popleft().set()


class LagLimit:
    """The gate's limit, moved by how late the worker's hub runs (ADMISSION_LAG_TARGET_MS).

    A gevent worker has one hub for all its requests. Past its CPU capacity every greenlet waits
    its turn longer, so a fixed limit sized for requests that wait on slow models (hundreds) lets
    an overload through: each request, every refusal and every /healthz answer is as late as the
    hub, which grew to seconds at 3x the saturation rate (bench/results/check-2026-12-04/). The
    hub's lateness is measured directly: a greenlet sleeps SAMPLE_S and notes how much later
    than asked it woke up, the same signal gevent's own monitor thread uses for blocking. Above
    the target the limit is cut by a quarter (at most once per COOLDOWN_S, the time admitted work
    needs to drain before a cut shows); below half the target, while the limit is what holds
    requests back, it grows by a twentieth: additive increase, multiplicative decrease, as in TCP
    and in Envoy's and Netflix's adaptive concurrency limits. It never leaves
    [MIN_LIMIT, MAX_IN_FLIGHT]. Hand-written because those are proxies' filters, not Python
    libraries; the controller is the dozen lines of `observe`.
    """

    SAMPLE_S = 0.01
    COOLDOWN_S = 0.1
    MIN_LIMIT = 4

    def __init__(self, gate: AdmissionGate, target_s: float) -> None:
        self.gate = gate
        self.target_s = target_s
        self._last_cut = float("-inf")
        self._started = False
        self._start_lock = threading.Lock()

    def start(self) -> None:
        """Start sampling, once, from the first gated request (the serving process, after any fork)."""
        if self._started:  # every gated request asks: no lock once started
            return
        with self._start_lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._sample, name="admission-lag", daemon=True).start()

    def _sample(self) -> None:
        while True:
            asked = time.perf_counter()
            time.sleep(self.SAMPLE_S)
            woke = time.perf_counter()
            self.observe(max(0.0, woke - asked - self.SAMPLE_S), woke)

    def observe(self, lag_s: float, now: float) -> None:
        """One lateness sample: cut, grow or keep the gate's limit."""
        HUB_LAG.set(lag_s)
        gate = self.gate
        limit = gate.limit
        if lag_s > self.target_s:
            if now - self._last_cut >= self.COOLDOWN_S and limit > self.MIN_LIMIT:
                self._last_cut = now
                gate.set_limit(max(self.MIN_LIMIT, limit * 3 // 4))
        elif (
            lag_s < self.target_s / 2
            and limit < gate.max_in_flight
            and (gate.in_flight >= limit or gate.pending)  # the limit, not the load, is what binds
        ):
            gate.set_limit(min(gate.max_in_flight, limit + max(1, limit // 20)))


class GatedApp:
    """WSGI middleware: the gate in front of the whole Flask app, probes excepted."""

    def __init__(
        self,
        wsgi_app: Callable[..., Iterable[bytes]],
        gate: AdmissionGate,
        prefix: str,
        lag_limit: LagLimit | None = None,
    ) -> None:
        self.wsgi_app = wsgi_app
        self.gate = gate
        self.lag_limit = lag_limit
        self.prefix = prefix
        self.ungated = frozenset(prefix + path for path in UNGATED_PATHS)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if not self._gated(environ.get("PATH_INFO", "")):
            return self.wsgi_app(environ, start_response)  # a probe, or a host app's own route
        if self.lag_limit is not None:
            self.lag_limit.start()
        refused = self.gate.enter()
        if refused is not None:
            return _overloaded(environ, start_response, refused)
        try:
            return self.wsgi_app(environ, start_response)
        finally:
            self.gate.leave()

    def _gated(self, path: str) -> bool:
        return path not in self.ungated and (not self.prefix or (path + "/").startswith(self.prefix + "/"))

    def active(self) -> bool:
        """Whether the gate is full now (the gunicorn worker asks once per new connection)."""
        gate = self.gate
        return gate.in_flight >= gate.limit and gate.pending >= gate.max_pending

    def refuse_before_parsing(
        self, address: str, path: str, authorization: str, supplied_id: str | None
    ) -> tuple[str, list[tuple[str, str]], bytes] | None:
        """For the gunicorn worker, before gunicorn parses the request: the 503 this gate would
        answer at once (full, and no place to wait), or None. A refusal made there costs about a
        third of one made here after gunicorn's parsing, and at 3x the saturation rate refusals
        are two requests in three (bench/results, overload)."""
        if not self.active() or not self._gated(path):
            return None
        return _overloaded_answer("queue_full", supplied_id)


def _overloaded(environ: dict[str, Any], start_response: Callable[..., Any], reason: str) -> list[bytes]:
    status, headers, body = _overloaded_answer(reason, environ.get("HTTP_X_REQUEST_ID"))
    # The client's next request comes on a new connection, which the gunicorn worker can refuse
    # before its HTTP parser while the gate stays full (see GatedApp.refuse_before_parsing).
    environ[CLOSE_CONNECTION] = True
    start_response(status, [*headers, ("Content-Length", str(len(body)))])
    return [body]


def _overloaded_answer(reason: str, supplied: str | None) -> tuple[str, list[tuple[str, str]], bytes]:
    """(status, headers without Content-Length, body) of a 503 `server_overloaded`, counted."""
    REJECTED.labels(reason=reason).inc()
    # The ids observability.py accepts; anything else gets a fresh one, so it can't break the JSON.
    request_id = supplied if supplied and VALID_REQUEST_ID.match(supplied) else uuid.uuid4().hex
    headers = [("Content-Type", "application/json"), ("Retry-After", "1"), ("X-Request-ID", request_id)]
    return "503 Service Unavailable", headers, _OVERLOADED_BODY % request_id.encode()


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
    target_ms = float(app.config.get("ADMISSION_LAG_TARGET_MS") or 0)
    lag_limit = LagLimit(gate, target_ms / 1000) if target_ms > 0 else None
    app.extensions["admission_lag_limit"] = lag_limit
    prefix = str(app.config.get("GATEWAY_URL_PREFIX") or "")
    gated = GatedApp(app.wsgi_app, gate, prefix, lag_limit)
    app.extensions.setdefault("refusals_before_parsing", []).append(gated)
    app.wsgi_app = gated  # type: ignore[method-assign]
