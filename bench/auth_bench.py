"""Added latency of authentication + rate limiting per request, at a fixed 500 req/s on one worker.

    python -m bench.auth_bench [--rate 500] [--seconds 8]

Runs an open-loop load (latency from the intended send time) against ``/bench/open`` and
``/bench/guarded`` of ``bench.auth_app`` on one gevent worker pinned to core 0 (the load generator
on core 1), with the verified-key cache on (AUTH_KEY_CACHE_TTL=30) and off (0), and writes
bench/results/auth.json. Added latency = guarded minus open, per percentile, in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import requests

from bench.inference_bench import free_port, prepare_database
from bench.loadgen import Target, run_load

ROOT = Path(__file__).resolve().parent.parent


def start(workdir: Path, db_url: str, cache_ttl: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "1",
        "DATABASE_URL": db_url,
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7"),
        "AUTH_KEY_CACHE_TTL": cache_ttl,
        "MODELS_CONFIG": "",
        "PROMETHEUS_MULTIPROC_DIR": str(workdir / f"prom-{port}"),
        "LOG_LEVEL": "WARNING",
        "AUDIT_ENABLED": "false",
    }
    proc = subprocess.Popen(
        [
            "taskset",
            "-c",
            "0",
            sys.executable,
            "-m",
            "gunicorn",
            "-c",
            "gunicorn.conf.py",
            "bench.auth_app:app",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("gateway did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(45)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=8)
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    workdir = Path(tempfile.mkdtemp(prefix="gw-auth-bench-"))
    db_url, key = prepare_database(workdir)
    results: dict[str, object] = {
        "command": f"python -m bench.auth_bench --rate {args.rate:g} --seconds {args.seconds:g}",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "layout": "gateway (1 gevent worker) on core 0; load generator on core 1; Redis/SQLite shared",
    }
    for cache, ttl in (("cache_on", "30"), ("cache_off", "0")):
        proc, url = start(workdir, db_url, ttl)
        try:
            row: dict[str, object] = {}
            for route in ("open", "guarded"):
                target = Target.json(
                    f"{url}/bench/{route}",
                    {},
                    headers={"Authorization": f"Bearer {key}"},
                    valid=lambda body: body == {"ok": True},
                )
                asyncio.run(run_load(target, rate=args.rate, duration_s=2, timeout_s=10))  # warm-up
                row[route] = asyncio.run(
                    run_load(target, rate=args.rate, duration_s=args.seconds, timeout_s=10)
                )
            latency = {r: row[r]["latency_ms"] for r in ("open", "guarded")}  # type: ignore[index]
            row["added_ms"] = {  # None: every request of a run failed (the worker saturated)
                q: None
                if None in (latency["guarded"][q], latency["open"][q])
                else round(latency["guarded"][q] - latency["open"][q], 2)
                for q in ("p50", "p95", "p99")
            }
            results[cache] = row
        finally:
            stop(proc)
    out = ROOT / "bench" / "results" / "auth.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    for cache in ("cache_on", "cache_off"):
        row = results[cache]  # type: ignore[assignment]
        print(cache, "open", row["open"]["latency_ms"], row["open"].get("errors"))  # type: ignore[index]
        print(cache, "guarded", row["guarded"]["latency_ms"], row["guarded"].get("errors"))  # type: ignore[index]
        print(cache, "added", row["added_ms"])  # type: ignore[index]


if __name__ == "__main__":
    main()
