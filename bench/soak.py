"""A soak: hours of production life in half an hour. Does anything grow that should stay flat?

    python -m bench.soak                 # 30 minutes at 200 req/s (make bench)
    python -m bench.soak --minutes 3     # a shorter look; the report says how long it ran

The gateway as deployed (gunicorn, 2 gevent workers, PostgreSQL, Redis, the JSON log) takes an
open-loop mix at ``--rate`` requests a second for ``--minutes``:

| share | request |
|---|---|
| 50% | chat completion, upstream (the simulator) |
| 20% | chat completion streamed (SSE), upstream |
| 12.5% | Open Inference Protocol, vader sentiment |
| 5% | embeddings, local all-MiniLM-L6-v2 |
| 12.5% | governance read: the tenant's usage |

Every 10 s it samples each worker's RSS and open descriptors (psutil) and its live greenlets (the
``gateway_worker_greenlets`` gauge, which WORKER_STATS_INTERVAL turns on). The first
``--warmup-minutes`` are warm-up (caches, allocator arenas, model buffers); growth is measured
from their end. Pass: RSS growth per worker <= 5%, zero errors, descriptors and greenlets flat
(their range after warm-up bounded by what the in-flight load can explain), and no worker
replaced. Writes bench/results/soak.json, SOAK.md and soak.png (RSS over time), then refreshes
REPORT.md. Bounded: the load stops after ``--minutes`` and every request gives up after 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

from bench import companion, procs, report, systems
from bench.loadgen import Target, run_load
from bench.run import RESULTS

SAMPLE_S = 10.0
TIMEOUT_S = 30.0
RSS_GROWTH_LIMIT = 0.05
# Queues sized for the rates below: the soak looks for growth over time, not for the edge of
# capacity (the overload scenario in bench/run.py does that), so a burst while the load
# generator opens its connections must not be refused.
CATALOGUE = """\
models:
  - name: upstream-chat
    backend: openai_compatible
    params: {base_url: "${UPSTREAM_BASE_URL}", model: sim-model, pool_size: 512}
    limits: {max_concurrency: 512, max_queue: 0, max_tokens: 256}
  - name: all-minilm-l6-v2
    backend: sentence_transformers
    limits: {max_concurrency: 1, max_queue: 256, max_batch_size: 32, max_batch_wait_ms: 5}
  - name: vader-sentiment
    backend: vader
    limits: {max_concurrency: 4, max_queue: 256}
"""
# (name, share of the rate)
MIX = (("chat", 0.5), ("chat_stream", 0.2), ("v2_vader", 0.125), ("embeddings", 0.05), ("usage", 0.125))
GREENLET_LINE = re.compile(r'^gateway_worker_greenlets\{pid="(\d+)"\}\s+([0-9.e+]+)$', re.M)


SETTINGS = {"WEB_CONCURRENCY": "2", "WORKER_CONNECTIONS": "1000", "WORKER_STATS_INTERVAL": str(SAMPLE_S)}


def targets(base: str, key: str, reader: str) -> dict[str, Target]:
    auth = {"Authorization": f"Bearer {key}"}
    tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["What a lovely day!"]}
    return {
        "chat": Target.chat(base, "upstream-chat", headers=auth, max_tokens=16),
        "chat_stream": Target.chat(base, "upstream-chat", headers=auth, max_tokens=16, stream=True),
        "v2_vader": Target.json(
            base + "/v2/models/vader-sentiment/infer",
            {"inputs": [tensor]},
            headers=auth,
            valid=lambda body: bool(body.get("outputs")),
        ),
        "embeddings": Target.json(
            base + "/v1/embeddings",
            {"model": "all-minilm-l6-v2", "input": ["a soak keeps going", "for half an hour"]},
            headers=auth,
            valid=lambda body: len(body.get("data", [])) == 2,
        ),
        "usage": Target.get(
            base + "/v1/governance/usage",
            headers={"Authorization": f"Bearer {reader}"},
            valid=lambda body: isinstance(body, dict) and "error" not in body,
        ),
    }


class Sampler:
    """Every SAMPLE_S: each worker's RSS, descriptors and greenlets, in a thread of its own."""

    def __init__(self, master_pid: int, metrics_url: str) -> None:
        self.master = psutil.Process(master_pid)
        self.metrics_url = metrics_url
        self.samples: list[dict[str, Any]] = []
        self.pids_seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()

    def _greenlets(self) -> dict[int, int]:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
                text = response.read().decode()
        except OSError:
            return {}
        return {int(pid): int(float(value)) for pid, value in GREENLET_LINE.findall(text)}

    def sample(self) -> None:
        greenlets = self._greenlets()
        workers: dict[str, Any] = {}
        for proc in self.master.children():
            try:
                workers[str(proc.pid)] = {
                    "rss_mib": round(proc.memory_info().rss / 2**20, 2),
                    "fds": proc.num_fds(),
                    "greenlets": greenlets.get(proc.pid),
                }
            except psutil.NoSuchProcess:
                continue
            self.pids_seen.add(proc.pid)
        self.samples.append({"t_s": round(time.monotonic() - self.started, 1), "workers": workers})

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_S)

    @contextmanager
    def running(self) -> Iterator[Sampler]:
        self.started = time.monotonic()
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(SAMPLE_S + 15)
            self.sample()


