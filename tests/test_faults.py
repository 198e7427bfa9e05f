"""The fault suite: a real 2-worker gunicorn+gevent gateway over PostgreSQL and Redis, under a steady
background load against the upstream simulator, while one dependency fails under it.

- Redis is killed and restarted (a private redis-server): fail-open keeps serving and the limits come
  back with it; fail-closed answers 503 in our error shape; no 500s, no stuck workers.
- PostgreSQL crashes and restarts (a private cluster): not one audit record is lost, the spool replays
  in order, `flask audit verify` passes.
- A worker is killed with SIGKILL mid-stream: the client sees the connection end (no hang), the other
  worker serves on, and the model slots and in-flight gauges return to their baseline.
- The upstream sends malformed JSON, cuts its answers, hangs before or during them: each is an error in
  our shape (502/504, or an SSE error event once a stream has started) within the model's deadline.

Each test prints one FAULT line with what it measured (run with -s to see them).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from sqlalchemy import create_engine, func, select

from app.governance.audit.models import AuditRecord
from bench.upstream_sim import Simulator, run_simulator
from config import normalise_database_url
from tests import support
from tests.support import CHAT, STREAM, GunicornServer, Outcome, SteadyLoad, metric

pytestmark = [pytest.mark.fault, pytest.mark.server, pytest.mark.postgres, pytest.mark.redis]

# The upstream deadline the fault cases are held to, and the silence that ends a stalled stream.
FIRST_BYTE_TIMEOUT_S = 1.0
DEADLINE_S = 3.0
# What the gateway may add to an upstream deadline (auth, limits, policy, audit, the client's socket),
# on top of what its healthy requests take at the same moment on this shared machine.
SLACK_S = 1.0
# gateway_http_requests_in_flight of an idle gateway: the /metrics request counts itself.
IDLE = 1.0


@pytest.fixture(scope="module")
def simulator():
    with run_simulator(latency_ms=2) as sim:
        yield sim


def upstream_model(name: str, base_url: str) -> str:
    """A catalogue entry; `slow-*` models are slow on purpose, so their deadline leaves room for it."""
    first_byte_s, deadline_s = (5.0, 10.0) if name.startswith("slow-") else (FIRST_BYTE_TIMEOUT_S, DEADLINE_S)
    return (
        f"  - name: {name}\n"
        "    backend: openai_compatible\n"
        "    params:\n"
        f"      base_url: {base_url}\n"
        "      model: sim-model\n"
        f"      first_byte_timeout_s: {first_byte_s}\n"
        f"      deadline_s: {deadline_s}\n"
        "      max_retries: 1\n"
        "      retry_backoff_s: 0.05\n"
        # The fault cases check each failure's own mapping, not the breaker (tested on its own).
        "      breaker_fail_max: 1000\n"
        "    limits:\n"
        "      max_queue: 0\n"
    )


def gateway_env(tmp_path: Path, database_url: str, redis_url: str, models: dict[str, str]) -> dict[str, str]:
    catalogue = tmp_path / "models.yaml"
    catalogue.write_text("models:\n" + "".join(upstream_model(n, url) for n, url in models.items()))
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "MODELS_CONFIG": str(catalogue),
        "MODELS_DIR": str(tmp_path),
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "RATE_LIMIT_DEFAULT": "1000000/minute",
        "AUTH_KEY_CACHE_TTL": "600",  # an outage of the database must not become one of authentication
        "REGISTRY_POLL": "0.5",
    }


def sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def statuses(outcomes: list[Outcome]) -> Counter:
    return Counter(o.status for o in outcomes)


def chat(url: str, key: str, body: dict | None = None) -> requests.Response:
    return requests.post(
        url + "/v1/chat/completions",
        json=body or CHAT,
        headers={"Authorization": f"Bearer {key}", "Connection": "close"},
        timeout=15,
    )


def assert_workers_healthy(server: GunicornServer, workers: set[int]) -> None:
    """No worker was killed by the heartbeat (a blocked hub) or died; both still answer."""
    assert support.worker_pids(server) == workers, server.log()[-3000:]
    assert "WORKER TIMEOUT" not in server.log()


def wait_for_metric(url: str, name: str, expected: float, timeout_s: float = 15, **labels: str) -> float:
    deadline = time.monotonic() + timeout_s
    while (value := metric(url, name, **labels)) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def wait_for_idle(sim: Simulator, timeout_s: float = 10) -> int:
    """The simulator's requests in flight once they reach 0, or what is left after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while (open_requests := sim.stats()["in_flight"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return open_requests


