"""Load generator for OpenAI-style HTTP APIs: asyncio + aiohttp, one process, 10,000+ connections.

Why it is built this way:

- Open loop (``mode="open"``): request *k* is due at ``start + k / rate`` whatever happened to the
  earlier ones, and its latency runs from that *intended* time. A slow server therefore shows its
  queueing in the numbers instead of slowing the generator down (no coordinated omission), and a
  generator that falls behind shows up in ``send_lag_ms`` rather than as a faster server.
- Closed loop (``mode="closed"``): N clients that each send, wait and send again, as N users would.
- Ramp (``mode="ramp"``): open-loop arrivals of long SSE streams, to build up N open streams while
  gauges (open streams, plus whatever the caller's probe reads, such as server RSS) are sampled.
- SSE aware: time to first token and inter-token gaps come from the ``data:`` events as they arrive.
- Errors are counted by kind (``connect``, ``timeout``, ``http_<status>``, ``truncated``,
  ``disconnect``, ``bad_response``, ``stream_error``, ``other:<Exception>``), never hidden.
- Idle connections are dropped after ``IDLE_TIMEOUT_S``, well below every server's keep-alive
  timeout here (gunicorn's KEEPALIVE=5 s, uvicorn's 5 s, aiohttp's 75 s), as a load balancer's idle
  timeout is set below its backends'. A client that keeps a connection about as long as the server
  does sometimes sends on one the server is closing at that moment (RFC 9112 9.3.1's race), and a
  gevent server whose hub stalls can let the keep-alive timer fire before it reads a request that
  did arrive in time; either way the client gets a disconnect for a request the server never served.
  The openai SDK retries those; this generator counts every failure, so it keeps out of the race.
- Many connections: the descriptor limit is raised to the hard limit, and above
  ``CONNECTIONS_PER_SOURCE`` connections are spread over several 127.0.0.x source addresses, since
  one (source, destination) pair only has ~28k ephemeral ports.

CLI: ``python -m bench.loadgen --url http://127.0.0.1:8000/v1/chat/completions --rate 100 --duration 5``
prints the result as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import math
import re
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import aiohttp

CONNECTIONS_PER_SOURCE = 4000
IDLE_TIMEOUT_S = 2.0  # well below the servers' keep-alive timeouts (module docstring)
MAX_SOURCES = 16
DEFAULT_MESSAGES = [{"role": "user", "content": "Say hello to the benchmark in a few words."}]


def raise_fd_limit() -> int:
    """Lift the soft descriptor limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (q in [0, 100])."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize(values: Sequence[float], scale: float = 1000.0) -> dict[str, float | int | None]:
    """p50/p95/p99/max/mean, times ``scale`` (seconds -> ms by default); None where there is no sample."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None, "mean": None}

    def scaled(x: float) -> float:
        return round(x * scale, 3)

    return {
        "count": len(ordered),
        "p50": scaled(percentile(ordered, 50)),
        "p95": scaled(percentile(ordered, 95)),
        "p99": scaled(percentile(ordered, 99)),
        "max": scaled(ordered[-1]),
        "mean": scaled(sum(ordered) / len(ordered)),
    }


def is_chat_completion(payload: Any) -> bool:
    """The default answer check: an OpenAI chat completion with at least one choice."""
    return isinstance(payload, dict) and bool(payload.get("choices"))


@dataclasses.dataclass(frozen=True)
class Target:
    """One kind of request: where it goes, what it carries (encoded once) and what counts as success.

    ``valid`` judges a parsed non-stream JSON answer; a 200 with a wrong body is a ``bad_response``.
    """

    url: str
    body: bytes
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)
    stream: bool = False
    valid: Callable[[Any], bool] = is_chat_completion
    method: str = "POST"

    @classmethod
    def get(
        cls, url: str, *, headers: Mapping[str, str] | None = None, valid: Callable[[Any], bool]
    ) -> Target:
        """A bodiless GET (cheap routes such as /v1/models), judged by ``valid``."""
        return cls(url=url, body=b"", headers=dict(headers or {}), valid=valid, method="GET")

    @classmethod
    def chat(
        cls,
        base_url: str,
        model: str,
        *,
        stream: bool = False,
        headers: Mapping[str, str] | None = None,
        path: str = "/v1/chat/completions",
        messages: Sequence[Mapping[str, Any]] = DEFAULT_MESSAGES,
        max_tokens: int | None = None,
    ) -> Target:
        """An OpenAI chat-completions request, the same bytes for every system but the model name."""
        payload: dict[str, Any] = {"model": model, "messages": list(messages), "stream": stream}
        if max_tokens is not None:
            payload["max_tokens"] = max_tokens
        return cls.json(base_url.rstrip("/") + path, payload, headers=headers, stream=stream)

    @classmethod
    def json(
        cls,
        url: str,
        payload: Mapping[str, Any],
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
        valid: Callable[[Any], bool] = is_chat_completion,
    ) -> Target:
        return cls(
            url=url,
            body=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
            stream=stream,
            valid=valid,
        )


@dataclasses.dataclass
class _Outcome:
    intended: float
    sent: float
    done: float = 0.0
    error: str | None = None
    first_token: float | None = None
    tokens: int = 0
    # For a 503: whether it is a well-formed refusal (Retry-After and the OpenAI error shape).
    refusal_ok: bool | None = None


class _Recorder:
    """Collects outcomes and live gauges; one instance per run, touched only from the event loop."""

    def __init__(self) -> None:
        self.outcomes: list[_Outcome] = []
        self.gaps: list[float] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.open_streams = 0
        self.peak_open_streams = 0
        self.send_lag: list[float] = []
        self.gauges: list[dict[str, Any]] = []

    def start(self) -> None:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def stream_opened(self) -> None:
        self.open_streams += 1
        self.peak_open_streams = max(self.peak_open_streams, self.open_streams)


def _classify(exc: BaseException) -> str:
    """Map a client exception to an error kind (order matters: subclasses first)."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "disconnect"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "truncated"
    if isinstance(exc, aiohttp.ClientOSError):
        return "connect"
    return f"other:{type(exc).__name__}"


