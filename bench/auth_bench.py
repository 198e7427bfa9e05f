"""Added latency of authentication + rate limiting per request, at a fixed 500 req/s on one worker;
and what a flood of bad secrets for one key prefix costs that worker.

    python -m bench.auth_bench [--rate 500] [--seconds 8]
    python -m bench.auth_bench --flood-only [--flood 10000] [--flood-rate 250] [--valid-rate 50]

Runs an open-loop load (latency from the intended send time) against ``/bench/open`` and
``/bench/guarded`` of ``bench.auth_app`` on one gevent worker pinned to core 0 (the load generator
on core 1), with the verified-key cache on (AUTH_KEY_CACHE_TTL=30) and off (0), and writes
bench/results/auth.json. Added latency = guarded minus open, per percentile, in the same run.

Each route is measured twice, in the order open, guarded, guarded, open, and each percentile is
the mean of its two runs, so neither route alone pays for whatever a fresh worker still does in
its first seconds. With the cache off every request verifies an argon2 hash (~20 ms of CPU, on
purpose), so one worker can't take 500 req/s; that case is also measured at ``--off-rate``.

The flood (``flood`` in auth.json): ``--flood`` requests carrying the bench key's real prefix with
a wrong secret, at ``--flood-rate`` from eight loopback addresses (127.0.0.2-9, so the per-prefix
throttle is exercised, not only the per-address one), while valid requests arrive at
``--valid-rate`` from 127.0.0.1, each load from a process of its own; the same valid load alone,
for as long, before and after, are the baselines. The flood's cost is the worker's extra CPU time
(utime+stime from /proc) over the first baseline run's, as a share of one core; every 401 the flood
got is one hash, every 429 none. The forged secret is the same on every request: nothing caches a
failure, so each costs what a random one would. ``valid_p99_delay_ms`` is the flooded run's valid
p99 minus the better baseline's.

The floor (``flood.floor``): the same flood, from the same load generator, at ``bench/floor_app.py``
(the same gunicorn gevent worker and gunicorn.conf.py, answering the same 429 body with no code of
ours), minus that worker's idle CPU: what one request costs this HTTP server before any
application runs. ``ratio_to_floor`` is ours per request over the floor's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
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


def empty_catalogue(workdir: Path) -> Path:
    path = workdir / "no-models.yaml"
    path.write_text("models: []\n")
    return path


def start(
    workdir: Path, db_url: str, cache_ttl: str, app: str = "bench.auth_app:app"
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": "1",
        "DATABASE_URL": db_url,
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7"),
        "AUTH_KEY_CACHE_TTL": cache_ttl,
        # No models: an empty MODELS_CONFIG means the default catalogue, whose background load
        # (llama.cpp, torch) would eat the worker's first seconds and every measurement in them.
        "MODELS_CONFIG": str(empty_catalogue(workdir)),
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
            app,
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


def measure(url: str, key: str, rate: float, seconds: float) -> dict[str, object]:
    """Both routes, twice each (open, guarded, guarded, open); percentiles are the two runs' mean."""
    runs: dict[str, list[dict]] = {"open": [], "guarded": []}
    for route in ("open", "guarded", "guarded", "open"):
        target = Target.json(
            f"{url}/bench/{route}",
            {},
            headers={"Authorization": f"Bearer {key}"},
            valid=lambda body: body == {"ok": True},
        )
        if not runs[route]:
            asyncio.run(run_load(target, rate=rate, duration_s=2, timeout_s=10))  # warm-up
        runs[route].append(asyncio.run(run_load(target, rate=rate, duration_s=seconds, timeout_s=10)))
    row: dict[str, object] = {"rate": rate}
    latency: dict[str, dict[str, float | None]] = {}
    for route, pair in runs.items():
        values = {q: [r["latency_ms"][q] for r in pair] for q in ("p50", "p95", "p99")}
        latency[route] = {q: None if None in v else round(sum(v) / len(v), 2) for q, v in values.items()}
        row[route] = {
            "latency_ms": latency[route],
            "ok": sum(r["ok"] for r in pair),
            "sent": sum(r["sent"] for r in pair),
            "errors": [r["errors"] for r in pair],
            "runs": pair,
        }
    row["added_ms"] = {  # None: every request of a run failed (the worker saturated)
        q: None
        if None in (latency["guarded"][q], latency["open"][q])
        else round(latency["guarded"][q] - latency["open"][q], 2)  # type: ignore[operator]
        for q in ("p50", "p95", "p99")
    }
    return row


FLOOD_SOURCES = [f"127.0.0.{n}" for n in range(2, 10)]


