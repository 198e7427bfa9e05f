"""The systems under test and how the harness starts each one on loopback.

Every system gets one worker, the same upstream (the simulator) and, where it has them, real auth,
a Redis rate limit and a PostgreSQL audit/key store:

- ``direct``: the simulator alone, the physical floor.
- ``ours``: gunicorn -c gunicorn.conf.py (gevent), WEB_CONCURRENCY=1, a fresh PostgreSQL database,
  an API key issued with ``flask keys issue`` for a tenant with a very high rate limit.
- ``twin-httpx`` / ``twin-aiohttp``: the FastAPI twin under uvicorn (uvloop, httptools), 1 worker.
- ``litellm``: LiteLLM proxy in its own venv, master-key auth, the simulator as its model.

A system is prepared once per run (databases, keys, venv) and started fresh for each scenario, so
every scenario meets a clean process and a leftover from the previous one can't skew it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench import procs
from bench.upstream_sim import Simulator

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_BIN = Path(sys.executable).parent
LITELLM_VENV = BENCH / ".venv-litellm"
LITELLM_REQUIREMENT = "litellm[proxy]==1.106.2"
HIGH_RATE_LIMIT_PER_MINUTE = 100_000_000
HIGH_TOKEN_QUOTA = 10**15  # never reached: the quota is exercised on every call, never refuses
PII_DETECTORS = ("email", "phone", "credit_card", "iban", "ssn", "ip_address")
READY_TIMEOUT_S = 120.0
# Scenarios that need more than the OpenAI chat route; a system without one says why.
FANOUT, CHAIN, PROFILE = "fanout", "chain", "profile"


@dataclass
class RunContext:
    """What every system needs from the run: the simulator, services, where to write, the layout."""

    sim: Simulator
    raw_dir: Path
    layout: procs.Layout
    run_id: str
    redis_url: str
    postgres_url: str


@dataclass
class Live:
    """A started system: where to send requests, as whom, and which process tree to watch."""

    name: str
    base_url: str
    model: str
    headers: dict[str, str]
    pid: int


class System(abc.ABC):
    """Base of the adapters: ``prepare`` once, ``start`` per scenario, ``cleanup`` at the end."""

    def __init__(self, name: str, ctx: RunContext) -> None:
        self.name = name
        self.ctx = ctx
        self.unsupported: dict[str, str] = {}
        self.notes: list[str] = []
        self.version = ""

    def prepare(self) -> None:  # noqa: B027  (optional hook)
        """One-time setup; raises procs.ServerFailed with the reason when the system can't run."""

    @abc.abstractmethod
    def start(self, scenario: str | None) -> contextlib.AbstractContextManager[Live]:
        """A fresh server for one scenario (None: for all of them), stopped when the block ends."""

    def cleanup(self) -> None:  # noqa: B027  (optional hook)
        """Undo prepare (drop databases)."""

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "notes": self.notes, "unsupported": self.unsupported}

    def _server(self, label: str, argv: list[str], env: Mapping[str, str]) -> procs.Server:
        return procs.Server(
            name=self.name,
            argv=argv,
            env=env,
            log_path=self.ctx.raw_dir / "logs" / f"{self.name}-{label}.log",
            cwd=ROOT,
            cores=self.ctx.layout.server_cores,
        )


