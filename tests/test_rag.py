"""RAG end to end on both stores: collections, ingestion with the real MiniLM model, search with
metadata filters, RAG chat (plain and streamed) through the governed chat path against the upstream
simulator and the local SmolLM2, tenant isolation and bad input.

One app per database engine for the module (MiniLM loads once per engine); each test works in
tenants of its own, so tests share nothing but the loaded models. The PostgreSQL app runs the
pgvector store: its migration creates the extension, so a server without pgvector fails here
(under CI=true, never a skip)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from flask import Flask
from flask.testing import FlaskClient

from app.governance.policies.rules import RulesSchema
from bench.upstream_sim import run_simulator
from tests import support

pytestmark = pytest.mark.slow

MINILM = """
  - name: minilm
    backend: sentence_transformers
    limits:
      max_concurrency: 1
      max_batch_size: 32
      max_batch_wait_ms: 2
"""
UPSTREAM = """
  - name: upstream-chat
    backend: openai_compatible
    params:
      base_url: ${UPSTREAM_BASE_URL}
      model: sim-model
  - name: upstream-embed
    backend: openai_compatible
    params:
      base_url: ${UPSTREAM_BASE_URL}
      model: sim-model
"""
LOCAL_CHAT_AND_VADER = """
  - name: smollm2
    backend: llama_cpp
    params:
      n_ctx: 2048
      n_threads: 2
    limits:
      max_tokens: 64
  - name: vader
    backend: vader
"""
CATALOGUE = "models:" + MINILM + LOCAL_CHAT_AND_VADER + UPSTREAM

DOCS = [
    {
        "text": "The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was built by "
        "Gustave Eiffel's company for the 1889 World's Fair and is 330 metres tall.",
        "metadata": {"topic": "landmarks", "year": 1889, "lang": "en"},
    },
    {
        "text": "Photosynthesis is the process by which green plants use sunlight, water and carbon "
        "dioxide to make glucose and release oxygen. It happens in the chloroplasts.",
        "metadata": {"topic": "biology", "year": 1779, "lang": "en"},
    },
    {
        "text": "Python is a high-level programming language created by Guido van Rossum and first "
        "released in 1991. Its design emphasises readable code and significant indentation.",
        "metadata": {"topic": "software", "year": 1991, "lang": "en", "reviewed": True},
    },
    {
        "text": "La tour Eiffel est une tour de fer puddlé de 330 mètres située à Paris, construite "
        "pour l'Exposition universelle de 1889.",
        "metadata": {"topic": "landmarks", "year": 1889, "lang": "fr"},
    },
]


@pytest.fixture(scope="module")
def simulator():
    with run_simulator(latency_ms=0) as sim:
        yield sim


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def rag_app(request: pytest.FixtureRequest, simulator, tmp_path_factory) -> Iterator[Flask]:
    workdir = tmp_path_factory.mktemp("rag")
    if request.param == "sqlite":
        db_url = support.copy_sqlite(request.getfixturevalue("sqlite_template"), workdir / "rag.db")
    else:
        db_url = support.create_postgres_database(request.getfixturevalue("postgres_template"))
    redis_url = support.require_service("TEST_REDIS_URL")
    support.flush_redis(redis_url)
    (workdir / "models.yaml").write_text(CATALOGUE)
    env = {
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "MODELS_CONFIG": str(workdir / "models.yaml"),
        "MODELS_DIR": str(workdir),
        "UPSTREAM_BASE_URL": simulator.base_url,
        "RAG_EMBEDDING_MODEL": "minilm",
        "INSTANCE_PATH": str(workdir / "instance"),
    }
    from app import create_app
    from app.governance import audit

    with support.environ(**env):
        application = create_app()
    application.config["ENGINE"] = request.param
    yield application
    audit.shutdown(application)
    application.extensions["usage_ledger"].close()
    drift = application.extensions.get("drift")
    if drift is not None:
        drift.stop()
    with application.app_context():
        from app.extensions import db

        db.session.remove()
        db.engine.dispose()
    if request.param == "postgresql":
        support.drop_postgres_database(db_url)


@dataclass
class Tenant:
    id: str
    key: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def new_tenant(app: Flask, **settings: object) -> Tenant:
    from app.identity import accounts, apikeys

    with app.app_context():
        tenant = accounts.create_tenant(f"rag-{uuid.uuid4().hex[:10]}", **settings)  # type: ignore[arg-type]
        _, key = apikeys.issue_key(tenant, "rag", ["inference:invoke", "models:read"])
        return Tenant(tenant.id, key)


@pytest.fixture
def client(rag_app: Flask) -> FlaskClient:
    return rag_app.test_client()


@pytest.fixture
def tenant(rag_app: Flask) -> Tenant:
    return new_tenant(rag_app)


def create_collection(client: FlaskClient, tenant: Tenant, **body: object) -> dict:
    resp = client.post("/v1/collections", json={"name": uuid.uuid4().hex, **body}, headers=tenant.auth)
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


def ingest(client: FlaskClient, tenant: Tenant, collection_id: str, documents: list[dict]) -> dict:
    resp = client.post(
        f"/v1/collections/{collection_id}/documents", json={"documents": documents}, headers=tenant.auth
    )
    assert resp.status_code == 201, resp.get_json()
    return resp.get_json()


@pytest.fixture
def loaded(client: FlaskClient, tenant: Tenant) -> tuple[dict, dict]:
    """A collection holding DOCS, and the ingestion's answer."""
    collection = create_collection(client, tenant)
    return collection, ingest(client, tenant, collection["id"], DOCS)


