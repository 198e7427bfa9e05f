"""The six scenarios of issue 6, each a function of one started system, bounded in time.

Every scenario first resets the simulator to a fast upstream, sends one request of each kind it will
use (a failure there stops it with the system's own answer quoted), warms the system up, and only
then sets the simulator to the scenario's latency and measures. CPU seconds per process are taken
over the measured window only.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.loadgen import Target, run_load, summarize
from bench.systems import Live
from bench.upstream_sim import Simulator

FAST_UPSTREAM = {"latency_ms": 5.0, "ttft_ms": 0.0, "tokens": 16, "tokens_per_s": 0.0}
FD_RESERVE = 300  # descriptors a proxy needs besides its two per stream (listener, Redis, DB, logs)
SATURATION_P99_MS = 1000.0
SATURATION_ERROR_RATE = 0.001
LOADGEN_LAG_LIMIT_MS = 100.0


class ScenarioFailed(RuntimeError):
    """The system answered wrongly before the measurement; the message quotes its answer."""


@dataclass(frozen=True)
class Scale:
    """Every number a scenario uses; FULL is `--all`, QUICK is the ~2 minute smoke run."""

    warmup_s: float
    overhead_rates: tuple[int, ...]
    overhead_s: float
    overhead_upstream_ms: float
    streams_target: int
    streams_ramp_s: float
    stream_tokens: int
    stream_tokens_per_s: float
    fanout_clients: int
    fanout_calls: int
    fanout_upstream_ms: float
    fanout_s: float
    chain_clients: int
    chain_step_ms: float
    chain_s: float
    saturation_start: int
    saturation_factor: float
    saturation_max_steps: int
    saturation_bisect: int
    saturation_step_s: float
    concurrency_clients: int
    concurrency_upstream_ms: float
    concurrency_s: float
    concurrency_timeout_s: float
    profile_rate: int
    profile_s: float
    overload_rates: tuple[int, ...]
    overload_step_s: float
    overload_sustain_s: float
    overload_reference_rps: int


FULL = Scale(
    warmup_s=2.0,
    overhead_rates=(100, 500, 1000),
    overhead_s=10.0,
    overhead_upstream_ms=50.0,
    streams_target=10_000,
    streams_ramp_s=20.0,
    stream_tokens=30,
    stream_tokens_per_s=1.0,
    fanout_clients=20,
    fanout_calls=10,
    fanout_upstream_ms=500.0,
    fanout_s=15.0,
    chain_clients=20,
    chain_step_ms=80.0,
    chain_s=10.0,
    saturation_start=200,
    saturation_factor=1.5,
    saturation_max_steps=9,
    saturation_bisect=2,
    saturation_step_s=8.0,
    concurrency_clients=250,
    concurrency_upstream_ms=2000.0,
    concurrency_s=60.0,
    concurrency_timeout_s=10.0,
    profile_rate=200,
    profile_s=12.0,
    overload_rates=(250, 500, 1000, 1500, 2000),
    overload_step_s=8.0,
    overload_sustain_s=30.0,
    overload_reference_rps=340,
)
QUICK = Scale(
    warmup_s=0.5,
    overhead_rates=(100,),
    overhead_s=1.5,
    overhead_upstream_ms=50.0,
    streams_target=300,
    streams_ramp_s=1.5,
    stream_tokens=4,
    stream_tokens_per_s=4.0,
    fanout_clients=5,
    fanout_calls=10,
    fanout_upstream_ms=200.0,
    fanout_s=1.5,
    chain_clients=5,
    chain_step_ms=80.0,
    chain_s=1.0,
    saturation_start=100,
    saturation_factor=2.0,
    saturation_max_steps=2,
    saturation_bisect=0,
    saturation_step_s=1.5,
    concurrency_clients=50,
    concurrency_upstream_ms=500.0,
    concurrency_s=2.0,
    concurrency_timeout_s=5.0,
    profile_rate=100,
    profile_s=3.0,
    overload_rates=(100, 300),
    overload_step_s=1.5,
    overload_sustain_s=2.0,
    overload_reference_rps=100,
)


class Bench:
    """What scenarios share: the simulator, the event loop for the load generator, the CPU roles."""

    def __init__(self, sim: Simulator, runner: asyncio.Runner, scale: Scale, raw_dir: Path) -> None:
        self.sim = sim
        self.runner = runner
        self.scale = scale
        self.raw_dir = raw_dir
        self.services = procs.service_roots()

    def load(self, target: Target, **kwargs: Any) -> dict[str, Any]:
        return self.runner.run(run_load(target, **kwargs))

    def measured(self, live: Live, target: Target, **kwargs: Any) -> dict[str, Any]:
        """One load with the CPU seconds each process used during it."""
        roles: dict[str, Callable[[], float]] = {
            "system_under_test": lambda: procs.cpu_seconds([live.pid]),
            "load_generator": procs.own_cpu_seconds,
        }
        if live.pid != self.sim.process.pid:
            roles["simulator"] = lambda: procs.cpu_seconds([self.sim.process.pid])
        for name, pid in self.services.items():
            roles[name] = lambda pid=pid: procs.cpu_seconds([pid])
        with procs.CpuMeter(roles) as meter:
            result = self.load(target, **kwargs)
        result["cpu"] = meter.report()
        return result

    def prepare(self, live: Live, probes: list[Target], upstream: Mapping[str, Any]) -> None:
        """Probe and warm up on a fast upstream, then give the simulator the scenario's settings."""
        self.sim.reset()
        self.sim.configure(**FAST_UPSTREAM)
        for target in probes:
            probe(target)
        warm = self.load(chat(live), rate=50, duration_s=self.scale.warmup_s, timeout_s=10)
        if warm["ok"] == 0:
            raise ScenarioFailed(f"warm-up: no request succeeded: {warm['errors']}")
        self.sim.configure(**upstream)