class Direct(System):
    """The simulator itself; the harness already runs it (on the load generator's core)."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__("direct", ctx)
        floor = "the upstream itself: the floor is one upstream call by construction"
        self.unsupported = {FANOUT: floor, CHAIN: floor, PROFILE: "the floor; not on anyone's path"}
        self.notes = ["the simulator shares the load generator's core"]

    @contextlib.contextmanager
    def start(self, scenario: str | None) -> Iterator[Live]:
        yield Live(self.name, self.ctx.sim.url, "sim-model", {}, self.ctx.sim.process.pid)


def base_env() -> dict[str, str]:
    """The environment minus anything that would silently change a server (ambient app settings)."""
    drop = ("DATABASE_URL", "REDIS_URL", "APP_ENV", "WEB_CONCURRENCY", "BIND", "MODELS_CONFIG", "SIM_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def create_database(admin_url: str, name: str) -> str:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(admin_url)._replace(path=f"/{name}"))


def drop_database(admin_url: str, url: str) -> None:
    import psycopg

    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Ours(System):
    """The gateway as `make run` starts it, plus the chain blueprint for the chain scenario only."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__("ours", ctx)
        self.database_url = ""
        self.key = ""
        self.policy_key = ""
        self.notes = [
            "gunicorn -c gunicorn.conf.py, gevent worker, WEB_CONCURRENCY=1, WORKER_CONNECTIONS=12000, "
            "BACKLOG=4096",
            "catalogue bench/models.yaml: upstream-chat only, pool_size/max_concurrency 12000",
            "APP_ENV=production, JSON request log to a file",
            "fully governed: PII policy redacting every detector, a token quota, hash-chained audit",
        ]

    def env(self) -> dict[str, str]:
        return {
            **base_env(),
            "APP_ENV": "production",
            "SECRET_KEY": self._secret("secret"),
            "JWT_SECRET_KEY": self._secret("jwt"),
            "DATABASE_URL": self.database_url,
            "REDIS_URL": self.ctx.redis_url,
            "UPSTREAM_BASE_URL": self.ctx.sim.base_url,
            "MODELS_CONFIG": str(BENCH / "models.yaml"),
            "MODELS_DIR": str(self.ctx.raw_dir / "ours-models"),
            "INSTANCE_PATH": str(self.ctx.raw_dir / "ours-instance"),
            "PROMETHEUS_MULTIPROC_DIR": str(self.ctx.raw_dir / "ours-prometheus"),
            "WEB_CONCURRENCY": "1",
            "WORKER_CONNECTIONS": "12000",
            "BACKLOG": "4096",  # the twins' uvicorn --backlog
            "LOG_FORMAT": "json",
        }

    def _secret(self, purpose: str) -> str:
        return f"bench-{purpose}-{self.ctx.run_id}-{'x' * 32}"

    def flask(self, *args: str) -> str:
        return procs.run_checked([str(VENV_BIN / "flask"), "--app", "wsgi", *args], self.env(), ROOT)

    def prepare(self) -> None:
        # gunicorn empties this at start; the CLI below needs it to exist already.
        (self.ctx.raw_dir / "ours-prometheus").mkdir(parents=True, exist_ok=True)
        self.database_url = create_database(self.ctx.postgres_url, f"gwbench_ours_{self.ctx.run_id}")
        self.flask("db", "upgrade")
        limit = f"{HIGH_RATE_LIMIT_PER_MINUTE}/minute"
        self.flask(
            "tenants", "create", "bench", "--rate-limit", limit, "--key-rate-limit", limit,
            "--token-quota", str(HIGH_TOKEN_QUOTA),
        )  # fmt: skip
        self.key = issued_key(self.flask("keys", "issue", "bench", "--name", "benchmark"))
        self.policy_key = issued_key(
            self.flask("keys", "issue", "bench", "--name", "policy", "--scopes", "governance:write")
        )
        self.version = procs.run_checked(["git", "rev-parse", "--short", "HEAD"], os.environ, ROOT).strip()

    def govern(self, base_url: str) -> None:
        """The bench tenant's policy: every PII detector redacts (what the full twin does too)."""
        import requests

        rules = {"pii": dict.fromkeys(PII_DETECTORS, "redact")}
        resp = requests.put(
            base_url + "/v1/governance/policies",
            json={"rules": rules},
            headers=bearer(self.policy_key),
            timeout=30,
        )
        if resp.status_code != 201:
            raise procs.ServerFailed(f"setting the bench policy answered {resp.status_code}: {resp.text}")

    @contextlib.contextmanager
    def start(self, scenario: str | None) -> Iterator[Live]:
        port = procs.free_port()
        argv = [str(VENV_BIN / "gunicorn"), "-c", str(ROOT / "gunicorn.conf.py")]
        if scenario in (CHAIN, None):
            argv.append("bench.chain_app:app")
        env = {**self.env(), "BIND": f"127.0.0.1:{port}"}
        server = self._server(scenario or "all", argv, env).start()
        try:
            server.wait_ready(f"http://127.0.0.1:{port}/readyz", READY_TIMEOUT_S)
            self.govern(f"http://127.0.0.1:{port}")
            yield Live(self.name, f"http://127.0.0.1:{port}", "upstream-chat", bearer(self.key), server.pid)
        finally:
            server.stop()

    def cleanup(self) -> None:
        if self.database_url:
            drop_database(self.ctx.postgres_url, self.database_url)


