"""CPU per fully governed chat request, in-process, with a profile and a count of Redis round trips.

    python -m bench.request_cpu [--quick] [--requests 3000] [--redis-url redis://127.0.0.1:6379/12]

The gateway is built as `make run` builds it (APP_ENV=production, JSON logs, key cache on) on a
fresh SQLite database, with real Redis for the rate limiter, the key-cache revision and the token
quota, and the upstream simulator (bench/upstream_sim.py, 0 ms latency) on loopback as the model.
The process is gevent-patched first, as gunicorn's gevent worker is, so locks, the audit flusher
and Redis sockets behave as in production.

Each request goes through the WSGI callable exactly as a server calls it (environ in, body
iterated, `close()`): API key -> rate limit -> validate -> route -> policy -> quota reserve ->
upstream call -> respond -> settle, audit record, access log. Environs are built before the
clock starts, so what is measured is the application's cost, not the client's; HTTP parsing by
gunicorn is not included (about 0.1 ms on this machine).

Reported, for the measured pass:
- `cpu_per_request_ms`: `time.process_time()` over the whole pass divided by the requests. This
  counts every thread and greenlet of the process, so work moved off the request (the audit
  flusher, the usage ledger) still counts: moving cost is not cutting it.
- `in_request_cpu_ms`: p50 / p90 / p99 of each request's own window (call to `close()`).
- `refused_by_admission_gate`: the CPU of a request the worker gate answers with 503 (app/admission.py).
- `redis_round_trips_per_request`: socket writes to Redis (a pipeline or a script is one), and
  the commands sent, by name; counted on redis-py's Connection so the limiter's storage counts too.
A second pass runs under cProfile; its top 30 by cumulative and by own time go to
bench/results/request_cpu_profile.txt (or --profile-out). Results: bench/results/request_cpu.json.
`--quick` (300 requests, 300 profiled) takes well under a minute.
"""

from __future__ import annotations

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MODEL = "upstream-chat"
BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me about the weather in Lisbon in spring, briefly."},
        ],
        "max_tokens": 16,
    }
).encode()
HIGH_LIMIT = "100000000/minute"


class RedisTally:
    """Round trips and commands sent through every redis-py connection while installed."""

    def __init__(self) -> None:
        self.round_trips = 0
        self.commands: Counter[str] = Counter()

    @contextmanager
    def installed(self) -> Iterator[RedisTally]:
        from redis.connection import AbstractConnection

        send, single, several = (
            AbstractConnection.send_packed_command,
            AbstractConnection.send_command,
            AbstractConnection.pack_commands,
        )

        def name(args: tuple[Any, ...]) -> str:
            first = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
            return first.upper()

        def counted_send(conn: Any, command: Any, check_health: bool = True) -> None:
            self.round_trips += 1
            return send(conn, command, check_health)

        def counted_single(conn: Any, *args: Any, **kwargs: Any) -> None:
            self.commands[name(args)] += 1
            return single(conn, *args, **kwargs)

        def counted_several(conn: Any, commands: Any) -> list[bytes]:
            commands = list(commands)
            self.commands.update(name(tuple(c)) for c in commands)
            return several(conn, commands)

        AbstractConnection.send_packed_command = counted_send  # type: ignore[method-assign]
        AbstractConnection.send_command = counted_single  # type: ignore[method-assign]
        AbstractConnection.pack_commands = counted_several  # type: ignore[method-assign]
        try:
            yield self
        finally:
            AbstractConnection.send_packed_command = send  # type: ignore[method-assign]
            AbstractConnection.send_command = single  # type: ignore[method-assign]
            AbstractConnection.pack_commands = several  # type: ignore[method-assign]


def build_gateway(workdir: Path, redis_url: str, upstream: str) -> tuple[Any, str]:
    """The app, migrated, with a tenant (rate limits and a token quota) and one API key for it."""
    models = workdir / "models.yaml"
    models.write_text(
        "models:\n"
        f"  - name: {MODEL}\n    version: '1'\n    backend: openai_compatible\n"
        f"    params:\n      base_url: {upstream}\n      model: sim-model\n"
    )
    env = {
        "APP_ENV": "production",
        "SECRET_KEY": "bench-request-cpu-secret-" + "x" * 32,
        "JWT_SECRET_KEY": "bench-request-cpu-jwt-" + "x" * 32,
        "DATABASE_URL": f"sqlite:///{workdir / 'gateway.db'}",
        "REDIS_URL": redis_url,
        "MODELS_CONFIG": str(models),
        "MODELS_DIR": str(workdir / "models"),
        "MODELS_LOAD": "eager",
        "INSTANCE_PATH": str(workdir / "instance"),
        "LOG_FORMAT": "json",
        "DRIFT_INTERVAL": "0",
    }
    os.environ.update(env)
    from flask_migrate import upgrade

    from app import create_app
    from app.identity import accounts, apikeys
    from app.identity import scopes as sc

    migrator = create_app()  # the catalogue reads the registry at creation: migrate first
    with migrator.app_context():
        upgrade()
    app = create_app()
    with app.app_context():
        app.extensions["models"].sync(force=True)
        tenant = accounts.create_tenant(
            f"bench-{os.getpid()}-{int(time.time())}",
            rate_limit=HIGH_LIMIT,
            key_rate_limit=HIGH_LIMIT,
            token_quota=10**12,
        )
        _, key = apikeys.issue_key(tenant, "request-cpu", [sc.INFERENCE_INVOKE])
    return app, key