# A chunk carries a token when its delta has non-empty content; the role chunk's "content":"" does not.
_CONTENT = re.compile(rb'"content"\s*:\s*"(?!")')


async def _read_stream(response: aiohttp.ClientResponse, outcome: _Outcome, recorder: _Recorder) -> None:
    """Consume SSE events as they arrive, recording the first token and the gaps between tokens.

    Events are scanned as bytes rather than parsed as JSON: with 10,000 streams the generator shares
    a core with the simulator, and a JSON parse per event would make it, not the server, the limit.
    An event that is not a complete JSON object counts as ``bad_response``.
    """
    loop = asyncio.get_running_loop()
    last_token: float | None = None
    finished = False
    pending = b""
    recorder.stream_opened()
    try:
        async for chunk in response.content.iter_any():
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue  # blank separators and ": ping" comments
                data = line[5:].strip()
                if data == b"[DONE]":
                    finished = True
                elif data.startswith(b'{"error"'):
                    outcome.error = "stream_error"
                    return
                elif not (data.startswith(b"{") and data.endswith(b"}")):
                    outcome.error = "bad_response"
                    return
                elif _CONTENT.search(data):
                    now = loop.time()
                    if last_token is None:
                        outcome.first_token = now
                    else:
                        recorder.gaps.append(now - last_token)
                    last_token = now
                    outcome.tokens += 1
    finally:
        recorder.open_streams -= 1
    if not finished:
        outcome.error = "truncated"


async def _one(
    session: aiohttp.ClientSession,
    target: Target,
    intended: float,
    timeout: aiohttp.ClientTimeout,
    recorder: _Recorder,
) -> None:
    loop = asyncio.get_running_loop()
    outcome = _Outcome(intended=intended, sent=loop.time())
    recorder.outcomes.append(outcome)
    recorder.start()
    try:
        async with session.request(
            target.method, target.url, data=target.body or None, headers=target.headers, timeout=timeout
        ) as resp:
            if resp.status >= 400:
                body = await resp.read()
                outcome.error = f"http_{resp.status}"
                if resp.status == 503:
                    outcome.refusal_ok = "Retry-After" in resp.headers and _is_error_shape(body)
            elif target.stream:
                await _read_stream(resp, outcome, recorder)
            else:
                body = await resp.read()
                try:
                    ok = target.valid(json.loads(body))
                except (ValueError, KeyError, TypeError, AttributeError):
                    ok = False
                if not ok:
                    outcome.error = "bad_response"
    except Exception as exc:  # every failure is data here, never a crash of the run
        outcome.error = _classify(exc)
    finally:
        outcome.done = loop.time()
        recorder.in_flight -= 1


def _is_error_shape(body: bytes) -> bool:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and {"message", "type", "param", "code"} <= error.keys()


def _source_addresses(url: str, connections: int) -> list[str | None]:
    """Loopback source addresses to spread ``connections`` over (None = let the kernel choose)."""
    host = urlsplit(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback and ipaddress.ip_address(host).version == 4
    except ValueError:
        loopback = False
    count = min(MAX_SOURCES, max(1, math.ceil(connections / CONNECTIONS_PER_SOURCE)))
    if not loopback or count == 1:
        return [None]
    return [f"127.0.0.{i + 1}" for i in range(count)]


def _sessions(url: str, connections: int, chosen: Sequence[str] | None = None) -> list[aiohttp.ClientSession]:
    sources: Sequence[str | None] = chosen or _source_addresses(url, connections)
    per_session = max(1, math.ceil(connections / len(sources)))
    return [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=per_session,
                local_addr=(source, 0) if source else None,
                keepalive_timeout=IDLE_TIMEOUT_S,
            ),
            auto_decompress=False,
        )
        for source in sources
    ]