def chat(live: Live, stream: bool = False) -> Target:
    return Target.chat(live.base_url, live.model, stream=stream, headers=live.headers)


def probe(target: Target) -> None:
    """One request, synchronously; the system's answer is quoted when it is not what the load expects."""
    request = urllib.request.Request(target.url, data=target.body, headers=dict(target.headers))
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        raise ScenarioFailed(
            f"POST {target.url} answered {exc.code}: {exc.read()[:600].decode(errors='replace')}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ScenarioFailed(f"POST {target.url} failed: {exc}") from None
    if target.stream:
        if b"data: [DONE]" not in body:
            raise ScenarioFailed(f"stream from {target.url} did not end with [DONE]: {body[-600:]!r}")
        return
    try:
        valid = target.valid(json.loads(body))
    except (ValueError, KeyError, TypeError, AttributeError):
        valid = False
    if not valid:
        raise ScenarioFailed(f"POST {target.url} answered 200 with an unexpected body: {body[:600]!r}")


def upstream_knobs(latency_ms: float, tokens: int = 16, tokens_per_s: float = 0.0) -> dict[str, Any]:
    return {"latency_ms": latency_ms, "ttft_ms": 0.0, "tokens": tokens, "tokens_per_s": tokens_per_s}


# --- 1. overhead ----------------------------------------------------------------------------------


def overhead(live: Live, bench: Bench) -> dict[str, Any]:
    """Non-stream chat at fixed rates against a 50 ms upstream; added latency is derived vs direct."""
    scale = bench.scale
    bench.prepare(live, [chat(live)], upstream_knobs(scale.overhead_upstream_ms))
    runs = {}
    for rate in scale.overhead_rates:
        runs[str(rate)] = bench.measured(
            live, chat(live), rate=rate, duration_s=scale.overhead_s, timeout_s=10
        )
        time.sleep(1.0)
    return {"runs": runs}


# --- 2. concurrent streams ------------------------------------------------------------------------


def stream_target(requested: int) -> tuple[int, str]:
    """How many streams one process can hold here: a proxy needs two descriptors per stream."""
    budget = (procs.nofile_hard_limit() - FD_RESERVE) // 2
    if requested <= budget:
        return requested, ""
    return budget, (
        f"capped at {budget}: the hard RLIMIT_NOFILE here is {procs.nofile_hard_limit()} and cannot be "
        f"raised without CAP_SYS_RESOURCE; a proxy holds 2 descriptors per stream (client + upstream)"
    )


def streams(live: Live, bench: Bench) -> dict[str, Any]:
    """Ramp to N concurrent SSE streams on one worker; the upstream sends 1 token/s."""
    scale = bench.scale
    target_count, cap_note = stream_target(scale.streams_target)
    bench.prepare(
        live,
        [chat(live, stream=True)],
        upstream_knobs(50.0, scale.stream_tokens, scale.stream_tokens_per_s),
    )
    baseline = procs.rss_bytes(live.pid)

    def sample() -> dict[str, Any]:
        return {"rss_mb": round(procs.rss_bytes(live.pid) / 2**20, 2)}

    stream_s = scale.stream_tokens / scale.stream_tokens_per_s
    result = bench.measured(
        live,
        chat(live, stream=True),
        mode="ramp",
        rate=target_count / scale.streams_ramp_s,
        count=target_count,
        duration_s=scale.streams_ramp_s,
        timeout_s=scale.streams_ramp_s + stream_s + 60,
        connections=target_count + 100,
        sample_interval_s=0.5,
        probe=sample,
    )
    peak_rss = max((g["rss_mb"] for g in result["gauges"]), default=0.0) * 2**20
    peak_open = result.get("peak_open_streams", 0)
    return {
        "target_streams": target_count,
        "target_note": cap_note,
        "baseline_rss_mb": round(baseline / 2**20, 2),
        "peak_rss_mb": round(peak_rss / 2**20, 2),
        "rss_per_open_stream_kb": round((peak_rss - baseline) / peak_open / 1024, 2) if peak_open else None,
        "run": result,
    }


# --- 3. fan-out -----------------------------------------------------------------------------------


def fanout(live: Live, bench: Bench) -> dict[str, Any]:
    """One request -> N upstream calls of 500 ms each, at 20 concurrent clients."""
    scale = bench.scale
    calls = [
        {
            "model": live.model,
            "operation": "chat",
            "input": {"messages": [{"role": "user", "content": f"part {i} of the fan-out"}]},
        }
        for i in range(scale.fanout_calls)
    ]

    def all_ok(payload: Any) -> bool:
        results = payload["results"]
        return len(results) == scale.fanout_calls and all(r["status"] == "ok" for r in results)

    target = Target.json(
        f"{live.base_url}/v1/fanout", {"mode": "all", "calls": calls}, headers=live.headers, valid=all_ok
    )
    bench.prepare(live, [target], upstream_knobs(scale.fanout_upstream_ms))
    result = bench.measured(
        live, target, mode="closed", clients=scale.fanout_clients, duration_s=scale.fanout_s, timeout_s=30
    )
    return {"floor_ms": scale.fanout_upstream_ms, "calls_per_request": scale.fanout_calls, "run": result}


# --- 4. I/O chain ---------------------------------------------------------------------------------

CHAIN_PLANS = {"rag": 3, "independent": 1}  # plan -> round trips on its critical path


def chain(live: Live, bench: Bench) -> dict[str, Any]:
    """auth -> vector lookup -> LLM -> store, 4 upstream calls of 80 ms, independent steps concurrent."""
    scale = bench.scale

    def target(plan: str) -> Target:
        return Target.json(
            f"{live.base_url}/bench/chain",
            {"plan": plan},
            headers=live.headers,
            valid=lambda payload: payload["plan"] == plan and len(payload["steps_ms"]) == 4,
        )

    bench.prepare(live, [target(plan) for plan in CHAIN_PLANS], upstream_knobs(scale.chain_step_ms))
    plans = {}
    for plan, hops in CHAIN_PLANS.items():
        run = bench.measured(
            live,
            target(plan),
            mode="closed",
            clients=scale.chain_clients,
            duration_s=scale.chain_s,
            timeout_s=10,
        )
        plans[plan] = {"floor_ms": hops * scale.chain_step_ms, "run": run}
    return {"step_ms": scale.chain_step_ms, "sequential_ms": 4 * scale.chain_step_ms, "plans": plans}


# --- 5. saturation --------------------------------------------------------------------------------


def _passes(run: Mapping[str, Any]) -> bool:
    p99 = run["latency_ms"]["p99"]
    return p99 is not None and p99 <= SATURATION_P99_MS and run["error_rate"] <= SATURATION_ERROR_RATE


def saturation(live: Live, bench: Bench) -> dict[str, Any]:
    """Raise the open-loop rate until p99 > 1 s or errors > 0.1%, then bisect; bounded step count."""
    scale = bench.scale
    bench.prepare(live, [chat(live)], upstream_knobs(50.0))
    steps: list[dict[str, Any]] = []

    def step(rate: int) -> bool:
        time.sleep(1.0)
        run = bench.measured(live, chat(live), rate=rate, duration_s=scale.saturation_step_s, timeout_s=5)
        lagging = (run["send_lag_ms"]["p99"] or 0.0) > LOADGEN_LAG_LIMIT_MS
        steps.append({"rate": rate, "passed": _passes(run), "loadgen_lagging": lagging, "run": run})
        return _passes(run) and not lagging

    best, failed, rate = 0, 0, scale.saturation_start
    for _ in range(scale.saturation_max_steps):
        if not step(rate):
            failed = rate
            break
        best, rate = rate, math.ceil(rate * scale.saturation_factor)
    for _ in range(scale.saturation_bisect if failed else 0):
        middle = round((best + failed) / 2, -1)
        if middle in (best, failed):
            break
        if step(int(middle)):
            best = int(middle)
        else:
            failed = int(middle)
    # A step the generator could not send on time says nothing about the server: the result is then
    # "at least max_sustained_rps".
    limited_by_loadgen = any(entry["loadgen_lagging"] for entry in steps)
    return {
        "criteria": {"p99_ms": SATURATION_P99_MS, "error_rate": SATURATION_ERROR_RATE},
        "max_sustained_rps": best,
        "first_failing_rps": failed or None,
        "limited_by_load_generator": limited_by_loadgen,
        "steps": steps,
    }


# --- 8. overload ----------------------------------------------------------------------------------

OVERLOAD_TIMEOUT_S = 5.0
HEALTHZ_PROBE_S = 0.02


def _reference_rps(bench: Bench) -> tuple[int, str]:
    """Ours' saturation rate from this run's saturation scenario, else the scale's fallback."""
    path = bench.raw_dir.parent.parent / "saturation.json"
    try:
        entry = json.loads(path.read_text())["systems"]["ours"]
        if entry.get("status") == "ok" and entry.get("max_sustained_rps"):
            return int(entry["max_sustained_rps"]), f"ours' saturation in this run ({path.name})"
    except (OSError, ValueError, KeyError):
        pass
    return (
        bench.scale.overload_reference_rps,
        "the scale's reference (no saturation result for ours in this run)",
    )


def _goodput(run: Mapping[str, Any], offered_s: float) -> float:
    return round(run["ok"] / offered_s, 1)


def overload(live: Live, bench: Bench) -> dict[str, Any]:
    """Offered load past capacity: does goodput hold, and how are the refused told?

    A ladder of open-loop rates (the same for every system, for the goodput-against-offered plot),
    then 3x ours' saturation rate for overload_sustain_s while a separate process probes /healthz
    every 20 ms (systems without /healthz say so). A refusal counts as well formed with a
    Retry-After header and OpenAI's error object; its latency runs from the intended send time.
    """
    import multiprocessing

    from bench.liveness import probe as probe_healthz

    scale = bench.scale
    bench.prepare(live, [chat(live)], upstream_knobs(50.0))
    steps = []
    for rate in scale.overload_rates:
        time.sleep(1.0)
        run = bench.measured(
            live, chat(live), rate=rate, duration_s=scale.overload_step_s, timeout_s=OVERLOAD_TIMEOUT_S
        )
        steps.append({"offered_rps": rate, "goodput_rps": _goodput(run, scale.overload_step_s), "run": run})
    reference, source = _reference_rps(bench)
    offered = 3 * reference
    port = int(live.base_url.rsplit(":", 1)[1])
    has_healthz = procs.http_ok(f"{live.base_url}/healthz")
    context = multiprocessing.get_context("spawn")
    stop, results = context.Event(), context.Queue()
    prober = (
        context.Process(target=probe_healthz, args=(port, stop, results), daemon=True)
        if has_healthz
        else None
    )
    time.sleep(1.0)
    if prober is not None:
        prober.start()
    try:
        run = bench.measured(
            live, chat(live), rate=offered, duration_s=scale.overload_sustain_s, timeout_s=OVERLOAD_TIMEOUT_S
        )
    finally:
        stop.set()
    healthz: dict[str, Any] | None = None
    if prober is not None:
        probed = results.get(timeout=60)
        prober.join(10)
        healthz = {"latency_ms": summarize(probed["latencies"]), "failures": probed["failures"]}
    return {
        "ladder": steps,
        "sustained": {
            "reference_rps": reference,
            "reference_source": source,
            "offered_rps": offered,
            "seconds": scale.overload_sustain_s,
            "goodput_rps": _goodput(run, scale.overload_sustain_s),
            "goodput_share_of_reference": round(_goodput(run, scale.overload_sustain_s) / reference, 3),
            "healthz": healthz,
            "run": run,
        },
    }


# --- 6. 250 concurrent AI requests ----------------------------------------------------------------


def concurrency250(live: Live, bench: Bench) -> dict[str, Any]:
    """250 closed-loop clients, each doing chat against a 2 s upstream, for 60 s."""
    scale = bench.scale
    bench.prepare(live, [chat(live)], upstream_knobs(scale.concurrency_upstream_ms))
    result = bench.measured(
        live,
        chat(live),
        mode="closed",
        clients=scale.concurrency_clients,
        duration_s=scale.concurrency_s,
        timeout_s=scale.concurrency_timeout_s,
    )
    return {
        "clients": scale.concurrency_clients,
        "upstream_ms": scale.concurrency_upstream_ms,
        "client_timeout_s": scale.concurrency_timeout_s,
        "run": result,
    }


# --- 7. profile -----------------------------------------------------------------------------------

PROFILE_TOP = 25


def profile(live: Live, bench: Bench) -> dict[str, Any]:
    """py-spy samples the server under a steady load it can sustain, to name where its CPU goes."""
    scale = bench.scale
    spy = Path(sys.executable).parent / "py-spy"
    if not spy.exists():
        raise ScenarioFailed("py-spy is not installed (pip install -e '.[bench]')")
    bench.prepare(live, [chat(live)], upstream_knobs(50.0))
    output = bench.raw_dir / f"profile-{live.name}.folded"
    argv = [
        str(spy),
        "record",
        "--pid",
        str(live.pid),
        "--subprocesses",
        "--gil",
        "--nonblocking",
        "--rate",
        "250",
    ]
    argv += ["--duration", str(math.ceil(scale.profile_s)), "--format", "raw", "--output", str(output)]
    recorder = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)  # attaching takes a moment; the load starts once it samples
    run = bench.measured(
        live, chat(live), rate=scale.profile_rate, duration_s=scale.profile_s - 2, timeout_s=10
    )
    try:
        log, _ = recorder.communicate(timeout=scale.profile_s + 30)
    except subprocess.TimeoutExpired:
        recorder.kill()
        log, _ = recorder.communicate()
    if recorder.returncode != 0 or not output.exists():
        raise ScenarioFailed(f"py-spy failed ({recorder.returncode}): {log[-1500:]}")
    return {
        "rate": scale.profile_rate,
        "folded_file": str(output),
        **summarize_folded(output.read_text()),
        "run": run,
    }


