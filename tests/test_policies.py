"""Policies at the API boundary: PII detectors, redact/block, versioned rules, output redaction.

The end-to-end tests go through the real chat endpoint to a backend that counts its calls, so
"a blocked request never reaches the model" is observed, not assumed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from sklearn.datasets import load_breast_cancer
from sqlalchemy import select

from app.errors import APIError
from app.extensions import db
from app.governance.audit.models import AuditRecord
from app.governance.audit.records import canonical_json, sha256_hex
from app.governance.policies.detectors import DETECTORS, PLACEHOLDERS, find_pii
from app.governance.policies.engine import (
    Decision,
    OutputRedactor,
    PolicyViolation,
    check_chat,
    check_texts,
    redact_text,
)
from app.identity.principal import Principal
from app.inference.backends import Backend, register_backend
from app.inference.backends.base import ChatChunk, ChatRequest
from app.inference.backends.sklearn import SklearnBackend
from tests import support
from tests.test_identity import World, assert_error, bearer, seed

TRUE_POSITIVES: dict[str, list[str]] = {
    "email": ["jane.doe+news@example.co.uk", "ops@sub.example.org"],
    "phone": ["+1 (415) 555-2671", "415-555-2671", "(212) 555-0100", "+442071838750", "+44 20 7183 8750"],
    "credit_card": ["4111 1111 1111 1111", "4111111111111111", "5500-0000-0000-0004", "3782 822463 10005"],
    "iban": ["DE89 3704 0044 0532 0130 00", "GB82WEST12345698765432", "NO93 8601 1117 947"],
    "ssn": ["123-45-6789", "078-05-1121"],
    "ip_address": ["192.168.1.20", "10.0.0.1", "2001:db8::8a2e:370:7334", "fe80::1"],
}
NEAR_MISSES = [
    "order 4111 1111 1111 1112 shipped",  # 16 digits, Luhn fails
    "ref 4111111111111112",
    "pay to DE89 3704 0044 0532 0130 01 today",  # checksum fails
    "account GB82WEST12345698765431",
    "running version 1.2.3.4 in prod",
    "upgrade to v1.2.3.4 now",
    "the 1.2.3.4-beta build",
    "Release: 10.1.2.3",
    "room 911, code 12345, ext 555-1234",
    "dates 2024-01-15, 15.01.2024 and 01/15/2024 at 12:30:45",
    "invalid SSNs 666-45-6789 000-12-3456 123-00-4567 123-45-0000 912-34-5678",
    "not a phone 123-456-7890",
    "C++ std::map and MAC 00:1A:2B:3C:4D:5E",
    "not an address 999.1.1.1",
]


def principal(tenant_id: str) -> Principal:
    return Principal(
        tenant_id=tenant_id, subject="test", kind="api_key", scopes=frozenset(), key_id=None, user_id=None
    )


def put_policy(client, key: str, rules: dict, tenant_id: str | None = None):
    body: dict = {"rules": rules}
    if tenant_id:
        body["tenant_id"] = tenant_id
    return client.put("/v1/governance/policies", headers=bearer(key), json=body)


def set_policy(client, key: str, rules: dict, tenant_id: str | None = None) -> dict:
    resp = put_policy(client, key, rules, tenant_id)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def test_tool_call_arguments_are_scanned_like_content(app, client, world):
    """An assistant message may carry text only in its tool calls' arguments (content null)."""
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "mail", "arguments": '{"to": "a@b.example"}'},
    }
    messages = [
        {"role": "user", "content": "write to my colleague"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sent"},
    ]
    set_policy(client, world.a_key, {"pii": {"email": "redact"}})
    with app.test_request_context():
        decision = check_chat(principal(world.a_tenant), "any", messages, None)
    assert decision.detectors == ("email",)
    assistant = decision.messages[1]
    assert assistant["content"] is None
    assert assistant["tool_calls"][0]["function"]["arguments"] == f'{{"to": "{PLACEHOLDERS["email"]}"}}'
    assert decision.messages[0] == messages[0] and decision.messages[2] == messages[2]
    set_policy(client, world.a_key, {"pii": {"email": "block"}})
    with app.test_request_context(), pytest.raises(PolicyViolation) as info:
        check_chat(principal(world.a_tenant), "any", messages, None)
    assert (info.value.code, info.value.param) == ("policy_violation", "messages")


def every(action: str) -> dict[str, str]:
    return dict.fromkeys(DETECTORS, action)


@pytest.fixture
def world(app) -> World:
    return seed(app)


# --- detectors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("detector", "value"), [(d, v) for d, values in TRUE_POSITIVES.items() for v in values]
)
def test_each_detector_finds_its_entities_in_context(detector, value):
    text = f"Please note: {value}. Thanks!"
    spans = find_pii(text)
    assert [(s.detector, text[s.start : s.end]) for s in spans] == [(detector, value)]


