"""The real thing: gunicorn with 2 gevent workers, as `make run` starts it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from openapi_spec_validator import validate

from tests.support import GunicornServer

pytestmark = pytest.mark.server


def _served_by(log: str) -> dict[int, int]:
    """Requests per worker pid, from the JSON access log lines."""
    counts: dict[int, int] = {}
    for line in log.splitlines():
        if '"event": "request"' in line:
            entry = json.loads(line)
            if entry["path"] == "/healthz":
                counts[entry["pid"]] = counts.get(entry["pid"], 0) + 1
    return counts


def _metric_total(text: str, route: str) -> float:
    pattern = re.compile(
        r'^flask_http_request_duration_seconds_count\{[^}]*url_rule="'
        + re.escape(route)
        + r'"[^}]*\} (\S+)$',
        re.M,
    )
    return sum(float(v) for v in pattern.findall(text))


def _seed_stale_samples(directory: Path) -> None:
    """What a previous run leaves behind: 1,000 /healthz requests by a process long gone."""
    directory.mkdir(parents=True, exist_ok=True)
    code = (
        "from prometheus_client import Histogram\n"
        "h = Histogram('flask_http_request_duration_seconds', 'x', ['method', 'status', 'url_rule'])\n"
        "for _ in range(1000): h.labels('GET', '200', '/healthz').observe(0.001)\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60)
    assert any(directory.glob("histogram_*.db"))


def test_gunicorn_two_gevent_workers(sqlite_url, redis_url):
    """/metrics sums every worker's samples, those of workers since recycled included.

    MAX_REQUESTS=50 recycles workers: a worker that has served 50 requests stops accepting
    (gunicorn looks once a second, so it may serve a second's worth more) and is replaced. So the
    test sends batches until a third process has served, which recycling guarantees whichever
    worker the kernel hands each connection to; the bound only stops a broken server."""
    env = {"DATABASE_URL": sqlite_url, "REDIS_URL": redis_url, "MAX_REQUESTS": "50"}
    server = GunicornServer(env, workers=2)
    _seed_stale_samples(Path(server.env["PROMETHEUS_MULTIPROC_DIR"]))
    with server:
        assert requests.get(server.url + "/readyz", timeout=10).status_code == 200
        docs = requests.get(server.url + "/docs", timeout=10)
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        validate(requests.get(server.url + "/openapi.json", timeout=10).json())

        # Many short-lived connections at once.
        def hit(_: int) -> int:
            with requests.Session() as s:
                # Generous: when both workers reach MAX_REQUESTS together, connections wait in the
                # backlog while replacements boot, which takes tens of seconds on a loaded machine.
                # What is asserted is that every request is served, not how fast.
                return s.get(
                    server.url + "/healthz", headers={"Connection": "close"}, timeout=120
                ).status_code

        sent = 0
        with ThreadPoolExecutor(32) as pool:
            while sent < 4000:
                statuses = list(pool.map(hit, range(200)))
                assert statuses.count(200) == 200, statuses
                sent += 200
                if len(_served_by(server.log())) >= 3:
                    break

        metrics = requests.get(server.url + "/metrics", timeout=10)
        assert metrics.status_code == 200
        served = _served_by(server.log())
        assert len(served) >= 3, f"expected recycled workers to have served, got {served} in {sent}"
        # /metrics aggregates every worker's samples, live and recycled: the readiness-probe polls
        # plus ours, and none of the stale run's 1,000 (the directory is wiped at start).
        total = _metric_total(metrics.text, "/healthz")
        assert total == sum(served.values()) and total >= sent
        # Summed over live workers; the only request in flight is this scrape.
        assert re.search(r"^gateway_http_requests_in_flight(\{\})? 1\.0$", metrics.text, re.M), metrics.text
        code = server.stop()
    assert code == 0
    assert "Traceback" not in server.log()
    line = next(json.loads(x) for x in server.log().splitlines() if '"path": "/openapi.json"' in x)
    assert {"request_id", "method", "route", "status", "duration_ms", "tenant", "pid", "timestamp"} <= set(
        line
    )
    assert line["route"] == "/openapi.json" and line["status"] == 200 and line["method"] == "GET"
    assert len(line["request_id"]) == 32 and line["duration_ms"] > 0
