"""OpenAI wire conformance: what the official `openai` SDK and raw HTTP clients see.

Invalid requests are 400 `invalid_request_error` naming the parameter (the SDK's BadRequestError),
types are exact, parameters a model can't serve are refused by name, `response_format` is enforced
on SmolLM2 by grammar-constrained sampling, and tools, tool messages and logprobs pass through to
an OpenAI-compatible upstream (the simulator) and back, streamed and not.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import jsonschema
import openai
import pytest
import requests

from bench.upstream_sim import run_simulator
from tests import support
from tests.test_identity import bearer, seed

CATALOGUE = str(support.ROOT / "tests" / "models.yaml")
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                "required": ["city", "days"],
            },
        },
    },
]
CALLED = {"city": "tok0", "days": 1}  # what the simulator's schema sampler puts in the arguments


# 1. Validation, in process: strict types, unknown parameters, the status and the spec ------------
def body_error(resp) -> dict[str, Any]:
    assert resp.status_code == 400, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["error"]["type"] == "invalid_request_error"
    return body["error"]


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"max_tokens": "16"}, "max_tokens", "validation_error"),
        ({"max_tokens": 16.0}, "max_tokens", "validation_error"),
        ({"max_tokens": True}, "max_tokens", "validation_error"),
        ({"max_tokens": 0}, "max_tokens", "validation_error"),
        ({"max_tokens": 2**40}, "max_tokens", "validation_error"),
        ({"seed": 2**70}, "seed", "validation_error"),
        ({"seed": "7"}, "seed", "validation_error"),
        ({"stream": "yes"}, "stream", "validation_error"),
        ({"stream": 1}, "stream", "validation_error"),
        ({"temperature": "0.5"}, "temperature", "validation_error"),
        ({"n": "1"}, "n", "validation_error"),
        (
            {"stream": True, "stream_options": {"include_usage": "yes"}},
            "stream_options.include_usage",
            "validation_error",
        ),
        ({"stream_options": {"include_usage": True}}, "stream_options", "validation_error"),
        ({"logprobs": "true"}, "logprobs", "validation_error"),
        ({"top_logprobs": 2}, "top_logprobs", "validation_error"),
        ({"tool_choice": "auto"}, "tool_choice", "validation_error"),
        (
            {"tools": WEATHER_TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
            "validation_error",
        ),
        (
            {"tools": [{"type": "function", "function": {"name": "has space"}}]},
            "tools.0.function.name",
            "validation_error",
        ),
        ({"response_format": {"type": "xml"}}, "response_format.type", "validation_error"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "validation_error"),
        ({"frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ({"logit_bias": {"1": 2}}, "logit_bias", "unknown_parameter"),
        (
            {"messages": [{"role": "user", "content": "x", "colour": "red"}]},
            "messages.0.colour",
            "unknown_parameter",
        ),
        ({"messages": [{"role": "user"}]}, "messages.0.content", "validation_error"),
        ({"messages": [{"role": "user", "content": None}]}, "messages.0.content", "validation_error"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages.0.content", "validation_error"),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0.tool_call_id", "validation_error"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_call_id": "a"}]},
            "messages.0.tool_call_id",
            "validation_error",
        ),
    ],
)
def test_chat_request_types_are_exact(app, client, extra, param, code):
    world = seed(app)
    resp = client.post(
        CHAT, json={"model": "smollm2", "messages": HELLO, **extra}, headers=bearer(world.a_inference_key)
    )
    error = body_error(resp)
    assert error["param"] == param, error
    assert error["code"] == code


def test_missing_messages_and_wrong_embedding_types_are_400(app, client):
    world = seed(app)
    headers = bearer(world.a_inference_key)
    assert body_error(client.post(CHAT, json={"model": "smollm2"}, headers=headers))["param"] == "messages"
    for extra, param in [({"dimensions": "8"}, "dimensions"), ({"input": 5}, "input"), ({"foo": 1}, "foo")]:
        resp = client.post("/v1/embeddings", json={"model": "minilm", "input": "x", **extra}, headers=headers)
        assert body_error(resp)["param"] == param


def test_spec_documents_400_on_openai_routes(client):
    paths = client.get("/openapi.json").get_json()["paths"]
    for path in (CHAT, "/v1/embeddings"):
        responses = paths[path]["post"]["responses"]
        assert "400" in responses and "422" not in responses, responses
    # Our own routes keep webargs' 422, as documented there.
    assert "422" in paths["/v1/fanout"]["post"]["responses"]


# 2. Through a real gunicorn+gevent server, with the official SDK --------------------------------
@pytest.fixture(scope="module")
def simulator():
    with run_simulator(latency_ms=0) as sim:
        yield sim


@pytest.fixture(scope="module")
def gateway(sqlite_template, tmp_path_factory, simulator):
    redis_url = support.require_service("TEST_REDIS_URL")
    support.flush_redis(redis_url)
    models_dir = tmp_path_factory.mktemp("models")
    support.build_default_models(models_dir)
    db_url = support.copy_sqlite(sqlite_template, tmp_path_factory.mktemp("db") / "gw.db")
    env = {
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "MODELS_CONFIG": CATALOGUE,
        "MODELS_DIR": str(models_dir),
        "UPSTREAM_BASE_URL": simulator.base_url,
    }
    key = support.issue_key(db_url)
    with support.GunicornServer(env, workers=1, ready_path="/readyz") as server:
        server.key = key
        server.db_url = db_url
        yield server


@pytest.fixture
def sdk(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.key, max_retries=0, timeout=120)


def refused(call) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    error = caught.value
    assert error.status_code == 400 and error.type == "invalid_request_error", error.body
    return error


@pytest.mark.server
@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        ({"max_tokens": "16"}, "max_tokens", "validation_error"),
        ({"stream": "yes"}, "stream", "validation_error"),
        ({"seed": 2**70}, "seed", "validation_error"),
        ({"messages": openai.NOT_GIVEN}, "messages", "validation_error"),
        ({"extra_body": {"best_of": 2}}, "best_of", "unknown_parameter"),
        ({"tools": WEATHER_TOOLS}, "tools", "unsupported_parameter"),
        ({"logprobs": True, "top_logprobs": 2}, "logprobs", "unsupported_parameter"),
        (
            {
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                        ],
                    },
                ]
            },
            "messages.1.tool_calls",
            "unsupported_parameter",
        ),
    ],
)
def test_sdk_raises_bad_request_naming_the_parameter(sdk, kwargs, param, code):
    arguments = {"model": "smollm2", "messages": HELLO, "max_tokens": 4, **kwargs}
    error = refused(lambda: sdk.chat.completions.create(**arguments))
    assert (error.param, error.code) == (param, code), error.body


@pytest.mark.server
def test_json_object_output_of_smollm2_parses(sdk):
    reply = sdk.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": 'Reply with the JSON object {"ok": true} and nothing else.'}],
        response_format={"type": "json_object"},
        max_tokens=48,
        temperature=0,
        seed=1,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(json.loads(choice.message.content), dict)


CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Berlin"]},
        "is_capital": {"type": "boolean"},
    },
    "required": ["city", "is_capital"],
    "additionalProperties": False,
}


@pytest.mark.server
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_json_schema_output_of_smollm2_validates(sdk, stream):
    arguments = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Which city is the capital of France?"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": CITY_SCHEMA, "strict": True},
        },
        "max_tokens": 48,
        "temperature": 0,
        "seed": 1,
    }
    if stream:
        chunks = list(sdk.chat.completions.create(stream=True, **arguments))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = chunks[-1].choices[0].finish_reason
    else:
        choice = sdk.chat.completions.create(**arguments).choices[0]
        text, finish = choice.message.content, choice.finish_reason
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), CITY_SCHEMA)


@pytest.mark.server
@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"$ref": "https://example.com/elsewhere.json"}}},
        {"type": "array", "items": {"type": "integer"}, "minItems": 10**8},
    ],
    ids=["remote-ref", "huge-repetition"],
)
def test_a_schema_llama_cannot_enforce_is_a_400(sdk, schema):
    error = refused(
        lambda: sdk.chat.completions.create(
            model="smollm2",
            messages=HELLO,
            max_tokens=4,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
    )
    assert (error.param, error.code) == ("response_format.json_schema.schema", "invalid_value")


@pytest.mark.server
def test_tools_tool_choice_and_logprobs_reach_the_upstream_and_come_back(sdk):
    """The simulator calls the function tool_choice names (the second one here): the call coming
    back proves tools and tool_choice reached it; logprobs with two alternatives likewise."""
    reply = sdk.chat.completions.create(
        model="upstream-chat",
        messages=[{"role": "user", "content": "weather in Paris for a day?"}],
        tools=WEATHER_TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == CALLED
    assert reply.usage.completion_tokens > 0

    reply = sdk.chat.completions.create(
        model="upstream-chat", messages=HELLO, logprobs=True, top_logprobs=2, max_tokens=3
    )
    content = reply.choices[0].logprobs.content
    assert [entry.token for entry in content] == ["tok0", " tok1", " tok2"]
    assert all(len(entry.top_logprobs) == 2 for entry in content)


@pytest.mark.server
def test_streamed_tool_calls_and_logprobs_are_relayed(sdk):
    chunks = list(
        sdk.chat.completions.create(
            model="upstream-chat",
            messages=[{"role": "user", "content": "weather?"}],
            tools=WEATHER_TOOLS,
            tool_choice="required",
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    pieces = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or ()]
    assert pieces[0].id.startswith("call_") and pieces[0].function.name == "get_time"
    assert len(pieces) > 2 and {p.index for p in pieces} == {0}
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == {"city": "tok0"}
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(pieces) - 1

    streamed = list(
        sdk.chat.completions.create(
            model="upstream-chat", messages=HELLO, logprobs=True, top_logprobs=1, max_tokens=3, stream=True
        )
    )
    entries = [
        e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in entries] == ["tok0", " tok1", " tok2"]


def audit_output_sha256(db_url: str, request_id: str) -> str | None:
    """The audit record's output hash, once the batch writer has written it."""
    from sqlalchemy import create_engine, select

    from app.governance.audit.models import AuditRecord

    engine = create_engine(db_url)
    try:
        deadline = time.monotonic() + 30
        while True:
            with engine.connect() as conn:
                stmt = select(AuditRecord.output_sha256).where(AuditRecord.request_id == request_id)
                found = conn.execute(stmt).first()
            if found is not None or time.monotonic() > deadline:
                return found[0] if found else None
            time.sleep(0.1)
    finally:
        engine.dispose()