@pytest.mark.parametrize("text", NEAR_MISSES)
def test_near_misses_are_left_alone(text):
    assert find_pii(text) == []


def test_redaction_uses_typed_placeholders():
    decision = Decision(1, "allow", (), None, None, True, False, output_detectors=DETECTORS)
    text = " | ".join(values[0] for values in TRUE_POSITIVES.values())
    assert redact_text(decision, text) == " | ".join(PLACEHOLDERS[d] for d in TRUE_POSITIVES)


# --- the engine: redact and block as configured -------------------------------------------------


@pytest.mark.parametrize(("detector", "value"), [(d, values[0]) for d, values in TRUE_POSITIVES.items()])
def test_each_detector_redacts_or_blocks_as_configured(app, client, world, detector, value):
    message = [{"role": "user", "content": f"my details: {value} ok"}]
    set_policy(client, world.a_key, {"pii": {detector: "redact"}})
    with app.test_request_context():
        decision = check_chat(principal(world.a_tenant), "any", message, None)
    assert decision.action == "redact" and decision.detectors == (detector,)
    assert decision.messages == [{"role": "user", "content": f"my details: {PLACEHOLDERS[detector]} ok"}]
    assert decision.policy_version == 1 and decision.policy_scope == world.a_tenant

    set_policy(client, world.a_key, {"pii": {detector: "block"}})
    with app.test_request_context(), pytest.raises(PolicyViolation) as info:
        check_chat(principal(world.a_tenant), "any", message, None)
    error = info.value
    assert (error.status, error.code, error.param) == (400, "policy_violation", "messages")
    assert detector in error.message and value not in error.message
    assert error.decision.action == "block" and error.decision.detectors == (detector,)
    assert error.decision.policy_version == 2

    set_policy(client, world.a_key, {"pii": {d: "block" for d in DETECTORS if d != detector}})
    with app.test_request_context():
        decision = check_chat(principal(world.a_tenant), "any", message, None)
    assert (decision.action, decision.detectors, decision.messages) == ("allow", (), None)


def test_near_misses_pass_a_policy_that_blocks_everything(app, client, world):
    set_policy(client, world.a_key, {"pii": every("block")})
    with app.test_request_context():
        decision = check_chat(
            principal(world.a_tenant), "any", [{"role": "user", "content": t} for t in NEAR_MISSES], None
        )
        texts = check_texts(principal(world.a_tenant), "any", NEAR_MISSES)
    assert (decision.action, decision.messages, decision.detectors) == ("allow", None, ())
    assert (texts.action, texts.texts) == ("allow", None)


def test_block_names_every_detector_and_echoes_nothing(app, client, world):
    set_policy(client, world.a_key, {"pii": {"email": "block", "credit_card": "block", "phone": "redact"}})
    content = "card 4111 1111 1111 1111, mail bob@example.com, call 415-555-2671"
    with app.test_request_context(), pytest.raises(PolicyViolation) as info:
        check_texts(principal(world.a_tenant), "any", ["fine", content])
    error = info.value
    assert error.param == "input" and "credit_card" in error.message and "email" in error.message
    for secret in ("4111", "bob@", "555-2671"):
        assert secret not in error.message
    assert error.decision.detectors == ("credit_card", "email", "phone")


