"""The audit trail in-process, on SQLite and PostgreSQL: one record per request, hash chains that
report the row someone edited or deleted, the spool and its idempotent replay, fail-closed admission,
admin actions, tenant isolation of the audit and usage routes, and the usage figures."""

from __future__ import annotations

import collections
import itertools
import json
import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, event, select, text

from app.extensions import db
from app.governance import audit
from app.governance.audit.models import AuditRecord
from app.governance.audit.records import Pending, canonical_json, record_hash, sha256_hex
from app.governance.audit.writer import AuditWriter
from app.governance.usage import rollup
from app.governance.usage.rollup import UsageDaily, UsageLatency
from app.identity import accounts, apikeys
from app.identity import scopes as sc
from app.identity.models import utcnow

PASSWORD = "correct horse battery staple"
GOV = [sc.GOVERNANCE_READ, sc.GOVERNANCE_WRITE, sc.INFERENCE_INVOKE, sc.MODELS_READ]
CATALOGUE = """
models:
  - name: sentiment
    backend: vader
"""
TENSOR = {"name": "text", "shape": [1], "datatype": "BYTES", "data": ["What a lovely day!"]}
INFER = {"inputs": [TENSOR]}


@pytest.fixture
def database_url(any_database_url: str) -> str:
    return any_database_url


@pytest.fixture
def app_env(tmp_path) -> dict[str, str]:
    path = tmp_path / "models.yaml"
    path.write_text(CATALOGUE)
    return {
        "MODELS_CONFIG": str(path),
        "MODELS_DIR": str(tmp_path),
        "REGISTRY_POLL": "0",
        "INSTANCE_PATH": str(tmp_path / "instance"),
    }


@pytest.fixture
def writer(app):
    yield app.extensions["audit"]
    audit.shutdown(app)


@dataclass
class World:
    admin: str
    acme: str
    acme_key: str
    acme_key_id: str
    globex: str
    globex_key: str


@pytest.fixture
def world(app, writer) -> World:
    with app.app_context():
        platform = accounts.create_tenant("platform")
        acme = accounts.create_tenant("acme")
        globex = accounts.create_tenant("globex")
        _, admin = apikeys.issue_key(platform, "admin", [sc.ADMIN])
        accounts.create_user(acme, "alice", PASSWORD, [sc.GOVERNANCE_READ])
        acme_key, acme_full = apikeys.issue_key(acme, "acme-gov", GOV)
        _, globex_full = apikeys.issue_key(globex, "globex-gov", GOV)
        return World(admin, acme.id, acme_full, acme_key.id, globex.id, globex_full)