def search(client: FlaskClient, tenant: Tenant, collection_id: str, **body: object):
    return client.post(f"/v1/collections/{collection_id}/search", json=body, headers=tenant.auth)


def assert_error(resp, status: int, code: str, param: str | None = None) -> dict:
    body = resp.get_json()
    assert resp.status_code == status, body
    support.error_code(body)  # our shape: message, type, param, code, request_id
    assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def store_name(app: Flask) -> str:
    return "pgvector" if app.config["ENGINE"] == "postgresql" else "exact"


# collections -----------------------------------------------------------------------------------
def test_collection_lifecycle(rag_app, client, tenant):
    created = create_collection(client, tenant, name="handbook", description="HR handbook")
    assert created["object"] == "rag.collection" and created["embedding_model"] == "minilm"
    assert (created["dimensions"], created["document_count"], created["chunk_count"]) == (384, 0, 0)
    assert created["tenant_id"] == tenant.id
    again = client.post("/v1/collections", json={"name": "handbook"}, headers=tenant.auth)
    assert_error(again, 409, "collection_exists", "name")
    other = create_collection(client, tenant, name="other")
    listed = client.get("/v1/collections", headers=tenant.auth).get_json()
    assert [c["id"] for c in listed["data"]] == [created["id"], other["id"]]
    assert (
        client.get(f"/v1/collections/{created['id']}", headers=tenant.auth).get_json()["name"] == "handbook"
    )
    deleted = client.delete(f"/v1/collections/{created['id']}", headers=tenant.auth)
    assert deleted.status_code == 200 and deleted.get_json() == {
        "id": created["id"],
        "object": "rag.collection",
        "deleted": True,
    }
    assert_error(
        client.get(f"/v1/collections/{created['id']}", headers=tenant.auth), 404, "collection_not_found"
    )