def test_limits_and_allowed_models(app, client, world):
    set_policy(
        client,
        world.a_key,
        {
            "allowed_models": ["small"],
            "max_tokens": 100,
            "max_input_chars": 10,
            "system_prompt_prefix": "Be kind.",
        },
    )
    me = principal(world.a_tenant)
    with app.test_request_context():
        with pytest.raises(PolicyViolation) as info:
            check_chat(me, "big", [{"role": "user", "content": "hi"}], None)
        assert (info.value.status, info.value.code, info.value.param) == (403, "model_not_allowed", "model")
        with pytest.raises(PolicyViolation) as info:
            check_chat(me, "small", [{"role": "user", "content": "hi"}], 101)
        assert (info.value.code, info.value.param) == ("policy_violation", "max_tokens")
        with pytest.raises(PolicyViolation) as info:
            check_chat(me, "small", [{"role": "user", "content": "x" * 11}], None)
        assert (info.value.code, info.value.param) == ("policy_violation", "messages")
        with pytest.raises(PolicyViolation) as info:
            check_texts(me, "small", ["12345", "678901"])
        assert info.value.param == "input"
        decision = check_chat(me, "small", [{"role": "user", "content": "hi"}], 100)
        assert decision.messages == [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "hi"},
        ]
        assert decision.max_tokens == 100
        merged = check_chat(me, "small", [{"role": "system", "content": "Terse."}], None)
        assert merged.messages == [{"role": "system", "content": "Be kind.\n\nTerse."}]


# --- streamed output ----------------------------------------------------------------------------

STREAM_TEXT = (
    "Dear customer, your card 4111 1111 1111 1111 was charged. Ref 4111111111111112 is not a card.\n"
    "Wire to DE89 3704 0044 0532 0130 00 from GB82WEST12345698765432, not DE89 3704 0044 0532 0130 01.\n"
    "Your SSN 123-45-6789 (not 666-45-6789) is on file; write to help.desk@example.com or call "
    "+1 (415) 555-2671 / 415.555.2671. Server 10.0.0.1 and fe80::1 run version 1.2.3.4, "
    "v1.2.3.4 and 1.2.3.4-beta, updated 2024-01-15 at 12:30. Room 911."
)


def _output_decision() -> Decision:
    return Decision(3, "allow", (), None, None, True, False, output_detectors=DETECTORS)


def _stream(decision: Decision, pieces: list[str]) -> str:
    redactor = OutputRedactor(decision)
    return "".join(redactor.feed(p) for p in pieces) + redactor.flush()


def test_stream_redaction_equals_whole_text_redaction_at_every_split():
    decision = _output_decision()
    expected = redact_text(decision, STREAM_TEXT)
    assert expected.count("[CREDIT_CARD]") == 1 and expected.count("[IBAN]") == 2
    assert "4111111111111112" in expected and "1.2.3.4-beta" in expected
    for i in range(len(STREAM_TEXT) + 1):
        assert _stream(decision, [STREAM_TEXT[:i], STREAM_TEXT[i:]]) == expected, f"split at {i}"


def _random_pieces(text: str, rng: random.Random) -> Iterator[str]:
    position = 0
    while position < len(text):
        size = rng.randint(1, 7)
        yield text[position : position + size]
        position += size


def test_stream_redaction_over_random_token_boundaries():
    decision = _output_decision()
    expected = redact_text(decision, STREAM_TEXT)
    rng = random.Random(20261122)
    for _ in range(200):
        assert _stream(decision, list(_random_pieces(STREAM_TEXT, rng))) == expected
    assert _stream(decision, list(STREAM_TEXT)) == expected


def test_stream_holds_back_only_a_growing_candidate():
    redactor = OutputRedactor(_output_decision())
    assert redactor.feed("Hello there, this is ") == "Hello there, this is "
    assert redactor.feed("plain") == ""  # the unfinished word could still become an address
    assert redactor.feed(" prose and bob") == "plain prose and "
    assert redactor.feed("@example.com") == ""
    assert redactor.feed(" wrote") == "[EMAIL] "
    assert redactor.flush() == "wrote"
    assert redactor.detectors == ("email",)
    passthrough = OutputRedactor(Decision(None, "allow", (), None, None, False, False))
    assert passthrough.feed("bob@example.com") == "bob@example.com" and passthrough.flush() == ""


# --- versions, routes, isolation ----------------------------------------------------------------


