"""What the audit trail costs per request, and the database write rate it sustains.

    python -m bench.audit_bench [--rates 50,500] [--seconds 8] [--rounds 2]

1. Latency with and without the audit trail: a 1-worker gunicorn+gevent gateway over PostgreSQL and
   Redis, in front of the upstream simulator (50 ms), is loaded open-loop at each fixed rate with
   OpenAI chat completions (bench.loadgen: latency runs from each request's intended send time, so
   queueing shows). Servers alternate off, on, off, on... (`--rounds` pairs), each fresh and loaded
   at the rates in increasing order, the highest in the first round only. The only difference
   between off and on is `app:create_app({"AUDIT_ENABLED": ...})`; figures are medians over rounds.
   500 req/s is the issue's figure, but one worker on one core saturates well below it (the whole
   request path, audit or not), so 50 req/s, about half of what it sustains, is measured too: there
   the audit's own cost is not buried in queueing. The gateway's CPU per request, on minus off, is
   the cost whatever the rate. With the trail on, each run counts its records against its requests.
2. The write rate the writer sustains: `AuditWriter.write` appending batches of AUDIT_BATCH_SIZE
   (500) records straight to PostgreSQL, one writer, then two writers appending to the same chain
   at once (they serialise on its head; the figure shows what that contention costs).

The load generator and the simulator are pinned to one core, the gateway to the other (when
there are two); PostgreSQL and Redis are shared and unpinned. Needs BENCH_POSTGRES_URL (admin URL,
default postgres@127.0.0.1/postgres) and BENCH_REDIS_URL (default db 7). Loopback only, under
2 minutes with the defaults. Writes bench/results/audit.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench import procs
from bench.loadgen import Target, run_load
from bench.run import DEFAULT_POSTGRES_URL, DEFAULT_REDIS_URL, tree_fingerprint
from bench.upstream_sim import run_simulator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
UPSTREAM_LATENCY_MS = 50
CATALOGUE = """models:
  - name: upstream-chat
    backend: openai_compatible
    params:
      base_url: {base_url}
      model: sim-model
      pool_size: 200
    limits:
      max_queue: 0
