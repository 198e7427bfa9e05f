"""The OpenAI-compatible backend against the real upstream simulator on loopback: retries, deadlines, the
circuit breaker and stream handling only count if they hold over real sockets."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import gevent
import numpy as np
import pytest

from app.errors import APIError
from app.inference.backends.base import ChatChunk, ChatRequest, ModelSpec
from app.inference.backends.openai_compatible import OpenAICompatibleBackend, UpstreamStreamError
from bench.upstream_sim import Simulator, pseudo_embedding, run_simulator

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello upstream world"}]
PROMPT_WORDS = 5

Factory = Callable[..., OpenAICompatibleBackend]


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with run_simulator(latency_ms=0) as simulator:
        yield simulator


@pytest.fixture(autouse=True)
def clean(sim: Simulator) -> None:
    sim.reset()


@pytest.fixture
def make_backend(sim: Simulator) -> Iterator[Factory]:
    """Loaded backends, closed after the test: the last close drops the upstream's pool and breaker, so every
    test starts with a closed circuit and the breaker settings it asks for."""
    made: list[OpenAICompatibleBackend] = []

    def make(**params: Any) -> OpenAICompatibleBackend:
        params = {"base_url": sim.base_url, "retry_backoff_s": 0.01, **params}
        backend = OpenAICompatibleBackend(ModelSpec("remote", "1", "openai_compatible", params=params))
        backend.load()
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


def chat_request(**headers: str) -> ChatRequest:
    """Simulator knobs as keywords: Fail_First="2" travels as X-Sim-Fail-First, like any forwarded header."""
    return ChatRequest(
        messages=MESSAGES, headers={f"X-Sim-{k.replace('_', '-')}": v for k, v in headers.items()}
    )


def fresh_key() -> str:
    return uuid.uuid4().hex


def attempts(sim: Simulator, key: str) -> int:
    return sim.stats()["by_key"].get(key, 0)


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_chat_returns_text_finish_reason_and_usage(make_backend: Factory) -> None:
    result = make_backend().chat(chat_request(Tokens="4"))
    assert result.text == "tok0 tok1 tok2 tok3"
    assert result.finish_reason == "stop"
    assert (result.prompt_tokens, result.completion_tokens) == (PROMPT_WORDS, 4)


def test_stream_yields_deltas_then_usage_and_reuses_the_connection(
    sim: Simulator, make_backend: Factory
) -> None:
    backend = make_backend()
    chunks = list(backend.chat_stream(chat_request(Tokens="5")))
    *deltas, last = chunks
    assert "".join(chunk.text for chunk in deltas) == "tok0 tok1 tok2 tok3 tok4"
    assert all(chunk.text and chunk.finish_reason is None for chunk in deltas)
    assert last == ChatChunk(text="", finish_reason="stop", prompt_tokens=PROMPT_WORDS, completion_tokens=5)
    list(backend.chat_stream(chat_request(Tokens="2")))
    backend.chat(chat_request(Tokens="2"))
    assert sim.stats()["connections_total"] == 1


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
def test_retries_before_the_first_byte_until_success(
    sim: Simulator, make_backend: Factory, stream: bool
) -> None:
    key = fresh_key()
    backend = make_backend(max_retries=2)
    request = chat_request(Fail_First="2", Key=key, Tokens="3")
    text = "".join(c.text for c in backend.chat_stream(request)) if stream else backend.chat(request).text
    assert text == "tok0 tok1 tok2"
    assert attempts(sim, key) == 3


def test_no_retry_once_the_stream_has_started(sim: Simulator, make_backend: Factory) -> None:
    key = fresh_key()
    received: list[str] = []
    with pytest.raises(UpstreamStreamError) as caught:
        for chunk in make_backend(max_retries=2).chat_stream(chat_request(Fault="cut", Key=key, Tokens="8")):
            received.append(chunk.text)
    assert received
    assert caught.value.status == 502
    assert caught.value.code == "upstream_stream_interrupted"
    assert attempts(sim, key) == 1


def test_circuit_opens_fails_fast_and_closes_after_cool_down(sim: Simulator, make_backend: Factory) -> None:
    backend = make_backend(max_retries=0, breaker_fail_max=2, breaker_reset_s=0.5)
    for _ in range(2):
        with pytest.raises(APIError) as caught:
            backend.chat(chat_request(Fault="503"))
        assert (caught.value.status, caught.value.code) == (503, "upstream_unavailable")

    def fails_fast() -> None:
        before = sim.stats()["requests_total"]
        started = time.perf_counter()
        with pytest.raises(APIError) as caught:
            backend.chat(chat_request())
        assert time.perf_counter() - started < 0.05
        assert (caught.value.status, caught.value.code) == (503, "upstream_unavailable")
        assert caught.value.headers == {"Retry-After": "1"}
        assert sim.stats()["requests_total"] == before

    fails_fast()
    time.sleep(0.6)
    with pytest.raises(APIError):  # the half-open trial fails: open again
        backend.chat(chat_request(Fault="503"))
    fails_fast()
    time.sleep(0.6)
    assert backend.chat(chat_request(Tokens="2")).text == "tok0 tok1"  # the trial succeeds: closed
    assert backend.chat(chat_request(Tokens="1")).text == "tok0"


def test_client_errors_do_not_open_the_circuit(make_backend: Factory) -> None:
    backend = make_backend(max_retries=0, breaker_fail_max=1)
    for _ in range(2):
        with pytest.raises(APIError) as caught:
            backend.chat(chat_request(Fault="400"))
        assert caught.value.status == 400
    assert backend.chat(chat_request(Tokens="1")).text == "tok0"


def test_first_byte_timeout_is_retried_then_maps_to_504(sim: Simulator, make_backend: Factory) -> None:
    key = fresh_key()
    backend = make_backend(first_byte_timeout_s=0.2, max_retries=1)
    started = time.perf_counter()
    with pytest.raises(APIError) as caught:
        backend.chat(chat_request(Fault="timeout", Key=key))
    assert 0.4 <= time.perf_counter() - started < 1.0
    assert (caught.value.status, caught.value.code) == (504, "upstream_timeout")
    assert attempts(sim, key) == 2


def test_deadline_bounds_the_whole_call_including_retries(sim: Simulator, make_backend: Factory) -> None:
    key = fresh_key()
    backend = make_backend(first_byte_timeout_s=0.3, deadline_s=0.5, max_retries=5)
    started = time.perf_counter()
    with pytest.raises(APIError) as caught:
        list(backend.chat_stream(chat_request(Fault="timeout", Key=key)))
    assert time.perf_counter() - started < 0.65  # 0.5 s deadline plus scheduling slack
    assert (caught.value.status, caught.value.code) == (504, "upstream_timeout")
    assert attempts(sim, key) == 2


def test_stall_after_the_first_token_is_a_stream_timeout(make_backend: Factory) -> None:
    stream = make_backend(first_byte_timeout_s=0.2).chat_stream(chat_request(Tokens="4", Tokens_Per_S="2"))
    assert next(stream).text == "tok0"
    with pytest.raises(UpstreamStreamError) as caught:
        next(stream)
    assert (caught.value.status, caught.value.code) == (504, "upstream_timeout")


@pytest.mark.parametrize("stream", [False, True], ids=["chat", "stream"])
def test_malformed_json_is_a_502_without_retry(sim: Simulator, make_backend: Factory, stream: bool) -> None:
    key = fresh_key()
    backend = make_backend(max_retries=2)
    with pytest.raises(APIError) as caught:
        if stream:
            list(backend.chat_stream(chat_request(Fault="malformed", Key=key)))
        else:
            backend.chat(chat_request(Fault="malformed", Key=key))
    assert caught.value.status == 502
    assert caught.value.code == ("upstream_stream_interrupted" if stream else "upstream_error")
    assert attempts(sim, key) == 1


@pytest.mark.parametrize(
    ("fault", "status", "code", "tries"),
    [
        ("400", 400, "invalid_value", 1),
        ("422", 422, "validation_error", 1),
        ("401", 502, "upstream_auth_error", 1),
        ("403", 502, "upstream_auth_error", 1),
        ("404", 502, "upstream_not_found", 1),
        ("500", 502, "upstream_error", 2),
        ("502", 502, "upstream_error", 2),
        ("504", 504, "upstream_timeout", 2),
        ("429", 503, "upstream_unavailable", 2),
        ("503", 503, "upstream_unavailable", 2),
    ],
)
def test_upstream_statuses_map_to_gateway_errors(
    sim: Simulator, make_backend: Factory, fault: str, status: int, code: str, tries: int
) -> None:
    key = fresh_key()
    with pytest.raises(APIError) as caught:
        make_backend(max_retries=1).chat(chat_request(Fault=fault, Key=key))
    assert (caught.value.status, caught.value.code) == (status, code)
    assert f"simulated upstream error {fault}" in caught.value.message
    assert attempts(sim, key) == tries


def test_long_upstream_retry_after_is_passed_on_not_waited_out(sim: Simulator, make_backend: Factory) -> None:
    key = fresh_key()
    with pytest.raises(APIError) as caught:
        make_backend(max_retries=2).chat(chat_request(Fault="503", Retry_After="7", Key=key))
    assert caught.value.headers == {"Retry-After": "7"}
    assert attempts(sim, key) == 1


def test_request_id_is_forwarded_and_client_credentials_are_not(
    sim: Simulator, make_backend: Factory
) -> None:
    request = chat_request(Tokens="1")
    request.request_id = "req-" + fresh_key()
    request.headers.update({"x-request-id": "spoofed", "Authorization": "Bearer the-client-token"})
    make_backend().chat(request)
    list(make_backend().chat_stream(request))
    assert sim.stats()["request_ids"] == [request.request_id, request.request_id]


def test_closing_the_stream_drops_the_upstream_connection(sim: Simulator, make_backend: Factory) -> None:
    stream = make_backend().chat_stream(chat_request(Tokens="200", Tokens_Per_S="50"))
    assert next(stream).text == "tok0"
    stream.close()
    assert wait_for(lambda: sim.stats()["disconnects"] == 1, timeout=1.0)
    assert sim.stats()["in_flight_streams"] == 0


def test_calls_share_the_pool_concurrently_up_to_pool_size(sim: Simulator, make_backend: Factory) -> None:
    backend = make_backend(pool_size=4)
    started = time.perf_counter()
    calls = [gevent.spawn(backend.chat, chat_request(Latency_Ms="100", Tokens="1")) for _ in range(12)]
    gevent.joinall(calls, raise_error=True)
    assert time.perf_counter() - started < 0.9  # serialised, 12 calls would take 1.2 s
    assert sim.stats()["max_in_flight"] == 4


def test_failures_and_abandoned_streams_give_their_connection_back(make_backend: Factory) -> None:
    backend = make_backend(pool_size=1, max_retries=0, first_byte_timeout_s=0.2)
    for fault in ("timeout", "malformed", "cut"):
        with pytest.raises(APIError):
            list(backend.chat_stream(chat_request(Fault=fault)))
    with pytest.raises(APIError):
        backend.chat(chat_request(Fault="timeout"))
    stream = backend.chat_stream(chat_request(Tokens="50", Tokens_Per_S="50"))
    next(stream)
    stream.close()
    assert backend.chat(chat_request(Tokens="1")).text == "tok0"  # a leaked slot would time out here


@pytest.mark.parametrize("encoding_format", ["base64", "float"])
def test_embeddings(make_backend: Factory, encoding_format: str) -> None:
    result = make_backend(encoding_format=encoding_format).embed(["a b", "c"], dimensions=16)
    assert result.vectors.dtype == np.float32
    assert result.vectors.shape == (2, 16)
    expected = np.array([pseudo_embedding("a b", 16), pseudo_embedding("c", 16)], dtype=np.float32)
    np.testing.assert_allclose(result.vectors, expected, rtol=1e-6)
    assert result.prompt_tokens == 3


def test_connection_refused_is_a_502(make_backend: Factory) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = make_backend(base_url=f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(APIError) as caught:
        backend.chat(chat_request())
    assert (caught.value.status, caught.value.code) == (502, "upstream_error")


def test_api_key_env_is_optional(make_backend: Factory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalogue always names UPSTREAM_API_KEY, and keyless local servers must still load."""
    monkeypatch.delenv("GW_TEST_UPSTREAM_KEY", raising=False)
    assert make_backend(api_key_env="GW_TEST_UPSTREAM_KEY").chat(chat_request(Tokens="1")).text == "tok0"


def test_our_upstream_key_is_sent_and_the_callers_is_not(
    make_backend: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The simulator ignores credentials, so a one-handler server records what actually went on the wire."""
    seen: list[str | None] = []

    class Recorder(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json.dumps({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    monkeypatch.setenv("GW_TEST_UPSTREAM_KEY", "sk-upstream")
    with ThreadingHTTPServer(("127.0.0.1", 0), Recorder) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        backend = make_backend(
            base_url=f"http://127.0.0.1:{server.server_port}/v1", api_key_env="GW_TEST_UPSTREAM_KEY"
        )
        request = chat_request()
        request.headers["authorization"] = "Bearer the-callers-gateway-token"
        assert backend.chat(request).text == "ok"
        server.shutdown()
    assert seen == ["Bearer sk-upstream"]