@pytest.mark.server
def test_streamed_and_whole_tool_calls_are_audited_alike(gateway):
    """The record of a streamed tool call holds the call assembled from its pieces: the same
    output hash as the non-streamed reply to the same request."""
    from app.governance.audit.records import canonical_json, sha256_hex

    body = {
        "model": "upstream-chat",
        "messages": [{"role": "user", "content": "audit me"}],
        "tools": WEATHER_TOOLS,
    }
    ids = [uuid.uuid4().hex, uuid.uuid4().hex]
    whole = requests.post(
        gateway.url + CHAT,
        json=body,
        headers={"Authorization": f"Bearer {gateway.key}", "X-Request-ID": ids[0]},
        timeout=30,
    )
    streamed = requests.post(
        gateway.url + CHAT,
        json={**body, "stream": True},
        headers={"Authorization": f"Bearer {gateway.key}", "X-Request-ID": ids[1]},
        timeout=30,
    )
    assert whole.status_code == streamed.status_code == 200
    assert streamed.text.endswith("data: [DONE]\n\n")
    expected = sha256_hex(canonical_json(whole.json()["choices"][0]["message"]))
    assert [audit_output_sha256(gateway.db_url, rid) for rid in ids] == [expected, expected]


@pytest.mark.server
def test_tool_call_conversation_is_accepted_and_passed_through(sdk):
    """An assistant message with content null and tool_calls, then the tool's answer: the
    simulator checks, as OpenAI does, that the tool message answers a call it saw."""
    first = sdk.chat.completions.create(
        model="upstream-chat", messages=[{"role": "user", "content": "weather?"}], tools=WEATHER_TOOLS
    )
    call = first.choices[0].message.tool_calls[0]
    follow_up = [
        {"role": "user", "content": "weather?"},
        first.choices[0].message,  # the SDK's own object, sent back as the SDK serialises it
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ]
    reply = sdk.chat.completions.create(model="upstream-chat", messages=follow_up, max_tokens=2)
    assert reply.choices[0].message.content == "tok0 tok1"
    # An id the upstream never issued: its own 400, relayed with its words.
    follow_up[2] = {"role": "tool", "tool_call_id": "call_unknown", "content": "sunny"}
    refused(lambda: sdk.chat.completions.create(model="upstream-chat", messages=follow_up))


