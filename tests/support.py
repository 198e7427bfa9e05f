"""Helpers shared by the tests: real services, fresh databases, a real gunicorn server."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

ROOT = Path(__file__).resolve().parent.parent
_db_counter = itertools.count()


def require_service(var: str) -> str:
    """The URL of a real service, or skip (locally) / fail (CI=true) when it is not set up."""
    url = os.environ.get(var)
    if not url:
        message = f"{var} is not set: this test needs the real service"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return url


@contextmanager
def environ(**values: str | None):
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def migrate(url: str) -> None:
    """`flask db upgrade` in-process against `url`."""
    from flask_migrate import upgrade

    from app import create_app
    from app.extensions import db

    with environ(DATABASE_URL=url):
        app = create_app()
    with app.app_context():
        upgrade()
        db.engine.dispose()


def copy_sqlite(template: str, dest: Path) -> str:
    shutil.copyfile(template, dest)
    return f"sqlite:///{dest}"


def _with_db(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def _admin(url: str):
    import psycopg

    parts = urlsplit(url)
    return psycopg.connect(
        host=parts.hostname,
        port=parts.port or 5432,
        user=parts.username,
        dbname=parts.path.lstrip("/"),
        autocommit=True,
        connect_timeout=5,
    )


def create_postgres_template(base_url: str) -> str:
    """A migrated template database; each test clones it (CREATE DATABASE ... TEMPLATE)."""
    name = f"gw_tmpl_{os.getpid()}"
    with _admin(base_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    url = _with_db(base_url, name)
    migrate(url)
    return url


def create_postgres_database(template_url: str) -> str:
    template = urlsplit(template_url).path.lstrip("/")
    name = f"gw_t_{os.getpid()}_{next(_db_counter)}_{uuid.uuid4().hex[:6]}"
    with _admin(template_url.replace(f"/{template}", "/postgres")) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    return _with_db(template_url, name)


def drop_postgres_database(url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    with _admin(_with_db(url, "postgres")) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_redis(url: str) -> None:
    import redis

    redis.Redis.from_url(url, socket_timeout=2).flushdb()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class GunicornServer:
    """gunicorn + gevent workers from gunicorn.conf.py, exactly as `make run` starts it."""

    def __init__(self, env: dict[str, str], workers: int = 2, ready_path: str = "/healthz") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workdir = Path(tempfile.mkdtemp(prefix="gw-gunicorn-"))
        self.log_path = self.workdir / "server.log"
        self.env = {
            **os.environ,
            "BIND": f"127.0.0.1:{self.port}",
            "WEB_CONCURRENCY": str(workers),
            "PROMETHEUS_MULTIPROC_DIR": str(self.workdir / "prom"),
            "LOG_FORMAT": "json",
            **env,
        }
        self.ready_path = ready_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> GunicornServer:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", str(ROOT / "gunicorn.conf.py")],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + self.ready_path, timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"gunicorn did not become ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, as an orchestrator would; returns gunicorn's exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def worker_pids(self) -> list[int]:
        """The master's children: its workers, as the kernel lists them."""
        assert self.proc is not None
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        return [int(pid) for pid in children.split()]

    def worker_serving(self, client_port: int) -> int:
        """The worker holding the server side of the client's connection from `client_port`: the
        kernel's TCP table names the socket's inode, and one worker has a descriptor on it."""
        inodes = set()
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if local_port == self.port and remote_port == client_port:
                    inodes.add(f"socket:[{fields[9]}]")
        for pid in self.worker_pids():
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    if os.readlink(fd) in inodes:
                        return pid
                except OSError:
                    continue
        raise LookupError(f"no worker holds the connection from port {client_port}")


