"""The gunicorn tuning table: WEB_CONCURRENCY 1/2 x WORKER_CONNECTIONS 100/1,000/5,000, measured.

    python -m bench.tuning               # about 8 minutes; bench/results/tuning.json + TUNING.md
    python -m bench.tuning --seconds 4   # a quicker, noisier table

For each cell a fresh gunicorn (the real gunicorn.conf.py, the governed path: auth, limits,
policy, quota, audit, metrics) is started and measured on two paths, one after the other:

- **upstream**: chat completions to the OpenAI-compatible simulator (50 ms per answer), 400
  closed-loop clients: I/O-bound, where greenlets per worker (WORKER_CONNECTIONS) matter;
- **local**: MiniLM embeddings, 32 closed-loop clients: CPU-bound inference, where workers
  (WEB_CONCURRENCY) matter and WORKER_CONNECTIONS only bounds the queue.

Each path reports saturation (2xx/s), p99 latency, errors and the server's RSS (master and
workers) at the end. Nothing is pinned: a 2-worker server needs both cores, so the load
generator and the simulator share them with it; every cell ran minutes apart in one run, so
compare cells with each other, not with other runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import companion, procs, report, systems
from bench.loadgen import Target, run_load
from bench.run import RESULTS, loop_factory

BENCH = Path(__file__).resolve().parent
WORKERS = (1, 2)
CONNECTIONS = (100, 1000, 5000)
PATHS = {
    "upstream": {"clients": 400},
    "local": {"clients": 32},
}
CATALOGUE = """
models:
  - name: upstream-chat
    backend: openai_compatible
    params:
      base_url: ${UPSTREAM_BASE_URL}
      model: sim-model
      pool_size: 5000
    limits:
      max_concurrency: 5000
      max_queue: 0
  - name: minilm
    backend: sentence_transformers
    limits:
      max_queue: 5000
"""


class Tuned(companion.Gateway):
    """The gateway with one cell's worker settings and a catalogue of both paths' models."""

    def __init__(self, ctx: systems.RunContext, catalogue: Path) -> None:
        # Eager: measure serving, not MiniLM's load racing the first requests.
        super().__init__(ctx, "tuning", catalogue, {"MODELS_LOAD": "eager"})

    @contextlib.contextmanager
    def cell(self, workers: int, connections: int) -> Iterator[systems.Live]:
        self.settings.update(WEB_CONCURRENCY=str(workers), WORKER_CONNECTIONS=str(connections))
        with self.start(f"w{workers}-c{connections}") as live:
            yield live


def _targets(live: systems.Live) -> dict[str, Target]:
    return {
        "upstream": Target.chat(live.base_url, "upstream-chat", headers=live.headers, max_tokens=16),
        "local": Target.json(
            live.base_url + "/v1/embeddings",
            {"model": "minilm", "input": "How long does delivery to Lisbon take?"},
            headers=live.headers,
            valid=lambda payload: isinstance(payload, dict) and payload.get("object") == "list",
        ),
    }


def measure(system: Tuned, seconds: float, runner: asyncio.Runner) -> list[dict[str, Any]]:
    rows = []
    for workers in WORKERS:
        for connections in CONNECTIONS:
            with system.cell(workers, connections) as live:
                for path, target in _targets(live).items():
                    # A short warm-up: connection pools, the first batches, the key cache.
                    runner.run(run_load(target, mode="closed", clients=8, duration_s=1.0, timeout_s=30))
                    result = runner.run(
                        run_load(
                            target,
                            mode="closed",
                            clients=PATHS[path]["clients"],
                            duration_s=seconds,
                            timeout_s=30,
                        )
                    )
                    row = {
                        "workers": workers,
                        "worker_connections": connections,
                        "path": path,
                        "clients": PATHS[path]["clients"],
                        "throughput_rps": result["throughput_rps"],
                        "p50_ms": result["latency_ms"]["p50"],
                        "p99_ms": result["latency_ms"]["p99"],
                        "errors": result["error_count"],
                        "error_kinds": result["errors"],
                        "rss_mib": round(procs.rss_bytes(live.pid) / 2**20, 1),
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def recommend(rows: list[dict[str, Any]]) -> dict[str, str]:
    """The cell with the best saturation per path, and the smallest one within 5% of it."""
    advice = {}
    for path in PATHS:
        cells = [r for r in rows if r["path"] == path and not r["errors"]]
        if not cells:
            advice[path] = "every cell had errors: see the table"
            continue
        best = max(cells, key=lambda r: r["throughput_rps"])
        near = [r for r in cells if r["throughput_rps"] >= 0.95 * best["throughput_rps"]]
        pick = min(near, key=lambda r: (r["workers"], r["worker_connections"], r["p99_ms"]))
        advice[path] = (
            f"WEB_CONCURRENCY={pick['workers']} WORKER_CONNECTIONS={pick['worker_connections']}: "
            f"{pick['throughput_rps']:.0f} req/s, p99 {pick['p99_ms']:.0f} ms "
            f"(best: {best['throughput_rps']:.0f} req/s at {best['workers']}x{best['worker_connections']})"
        )
    return advice


def markdown(rows: list[dict[str, Any]], advice: dict[str, str], meta: dict[str, Any]) -> str:
    lines = [
        "# gunicorn tuning table",
        "",
        f"Run {meta['started']} on {meta['cpu_count']} cores, commit {meta['commit']}, "
        f"{meta['seconds']:.0f} s per cell and path, closed loop (upstream: 400 clients against a "
        "50 ms simulator; local: 32 clients on MiniLM embeddings). Nothing pinned.",
        "",
        "| WEB_CONCURRENCY | WORKER_CONNECTIONS | path | req/s | p50 ms | p99 ms | errors | RSS MiB |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"  # no request succeeded

    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['worker_connections']} | {r['path']} | {r['throughput_rps']:.0f} | "
            f"{ms(r['p50_ms'])} | {ms(r['p99_ms'])} | {r['errors']} | {r['rss_mib']:.0f} |"
        )
    lines += ["", "Recommendation (smallest cell within 5% of the best saturation, per path):", ""]
    lines += [f"- **{path}**: {text}" for path, text in advice.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="load per cell and path")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    procs.raise_nofile()
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "commit": procs.run_checked(
            ["git", "rev-parse", "--short", "HEAD"], os.environ, BENCH.parent
        ).strip(),
        "seconds": args.seconds,
    }
    with (
        companion.run_context(args.out, "tuning", CATALOGUE, latency_ms=50) as (ctx, catalogue),
        asyncio.Runner(loop_factory=loop_factory()) as runner,
    ):
        system = Tuned(ctx, catalogue)
        system.prepare()
        try:
            rows = measure(system, args.seconds, runner)
        finally:
            system.cleanup()
    advice = recommend(rows)
    (args.out / "tuning.json").write_text(
        json.dumps({"meta": meta, "rows": rows, "advice": advice}, indent=2)
    )
    (args.out / "TUNING.md").write_text(markdown(rows, advice, meta))
    report.with_companions(args.out)
    print(markdown(rows, advice, meta))


if __name__ == "__main__":
    main()
