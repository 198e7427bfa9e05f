"""The OpenAPI document is the contract: schemathesis checks a real server against it.

schemathesis' engine (what its CLI runs, driven here through its Python API) runs every phase,
examples, coverage, fuzzing and stateful, with every built-in check plus ours (the one error
shape), against a throwaway gunicorn+gevent server (SQLite, Redis db of the test run, the vader
model). A fixed seed and bounded examples keep it to a few minutes and make a failure
reproducible; the assertion lists every failure, by operation and check, with a curl line.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict
from typing import Any

import pytest
import schemathesis
from schemathesis.engine import events, from_schema

from tests import support

pytestmark = [pytest.mark.server, pytest.mark.redis]

CATALOGUE = """
models:
  - name: vader-sentiment
    aliases: [vader]
    version: "1"
    backend: vader
"""
# CI runs the fixed seed; `make fuzz` (in `make bench`) sets FUZZ_SEED=random and more examples.
_SEED = os.environ.get("FUZZ_SEED", "20260413")
SEED = random.SystemRandom().randrange(2**31) if _SEED == "random" else int(_SEED)
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "10"))

# What the document cannot say, and why each refusal is still the right answer. Each widens the
# statuses `positive_data_acceptance` takes for schema-valid data, on the named operation only.
BUSINESS_REFUSALS: dict[str, tuple[str, ...]] = {
    # A well-formed password grant with a wrong password is 400 `invalid_grant` (RFC 6749 5.2).
    "POST /v1/auth/token": ("400",),
    # This endpoint revokes JWTs; the run authenticates with an API key, which is refused (400).
    "POST /v1/auth/revoke": ("400",),
    # `expires_at` must lie in the future (422), a time the document cannot fix; `admin` is
    # granted only in the platform tenant (400 admin_outside_platform).
    "POST /v1/governance/keys": ("400", "422"),
    "POST /v1/governance/users": ("400",),
    # What a model serves is its own: `tools` or `logprobs` on a local model are 400
    # `unsupported_parameter`, and OpenAI's rules across fields (`top_logprobs` needs `logprobs`)
    # are not JSON Schema.
    "POST /v1/chat/completions": ("400",),
    # A version's `params` are checked by its backend's own schema (400 invalid_backend_params).
    "POST /v1/governance/models/{name}/versions": ("400",),
    # Tensors are checked against the model's own metadata (names, shapes, datatypes).
    "POST /v2/models/{name}/infer": ("400",),
    "POST /v2/models/{name}/versions/{version}/infer": ("400",),
    # RAG chat: the model's own limits (context length, a model that can't chat) are 400s, and a
    # conversation without a user message with text has no query to retrieve with (422).
    "POST /v1/rag/chat": ("400", "422"),
    # A cursor is opaque: only a `next_cursor` this API returned names a position (400 otherwise).
    **dict.fromkeys(
        [
            "GET /v1/collections",
            "GET /v1/governance/audit",
            "GET /v1/governance/keys",
            "GET /v1/governance/policies/versions",
            "GET /v1/governance/tenants",
            "GET /v1/governance/users",
        ],
        ("400",),
    ),
}
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]  # schemathesis' default
# Readiness answers 503, documented with a body of its own, while something is not ready: the
# fuzzer can register a model version that cannot load, and readiness must then say so.
READINESS = [
    "GET /readyz",
    "GET /v2/health/ready",
    "GET /v2/models/{name}/ready",
    "GET /v2/models/{name}/versions/{version}/ready",
]
# The stateful phase follows links from lists (GET /keys, /tenants) to the ids in them, so it
# would revoke the run's own admin key or deactivate the platform tenant; every other phase
# sends made-up ids, which answer 404.
SELF_DESTRUCTIVE = ["POST /v1/governance/keys/{key_id}/revoke", "PATCH /v1/governance/tenants/{tenant_id}"]
# Multipart bodies: schemathesis sends every generated `format: binary` part as a file, so a case
# meant to break the `file` part arrives as a valid upload, and is rightly accepted. The route's
# own refusals (missing part, wrong purpose, bad JSONL, too large) are in tests/test_batches.py.
NO_NEGATIVE_MULTIPART = ["POST /v1/files"]


def _integers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_integers(item) for item in value]
    if isinstance(value, dict):
        return {key: _integers(item) for key, item in value.items()}
    return value


@schemathesis.hook
def before_call(ctx: Any, case: Any, kwargs: dict[str, Any]) -> None:
    """JSON Schema counts 44.0 as an integer, so schemathesis may send it for an `integer` field;
    our strict integers refuse a decimal point, as OpenAI's API does (test_wire_conformance). 44 is
    the same JSON Schema instance, so every case keeps its meaning, positive or negative, and
    the fuzzer sends that spelling."""
    if isinstance(case.body, dict | list):
        case.body = _integers(case.body)


@schemathesis.check
def one_error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every error, on every route, is `{"error": {message, type, param, code}, "request_id"}`."""
    if response.status_code < 400:
        return None
    documented = case.operation.definition.raw.get("responses", {}).get(str(response.status_code))
    if documented is not None and "$ref" not in documented:
        return None  # an answer documented with a body of its own (readiness), not an error
    body = response.json()
    assert isinstance(body, dict) and set(body) == {"error", "request_id"}, f"not our error shape: {body}"
    missing = {"message", "type", "param", "code"} - set(body["error"])
    assert not missing, f"error without {sorted(missing)}: {body}"
    return True


