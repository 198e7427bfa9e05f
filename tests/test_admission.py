"""Cheap routes take turns (CHEAP_ROUTE_CONCURRENCY slots); probes and model calls never wait."""

from __future__ import annotations

import threading

import pytest

from app.identity import accounts, apikeys
from app.identity import scopes as sc


@pytest.fixture
def app_env(tmp_path) -> dict[str, str]:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - name: vader-sentiment\n    aliases: [vader]\n    backend: vader\n")
    return {"MODELS_CONFIG": str(path), "MODELS_DIR": str(tmp_path), "CHEAP_ROUTE_CONCURRENCY": "1"}


@pytest.fixture
def key(app) -> str:
    with app.app_context():
        tenant = accounts.create_tenant("acme")
        return apikeys.issue_key(tenant, "k", [sc.MODELS_READ, sc.INFERENCE_INVOKE])[1]


def test_the_probes_and_model_calls_are_unbounded(app):
    unbounded = {e for e, view in app.view_functions.items() if getattr(view, "admission_unbounded", False)}
    assert unbounded == {
        "health.healthz",
        "health.readyz",
        "inference.v2_live",
        "inference.v2_ready",
        "inference.chat_completions",
        "inference.embeddings",
        "inference.fanout",
        "inference.v2_infer",
        "inference.v2_infer_version",
        "inference.add_documents",
        "inference.search",
        "inference.rag_chat",
    }


def test_liveness_answers_while_every_cheap_route_slot_is_taken(app, key):
    slots = app.extensions["admission_slots"]
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/models", headers=headers).status_code == 200
    finished = threading.Event()
    answers: list[int] = []

    def list_models() -> None:
        answers.append(app.test_client().get("/v1/models", headers=headers).status_code)
        finished.set()

    assert slots.acquire(timeout=5)  # the one slot: a cheap route in progress
    waiting = threading.Thread(target=list_models, daemon=True)
    try:
        waiting.start()
        # Served at once, slot or not; and the cheap route cannot finish without the slot.
        assert client.get("/healthz").status_code == 200
        assert client.get("/v2/health/live").status_code == 200
        assert not finished.is_set()
    finally:
        slots.release()
    waiting.join(timeout=30)
    assert finished.is_set() and answers == [200]
