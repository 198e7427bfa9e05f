"""gunicorn settings, all from the environment.

Only `os`, `shutil` and `sys` are imported at the top: this file runs in the master before
any worker exists, and the gevent worker patches the stdlib only after fork, so anything
imported here would stay unpatched in every worker. App and library imports stay inside hooks.
"""

import os
import shutil
import sys


def _count(name: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
    """A whole-number setting, or one line naming the variable and exit: gunicorn would print a
    traceback for a bad value read here. (config/ can't be used: it would import the app's stack.)"""
    raw = os.environ.get(name) or str(default)
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        sys.stderr.write(f"configuration error: {name}: must be a whole number {bounds}, got {raw!r}\n")
        sys.exit(2)
    return value


# gevent: one process per core is the usual ceiling for CPU work; I/O concurrency comes from
# greenlets, not processes. 1 by default because the embedded defaults (no Redis) only hold
# exactly in one process; production sets WEB_CONCURRENCY and REDIS_URL together.
workers = _count("WEB_CONCURRENCY", 1, minimum=1)
# gevent's worker, answering gunicorn's own refusals (the limits below) in the gateway's JSON shape.
worker_class = "gunicorn_worker.GatewayGeventWorker"
# Greenlets per worker: long SSE streams each hold one, so this is also the stream ceiling.
worker_connections = _count("WORKER_CONNECTIONS", 1000, minimum=1)
# Connections the kernel queues for accept() while the worker is busy. A burst past it (thousands
# of streams opening at once) is dropped at SYN and retried by clients after 1, 3, 7... seconds,
# which shows as multi-second time-to-first-token; the kernel caps it at net.core.somaxconn.
backlog = _count("BACKLOG", 2048, minimum=64)
# Loopback by default: the embedded defaults (bootstrap key, no TLS) are for one machine;
# a deployment binds 0.0.0.0 behind its proxy on purpose.
bind = os.environ.get("BIND", "127.0.0.1:8000")
# Under gevent `timeout` is only the heartbeat: a worker whose hub is blocked this long is
# killed. Long streams are unaffected. 30 s leaves room for a slow model load at start-up.
timeout = _count("TIMEOUT", 30)
# On restart, in-flight streams get this long to finish before they are cut.
graceful_timeout = _count("GRACEFUL_TIMEOUT", 30)
# Behind a load balancer that keeps connections open: a little above its idle timeout.
keepalive = _count("KEEPALIVE", 5)
# Recycle workers now and then to bound slow leaks in native libraries; 0 disables.
max_requests = _count("MAX_REQUESTS", 0)
max_requests_jitter = _count("MAX_REQUESTS_JITTER", 0)
# What gunicorn refuses before the app sees a request (414 / 431, JSON; see gunicorn_worker.py).
# Set here, not left to gunicorn's defaults, because they bound what a client may send: the
# longest path and query (a model id, an audit query), the number of headers and the longest one
# (a JWT, a proxy's forwarding headers). gunicorn can't go above 8190 bytes for a request line.
limit_request_line = _count("LIMIT_REQUEST_LINE", 8190, minimum=256, maximum=8190)
limit_request_fields = _count("LIMIT_REQUEST_FIELDS", 100, minimum=16, maximum=32768)
limit_request_field_size = _count("LIMIT_REQUEST_FIELD_SIZE", 8190, minimum=1024, maximum=65536)
# Preloading would import the app (and ssl) before gevent patches the worker.
preload_app = False
wsgi_app = "wsgi:app"
accesslog = None  # the app writes one JSON line per request itself
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
if os.path.isdir("/dev/shm"):
    worker_tmp_dir = "/dev/shm"  # heartbeat file writes never hit a slow disk

_metrics_dir = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "instance", "prometheus"),
)


def on_starting(server):
    """Fail fast on bad settings, and start each run with empty metric files."""
    from config import ConfigError, load_config

    try:
        load_config()
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        sys.exit(2)
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    try:
        os.makedirs(_metrics_dir, exist_ok=True)
    except OSError as exc:
        sys.stderr.write(
            f"configuration error: PROMETHEUS_MULTIPROC_DIR: cannot create {_metrics_dir}: {exc}\n"
        )
        sys.exit(2)


def post_worker_init(worker):
    """Start loading models as soon as the worker (patched, app imported) is up, freeze the
    imported heap out of the garbage collector's way (app/heap.py), and start the greenlet
    sampler if WORKER_STATS_INTERVAL asks for it."""
    from app import heap, worker_stats

    heap.manage()
    models = getattr(worker.wsgi, "extensions", {}).get("models")
    if models is not None:
        models.start_loading()
    worker_stats.start_sampling()


def child_exit(server, worker):
    """A dead worker's live gauges must stop counting towards /metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