def issue_key(
    database_url: str,
    tenant: str = "acme",
    scopes: tuple[str, ...] = ("inference:invoke", "models:read"),
    **tenant_settings: object,
) -> str:
    """A tenant (created if new) and an API key for it, written straight to the database."""
    from app import create_app
    from app.extensions import db
    from app.identity.accounts import create_tenant
    from app.identity.apikeys import issue_key as issue
    from app.identity.models import Tenant

    with environ(DATABASE_URL=database_url):
        app = create_app()
    with app.app_context():
        row = db.session.execute(db.select(Tenant).where(Tenant.name == tenant)).scalar_one_or_none()
        row = row or create_tenant(tenant, **tenant_settings)  # type: ignore[arg-type]
        _, key = issue(row, f"{tenant}-test", scopes)
        db.session.remove()
        db.engine.dispose()
    return key


def build_default_models(models_dir: Path) -> dict:
    from app.inference.training import build_default_models as build

    return build(models_dir)


def worker_pids(server: GunicornServer) -> set[int]:
    """The gunicorn master's live children, read from /proc (no psutil needed)."""
    assert server.proc is not None
    master = server.proc.pid
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return {int(pid) for pid in children if _alive(int(pid))}


def wait_for_workers(server: GunicornServer, count: int, timeout_s: float = 60) -> set[int]:
    """The live workers once there are `count` of them again (gunicorn respawns a dead one)."""
    deadline = time.monotonic() + timeout_s
    while len(pids := worker_pids(server)) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(pids)} workers, not {count}, after {timeout_s}s:\n{server.log()[-3000:]}"
            )
        time.sleep(0.1)
    return pids


def workers_seen(server: GunicornServer) -> set[int]:
    """Workers that have served an authenticated request, from the JSON request log lines."""
    pids = set()
    for line in server.log().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "request" and event.get("subject") and event.get("status") == 200:
            pids.add(event["pid"])
    return pids


def warm_every_worker(server: GunicornServer, call: Callable[[], requests.Response]) -> list[str]:
    """Send `call` one at a time on fresh connections until every worker has served one (each has
    then verified and cached the credential); returns the request ids. Which worker accepts a
    connection is the kernel's choice, so this is bounded, not counted: an idle worker waiting in
    accept takes the next connection while the busy one finishes its last."""
    workers = len(worker_pids(server))
    request_ids: list[str] = []
    for _ in range(300):
        resp = call()
        assert resp.status_code == 200, resp.text
        request_ids.append(resp.headers["X-Request-ID"])
        if len(workers_seen(server)) == workers:
            return request_ids
    raise AssertionError(f"one worker served all {len(request_ids)} warm-up requests")


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until_dead(pid: int, timeout_s: float = 10) -> float:
    """Block until `pid` has stopped running (SIGKILL is delivered asynchronously); its monotonic time."""
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} still alive after {timeout_s}s")
        time.sleep(0.005)
    return time.monotonic()


def socket_owner(pids: set[int], local_port: int, remote_port: int) -> int | None:
    """Which of `pids` holds the TCP connection 127.0.0.1:local_port <-> 127.0.0.1:remote_port.

    The kernel decides which worker accepts a connection; a fault test that must kill the worker
    serving a given stream asks the kernel back, through /proc/net/tcp and each process's fds."""
    wanted = f":{local_port:04X}", f":{remote_port:04X}"
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(wanted[0]) and fields[2].endswith(wanted[1]):
            inode = fields[9]
            break
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            fds = list(fd_dir.iterdir())
        except FileNotFoundError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    return pid
            except OSError:
                continue
    return None


class RedisServer:
    """A private redis-server on a free port that a fault test may kill and restart; the shared
    one (TEST_REDIS_URL) is never touched. No persistence: a restart comes back empty, as a
    replacement instance would."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return self
            except redis.RedisError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: the process dies mid-command, its clients' connections are reset."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


class PostgresCluster:
    """A private PostgreSQL cluster (initdb + pg_ctl in a temp dir, on a free port) that a fault test
    may crash and restart; the shared server is never touched. PostgreSQL refuses to run as root, so
    under root the commands run as the `postgres` user."""

    BIN = Path("/usr/lib/postgresql/15/bin")

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-pg-"))
        self.data = self.dir / "data"
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/gateway"

    def _run(self, *args: str) -> None:
        command = [str(self.BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"), "-w", "start")

    def crash(self) -> None:
        """`pg_ctl stop -m immediate`: every backend is killed at once, no checkpoint (crash recovery on
        the next start), so clients see their connections reset mid-transaction."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def __enter__(self) -> PostgresCluster:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.start()
        with _admin(self.url.replace("/gateway", "/postgres")) as conn:
            conn.execute("CREATE DATABASE gateway")
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


