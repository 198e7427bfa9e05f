"""A full admission gate on a real gunicorn + gevent worker: its 503 is written by the worker before
gunicorn's HTTP parser on a new connection, probes still go through, and service resumes.

The worker's own answers are told from gunicorn's by the `Server: gunicorn` header, which gunicorn
adds to everything it answers and the worker's refusal does not.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bench.upstream_sim import run_simulator
from tests import support
from tests.support import GunicornServer
from tests.test_auth_throttle_server import connect, read_answer
from tests.test_faults import CHAT, chat, gateway_env

pytestmark = pytest.mark.server


def get(path: str, key: str = "") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return f"GET {path} HTTP/1.1\r\nHost: gateway\r\n{auth}X-Request-ID: gate-probe\r\n\r\n".encode()


def test_a_full_gate_is_refused_before_gunicorns_parser(sqlite_url, redis_url, tmp_path):
    key = support.issue_key(sqlite_url, "acme")
    with run_simulator(latency_ms=3000) as slow:
        env = gateway_env(tmp_path, sqlite_url, redis_url, {"slow-chat": slow.base_url})
        env |= {"MAX_IN_FLIGHT": "1", "MAX_PENDING": "0"}
        with GunicornServer(env, workers=1, ready_path="/readyz") as server, ThreadPoolExecutor(1) as pool:
            held = pool.submit(chat, server.url, key, {**CHAT, "model": "slow-chat"})
            deadline = time.monotonic() + 30
            while not slow.stats()["in_flight"]:  # the one place is taken, for three seconds
                assert time.monotonic() < deadline and not held.done()
                time.sleep(0.01)
            with connect(server, "127.0.0.1") as sock, sock.makefile("rb") as reader:
                # A gated route, twice, then a probe and a gated route again, on one new connection.
                sock.sendall(get("/v1/models", key) * 2 + get("/healthz") + get("/v1/models", key))
                refused = [read_answer(reader) for _ in range(2)]
                probe, in_gunicorn = read_answer(reader), read_answer(reader)
            for answer in refused:
                assert answer.status == 503 and "server" not in answer.headers  # the worker's own
                assert answer.headers["retry-after"] == "1"
                assert answer.headers["connection"] == "keep-alive"
                body = json.loads(answer.body)
                assert body["error"]["code"] == "server_overloaded" and body["request_id"] == "gate-probe"
            assert probe.status == 200 and probe.headers["server"] == "gunicorn"
            # Once handed to gunicorn, the connection's refusal is the app's, which closes it.
            assert in_gunicorn.status == 503 and in_gunicorn.headers["server"] == "gunicorn"
            assert in_gunicorn.headers["connection"] == "close"
            assert json.loads(in_gunicorn.body)["error"]["code"] == "server_overloaded"
            assert held.result(timeout=30).status_code == 200
            # The burst is over: served again, on a new connection as on an old one.
            assert requests.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).ok
            metrics = requests.get(server.url + "/metrics", timeout=10).text
        refusals = [
            line for line in metrics.splitlines() if line.startswith("gateway_admission_rejected_total")
        ]
        assert sum(float(line.split()[-1]) for line in refusals) == 3
        assert "Traceback" not in server.log()