FIRST_PARTY = ("app/", "bench/", "litellm/")


def _frame_parts(frame: str) -> tuple[str, str, str]:
    """ "func (pkg/mod.py:12)" -> ("func (pkg/mod.py)", path, package: "pkg", or "app.identity" for ours)."""
    name, _, location = frame.rpartition(" (")
    path = location.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    package = ".".join(parts[:2]) if parts[0] in ("app", "bench") and len(parts) > 2 else parts[0]
    return f"{name} ({path})", path, package.removesuffix(".py")


def summarize_folded(text: str) -> dict[str, Any]:
    """Shares of all samples: functions and packages by self time (the innermost frame), and the
    first-party functions (our app, the twin, LiteLLM's own code) by inclusive time."""
    self_functions: dict[str, int] = {}
    self_packages: dict[str, int] = {}
    first_party: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_parts(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        function, _, package = frames[-1]
        self_functions[function] = self_functions.get(function, 0) + count
        self_packages[package] = self_packages.get(package, 0) + count
        for function in {f for f, path, _ in frames if path.startswith(FIRST_PARTY)}:
            first_party[function] = first_party.get(function, 0) + count

    def top(counts: dict[str, int]) -> list[dict[str, Any]]:
        ranked = sorted(counts.items(), key=lambda item: item[1], reverse=True)[:PROFILE_TOP]
        return [{"name": name, "share": round(n / total, 4)} for name, n in ranked]

    return {
        "samples": total,
        "self_functions": top(self_functions),
        "self_packages": top(self_packages),
        "first_party_inclusive": top(first_party),
    }


Scenario = Callable[[Live, Bench], dict[str, Any]]
SCENARIOS: dict[str, Scenario] = {
    "overhead": overhead,
    "profile": profile,
    "fanout": fanout,
    "chain": chain,
    "concurrency250": concurrency250,
    "saturation": saturation,
    "overload": overload,
    "streams": streams,
}