"""
QUANTILES = ("p50", "p95", "p99", "max")
TIMEOUT_S = 5.0  # a request unanswered after this counts as a timeout (saturated runs)
MESSAGES = [{"role": "user", "content": "Say hello to the benchmark in a few words."}]


def _run(argv: list[str], env: dict[str, str]) -> str:
    return procs.run_checked(argv, env, ROOT, timeout_s=120)


def create_database(admin_url: str) -> str:
    import psycopg

    name = f"gw_audit_bench_{os.getpid()}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))


def drop_database(admin_url: str, url: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path.lstrip("/")}" WITH (FORCE)')


def prepare(url: str, env: dict[str, str]) -> str:
    """Migrate and make a tenant and key in a subprocess, as an operator would; returns the key."""
    code = (
        "from flask_migrate import upgrade\n"
        "from app import create_app\n"
        "from app.identity.accounts import create_tenant\n"
        "from app.identity.apikeys import issue_key\n"
        "app = create_app()\n"
        "with app.app_context():\n"
        "    upgrade()\n"
        "    tenant = create_tenant('bench', rate_limit='1000000/minute')\n"
        "    print(issue_key(tenant, 'bench', ['inference:invoke'])[1])\n"
    )
    return _run([sys.executable, "-c", code], {**env, "DATABASE_URL": url}).strip().splitlines()[-1]


def gateway(
    workdir: Path, env: dict[str, str], audit: bool, cores: tuple[int, ...] | None
) -> tuple[procs.Server, str]:
    """A 1-worker gateway with the trail on or off: the app factory's config is the only difference."""
    port = procs.free_port()
    uri = f'app:create_app({{"AUDIT_ENABLED": {audit}}})'
    server = procs.Server(
        name=f"gateway-audit-{'on' if audit else 'off'}",
        argv=[sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", uri],
        env={
            **env,
            "BIND": f"127.0.0.1:{port}",
            "WEB_CONCURRENCY": "1",
            "PROMETHEUS_MULTIPROC_DIR": str(workdir / f"prom-{port}"),
        },
        log_path=workdir / f"gunicorn-{port}.log",
        cwd=ROOT,
        cores=cores,
    ).start()
    url = f"http://127.0.0.1:{port}"
    server.wait_ready(url + "/readyz", 60)
    return server, url


def audit_count(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM audit_records WHERE kind = 'inference'").fetchone()[0]


def load_run(
    target: Target, rate: float, seconds: float, server: procs.Server, services: dict[str, int]
) -> dict[str, Any]:
    roles = {
        "gateway": lambda: procs.cpu_seconds([server.pid]),
        "load_generator_and_simulator": procs.own_cpu_seconds,
        **{name: (lambda pid=pid: procs.cpu_seconds([pid])) for name, pid in services.items()},
    }
    with procs.CpuMeter(roles) as meter:
        result = asyncio.run(run_load(target, rate=rate, duration_s=seconds, timeout_s=TIMEOUT_S))
    return {
        "sent": result["sent"],
        "ok": result["ok"],
        "errors": result["errors"],
        "latency_ms": result["latency_ms"],
        "send_lag_ms_p99": result["send_lag_ms"]["p99"],
        "cpu": meter.report(),
    }


def write_rate(url: str, writers: int, records_each: int) -> dict[str, Any]:
    """Records/s that `writers` AuditWriters sustain appending batches to one chain at once.

    In this process (not gevent-patched): one thread per writer, psycopg releasing the GIL on I/O.
    """
    from app import create_app
    from app.governance.audit.records import Pending
    from app.identity.models import utcnow
    from config import engine_options, normalise_database_url

    database = normalise_database_url("DATABASE_URL", url)
    app = create_app(
        {
            "SQLALCHEMY_DATABASE_URI": database,
            "SQLALCHEMY_ENGINE_OPTIONS": engine_options(database, writers, writers + 2),
            "MODELS_CONFIG": "",
            "INSTANCE_PATH": tempfile.mkdtemp(prefix="gw-audit-bench-app-"),
        }
    )
    writer = app.extensions["audit"]

    def records(n: int) -> list[Pending]:
        return [
            Pending(
                kind="inference",
                ts=utcnow(),
                request_id=uuid.uuid4().hex,
                tenant_id="bench-write-rate",
                principal="key:bench",
                endpoint="/v1/chat/completions",
                method="POST",
                action=None,
                status=200,
                latency_ms=12.5,
                noted={"model": "m", "model_version": "1", "tokens_in": 9, "tokens_out": 8},
                details={},
                view_args={},
                request_body=json.dumps({"model": "m", "messages": MESSAGES}).encode(),
                response_body=b'{"choices":[{"message":{"content":"hello"}}]}',
            )
            for _ in range(n)
        ]

    def append(rows: list[Pending]) -> None:
        for start in range(0, len(rows), writer.batch_size):
            writer.write(rows[start : start + writer.batch_size], replay=False)

    sample = records(2000)
    building = time.perf_counter()
    for record in sample:
        record.row()  # canonical JSON and SHA-256 of the request and response bodies
    build_us = (time.perf_counter() - building) / len(sample) * 1e6
    work = [records(records_each) for _ in range(writers)]
    threads = [threading.Thread(target=append, args=(rows,)) for rows in work]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    with app.app_context():
        from app.extensions import db

        db.engine.dispose()
    return {
        "writers": writers,
        "records": writers * records_each,
        "batch_size": writer.batch_size,
        "seconds": round(elapsed, 3),
        "records_per_s": round(writers * records_each / elapsed),
        "row_build_us_per_record": round(build_us, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--rates", default="50,500", help="comma list of open-loop rates (requests per second)"
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=2, help="off/on server pairs")
    args = parser.parse_args(argv)
    rates = [float(r) for r in args.rates.split(",")]

    admin_url = os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    redis_url = os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    layout = procs.pin_harness()
    workdir = Path(tempfile.mkdtemp(prefix="gw-audit-bench-"))
    url = create_database(admin_url)
    started = datetime.now(UTC)
    try:
        with run_simulator(latency_ms=UPSTREAM_LATENCY_MS) as sim:
            catalogue = workdir / "models.yaml"
            catalogue.write_text(CATALOGUE.format(base_url=sim.base_url))
            env = {
                **os.environ,
                "APP_ENV": "production",
                "SECRET_KEY": uuid.uuid4().hex * 2,
                "JWT_SECRET_KEY": uuid.uuid4().hex * 2,
                "DATABASE_URL": url,
                "REDIS_URL": redis_url,
                "MODELS_CONFIG": str(catalogue),
                "INSTANCE_PATH": str(workdir / "instance"),
                "LOG_LEVEL": "WARNING",
            }
            key = prepare(url, env)
            services = procs.service_roots()
            runs: dict[float, dict[str, list[dict[str, Any]]]] = {r: {"off": [], "on": []} for r in rates}
            for round_ in range(args.rounds):
                # The highest rate (500: saturating) runs in the first round only; rounds are for
                # the lower rates, where the audit's own cost is small and noise is not.
                loads = sorted(rates) if round_ == 0 else sorted(rates)[:-1] or sorted(rates)
                for mode in ("off", "on"):
                    audit = mode == "on"
                    measured = measure(workdir, env, url, key, loads, args.seconds, audit, layout, services)
                    for rate, run in measured.items():
                        runs[rate][mode].append(run)
            by_rate = {f"{rate:g}": summarise(runs[rate]) for rate in sorted(rates)}
        single = write_rate(url, writers=1, records_each=10_000)
        contended = write_rate(url, writers=2, records_each=5_000)
    finally:
        drop_database(admin_url, url)

    result = {
        "command": "python -m bench.audit_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": started.isoformat(timespec="seconds"),
        "git_commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip(),
        "uncommitted_changes": tree_fingerprint(),
        "layout": layout.describe(),
        "seconds_per_run": args.seconds,
        "upstream_latency_ms": UPSTREAM_LATENCY_MS,
        "rates": by_rate,
        "write_rate": {"one_writer": single, "two_writers_one_chain": contended},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "audit.json").write_text(json.dumps(result, indent=2) + "\n")
    print(_table(result))


def measure(
    workdir: Path,
    env: dict[str, str],
    url: str,
    key: str,
    rates: list[float],
    seconds: float,
    audit: bool,
    layout: procs.Layout,
    services: dict[str, int],
) -> dict[float, dict[str, Any]]:
    """One fresh server, loaded at each rate in increasing order (a saturating rate last).

    With the trail on, each run also counts its records: the last run's after the server's
    graceful stop, which flushes whatever is still buffered or in flight.
    """
    server, base = gateway(workdir, env, audit, layout.server_cores)
    target = Target.chat(base, "upstream-chat", headers={"Authorization": f"Bearer {key}"}, messages=MESSAGES)
    runs: dict[float, dict[str, Any]] = {}
    try:
        asyncio.run(run_load(target, rate=50, duration_s=1, timeout_s=TIMEOUT_S))  # warm-up
        for rate in sorted(rates):
            time.sleep(1)  # the previous load's records are flushed before counting
            before = audit_count(url)
            runs[rate] = load_run(target, rate, seconds, server, services)
            if rate != max(rates):
                time.sleep(1)
                runs[rate]["audit_records"] = audit_count(url) - before
    finally:
        server.stop()
    runs[max(rates)]["audit_records"] = audit_count(url) - before
    for rate, run in runs.items():
        if not audit:
            run.pop("audit_records")
        run["gateway_cpu_ms_per_request"] = round(
            run["cpu"]["cpu_seconds"]["gateway"] * 1000 / run["sent"], 3
        )
        latency = run["latency_ms"]
        print(
            f"{rate:g} req/s, audit {'on' if audit else 'off'}: ok {run['ok']}/{run['sent']}, "
            f"p50 {latency['p50']} ms, p99 {latency['p99']} ms",
            flush=True,
        )
    return runs


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians over rounds; the cost is on minus off."""
    median = {
        mode: {
            **{q: round(statistics.median(r["latency_ms"][q] for r in runs[mode]), 2) for q in QUANTILES},
            "ok": sum(r["ok"] for r in runs[mode]),
            "sent": sum(r["sent"] for r in runs[mode]),
            "cpu_ms_per_request": round(
                statistics.median(r["gateway_cpu_ms_per_request"] for r in runs[mode]), 3
            ),
        }
        for mode in runs
    }
    cost = {q: round(median["on"][q] - median["off"][q], 2) for q in QUANTILES}
    cost["cpu_ms_per_request"] = round(
        median["on"]["cpu_ms_per_request"] - median["off"]["cpu_ms_per_request"], 3
    )
    records = sum(r.get("audit_records", 0) for r in runs["on"])
    return {"off": median["off"], "on": median["on"], "cost": cost, "audit_records": records, "runs": runs}


def _table(result: dict[str, Any]) -> str:
    writes = result["write_rate"]
    lines = [
        f"Audit trail cost, open loop, {result['upstream_latency_ms']} ms upstream, one gevent worker on "
        f"core {result['layout']['system_under_test']}; {result['date']}, commit {result['git_commit']} "
        f"(+{result['uncommitted_changes']})",
        "",
        "| rate | audit | ok / sent | p50 ms | p95 ms | p99 ms | gateway CPU ms/request |",
        "|---|---|---|---|---|---|---|",
    ]
    for rate, row in result["rates"].items():
        for mode in ("off", "on", "cost"):
            figures = row[mode]
            answered = f"{figures['ok']} / {figures['sent']}" if mode != "cost" else ""
            lines.append(
                f"| {rate} | {mode} | {answered} | {figures['p50']} | {figures['p95']} | {figures['p99']} "
                f"| {figures['cpu_ms_per_request']} |"
            )
        lines.append(
            f"| {rate} | records | {row['audit_records']} written for {row['on']['sent']} sent | | | | |"
        )
    lines += [
        "",
        f"Write rate (batches of {writes['one_writer']['batch_size']}, PostgreSQL): one writer "
        f"{writes['one_writer']['records_per_s']} records/s; two writers on one chain "
        f"{writes['two_writers_one_chain']['records_per_s']} records/s. Building one record (hashing "
        f"its request and response) takes {writes['one_writer']['row_build_us_per_record']} us of CPU.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
