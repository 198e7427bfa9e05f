"""Request ids, structured JSON logs and the gateway's own Prometheus metrics.

Every log line carries the request id through structlog's contextvars; greenlets each have
their own context, so concurrent requests in one gevent worker never mix their ids.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import uuid

import structlog
from flask import Flask, Response, g, has_request_context, request
from prometheus_client import Gauge

from app import tracing

REQUEST_ID_HEADER = "X-Request-ID"
VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

IN_FLIGHT = Gauge(
    "gateway_http_requests_in_flight",
    "Requests being served, streams included, summed over live workers.",
    multiprocess_mode="livesum",
)


def valid_request_id(supplied: str | None) -> str | None:
    """A client's X-Request-ID if it is one we echo (short, no control characters), else None."""
    return supplied if supplied and VALID_REQUEST_ID.match(supplied) else None


def request_id() -> str | None:
    """The current request's id, creating one if a hook has not run yet (early errors)."""
    if not has_request_context():
        return None
    rid = g.get("request_id")
    if rid is None:
        rid = valid_request_id(request.headers.get(REQUEST_ID_HEADER)) or uuid.uuid4().hex
        g.request_id = rid
    return rid


def outgoing_headers() -> dict[str, str]:
    """Headers every upstream call carries, so one id traces a request across services:
    X-Request-ID always, W3C `traceparent` when tracing is on."""
    rid = request_id()
    headers = {REQUEST_ID_HEADER: rid} if rid else {}
    tracing.inject(headers)
    return headers


def configure_logging(fmt: str, level: str) -> None:
    """structlog for our lines, and the same renderer for stdlib loggers (gunicorn, alembic)."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        tracing.add_trace_ids,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        lambda _, __, event: {**event, "pid": os.getpid()},
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _begin_request() -> None:
    structlog.contextvars.clear_contextvars()
    g.started = time.perf_counter()
    structlog.contextvars.bind_contextvars(request_id=request_id())
    IN_FLIGHT.inc()


def _finish_request(response: Response) -> Response:
    """Echo the id; log and count the request when the body is fully sent (streams too)."""
    response.headers[REQUEST_ID_HEADER] = request_id() or ""
    _fix_retry_after(response)
    started = g.get("started", time.perf_counter())
    fields = {
        "method": request.method,
        "route": request.url_rule.rule if request.url_rule else None,
        "path": request.path,
        "status": response.status_code,
        "tenant": g.get("tenant"),
        "stream": response.is_streamed,
        **tracing.current_ids(),  # the access line is written after the request's span has ended
    }
    logger = structlog.get_logger("gateway.access")

    def on_close() -> None:
        IN_FLIGHT.dec()
        logger.info("request", duration_ms=round((time.perf_counter() - started) * 1000, 2), **fields)

    response.call_on_close(on_close)
    return response


def _fix_retry_after(response: Response) -> None:
    """flask-limiter stamps its window's reset time as Retry-After on every response.

    That is right for its own 429s, meaningless on a success, and wrong on our 503s, which
    carry their own value. Runs after flask-limiter's hook (after_request runs in reverse order).
    """
    own = getattr(response, "gateway_retry_after", None)
    if own is not None:
        response.headers["Retry-After"] = own
    elif response.status_code < 400:
        response.headers.pop("Retry-After", None)


def init_app(app: Flask) -> None:
    if app.config.get("GATEWAY_CONFIGURE_LOGGING", True):  # a host app keeps its own logging
        configure_logging(str(app.config["LOG_FORMAT"]), str(app.config["LOG_LEVEL"]))
    app.before_request(_begin_request)
    app.after_request(_finish_request)