def environ(key: str) -> dict[str, Any]:
    from werkzeug.test import EnvironBuilder

    builder = EnvironBuilder(
        path="/v1/chat/completions",
        method="POST",
        data=BODY,
        content_type="application/json",
        headers={"Authorization": f"Bearer {key}"},
        environ_base={"REMOTE_ADDR": "127.0.0.1"},
    )
    try:
        return builder.get_environ()
    finally:
        builder.close()


def call(app: Any, env: dict[str, Any]) -> int:
    """One request as a WSGI server makes it; returns the status code."""
    status: list[str] = []

    def start_response(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
        status.append(line)
        return lambda data: None

    body = app(env, start_response)
    try:
        for _ in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return int(status[0].split()[0])


def measure(app: Any, key: str, count: int) -> dict[str, Any]:
    environs = [environ(key) for _ in range(count)]
    windows: list[float] = []
    failures: Counter[int] = Counter()
    tally = RedisTally()
    with tally.installed():
        started_cpu, started_wall = time.process_time(), time.perf_counter()
        for env in environs:
            before = time.process_time()
            code = call(app, env)
            windows.append(time.process_time() - before)
            if code != 200:
                failures[code] += 1
        settle_background(app)
        cpu, wall = time.process_time() - started_cpu, time.perf_counter() - started_wall
    windows.sort()
    ms = [w * 1000 for w in windows]
    return {
        "requests": count,
        "failures": dict(failures),
        "cpu_per_request_ms": round(cpu * 1000 / count, 3),
        "in_request_cpu_ms": {
            "p50": round(statistics.median(ms), 3),
            "p90": round(ms[int(0.9 * (count - 1))], 3),
            "p99": round(ms[int(0.99 * (count - 1))], 3),
            "mean": round(statistics.fmean(ms), 3),
        },
        "wall_per_request_ms": round(wall * 1000 / count, 3),
        "redis_round_trips_per_request": round(tally.round_trips / count, 3),
        "redis_commands_per_request": {name: round(n / count, 3) for name, n in tally.commands.most_common()},
    }


def measure_refusals(app: Any, key: str, count: int) -> dict[str, Any]:
    """CPU of a request the worker gate refuses (503 server_overloaded): the gate is filled by
    hand, so every request below meets it full."""
    gate = app.extensions["admission_gate"]
    environs = [environ(key) for _ in range(count)]
    saved_pending = gate.max_pending
    gate.max_pending = 0
    for _ in range(gate.max_in_flight):
        gate.enter()
    try:
        started = time.process_time()
        codes = Counter(call(app, env) for env in environs)
        cpu = time.process_time() - started
    finally:
        for _ in range(gate.max_in_flight):
            gate.leave()
        gate.max_pending = saved_pending
    return {"requests": count, "statuses": dict(codes), "cpu_per_request_ms": round(cpu * 1000 / count, 4)}


def settle_background(app: Any) -> None:
    """Let the audit flusher and usage ledger write what this pass produced, inside the clock."""
    import gevent

    audit = app.extensions.get("audit")
    if audit is not None:
        audit.flush()
    app.extensions["usage_ledger"].flush()
    gevent.sleep(0)


def profile(app: Any, key: str, count: int) -> str:
    environs = [environ(key) for _ in range(count)]
    # CPU time, not wall time: on a shared machine a socket write that wakes Redis can lose the
    # core for a while, and a wall-clock profile would blame the write for someone else's work.
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    for env in environs:
        call(app, env)
    settle_background(app)
    profiler.disable()
    out = io.StringIO()
    out.write(f"cProfile (CPU time) of {count} governed chat requests, bench/request_cpu.py\n\n")
    for order in ("cumulative", "tottime"):
        out.write(f"=== top 30 by {order} ===\n")
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(order).print_stats(30)
    return out.getvalue()


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 requests, 300 profiled")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--profile-requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/12"),
        help="a Redis database this run may write to (keys are namespaced by a fresh tenant)",
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "request_cpu.json")
    parser.add_argument("--profile-out", type=Path, default=RESULTS / "request_cpu_profile.txt")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.profile_requests, args.warmup = 300, 300, 50

    from bench.upstream_sim import run_simulator

    with tempfile.TemporaryDirectory(prefix="gw-request-cpu-") as tmp, run_simulator(latency_ms=0) as sim:
        workdir = Path(tmp)
        log_path = workdir / "gateway.log"
        # The JSON log lines are written, as in production, to a file rather than the terminal.
        with open(log_path, "w") as log, contextlib.redirect_stderr(log):
            app, key = build_gateway(workdir, args.redis_url, sim.base_url)
            for _ in range(args.warmup):
                code = call(app, environ(key))
                if code != 200:
                    raise SystemExit(f"warm-up request failed with {code}; see {log_path}")
            result = measure(app, key, args.requests)
            if "admission_gate" in app.extensions:  # not on commits before the gate existed
                result["refused_by_admission_gate"] = measure_refusals(app, key, args.requests)
            profile_text = profile(app, key, args.profile_requests)
            app.extensions["audit"].close()
    result = {
        "command": "python -m bench.request_cpu" + (" --quick" if args.quick else ""),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "python": sys.version.split()[0],
        **result,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    args.profile_out.write_text(profile_text)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
