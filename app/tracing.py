"""OpenTelemetry traces: off unless the standard `OTEL_*` variables ask for them.

On, every request is a span from the official Flask instrumentation, with one child span per
step of the request path (`gateway.auth`, `gateway.rate_limit`, `gateway.policy`,
`gateway.quota`, `gateway.backend`, `gateway.audit`) and the database and Redis calls below them
(official SQLAlchemy and Redis instrumentations). Upstream calls carry W3C `traceparent`, and
every log line of a traced request carries `trace_id` and `span_id`.

Configuration is OpenTelemetry's own: `OTEL_TRACES_EXPORTER` (`otlp` or `console`; setting
`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` implies `otlp`),
`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`, and
`OTEL_SDK_DISABLED=true` to force it off. Tests hand an exporter in as `OTEL_SPAN_EXPORTER`.

The tracer provider is the app's own, not the process-global one: OpenTelemetry lets the
global be set once per process, and a process may build several apps (tests, a host app that
mounts us). Step spans find it through `current_app`, so with tracing off a step costs one
dict lookup.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any, TypeVar

from flask import Flask, current_app, has_app_context

F = TypeVar("F", bound=Callable[..., Any])
EXTENSION = "tracer"


def _exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    # http/protobuf: no gRPC runtime to load into a gevent worker; reads OTEL_EXPORTER_OTLP_*.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def init_app(app: Flask) -> None:
    injected = app.config.get("OTEL_SPAN_EXPORTER")
    if injected is None and not app.config.get("TRACING_ENABLED"):
        return
    from opentelemetry.instrumentation.flask import FlaskInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({"service.name": "flask-ai-gateway"})  # OTEL_SERVICE_NAME wins
    provider = TracerProvider(resource=resource)
    if injected is not None:
        provider.add_span_processor(SimpleSpanProcessor(injected))
    else:
        provider.add_span_processor(BatchSpanProcessor(_exporter(str(app.config["OTEL_TRACES_EXPORTER"]))))
    app.extensions[EXTENSION] = provider.get_tracer("flask-ai-gateway")
    app.extensions["tracer_provider"] = provider
    FlaskInstrumentor().instrument_app(app, tracer_provider=provider, excluded_urls="healthz,metrics")
    _instrument_stores(app, provider)


def _instrument_stores(app: Flask, provider: Any) -> None:
    """SQLAlchemy per engine; Redis is patched process-wide, so only once per process."""
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    from app.extensions import db

    with app.app_context():
        # The instrumentation declares sqlalchemy < 2.1 and would refuse 2.1; it hooks only
        # engine events ("before/after_cursor_execute"), unchanged in 2.1, so the check is skipped.
        SQLAlchemyInstrumentor().instrument(engine=db.engine, tracer_provider=provider, skip_dep_check=True)
    redis = RedisInstrumentor()
    if not redis.is_instrumented_by_opentelemetry:
        redis.instrument(tracer_provider=provider)


def _tracer() -> Any:
    return current_app.extensions.get(EXTENSION) if has_app_context() else None


def step(name: str) -> Callable[[F], F]:
    """Decorate one step of the request path: a child span named `gateway.<name>` when tracing
    is on. A generator's span covers its whole iteration (a stream), not just its creation."""
    span_name = f"gateway.{name}"

    def decorate(fn: F) -> F:
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen_wrapper(*args: Any, **kwargs: Any) -> Iterator[Any]:
                tracer = _tracer()
                if tracer is None:
                    return (yield from fn(*args, **kwargs))
                with tracer.start_as_current_span(span_name):
                    return (yield from fn(*args, **kwargs))

            return gen_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tracer = _tracer()
            if tracer is None:
                return fn(*args, **kwargs)
            with tracer.start_as_current_span(span_name):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def inject(headers: MutableMapping[str, str]) -> None:
    """Add `traceparent` (and `tracestate`) for the current span to an upstream call's headers."""
    if _tracer() is None:
        return
    from opentelemetry.propagate import inject as otel_inject

    otel_inject(headers)


def current_ids() -> dict[str, str]:
    """The current span's `trace_id` and `span_id` (hex, as OTLP and Grafana show them)."""
    if _tracer() is None:
        return {}
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


def add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the current span's ids on every line logged inside a trace."""
    for key, value in current_ids().items():
        event.setdefault(key, value)
    return event
