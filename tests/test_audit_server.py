"""The audit trail on a real 2-worker gunicorn+gevent gateway over PostgreSQL and Redis, in front of
the upstream simulator: one record per request under concurrency, and nothing lost or duplicated
when the database disappears mid-run (cut at a TCP proxy; the real PostgreSQL keeps running)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests
from sqlalchemy import create_engine, func, select

from app.governance.audit.models import AuditRecord
from app.governance.audit.verify import all_chains, verify
from bench.upstream_sim import run_simulator
from config import normalise_database_url
from tests import support

pytestmark = [pytest.mark.server, pytest.mark.postgres, pytest.mark.redis]

CHAT = {"model": "upstream-chat", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}


class TcpProxy:
    """A loopback TCP relay the test can cut (listener and every connection) and restore, so the
    gateway loses its database while PostgreSQL itself, shared with other tests, keeps running."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = support.free_port()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        self._listener = socket.create_server(("127.0.0.1", self.port))  # SO_REUSEADDR: restartable
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        return self

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        self._close(src, dst)

    def _close(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with self._lock:
                self._sockets.discard(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def cut(self) -> None:
        """The database is gone: new connections are refused, open ones are reset."""
        assert self._listener is not None
        self._close(self._listener)  # shutdown() wakes the accept() blocked in its thread
        with self._lock:
            open_sockets = list(self._sockets)
        self._close(*open_sockets)


@pytest.fixture(scope="module")
def simulator():
    with run_simulator(latency_ms=2) as sim:
        yield sim


def catalogue(tmp_path: Path, base_url: str) -> str:
    path = tmp_path / "models.yaml"
    path.write_text(
        "models:\n"
        "  - name: upstream-chat\n"
        "    backend: openai_compatible\n"
        "    params:\n"
        f"      base_url: {base_url}\n"
        "      model: sim-model\n"
        "      first_byte_timeout_s: 5\n"
        "      deadline_s: 10\n"
        "    limits:\n"
        "      max_queue: 0\n"
    )
    return str(path)


def gateway_env(tmp_path: Path, database_url: str, simulator, redis_url: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "MODELS_CONFIG": catalogue(tmp_path, simulator.base_url),
        "MODELS_DIR": str(tmp_path),
        "INSTANCE_PATH": str(tmp_path / "instance"),
        "RATE_LIMIT_DEFAULT": "1000000/minute",
        "AUTH_KEY_CACHE_TTL": "600",  # the outage must outlast nothing but the database
    }


def send(session: requests.Session, url: str, key: str, index: int) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if index % 10 == 9:
        resp = session.get(url + "/v1/models", headers=headers, timeout=30)
    elif index % 10 == 8:
        resp = session.post(url + "/v1/chat/completions", json=STREAM, headers=headers, timeout=30)
        assert resp.text.rstrip().endswith("data: [DONE]"), resp.text
    else:
        resp = session.post(url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=30)
    assert "X-Request-ID" in resp.headers, (resp.status_code, resp.headers, resp.text[:500])
    return resp.status_code, resp.headers["X-Request-ID"]


def audit_rows(engine) -> list[tuple[str, int, str | None]]:
    with engine.connect() as conn:
        stmt = select(AuditRecord.request_id, AuditRecord.status, AuditRecord.model)
        return [tuple(row) for row in conn.execute(stmt)]


def wait_for_count(engine, expected: int, timeout_s: float = 30) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        with engine.connect() as conn:
            count = conn.scalar(select(func.count()).select_from(AuditRecord))
        if count >= expected or time.monotonic() > deadline:
            return count
        time.sleep(0.2)


def metric(url: str, name: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_every_one_of_a_thousand_concurrent_requests_has_exactly_one_record(
    postgres_url, simulator, tmp_path
):
    redis_url = support.require_service("TEST_REDIS_URL")
    support.flush_redis(redis_url)
    key = support.issue_key(postgres_url, "acme")
    admin = support.issue_key(postgres_url, "platform", ("admin",))
    engine = create_engine(normalise_database_url("DATABASE_URL", postgres_url))
    env = gateway_env(tmp_path, postgres_url, simulator, redis_url)
    with support.GunicornServer(env, workers=2, ready_path="/readyz") as server:
        with ThreadPoolExecutor(50) as pool:
            sessions = threading.local()

            def one(index: int) -> tuple[int, str]:
                if not hasattr(sessions, "s"):
                    sessions.s = requests.Session()
                return send(sessions.s, server.url, key, index)

            results = list(pool.map(one, range(1000)))
        assert Counter(status for status, _ in results) == {200: 1000}
        assert wait_for_count(engine, 1000) == 1000, server.log()[-3000:]
        report = requests.get(
            server.url + "/v1/governance/audit/verify",
            headers={"Authorization": f"Bearer {admin}"},
            timeout=30,
        ).json()
        assert report["ok"] is True and report["records"] == 1000, report
        assert metric(server.url, "gateway_audit_written_total") == 1000
        assert metric(server.url, "gateway_audit_spooled_total") == 0

    rows = audit_rows(engine)
    sent = [request_id for _, request_id in results]
    assert len(set(sent)) == 1000
    assert sorted(r[0] for r in rows) == sorted(sent), "exactly one record per request"
    assert {(status, model) for _, status, model in rows} == {(200, "upstream-chat"), (200, None)}
    with engine.connect() as conn:
        assert verify(conn, all_chains(conn))["ok"] is True
    engine.dispose()


class Load:
    """Client threads sending requests back to back until stopped; every answer is kept."""

    def __init__(self, url: str, key: str, threads: int) -> None:
        self.url, self.key = url, key
        self.results: list[tuple[float, int, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, n: int) -> None:
        session = requests.Session()
        index = n
        while not self._stop.is_set():
            try:
                status, request_id = send(session, self.url, self.key, index)
            except (requests.RequestException, AssertionError) as exc:
                with self._lock:
                    self.errors.append(repr(exc))
                continue
            with self._lock:
                self.results.append((time.monotonic(), status, request_id))
            index += len(self._threads)
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def served_since(self, moment: float) -> int:
        with self._lock:
            return sum(1 for t, _, _ in self.results if t > moment)


def test_kill_the_database_requests_go_on_and_no_record_is_lost_or_duplicated(
    postgres_url, simulator, tmp_path
):
    redis_url = support.require_service("TEST_REDIS_URL")
    support.flush_redis(redis_url)
    # A tenant without a token quota: with one, settling usage needs the ledger; see quota.py.
    key = support.issue_key(postgres_url, "acme")
    parts = urlsplit(postgres_url)
    proxy = TcpProxy(parts.port or 5432).start()
    via_proxy = urlunsplit(parts._replace(netloc=f"{parts.username}@127.0.0.1:{proxy.port}"))
    engine = create_engine(normalise_database_url("DATABASE_URL", postgres_url))
    env = gateway_env(tmp_path, via_proxy, simulator, redis_url)
    spool = tmp_path / "instance" / "audit-spool"
    with support.GunicornServer(env, workers=2, ready_path="/readyz") as server:
        # Both workers must have verified the key (cached) before the database goes away. Which
        # worker accepts a connection is the kernel's choice, so send one request at a time on
        # fresh connections until each worker has served one (bounded; an idle worker waiting in
        # accept takes the next connection while the busy one finishes its last).
        warmup: list[str] = []
        for _ in range(300):
            with requests.Session() as fresh:
                warmup.append(send(fresh, server.url, key, 0)[1])
            if len(support.workers_seen(server)) == 2:
                break
        assert len(support.workers_seen(server)) == 2, f"one worker served all {len(warmup)} warm-up requests"

        with Load(server.url, key, threads=4) as load:
            time.sleep(1.5)
            proxy.cut()
            cut_at = time.monotonic()
            spool_files: list[str] = []
            while time.monotonic() - cut_at < 4:
                spool_files = spool_files or [p.name for p in spool.glob("*.jsonl")]
                time.sleep(0.1)
            served_during_outage = load.served_since(cut_at)
            proxy.start()
            time.sleep(2)

        assert load.errors == []
        statuses = Counter(status for _, status, _ in load.results)
        assert statuses == {200: len(load.results)}, statuses
        assert served_during_outage > 50, "requests must go on while the database is gone"
        assert spool_files, "records were spooled to disk during the outage"

        served = warmup + [request_id for _, _, request_id in load.results]
        total = len(served)
        count = wait_for_count(engine, total)
        assert count == total, server.log()[-4000:]
        assert metric(server.url, "gateway_audit_spooled_total") > 0
        assert metric(server.url, "gateway_audit_replayed_total") > 0
        assert not list(spool.glob("*.jsonl")), "the spool is drained once replayed"

    rows = audit_rows(engine)
    ids = [request_id for request_id, _, _ in rows]
    assert len(ids) == len(set(ids)), "no duplicates"
    assert sorted(ids) == sorted(served), "exactly the requests served"
    with engine.connect() as conn:
        assert verify(conn, all_chains(conn)) == {"ok": True, "chains": 1, "records": total, "broken": []}
    engine.dispose()
    proxy.cut()