def test_ingest_chunks_embeds_and_counts(rag_app, client, tenant):
    collection = create_collection(client, tenant)
    long_text = " ".join(f"Sentence number {i} talks about topic {i % 7}." for i in range(120))
    answer = ingest(
        client, tenant, collection["id"], [*DOCS, {"text": long_text, "metadata": {"topic": "long"}}]
    )
    docs = answer["data"]
    assert [d["chunk_count"] for d in docs[:4]] == [1, 1, 1, 1]
    assert docs[4]["chunk_count"] > 3 and docs[4]["chars"] == len(long_text)
    assert answer["usage"]["prompt_tokens"] > 0 and answer["timings"]["embed_ms"] > 0
    got = client.get(f"/v1/collections/{collection['id']}", headers=tenant.auth).get_json()
    assert got["document_count"] == 5 and got["chunk_count"] == sum(d["chunk_count"] for d in docs)
    # Every chunk of the long document is searchable, and its offsets point into the original text.
    hits = search(client, tenant, collection["id"], query="topic", top_k=50, filter={"topic": "long"})
    data = hits.get_json()["data"]
    assert {h["chunk_id"] for h in data} == set(docs[4]["chunk_ids"])
    for hit in data:
        assert long_text[hit["start_char"] : hit["end_char"]] == hit["text"]
        assert len(hit["text"]) <= 800


