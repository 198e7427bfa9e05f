"""Worker admission: past MAX_IN_FLIGHT + MAX_PENDING a request gets 503 `server_overloaded` before
any authentication work, and service resumes after the burst; cheap routes take turns
(CHEAP_ROUTE_CONCURRENCY slots); probes and model calls never wait."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from app import admission
from app.identity import accounts, apikeys, principal
from app.identity import scopes as sc
from bench.upstream_sim import run_simulator
from tests import support


@pytest.fixture
def app_env(tmp_path) -> dict[str, str]:
    path = tmp_path / "models.yaml"
    path.write_text("models:\n  - name: vader-sentiment\n    aliases: [vader]\n    backend: vader\n")
    return {
        "MODELS_CONFIG": str(path),
        "MODELS_DIR": str(tmp_path),
        "CHEAP_ROUTE_CONCURRENCY": "1",
        "MAX_IN_FLIGHT": "1",
        "MAX_PENDING": "1",
        "MAX_PENDING_WAIT": "30",
    }


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


# --- the worker gate: MAX_IN_FLIGHT, MAX_PENDING, MAX_PENDING_WAIT ---------------------------------


def assert_overloaded(resp, request_id: str | None = None) -> None:
    assert resp.status_code == 503, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body == {
        "error": {
            "message": "This server is at capacity; retry shortly.",
            "type": "service_unavailable",
            "param": None,
            "code": "server_overloaded",
        },
        "request_id": resp.headers["X-Request-ID"],
    }
    assert resp.headers["Retry-After"] == "1"
    assert resp.headers["Content-Type"] == "application/json"
    if request_id is not None:
        assert body["request_id"] == request_id


@pytest.fixture
def key_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every API key the app tries to verify (cache or database), in this process."""
    calls: list[str] = []
    verify = principal.verify_key

    def counting(presented: str, **options: bool):
        calls.append(presented)
        return verify(presented, **options)

    monkeypatch.setattr(principal, "verify_key", counting)
    return calls


def rejected(reason: str) -> float:
    return admission.REJECTED.labels(reason=reason)._value.get()