class TestOnBothEngines:
    @pytest.fixture
    def database_url(self, any_database_url: str) -> str:
        return any_database_url

    def test_versions_increment_and_the_latest_applies(self, app, client, world):
        empty = client.get("/v1/governance/policies", headers=bearer(world.a_key)).get_json()
        assert empty["version"] is None and empty["source"] == "builtin"
        assert empty["rules"]["pii"] == every("allow") and empty["rules"]["allowed_models"] is None
        first = set_policy(client, world.a_key, {"max_tokens": 50})
        second = set_policy(client, world.a_key, {"max_tokens": 60, "pii": {"email": "redact"}})
        assert (first["version"], second["version"]) == (1, 2)
        assert second["created_by"].startswith("key:") and second["source"] == "tenant"
        current = client.get("/v1/governance/policies", headers=bearer(world.a_key)).get_json()
        assert current["version"] == 2 and current["rules"]["max_tokens"] == 60
        assert current["rules"]["pii"] == {**every("allow"), "email": "redact"}
        page = client.get("/v1/governance/policies/versions?limit=1", headers=bearer(world.a_key)).get_json()
        assert [v["version"] for v in page["data"]] == [1] and page["next_cursor"]
        rest = client.get(
            "/v1/governance/policies/versions",
            headers=bearer(world.a_key),
            query_string={"cursor": page["next_cursor"]},
        ).get_json()
        assert [v["version"] for v in rest["data"]] == [2] and rest["next_cursor"] is None
        with app.test_request_context():
            assert check_chat(principal(world.a_tenant), "m", [], None).policy_version == 2

    def test_the_platform_default_applies_to_tenants_without_a_policy(self, app, client, world):
        assert_error(
            put_policy(client, world.a_key, {"max_tokens": 5}, tenant_id="default"), 403, "cross_tenant"
        )
        default = set_policy(client, world.admin_key, {"pii": {"ssn": "block"}}, tenant_id="default")
        assert (default["scope"], default["tenant_id"], default["version"]) == ("default", None, 1)
        set_policy(client, world.a_key, {"max_tokens": 5})
        acme = client.get("/v1/governance/policies", headers=bearer(world.a_key)).get_json()
        globex = client.get("/v1/governance/policies", headers=bearer(world.b_key)).get_json()
        assert (acme["source"], acme["rules"]["pii"]["ssn"]) == ("tenant", "allow")
        assert (globex["source"], globex["version"], globex["rules"]["pii"]["ssn"]) == ("default", 1, "block")
        with app.test_request_context(), pytest.raises(PolicyViolation) as info:
            check_texts(principal(world.b_tenant), "m", ["123-45-6789"])
        assert info.value.decision.policy_scope == "default"
        as_admin = client.get(
            "/v1/governance/policies",
            headers=bearer(world.admin_key),
            query_string={"tenant_id": world.b_tenant},
        ).get_json()
        assert as_admin["source"] == "default"


def test_rules_are_validated(client, world):
    bad = put_policy(client, world.a_key, {"pii": {"passport": "block"}})
    assert_error(bad, 422, "validation_error")
    assert bad.get_json()["error"]["param"] == "rules.pii.passport"
    wrong_action = put_policy(client, world.a_key, {"pii": {"email": "shred"}})
    assert wrong_action.get_json()["error"]["param"] == "rules.pii.email"
    assert put_policy(client, world.a_key, {"max_tokens": 0}).status_code == 422
    assert put_policy(client, world.a_key, {"surprise": True}).status_code == 422


def test_policy_routes_are_tenant_isolated(client, world):
    set_policy(client, world.a_key, {"system_prompt_prefix": "acme secret sauce"})
    for method, path, body in (
        ("GET", f"/v1/governance/policies?tenant_id={world.a_tenant}", None),
        ("GET", f"/v1/governance/policies/versions?tenant_id={world.a_tenant}", None),
        ("PUT", "/v1/governance/policies", {"tenant_id": world.a_tenant, "rules": {"max_tokens": 1}}),
        ("GET", "/v1/governance/policies?tenant_id=default", None),
    ):
        resp = client.open(path, method=method, headers=bearer(world.b_key), json=body)
        assert_error(resp, 403, "cross_tenant")
        assert "secret sauce" not in resp.get_data(as_text=True)
    own = client.get("/v1/governance/policies", headers=bearer(world.b_key)).get_json()
    assert own["source"] == "builtin"
    versions = client.get("/v1/governance/policies/versions", headers=bearer(world.b_key)).get_json()
    assert versions["data"] == []
    assert_error(put_policy(client, world.a_inference_key, {}), 403, "insufficient_scope")
    acme = client.get("/v1/governance/policies", headers=bearer(world.a_key)).get_json()
    assert acme["version"] == 1 and acme["rules"]["system_prompt_prefix"] == "acme secret sauce"
    admin = set_policy(client, world.admin_key, {"max_tokens": 7}, tenant_id=world.a_tenant)
    assert (admin["tenant_id"], admin["version"]) == (world.a_tenant, 2)