# --- Redis ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
def test_redis_restarted_mid_load(postgres_url, simulator, tmp_path, fail_open):
    key = support.issue_key(postgres_url, "acme")
    tight = support.issue_key(postgres_url, "tight", rate_limit="3/minute")
    # `slow-chat` answers after 1.5 s: one of its calls is admitted before Redis dies and answered after.
    with support.RedisServer() as redis_server, run_simulator(latency_ms=1500) as slow:
        models = {"upstream-chat": simulator.base_url, "slow-chat": slow.base_url}
        env = gateway_env(tmp_path, postgres_url, redis_server.url, models)
        env["RATELIMIT_FAIL_OPEN"] = str(fail_open).lower()
        with GunicornServer(env, workers=2, ready_path="/readyz") as server:
            assert [chat(server.url, tight).status_code for _ in range(4)] == [200, 200, 200, 429]
            workers = support.worker_pids(server)
            assert wait_for_metric(server.url, "gateway_http_requests_in_flight", IDLE) == IDLE
            # 10 s: Redis is back at about 3.5 s, and the phase after it must be long enough to judge
            # even when a loaded machine is slow to restart it.
            with SteadyLoad(server.url, key, rate=60, seconds=10) as load, ThreadPoolExecutor(1) as pool:
                sleep_until(load.started_at + 1.0)
                admitted = pool.submit(chat, server.url, key, {**CHAT, "model": "slow-chat"})
                while not slow.stats()["in_flight"]:
                    time.sleep(0.01)
                sleep_until(load.started_at + 1.5)
                redis_server.kill()
                killed_at = time.monotonic()
                sleep_until(load.started_at + 3.5)
                restart_at = time.monotonic()
                redis_server.start()
                back_at = time.monotonic()
                admitted_answer = admitted.result()
            outcomes = load.wait()
            # Redis came back empty: a fresh window, and the tight tenant is held to its limit again.
            assert [chat(server.url, tight).status_code for _ in range(4)] == [200, 200, 200, 429]
            in_flight = wait_for_metric(server.url, "gateway_http_requests_in_flight", IDLE)
            assert_workers_healthy(server, workers)
            log = server.log()

    assert all(o.status is not None and o.well_formed for o in outcomes), [
        o for o in outcomes if not o.well_formed
    ]
    assert statuses(outcomes)[500] == 0, [line for line in log.splitlines() if '"error"' in line][:3]
    assert in_flight == IDLE, "every request, refused or not, is done"
    # Admitted while Redis was up, answered once it was gone: served, with the window read at admission.
    assert admitted_answer.status_code == 200, admitted_answer.text
    assert fail_open or admitted_answer.headers["X-RateLimit-Limit"] == "1000000"
    # Sent after Redis died and answered before it was started again (`back_at`: it answers PING).
    during = [o for o in outcomes if o.sent_at > killed_at and o.done_at < restart_at]
    after = [o for o in outcomes if o.sent_at > back_at]
    # Enough of each phase to judge it; how many the load reached depends on the machine's load.
    phases = (len(during), len(after), round(back_at - load.started_at, 2))
    assert len(during) >= 5 and len(after) >= 10, phases
    if fail_open:
        assert statuses(outcomes) == {200: len(outcomes)}
        assert not any(o.limited for o in during), "limits are off while their storage is gone"
    else:
        assert set(statuses(outcomes)) <= {200, 503}
        assert {(o.status, o.code) for o in during} == {(503, "rate_limit_unavailable")}
    recovered = next((o for o in after if o.status == 200 and o.limited), None)
    assert recovered is not None, "limits resume once Redis is back"
    recovery_s = recovered.sent_at - back_at
    assert all(o.status == 200 and o.limited for o in after if o.sent_at > back_at + 1.0)
    print(
        f"\nFAULT redis {'fail-open' if fail_open else 'fail-closed'}: {len(outcomes)} requests, "
        f"{dict(statuses(outcomes))}, 500s: {statuses(outcomes)[500]}, "
        f"outage {restart_at - killed_at:.1f}s, limits back {recovery_s * 1000:.0f} ms after Redis"
    )