def call(client, method: str, path: str, key: str | None = None, **kwargs):
    """buffered=True makes the test client close the response, as a WSGI server does."""
    headers = kwargs.pop("headers", {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return client.open(path, method=method, headers=headers, buffered=True, **kwargs)


def records(app) -> list[dict]:
    """Typed rows (datetimes, JSON), as the verifier reads them."""
    table = AuditRecord.__table__
    with app.app_context(), db.engine.connect() as conn:
        rows = conn.execute(select(table).order_by(table.c.id)).mappings().all()
    return [dict(row) for row in rows]


def sql(app, statement: str, **params) -> None:
    with app.app_context(), db.engine.begin() as conn:
        conn.execute(text(statement), params)


def traffic(app, client, world: World) -> list:
    """A mix of audited inference calls for acme and globex: successes, errors, a refused caller."""
    responses = [
        call(client, "POST", "/v2/models/sentiment/infer", world.acme_key, json=INFER),
        call(client, "GET", "/v1/models", world.acme_key),
        call(
            client,
            "POST",
            "/v1/chat/completions",
            world.acme_key,
            json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
        ),
        call(client, "POST", "/v2/models/sentiment/infer", world.globex_key, json=INFER),
        call(client, "POST", "/v2/models/sentiment/infer", world.acme_key, json=INFER),
        call(client, "GET", "/v1/models", "gw-000000000000_" + "x" * 43),
    ]
    # Not audited: health probes and reads of the governance API.
    call(client, "GET", "/v2/health/live")
    call(client, "GET", "/v1/governance/audit", world.acme_key)
    app.extensions["audit"].flush()
    return responses


def verify(client, key: str, **query) -> dict:
    resp = call(client, "GET", "/v1/governance/audit/verify", key, query_string=query)
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()


# --- one record per request, chained -------------------------------------------------------------


def test_every_inference_request_has_one_chained_record(app, client, world):
    responses = traffic(app, client, world)
    rows = records(app)
    assert sorted(r["request_id"] for r in rows) == sorted(r.headers["X-Request-ID"] for r in responses)
    by_request = {r["request_id"]: r for r in rows}

    infer = by_request[responses[0].headers["X-Request-ID"]]
    assert (infer["kind"], infer["status"], infer["model"], infer["model_version"]) == (
        "inference",
        200,
        "sentiment",
        "1",
    )
    assert infer["tenant_id"] == world.acme and infer["principal"].startswith("key:")
    assert infer["endpoint"] == "/v2/models/sentiment/infer" and infer["method"] == "POST"
    # What the service noted: the input tensors and the output tensors.
    assert infer["input_sha256"] == sha256_hex(canonical_json(INFER["inputs"]))
    assert infer["output_sha256"] == sha256_hex(canonical_json(responses[0].get_json()["outputs"]))
    assert infer["raw_input"] is None and infer["raw_output"] is None  # no opt-in
    assert infer["latency_ms"] > 0

    missing = by_request[responses[2].headers["X-Request-ID"]]
    assert (missing["status"], missing["model"]) == (404, "nope")
    refused = by_request[responses[5].headers["X-Request-ID"]]
    assert (refused["status"], refused["tenant_id"], refused["chain"]) == (401, None, "platform")

    acme_chain = [r for r in rows if r["chain"] == world.acme]
    assert [r["seq"] for r in acme_chain] == [1, 2, 3, 4]
    assert acme_chain[0]["prev_hash"] == "0" * 64
    for previous, current in itertools.pairwise(acme_chain):
        assert current["prev_hash"] == previous["hash"]
    assert all(record_hash(r) == r["hash"] for r in rows)

    report = verify(client, world.admin)
    assert report == {"ok": True, "chains": 3, "records": 6, "broken": []}
    assert verify(client, world.acme_key) == {"ok": True, "chains": 1, "records": 4, "broken": []}


def test_a_nul_from_the_client_is_stored_as_a_replacement_character(app, client, world):
    """PostgreSQL's text can't hold U+0000: a record carrying one from the request (a model name, a
    path) would fail its batch forever, and with it every record buffered behind it. On both
    databases the record lands, with U+FFFD in its place, its hash verifies, and the rest follow."""
    responses = [
        call(
            client,
            "POST",
            "/v1/chat/completions",
            world.acme_key,
            json={"model": "no\u0000pe", "messages": [{"role": "user", "content": "a\u0000b"}]},
        ),
        call(client, "GET", "/v1/models/ab%00cd", world.acme_key),
        call(client, "POST", "/v2/models/sentiment/infer", world.acme_key, json=INFER),
    ]
    assert [r.status_code for r in responses] == [404, 404, 200]
    app.extensions["audit"].flush()
    by_request = {r["request_id"]: r for r in records(app)}
    assert sorted(by_request) == sorted(r.headers["X-Request-ID"] for r in responses)
    assert by_request[responses[0].headers["X-Request-ID"]]["model"] == "no\ufffdpe"
    assert by_request[responses[1].headers["X-Request-ID"]]["endpoint"] == "/v1/models/ab\ufffdcd"
    assert not any("\x00" in str(value) for row in by_request.values() for value in row.values())
    assert verify(client, world.admin) == {"ok": True, "chains": 1, "records": 3, "broken": []}


@pytest.mark.parametrize("any_database_url", ["postgresql"], indirect=True)
def test_a_nul_postgresql_cannot_store_is_the_clients_400_not_a_500(app, client, world):
    """psycopg refuses to send U+0000 in text: a key named with one, or a filter carrying one, is
    the client's mistake (400, our shape), stores nothing, and the next request is served."""
    named = call(
        client,
        "POST",
        "/v1/governance/keys",
        world.admin,
        json={"name": "a\u0000b", "scopes": ["models:read"]},
    )
    filtered = call(client, "GET", "/v1/governance/audit", world.admin, query_string={"model": "a\x00b"})
    for resp in (named, filtered):
        assert resp.status_code == 400, resp.get_json()
        error = resp.get_json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "nul_character")
    listed = call(client, "GET", "/v1/governance/keys", world.admin).get_json()["data"]
    assert not any("\x00" in key["name"] for key in listed)
    ok = call(
        client, "POST", "/v1/governance/keys", world.admin, json={"name": "ab", "scopes": ["models:read"]}
    )
    assert ok.status_code == 201, ok.get_json()


def test_fail_closed_when_the_buffer_is_full(app, client, world):
    writer: AuditWriter = app.extensions["audit"]
    writer.buffer_max = 0
    resp = call(client, "POST", "/v2/models/sentiment/infer", world.acme_key, json=INFER)
    assert resp.status_code == 503, resp.get_json()
    assert resp.get_json()["error"]["code"] == "audit_unavailable"
    assert resp.headers["Retry-After"] == "1"
    writer.buffer_max = 10
    assert call(client, "POST", "/v2/models/sentiment/infer", world.acme_key, json=INFER).status_code == 200
    writer.flush()
    assert [r["status"] for r in records(app)] == [200]


def test_note_names_are_checked_and_a_no_op_outside_requests(app):
    with pytest.raises(TypeError, match="tokens"):
        audit.note(tokens=3)
    audit.note(model="m", tokens_in=1)  # no request: nothing to add to
    with app.test_request_context("/v1/models"):
        audit.note(model="m")  # a request nobody audits


def test_raw_content_only_with_the_tenants_opt_in():
    def pending(**noted) -> Pending:
        return Pending(
            kind="inference",
            ts=utcnow(),
            request_id="r",
            tenant_id="t",
            principal="key:k",
            endpoint="/v1/chat/completions",
            method="POST",
            action=None,
            status=200,
            latency_ms=1.0,
            noted=noted,
            details={},
            view_args={},
        )

    body = {"messages": [{"role": "user", "content": "my email is [EMAIL]"}]}
    plain = pending(input=body, output="hi").row()
    opted = pending(input=body, output="hi", raw_opt_in=True, detectors={"email"}, decision="redact").row()
    assert plain["raw_input"] is None and plain["input_sha256"] == sha256_hex(canonical_json(body))
    assert json.loads(opted["raw_input"]) == body and opted["raw_output"] == "hi"
    assert opted["detectors"] == ["email"] and opted["decision"] == "redact"


# --- tampering ------------------------------------------------------------------------------------


def test_editing_one_row_is_reported_at_that_row(app, client, world, runner):
    traffic(app, client, world)
    target = [r for r in records(app) if r["chain"] == world.acme][2]
    sql(app, "UPDATE audit_records SET status = 200 WHERE record_id = :r", r=target["record_id"])

    report = verify(client, world.admin)
    assert report["ok"] is False
    assert report["broken"] == [
        {
            "chain": world.acme,
            "seq": 3,
            "record_id": target["record_id"],
            "reason": "the record was altered: its hash does not match",
        }
    ]
    assert verify(client, world.globex_key)["ok"] is True  # other chains are unaffected
    result = runner.invoke(args=["audit", "verify"])
    assert result.exit_code == 1
    assert json.loads(result.output)["broken"][0]["record_id"] == target["record_id"]


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(app, client, world):
    traffic(app, client, world)
    second, third = [r for r in records(app) if r["chain"] == world.acme][1:3]
    forged = {**second, "tokens_out": 999}
    sql(
        app,
        "UPDATE audit_records SET tokens_out = 999, hash = :h WHERE record_id = :r",
        h=record_hash(forged),
        r=second["record_id"],
    )
    broken = verify(client, world.acme_key)["broken"]
    assert [(b["seq"], b["record_id"]) for b in broken] == [(3, third["record_id"])]
    assert "prev_hash" in broken[0]["reason"]


def test_deleting_a_row_is_reported(app, client, world, runner):
    traffic(app, client, world)
    acme = [r for r in records(app) if r["chain"] == world.acme]
    sql(app, "DELETE FROM audit_records WHERE record_id = :r", r=acme[1]["record_id"])
    broken = verify(client, world.acme_key)["broken"]
    assert [(b["seq"], b["record_id"]) for b in broken] == [(2, acme[2]["record_id"])]
    assert "missing" in broken[0]["reason"]
    only_globex = runner.invoke(args=["audit", "verify", "--chain", world.globex])
    assert only_globex.exit_code == 0, only_globex.output


def test_truncating_the_end_of_a_chain_is_reported(app, client, world):
    traffic(app, client, world)
    last = [r for r in records(app) if r["chain"] == world.acme][-1]
    sql(app, "DELETE FROM audit_records WHERE record_id = :r", r=last["record_id"])
    broken = verify(client, world.acme_key)["broken"]
    assert [(b["seq"], b["record_id"]) for b in broken] == [(4, None)]


# --- spool and replay -----------------------------------------------------------------------------


def _pending(tenant: str, n: int, **fields) -> list[Pending]:
    base = {
        "kind": "inference",
        "ts": utcnow(),
        "request_id": None,
        "tenant_id": tenant,
        "principal": "key:test",
        "endpoint": "/v1/chat/completions",
        "method": "POST",
        "action": None,
        "status": 200,
        "latency_ms": 10.0,
        "noted": {},
        "details": {},
        "view_args": {},
    }
    return [Pending(**{**base, "request_id": f"req-{tenant}-{i}", **fields}) for i in range(n)]


def test_outage_spools_and_replay_is_idempotent(app, client, world, tmp_path):
    writer: AuditWriter = app.extensions["audit"]
    # The database is unreachable: a closed port on loopback.
    down = create_engine(
        "postgresql+psycopg://postgres@127.0.0.1:1/none", connect_args={"connect_timeout": 1}
    )
    offline = AuditWriter(
        down, spool_dir=writer.spool.directory, buffer_max=100, batch_size=4, flush_interval_s=0.05
    )
    batch = _pending(world.acme, 10)
    for record in batch:
        offline.submit(record)
    offline.flush()
    spooled = offline.spool.own_file
    assert spooled.exists() and len(spooled.read_text().splitlines()) == 10
    offline.close()
    down.dispose()

    # A commit whose acknowledgement was lost: the first 3 rows are in the database already.
    with app.app_context():
        rows = [r.row() for r in batch]
        writer.write(rows[:3], replay=False)
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(spooled.read_bytes())
    with app.app_context():
        assert writer.replay([spooled]) == 7
        assert writer.replay([copy]) == 0  # twice: nothing new
    assert not spooled.exists()
    rows = [r for r in records(app) if r["chain"] == world.acme]
    assert sorted(r["request_id"] for r in rows) == sorted(f"req-{world.acme}-{i}" for i in range(10))
    assert [r["seq"] for r in rows] == list(range(1, 11))
    assert [r["request_id"] for r in sorted(rows, key=lambda r: r["seq"])][3:] == [
        f"req-{world.acme}-{i}" for i in range(3, 10)
    ], "replayed in spool order"
    assert verify(client, world.admin)["ok"] is True


@pytest.mark.parametrize("any_database_url", ["postgresql"], indirect=True)
def test_writers_append_to_one_chain_without_holding_its_lock(app, client, world, tmp_path):
    """Two writers (two workers) on one tenant's chain. On PostgreSQL an append is one
    autocommitted statement, so no lock outlives it, whatever the writer's hub does between round
    trips: a writer whose view of the head is stale is refused by (chain, seq)'s uniqueness,
    rereads the head and relinks. Every record lands once, in one unbroken chain, counted once."""
    with app.app_context():
        engine = db.engine
    first, second = (
        AuditWriter(
            engine, spool_dir=tmp_path / n, buffer_max=100, batch_size=50, flush_interval_s=1, journal=False
        )
        for n in ("first", "second")
    )
    statements: list[str] = []

    def seen(conn, cursor, statement, *args) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    conflicts = audit.writer.CHAIN_CONFLICTS._value.get()
    event.listen(engine, "before_cursor_execute", seen)
    try:
        for writer in [first, second, first, first, second]:
            batch = _pending(world.acme, 3, request_id=None)
            for record in batch:
                record.noted = {"model": "m", "tokens_in": 1}
            statements.clear()
            assert writer.write([record.row() for record in batch], replay=False) == 3
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    # The second writer's last batch was linked to the head it had left, which the first had moved.
    assert statements == ["WITH", "SELECT", "WITH"]
    assert audit.writer.CHAIN_CONFLICTS._value.get() - conflicts == 2  # and the first's second batch
    rows = sorted((r for r in records(app) if r["chain"] == world.acme), key=lambda r: r["seq"])
    assert [r["seq"] for r in rows] == list(range(1, 16))
    assert verify(client, world.admin)["ok"] is True
    report = call(client, "GET", "/v1/governance/usage", world.admin, query_string={"tenant_id": world.acme})
    assert [(r["requests"], r["tokens_in"]) for r in report.get_json()["data"]] == [(15, 15)]


def test_a_dead_workers_spool_is_claimed_and_replayed(app, client, world, runner):
    writer: AuditWriter = app.extensions["audit"]
    dead_pid = subprocess.Popen(["true"])
    dead_pid.wait()
    rows = [r.row() for r in _pending(world.globex, 5)]
    orphan = writer.spool.directory / f"audit-{writer.spool.fingerprint}-{dead_pid.pid}.jsonl"
    foreign = writer.spool.directory / f"audit-000000000000-{dead_pid.pid}.jsonl"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_text("".join(canonical_json(r) + "\n" for r in rows) + '{"torn": ')
    foreign.write_text("not ours\n")

    result = runner.invoke(args=["audit", "replay"])
    assert result.exit_code == 0, result.output
    assert "replayed 5 record(s)" in result.output
    assert not orphan.exists() and foreign.exists(), "another database's spool is left alone"
    assert len([r for r in records(app) if r["chain"] == world.globex]) == 5
    assert verify(client, world.admin)["ok"] is True


def test_a_dead_workers_journal_brings_back_cut_requests_and_lost_buffers(app, client, world):
    """What a SIGKILL takes (journal.py): a request cut mid-way and a record still in the buffer
    come back as records marked `recovered`; one that reached the database is not written twice;
    and a live worker's journal keeps only what is not yet durable."""
    writer: AuditWriter = app.extensions["audit"]
    assert writer.journal is not None
    # This process's own journal: two audited requests, flushed, so nothing is outstanding.
    assert call(client, "POST", "/v2/models/sentiment/infer", world.acme_key, json=INFER).status_code == 200
    assert call(client, "POST", "/v2/models/sentiment/infer", world.acme_key, json=INFER).status_code == 200
    writer.flush()
    assert not any(writer.journal._outstanding.values())
    before = len(records(app))

    # A dead worker's journal, as its last seconds left it.
    from app.governance.audit.journal import Journal

    dead = subprocess.Popen(["true"])
    dead.wait()
    scratch = writer.journal.directory / "scratch"
    theirs = Journal(scratch, writer.journal.fingerprint)
    now = utcnow()
    theirs.opened(
        "cut0000000000000000000000000001", "inference", now, "rid-cut", "/v1/chat/completions", "POST"
    )
    theirs.started("cut0000000000000000000000000001", world.acme, "key:x", "upstream-chat")
    lost = Pending(
        kind="inference", ts=now, request_id="rid-lost", tenant_id=world.globex, principal="key:y",
        endpoint="/v2/models/sentiment/infer", method="POST", action=None, status=200, latency_ms=3.5,
        noted={"model": "sentiment", "tokens_in": 4}, details={}, view_args={},
        record_id="lost000000000000000000000000001",
    )  # fmt: skip
    theirs.opened(lost.record_id, "inference", now, "rid-lost", lost.endpoint, "POST")
    theirs.closed(lost)
    written = records(app)[0]  # already in the database: must not come back a second time
    theirs.opened(written["record_id"], "inference", now, "rid-done", "/v1/models", "GET")
    segment = next(scratch.glob("*.journal"))
    orphan = writer.journal.directory / segment.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    segment.rename(orphan)
    with orphan.open("a") as torn:
        torn.write('{"e":"open","id":"torn')  # the kill cut the last line

    writer._journal_scan_at = 0.0  # what the next scan (every JOURNAL_SCAN_S) does
    writer.flush()
    after = records(app)
    assert len(after) == before + 2 and not orphan.exists()
    recovered = {r["record_id"]: r for r in after[before:]}
    cut = recovered["cut0000000000000000000000000001"]
    assert (cut["tenant_id"], cut["status"], cut["model"]) == (world.acme, 0, "upstream-chat")
    assert cut["details"] == {"recovered": "worker_died_mid_request"}
    buffered = recovered[lost.record_id]
    assert (buffered["tenant_id"], buffered["status"], buffered["tokens_in"]) == (world.globex, 200, 4)
    assert buffered["details"] == {"recovered": "worker_died_before_record_was_written"}
    assert verify(client, world.admin)["ok"] is True


# --- admin actions --------------------------------------------------------------------------------


def test_admin_actions_are_audited_without_secrets(app, client, world):
    created = call(client, "POST", "/v1/governance/keys", world.acme_key, json={"name": "ci"})
    assert created.status_code == 201
    key = created.get_json()
    form = {"grant_type": "client_credentials", "client_id": key["prefix"], "client_secret": key["key"]}
    token = call(client, "POST", "/v1/auth/token", data=form)
    assert token.status_code == 200
    revoked = call(client, "POST", f"/v1/governance/keys/{key['id']}/revoke", world.acme_key)
    planted = call(
        client, "POST", "/v1/governance/keys", world.admin, json={"name": "x", "tenant_id": world.acme}
    )
    refused = call(
        client, "POST", "/v1/governance/keys", world.globex_key, json={"tenant_id": world.acme, "name": "y"}
    )
    assert refused.status_code == 403
    wrong = {"grant_type": "password", "username": "alice", "password": "wrong-guess"}
    wrong_resp = call(client, "POST", "/v1/auth/token", data=wrong)
    assert wrong_resp.status_code == 400
    login = call(client, "POST", "/v1/auth/token", data={**wrong, "password": PASSWORD})
    assert login.status_code == 200
    app.extensions["audit"].flush()

    rows = {r["request_id"]: r for r in records(app)}
    assert len(rows) == 7 and all(r["kind"] == "admin" for r in rows.values())
    made = rows[created.headers["X-Request-ID"]]
    assert (made["action"], made["status"], made["tenant_id"]) == ("create_key", 201, world.acme)
    assert made["principal"].startswith("key:") and made["details"]["object_id"] == key["id"]
    gone = rows[revoked.headers["X-Request-ID"]]
    assert gone["action"] == "revoke" and gone["details"]["target"] == {"key_id": key["id"]}
    by_admin = rows[planted.headers["X-Request-ID"]]
    assert by_admin["tenant_id"] == world.acme and "actor_tenant_id" in by_admin["details"]
    denied = rows[refused.headers["X-Request-ID"]]
    assert (denied["status"], denied["tenant_id"]) == (403, world.globex), "stays in the caller's chain"
    issued = rows[token.headers["X-Request-ID"]]
    assert issued["action"] == "issue_token" and issued["principal"] is None
    assert issued["details"]["form"] == {"grant_type": "client_credentials", "client_id": key["prefix"]}
    assert rows[wrong_resp.headers["X-Request-ID"]]["status"] == 400
    assert rows[login.headers["X-Request-ID"]]["details"]["form"]["username"] == "alice"
    stored = json.dumps(records(app), default=str)
    for secret in (key["key"], world.acme_key, PASSWORD, "wrong-guess", login.get_json()["access_token"]):
        assert secret not in stored
    assert verify(client, world.admin)["ok"] is True


# --- reading the trail: filters, pages, exports, isolation ----------------------------------------


def test_filters_and_cursor_pages(app, client, world):
    responses = traffic(app, client, world)
    traffic(app, client, world)
    seen, cursor = [], None
    while True:
        query = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = call(client, "GET", "/v1/governance/audit", world.admin, query_string=query).get_json()
        seen += [r["record_id"] for r in page["data"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [r["record_id"] for r in records(app)]

    def listed(key: str, **query) -> list[dict]:
        resp = call(client, "GET", "/v1/governance/audit", key, query_string={"limit": 200, **query})
        assert resp.status_code == 200, resp.get_json()
        return resp.get_json()["data"]

    assert {r["status"] for r in listed(world.admin, status=404)} == {404}
    assert len(listed(world.admin, model="sentiment")) == 6
    assert len(listed(world.admin, tenant_id=world.globex)) == 2
    principal = records(app)[0]["principal"]
    assert {r["principal"] for r in listed(world.acme_key, principal=principal)} == {principal}
    assert listed(world.admin, kind="admin") == []
    assert listed(world.admin, since=(utcnow() + timedelta(hours=1)).isoformat()) == []
    in_an_hour = (utcnow() + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    assert len(listed(world.admin, until=in_an_hour)) == 12
    first = records(app)[0]
    assert first["request_id"] == responses[0].headers["X-Request-ID"]
    bad = call(client, "GET", "/v1/governance/audit", world.admin, query_string={"cursor": "!!"})
    assert bad.status_code == 422 and bad.get_json()["error"]["param"] == "cursor"  # not base64url
    forged = call(client, "GET", "/v1/governance/audit", world.admin, query_string={"cursor": "AAAA"})
    assert forged.status_code == 400 and forged.get_json()["error"]["code"] == "invalid_cursor"


def test_tenants_see_only_their_own_records(app, client, world):
    traffic(app, client, world)
    acme = call(client, "GET", "/v1/governance/audit", world.acme_key, query_string={"limit": 200}).get_json()
    assert {r["tenant_id"] for r in acme["data"]} == {world.acme}
    own = call(client, "GET", "/v1/governance/audit", world.acme_key, query_string={"tenant_id": world.acme})
    assert own.status_code == 200
    for path in ("/v1/governance/audit", "/v1/governance/audit/export", "/v1/governance/audit/verify"):
        resp = call(client, "GET", path, world.acme_key, query_string={"tenant_id": world.globex})
        assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "cross_tenant"
    everyone = call(
        client, "GET", "/v1/governance/audit", world.admin, query_string={"limit": 200}
    ).get_json()
    assert {r["tenant_id"] for r in everyone["data"]} == {world.acme, world.globex, None}


def test_streamed_exports(app, client, world):
    traffic(app, client, world)
    jsonl = call(client, "GET", "/v1/governance/audit/export", world.acme_key)
    assert jsonl.status_code == 200
    assert jsonl.mimetype == "application/x-ndjson"
    lines = [json.loads(line) for line in jsonl.get_data(as_text=True).splitlines()]
    assert len(lines) == 4 and {line["tenant_id"] for line in lines} == {world.acme}
    db_rows = [r for r in records(app) if r["chain"] == world.acme]
    assert [line["hash"] for line in lines] == [r["hash"] for r in db_rows]

    csv_resp = call(client, "GET", "/v1/governance/audit/export", world.admin, query_string={"format": "csv"})
    assert csv_resp.mimetype == "text/csv"
    text_rows = csv_resp.get_data(as_text=True).splitlines()
    assert text_rows[0].startswith("id,record_id,chain,seq,ts,kind")
    assert len(text_rows) == 1 + 6
    bad = call(client, "GET", "/v1/governance/audit/export", world.admin, query_string={"format": "xml"})
    assert bad.status_code == 422


# --- usage reports --------------------------------------------------------------------------------


def test_usage_report_figures(app, client, world):
    writer: AuditWriter = app.extensions["audit"]
    today = utcnow().replace(hour=12, minute=0, second=0, microsecond=0)
    yesterday = today - timedelta(days=1)
    acme_latencies = [10.0, 20.0, 30.0, 40.0, 1000.0]
    acme_today = _pending(world.acme, 5, ts=today)
    for record, latency in zip(acme_today, acme_latencies, strict=True):
        record.latency_ms = latency
    acme_today[4].status = 500
    batch = [
        *acme_today,
        *_pending(world.acme, 2, ts=yesterday, latency_ms=5.0),
        *_pending(world.globex, 3, ts=today, latency_ms=7.0),
    ]
    for i, record in enumerate(batch):
        record.noted = {"model": "m1" if i < 7 else "m2", "tokens_in": 3, "tokens_out": 4}
    for record in batch:
        writer.submit(record)
    writer.flush()

    def usage(key: str, **query) -> list[dict]:
        resp = call(client, "GET", "/v1/governance/usage", key, query_string=query)
        assert resp.status_code == 200, resp.get_json()
        return resp.get_json()["data"]

    rows = usage(world.admin, since=(yesterday - timedelta(hours=1)).isoformat())
    assert [(r["tenant_id"], r["model"], r["day"], r["requests"]) for r in rows] == sorted(
        [
            (world.acme, "m1", yesterday.date().isoformat(), 2),
            (world.acme, "m1", today.date().isoformat(), 5),
            (world.globex, "m2", today.date().isoformat(), 3),
        ],
        key=lambda r: (r[2], r[0], r[1]),
    )
    day = next(r for r in rows if r["tenant_id"] == world.acme and r["day"] == today.date().isoformat())
    assert (day["tokens_in"], day["tokens_out"], day["errors"]) == (15, 20, 1)
    # A whole day: its percentiles come from the day's latency histogram, within half a bucket.
    p50, p95 = np.percentile(acme_latencies, [50, 95])
    assert (day["latency_p50_ms"], day["latency_p95_ms"]) == (
        pytest.approx(p50, rel=0.022),
        pytest.approx(p95, rel=0.022),
    )
    # From noon on, today is part of a day: counted from the records themselves, exactly.
    partial = usage(world.admin, since=today.isoformat())
    assert [(r["tenant_id"], r["requests"]) for r in partial if r["tenant_id"] == world.acme] == [
        (world.acme, 5)
    ]
    exact = next(r for r in partial if r["tenant_id"] == world.acme)
    assert (exact["latency_p50_ms"], exact["latency_p95_ms"]) == (pytest.approx(p50), pytest.approx(p95))
    assert {k: v for k, v in exact.items() if not k.startswith("latency")} == {
        k: v for k, v in day.items() if not k.startswith("latency")
    }

    mine = usage(world.acme_key, since=(yesterday - timedelta(hours=1)).isoformat())
    assert {r["tenant_id"] for r in mine} == {world.acme} and len(mine) == 2
    assert usage(world.admin, tenant_id=world.globex)[0]["requests"] == 3
    denied = call(
        client, "GET", "/v1/governance/usage", world.acme_key, query_string={"tenant_id": world.globex}
    )
    assert denied.status_code == 403 and denied.get_json()["error"]["code"] == "cross_tenant"


def test_usage_totals_equal_the_records_they_count(app, client, world):
    """The totals are written with the records: a replayed batch (its commit's acknowledgement
    lost) counts once, as its records do, and records of other kinds count nowhere."""
    writer: AuditWriter = app.extensions["audit"]
    today = utcnow().replace(hour=9, minute=0, second=0, microsecond=0)
    batch = _pending(world.acme, 6, ts=today) + _pending(world.globex, 4, ts=today - timedelta(days=2))
    for i, record in enumerate(batch):
        record.latency_ms = 3.0 * (i + 1)
        record.status = 502 if i == 2 else 200
        record.noted = {"model": f"m{i % 2}", "tokens_in": i, "tokens_out": 2 * i}
    admin = _pending(world.acme, 2, ts=today, kind="admin", action="key.create")
    for record in batch + admin:
        writer.submit(record)
    writer.flush()
    rows = [record.row() for record in batch]
    assert writer.write(rows, replay=True) == 0

    expected: dict[tuple, list] = {}
    for row in (r for r in records(app) if r["kind"] == "inference"):
        key = (row["tenant_id"], row["model"], row["ts"].date())
        sums = expected.setdefault(key, [0, 0, 0, 0, []])
        sums[0] += 1
        sums[1] += row["tokens_in"]
        sums[2] += row["tokens_out"]
        sums[3] += row["status"] >= 400
        sums[4].append(row["latency_ms"])
    with app.app_context():
        daily = {
            (r.tenant_id, r.model, r.day): [r.requests, r.tokens_in, r.tokens_out, r.errors]
            for r in db.session.scalars(select(UsageDaily))
        }
        buckets: dict[tuple, dict[int, int]] = {}
        for r in db.session.scalars(select(UsageLatency)):
            buckets.setdefault((r.tenant_id, r.model, r.day), {})[r.bucket] = r.count
    assert daily == {key: sums[:4] for key, sums in expected.items()}
    assert sum(daily[k][0] for k in daily) == 10
    for key, sums in expected.items():
        assert buckets[key] == dict(collections.Counter(rollup.bucket(x) for x in sums[4]))


def test_a_report_of_whole_days_reads_no_audit_record(app, client, world):
    """What keeps a usage read cheap however long the trail: whole days come from the totals."""
    writer: AuditWriter = app.extensions["audit"]
    midnight = utcnow().replace(hour=0, minute=0, second=0, microsecond=0)
    for record in _pending(world.acme, 3, ts=midnight - timedelta(days=1, hours=-2)):
        writer.submit(record)
    writer.flush()
    statements: list[str] = []

    def seen(conn, cursor, statement, *args) -> None:
        statements.append(statement)

    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", seen)
        try:
            since = (midnight - timedelta(days=3)).isoformat()
            resp = call(client, "GET", "/v1/governance/usage", world.admin, query_string={"since": since})
            whole = list(statements)
            statements.clear()
            partial = (midnight - timedelta(days=3, hours=1)).isoformat()
            call(client, "GET", "/v1/governance/usage", world.admin, query_string={"since": partial})
        finally:
            event.remove(db.engine, "before_cursor_execute", seen)
    assert resp.status_code == 200 and [r["requests"] for r in resp.get_json()["data"]] == [3]
    assert any("usage_daily" in s for s in whole)
    assert not any("audit_records" in s for s in whole), whole
    assert any("audit_records" in s for s in statements)  # the day that starts at 23:00


def test_the_migration_fills_the_totals_from_the_records_already_there(app, world):
    """Upgrading a trail written before the totals existed gives the totals the writer keeps."""
    from flask_migrate import downgrade, upgrade

    writer: AuditWriter = app.extensions["audit"]
    batch = _pending(world.acme, 5) + _pending(world.globex, 3, ts=utcnow() - timedelta(days=1))
    for i, record in enumerate(batch):
        record.latency_ms = 1.5 * i
        record.status = 429 if i == 1 else 200
        record.noted = {"model": "m", "tokens_in": i, "tokens_out": 1}
    for record in batch:
        writer.submit(record)
    writer.flush()

    def totals() -> tuple[list, list]:
        daily = sorted(tuple(r) for r in db.session.execute(select(UsageDaily.__table__)))
        return daily, sorted(tuple(r) for r in db.session.execute(select(UsageLatency.__table__)))

    with app.app_context():
        kept = totals()
        db.session.remove()
        downgrade(revision="0007")
        upgrade()
        assert totals() == kept and sum(row[3] for row in kept[0]) == 8


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_histogram_percentiles_are_within_half_a_bucket(seed):
    rng = np.random.default_rng(seed)
    latencies = rng.lognormal(mean=3.0, sigma=1.5, size=int(rng.integers(1, 5000)))
    histogram = collections.Counter(rollup.bucket(x) for x in latencies)
    for q in (0, 50, 95, 100):
        assert rollup.percentile(histogram, q) == pytest.approx(np.percentile(latencies, q), rel=0.022)
    assert rollup.percentile({}, 50) is None
    assert rollup.percentile({rollup.bucket(0.0): 2}, 95) == 0.0


def test_spool_directory_defaults_under_the_instance(app, writer):
    assert writer.spool.directory == Path(app.instance_path) / "audit-spool"
