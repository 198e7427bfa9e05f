"""Processes of a benchmark run: pinning, starting servers, and reading their CPU time and memory.

Two cores are shared by the load generator, the simulator and the system under test, so where each
runs and how much CPU each used is part of every result, not a footnote.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

SERVER_CORE = 0
HARNESS_CORE = 1
LOG_TAIL_CHARS = 4000


@dataclass(frozen=True)
class Layout:
    """Which cores the system under test and the harness (load generator + simulator) run on."""

    server_cores: tuple[int, ...] | None
    harness_cores: tuple[int, ...] | None

    def describe(self) -> dict[str, Any]:
        def show(cores: tuple[int, ...] | None) -> str:
            return "unpinned" if cores is None else ",".join(map(str, cores))

        return {
            "system_under_test": show(self.server_cores),
            "load_generator_and_simulator": show(self.harness_cores),
            "redis_and_postgresql": "unpinned (shared services)",
            "cpu_count": os.cpu_count(),
        }


def pin_harness() -> Layout:
    """Pin this process (and so the simulator it starts) to one core; servers go to the other.

    With fewer than two cores or no ``taskset``, nothing is pinned and the layout says so.
    """
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return Layout(None, None)
    os.sched_setaffinity(0, {HARNESS_CORE})
    return Layout((SERVER_CORE,), (HARNESS_CORE,))


def raise_nofile() -> None:
    """preexec_fn for servers: thousands of sockets need more than the usual 1024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def nofile_hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


class ServerFailed(RuntimeError):
    """A system under test did not start; the message carries its command and log tail."""


@dataclass
class Server:
    """A server subprocess in its own session (so its workers stop with it), logging to a file."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    log_path: Path
    cwd: Path
    cores: tuple[int, ...] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> Server:
        argv = list(self.argv)
        if self.cores is not None:
            argv = ["taskset", "-c", ",".join(map(str, self.cores)), *argv]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env=dict(self.env),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=raise_nofile,
            )
        return self

    def wait_ready(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ServerFailed(
                    f"{self.name} exited with code {self.process.returncode} before it was ready; "
                    f"log tail:\n{self.log_tail()}"
                )
            if http_ok(url):
                return
            time.sleep(0.25)
        self.stop()
        raise ServerFailed(
            f"{self.name} was not ready at {url} within {timeout_s:.0f} s; log tail:\n{self.log_tail()}"
        )

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return "(no log)"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM the whole session (server and workers), SIGKILL what is left after ``grace_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def run_checked(argv: Sequence[str], env: Mapping[str, str], cwd: Path, timeout_s: float = 300) -> str:
    """Run a setup command; failures raise with its output, which the report then quotes."""
    result = subprocess.run(
        list(argv), cwd=cwd, env=dict(env), capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr)[-LOG_TAIL_CHARS:]
        raise ServerFailed(f"`{' '.join(argv)}` exited with {result.returncode}:\n{output}")
    return result.stdout


def tree(pid: int) -> list[psutil.Process]:
    """The process and its descendants (gunicorn master + worker, uvicorn, litellm, ...)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of the given process trees, reaped children included."""
    total = 0.0
    for pid in pids:
        for proc in tree(pid):
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                times = proc.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
    return total


def rss_bytes(pid: int) -> int:
    """Resident memory of a process tree (master + workers for gunicorn)."""
    total = 0
    for proc in tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            total += proc.memory_info().rss
    return total


def service_roots(names: Sequence[str] = ("redis-server", "postgres")) -> dict[str, int]:
    """The top process of each shared service (Redis, the PostgreSQL postmaster), so their CPU shows too."""
    found: dict[str, int] = {}
    for proc in psutil.process_iter(["name", "ppid"]):
        name = proc.info.get("name") or ""
        for wanted in names:
            if not name.startswith(wanted) or wanted in found:
                continue
            with contextlib.suppress(psutil.NoSuchProcess):
                parent = psutil.Process(proc.info["ppid"]).name() if proc.info["ppid"] else ""
                if not parent.startswith(wanted):
                    found[wanted] = proc.pid
    return found


def own_cpu_seconds() -> float:
    """This harness process alone (the load generator), without the servers it started."""
    times = psutil.Process().cpu_times()
    return times.user + times.system


class CpuMeter:
    """CPU seconds per role over one measured window, plus what the whole machine did meanwhile.

    Each role is a function returning cumulative CPU seconds. ``other_busy_s`` is machine CPU not
    accounted for by the roles (other people's tests, ...), so a noisy neighbour is visible in the
    JSON instead of silently slowing a system down.
    """

    def __init__(self, roles: Mapping[str, Callable[[], float]]) -> None:
        self.roles = dict(roles)
        self._start: dict[str, float] = {}
        self._machine_start: Any = None
        self._wall_start = 0.0

    def __enter__(self) -> CpuMeter:
        self._start = {name: read() for name, read in self.roles.items()}
        self._machine_start = psutil.cpu_times(percpu=True)
        self._wall_start = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.monotonic() - self._wall_start
        self.used = {name: read() - self._start[name] for name, read in self.roles.items()}
        machine_end = psutil.cpu_times(percpu=True)
        self.per_core_busy = [
            _busy(end) - _busy(start) for start, end in zip(self._machine_start, machine_end, strict=True)
        ]

    def report(self) -> dict[str, Any]:
        busy = sum(self.per_core_busy)
        return {
            "wall_s": round(self.wall_s, 3),
            "cpu_seconds": {name: round(value, 3) for name, value in self.used.items()},
            "per_core_busy_s": [round(v, 3) for v in self.per_core_busy],
            "other_busy_s": round(max(0.0, busy - sum(self.used.values())), 3),
        }


def _busy(times: Any) -> float:
    return times.user + times.nice + times.system + times.irq + times.softirq + getattr(times, "steal", 0.0)