def test_search_ranks_the_relevant_chunk_first(rag_app, client, tenant, loaded):
    collection, ingested = loaded
    resp = search(client, tenant, collection["id"], query="How tall is the tower in Paris?", top_k=3)
    body = resp.get_json()
    assert resp.status_code == 200, body
    assert body["store"] == store_name(rag_app)
    top = body["data"][0]
    assert top["document_id"] in {ingested["data"][0]["id"], ingested["data"][3]["id"]}
    assert top["chunk_id"] in ingested["data"][0]["chunk_ids"] + ingested["data"][3]["chunk_ids"]
    assert "330" in top["text"] and top["metadata"]["topic"] == "landmarks"
    scores = [h["score"] for h in body["data"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 3 and -1 <= scores[-1] <= scores[0] <= 1
    plants = search(client, tenant, collection["id"], query="how do plants make sugar from light", top_k=1)
    assert plants.get_json()["data"][0]["document_id"] == ingested["data"][1]["id"]


def test_filtered_search(rag_app, client, tenant, loaded):
    collection, ingested = loaded
    ids = [d["id"] for d in ingested["data"]]

    def docs_for(flt: dict) -> set[str]:
        resp = search(client, tenant, collection["id"], query="Eiffel tower Paris", top_k=10, filter=flt)
        assert resp.status_code == 200, resp.get_json()
        return {h["document_id"] for h in resp.get_json()["data"]}

    assert docs_for({"lang": "fr"}) == {ids[3]}
    assert docs_for({"topic": "landmarks", "lang": {"$ne": "fr"}}) == {ids[0]}
    assert docs_for({"year": {"$gte": 1889}}) == {ids[0], ids[2], ids[3]}
    assert docs_for({"year": {"$lt": 1889}}) == {ids[1]}
    assert docs_for({"topic": {"$in": ["biology", "software"]}}) == {ids[1], ids[2]}
    assert docs_for({"reviewed": True}) == {ids[2]}
    assert docs_for({"year": 1991.0}) == {ids[2]}  # JSON numbers: 1991 == 1991.0
    assert docs_for({"reviewed": 1}) == set()  # but a boolean is not a number
    assert docs_for({"year": "1991"}) == set()  # nor a string
    assert docs_for({"lang": {"$gt": 1}}) == set()  # a string never compares with a number
    assert docs_for({"missing": {"$ne": "x"}}) == set(ids)
    assert docs_for({"topic": "none-such"}) == set()


# RAG chat --------------------------------------------------------------------------------------
def test_rag_chat_with_citations(rag_app, client, tenant, loaded):
    collection, ingested = loaded
    chunk_ids = {c for d in ingested["data"] for c in d["chunk_ids"]}
    body = {
        "collection_id": collection["id"],
        "model": "upstream-chat",
        "messages": [{"role": "user", "content": "When was the Eiffel Tower built?"}],
        "top_k": 2,
        "max_tokens": 8,
    }
    resp = client.post("/v1/rag/chat", json=body, headers=tenant.auth)
    answer = resp.get_json()
    assert resp.status_code == 200, answer
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
    assert answer["model"] == "upstream-chat" and answer["collection_id"] == collection["id"]
    citations = answer["citations"]
    assert [c["index"] for c in citations] == [1, 2]
    assert all(c["chunk_id"] in chunk_ids and c["text"] and -1 <= c["score"] <= 1 for c in citations)
    assert "1889" in citations[0]["text"]
    assert [c["cited"] for c in citations] == [False, False]  # the simulator cites nothing
    timings = answer["timings"]
    assert set(timings) == {"embed_ms", "retrieval_ms", "generation_ms", "total_ms"}
    assert timings["total_ms"] >= timings["embed_ms"] + timings["retrieval_ms"] + timings["generation_ms"] - 1
    usage = answer["usage"]
    assert usage["embedding_tokens"] > 0 and usage["completion_tokens"] == 8
    # The simulator saw the sources in the system message: its prompt count covers them.
    assert usage["prompt_tokens"] > 40


def test_rag_chat_streamed(rag_app, client, tenant, loaded):
    collection, ingested = loaded
    body = {
        "collection_id": collection["id"],
        "model": "upstream-chat",
        "messages": [{"role": "user", "content": "What does photosynthesis release?"}],
        "top_k": 3,
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    resp = client.post("/v1/rag/chat", json=body, headers=tenant.auth)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    raw = resp.get_data(as_text=True)
    events = [block[len("data: ") :] for block in raw.split("\n\n") if block.startswith("data: ")]
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    first, *chunks, timings = parsed
    assert first["object"] == "rag.citations" and first["collection_id"] == collection["id"]
    assert first["citations"][0]["document_id"] == ingested["data"][1]["id"]
    chunk_ids = {c for d in ingested["data"] for c in d["chunk_ids"]}
    assert {c["chunk_id"] for c in first["citations"]} <= chunk_ids and len(first["citations"]) == 3
    assert "cited" not in first["citations"][0]  # known only once the answer is: rag.timings
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    assert text.strip()
    assert timings["object"] == "rag.timings" and timings["timings"]["generation_ms"] > 0
    assert isinstance(timings["cited"], list)


def test_rag_chat_with_the_local_smollm2(rag_app, client, tenant, loaded):
    collection, ingested = loaded
    body = {
        "collection_id": collection["id"],
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Who created the Python programming language?"}],
        "top_k": 1,
        "max_tokens": 24,
        "temperature": 0,
    }
    resp = client.post("/v1/rag/chat", json=body, headers=tenant.auth)
    answer = resp.get_json()
    assert resp.status_code == 200, answer
    assert answer["citations"][0]["document_id"] == ingested["data"][2]["id"]
    assert "guido" in answer["choices"][0]["message"]["content"].lower()


def test_rag_calls_are_audited_like_any_other(rag_app, client, tenant, loaded):
    from sqlalchemy import select

    from app.extensions import db
    from app.governance.audit.models import AuditRecord

    collection, _ = loaded
    body = {
        "collection_id": collection["id"],
        "model": "upstream-chat",
        "messages": [{"role": "user", "content": "Eiffel?"}],
        "max_tokens": 4,
    }
    # Buffered: the record is submitted when the response is closed, as a server closes it.
    resp = client.post("/v1/rag/chat", json=body, headers=tenant.auth, buffered=True)
    assert resp.status_code == 200
    rid = resp.headers["X-Request-ID"]
    rag_app.extensions["audit"].flush()
    with rag_app.app_context():
        record = db.session.scalar(select(AuditRecord).where(AuditRecord.request_id == rid))
        assert record is not None and record.kind == "inference" and record.tenant_id == tenant.id
        assert record.model == "upstream-chat" and record.status == 200 and record.tokens_out == 4
        rag = record.details["rag"]
        assert rag["collection_id"] == collection["id"] and rag["embedding_model"] == "minilm"
        assert rag["chunk_ids"] == [c["chunk_id"] for c in resp.get_json()["citations"]]
        assert record.input_sha256 and record.output_sha256


def test_ingestion_goes_through_the_tenant_policy(rag_app, client):
    """PII the tenant's policy redacts is redacted before the model embeds it, and it is the
    redacted text that is stored and returned."""
    from app.governance.policies import store

    tenant = new_tenant(rag_app)
    with rag_app.app_context():
        store.create_version(tenant.id, RulesSchema().load({"pii": {"email": "redact"}}), "test")
    collection = create_collection(client, tenant)
    ingest(client, tenant, collection["id"], [{"text": "Write to jane.doe@example.com for refunds."}])
    hit = search(client, tenant, collection["id"], query="refunds contact").get_json()["data"][0]
    assert "jane.doe@example.com" not in hit["text"] and "refunds" in hit["text"]


def test_quota_is_spent_on_ingestion(rag_app, client):
    tenant = new_tenant(rag_app, token_quota=30)
    collection = create_collection(client, tenant)
    big = [{"text": "A fairly long document about many things. " * 30}]
    resp = client.post(
        f"/v1/collections/{collection['id']}/documents", json={"documents": big}, headers=tenant.auth
    )
    assert_error(resp, 429, "insufficient_quota")
    got = client.get(f"/v1/collections/{collection['id']}", headers=tenant.auth).get_json()
    assert (got["document_count"], got["chunk_count"]) == (0, 0)  # refused: nothing stored


# isolation -------------------------------------------------------------------------------------
def test_another_tenants_collection_is_not_found(rag_app, client, tenant, loaded):
    collection, _ = loaded
    intruder = new_tenant(rag_app)
    cid = collection["id"]
    chat = {"collection_id": cid, "model": "upstream-chat", "messages": [{"role": "user", "content": "hi"}]}
    for resp in (
        client.get(f"/v1/collections/{cid}", headers=intruder.auth),
        client.delete(f"/v1/collections/{cid}", headers=intruder.auth),
        client.post(f"/v1/collections/{cid}/documents", json={"documents": DOCS[:1]}, headers=intruder.auth),
        search(client, intruder, cid, query="Eiffel"),
        client.post("/v1/rag/chat", json=chat, headers=intruder.auth),
    ):
        assert_error(resp, 404, "collection_not_found")
    assert client.get("/v1/collections", headers=intruder.auth).get_json()["data"] == []
    assert_error(
        client.get(f"/v1/collections?tenant_id={tenant.id}", headers=intruder.auth), 403, "cross_tenant"
    )
    # The same name is free in another tenant, and its search never sees the first tenant's chunks.
    own = create_collection(client, intruder, name=collection["name"])
    ingest(client, intruder, own["id"], [{"text": "The Eiffel Tower is in Paris.", "metadata": {}}])
    hits = search(client, intruder, own["id"], query="Eiffel Tower", top_k=50).get_json()["data"]
    assert len(hits) == 1 and hits[0]["text"] == "The Eiffel Tower is in Paris."
    owner_view = client.get(f"/v1/collections/{cid}", headers=tenant.auth).get_json()
    assert owner_view["document_count"] == len(DOCS)


# bad input -------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_4xx(rag_app, client, tenant, loaded):
    collection, _ = loaded
    cid = collection["id"]
    docs_url = f"/v1/collections/{cid}/documents"

    def post_docs(documents: object):
        return client.post(docs_url, json={"documents": documents}, headers=tenant.auth)

    assert_error(post_docs([{"text": ""}]), 422, "validation_error", "documents.0.text")
    assert_error(post_docs([{"text": "  \n "}]), 422, "validation_error", "documents.0.text")
    assert_error(post_docs([]), 422, "validation_error", "documents")
    assert_error(post_docs([{"text": "x"}] * 33), 422, "validation_error", "documents")
    assert_error(
        post_docs([{"text": "ok"}, {"text": "y" * 50_001}]), 413, "document_too_large", "documents.1.text"
    )
    assert_error(post_docs([{"text": "ok", "metadata": {"a": {"nested": 1}}}]), 422, "validation_error")
    assert_error(post_docs([{"text": "ok", "extra": 1}]), 422, "unknown_parameter")
    assert_error(
        client.post("/v1/collections/nope/documents", json={"documents": DOCS[:1]}, headers=tenant.auth),
        404,
        "collection_not_found",
    )
    for flt, param in (
        ([1, 2], "filter"),
        ({"year": {"$regex": "x"}}, "filter.year"),
        ({"year": {"$gt": "1900"}}, "filter.year"),
        ({"year": {"$in": []}}, "filter.year"),
        ({"year": {"$gt": 1, "$lt": 2}}, "filter.year"),
        ({"bad key!": 1}, "filter.bad key!"),
        ({f"k{i}": 1 for i in range(17)}, "filter"),
    ):
        resp = search(client, tenant, cid, query="q", filter=flt)
        if isinstance(flt, list):
            assert_error(resp, 422, "validation_error", "filter")
        else:
            assert_error(resp, 400, "invalid_filter", param)
    assert_error(search(client, tenant, cid, query="q", top_k=0), 422, "validation_error", "top_k")
    assert_error(search(client, tenant, cid, query="q", top_k=51), 422, "validation_error", "top_k")
    assert_error(search(client, tenant, cid, query="q", top_k="5"), 422, "validation_error", "top_k")
    assert_error(search(client, tenant, cid, query=""), 422, "validation_error", "query")
    assert_error(search(client, tenant, "nope", query="q"), 404, "collection_not_found")
    chat = {
        "collection_id": cid,
        "model": "upstream-chat",
        "messages": [{"role": "assistant", "content": "x"}],
    }
    assert_error(
        client.post("/v1/rag/chat", json=chat, headers=tenant.auth), 422, "validation_error", "messages"
    )
    chat["messages"] = [{"role": "user", "content": "hi"}]
    chat["top_k"] = 21
    assert_error(
        client.post("/v1/rag/chat", json=chat, headers=tenant.auth), 422, "validation_error", "top_k"
    )
    chat["top_k"] = 2
    chat["model"] = "minilm"  # can embed, can't chat
    assert_error(
        client.post("/v1/rag/chat", json=chat, headers=tenant.auth), 400, "unsupported_operation", "model"
    )
    # Models that can't embed, or don't exist, can't back a collection.
    bad_model = client.post(
        "/v1/collections", json={"name": "v", "embedding_model": "vader"}, headers=tenant.auth
    )
    assert_error(bad_model, 400, "unsupported_operation", "embedding_model")
    unknown = client.post(
        "/v1/collections", json={"name": "u", "embedding_model": "nope"}, headers=tenant.auth
    )
    assert_error(unknown, 404, "model_not_found", "embedding_model")
    assert_error(
        client.post("/v1/collections", json={"name": ""}, headers=tenant.auth), 422, "validation_error"
    )
    assert_error(client.post("/v1/collections", json={"name": "x"}), 401, "missing_token")


def test_an_upstream_embedding_model_backs_a_collection(rag_app, client, tenant):
    """A model that can't tell its dimension up front pins it with the first document."""
    collection = create_collection(client, tenant, embedding_model="upstream-embed")
    assert collection["dimensions"] is None
    ingest(client, tenant, collection["id"], DOCS[:2])
    got = client.get(f"/v1/collections/{collection['id']}", headers=tenant.auth).get_json()
    assert got["dimensions"] == 384 and got["chunk_count"] == 2
    # The simulator's vectors are hashes of the text: the same text is the nearest, exactly.
    hits = search(client, tenant, collection["id"], query=DOCS[1]["text"], top_k=1).get_json()["data"]
    assert hits[0]["text"] == DOCS[1]["text"] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)


def test_the_store_is_the_engines(rag_app):
    """PostgreSQL searches with pgvector (0.8 or later: iterative HNSW scans), SQLite exactly."""
    from sqlalchemy import text

    from app.extensions import db

    assert rag_app.extensions["rag_store"].name == store_name(rag_app)
    if rag_app.config["ENGINE"] == "postgresql":
        with rag_app.app_context():
            version = db.session.execute(
                text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            ).scalar()
        assert version is not None and tuple(int(p) for p in version.split(".")[:2]) >= (0, 8), version


# a real server -----------------------------------------------------------------------------------
@pytest.mark.server
def test_rag_on_gunicorn_gevent(sqlite_template, simulator, tmp_path):
    """The same path on gunicorn's gevent workers: MiniLM and the exact scan in real threads,
    the stream relayed by the hub, both ending cleanly."""
    import requests

    (tmp_path / "models.yaml").write_text("models:" + MINILM + UPSTREAM)
    db_url = support.copy_sqlite(sqlite_template, tmp_path / "gw.db")
    key = support.issue_key(db_url, "rag-server")
    redis_url = support.require_service("TEST_REDIS_URL")
    support.flush_redis(redis_url)
    env = {
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "MODELS_CONFIG": str(tmp_path / "models.yaml"),
        "MODELS_DIR": str(tmp_path),
        "UPSTREAM_BASE_URL": simulator.base_url,
        "RAG_EMBEDDING_MODEL": "minilm",
    }
    auth = {"Authorization": f"Bearer {key}"}
    with support.GunicornServer(env, workers=1, ready_path="/readyz") as server:
        url = server.url
        collection = requests.post(f"{url}/v1/collections", json={"name": "docs"}, headers=auth, timeout=30)
        assert collection.status_code == 201, collection.text
        cid = collection.json()["id"]
        docs = requests.post(
            f"{url}/v1/collections/{cid}/documents", json={"documents": DOCS}, headers=auth, timeout=60
        )
        assert docs.status_code == 201, docs.text
        found = requests.post(
            f"{url}/v1/collections/{cid}/search",
            json={"query": "plants and sunlight", "top_k": 1},
            headers=auth,
            timeout=30,
        )
        assert found.json()["data"][0]["document_id"] == docs.json()["data"][1]["id"]
        body = {
            "collection_id": cid,
            "model": "upstream-chat",
            "messages": [{"role": "user", "content": "Who made Python?"}],
            "max_tokens": 5,
            "stream": True,
        }
        with requests.post(f"{url}/v1/rag/chat", json=body, headers=auth, stream=True, timeout=30) as resp:
            assert resp.status_code == 200
            events = [line[6:] for line in resp.iter_lines(decode_unicode=True) if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[0])["citations"][0]["document_id"] == docs.json()["data"][2]["id"]
        assert json.loads(events[-2])["object"] == "rag.timings"
        assert support.metric(url, "gateway_rag_retrieval_seconds_count", store="exact") == 2
        assert support.metric(url, "gateway_rag_chunks_ingested_total", store="exact") == len(DOCS)


def test_citations_flag_the_numbers_the_answer_cites():
    from app.inference.rag.service import _citations
    from app.inference.rag.stores import Hit

    hits = [Hit(f"c{n}", "d", n, 0.5, f"text {n}", {}, 0, 6) for n in range(3)]
    cited = _citations(hits, "Paris [1], and again [3][1]; not [7] nor 2.")
    assert [(c["index"], c["chunk_id"], c["cited"]) for c in cited] == [
        (1, "c0", True),
        (2, "c1", False),
        (3, "c2", True),
    ]
