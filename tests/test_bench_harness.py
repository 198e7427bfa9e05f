"""The benchmark's load generator must measure what it claims, or every figure in the report is wrong.

Only the upstream simulator is involved (the "direct" system): no gateway, twin or LiteLLM.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from bench.loadgen import Target, run_load
from bench.upstream_sim import Simulator, run_simulator

LATENCY_FIELDS = {"count", "p50", "p95", "p99", "max", "mean"}


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with run_simulator(latency_ms=200) as simulator:
        yield simulator


def load(target: Target, **kwargs: Any) -> dict[str, Any]:
    return asyncio.run(run_load(target, **kwargs))


def test_result_has_the_documented_fields(sim: Simulator) -> None:
    result = load(Target.chat(sim.url, "sim-model"), rate=20, duration_s=0.5)
    assert {"sent", "ok", "errors", "error_count", "error_rate", "throughput_rps", "elapsed_s"} <= set(result)
    assert set(result["latency_ms"]) == LATENCY_FIELDS
    assert result["config"]["mode"] == "open"
    assert result["sent"] == result["ok"] == 10
    assert result["errors"] == {}
    assert 195 <= result["latency_ms"]["p50"] < 400


def test_open_loop_latency_counts_queueing_from_the_intended_send_time(sim: Simulator) -> None:
    """Two connections to a 200 ms upstream serve 10 req/s; asked for 30 req/s, the queue must show.

    A closed-loop (or coordinated-omission) generator would report ~200 ms for every request here.
    """
    target = Target.chat(sim.url, "sim-model")
    closed = load(target, mode="closed", clients=2, duration_s=1.0, connections=2)
    opened = load(target, rate=30, duration_s=1.5, connections=2, timeout_s=15)
    assert closed["latency_ms"]["p99"] < 400
    assert opened["ok"] == 45
    # 45 requests at 10/s take 4.5 s; the last one was due at 1.5 s, so it waited ~3 s.
    assert opened["latency_ms"]["max"] > 2500
    assert opened["latency_ms"]["p50"] > 1000
    seconds = opened["by_second"]
    assert seconds[-1]["p50"] > 2 * seconds[0]["p50"]


def test_streams_record_time_to_first_token_and_gaps(sim: Simulator) -> None:
    sim.configure(tokens=5, tokens_per_s=20, latency_ms=100)
    try:
        result = load(Target.chat(sim.url, "sim-model", stream=True), rate=10, duration_s=0.5)
    finally:
        sim.reset()
    assert result["ok"] == 5
    assert 95 <= result["ttft_ms"]["p50"] < 300
    assert 40 <= result["inter_token_ms"]["p50"] < 80
    assert result["tokens_per_stream"]["p50"] == 5
    assert result["peak_open_streams"] >= 1


@pytest.mark.parametrize(
    ("fault", "kind"), [("503", "http_503"), ("cut", "truncated"), ("malformed", "bad_response")]
)
def test_errors_are_counted_by_kind(sim: Simulator, fault: str, kind: str) -> None:
    target = Target.chat(sim.url, "sim-model", stream=True, headers={"X-Sim-Fault": fault})
    result = load(target, rate=20, duration_s=0.2)
    assert result["errors"] == {kind: 4}
    assert result["ok"] == 0
    assert result["error_rate"] == 1.0


def test_timeouts_are_errors_not_latencies(sim: Simulator) -> None:
    target = Target.chat(sim.url, "sim-model", headers={"X-Sim-Latency-Ms": "2000"})
    result = load(target, rate=10, duration_s=0.2, timeout_s=0.5)
    assert result["errors"] == {"timeout": 2}
    assert result["latency_ms"]["count"] == 0
