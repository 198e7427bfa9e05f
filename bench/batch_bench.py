"""Batch throughput: lines per second through 1 and 2 batch workers, against the upstream simulator.

    python -m bench.batch_bench --quick     # 200 lines per run, about a minute
    python -m bench.batch_bench             # 2,000 lines per run (in `make bench`)

One gunicorn+gevent gateway (1 worker) takes the upload and the batch; N workers
(`python -m app.inference.batches.worker`, one pool process each) run the lines, each line the
whole governed path (auth'd principal, policy, quota reserve and settle, routing, the upstream
call, audit, the exactly-once record). The upstream simulator answers each chat in
`--latency-ms` (default 20). Time is from the create call to the first poll that sees the batch
`completed`; CPU seconds are the workers' (all their processes), from psutil.

The database is PostgreSQL at BENCH_DATABASE_URL (a fresh `gw_batch_bench` database is made on
that server), else SQLite in a temporary folder; Redis is BENCH_REDIS_URL (default db 7, flushed).
Writes bench/results/batch.json and BATCH.md (and the companions section of REPORT.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import requests

from bench.inference_bench import SETUP_SCRIPT, free_port
from bench.procs import Server, cpu_seconds, run_checked
from bench.report import with_companions
from bench.upstream_sim import run_simulator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7")


def database(workdir: Path) -> str:
    base = os.environ.get("BENCH_DATABASE_URL")
    if not base:
        return f"sqlite:///{workdir / 'batch-bench.db'}"
    import psycopg

    parts = urlsplit(base)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute('DROP DATABASE IF EXISTS "gw_batch_bench" WITH (FORCE)')
        conn.execute('CREATE DATABASE "gw_batch_bench"')
    return urlunsplit(parts._replace(path="/gw_batch_bench"))


def git_commit() -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()


def one_run(
    env: dict[str, str], url: str, key: str, workdir: Path, workers: int, lines: int
) -> dict[str, Any]:
    client = redis.Redis.from_url(REDIS_URL)
    procs = [
        Server(
            f"worker-{n}",
            [sys.executable, "-m", "app.inference.batches.worker"],
            {**env, "PROMETHEUS_MULTIPROC_DIR": str(workdir / f"prom-w{workers}-{n}")},
            workdir / f"worker-{workers}-{n}.log",
            ROOT,
        ).start()
        for n in range(workers)
    ]
    try:
        deadline = time.monotonic() + 180
        while client.zcard("batches:workers") < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("workers did not start:\n" + "\n".join(p.log_tail() for p in procs))
            time.sleep(0.2)
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {key}"
        content = "".join(
            json.dumps(
                {
                    "custom_id": f"r{n}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": "sim-chat",
                        "messages": [{"role": "user", "content": f"q {n}"}],
                        "max_tokens": 8,
                    },
                }
            )
            + "\n"
            for n in range(lines)
        )
        uploaded = session.post(
            url + "/v1/files", files={"file": ("in.jsonl", content)}, data={"purpose": "batch"}
        )
        uploaded.raise_for_status()
        cpu_before = cpu_seconds([p.pid for p in procs])
        started = time.monotonic()
        body = {
            "input_file_id": uploaded.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        created = session.post(url + "/v1/batches", json=body)
        created.raise_for_status()
        batch_id = created.json()["id"]
        while (batch := session.get(f"{url}/v1/batches/{batch_id}").json())["status"] == "in_progress":
            time.sleep(0.05)
        seconds = time.monotonic() - started
        cpu = cpu_seconds([p.pid for p in procs]) - cpu_before
    finally:
        for proc in procs:
            proc.stop()
    counts = batch["request_counts"]
    return {
        "workers": workers,
        "lines": lines,
        "status": batch["status"],
        "completed": counts["completed"],
        "failed": counts["failed"],
        "seconds": round(seconds, 2),
        "lines_per_s": round(lines / seconds, 1),
        "worker_cpu_s": round(cpu, 1),
    }


def report(doc: dict[str, Any]) -> str:
    mode = "quick (200 lines per run)" if doc["quick"] else f"full ({doc['lines']} lines per run)"
    rows = [
        f"| {r['workers']} | {r['lines']} | {r['completed']} | {r['failed']} | {r['seconds']} | "
        f"{r['lines_per_s']} | {r['worker_cpu_s']} |"
        for r in doc["runs"]
    ]
    one, two = doc["runs"][0]["lines_per_s"], doc["runs"][-1]["lines_per_s"]
    return "\n".join(
        [
            "# Batch throughput",
            "",
            f"`{doc['command']}`, {mode}, on commit {doc['commit']} on {doc['date']}: one "
            "gunicorn+gevent gateway, N batch workers (one pool process each), upstream simulator at "
            f"{doc['latency_ms']:g} ms per chat, {doc['database']}, Redis on loopback; 2-core machine "
            "shared with other work.",
            "",
            "| workers | lines | completed | failed | seconds | lines/s | workers' CPU s |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"2 workers / 1 worker: {two / one:.2f}x. Each line is the whole governed path plus two",
            "transactions (claim, record) and the batch row lock, so a worker's rate is bounded by its own",
            "CPU and the database round trips, not by the upstream's latency alone.",
            "",
            *queue_choice(),
        ]
    )


def queue_choice() -> list[str]:
    """The RQ-or-Celery measurement (bench/queue_choice.py), when its results are there."""
    path = RESULTS / "queue_choice.json"
    if not path.exists():
        return []
    doc = json.loads(path.read_text())
    lines = [
        f"**RQ or Celery** (app/inference/batches/worker.py): `{doc['command']}` on commit {doc['commit']}"
        f" on {doc['date']} (Redis {doc['redis']}), one worker:",
        "",
        "| engine | trivial jobs | seconds | jobs/s | SIGKILLed mid-job: run again? | after (s) | attempts |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for name in ("rq-Worker", "rq-SimpleWorker", "celery-prefork-c1"):
        run = doc[f"throughput:{name}"]
        kill = doc.get(f"kill:{name}")
        killed = (
            "not measured (forks per job)"
            if kill is None
            else ("yes" if kill["rerun"] else f"no, within {kill['waited_s']:g} s")
        )
        after = (
            ""
            if not kill or kill["seconds_to_done_after_kill"] is None
            else kill["seconds_to_done_after_kill"]
        )
        attempts = "" if kill is None else kill["attempts"]
        cells = [name, run["jobs"], run["seconds"], run["jobs_per_s"], killed, after, attempts]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 lines per run")
    parser.add_argument("--lines", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    lines = 200 if args.quick else args.lines
    redis.Redis.from_url(REDIS_URL).flushdb()
    workdir = Path(tempfile.mkdtemp(prefix="gw-batch-bench-"))
    db_url = database(workdir)
    with run_simulator(latency_ms=args.latency_ms, tokens=8) as sim:
        (workdir / "models.yaml").write_text(
            "models:\n  - name: sim-chat\n    backend: openai_compatible\n    params:\n"
            f"      base_url: {sim.base_url}\n      model: sim-model\n"
            "    limits:\n      max_concurrency: 64\n"
        )
        env = {
            **os.environ,
            "APP_ENV": "development",
            "DATABASE_URL": db_url,
            "REDIS_URL": REDIS_URL,
            "MODELS_CONFIG": str(workdir / "models.yaml"),
            "MODELS_DIR": str(workdir / "models"),
            "INSTANCE_PATH": str(workdir / "instance"),
            "LOG_LEVEL": "WARNING",
            "HF_HUB_OFFLINE": "1",
        }
        key = run_checked([sys.executable, "-c", SETUP_SCRIPT], env, ROOT).strip().splitlines()[-1]
        port = free_port()
        gateway = Server(
            "gateway",
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
            {**env, "BIND": f"127.0.0.1:{port}", "PROMETHEUS_MULTIPROC_DIR": str(workdir / "prom-gw")},
            workdir / "gateway.log",
            ROOT,
        ).start()
        url = f"http://127.0.0.1:{port}"
        try:
            gateway.wait_ready(url + "/healthz", 180)
            runs = [one_run(env, url, key, workdir, workers, lines) for workers in (1, 2)]
        finally:
            gateway.stop()
    doc = {
        "command": "python -m bench.batch_bench" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "lines": lines,
        "latency_ms": args.latency_ms,
        "database": "PostgreSQL" if db_url.startswith("postgres") else "SQLite",
        "commit": git_commit(),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M UTC"),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "batch.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "BATCH.md").write_text(report(doc))
    with_companions(args.out)
    for run in runs:
        print(json.dumps(run))


if __name__ == "__main__":
    main()
