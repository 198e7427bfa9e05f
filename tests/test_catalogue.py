"""The catalogue and model runtimes, in-process: failed loads stay isolated, admission is bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from app.errors import APIError
from app.inference.backends import Backend, ModelSpec, register_backend
from app.inference.backends.base import ChatChunk, ChatRequest, EmbeddingResult
from app.inference.catalogue import load_entries
from app.inference.runtime import ModelRuntime
from tests import support

CATALOGUE = """
models:
  - name: vader
    backend: vader
  - name: broken-classifier
    backend: sklearn
    params:
      artifact: missing/model.skops
  - name: skipped
    backend: vader
    enabled: ${NOT_SET_ANYWHERE:-false}
  - name: templated
    backend: vader
    aliases: [tpl]
    version: "${TEMPLATED_VERSION:-7}"
"""


@pytest.fixture
def app_env(tmp_path) -> dict[str, str]:
    path = tmp_path / "models.yaml"
    path.write_text(CATALOGUE)
    return {"MODELS_CONFIG": str(path), "MODELS_DIR": str(tmp_path)}


def test_entries_expand_the_environment(app_env, monkeypatch):
    monkeypatch.setenv("TEMPLATED_VERSION", "3")
    entries = {e["name"]: e for e in load_entries(app_env["MODELS_CONFIG"])}
    assert set(entries) == {"vader", "broken-classifier", "templated"}
    assert entries["templated"]["version"] == "3" and entries["templated"]["aliases"] == ["tpl"]


def test_a_failed_model_does_not_take_down_the_others(app, client, database_url):
    key = support.issue_key(database_url)
    ready = client.get("/readyz")
    assert ready.status_code == 503
    body = ready.get_json()
    assert body["not_ready"] == ["models"]
    detail = next(c["detail"] for c in body["checks"] if c["name"] == "models")
    assert "vader/1: loaded" in detail and "broken-classifier/1: failed" in detail and "missing" in detail

    headers = {"Authorization": f"Bearer {key}"}
    tensor = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["What a lovely day!"]}
    ok = client.post("/v2/models/tpl/infer", json={"inputs": [tensor]}, headers=headers)
    assert ok.status_code == 200, ok.get_json()
    broken = client.post("/v2/models/broken-classifier/infer", json={"inputs": [tensor]}, headers=headers)
    assert broken.status_code == 503 and broken.get_json()["error"]["code"] == "model_not_ready"
    assert client.get("/v2/models/broken-classifier/ready", headers=headers).status_code == 503
    assert client.get("/v2/health/ready").status_code == 503
    models = client.get("/v1/models", headers=headers).get_json()["data"]
    assert {m["id"]: m["state"] for m in models} == {
        "vader": "loaded",
        "broken-classifier": "failed",
        "templated": "loaded",
    }


def _slow_runtime(max_queue: int) -> ModelRuntime:
    runtime = ModelRuntime(
        ModelSpec(
            name="v",
            version="1",
            backend="vader",
            limits={"max_concurrency": 1, "max_queue": max_queue, "queue_timeout_s": 5},
        )
    )
    runtime.load()
    return runtime


def test_admission_queues_then_rejects_with_retry_after():
    runtime = _slow_runtime(max_queue=1)
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with runtime.slot():
            holding.set()
            release.wait(5)

    first = threading.Thread(target=hold)
    first.start()
    holding.wait(5)
    queued_result: list[float] = []

    def queued() -> None:
        started = time.monotonic()
        with runtime.slot():
            queued_result.append(time.monotonic() - started)

    second = threading.Thread(target=queued)
    second.start()
    time.sleep(0.1)  # the second caller is now waiting in the queue
    with pytest.raises(APIError) as info, runtime.slot():
        pass
    assert info.value.status == 503 and info.value.code == "model_overloaded"
    assert info.value.headers["Retry-After"] == "1"
    release.set()
    first.join(5)
    second.join(5)
    assert queued_result and queued_result[0] >= 0.1  # it waited, then was served


@register_backend
class CountingBackend(Backend):
    """A chat family that counts tokens, for observing the runtime without a model's timing."""

    family = "test_counting"
    capabilities = frozenset({"chat"})
    cpu_bound = False
    thread_safe = False

    def chat_stream(self, request: ChatRequest) -> Iterator[ChatChunk]:
        for i in range(1000):
            yield ChatChunk(text=str(i))
        yield ChatChunk(finish_reason="stop", prompt_tokens=1, completion_tokens=1000)


def test_slot_is_released_when_a_stream_is_closed_early():
    runtime = ModelRuntime(ModelSpec(name="c", version="1", backend="test_counting", limits={"max_queue": 0}))
    runtime.load()
    stream = runtime.chat_stream(ChatRequest(messages=[{"role": "user", "content": "x"}]))
    assert next(stream).text == "0"
    with pytest.raises(APIError) as info, runtime.slot():
        pass
    assert info.value.code == "model_overloaded"
    stream.close()
    with runtime.slot():
        pass


@register_backend
class GatedEmbedder(Backend):
    """Embeddings that wait for a gate, so a test can hold the one slot while requests pile up."""

    family = "test_gated_embedder"
    capabilities = frozenset({"embeddings"})
    cpu_bound = False
    thread_safe = True
    gate = threading.Event()
    entered = threading.Event()

    def embed(self, texts: list[str], dimensions: int | None = None) -> EmbeddingResult:
        self.entered.set()
        self.gate.wait(10)
        return EmbeddingResult(vectors=np.ones((len(texts), 2), dtype=np.float32), prompt_tokens=len(texts))


def test_batched_embeddings_are_bounded_like_every_other_model():
    """One batch forming plus `max_queue` may wait; past that, or past queue_timeout_s, it's 503."""
    limits = {"max_concurrency": 1, "max_queue": 1, "max_batch_size": 2, "queue_timeout_s": 1.0}
    runtime = ModelRuntime(ModelSpec(name="e", version="1", backend="test_gated_embedder", limits=limits))
    runtime.load()
    GatedEmbedder.gate.clear()
    GatedEmbedder.entered.clear()
    results: list[object] = []

    def call() -> None:
        try:
            results.append(runtime.embed(["x"], None).prompt_tokens)
        except APIError as exc:
            results.append(exc.code)

    running = threading.Thread(target=call)  # its batch holds the only slot until the gate opens
    running.start()
    assert GatedEmbedder.entered.wait(5)
    waiting = [threading.Thread(target=call) for _ in range(3)]  # max_queue + max_batch_size
    for thread in waiting:
        thread.start()
    deadline = time.monotonic() + 5
    while len(runtime.batcher._pending) < 3:  # all three queued behind the running batch
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with pytest.raises(APIError) as info:
        runtime.embed(["one too many"], None)
    assert info.value.status == 503 and info.value.code == "model_overloaded"
    assert info.value.headers["Retry-After"] == "1"
    for thread in waiting:  # still queued after queue_timeout_s: refused, not left hanging
        thread.join(5)
    assert results == ["model_overloaded"] * 3
    GatedEmbedder.gate.set()
    running.join(5)
    assert results[-1] == 1
    assert runtime.embed(["served again"], None).prompt_tokens == 1
