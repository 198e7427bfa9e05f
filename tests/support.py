"""Helpers shared by the tests: real services, fresh databases, a real gunicorn server."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
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