# --- PostgreSQL -----------------------------------------------------------------------------------


def snapshot_spool(spool: Path, seen: dict[str, list[str]]) -> None:
    """Record the order of the rows in each spool file so far (append-only: a prefix keeps its order)."""
    import json

    for path in spool.glob("*.jsonl"):
        with open(path) as f:
            lines = [line for line in f.read().split("\n")[:-1] if line]
        rows = [json.loads(line)["record_id"] for line in lines]
        if len(rows) > len(seen.get(path.name, [])):
            seen[path.name] = rows


def test_postgres_restarted_mid_load_loses_no_audit_record(simulator, tmp_path):
    redis_url = support.require_service("TEST_REDIS_URL")
    support.flush_redis(redis_url)
    with support.PostgresCluster() as pg:
        support.migrate(pg.url)
        key = support.issue_key(pg.url, "acme")
        engine = create_engine(normalise_database_url("DATABASE_URL", pg.url))
        env = gateway_env(tmp_path, pg.url, redis_url, {"upstream-chat": simulator.base_url})
        spool = tmp_path / "instance" / "audit-spool"
        with GunicornServer(env, workers=2, ready_path="/readyz") as server:
            warmed = support.warm_every_worker(server, lambda: chat(server.url, key))
            spooled: dict[str, list[str]] = {}
            with SteadyLoad(server.url, key, rate=60, seconds=8) as load:
                sleep_until(load.started_at + 1.5)
                pg.crash()
                down_at = time.monotonic()
                while time.monotonic() < load.started_at + 4.0:
                    snapshot_spool(spool, spooled)
                    time.sleep(0.05)
                pg.start()
                up_at = time.monotonic()
                drained_at = None
                while drained_at is None and time.monotonic() < load.started_at + 8:
                    snapshot_spool(spool, spooled)
                    drained_at = None if list(spool.glob("*.jsonl")) else time.monotonic()
                    time.sleep(0.05)
            outcomes = load.wait()
            served = warmed + [o.request_id for o in outcomes if o.status is not None]
            deadline = time.monotonic() + 30
            while (
                list(spool.glob("*.jsonl")) or count(engine) < len(served)
            ) and time.monotonic() < deadline:
                time.sleep(0.1)
            drained_s = (drained_at or time.monotonic()) - up_at
            assert not list(spool.glob("*.jsonl")), "the spool is drained once replayed"
            assert metric(server.url, "gateway_audit_spooled_total") > 0
            assert metric(server.url, "gateway_audit_replayed_total") > 0
            log = server.log()

        assert statuses(outcomes) == {200: len(outcomes)}, [o for o in outcomes if o.status != 200][:5]
        during = [o for o in outcomes if down_at < o.sent_at < up_at]
        assert len(during) >= 5, "requests go on while the database is down"
        assert sum(len(rows) for rows in spooled.values()) > 0, "records were spooled during the outage"

        with engine.connect() as conn:
            rows = conn.execute(select(AuditRecord.record_id, AuditRecord.request_id, AuditRecord.seq)).all()
        engine.dispose()
        ids = [row.request_id for row in rows]
        lost = len(set(served) - set(ids))
        assert len(ids) == len(set(ids)), "no record written twice"
        assert sorted(ids) == sorted(served), f"exactly one record per request served; {lost} lost"
        # In order: within each spool file, the replayed records took their chain positions in file order.
        seq_of = {row.record_id: row.seq for row in rows}
        for name, record_ids in spooled.items():
            assert [seq_of[r] for r in record_ids] == sorted(seq_of[r] for r in record_ids), name

        verified = subprocess.run(
            [sys.executable, "-m", "flask", "--app", "app:create_app", "audit", "verify"],
            env={**os.environ, **env, "LOG_LEVEL": "ERROR"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert '"ok": true' in verified.stdout and f'"records": {len(served)}' in verified.stdout
        assert "Traceback" not in log
    print(
        f"\nFAULT postgres restart: {len(served)} requests served, {len(ids)} records, {lost} lost, "
        f"{sum(len(r) for r in spooled.values())} spooled in {len(spooled)} file(s), 5xx: 0, "
        f"outage {up_at - down_at:.1f}s, spool drained {drained_s:.1f}s after PostgreSQL was back"
    )


def count(engine) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(func.count()).select_from(AuditRecord))


# --- a worker killed mid-stream -------------------------------------------------------------------


def open_raw_stream(url_port: int, key: str, body: bytes) -> socket.socket:
    """A stream on a socket of our own, so the test knows its port and sees exactly how it ends."""
    sock = socket.create_connection(("127.0.0.1", url_port), timeout=10)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def test_worker_killed_mid_stream(postgres_url, redis_url, simulator, tmp_path):
    import json

    key = support.issue_key(postgres_url, "acme")
    # `slow-chat` streams 60 tokens at 10 a second: six seconds long unless its worker dies.
    with run_simulator(latency_ms=2, tokens=60, tokens_per_s=10) as slow:
        models = {"upstream-chat": simulator.base_url, "slow-chat": slow.base_url}
        env = gateway_env(tmp_path, postgres_url, redis_url, models)
        with GunicornServer(env, workers=2, ready_path="/readyz") as server:
            assert wait_for_metric(server.url, "gateway_http_requests_in_flight", IDLE) == IDLE
            assert metric(server.url, "gateway_model_slots_in_use") == 0
            workers = support.worker_pids(server)
            with SteadyLoad(server.url, key, rate=50, seconds=6) as load:
                body = {**STREAM, "model": "slow-chat", "max_tokens": 60}
                stream = open_raw_stream(server.port, key, json.dumps(body).encode())
                received = stream.recv(65536)
                while b"tok0" not in received:
                    received += stream.recv(65536)
                victim = support.socket_owner(workers, server.port, stream.getsockname()[1])
                assert victim is not None
                assert metric(server.url, "gateway_model_slots_in_use", model="slow-chat") == 1
                sleep_until(load.started_at + 2.0)
                kill_at = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                dead_at = support.wait_until_dead(victim)
                ended = ""
                try:
                    while chunk := stream.recv(65536):
                        received += chunk
                    ended = "closed"
                except ConnectionResetError:
                    ended = "reset"
                except TimeoutError:
                    ended = "hang"
                end_s = time.monotonic() - dead_at
                stream.close()
            outcomes = load.wait()
            respawned = support.wait_for_workers(server, 2)
            in_flight = wait_for_metric(server.url, "gateway_http_requests_in_flight", IDLE)
            slots = wait_for_metric(server.url, "gateway_model_slots_in_use", 0)
            upstream_streams = slow.stats()["in_flight_streams"]

    assert ended in ("closed", "reset"), f"the client's stream must end, not hang ({ended})"
    assert b"[DONE]" not in received
    assert victim not in respawned and len(respawned & workers) == 1
    cut = [o for o in outcomes if o.status is None or not o.well_formed]
    after = [o for o in outcomes if o.sent_at > dead_at]
    # Failed: only requests the dead worker held (sent before it was gone, ended once it was killed).
    assert all(o.sent_at < dead_at and o.done_at > kill_at for o in cut), (kill_at, dead_at, cut)
    assert len(after) > 100 and all(o.status == 200 and o.well_formed for o in after)
    assert all(o.status == 200 for o in outcomes if o.status is not None)
    assert in_flight == IDLE, "the dead worker's in-flight requests no longer count"
    assert slots == 0, "the dead worker's model slots no longer count"
    assert upstream_streams == 0, "the upstream saw the dead worker's stream go away"
    print(
        f"\nFAULT worker kill -9 mid-stream: stream {ended} {end_s * 1000:.0f} ms after the kill; "
        f"{len(outcomes)} requests, {len(cut)} cut with the worker, {len(after)} sent after it, all 200; "
        f"in-flight {in_flight:g} (idle {IDLE:g}), slots {slots:g}"
    )


# --- upstream faults ------------------------------------------------------------------------------

# (fault, stream?) -> (status, error code, whether the error arrives as an SSE event after a 200)
UPSTREAM_CASES = {
    ("malformed", False): (502, "upstream_error", False),
    ("cut", False): (502, "upstream_error", False),
    ("timeout", False): (504, "upstream_timeout", False),
    ("stall", False): (504, "upstream_timeout", False),
    # The simulator's malformed stream breaks its first token, before our response has started.
    ("malformed", True): (502, "upstream_stream_interrupted", False),
    ("cut", True): (200, "upstream_stream_interrupted", True),
    ("timeout", True): (504, "upstream_timeout", False),
    ("stall", True): (200, "upstream_timeout", True),
}


def probe(url: str, key: str, fault: str, stream: bool) -> tuple[float, int, str | None, bool, str]:
    started = time.monotonic()
    body = {**(STREAM if stream else CHAT), "model": f"faulty-{fault}"}
    resp = requests.post(
        url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=DEADLINE_S + 10,
        stream=True,
    )
    is_sse = resp.headers.get("Content-Type", "").startswith("text/event-stream")
    code, well_formed = support.read_answer(resp)
    assert well_formed, (fault, stream, resp.status_code)
    return time.monotonic() - started, resp.status_code, code, is_sse, resp.headers.get("X-Request-ID", "")


def test_upstream_faults_map_to_clean_errors_within_the_deadline(
    postgres_url, redis_url, simulator, tmp_path
):
    key = support.issue_key(postgres_url, "acme")
    faults = ("malformed", "cut", "timeout", "stall")
    with (
        run_simulator(latency_ms=2, tokens=8, fault="malformed", fault_rate=1) as malformed,
        run_simulator(latency_ms=2, tokens=8, fault="cut", fault_rate=1) as cut,
        run_simulator(latency_ms=2, tokens=8, fault="timeout", fault_rate=1) as hang,
        run_simulator(latency_ms=2, tokens=8, fault="stall", fault_rate=1) as stall,
    ):
        sims: dict[str, Simulator] = dict(zip(faults, (malformed, cut, hang, stall), strict=True))
        models = {"upstream-chat": simulator.base_url} | {f"faulty-{f}": s.base_url for f, s in sims.items()}
        env = gateway_env(tmp_path, postgres_url, redis_url, models)
        with GunicornServer(env, workers=2, ready_path="/readyz") as server:
            workers = support.worker_pids(server)
            assert wait_for_metric(server.url, "gateway_http_requests_in_flight", IDLE) == IDLE
            with SteadyLoad(server.url, key, rate=60, seconds=6) as load, ThreadPoolExecutor(8) as pool:
                sleep_until(load.started_at + 1.0)
                probed_at = time.monotonic()
                answers = pool.map(lambda case: probe(server.url, key, *case), UPSTREAM_CASES)
                results = dict(zip(UPSTREAM_CASES, answers, strict=True))
                probed_until = time.monotonic()
            outcomes = load.wait()
            assert wait_for_metric(server.url, "gateway_http_requests_in_flight", IDLE) == IDLE
            upstream_open = {f: wait_for_idle(s) for f, s in sims.items()}
            assert_workers_healthy(server, workers)
            log = server.log()

    healthy = sorted(o.done_at - o.sent_at for o in outcomes if probed_at < o.sent_at < probed_until)
    bound_s = DEADLINE_S + SLACK_S + healthy[int(len(healthy) * 0.99)]
    wrong = {
        case: results[case]
        for case, expected in UPSTREAM_CASES.items()
        if results[case][1:4] != expected or results[case][0] >= bound_s or not results[case][4]
    }
    assert wrong == {}, (
        f"(elapsed, status, code, as SSE event, request id) beyond {bound_s:.2f}s or not as expected"
    )
    assert upstream_open == dict.fromkeys(faults, 0), "every upstream connection of a failed call is closed"
    assert statuses(outcomes) == {200: len(outcomes)}, "a failing upstream leaves the others' traffic alone"
    assert all(o.well_formed for o in outcomes)
    assert "Traceback" not in log
    figures = ", ".join(
        f"{fault}{'/stream' if stream else ''}: {results[fault, stream][1]} "
        f"{results[fault, stream][2]} in {results[fault, stream][0]:.2f}s"
        for fault, stream in UPSTREAM_CASES
    )
    print(
        f"\nFAULT upstream (deadline {DEADLINE_S:g}s, bound {bound_s:.2f}s, "
        f"load {len(outcomes)} requests all 200): {figures}"
    )
