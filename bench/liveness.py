"""Liveness under cheap load: does /healthz stay fast while a worker is busy with cheap routes?

    python -m bench.liveness [--clients 200] [--requests 2000] [--workers 1]

A closed loop of ``--clients`` concurrent clients sends ``--requests`` GET /v1/models (auth, Redis
rate limit, registry read, JSON) to a gunicorn+gevent gateway on 127.0.0.1 (default catalogue,
loaded before the run, SQLite, Redis), while a separate process probes /healthz every 20 ms on
a connection of its own. A healthz latency of seconds means something on the cheap path blocks
the worker's hub, or queues every greenlet behind one; the target is p99 <= 50 ms.

The gateway is pinned to core 0 and the load generator and prober to core 1 (on two cores or
more). The prober is a process of its own so the load generator's event loop cannot delay it.
Bounded: 2,000 requests take seconds; the whole run, model loading included, about a minute.
Writes bench/results/liveness.json and prints throughput and healthz p50/p99.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.inference_bench import free_port, prepare_database
from bench.loadgen import Target, run_load, summarize
from bench.procs import HARNESS_CORE, SERVER_CORE, Server, run_checked

ROOT = Path(__file__).resolve().parent.parent
PROBE_INTERVAL_S = 0.02
PROBE_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 180.0


def probe(port: int, stop: Any, results: Any) -> None:
    """GET /healthz every PROBE_INTERVAL_S until `stop` is set; sends back each latency (s)."""
    latencies: list[float] = []
    failures = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT_S)
    while not stop.is_set():
        started = time.perf_counter()
        try:
            conn.request("GET", "/healthz")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failures += 1
            else:
                latencies.append(time.perf_counter() - started)
        except (OSError, http.client.HTTPException):
            failures += 1
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT_S)
        time.sleep(max(0.0, PROBE_INTERVAL_S - (time.perf_counter() - started)))
    conn.close()
    results.put({"latencies": latencies, "failures": failures})


def gateway(workdir: Path, db_url: str, workers: int) -> tuple[Server, int]:
    port = free_port()
    env = {
        **os.environ,
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": str(workers),
        "DATABASE_URL": db_url,
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7"),
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / f"prom-{port}"),
        "INSTANCE_PATH": str(workdir / "instance"),
        "MODELS_DIR": str(workdir / "models"),
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    # The default catalogue, as `make run` serves it: the sklearn model is trained first.
    run_checked(
        [sys.executable, "-m", "flask", "--app", "wsgi", "models", "build-defaults", "--if-missing"],
        env,
        ROOT,
    )
    cores = (SERVER_CORE,) if (os.cpu_count() or 1) >= 2 else None
    argv = [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")]
    server = Server("gateway", argv, env, workdir / "gateway.log", ROOT, cores).start()
    server.wait_ready(f"http://127.0.0.1:{port}/readyz", READY_TIMEOUT_S)
    return server, port


def measure(port: int, key: str, clients: int, requests: int) -> dict[str, Any]:
    target = Target.get(
        f"http://127.0.0.1:{port}/v1/models",
        headers={"Authorization": f"Bearer {key}"},
        valid=lambda body: body.get("object") == "list" and bool(body.get("data")),
    )
    context = multiprocessing.get_context("spawn")
    stop, results = context.Event(), context.Queue()
    prober = context.Process(target=probe, args=(port, stop, results), daemon=True)
    prober.start()
    time.sleep(0.5)  # the prober's first probes measure an idle worker: the baseline
    try:
        load = asyncio.run(
            run_load(target, mode="closed", clients=clients, count=requests, duration_s=600, timeout_s=60)
        )
    finally:
        stop.set()
    probed = results.get(timeout=PROBE_TIMEOUT_S + 5)
    prober.join(10)
    healthz = summarize(probed["latencies"])
    return {
        "throughput_rps": load["throughput_rps"],
        "models_latency_ms": load["latency_ms"],
        "models_ok": load["ok"],
        "models_errors": load["errors"],
        "elapsed_s": load["elapsed_s"],
        "healthz_latency_ms": healthz,
        "healthz_failures": probed["failures"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--workers", type=int, choices=(1, 2), default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "liveness.json")
    args = parser.parse_args()
    if (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {HARNESS_CORE})
    workdir = Path(tempfile.mkdtemp(prefix="gw-liveness-"))
    db_url, key = prepare_database(workdir)
    server, port = gateway(workdir, db_url, args.workers)
    try:
        result = measure(port, key, args.clients, args.requests)
    finally:
        server.stop()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    report = {
        "command": f"python -m bench.liveness --clients {args.clients} --requests {args.requests} "
        f"--workers {args.workers}",
        "commit": commit.stdout.strip(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "layout": "gateway on core 0; load generator and /healthz prober on core 1; Redis/SQLite shared",
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    healthz = result["healthz_latency_ms"]
    print(
        f"GET /v1/models: {result['throughput_rps']} req/s, p99 {result['models_latency_ms']['p99']} ms, "
        f"errors {result['models_errors']}; /healthz: {healthz['count']} probes, "
        f"p50 {healthz['p50']} ms, p99 {healthz['p99']} ms, max {healthz['max']} ms"
    )


if __name__ == "__main__":
    main()