async def drive(load: dict[str, Target], rate: float, seconds: float) -> dict[str, Any]:
    shares = dict(MIX)
    runs = [
        run_load(target, rate=rate * shares[name], duration_s=seconds, timeout_s=TIMEOUT_S, connections=64)
        for name, target in load.items()
    ]
    results = await asyncio.gather(*runs)
    return dict(zip(load, results, strict=True))


def warm(load: dict[str, Target], limit_s: float = 300.0) -> None:
    """Each kind of request once, successfully, before the clock starts: /readyz answers before
    every model is loaded, and a model still loading answers 503, which is start-up, not soak."""
    import requests

    deadline = time.monotonic() + limit_s
    for name, target in load.items():
        while True:
            resp = requests.request(
                target.method, target.url, data=target.body or None, headers=dict(target.headers), timeout=60
            )
            if resp.status_code == 200:
                break
            if time.monotonic() > deadline:
                raise procs.ServerFailed(f"{name} answers {resp.status_code} after warm-up: {resp.text}")
            time.sleep(1)


def verdict(samples: list[dict[str, Any]], warmup_s: float, pids: set[int]) -> dict[str, Any]:
    """Per worker: RSS at the end of warm-up and at the end, and the ranges after warm-up."""
    after = [s for s in samples if s["t_s"] >= warmup_s]
    workers: dict[str, Any] = {}
    for pid in sorted({pid for s in samples for pid in s["workers"]}):
        series = [s["workers"][pid] for s in after if pid in s["workers"]]
        if len(series) < 2:
            workers[pid] = {"samples_after_warmup": len(series)}
            continue
        greenlets = [w["greenlets"] for w in series if w["greenlets"] is not None]
        start, end = series[0]["rss_mib"], series[-1]["rss_mib"]
        workers[pid] = {
            "samples_after_warmup": len(series),
            "rss_mib_after_warmup": start,
            "rss_mib_at_end": end,
            "rss_mib_max": max(w["rss_mib"] for w in series),
            "rss_growth": round((end - start) / start, 4),
            "fds_range": [min(w["fds"] for w in series), max(w["fds"] for w in series)],
            "greenlets_range": [min(greenlets), max(greenlets)] if greenlets else None,
        }
    return {"workers": workers, "workers_seen": len(pids)}


