"""The batch worker: `make worker`, or `python -m app.inference.batches.worker` (the image too).

It consumes the `batches` queue on REDIS_URL and runs each line as execution.py says, in
BATCH_WORKER_CONCURRENCY pool processes (default 1; start more workers to scale out). Each
pool process builds the gateway app once, after the fork, with its models loaded eagerly (a
line must not fail because a model was still loading); the parent process only consumes.

Why Celery and not RQ, measured with `python -m bench.queue_choice --quick` (one worker, Redis
on loopback, 2-core machine shared with other work; the table is in bench/results/BATCH.md):

- Per-job overhead: 200 trivial jobs through one worker took 15.9 s with RQ's default `Worker`
  (12.6 jobs/s: it forks a process per job, and a fork of a process holding the gateway app would
  also rebuild its pools and reload its models every job), 0.8 s with RQ's `SimpleWorker`
  (245/s) and 0.6 s with Celery's prefork pool of one (326/s). Close once RQ stops forking.
- A worker SIGKILLed mid-job, a second one waiting: Celery (acks_late, visibility timeout 10 s)
  ran the job again on the second worker 12.4 s after the kill, exactly once more. RQ had not
  after 60 s (and, in an earlier run, after 150 s): its job stays in the started registry until
  the job's heartbeat TTL (the monitoring interval plus a fixed 60 s) has passed *and* some worker
  runs registry maintenance, which a worker blocked waiting for jobs does only every few minutes.

So Celery: its acknowledgement after the work (`acks_late`), with the message handed back after
`BATCH_VISIBILITY_TIMEOUT`, is exactly "a killed worker's line is run again". The visibility
timeout must exceed the longest a line can take (every model's `deadline_s`; default 300 s):
a line still running past it would be handed to a second worker while the first is running it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading

import structlog
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutdown
from flask import Flask
from redis import Redis
from redis.exceptions import RedisError

from app.inference.batches import queue
from config import ConfigError, load_config

log = structlog.get_logger(__name__)


def _settings() -> dict[str, object]:
    try:
        settings = load_config()
    except ConfigError as exc:
        sys.stderr.write(f"configuration error: {exc}\n")
        raise SystemExit(2) from exc
    if not settings.get("REDIS_URL"):
        sys.stderr.write(
            "configuration error: REDIS_URL: the batch worker needs the Redis the gateway queues batches on\n"
        )
        raise SystemExit(2)
    return settings


SETTINGS = _settings()
NODE = f"batches-{os.getpid()}@{socket.gethostname()}"
celery_app = queue.make_celery(str(SETTINGS["REDIS_URL"]), float(SETTINGS["BATCH_VISIBILITY_TIMEOUT_S"]))
_app: Flask | None = None
_stop = threading.Event()


@worker_process_init.connect
def _build_app(**_: object) -> None:
    """One gateway app per pool process, made after the fork (no connection or thread is shared)."""
    global _app
    from app import create_app

    _app = create_app({"MODELS_LOAD": "eager"})


@worker_process_shutdown.connect
def _flush(**_: object) -> None:
    """A pool process leaves without running atexit hooks: flush its buffered audit records here."""
    if _app is not None:
        from app.governance import audit

        audit.shutdown(_app)


@celery_app.task(name=queue.RUN_LINE)
def run_line(batch_id: str, line: int) -> None:
    from app.inference.batches import execution

    if _app is None:
        _build_app()
    assert _app is not None
    with _app.app_context():
        execution.run_line(batch_id, line)


def _heartbeat(redis: Redis) -> None:
    while True:
        try:
            queue.beat(redis, NODE)
        except RedisError as exc:  # the gateway then sees no worker, which is true enough
            log.warning("batch_worker_heartbeat_failed", error=str(exc))
        if _stop.wait(queue.HEARTBEAT_S):
            return


@worker_ready.connect
def _announce(**_: object) -> None:
    """Heartbeats start once the worker consumes, so `batch_worker_unavailable` means no consumer."""
    redis = Redis.from_url(str(SETTINGS["REDIS_URL"]), socket_timeout=2, socket_connect_timeout=2)
    threading.Thread(target=_heartbeat, args=(redis,), daemon=True, name="batch-heartbeat").start()


@worker_shutdown.connect
def _withdraw(**_: object) -> None:
    _stop.set()
    with contextlib.suppress(RedisError):  # else its heartbeat's deadline retires it soon anyway
        queue.leave(Redis.from_url(str(SETTINGS["REDIS_URL"]), socket_timeout=2), NODE)


def main(argv: list[str] | None = None) -> None:
    concurrency = os.environ.get("BATCH_WORKER_CONCURRENCY") or "1"
    if not concurrency.isdigit() or int(concurrency) < 1:
        sys.stderr.write(
            f"configuration error: BATCH_WORKER_CONCURRENCY: must be >= 1, got {concurrency!r}\n"
        )
        raise SystemExit(2)
    celery_app.worker_main(
        [
            "worker",
            "--queues",
            queue.QUEUE,
            "--concurrency",
            str(SETTINGS["BATCH_WORKER_CONCURRENCY"]),
            "--pool",
            "prefork",
            "--hostname",
            NODE,
            "--loglevel",
            str(SETTINGS["LOG_LEVEL"]),
            "--without-gossip",
            "--without-mingle",
            *(argv if argv is not None else sys.argv[1:]),
        ]
    )


if __name__ == "__main__":
    main()