def test_a_full_gate_answers_503_before_any_authentication(app, key, key_lookups):
    gate = app.extensions["admission_gate"]
    gate.max_pending = 0
    client = app.test_client()
    headers = {"Authorization": f"Bearer {key}"}
    before = rejected("queue_full")
    assert gate.enter() is None  # the one place: a request in progress
    try:
        resp = client.post(
            "/v1/chat/completions",
            headers={**headers, "X-Request-ID": "burst-1"},
            json={"model": "vader", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert_overloaded(resp, "burst-1")
        assert_overloaded(client.get("/v1/models", headers={**headers, "X-Request-ID": "bad id!"}))
        assert key_lookups == [], "a refused request must not look its key up"
        assert rejected("queue_full") == before + 2
        # Probes and metrics are never gated: an overloaded worker is alive.
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"):
            assert client.get(path).status_code == 200, path
    finally:
        gate.leave()
    # The burst is over: the next request is served, authenticated as usual.
    assert client.get("/v1/models", headers=headers).status_code == 200
    assert key_lookups == [key]
    assert (gate.in_flight, gate.pending) == (0, 0)


def test_waiting_requests_are_bounded_and_served_in_turn(app, key):
    gate = app.extensions["admission_gate"]
    headers = {"Authorization": f"Bearer {key}"}
    assert gate.enter() is None
    try:
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(lambda: app.test_client().get("/v1/models", headers=headers).status_code)
            deadline = time.monotonic() + 30
            while gate.pending != 1:  # the thread has reached the gate and waits in it
                assert time.monotonic() < deadline and not waiting.done()
                time.sleep(0.01)
            assert_overloaded(app.test_client().get("/v1/models", headers=headers))
            gate.leave()
            assert waiting.result(timeout=30) == 200
    finally:
        if gate.in_flight:
            gate.leave()
    assert (gate.in_flight, gate.pending) == (0, 0)


def test_a_wait_longer_than_max_pending_wait_is_refused(app, key):
    gate = app.extensions["admission_gate"]
    gate.wait_s = 0.05
    before = rejected("wait_timeout")
    assert gate.enter() is None
    try:
        assert_overloaded(app.test_client().get("/v1/models", headers={"Authorization": f"Bearer {key}"}))
    finally:
        gate.leave()
    assert rejected("wait_timeout") == before + 1
    assert (gate.in_flight, gate.pending) == (0, 0)


def test_the_gate_covers_only_the_gateway_when_mounted_under_a_prefix(tmp_path, sqlite_url, monkeypatch):
    from flask import Flask

    from app import FlaskAIGateway

    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    host = Flask(__name__)
    host.route("/shop")(lambda: "shop")
    FlaskAIGateway(host, url_prefix="/ai", config={"INSTANCE_PATH": str(tmp_path), "MAX_PENDING": 0})
    gate = host.extensions["admission_gate"]
    for _ in range(gate.max_in_flight):
        assert gate.enter() is None
    try:
        client = host.test_client()
        assert client.get("/shop").status_code == 200
        assert client.get("/ai/healthz").status_code == 200
        assert_overloaded(client.get("/ai/v1/models"))
    finally:
        for _ in range(gate.max_in_flight):
            gate.leave()
    from app.governance import audit

    audit.shutdown(host)
    host.extensions["usage_ledger"].close()


CHAT = {"model": "upstream-chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


@pytest.mark.server
def test_a_burst_past_the_gate_on_gunicorn_gets_503s_then_service_resumes(tmp_path, sqlite_url):
    """One gevent worker, MAX_IN_FLIGHT=2 and MAX_PENDING=1, in front of a simulator that holds each
    call for 3 s: the concurrency is set by what the simulator holds, not by timing."""
    with run_simulator(latency_ms=3000) as sim:
        models = tmp_path / "models.yaml"
        models.write_text(
            "models:\n  - name: upstream-chat\n    backend: openai_compatible\n"
            f"    params:\n      base_url: {sim.base_url}\n      model: sim-model\n"
        )
        key = support.issue_key(sqlite_url)
        env = {
            "DATABASE_URL": sqlite_url,
            "MODELS_CONFIG": str(models),
            "MODELS_DIR": str(tmp_path),
            "INSTANCE_PATH": str(tmp_path / "instance"),
            "MAX_IN_FLIGHT": "2",
            "MAX_PENDING": "1",
            "MAX_PENDING_WAIT": "60",
        }
        headers = {"Authorization": f"Bearer {key}"}
        with (
            support.GunicornServer(env, workers=1, ready_path="/readyz") as server,
            ThreadPoolExecutor(3) as pool,
        ):

            def chat() -> int:
                return requests.post(
                    server.url + "/v1/chat/completions", json=CHAT, headers=headers, timeout=60
                ).status_code

            held = [pool.submit(chat) for _ in range(2)]
            wait_until(lambda: sim.stats()["in_flight"] == 2)
            queued = pool.submit(chat)
            wait_until(lambda: support.metric(server.url, "gateway_admission_pending") == 1)
            assert support.metric(server.url, "gateway_admission_in_flight") == 2
            for index in range(5):
                resp = requests.post(
                    server.url + "/v1/chat/completions",
                    json=CHAT,
                    headers={**headers, "X-Request-ID": f"shed-{index}"},
                    timeout=10,
                )
                assert resp.status_code == 503 and resp.headers["Retry-After"] == "1", resp.text
                assert resp.json()["error"]["code"] == "server_overloaded"
                assert resp.json()["request_id"] == resp.headers["X-Request-ID"] == f"shed-{index}"
            assert requests.get(server.url + "/healthz", timeout=10).status_code == 200
            assert sim.stats()["in_flight"] == 2, "a refused request must never reach the upstream"
            assert support.metric(server.url, "gateway_admission_rejected_total", reason="queue_full") == 5
            sim.configure(latency_ms=0)
            assert [f.result(timeout=60) for f in held] == [200, 200]
            assert queued.result(timeout=60) == 200
            assert [chat() for _ in range(3)] == [200, 200, 200]
            assert support.metric(server.url, "gateway_admission_in_flight") == 0
            assert support.metric(server.url, "gateway_admission_pending") == 0


def wait_until(condition, timeout_s: float = 30) -> None:
    """Poll a state the test controls (what the simulator holds, a gauge), never a duration."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.05)


def test_the_lag_limit_cuts_under_lag_and_grows_back_only_while_it_binds():
    """LagLimit's controller, sample by sample (`observe` is what the sampling greenlet calls)."""
    gate = admission.AdmissionGate(max_in_flight=100, max_pending=0, wait_s=0)
    control = admission.LagLimit(gate, target_s=0.020)
    control.observe(0.050, now=10.0)
    assert gate.limit == 75, "a lag over the target cuts the limit by a quarter"
    control.observe(0.050, now=10.05)
    assert gate.limit == 75, "no second cut before the first has had COOLDOWN_S to show"
    for step in range(1, 20):
        control.observe(0.500, now=10.0 + step * control.COOLDOWN_S)
    assert gate.limit == control.MIN_LIMIT, "never below MIN_LIMIT"
    control.observe(0.001, now=20.0)
    assert gate.limit == control.MIN_LIMIT, "no growth while the limit is not what holds requests back"
    for _ in range(gate.limit):
        assert gate.enter() is None
    assert gate.enter() == "queue_full"
    control.observe(0.015, now=20.01)
    assert gate.limit == control.MIN_LIMIT, "no growth between half the target and the target"
    for _ in range(200):
        control.observe(0.001, now=20.02)
        while gate.in_flight < gate.limit:
            assert gate.enter() is None
    assert gate.limit == gate.max_in_flight == 100, "grows back, never above MAX_IN_FLIGHT"
    while gate.in_flight:
        gate.leave()


def test_a_lower_limit_holds_new_requests_and_a_higher_one_admits_those_waiting():
    gate = admission.AdmissionGate(max_in_flight=4, max_pending=2, wait_s=30)
    for _ in range(3):
        assert gate.enter() is None
    gate.set_limit(2)  # three in flight over a limit of two: none is cut, new ones wait
    outcomes: list[str | None] = []
    waiters = [threading.Thread(target=lambda: outcomes.append(gate.enter())) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    deadline = time.monotonic() + 30
    while gate.pending != 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert gate.enter() == "queue_full"
    gate.leave()
    assert (gate.in_flight, gate.pending) == (2, 2), "down to the limit of two: still no room"
    gate.leave()
    assert (gate.in_flight, gate.pending) == (2, 1), "one below it: the first in line is admitted"
    gate.set_limit(3)
    for waiter in waiters:
        waiter.join(30)
    assert outcomes == [None, None] and (gate.in_flight, gate.pending) == (3, 0)
    for _ in range(3):
        gate.leave()
    assert gate.in_flight == 0


def test_the_lag_limit_is_off_unless_a_target_is_set(app, tmp_path, sqlite_url, monkeypatch):
    assert app.extensions["admission_lag_limit"] is None
    from app import create_app

    monkeypatch.setenv("DATABASE_URL", sqlite_url)
    tuned = create_app({"INSTANCE_PATH": str(tmp_path), "ADMISSION_LAG_TARGET_MS": 20})
    control = tuned.extensions["admission_lag_limit"]
    assert control.target_s == 0.020 and control.gate is tuned.extensions["admission_gate"]
