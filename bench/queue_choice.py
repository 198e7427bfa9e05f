"""RQ or Celery for batch jobs: the measurement behind the choice in app/inference/batches/worker.py.

Two questions, on Redis, with real worker processes:

1. Per-job overhead: N trivial jobs through one worker (RQ's forking `Worker`, RQ's `SimpleWorker`,
   Celery's prefork pool with one child, acks_late), wall time from enqueue to the last one done.
2. A worker SIGKILLed mid-job (its whole process group, as an OOM kill or a lost node): is the job
   run again by a second worker, how many times, and after how long.

    python -m bench.queue_choice --quick      # ~2 minutes: 200 jobs; a killed job gets 60 s to rerun
    python -m bench.queue_choice              # 2,000 jobs; 150 s

Needs `celery[redis]` (the bench extra) and a Redis (QUEUE_CHOICE_REDIS_URL, default db 7).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
from celery import Celery

REDIS_URL = os.environ.get("QUEUE_CHOICE_REDIS_URL", "redis://127.0.0.1:6379/7")
ROOT = Path(__file__).resolve().parent.parent
DONE_KEY = "qc:done"
ATTEMPTS_KEY = "qc:attempts"
# The kill case's redelivery knobs: as short as each engine allows without redelivering live jobs.
CELERY_VISIBILITY_S = 10

celery_app = Celery("queue_choice", broker=REDIS_URL)
celery_app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_transport_options={
        "visibility_timeout": CELERY_VISIBILITY_S,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
    task_ignore_result=True,
)


def _client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def noop() -> None:
    _client().incr(DONE_KEY)


def slow(seconds: float) -> None:
    client = _client()
    client.incr(ATTEMPTS_KEY)
    time.sleep(seconds)
    client.incr(DONE_KEY)


celery_noop = celery_app.task(name="qc.noop")(noop)
celery_slow = celery_app.task(name="qc.slow")(slow)


def _start(engine: str) -> subprocess.Popen:
    bin_dir = Path(sys.executable).parent
    if engine == "celery":
        command = [sys.executable, "-m", "celery", "-A", "bench.queue_choice:celery_app", "worker"]
        command += [
            "-c",
            "1",
            "-P",
            "prefork",
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
        ]
    else:
        command = [str(bin_dir / "rq"), "worker", "-u", REDIS_URL, "--maintenance-interval", "1"]
        command += ["--job-monitoring-interval", "1", "-w", f"rq.worker.{engine}", "qc"]
    return subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait(key: str, value: int, timeout_s: float) -> float | None:
    client, deadline = _client(), time.monotonic() + timeout_s
    while int(client.get(key) or 0) < value:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)
    return time.monotonic()


def _enqueue(engine: str, task: str, count: int, *args: float) -> None:
    if engine == "celery":
        signature = celery_noop if task == "noop" else celery_slow
        for _ in range(count):
            signature.apply_async(args=args)
        return
    from rq import Queue, Retry

    from bench import queue_choice  # by its import name: run as __main__, `noop` is __main__.noop

    queue = Queue("qc", connection=_client())
    function = queue_choice.noop if task == "noop" else queue_choice.slow
    queue.enqueue_many([Queue.prepare_data(function, args=args, retry=Retry(max=1)) for _ in range(count)])


def throughput(engine: str, jobs: int) -> dict[str, float]:
    _client().flushdb()
    worker = _start(engine)
    try:
        _enqueue(engine, "noop", 20)  # warm: the worker is up and has imported the task module
        if _wait(DONE_KEY, 20, 60) is None:
            raise RuntimeError(f"{engine} worker did not start")
        started = time.monotonic()
        _enqueue(engine, "noop", jobs)
        finished = _wait(DONE_KEY, 20 + jobs, 600)
    finally:
        _stop(worker)
    assert finished is not None
    seconds = finished - started
    return {"jobs": jobs, "seconds": round(seconds, 2), "jobs_per_s": round(jobs / seconds, 1)}


def kill(engine: str, timeout_s: float) -> dict[str, object]:
    """SIGKILL the worker's process group mid-job; a second worker is already waiting."""
    _client().flushdb()
    first = _start(engine)
    second: subprocess.Popen | None = None
    try:
        time.sleep(3)  # the first worker is consuming before the job arrives, so it takes it
        _enqueue(engine, "slow", 1, 3.0)
        if _wait(ATTEMPTS_KEY, 1, 60) is None:
            raise RuntimeError(f"{engine}: the job never started")
        second = _start(engine)
        time.sleep(1)
        os.killpg(first.pid, signal.SIGKILL)
        killed = time.monotonic()
        first.wait()
        done = _wait(DONE_KEY, 1, timeout_s)
        time.sleep(2)  # would a second redelivery follow?
        attempts = int(_client().get(ATTEMPTS_KEY) or 0)
    finally:
        _stop(first, signal.SIGKILL)
        if second is not None:
            _stop(second)
    return {
        "rerun": done is not None,
        "seconds_to_done_after_kill": None if done is None else round(done - killed, 1),
        "attempts": attempts,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 jobs, 60 s per kill (about 2 minutes)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "queue_choice.json")
    args = parser.parse_args(argv)
    jobs, rerun_s = (200, 60.0) if args.quick else (2000, 150.0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    results: dict[str, object] = {
        "command": "python -m bench.queue_choice" + (" --quick" if args.quick else ""),
        "commit": commit.stdout.strip(),
        "date": time.strftime("%Y-%m-%dT%H:%M UTC", time.gmtime()),
        "redis": REDIS_URL,
        "quick": args.quick,
    }
    for engine in ("Worker", "SimpleWorker", "celery"):
        name = "celery-prefork-c1" if engine == "celery" else f"rq-{engine}"
        results[f"throughput:{name}"] = throughput(engine, jobs)
        print(name, results[f"throughput:{name}"], flush=True)
    for engine in ("SimpleWorker", "celery"):
        name = "celery-prefork-c1" if engine == "celery" else f"rq-{engine}"
        results[f"kill:{name}"] = {**kill(engine, rerun_s), "waited_s": rerun_s}
        print(name, results[f"kill:{name}"], flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