def worker_cpu_s(master: subprocess.Popen) -> float:
    """CPU seconds (user + system) used so far by the gateway's one worker."""
    # taskset execs gunicorn, so the Popen's pid is the master's.
    children = Path(f"/proc/{master.pid}/task/{master.pid}/children").read_text().split()
    fields = Path(f"/proc/{children[0]}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _flood_and_valid(valid, flood, valid_rate: float, flood_rate: float, count: int, seconds: float):
    """The valid load here, the flood from a forked process of its own, at the same time. In one event
    loop the flood's responses would queue ahead of the valid ones in the generator and show up as
    the server's delay; the attacker is another client, so it is another process."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def attack() -> None:
        load = run_load(
            flood, rate=flood_rate, count=count, duration_s=seconds, timeout_s=10, sources=FLOOD_SOURCES
        )
        results.put(asyncio.run(load))

    attacker = context.Process(target=attack, daemon=True)
    attacker.start()
    under_flood = asyncio.run(run_load(valid, rate=valid_rate, duration_s=seconds, timeout_s=10))
    flooded = results.get(timeout=seconds + 60)
    attacker.join(30)
    return under_flood, flooded


def flood_target(url: str, key: str) -> Target:
    prefix = key.split("_", 1)[0]
    return Target.json(
        f"{url}/bench/guarded",
        {},
        headers={"Authorization": f"Bearer {prefix}_{'A' * 43}"},
        valid=lambda b: False,
    )


def _valid_row(run: dict, rate: float, cpu_s: float | None = None) -> dict[str, object]:
    row: dict[str, object] = {
        "rate": rate,
        "latency_ms": run["latency_ms"],
        "errors": run["errors"],
        # The load generator's own lateness, part of latency_ms (it shares core 1 with Redis).
        "send_lag_ms": run["send_lag_ms"],
        # Per second of the run: whether a delay is spread or one burst (the flood's first hashes).
        "p99_by_second_ms": [second["p99"] for second in run["by_second"]],
    }
    if cpu_s is not None:
        row["worker_cpu_s"] = round(cpu_s, 3)
    return row


def measure_flood(
    proc: subprocess.Popen, url: str, key: str, count: int, flood_rate: float, valid_rate: float
) -> dict[str, object]:
    """Valid load alone, the same valid load under the flood, and valid load alone again, for the
    flood's duration each. The flood's CPU is the flooded run's over the first baseline's; its delay
    to valid requests' p99 is taken against the better of the two baselines, so that a noisy
    baseline (a shared machine, a young worker) can't hide one."""
    seconds = count / flood_rate
    valid = Target.json(
        f"{url}/bench/guarded",
        {},
        headers={"Authorization": f"Bearer {key}"},
        valid=lambda b: b == {"ok": True},
    )
    flood = flood_target(url, key)
    asyncio.run(run_load(valid, rate=valid_rate, duration_s=2, timeout_s=10))  # warm-up
    cpu = worker_cpu_s(proc)
    baseline = asyncio.run(run_load(valid, rate=valid_rate, duration_s=seconds, timeout_s=10))
    baseline_cpu = worker_cpu_s(proc) - cpu
    cpu = worker_cpu_s(proc)
    under_flood, flooded = _flood_and_valid(valid, flood, valid_rate, flood_rate, count, seconds)
    flood_cpu = worker_cpu_s(proc) - cpu - baseline_cpu
    cpu = worker_cpu_s(proc)
    after = asyncio.run(run_load(valid, rate=valid_rate, duration_s=seconds, timeout_s=10))
    after_cpu = worker_cpu_s(proc) - cpu
    errors = flooded["errors"]
    p99 = under_flood["latency_ms"]["p99"]
    delays = [round(p99 - run["latency_ms"]["p99"], 2) for run in (baseline, after)]
    return {
        "flood": {
            "requests": flooded["sent"],
            "rate": flood_rate,
            "seconds": round(seconds, 1),
            "source_addresses": FLOOD_SOURCES,
            "answers": errors,
            "hashes_computed": errors.get("http_401", 0),
            "refused_unhashed": errors.get("http_429", 0),
            "answer_latency_ms": flooded["http_error_latency_ms"],
            "extra_worker_cpu_s": round(flood_cpu, 3),
            "share_of_one_core": round(flood_cpu / seconds, 4),
            "cpu_ms_per_flood_request": round(1000 * flood_cpu / max(1, flooded["sent"]), 3),
        },
        "valid_alone": _valid_row(baseline, valid_rate, baseline_cpu),
        "valid_under_flood": _valid_row(under_flood, valid_rate),
        "valid_alone_after": _valid_row(after, valid_rate, after_cpu),
        "valid_p99_delay_ms": max(delays),
        "valid_p99_delay_vs_each_baseline_ms": delays,
    }


def measure_floor(
    proc: subprocess.Popen, url: str, key: str, count: int, flood_rate: float
) -> dict[str, object]:
    """The same flood at the floor app (bench/floor_app.py: gunicorn's gevent worker with the
    gateway's gunicorn.conf.py, answering the same 429 without any of our code): what a request
    costs this server before the application does anything. The worker's idle CPU over as long
    (measured, ~0) is subtracted, as the valid baseline is from ours."""
    seconds = count / flood_rate
    flood = flood_target(url, key)
    asyncio.run(run_load(flood, rate=flood_rate, duration_s=2, timeout_s=10, sources=FLOOD_SOURCES))
    idle_s = min(10.0, seconds)
    cpu = worker_cpu_s(proc)
    time.sleep(idle_s)
    idle_cpu = (worker_cpu_s(proc) - cpu) * seconds / idle_s
    cpu = worker_cpu_s(proc)
    flooded = asyncio.run(
        run_load(flood, rate=flood_rate, count=count, duration_s=seconds, timeout_s=10, sources=FLOOD_SOURCES)
    )
    flood_cpu = worker_cpu_s(proc) - cpu - idle_cpu
    return {
        "app": "bench.floor_app:app",
        "requests": flooded["sent"],
        "rate": flood_rate,
        "seconds": round(seconds, 1),
        "answers": flooded["errors"],
        "answer_latency_ms": flooded["http_error_latency_ms"],
        "idle_worker_cpu_s": round(idle_cpu, 3),
        "extra_worker_cpu_s": round(flood_cpu, 3),
        "share_of_one_core": round(flood_cpu / seconds, 4),
        "cpu_ms_per_flood_request": round(1000 * flood_cpu / max(1, flooded["sent"]), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--off-rate", type=float, default=20, help="also measure cache-off at this rate")
    parser.add_argument("--flood", type=int, default=10_000, help="bad-secret requests in the flood")
    parser.add_argument("--flood-rate", type=float, default=250)
    parser.add_argument("--valid-rate", type=float, default=50, help="valid requests/s during the flood")
    parser.add_argument("--flood-only", action="store_true", help="only the flood; keep the other results")
    args = parser.parse_args()
    os.sched_setaffinity(0, {1})
    workdir = Path(tempfile.mkdtemp(prefix="gw-auth-bench-"))
    db_url, key = prepare_database(workdir)
    results: dict[str, object] = {
        "command": f"python -m bench.auth_bench --rate {args.rate:g} --seconds {args.seconds:g} "
        f"--off-rate {args.off_rate:g}",
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "layout": "gateway (1 gevent worker) on core 0; load generator on core 1; Redis/SQLite shared",
    }
    out = ROOT / "bench" / "results" / "auth.json"
    cases = (
        ("cache_on", "30", args.rate),
        ("cache_off", "0", args.rate),
        ("cache_off_low_rate", "0", args.off_rate),
    )
    flood_command = (
        f"python -m bench.auth_bench --flood-only --flood {args.flood} --flood-rate {args.flood_rate:g} "
        f"--valid-rate {args.valid_rate:g}"
    )
    if args.flood_only:
        previous = json.loads(out.read_text()) if out.exists() else {}
        results = {**previous, "flood": {**results, "command": flood_command}}
        cases = ()
    for cache, ttl, rate in cases:
        proc, url = start(workdir, db_url, ttl)
        try:
            results[cache] = measure(url, key, rate, args.seconds)
        finally:
            stop(proc)
    proc, url = start(workdir, db_url, "30")
    try:
        flood = measure_flood(proc, url, key, args.flood, args.flood_rate, args.valid_rate)
    finally:
        stop(proc)
    proc, url = start(workdir, db_url, "30", app="bench.floor_app:app")
    try:
        floor = measure_floor(proc, url, key, args.flood, args.flood_rate)
    finally:
        stop(proc)
    ours = flood["flood"]["cpu_ms_per_flood_request"]  # type: ignore[index]
    flood["floor"] = floor
    flood["ratio_to_floor"] = round(ours / floor["cpu_ms_per_flood_request"], 2)  # type: ignore[operator]
    if args.flood_only:
        results["flood"].update(flood)  # type: ignore[union-attr]
    else:
        results["flood"] = {"command": flood_command, **flood}
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("flood", json.dumps(flood, indent=2, default=str))
    print(
        "flood cpu ms/request: ours",
        flood["flood"]["cpu_ms_per_flood_request"],  # type: ignore[index]
        "floor",
        floor["cpu_ms_per_flood_request"],
        "ratio",
        flood["ratio_to_floor"],
        "valid p99 delay ms",
        flood["valid_p99_delay_ms"],
    )
    for cache, _, _ in cases:
        row = results[cache]  # type: ignore[assignment]
        print(cache, "open", row["open"]["latency_ms"], row["open"].get("errors"))  # type: ignore[index]
        print(cache, "guarded", row["guarded"]["latency_ms"], row["guarded"].get("errors"))  # type: ignore[index]
        print(cache, "added", row["added_ms"])  # type: ignore[index]


if __name__ == "__main__":
    main()
