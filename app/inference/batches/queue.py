"""The queue between the gateway and the batch workers: Celery on Redis (why Celery: worker.py).

One task per line, `batches.run_line(batch_id, line)`: the database holds the line and its
result, the message only names it. Delivery is at least once (`acks_late`: a message is
acknowledged after its line has run, so a worker killed mid-line leaves it unacknowledged and
Redis hands it to another worker once `visibility_timeout` has passed); the line's row makes the
effect exactly once.

Workers announce themselves in one sorted set, scored by a deadline on Redis's clock and renewed
every HEARTBEAT_S, so the gateway can tell "no worker is running" (503 `batch_worker_unavailable`,
start `make worker`) from "the workers are busy" without a broadcast round trip per request.
"""

from __future__ import annotations

import structlog
from celery import Celery
from flask import Flask, current_app
from redis import Redis
from redis.exceptions import RedisError

from app.errors import APIError

log = structlog.get_logger(__name__)

QUEUE = "batches"
RUN_LINE = "batches.run_line"
WORKERS_KEY = "batches:workers"
HEARTBEAT_S = 5
HEARTBEAT_TTL_S = 3 * HEARTBEAT_S


def make_celery(redis_url: str, visibility_timeout_s: float) -> Celery:
    """The Celery app both sides use: the gateway sends with it, `worker.py` consumes with it."""
    celery = Celery("flask-ai-gateway", broker=redis_url, set_as_current=False)
    celery.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,
        # A pool process that dies mid-line (OOM, SIGKILL) puts its message back at once.
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # a worker holds only the line it runs, so a kill strands one
        task_ignore_result=True,  # results live in batch_lines, not in a result backend
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s,
            # kombu scans for unacknowledged messages past their visibility every 1 s (its default,
            # every 100 s, would add minutes to the recovery of a killed worker's line).
            "unacked_restore_interval": 1,
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
    )
    return celery


def init_app(app: Flask) -> None:
    url = app.config.get("REDIS_URL")
    if url:
        app.extensions["batch_queue"] = make_celery(str(url), float(app.config["BATCH_VISIBILITY_TIMEOUT_S"]))


def require_queue() -> Celery:
    """The queue, or 503 when this gateway has no Redis to put batch lines on."""
    celery = current_app.extensions.get("batch_queue")
    if celery is None:
        raise APIError(
            503,
            "Batch jobs need Redis: set REDIS_URL on the gateway and start a worker with `make worker`.",
            code="batch_queue_unavailable",
        )
    return celery


def _redis() -> Redis:
    return current_app.extensions["redis_client"]


def workers_alive(redis: Redis) -> int:
    now = int(redis.time()[0])
    return int(redis.zcount(WORKERS_KEY, now, "+inf"))


def require_worker() -> None:
    """503 `batch_worker_unavailable` unless a worker has announced itself within HEARTBEAT_TTL_S."""
    try:
        alive = workers_alive(_redis())
    except RedisError as exc:
        log.warning("batch_queue_unreachable", error=str(exc))
        raise APIError(
            503, "The batch queue (Redis) is unreachable; retry shortly.", code="batch_queue_unavailable"
        ) from exc
    if not alive:
        raise APIError(
            503,
            "No batch worker is running: start one with `make worker` (or the compose `worker` service).",
            code="batch_worker_unavailable",
            headers={"Retry-After": str(HEARTBEAT_S)},
        )


def beat(redis: Redis, name: str) -> None:
    """One heartbeat of worker `name`; also forgets workers whose deadline has passed."""
    now = int(redis.time()[0])
    with redis.pipeline() as pipe:
        pipe.zadd(WORKERS_KEY, {name: now + HEARTBEAT_TTL_S})
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - 1)
        pipe.execute()


def leave(redis: Redis, name: str) -> None:
    redis.zrem(WORKERS_KEY, name)


def enqueue(batch_id: str, lines: list[int]) -> None:
    """One message per line, over one producer connection."""
    celery = require_queue()
    with celery.producer_or_acquire() as producer:
        for line in lines:
            celery.send_task(RUN_LINE, args=[batch_id, line], queue=QUEUE, producer=producer)