def test_a_new_version_reaches_another_worker_through_the_redis_revision(
    app, client, world, redis_url, monkeypatch
):
    """Two app instances on one database and Redis stand for two workers."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    from app import create_app
    from app.extensions import db
    from app.identity.cache import cache

    worker_a, worker_b = create_app(), create_app()
    a = worker_a.test_client()
    me = principal(world.a_tenant)

    def version_on_b() -> int | None:
        with worker_b.test_request_context():
            cache().sync()  # what authenticate() does first on every request
            return check_chat(me, "m", [], None).policy_version

    assert version_on_b() is None
    set_policy(a, world.a_key, {"max_tokens": 10})
    assert version_on_b() == 1  # B's cached built-in policy was dropped at its next request
    set_policy(a, world.a_key, {"max_tokens": 20})
    assert version_on_b() == 2
    for instance in (worker_a, worker_b):
        with instance.app_context():
            db.engine.dispose()


def test_the_last_known_policy_holds_while_the_database_is_unreachable(app, client, world, sqlite_url):
    from app.extensions import db

    app.extensions["identity_cache"].ttl = 0  # every call reads the database
    set_policy(client, world.a_key, {"pii": {"email": "block"}})
    with app.test_request_context():
        assert check_chat(principal(world.a_tenant), "m", [], None).policy_version == 1
        db.engine.dispose()
    Path(sqlite_url.removeprefix("sqlite:///")).write_bytes(b"")  # the tables are gone
    with app.test_request_context():
        with pytest.raises(PolicyViolation) as info:
            check_texts(principal(world.a_tenant), "m", ["bob@example.com"])
        assert info.value.decision.policy_version == 1
        with pytest.raises(APIError) as unknown:
            check_texts(principal(world.b_tenant), "m", ["hello"])
        assert (unknown.value.status, unknown.value.code) == (503, "policy_unavailable")


# --- end to end: the chat endpoint and a backend that counts its calls --------------------------

REPLY = "Sure: mail ops@example.com or call 415-555-2671, card 4111 1111 1111 1111. Done."


@register_backend
class RecordingBackend(Backend):
    """Counts calls, remembers the messages it was sent and streams REPLY in 3-character pieces."""

    family = "test_policy_recording"
    capabilities = frozenset({"chat"})
    cpu_bound = False
    calls: list[list[dict[str, str]]] = []

    def chat_stream(self, request: ChatRequest) -> Iterator[ChatChunk]:
        RecordingBackend.calls.append(request.messages)
        for i in range(0, len(REPLY), 3):
            yield ChatChunk(text=REPLY[i : i + 3])
        yield ChatChunk(finish_reason="stop", prompt_tokens=5, completion_tokens=len(REPLY) // 3 + 1)


CATALOGUE = """
models:
  - name: recorder
    aliases: [rec]
    backend: test_policy_recording
  - name: other
    backend: test_policy_recording