@pytest.fixture(scope="module")
def server(sqlite_template, tmp_path_factory):
    redis_url = support.require_service("TEST_REDIS_URL")
    support.flush_redis(redis_url)
    workdir = tmp_path_factory.mktemp("fuzz")
    (workdir / "models.yaml").write_text(CATALOGUE)
    db_url = support.copy_sqlite(sqlite_template, workdir / "fuzz.db")
    key = support.issue_key(db_url, "platform", ("admin",), rate_limit="100000000/minute")
    env = {
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "MODELS_CONFIG": str(workdir / "models.yaml"),
        "MODELS_DIR": str(workdir),
        "INSTANCE_PATH": str(workdir / "instance"),
        "AUTH_TOKEN_RATE_LIMIT": "100000000/minute",
        "LOG_LEVEL": "WARNING",
    }
    with support.GunicornServer(env, workers=1, ready_path="/readyz") as running:
        yield running, key


def _config(base_url: str, key: str) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "base-url": base_url,
            "headers": {"Authorization": f"Bearer {key}"},
            "workers": 1,
            "request-timeout": 30,
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none", "deterministic": True},
            "checks": {"enabled": True},
            "phases": {
                "examples": {"enabled": True},
                "coverage": {"enabled": True},
                "fuzzing": {"enabled": True},
            },
            "output": {"sanitization": {"enabled": False}},  # a throwaway server: show every value
            "operations": [
                *(
                    {
                        "include-name": name,
                        "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, *extra]}},
                    }
                    for name, extra in BUSINESS_REFUSALS.items()
                ),
                *(
                    {
                        "include-name": name,
                        "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
                    }
                    for name in READINESS
                ),
                *(
                    {"include-name": name, "phases": {"stateful": {"enabled": False}}}
                    for name in SELF_DESTRUCTIVE
                ),
                *(
                    {"include-name": name, "checks": {"negative_data_rejection": {"enabled": False}}}
                    for name in NO_NEGATIVE_MULTIPART
                ),
            ],
        }
    )


def _failures(stream: Any) -> tuple[dict[tuple[str, str], list[str]], list[str], set[str]]:
    """(operation, check) -> distinct failure descriptions; engine errors; phases that ran."""
    found: dict[tuple[str, str], list[str]] = defaultdict(list)
    errors: list[str] = []
    phases: set[str] = set()
    for event in stream:
        if isinstance(event, events.PhaseFinished) and event.phase.is_enabled:
            phases.add(event.phase.name.value)
        elif isinstance(event, events.ScenarioFinished):
            for checks in event.recorder.checks.values():
                for node in checks:
                    if node.failure_info is None:
                        continue
                    failure = node.failure_info.failure
                    text = f"{failure.title}: {failure.message}".strip()[:400]
                    entry = f"{text}\n    {node.failure_info.code_sample}"
                    key = (failure.operation or event.recorder.label, node.name)
                    if all(not seen.startswith(text) for seen in found[key]):
                        found[key].append(entry)
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            errors.append(f"fatal: {event.exception!r}")
    return found, errors, phases


def test_the_server_keeps_its_openapi_contract(server):
    running, key = server
    schema = schemathesis.openapi.from_url(f"{running.url}/openapi.json", config=_config(running.url, key))
    found, errors, phases = _failures(from_schema(schema).execute())
    report = [
        f"{operation} [{check}]\n  " + "\n  ".join(texts)
        for (operation, check), texts in sorted(found.items())
    ]
    summary = "\n".join(f"{operation} [{check}]" for operation, check in sorted(found))
    assert {"examples", "coverage", "fuzzing", "stateful"} <= phases, phases
    assert not errors, "\n".join(errors)
    assert not found, f"seed {SEED}: {len(found)} operation/check failures:\n{summary}\n\n" + "\n\n".join(
        report
    )
