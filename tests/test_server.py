"""The real thing: gunicorn with 2 gevent workers, as `make run` starts it."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

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


def test_gunicorn_two_gevent_workers(sqlite_url, redis_url):
    with GunicornServer({"DATABASE_URL": sqlite_url, "REDIS_URL": redis_url}, workers=2) as server:
        assert requests.get(server.url + "/readyz", timeout=10).status_code == 200
        docs = requests.get(server.url + "/docs", timeout=10)
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        validate(requests.get(server.url + "/openapi.json", timeout=10).json())

        # Many short-lived connections at once, so both workers accept some.
        def hit(_: int) -> int:
            with requests.Session() as s:
                return s.get(server.url + "/healthz", headers={"Connection": "close"}, timeout=10).status_code

        with ThreadPoolExecutor(32) as pool:
            statuses = list(pool.map(hit, range(400)))
        assert statuses.count(200) == 400

        metrics = requests.get(server.url + "/metrics", timeout=10)
        assert metrics.status_code == 200
        served = _served_by(server.log())
        assert len(served) == 2, f"expected both workers to serve, got {served}"
        # /metrics aggregates every worker's samples: the readiness-probe polls plus our 400.
        total = _metric_total(metrics.text, "/healthz")
        assert total == sum(served.values()) and total >= 400
        assert "gateway_http_requests_in_flight" in metrics.text
        code = server.stop()
    assert code == 0
    assert "Traceback" not in server.log()
