"""Cheap routes take turns, so liveness never waits behind a crowd of them.

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
from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, Response, request

F = TypeVar("F", bound=Callable[..., Any])
GATEWAY_BLUEPRINTS = frozenset({"inference", "governance", "health"})


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