def issued_key(output: str) -> str:
    """`flask keys issue` prints the key alone on its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines or not re.fullmatch(r"\S+", lines[-1]):
        raise procs.ServerFailed(f"could not find the key in `flask keys issue` output:\n{output}")
    return lines[-1]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Twin(System):
    """The FastAPI twin under uvicorn, with httpx or aiohttp as its upstream client; `full` turns on
    the governance ours runs (PII redaction, token quota, hash-chained audit, Prometheus)."""

    def __init__(self, ctx: RunContext, client: str, full: bool = False) -> None:
        super().__init__(f"twin-full-{client}" if full else f"twin-{client}", ctx)
        self.client = client
        self.full = full
        self.database_url = ""
        self.key = ""
        self.notes = [
            f"uvicorn --workers 1 --loop uvloop --http httptools, upstream client {client}",
            "access log on (uvicorn's default), like ours' request log",
            "feature-equal: PII redaction, token quota, hash-chained audit, Prometheus metrics"
            if full
            else "light: auth, rate limit, validation, plain audit rows; no PII policy, quota or metrics",
        ]

    def prepare(self) -> None:
        from bench.fastapi_twin.storage import issue_key

        self.database_url = create_database(
            self.ctx.postgres_url, f"gwbench_{self.name.replace('-', '_')}_{self.ctx.run_id}"
        )
        limit = HIGH_RATE_LIMIT_PER_MINUTE
        self.key = asyncio.run(issue_key(self.database_url, "bench", limit, limit, 60))
        import fastapi
        import uvicorn

        self.version = f"fastapi {fastapi.__version__}, uvicorn {uvicorn.__version__}"

    @contextlib.contextmanager
    def start(self, scenario: str | None) -> Iterator[Live]:
        port = procs.free_port()
        argv = [
            sys.executable,
            "-m",
            "uvicorn",
            "bench.fastapi_twin.app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--backlog",
            "4096",
        ]
        env = {
            **base_env(),
            "TWIN_UPSTREAM_URL": self.ctx.sim.base_url,
            "TWIN_HTTP_CLIENT": self.client,
            "TWIN_DATABASE_URL": self.database_url,
            "TWIN_REDIS_URL": self.ctx.redis_url,
            "TWIN_FEATURES": "full" if self.full else "light",
        }
        server = self._server(scenario or "all", argv, env).start()
        try:
            # No health route: an unauthenticated chat call answering 401 proves the app is up.
            wait_answering(server, f"http://127.0.0.1:{port}/v1/chat/completions")
            yield Live(self.name, f"http://127.0.0.1:{port}", "sim-model", bearer(self.key), server.pid)
        finally:
            server.stop()

    def cleanup(self) -> None:
        if self.database_url:
            drop_database(self.ctx.postgres_url, self.database_url)


def wait_answering(server: procs.Server, url: str) -> None:
    """Ready when any HTTP answer comes back (401 included)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            raise procs.ServerFailed(f"{server.name} exited early; log tail:\n{server.log_tail()}")
        try:
            urllib.request.urlopen(urllib.request.Request(url, data=b"{}"), timeout=2)
            return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError):
            time.sleep(0.25)
    server.stop()
    raise procs.ServerFailed(f"{server.name} did not answer at {url}; log tail:\n{server.log_tail()}")


class LiteLLM(System):
    """LiteLLM proxy in its own venv (created here on first use), offline as DESIGN.md describes."""

    def __init__(self, ctx: RunContext) -> None:
        super().__init__("litellm", ctx)
        self.master_key = f"sk-{secrets.token_urlsafe(24)}"
        self.config_path = ctx.raw_dir / "litellm-config.yaml"
        self.unsupported = {
            FANOUT: "LiteLLM proxy has no fan-out endpoint (one request, one model call)",
            CHAIN: "LiteLLM proxy hosts no application routes, so the chain can't run inside it",
        }
        self.notes = [
            "master-key auth only: without its Prisma database LiteLLM has no virtual keys, "
            "per-key rate limits or spend logs, so its path is lighter than ours",
            "--num_workers 1, LITELLM_LOCAL_MODEL_COST_MAP=True, its own defaults otherwise",
        ]

    def prepare(self) -> None:
        python = LITELLM_VENV / "bin" / "python"
        if not self._installed(python):
            procs.run_checked([sys.executable, "-m", "venv", "--clear", str(LITELLM_VENV)], os.environ, ROOT)
            pip = [str(python), "-m", "pip", "install", "-q", LITELLM_REQUIREMENT]
            procs.run_checked(pip, os.environ, ROOT, timeout_s=1200)
        show = "import importlib.metadata as m; print(m.version('litellm'))"
        self.version = "litellm " + procs.run_checked([str(python), "-c", show], os.environ, ROOT).strip()
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "model_list:\n"
            "  - model_name: sim-model\n"
            "    litellm_params:\n"
            "      model: openai/sim-model\n"
            f"      api_base: {self.ctx.sim.base_url}\n"
            "      api_key: sk-simulator-needs-no-key\n"
            "general_settings:\n"
            "  master_key: os.environ/LITELLM_MASTER_KEY\n"
        )

    @staticmethod
    def _installed(python: Path) -> bool:
        if not python.exists():
            return False
        check = [str(python), "-c", "import importlib.metadata as m; m.version('litellm')"]
        return subprocess.run(check, capture_output=True, check=False).returncode == 0

    @contextlib.contextmanager
    def start(self, scenario: str | None) -> Iterator[Live]:
        port = procs.free_port()
        argv = [
            str(LITELLM_VENV / "bin" / "litellm"),
            "--config",
            str(self.config_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ]
        env = {**base_env(), "LITELLM_MASTER_KEY": self.master_key, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
        server = self._server(scenario or "all", argv, env).start()
        try:
            server.wait_ready(f"http://127.0.0.1:{port}/health/liveliness", READY_TIMEOUT_S)
            yield Live(
                self.name, f"http://127.0.0.1:{port}", "sim-model", bearer(self.master_key), server.pid
            )
        finally:
            server.stop()


SYSTEMS = ("direct", "ours", "twin-httpx", "twin-aiohttp", "twin-full-httpx", "twin-full-aiohttp", "litellm")


def build(name: str, ctx: RunContext) -> System:
    if name == "direct":
        return Direct(ctx)
    if name == "ours":
        return Ours(ctx)
    if name.startswith("twin-full-"):
        return Twin(ctx, name.removeprefix("twin-full-"), full=True)
    if name.startswith("twin-"):
        return Twin(ctx, name.removeprefix("twin-"))
    if name == "litellm":
        return LiteLLM(ctx)
    raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")