def plot(samples: list[dict[str, Any]], warmup_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for pid in sorted({pid for s in samples for pid in s["workers"]}):
        points = [(s["t_s"] / 60, s["workers"][pid]["rss_mib"]) for s in samples if pid in s["workers"]]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=f"worker {pid}")
    ax.axvline(warmup_s / 60, color="grey", linestyle="--", label="end of warm-up")
    ax.set_xlabel("minutes")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Soak: RSS per gunicorn worker")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Soak",
        "",
        f"`{result['command']}`, commit {result['commit']}, {result['started']}: gunicorn with 2 gevent "
        f"workers on PostgreSQL and Redis, {result['rate']} req/s open-loop for {result['minutes']} min "
        f"(warm-up {result['warmup_minutes']} min), sampled every {SAMPLE_S:.0f} s.",
        "",
        "| request | sent | ok | errors | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, load in result["load"].items():
        latency = load["latency_ms"]
        lines.append(
            f"| {name} | {load['sent']} | {load['ok']} | {load['error_count']} | "
            f"{latency['p50']} | {latency['p99']} |"
        )
    lines += [
        "",
        "| worker | RSS after warm-up MiB | RSS at end MiB | growth | descriptors | greenlets |",
        "|---|---|---|---|---|---|",
    ]
    for pid, worker in result["verdict"]["workers"].items():
        if "rss_growth" not in worker:
            lines.append(f"| {pid} | (only {worker['samples_after_warmup']} samples) | | | | |")
            continue
        lines.append(
            f"| {pid} | {worker['rss_mib_after_warmup']} | {worker['rss_mib_at_end']} | "
            f"{worker['rss_growth'] * 100:.2f}% | {worker['fds_range'][0]}-{worker['fds_range'][1]} | "
            f"{'-'.join(map(str, worker['greenlets_range'] or ['n/a']))} |"
        )
    lines += [
        "",
        f"Errors: {result['errors_total']}; workers seen: {result['verdict']['workers_seen']} (2 means "
        f"none was replaced). Passed: **{result['passed']}** (RSS growth <= {RSS_GROWTH_LIMIT:.0%} per "
        "worker, 0 errors, no worker replaced).",
        "",
        "![RSS per worker over the soak](soak.png)",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=5.0)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.warmup_minutes >= args.minutes:
        parser.error("--warmup-minutes must be shorter than --minutes")
    knobs = {"latency_ms": 20, "tokens": 16, "tokens_per_s": 400}
    with companion.run_context(args.out, "soak", CATALOGUE, **knobs) as (ctx, catalogue):
        result = run(ctx, catalogue, args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "SOAK.md").write_text(markdown(result))
    report.with_companions(args.out)
    print(markdown(result))


def run(ctx: systems.RunContext, catalogue: Path, args: argparse.Namespace) -> dict[str, Any]:
    system = companion.Gateway(ctx, "soak", catalogue, SETTINGS)
    system.prepare()
    try:
        reader = system.issue("bench", "--scopes", "governance:read")
        with system.start("soak") as live:
            load = targets(live.base_url, system.key, reader)
            warm(load)
            sampler = Sampler(live.pid, live.base_url + "/metrics")
            started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            with sampler.running():
                loads = asyncio.run(drive(load, args.rate, args.minutes * 60))
    finally:
        system.cleanup()
    summary = {
        name: {
            **{k: result[k] for k in ("sent", "ok", "error_count", "errors", "latency_ms", "throughput_rps")},
            # When errors happened (seconds from the start of the load): start-up, a burst, or spread.
            "error_seconds": {row["second"]: row["errors"] for row in result["by_second"] if row["errors"]},
        }
        for name, result in loads.items()
    }
    judged = verdict(sampler.samples, args.warmup_minutes * 60, sampler.pids_seen)
    errors = sum(load["error_count"] for load in summary.values())
    growth_ok = all(w.get("rss_growth", 1.0) <= RSS_GROWTH_LIMIT for w in judged["workers"].values())
    plot(sampler.samples, args.warmup_minutes * 60, args.out / "soak.png")
    return {
        "command": f"python -m bench.soak --minutes {args.minutes:g} --warmup-minutes "
        f"{args.warmup_minutes:g} --rate {args.rate:g}",
        "commit": system.version,
        "started": started,
        "rate": args.rate,
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "mix": dict(MIX),
        "load": summary,
        "errors_total": errors,
        "verdict": judged,
        "passed": growth_ok and errors == 0 and judged["workers_seen"] == 2,
        "samples": sampler.samples,
    }


if __name__ == "__main__":
    main()