@pytest.mark.server
def test_response_format_passes_through_to_the_upstream(sdk):
    reply = sdk.chat.completions.create(
        model="upstream-chat",
        messages=HELLO,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY_SCHEMA}},
    )
    assert json.loads(reply.choices[0].message.content) == {"city": "Paris", "is_capital": True}


@pytest.mark.server
def test_raw_http_unknown_parameter_names_it(gateway):
    resp = requests.post(
        gateway.url + CHAT,
        json={"model": "upstream-chat", "messages": HELLO, "functions": [{"name": "f"}]},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=30,
    )
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "unknown_parameter",
        "functions",
    )


@pytest.mark.server
@pytest.mark.parametrize(
    ("path", "headers", "status", "code"),
    [
        ("/v1/models/" + "x" * 9000, {}, 414, "request_line_too_long"),
        ("/v1/models", {f"X-Extra-{i}": "1" for i in range(120)}, 431, "headers_too_large"),
        ("/v1/models", {"X-Big": "y" * 9000}, 431, "headers_too_large"),
    ],
    ids=["long-path", "many-headers", "big-header"],
)
def test_what_gunicorn_refuses_is_json_too(gateway, path, headers, status, code):
    """gunicorn answers these before Flask; its worker writes our shape, not its HTML page."""
    resp = requests.get(
        gateway.url + path, headers={"Authorization": f"Bearer {gateway.key}", **headers}, timeout=30
    )
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    assert (body["error"]["type"], body["error"]["code"]) == ("invalid_request_error", code)
    assert body["request_id"] == resp.headers["X-Request-ID"]
    # Within the limits, a long model id is the app's own 404, in the same shape.
    ok = requests.get(
        gateway.url + "/v1/models/" + "x" * 5000,
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=30,
    )
    assert ok.status_code == 404 and ok.json()["error"]["code"] == "model_not_found"