"""


@pytest.fixture
def app_env(tmp_path) -> dict[str, str]:
    path = tmp_path / "models.yaml"
    path.write_text(CATALOGUE)
    return {"MODELS_CONFIG": str(path), "MODELS_DIR": str(tmp_path)}


@pytest.fixture
def calls() -> list[list[dict[str, str]]]:
    RecordingBackend.calls = []
    return RecordingBackend.calls


def chat(client, key: str, content: str, **extra):
    body = {"model": "recorder", "messages": [{"role": "user", "content": content}], **extra}
    return client.post("/v1/chat/completions", headers=bearer(key), json=body)


def test_blocked_requests_never_reach_the_model(client, world, calls):
    set_policy(
        client,
        world.a_key,
        {"allowed_models": ["recorder"], "max_tokens": 50, "pii": {"credit_card": "block", "ssn": "block"}},
    )
    key = world.a_inference_key
    blocked = chat(client, key, "charge 4111 1111 1111 1111 please")
    body = assert_error(blocked, 400, "policy_violation")
    assert body["error"]["param"] == "messages" and "credit_card" in body["error"]["message"]
    assert "4111" not in blocked.get_data(as_text=True)
    assert_error(chat(client, key, "my ssn is 123-45-6789", stream=True), 400, "policy_violation")
    assert_error(chat(client, key, "hello", max_tokens=51), 400, "policy_violation")
    other = client.post(
        "/v1/chat/completions",
        headers=bearer(key),
        json={"model": "other", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert_error(other, 403, "model_not_allowed")
    assert calls == []
    assert chat(client, key, "order 4111 1111 1111 1112 please").status_code == 200  # a near-miss
    assert len(calls) == 1


def test_allowed_models_match_aliases_both_ways(client, world, calls):
    """A policy listing an alias admits the canonical name, and one listing the canonical name
    admits the alias; a model listed under neither stays refused."""

    def call(model: str):
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        return client.post("/v1/chat/completions", headers=bearer(world.a_inference_key), json=body)

    for listed in (["rec"], ["recorder"]):
        set_policy(client, world.a_key, {"allowed_models": listed})
        for requested in ("recorder", "rec"):
            resp = call(requested)
            assert resp.status_code == 200, (listed, requested, resp.get_json())
        assert_error(call("other"), 403, "model_not_allowed")
    assert len(calls) == 4


def test_the_model_sees_redacted_input_and_the_system_prefix(client, world, calls):
    set_policy(
        client, world.a_key, {"system_prompt_prefix": "You work for acme.", "pii": {"email": "redact"}}
    )
    resp = chat(client, world.a_inference_key, "I am bob@example.com, hi")
    assert resp.status_code == 200, resp.get_json()
    assert calls == [
        [
            {"role": "system", "content": "You work for acme."},
            {"role": "user", "content": "I am [EMAIL], hi"},
        ]
    ]
    assert resp.get_json()["choices"][0]["message"]["content"] == REPLY  # redact_output is off


def _sse_text(resp) -> str:
    text = []
    for line in resp.get_data(as_text=True).splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text.append(choice["delta"].get("content") or "")
    return "".join(text)


def test_output_is_redacted_streamed_and_not(client, world, calls):
    set_policy(
        client, world.a_key, {"redact_output": True, "pii": {"email": "redact", "credit_card": "block"}}
    )
    expected = "Sure: mail [EMAIL] or call 415-555-2671, card [CREDIT_CARD]. Done."
    plain = chat(client, world.a_inference_key, "hi")
    assert plain.status_code == 200 and plain.get_json()["choices"][0]["message"]["content"] == expected
    streamed = chat(client, world.a_inference_key, "hi", stream=True)
    assert streamed.status_code == 200 and _sse_text(streamed) == expected
    assert len(calls) == 2


# --- end to end: v2 models (tabular and text) and what the audit trail keeps --------------------

SKLEARN = "breast-cancer-classifier"
V2_CATALOGUE = f"""
models:
  - name: recorder
    backend: test_policy_recording
  - name: sentiment
    backend: vader
  - name: {SKLEARN}
    backend: sklearn
    params:
      artifact: breast-cancer/1/model.skops
