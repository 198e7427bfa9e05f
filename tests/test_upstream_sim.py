"""The upstream simulator must behave like an OpenAI-compatible provider, faults included, or gateway tests
built on it prove nothing."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from bench.upstream_sim import Simulator, build_parser, run_simulator

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there  upstream world"}]
PROMPT_WORDS = 6


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with run_simulator(latency_ms=0) as simulator:
        yield simulator


@pytest.fixture(autouse=True)
def clean(sim: Simulator) -> None:
    sim.reset()


def chat(
    sim: Simulator, headers: dict[str, str] | None = None, timeout: float = 10, **body: Any
) -> requests.Response:
    """POST a chat completion; SSE answers are left unread so tests can consume them incrementally."""
    payload = {"model": "sim-model", "messages": CHAT, **body}
    url = f"{sim.base_url}/chat/completions"
    return requests.post(url, json=payload, headers=headers, timeout=timeout, stream=bool(body.get("stream")))


def sse_events(response: requests.Response) -> list[str]:
    """Data payloads of an SSE response, in order."""
    return [
        line[len("data: ") :]
        for line in response.iter_lines(decode_unicode=True)
        if line.startswith("data: ")
    ]


def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_models(sim: Simulator) -> None:
    body = requests.get(f"{sim.base_url}/models", timeout=5).json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["sim-model"]


def test_non_stream_chat(sim: Simulator) -> None:
    body = chat(sim, headers={"X-Sim-Tokens": "4"}).json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": PROMPT_WORDS, "completion_tokens": 4, "total_tokens": 10}


def test_max_tokens_below_configured_tokens_finishes_with_length(sim: Simulator) -> None:
    body = chat(sim, max_tokens=3).json()
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_stream_chat_with_usage(sim: Simulator) -> None:
    response = chat(sim, headers={"X-Sim-Tokens": "3"}, stream=True, stream_options={"include_usage": True})
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"]["content"] for c in chunks[1:4]] == ["tok0", " tok1", " tok2"]
    assert chunks[4]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": PROMPT_WORDS, "completion_tokens": 3, "total_tokens": 9}
    assert len(chunks) == 6


def test_stream_chat_without_usage(sim: Simulator) -> None:
    events = sse_events(chat(sim, stream=True, max_tokens=2))
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) == 4


def test_stream_pacing_follows_ttft_and_tokens_per_s(sim: Simulator) -> None:
    headers = {"X-Sim-TTFT-Ms": "150", "X-Sim-Tokens-Per-S": "50", "X-Sim-Tokens": "6"}
    start = time.monotonic()
    response = chat(sim, headers=headers, stream=True)
    lines = response.iter_lines(decode_unicode=True)
    first = next(line for line in lines if line.startswith("data: "))
    first_at = time.monotonic() - start
    assert "assistant" in first
    sse_events(response)
    total = time.monotonic() - start
    assert first_at >= 0.14
    assert total >= 0.14 + 5 / 50


def test_latency_header_delays_non_stream_answer(sim: Simulator) -> None:
    start = time.monotonic()
    assert chat(sim, headers={"X-Sim-Latency-Ms": "200"}).status_code == 200
    assert time.monotonic() - start >= 0.19


def test_embeddings_dimensions_and_determinism(sim: Simulator) -> None:
    url = f"{sim.base_url}/embeddings"
    body = requests.post(
        url, json={"model": "e", "input": ["a b c", "d"], "dimensions": 16}, timeout=5
    ).json()
    first, second = (item["embedding"] for item in body["data"])
    assert len(first) == 16 and all(isinstance(v, float) for v in first)
    assert math.isclose(sum(v * v for v in first), 1.0)
    assert first != second
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    again = requests.post(url, json={"input": "a b c", "dimensions": 16}, timeout=5).json()
    assert again["data"][0]["embedding"] == first
    default = requests.post(url, json={"input": "a b c"}, timeout=5).json()
    assert len(default["data"][0]["embedding"]) == 384


def test_openai_sdk_understands_the_simulator(sim: Simulator) -> None:
    openai = pytest.importorskip("openai")
    with openai.OpenAI(base_url=sim.base_url, api_key="sim", max_retries=0) as client:
        completion = client.chat.completions.create(model="sim-model", messages=CHAT, max_tokens=2)
        assert completion.choices[0].message.content == "tok0 tok1"
        stream = client.chat.completions.create(
            model="sim-model", messages=CHAT, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == " ".join(f"tok{i}" for i in range(16))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16
        # The SDK asks for base64 by default; it must decode to the same vector as the float format.
        vector = client.embeddings.create(model="e", input="same text", dimensions=8).data[0].embedding
    plain = requests.post(
        f"{sim.base_url}/embeddings", json={"input": "same text", "dimensions": 8}, timeout=5
    )
    assert vector == pytest.approx(plain.json()["data"][0]["embedding"], rel=1e-6)


@pytest.mark.parametrize("status", ["500", "503", "429"])
def test_status_faults(sim: Simulator, status: str) -> None:
    response = chat(sim, headers={"X-Sim-Fault": status, "X-Sim-Retry-After": "2"})
    assert response.status_code == int(status)
    assert "message" in response.json()["error"]
    if status in ("503", "429"):
        assert response.headers["Retry-After"] == "2"
    assert sim.stats()["faults"] == {status: 1}


def test_timeout_fault_hangs_until_client_gives_up(sim: Simulator) -> None:
    with pytest.raises(requests.exceptions.ReadTimeout):
        chat(sim, headers={"X-Sim-Fault": "timeout"}, timeout=0.4)
    assert wait_for(lambda: sim.stats()["disconnects"] == 1)
    assert sim.stats()["in_flight"] == 0


def test_malformed_fault(sim: Simulator) -> None:
    response = chat(sim, headers={"X-Sim-Fault": "malformed"})
    assert response.status_code == 200
    with pytest.raises(ValueError):
        response.json()
    events = sse_events(chat(sim, headers={"X-Sim-Fault": "malformed", "X-Sim-Tokens": "3"}, stream=True))
    assert events[-1] == "[DONE]"
    json.loads(events[0])
    with pytest.raises(json.JSONDecodeError):
        json.loads(events[1])


def test_cut_fault_stream_sends_half_then_drops(sim: Simulator) -> None:
    response = chat(sim, headers={"X-Sim-Fault": "cut", "X-Sim-Tokens": "8"}, stream=True)
    received: list[str] = []
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                received.append(line)
    assert len(received) == 1 + 4
    assert all("[DONE]" not in line for line in received)


def test_cut_fault_non_stream_drops_mid_body(sim: Simulator) -> None:
    with pytest.raises(requests.exceptions.RequestException):
        chat(sim, headers={"X-Sim-Fault": "cut"}).json()


def test_stall_fault_sends_half_then_hangs_with_the_connection_open(sim: Simulator) -> None:
    response = chat(sim, headers={"X-Sim-Fault": "stall", "X-Sim-Tokens": "8"}, stream=True, timeout=0.5)
    received: list[str] = []
    with pytest.raises(requests.exceptions.ConnectionError, match="timed out"):
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                received.append(line)
    assert len(received) == 1 + 4 and all("[DONE]" not in line for line in received)
    plain = chat(sim, headers={"X-Sim-Fault": "stall"}, stream=True, timeout=0.5)
    assert plain.status_code == 200  # the headers came; the body never ends
    with pytest.raises(requests.exceptions.ConnectionError, match="timed out"):
        _ = plain.content
    assert wait_for(lambda: sim.stats()["disconnects"] == 2)
    assert sim.stats()["faults"] == {"stall": 2} and sim.stats()["in_flight"] == 0


def test_fail_first_per_key(sim: Simulator) -> None:
    def status(key: str) -> int:
        return chat(sim, headers={"X-Sim-Fail-First": "2", "X-Sim-Key": key}).status_code

    assert [status("a"), status("a"), status("a"), status("a")] == [503, 503, 200, 200]
    assert status("b") == 503
    assert sim.stats()["by_key"] == {"a": 4, "b": 1}


def test_configure_changes_defaults_and_reset_restores_them(sim: Simulator) -> None:
    config = sim.configure(tokens=2, fail_first=1)
    assert config["tokens"] == 2
    assert chat(sim).status_code == 503
    assert chat(sim).json()["choices"][0]["message"]["content"] == "tok0 tok1"
    assert sim.reset()["tokens"] == 16
    assert chat(sim).json()["usage"]["completion_tokens"] == 16


def test_fault_rate_is_seeded_and_partial(sim: Simulator) -> None:
    sim.configure(fault="500", fault_rate=0.5, seed=7)
    first = [chat(sim).status_code for _ in range(30)]
    sim.configure(seed=7)
    assert [chat(sim).status_code for _ in range(30)] == first
    assert set(first) == {200, 500}


def test_bad_config_and_bad_requests_are_rejected(sim: Simulator) -> None:
    with pytest.raises(requests.exceptions.HTTPError):
        requests.post(f"{sim.url}/sim/config", json={"nope": 1}, timeout=5).raise_for_status()
    assert chat(sim, headers={"X-Sim-Fault": "explode"}).status_code == 400
    bad = requests.post(f"{sim.base_url}/chat/completions", json={"messages": []}, timeout=5)
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"


def test_stats_counting(sim: Simulator) -> None:
    with requests.Session() as session:
        for i in range(3):
            session.post(
                f"{sim.base_url}/chat/completions",
                json={"messages": CHAT},
                headers={"X-Request-ID": f"req-{i}", "X-Sim-Key": "k"},
                timeout=5,
            )
        session.get(f"{sim.base_url}/models", timeout=5)
    stats = sim.stats()
    assert stats["requests_total"] == 4
    assert stats["by_path"] == {"/v1/chat/completions": 3, "/v1/models": 1}
    assert stats["by_key"] == {"k": 3}
    assert stats["request_ids"] == ["req-0", "req-1", "req-2"]
    assert stats["connections_total"] == 1
    assert stats["in_flight"] == 0
    assert sim.reset() and sim.stats()["requests_total"] == 0


def test_client_disconnect_mid_stream_is_counted(sim: Simulator) -> None:
    connections_before = sim.stats()["open_connections"]
    headers = {"X-Sim-Tokens-Per-S": "50", "X-Sim-Tokens": "500"}
    response = chat(sim, headers=headers, stream=True)
    lines = response.iter_lines(decode_unicode=True)
    assert next(line for line in lines if line.startswith("data: "))
    assert wait_for(lambda: sim.stats()["in_flight_streams"] == 1)
    response.close()
    assert wait_for(lambda: sim.stats()["disconnects"] == 1)
    stats = sim.stats()
    assert stats["in_flight_streams"] == 0
    assert stats["streams_completed"] == 0
    assert stats["open_connections"] == connections_before


def test_cli_reads_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIM_TOKENS", "7")
    monkeypatch.setenv("SIM_FAULT", "timeout")
    args = build_parser().parse_args(["--latency-ms", "5"])
    assert (args.tokens, args.fault, args.latency_ms, args.ttft_ms) == (7, "timeout", 5.0, 0.0)


def test_run_simulator_passes_knobs() -> None:
    with run_simulator(tokens=1, models=["a", "b"], latency_ms=0) as other:
        assert other.base_url.endswith("/v1") and other.base_url.startswith("http://127.0.0.1:")
        models = requests.get(f"{other.base_url}/models", timeout=5).json()
        assert [m["id"] for m in models["data"]] == ["a", "b"]
        assert chat(other).json()["choices"][0]["message"]["content"] == "tok0"
    assert other.process.poll() is not None