CHAT = {"model": "upstream-chat", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8}
STREAM = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}


@dataclass(frozen=True)
class Outcome:
    """One request of a load run, as the client saw it."""

    sent_at: float  # time.monotonic() when it was sent
    done_at: float
    status: int | None  # None: no HTTP answer at all (connection refused or reset, client timeout)
    code: str | None  # error.code of an error body, or of a stream's error event
    limited: bool  # the answer carried X-RateLimit-Limit: the limiter counted it
    request_id: str | None
    error: str | None  # the transport failure, when status is None
    well_formed: bool  # JSON in our shape, or a stream ended by [DONE] or by one error event


def error_code(body: object) -> str | None:
    """The code of our error shape, or None; asserts the shape when the body is an error."""
    if not isinstance(body, dict) or "error" not in body:
        return None
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"} and "request_id" in body, body
    assert "Traceback" not in error["message"], body
    return error["code"]


def read_answer(resp: requests.Response) -> tuple[str | None, bool]:
    """(error code, well formed) of a JSON answer or an SSE stream, read to its end."""
    if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
        events = [line[6:] for line in resp.iter_lines(decode_unicode=True) if line.startswith("data: ")]
        if events and events[-1] == "[DONE]":
            return None, True
        code = error_code(json.loads(events[-1])) if events else None
        return code, code is not None
    try:
        body = resp.json()
    except ValueError:
        return None, False
    return error_code(body), True


def send_mixed(session: requests.Session, url: str, key: str, index: int) -> requests.Response:
    """Four plain chat completions to one stream, all against the upstream simulator."""
    body = STREAM if index % 5 == 4 else CHAT
    return session.post(
        url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}", "Connection": "close"},
        timeout=15,
        stream=True,
    )


class SteadyLoad:
    """A bounded background load: `rate` requests a second spread over `threads` client threads, for
    `seconds` (so at most rate x seconds requests), then it stops by itself. Sends follow a fixed
    schedule (a late thread sends at once and does not burst to catch up), and every request uses a
    fresh connection, so a killed worker costs only the requests it was serving."""

    def __init__(
        self,
        url: str,
        key: str,
        *,
        rate: float = 60,
        seconds: float = 6,
        threads: int = 8,
        send: Callable[[requests.Session, str, str, int], requests.Response] = send_mixed,
    ) -> None:
        self.url, self.key, self.rate, self.send = url, key, rate, send
        self.total = int(rate * seconds)
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]
        self.started_at = 0.0

    def __enter__(self) -> SteadyLoad:
        self.started_at = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()

    def wait(self) -> list[Outcome]:
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "a load thread hung past its timeouts"
        return sorted(self.outcomes, key=lambda o: o.sent_at)

    def _run(self, n: int) -> None:
        session = requests.Session()
        for index in range(n, self.total, len(self._threads)):
            pause = self.started_at + index / self.rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            sent = time.monotonic()
            try:
                resp = self.send(session, self.url, self.key, index)
                code, well_formed = read_answer(resp)
                outcome = Outcome(
                    sent,
                    time.monotonic(),
                    resp.status_code,
                    code,
                    "X-RateLimit-Limit" in resp.headers,
                    resp.headers.get("X-Request-ID"),
                    None,
                    well_formed,
                )
            except requests.RequestException as exc:
                outcome = Outcome(sent, time.monotonic(), None, None, False, None, repr(exc), False)
            with self._lock:
                self.outcomes.append(outcome)


def metric(url: str, name: str, **labels: str) -> float:
    """A sample's value in /metrics (summed over label sets that include `labels`)."""
    text = requests.get(url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        sample, value = line.rsplit(" ", 1)
        metric_name, _, label_text = sample.partition("{")
        if metric_name != name or not all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            continue
        total += float(value)
    return total