"""
CARD = "4012 8888 8888 1881"
MAIL = "bob@example.com"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models")
    support.build_default_models(path)
    return path


def post(client, key: str, path: str, body: dict):
    """buffered=True closes the response, as a WSGI server does, which submits its audit record."""
    return client.post(path, headers=bearer(key), json=body, buffered=True)


def audit_rows(app) -> dict[str, dict]:
    app.extensions["audit"].flush()
    table = AuditRecord.__table__
    with app.app_context(), db.engine.connect() as conn:
        return {row["request_id"]: dict(row) for row in conn.execute(select(table)).mappings()}


def texts(*values: str) -> dict:
    return {"inputs": [{"name": "text", "shape": [len(values)], "datatype": "BYTES", "data": list(values)}]}


class TestV2AndTheAuditTrail:
    @pytest.fixture
    def app_env(self, tmp_path, models_dir) -> dict[str, str]:
        path = tmp_path / "models.yaml"
        path.write_text(V2_CATALOGUE)
        return {"MODELS_CONFIG": str(path), "MODELS_DIR": str(models_dir)}

    def test_a_tabular_model_is_held_to_the_allowed_models(self, app, client, world, monkeypatch):
        """The classifier has no text to scan, yet its tenant's model list applies and is audited."""
        classified: list[int] = []
        original = SklearnBackend.infer

        def counting(backend, inputs, parameters):
            classified.append(len(inputs["input__0"]))
            return original(backend, inputs, parameters)

        monkeypatch.setattr(SklearnBackend, "infer", counting)
        row = load_breast_cancer().data[0].tolist()
        body = {"inputs": [{"name": "input__0", "shape": [1, 30], "datatype": "FP64", "data": row}]}
        path = f"/v2/models/{SKLEARN}/infer"
        set_policy(client, world.a_key, {"allowed_models": ["recorder"]})
        refused = post(client, world.a_inference_key, path, body)
        error = assert_error(refused, 403, "model_not_allowed")["error"]
        assert error["param"] == "model" and SKLEARN in error["message"]
        assert classified == []
        set_policy(client, world.a_key, {"allowed_models": ["recorder", SKLEARN]})
        allowed = post(client, world.a_inference_key, path, body)
        assert allowed.status_code == 200, allowed.get_json()
        assert classified == [1]

        rows = audit_rows(app)
        denied, served = rows[refused.headers["X-Request-ID"]], rows[allowed.headers["X-Request-ID"]]
        assert (denied["status"], denied["decision"], denied["policy_version"]) == (403, "block", 1)
        assert (served["status"], served["decision"], served["policy_version"]) == (200, "allow", 2)
        assert served["input_sha256"] == sha256_hex(canonical_json(body["inputs"]))

    def test_the_audit_trail_never_keeps_what_the_policy_removed(self, app, client, world, calls):
        """With the tenant opted in to raw content, blocked and redacted calls (chat and v2) still
        leave no trace of the matched text in any column; a blocked call stores no input at all."""
        set_policy(
            client,
            world.a_key,
            {"audit_raw_content": True, "pii": {"credit_card": "block", "email": "redact"}},
        )
        key = world.a_inference_key

        def chat_body(content: str) -> dict:
            return {"model": "recorder", "messages": [{"role": "user", "content": content}]}

        chat_blocked = post(client, key, "/v1/chat/completions", chat_body(f"charge {CARD}, I am {MAIL}"))
        chat_redacted = post(client, key, "/v1/chat/completions", chat_body(f"I am {MAIL}, hi"))
        v2_blocked = post(client, key, "/v2/models/sentiment/infer", texts("fine", f"card {CARD}"))
        v2_redacted = post(client, key, "/v2/models/sentiment/infer", texts("fine", f"mail {MAIL} now"))
        for blocked in (chat_blocked, v2_blocked):
            assert_error(blocked, 400, "policy_violation")
        for redacted in (chat_redacted, v2_redacted):
            assert redacted.status_code == 200, redacted.get_json()
        assert calls == [[{"role": "user", "content": "I am [EMAIL], hi"}]]

        rows = audit_rows(app)
        expected = {
            chat_blocked: ("block", ["credit_card", "email"], None),
            v2_blocked: ("block", ["credit_card"], None),
            chat_redacted: ("redact", ["email"], [{"role": "user", "content": "I am [EMAIL], hi"}]),
            v2_redacted: ("redact", ["email"], texts("fine", "mail [EMAIL] now")["inputs"]),
        }
        for resp, (decision, detectors, seen) in expected.items():
            row = rows[resp.headers["X-Request-ID"]]
            assert (row["decision"], row["detectors"], row["policy_version"]) == (decision, detectors, 1)
            if seen is None:
                assert row["input_sha256"] is None and row["raw_input"] is None
            else:
                assert row["input_sha256"] == sha256_hex(canonical_json(seen))
                assert json.loads(row["raw_input"]) == seen
            stored = json.dumps(row, default=str)
            for secret in (CARD, CARD.replace(" ", ""), MAIL):
                assert secret not in stored
