"""Run the benchmark: every scenario against every system in one invocation, then write the report.

    python -m bench.run --all      # the full set, about 25 minutes, into bench/results/
    python -m bench.run --quick    # a 2-3 minute smoke run with small numbers, into bench/results/quick/

``--scenarios`` and ``--systems`` (comma lists) run a subset. With ``--all`` scenarios are the outer
loop and every (scenario, system) gets a freshly started server, so the systems compared in one
table ran minutes apart on this shared machine, each from a clean process. ``--quick`` starts each
system once and runs every scenario on it: a smoke test of every path, not a measurement.
This process (load generator) and the simulator are pinned to core 1, each system under test to
core 0. Needs PostgreSQL (BENCH_POSTGRES_URL, an admin URL; default postgres@127.0.0.1/postgres)
and Redis (BENCH_REDIS_URL, default db 7 on 127.0.0.1). LiteLLM's venv is created on first use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import procs, report, systems
from bench.loadgen import raise_fd_limit
from bench.scenarios import FULL, QUICK, SCENARIOS, Bench, ScenarioFailed
from bench.upstream_sim import run_simulator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/7"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _git(*args: str) -> str:
    result = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return result.stdout.strip()


def tree_fingerprint() -> str:
    """Hash of uncommitted changes (tracked diffs and untracked sources): names the exact code measured."""
    digest = hashlib.sha256(_git("diff", "HEAD").encode())
    untracked = _git("ls-files", "--others", "--exclude-standard", "app", "config", "bench", "migrations")
    for name in sorted(untracked.splitlines()):
        path = ROOT / name
        if path.is_file():
            digest.update(name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def metadata(layout: procs.Layout, command: str) -> dict[str, Any]:
    return {
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "tree_fingerprint": tree_fingerprint(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nofile_hard_limit": procs.nofile_hard_limit(),
        "layout": layout.describe(),
    }


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop for the load generator when installed: less CPU per request, so more headroom."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_scenario(
    name: str, system: systems.System, bench: Bench, failed: dict[str, str], live: systems.Live | None
) -> dict[str, Any]:
    """One scenario on one system: on ``live`` when given (quick runs), else on a fresh start."""
    if system.name in failed:
        return {"status": "failed", "reason": failed[system.name]}
    if name in system.unsupported:
        return {"status": "not_applicable", "reason": system.unsupported[name]}
    started = time.monotonic()
    try:
        if live is None:
            with system.start(name) as fresh:
                result = SCENARIOS[name](fresh, bench)
        else:
            result = SCENARIOS[name](live, bench)
    except (procs.ServerFailed, ScenarioFailed) as exc:
        return {"status": "failed", "reason": str(exc)}
    except Exception:  # a harness bug must not lose the other systems' results
        return {"status": "failed", "reason": "harness error:\n" + traceback.format_exc()}
    return {"status": "ok", "duration_s": round(time.monotonic() - started, 1), **result}


class Results:
    """The scenario documents, rewritten after every system so a crash keeps what was measured."""

    def __init__(
        self, out: Path, names: list[str], meta: dict[str, Any], scale_name: str, params: Any
    ) -> None:
        self.out = out
        self.documents = {
            name: {
                "scenario": name,
                "description": (SCENARIOS[name].__doc__ or "").strip(),
                "meta": meta,
                "scale": scale_name,
                "params": params,
                "systems": {},
            }
            for name in names
        }

    def record(self, name: str, system: systems.System, outcome: dict[str, Any]) -> None:
        outcome["system"] = system.describe()
        self.documents[name]["systems"][system.name] = outcome
        log(f"{name}: {system.name} -> {outcome['status']} {outcome.get('reason', '')[:300]}")
        (self.out / f"{name}.json").write_text(json.dumps(self.documents[name], indent=1) + "\n")


def fresh_per_scenario(
    chosen: list[systems.System], names: list[str], bench: Bench, failed: dict[str, str], results: Results
) -> None:
    """Scenario-major, a fresh server each time: systems in one table ran minutes apart, all clean."""
    for name in names:
        for system in chosen:
            log(f"{name}: {system.name}")
            results.record(name, system, run_scenario(name, system, bench, failed, None))


def one_start_per_system(
    chosen: list[systems.System], names: list[str], bench: Bench, failed: dict[str, str], results: Results
) -> None:
    """System-major, each system started once: the quick run's smoke test of every path."""
    for system in chosen:
        live_needed = system.name not in failed and any(n not in system.unsupported for n in names)
        if not live_needed:
            for name in names:
                results.record(name, system, run_scenario(name, system, bench, failed, None))
            continue
        log(f"starting {system.name} for {', '.join(names)}")
        try:
            with system.start(None) as live:
                for name in names:
                    log(f"{name}: {system.name}")
                    results.record(name, system, run_scenario(name, system, bench, failed, live))
        except procs.ServerFailed as exc:
            for name in names:
                results.record(name, system, {"status": "failed", "reason": str(exc)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--all", action="store_true", help="full numbers (about 25 minutes)")
    size.add_argument("--quick", action="store_true", help="smoke numbers (about 2 minutes)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list")
    parser.add_argument("--systems", default=",".join(systems.SYSTEMS), help="comma list")
    parser.add_argument("--out", type=Path, help="default bench/results (or bench/results/quick)")
    args = parser.parse_args(argv)
    scenario_names = [s for s in args.scenarios.split(",") if s]
    unknown = set(scenario_names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; known: {', '.join(SCENARIOS)}")
    scale = FULL if args.all else QUICK
    out: Path = args.out or (RESULTS if args.all else RESULTS / "quick")
    run_id = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    raw_dir = out / "raw" / run_id
    raw_dir.mkdir(parents=True, exist_ok=True)

    layout = procs.pin_harness()
    raise_fd_limit()
    command = "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = metadata(layout, command)
    log(f"layout {meta['layout']}, results in {out}, logs in {raw_dir}")
    with run_simulator() as sim, asyncio.Runner(loop_factory=loop_factory()) as runner:
        ctx = systems.RunContext(
            sim=sim,
            raw_dir=raw_dir,
            layout=layout,
            run_id=run_id,
            redis_url=os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
            postgres_url=os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL),
        )
        chosen = [systems.build(name, ctx) for name in args.systems.split(",") if name]
        failed: dict[str, str] = {}
        for system in chosen:
            log(f"preparing {system.name}")
            try:
                system.prepare()
            except (procs.ServerFailed, subprocess.TimeoutExpired, OSError) as exc:
                failed[system.name] = f"could not be prepared: {exc}"
                log(f"{system.name} FAILED to prepare: {str(exc)[:300]}")
        bench = Bench(sim, runner, scale, raw_dir)
        results = Results(out, scenario_names, meta, "all" if args.all else "quick", asdict(scale))
        schedule = fresh_per_scenario if args.all else one_start_per_system
        try:
            schedule(chosen, scenario_names, bench, failed, results)
        finally:
            for system in chosen:
                with contextlib.suppress(Exception):
                    system.cleanup()
    report.write(out)
    log(f"report: {out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