async def _sample_gauges(
    recorder: _Recorder,
    start: float,
    interval_s: float,
    probe: Callable[[], Mapping[str, Any]] | None,
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        sample: dict[str, Any] = {
            "t": round(loop.time() - start, 3),
            "in_flight": recorder.in_flight,
            "open_streams": recorder.open_streams,
            "errors": sum(1 for o in recorder.outcomes if o.error),
        }
        if probe is not None:
            # psutil reads block briefly; a thread keeps them off the event loop.
            sample.update(await asyncio.to_thread(probe))
        recorder.gauges.append(sample)
        await asyncio.sleep(interval_s)


async def _open_arrivals(
    sessions: list[aiohttp.ClientSession],
    target: Target,
    rate: float,
    count: int,
    timeout: aiohttp.ClientTimeout,
    recorder: _Recorder,
    start: float,
) -> list[asyncio.Task[None]]:
    """Start request k at ``start + k / rate``; when late, start every overdue one at once, so a
    busy event loop delays requests (which their latency then shows) but never thins the load."""
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    index = 0
    while index < count:
        now = loop.time()
        due = start + index / rate
        if due > now:
            await asyncio.sleep(due - now)
            continue
        while index < count and start + index / rate <= now:
            intended = start + index / rate
            recorder.send_lag.append(now - intended)
            session = sessions[index % len(sessions)]
            tasks.append(asyncio.create_task(_one(session, target, intended, timeout, recorder)))
            index += 1
        await asyncio.sleep(0)
    return tasks


async def _closed_clients(
    sessions: list[aiohttp.ClientSession],
    target: Target,
    clients: int,
    duration_s: float,
    timeout: aiohttp.ClientTimeout,
    recorder: _Recorder,
    start: float,
    count: int | None = None,
) -> list[asyncio.Task[None]]:
    """``clients`` loops until ``duration_s`` is over, or until ``count`` requests were sent."""
    loop = asyncio.get_running_loop()
    end = start + duration_s

    async def client(index: int) -> None:
        session = sessions[index % len(sessions)]
        # Stagger the first requests over 100 ms so clients don't start in lockstep.
        await asyncio.sleep(max(0.0, start + 0.1 * index / clients - loop.time()))
        while loop.time() < end and (count is None or len(recorder.outcomes) < count):
            await _one(session, target, loop.time(), timeout, recorder)

    return [asyncio.create_task(client(i)) for i in range(clients)]


async def run_load(
    target: Target,
    *,
    mode: str = "open",
    rate: float = 0.0,
    duration_s: float = 5.0,
    clients: int = 0,
    count: int | None = None,
    timeout_s: float = 10.0,
    connections: int | None = None,
    sample_interval_s: float = 1.0,
    probe: Callable[[], Mapping[str, Any]] | None = None,
    sources: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run one load and return its summary (JSON-ready).

    mode "open" (and "ramp", the same arrivals named for stream build-up) sends ``count`` requests,
    by default ``rate * duration_s``, at a fixed rate; "closed" runs ``clients`` loops for
    ``duration_s``, or until ``count`` requests were sent if it is given. Each request gives up
    after ``timeout_s``; the run ends when all have finished or given up, so its length is
    bounded by ``duration_s + timeout_s``. ``sources`` names the loopback addresses to send from
    (default: as many as the connections need, from 127.0.0.1).
    """
    if mode not in ("open", "ramp", "closed"):
        raise ValueError(f"mode must be open, ramp or closed, got {mode!r}")
    if mode == "closed" and clients <= 0:
        raise ValueError("closed mode needs clients > 0")
    if mode != "closed" and rate <= 0:
        raise ValueError(f"{mode} mode needs rate > 0")
    total = count if count is not None else max(1, round(rate * duration_s))
    if connections is None:
        connections = clients if mode == "closed" else min(10_000, max(64, math.ceil(rate * timeout_s)))
    fd_limit = raise_fd_limit()
    loop = asyncio.get_running_loop()
    recorder = _Recorder()
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    sessions = _sessions(target.url, connections, sources)
    start = loop.time() + 0.05
    sampler = asyncio.create_task(_sample_gauges(recorder, start, sample_interval_s, probe))
    wall_start = time.time()
    try:
        if mode == "closed":
            tasks = await _closed_clients(
                sessions, target, clients, duration_s, timeout, recorder, start, count
            )
        else:
            tasks = await _open_arrivals(sessions, target, rate, total, timeout, recorder, start)
        await asyncio.gather(*tasks)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        await asyncio.gather(*(session.close() for session in sessions))
    elapsed = loop.time() - start
    result = _result(recorder, start, elapsed, target)
    result["config"] = {
        "mode": mode,
        "url": target.url,
        "stream": target.stream,
        "rate": rate if mode != "closed" else None,
        "clients": clients if mode == "closed" else None,
        "duration_s": duration_s,
        "requests_planned": total if mode != "closed" else count,
        "timeout_s": timeout_s,
        "connections": connections,
        "source_addresses": list(
            sources or [s or "auto" for s in _source_addresses(target.url, connections)]
        ),
        "fd_limit": fd_limit,
        "started_at": wall_start,
    }
    return result


def _result(recorder: _Recorder, start: float, elapsed: float, target: Target) -> dict[str, Any]:
    outcomes = recorder.outcomes
    ok = [o for o in outcomes if o.error is None]
    errors = Counter(o.error for o in outcomes if o.error)
    result: dict[str, Any] = {
        "sent": len(outcomes),
        "ok": len(ok),
        "errors": dict(errors),
        "error_count": sum(errors.values()),
        "error_rate": round(sum(errors.values()) / len(outcomes), 6) if outcomes else 0.0,
        "elapsed_s": round(elapsed, 3),
        "throughput_rps": round(len(ok) / elapsed, 2) if elapsed > 0 else 0.0,
        "latency_ms": summarize([o.done - o.intended for o in ok]),
        # Answers that were HTTP errors (a 429 flood, a 503 refusal): how fast they came back.
        "http_error_latency_ms": summarize(
            [o.done - o.intended for o in outcomes if o.error and o.error.startswith("http_")]
        ),
        "send_lag_ms": summarize(recorder.send_lag),
        "peak_in_flight": recorder.peak_in_flight,
        "by_second": _by_second(outcomes, start),
        "gauges": recorder.gauges,
    }
    refused = [o for o in outcomes if o.refusal_ok is not None]
    if refused:
        result["refusals"] = {
            "count": len(refused),
            "well_formed": sum(1 for o in refused if o.refusal_ok),
            "latency_ms": summarize([o.done - o.intended for o in refused]),
            "latency_from_send_ms": summarize([o.done - o.sent for o in refused]),
        }
    if target.stream:
        result["ttft_ms"] = summarize([o.first_token - o.intended for o in ok if o.first_token is not None])
        # From when the generator actually sent the request: ttft_ms minus the generator's own lag.
        result["ttft_from_send_ms"] = summarize(
            [o.first_token - o.sent for o in ok if o.first_token is not None]
        )
        result["inter_token_ms"] = summarize(recorder.gaps)
        result["tokens_per_stream"] = summarize([o.tokens for o in ok], scale=1)
        result["peak_open_streams"] = recorder.peak_open_streams
    return result


def _by_second(outcomes: list[_Outcome], start: float) -> list[dict[str, Any]]:
    """Per second of intended send time: how many, how many failed, and their latency."""
    buckets: dict[int, list[_Outcome]] = {}
    for outcome in outcomes:
        buckets.setdefault(max(0, int(outcome.intended - start)), []).append(outcome)
    rows = []
    for second in sorted(buckets):
        group = buckets[second]
        latencies = [o.done - o.intended for o in group if o.error is None]
        stats = summarize(latencies)
        rows.append(
            {
                "second": second,
                "sent": len(group),
                "errors": sum(1 for o in group if o.error),
                "p50": stats["p50"],
                "p99": stats["p99"],
            }
        )
    return rows


def _parse_header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"header must look like 'Name: value', got {text!r}")
    return name.strip(), value.strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--url", required=True, help="full URL, e.g. http://127.0.0.1:8000/v1/chat/completions"
    )
    parser.add_argument("--model", default="sim-model")
    parser.add_argument("--mode", choices=["open", "closed", "ramp"], default="open")
    parser.add_argument("--rate", type=float, default=50.0, help="requests per second (open, ramp)")
    parser.add_argument("--clients", type=int, default=0, help="concurrent clients (closed)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of sending")
    parser.add_argument("--count", type=int, default=None, help="requests to send (closed: at most)")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request limit, seconds")
    parser.add_argument("--connections", type=int, default=None)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--header", type=_parse_header, action="append", default=[])
    args = parser.parse_args(argv)
    url = urlsplit(args.url)
    target = Target.chat(
        f"{url.scheme}://{url.netloc}",
        args.model,
        stream=args.stream,
        headers=dict(args.header),
        path=url.path or "/v1/chat/completions",
    )
    result = asyncio.run(
        run_load(
            target,
            mode=args.mode,
            rate=args.rate,
            duration_s=args.duration,
            clients=args.clients,
            count=args.count,
            timeout_s=args.timeout,
            connections=args.connections,
        )
    )
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
