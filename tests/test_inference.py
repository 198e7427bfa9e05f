"""The inference API end to end: a real gunicorn+gevent server, real models, the simulator
upstream, and the official `openai` SDK as the client nobody here wrote."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import requests

from bench.upstream_sim import run_simulator
from tests import support

pytestmark = pytest.mark.server
CATALOGUE = str(support.ROOT / "tests" / "models.yaml")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("models")
    support.build_default_models(path)
    return path


@pytest.fixture(scope="module")
def simulator():
    with run_simulator(latency_ms=0) as sim:
        yield sim


@pytest.fixture(scope="module")
def gateway(sqlite_template, models_dir, simulator, tmp_path_factory):
    redis_url = support.require_service("TEST_REDIS_URL")
    support.flush_redis(redis_url)
    db_url = support.copy_sqlite(sqlite_template, tmp_path_factory.mktemp("db") / "gw.db")
    key = support.issue_key(db_url)
    env = {
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "MODELS_CONFIG": CATALOGUE,
        "MODELS_DIR": str(models_dir),
        "UPSTREAM_BASE_URL": simulator.base_url,
        "SSE_PING_INTERVAL": "0.5",
    }
    with support.GunicornServer(env, workers=1, ready_path="/readyz") as server:
        server.key = key
        yield server


@pytest.fixture
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0, timeout=60)


def post(gateway, path: str, body: dict, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {gateway.key}", **kwargs.pop("headers", {})}
    return requests.post(gateway.url + path, json=body, headers=headers, timeout=60, **kwargs)


def assert_error(resp: requests.Response, status: int, code: str, param: str | None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["code"] == code, body
    assert body["error"]["param"] == param, body
    assert body["request_id"] == resp.headers["X-Request-ID"]
    return body["error"]


# 1. The official SDK, unmodified ------------------------------------------------------------
def test_sdk_lists_models(client):
    ids = {m.id for m in client.models.list()}
    assert {"smollm2", "minilm", "vader", "breast-cancer-classifier", "upstream-chat"} <= ids
    assert client.models.retrieve("smollm2").id == "smollm2"


def test_sdk_chat_with_smollm2(client):
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        max_tokens=16,
        temperature=0,
    )
    text = reply.choices[0].message.content
    assert text.strip() and "paris" in text.lower()
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in {"stop", "length"}
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens > 0


def test_sdk_stream_concatenates_to_a_coherent_reply(client):
    # llama.cpp reuses the KV cache between calls, so even at temperature 0 a second run may
    # differ in the last bits and pick another token: compare content, not bytes.
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Name three colours."}],
            max_tokens=32,
            temperature=0,
            stream=True,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1 and len(chunks) > 5
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(streamed.split()) >= 3
    assert any(colour in streamed.lower() for colour in ("red", "blue", "green", "yellow"))
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
    assert all(c.usage is None for c in chunks)


def test_sdk_stream_include_usage(client):
    chunks = list(
        client.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "Say hi."}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sdk_embeddings_related_pair_is_closer(client):
    texts = ["A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today."]
    result = client.embeddings.create(model="minilm", input=texts)  # the SDK asks for base64
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (3, 384)
    assert float(vectors[0] @ vectors[1]) > float(vectors[0] @ vectors[2])
    floats = client.embeddings.create(model="minilm", input="hello", encoding_format="float", dimensions=64)
    assert len(floats.data[0].embedding) == 64 and floats.usage.prompt_tokens > 0


def test_sdk_chat_through_the_upstream(client, simulator):
    reply = client.chat.completions.create(
        model="upstream-chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert reply.choices[0].message.content.startswith("tok0")
    stream = client.chat.completions.create(
        model="upstream-chat",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).startswith("tok0 tok1")
    assert chunks[-1].usage.completion_tokens == 16


# 2. Classic models over the Open Inference Protocol -----------------------------------------
def test_v2_vader_signs(gateway):
    body = {
        "inputs": [
            {
                "name": "text",
                "shape": [2],
                "datatype": "BYTES",
                "data": ["I love this, it is wonderful!", "This is terrible, I hate it."],
            }
        ]
    }
    resp = post(gateway, "/v2/models/vader/infer", body)
    assert resp.status_code == 200, resp.text
    outputs = {o["name"]: o for o in resp.json()["outputs"]}
    assert outputs["compound"]["data"][0] > 0 > outputs["compound"]["data"][1]
    assert resp.json()["model_name"] == "vader"


def test_v2_sklearn_metadata_and_infer(gateway, models_dir):
    headers = {"Authorization": f"Bearer {gateway.key}"}
    meta = requests.get(
        gateway.url + "/v2/models/breast-cancer-classifier", headers=headers, timeout=10
    ).json()
    (tensor,) = meta["inputs"]
    assert tensor["shape"] == [-1, 30] and tensor["datatype"] == "FP64"
    from sklearn.datasets import load_breast_cancer

    x = load_breast_cancer().data[:3]
    body = {
        "inputs": [{"name": tensor["name"], "shape": [3, 30], "datatype": "FP64", "data": x.ravel().tolist()}]
    }
    resp = post(gateway, "/v2/models/breast-cancer-classifier/versions/1/infer", body)
    assert resp.status_code == 200, resp.text
    outputs = {o["name"]: o for o in resp.json()["outputs"]}
    proba = np.array(outputs["predict_proba"]["data"]).reshape(outputs["predict_proba"]["shape"])
    assert proba.shape == (3, 2) and np.allclose(proba.sum(axis=1), 1)
    ready = requests.get(
        gateway.url + "/v2/models/breast-cancer-classifier/ready", headers=headers, timeout=10
    )
    assert ready.status_code == 200
    assert requests.get(gateway.url + "/v2/health/ready", timeout=10).status_code == 200


# 3. Bad input: precise errors with `param` ----------------------------------------------------
CHAT = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "validation_error", "model"),
        ({"model": "smollm2", "messages": "hello"}, 400, "validation_error", "messages"),
        ({"model": "smollm2", "messages": []}, 400, "validation_error", "messages"),
        (
            {"model": "smollm2", "messages": [{"role": "robot", "content": "x"}]},
            400,
            "validation_error",
            "messages.0.role",
        ),
        (
            {"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
            400,
            "validation_error",
            "temperature",
        ),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found", "model"),
        (
            {"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "n": 2},
            400,
            "unsupported_value",
            "n",
        ),
        (
            {"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "n": 0},
            400,
            "validation_error",
            "n",
        ),
        (
            {"model": "smollm2", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000},
            400,
            "invalid_value",
            "max_tokens",
        ),
        (
            {"model": "smollm2", "messages": [{"role": "user", "content": "hello " * 1500}]},
            400,
            "context_length_exceeded",
            "messages",
        ),
        (
            {"model": "minilm", "messages": [{"role": "user", "content": "x"}]},
            400,
            "unsupported_operation",
            "model",
        ),
    ],
)
def test_chat_bad_input(gateway, body, status, code, param):
    assert_error(post(gateway, CHAT, body), status, code, param)


def test_embeddings_bad_input(gateway):
    assert_error(
        post(gateway, "/v1/embeddings", {"model": "minilm", "input": ["x"] * 17}),
        400,
        "too_many_inputs",
        "input",
    )
    assert_error(
        post(gateway, "/v1/embeddings", {"model": "minilm", "input": ["ok", ""]}),
        400,
        "invalid_value",
        "input.1",
    )
    assert_error(
        post(gateway, "/v1/embeddings", {"model": "minilm", "input": "x", "dimensions": 1000}),
        400,
        "invalid_value",
        "dimensions",
    )
    assert_error(
        post(gateway, "/v1/embeddings", {"model": "minilm", "input": [1, 2]}),
        400,
        "validation_error",
        "input",
    )


@pytest.mark.parametrize(
    ("tensor", "code", "param"),
    [
        (
            {"name": "text", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]},
            "datatype_mismatch",
            "inputs.0.datatype",
        ),
        (
            {"name": "text", "shape": [3], "datatype": "BYTES", "data": ["a", "b"]},
            "shape_mismatch",
            "inputs.0.data",
        ),
        (
            {"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["a"]},
            "shape_mismatch",
            "inputs.0.shape",
        ),
        (
            {"name": "words", "shape": [1], "datatype": "BYTES", "data": ["a"]},
            "unknown_input",
            "inputs.0.name",
        ),
    ],
)
def test_v2_tensor_mismatch(gateway, tensor, code, param):
    assert_error(post(gateway, "/v2/models/vader/infer", {"inputs": [tensor]}), 400, code, param)


def test_v2_unknown_model_and_version(gateway):
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a"]}]}
    assert_error(post(gateway, "/v2/models/nope/infer", body), 404, "model_not_found", "model_name")
    assert_error(
        post(gateway, "/v2/models/vader/versions/9/infer", body), 404, "model_not_found", "model_version"
    )


# 4. The upstream through the gateway ---------------------------------------------------------
def test_upstream_stream_cut_ends_with_an_error_event(gateway, simulator):
    simulator.configure(fault="cut", fault_rate=1.0, tokens=20)
    started = time.monotonic()
    try:
        with pytest.raises(openai.APIError) as info:
            stream = openai.OpenAI(
                base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0, timeout=10
            ).chat.completions
            list(
                stream.create(
                    model="upstream-chat", messages=[{"role": "user", "content": "hi"}], stream=True
                )
            )
        assert "interrupted" in str(info.value).lower() or "upstream" in str(info.value).lower()
        assert time.monotonic() - started < 5, "the cut stream hung before it ended"
    finally:
        simulator.reset()


def test_upstream_timeout_is_504(gateway, simulator):
    simulator.configure(fault="timeout", fault_rate=1.0)
    try:
        started = time.monotonic()
        resp = post(
            gateway, CHAT, {"model": "upstream-chat", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert_error(resp, 504, "upstream_timeout", None)
        assert time.monotonic() - started < 10
    finally:
        simulator.reset()
        time.sleep(1.1)  # let the breaker's cool-down pass for the tests after this one


def _stream_upstream(gateway, **kwargs) -> requests.Response:
    body = {"model": "upstream-chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    return post(gateway, CHAT, body, stream=True, **kwargs)


def test_streamed_upstream_refusals_keep_their_status(gateway, simulator):
    """Before the first token nothing is sent, so a refusal is a real 503, retried first; once the
    breaker opens, streams fail fast with 503 too, and it closes after the cool-down."""
    assert _stream_upstream(gateway).status_code == 200  # a success closes the breaker: count from 0
    simulator.configure(fault="503", fault_rate=1.0, retry_after="")
    try:
        for calls in range(1, 4):  # breaker_fail_max: 3 failed calls of 3 attempts each
            refused = _stream_upstream(gateway)
            err = assert_error(refused, 503, "upstream_unavailable", None)
            assert "simulated upstream error 503" in err["message"]
            assert simulator.stats()["faults"]["503"] == 3 * calls  # the first try and both retries
        tripped = _stream_upstream(gateway)
        err = assert_error(tripped, 503, "upstream_unavailable", None)
        assert "suspended" in err["message"] and tripped.headers["Retry-After"] == "1"
        assert simulator.stats()["faults"]["503"] == 9  # the open circuit never reached it
    finally:
        simulator.reset()
    time.sleep(1.1)  # the breaker's cool-down
    healed = _stream_upstream(gateway)
    assert healed.status_code == 200 and healed.content.decode().endswith("data: [DONE]\n\n")


def test_pings_keep_a_slow_stream_alive(gateway, simulator):
    simulator.configure(tokens=3, tokens_per_s=1.0)  # a second between tokens, pings every 0.5 s
    try:
        raw = _stream_upstream(gateway).content.decode()
    finally:
        simulator.reset()
    events = [e for e in raw.split("\n\n") if e]
    assert events.count(": ping") >= 2, events
    assert events[-1] == "data: [DONE]"


def test_client_leaving_a_remote_stream_closes_the_upstream_connection(gateway, simulator):
    simulator.configure(tokens=30, tokens_per_s=5.0)
    body = json.dumps(
        {"model": "upstream-chat", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    request = (
        f"POST {CHAT} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {gateway.key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    try:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(request)
            received = b""
            while b'"content":"tok' not in received:  # a token has been relayed: the stream is live
                received += sock.recv(4096)
            assert received.startswith(b"HTTP/1.1 200")
        deadline = time.monotonic() + 1.0
        while simulator.stats()["disconnects"] < 1:
            assert time.monotonic() < deadline, "the upstream stream outlived its client by 1 s"
            time.sleep(0.05)
        assert simulator.stats()["streams_completed"] == 0
    finally:
        simulator.reset()


def test_request_id_reaches_the_upstream(gateway, simulator):
    resp = post(
        gateway,
        CHAT,
        {"model": "upstream-chat", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Request-ID": "trace-me-123"},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Request-ID"] == "trace-me-123"
    assert "trace-me-123" in simulator.stats()["request_ids"]


# 5. Fan-out ----------------------------------------------------------------------------------
def test_fanout_runs_calls_in_parallel(gateway, simulator):
    simulator.configure(latency_ms=300)
    try:
        calls = [
            {"model": "upstream-chat", "input": {"messages": [{"role": "user", "content": f"q{i}"}]}}
            for i in range(10)
        ]
        started = time.monotonic()
        resp = post(gateway, "/v1/fanout", {"mode": "all", "calls": calls})
        elapsed = time.monotonic() - started
        assert resp.status_code == 200, resp.text
        results = resp.json()["results"]
        assert [r["status"] for r in results] == ["ok"] * 10
        assert elapsed < 1.5, f"10 x 300 ms took {elapsed:.2f} s: not parallel"  # serial would be 3 s
    finally:
        simulator.reset()


def test_fanout_partial_failure_and_first(gateway, simulator):
    calls = [
        {"model": "upstream-chat", "input": {"messages": [{"role": "user", "content": "hi"}]}},
        {"model": "nope", "input": {"messages": [{"role": "user", "content": "hi"}]}},
        {
            "model": "vader",
            "operation": "infer",
            "input": {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["great"]}]},
        },
        {"model": "upstream-chat", "input": {"messages": []}},
    ]
    resp = post(gateway, "/v1/fanout", {"mode": "all", "calls": calls})
    assert resp.status_code == 200, resp.text
    statuses = [(r["status"], (r["error"] or {}).get("code")) for r in resp.json()["results"]]
    assert statuses == [
        ("ok", None),
        ("error", "model_not_found"),
        ("ok", None),
        ("error", "validation_error"),
    ]

    simulator.configure(latency_ms=2000)
    try:
        fast_and_slow = [calls[2], calls[0]]
        started = time.monotonic()
        resp = post(gateway, "/v1/fanout", {"mode": "first", "calls": fast_and_slow})
        assert time.monotonic() - started < 1.5
        results = resp.json()["results"]
        assert results[0]["status"] == "ok" and results[0]["model"] == "vader"
        assert results[1]["status"] == "cancelled"
    finally:
        simulator.reset()


def test_fanout_deadline(gateway, simulator):
    simulator.configure(latency_ms=1500)
    try:
        calls = [
            {
                "model": "upstream-chat",
                "input": {"messages": [{"role": "user", "content": "hi"}]},
                "deadline_ms": 300,
            }
        ]
        resp = post(gateway, "/v1/fanout", {"calls": calls})
        assert resp.json()["results"][0]["status"] == "deadline_exceeded"
        # The overall deadline bounds calls that have none of their own, and the whole request.
        started = time.monotonic()
        calls = [{"model": "upstream-chat", "input": {"messages": [{"role": "user", "content": "hi"}]}}] * 3
        resp = post(gateway, "/v1/fanout", {"calls": calls, "deadline_ms": 400})
        assert resp.status_code == 200, resp.text
        assert [r["status"] for r in resp.json()["results"]] == ["deadline_exceeded"] * 3
        assert time.monotonic() - started < 2.0  # 400 ms, with room for a loaded machine
    finally:
        simulator.reset()


# 6. Back-pressure and disconnects --------------------------------------------------------------
def _open_stream(gateway, max_tokens: int = 200) -> requests.Response:
    body = {
        "model": "smollm2",
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
    }
    return post(gateway, CHAT, body, stream=True)


def test_overload_is_503_with_retry_after_and_disconnect_frees_the_slot(gateway):
    first = _open_stream(gateway)
    assert first.status_code == 200
    lines = first.iter_lines()
    for line in lines:  # the role chunk and a few tokens: generation is under way
        if line.startswith(b"data:") and b'"content":"' in line and b'"content":""' not in line:
            break
    busy = post(gateway, CHAT, {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]})
    err = assert_error(busy, 503, "model_overloaded", None)
    assert busy.headers["Retry-After"] == "1" and "capacity" in err["message"]

    first.raw._fp.fp.raw._sock.shutdown(2)  # the client goes away mid-stream
    first.close()
    deadline = time.monotonic() + 1.0
    while True:  # the slot must be free within 1 s
        resp = post(
            gateway,
            CHAT,
            {"model": "smollm2", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        )
        if resp.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert resp.status_code == 200, resp.text


def test_sse_wire_format(gateway):
    resp = post(
        gateway,
        CHAT,
        {
            "model": "upstream-chat",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}],
        },
        stream=True,
    )
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    assert resp.headers["X-Accel-Buffering"] == "no" and resp.headers["Cache-Control"] == "no-cache"
    assert resp.headers["X-Request-ID"]
    raw = resp.content.decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith(("data: ", ": ping")) for e in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(e[6:]) for e in events if e.startswith("data: {")]
    assert {p["id"] for p in payloads} == {payloads[0]["id"]} and payloads[0]["id"].startswith("chatcmpl-")
    assert {p["object"] for p in payloads} == {"chat.completion.chunk"}
    assert len({p["created"] for p in payloads}) == 1
    # Every chunk but the last carries "usage": null; a missing key is LiteLLM's bug, not ours.
    assert all("usage" in p and p["usage"] is None for p in payloads[:-1])
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [p["choices"][0]["delta"] for p in payloads[1:-2]]
    assert content and all(set(d) == {"content"} and d["content"] for d in content)
    assert all(p["choices"][0]["finish_reason"] is None for p in payloads[:-2])
    assert payloads[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    usage = payloads[-1]["usage"]
    assert payloads[-1]["choices"] == [] and usage["completion_tokens"] == 16
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# 7. Metrics and readiness ----------------------------------------------------------------------
def test_model_metrics_are_exported(gateway):
    text = requests.get(gateway.url + "/metrics", timeout=10).text
    for name in (
        "gateway_model_queue_wait_seconds",
        "gateway_model_inference_seconds",
        "gateway_model_tokens_total",
        "gateway_model_batch_size",
        "gateway_model_errors_total",
    ):
        assert name in text
    assert 'model="smollm2"' in text


def test_readyz_reports_each_model(gateway):
    checks = {c["name"]: c for c in requests.get(gateway.url + "/readyz", timeout=10).json()["checks"]}
    assert "smollm2/1: loaded" in checks["models"]["detail"]


def test_concurrent_embeddings_are_batched(gateway):
    def embed(i: int) -> int:
        return post(
            gateway, "/v1/embeddings", {"model": "minilm", "input": f"sentence number {i}"}
        ).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(embed, range(64))) == {200}
    text = requests.get(gateway.url + "/metrics", timeout=10).text
    count = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_model_batch_size_count") and 'model="minilm"' in line
    )
    total = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_model_batch_size_sum") and 'model="minilm"' in line
    )
    assert total / count > 1.5, "concurrent requests were not coalesced"
