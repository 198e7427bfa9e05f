"""RAG, measured: retrieval quality, search latency at scale per store, and RAG end to end.

    python -m bench.rag_bench           # full: 200 queries, 10k and 100k chunks (tens of minutes)
    python -m bench.rag_bench --quick   # about 2 minutes: 40 queries, 1k and 10k chunks

Everything runs in process through the gateway's own code (`create_app`, the Flask test client
for the API, the stores for the scale test), against real SQLite, PostgreSQL with pgvector and
Redis; no HTTP server, so the figures are of the RAG path itself.

1. Recall@5, both stores. The evaluation set is made offline from text on disk: the docstrings
   of numpy's public functions. Each function's docstring body (its summary line removed) is a
   document; the summary line is the query; the relevant chunks are that document's. Documents
   and queries are embedded by the real all-MiniLM-L6-v2 through the API. On PostgreSQL the HNSW
   index is forced (the collection btree index is dropped and seq scans are off in that throwaway
   database, and EXPLAIN must show the HNSW index), so the figure is the index's, not an exact
   sort's.
2. Search latency p50/p99 of the store's search (after the query is embedded) at two sizes per
   store. Embedding 100k chunks with MiniLM on 2 cores would take most of an hour, so these
   collections hold synthetic unit vectors (a random one per chunk), written straight to
   `rag_chunks`; queries are stored vectors plus noise. For pgvector the report gives the plan and
   the HNSW result's recall@5 against an exact numpy scan of the same vectors.
3. RAG end to end (POST /v1/rag/chat, SQLite store, SmolLM2): p50 of the client's wall time and
   of its parts as the response reports them (embed the question, retrieve, generate).

Writes RAG.md and rag.json to --out (default bench/results; bench/results/quick with --quick).
Uses BENCH_POSTGRES_URL (a server with pgvector) and BENCH_REDIS_URL.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from bench.run import DEFAULT_POSTGRES_URL, DEFAULT_REDIS_URL, RESULTS

ROOT = Path(__file__).resolve().parent.parent
CATALOGUE = """
models:
  - name: all-minilm-l6-v2
    backend: sentence_transformers
    limits: {max_concurrency: 1, max_batch_size: 32, max_batch_wait_ms: 2}
  - name: smollm2-135m-instruct
    backend: llama_cpp
    enabled: ${WITH_CHAT:-false}
    params: {n_ctx: 2048, n_threads: 2}
    limits: {max_tokens: 64}
"""
SIGNATURE = re.compile(r"^[\w.]+\(.*\)$", re.S)
DIMS = 384


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


# evaluation set -------------------------------------------------------------------------------
def evaluation_set(count: int, max_chars: int) -> list[dict[str, str]]:
    """(function, query, document) from numpy's docstrings: the summary line asks, the body answers."""
    import numpy

    items, seen = [], set()
    for name in sorted(dir(numpy)):
        obj = getattr(numpy, name)
        if name.startswith("_") or not callable(obj):
            continue
        paragraphs = [p.strip() for p in (inspect.getdoc(obj) or "").split("\n\n") if p.strip()]
        if paragraphs and SIGNATURE.match(paragraphs[0]):
            paragraphs = paragraphs[1:]  # ufuncs start with their signature
        if len(paragraphs) < 3:
            continue
        query, body = " ".join(paragraphs[0].split()), "\n\n".join(paragraphs[1:])[:max_chars]
        digest = hashlib.sha256(body.encode()).hexdigest()
        if len(query) < 20 or len(body) < 300 or digest in seen or query in {i["query"] for i in items}:
            continue  # aliases share a docstring
        seen.add(digest)
        items.append({"function": name, "query": query, "document": body})
        if len(items) == count:
            break
    return items


# apps -------------------------------------------------------------------------------------------
@contextmanager
def gateway(store: str, workdir: Path, with_chat: bool):
    """A migrated database (SQLite file, or a new PostgreSQL database) and an app on it."""
    from tests import support

    if store == "exact":
        db_url = f"sqlite:///{workdir / f'rag-{uuid.uuid4().hex[:6]}.db'}"
        support.migrate(db_url)
    else:
        db_url = support.create_postgres_template(os.environ.get("BENCH_POSTGRES_URL", DEFAULT_POSTGRES_URL))
    (workdir / "models.yaml").write_text(CATALOGUE)
    env = {
        "DATABASE_URL": db_url,
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", DEFAULT_REDIS_URL),
        "MODELS_CONFIG": str(workdir / "models.yaml"),
        "MODELS_DIR": str(workdir),
        "MODELS_LOAD": "eager",
        "INSTANCE_PATH": str(workdir / "instance"),
        "RAG_EMBEDDING_MODEL": "all-minilm-l6-v2",
        "WITH_CHAT": "true" if with_chat else "false",
        "LOG_LEVEL": "WARNING",
        "RAG_EXACT_CACHE_MB": "1024",
    }
    with support.environ(**env):
        from app import create_app

        app = create_app()
    try:
        yield app
    finally:
        from app.extensions import db
        from app.governance import audit

        audit.shutdown(app)
        app.extensions["usage_ledger"].close()
        if (drift := app.extensions.get("drift")) is not None:
            drift.stop()
        with app.app_context():
            db.session.remove()
            db.engine.dispose()
        if store == "pgvector":
            support.drop_postgres_database(db_url)


def api_key(app) -> tuple[str, str]:
    from app.identity import accounts, apikeys

    with app.app_context():
        tenant = accounts.create_tenant(f"bench-{uuid.uuid4().hex[:8]}", rate_limit="1000000/minute")
        return tenant.id, apikeys.issue_key(tenant, "bench", ["inference:invoke"])[1]


def post(client, key: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = client.post(path, json=body, headers={"Authorization": f"Bearer {key}"})
    if resp.status_code >= 300:
        raise RuntimeError(f"{path}: {resp.status_code} {resp.get_json()}")
    return resp.get_json()


# 1. recall ----------------------------------------------------------------------------------------
def force_hnsw(app) -> str:
    """Make the planner use the HNSW index in this throwaway database; return the plan's index."""
    from sqlalchemy import text

    from app.extensions import db

    with app.app_context():
        with db.engine.begin() as conn:
            name = conn.execute(text("SELECT current_database()")).scalar()
            conn.execute(text("DROP INDEX ix_rag_chunks_collection"))
            conn.execute(text(f'ALTER DATABASE "{name}" SET enable_seqscan = off'))
        db.engine.dispose()  # new connections pick the setting up
    return name


def hnsw_plan(app, collection_id: str, tenant_id: str) -> str:
    from sqlalchemy import text

    from app.extensions import db

    vector = "[" + ",".join(["0.05"] * DIMS) + "]"
    with app.app_context(), db.engine.connect() as conn:
        rows = conn.execute(
            text(
                f"EXPLAIN SELECT id FROM rag_chunks WHERE tenant_id = :t AND collection_id = :c "
                f"AND dimensions = {DIMS} ORDER BY embedding::vector({DIMS}) <=> '{vector}' LIMIT 5"
            ),
            {"t": tenant_id, "c": collection_id},
        ).all()
    return re.sub(r"'\[[-0-9.,e]+\]'", "'<query>'", "\n".join(r[0] for r in rows))


def plan_index(plan: str) -> str:
    """How the plan finds the rows: the index it scans, or a sequential scan."""
    found = re.search(r"Index Scan using (\w+)", plan) or re.search(r"Bitmap Index Scan on (\w+)", plan)
    return found.group(1) if found else ("seq scan" if "Seq Scan" in plan else "other")


def recall(app, store: str, items: list[dict[str, str]]) -> dict[str, Any]:
    client = app.test_client()
    tenant_id, key = api_key(app)
    collection = post(client, key, "/v1/collections", {"name": "numpy-docstrings"})
    started = time.perf_counter()
    relevant: dict[str, str] = {}
    chunks = 0
    for start in range(0, len(items), 16):
        batch = items[start : start + 16]
        docs = [{"text": i["document"], "metadata": {"function": i["function"]}} for i in batch]
        answer = post(client, key, f"/v1/collections/{collection['id']}/documents", {"documents": docs})
        for item, document in zip(batch, answer["data"], strict=True):
            relevant[item["function"]] = document["id"]
            chunks += document["chunk_count"]
    ingest_s = time.perf_counter() - started
    plan = ""
    if store == "pgvector":
        force_hnsw(app)
        plan = hnsw_plan(app, collection["id"], tenant_id)
        if "ix_rag_chunks_hnsw_384" not in plan:
            raise RuntimeError(f"the HNSW index is not used:\n{plan}")
    hits, ranks, latencies = 0, [], []
    for item in items:
        answer = post(
            client, key, f"/v1/collections/{collection['id']}/search", {"query": item["query"], "top_k": 5}
        )
        latencies.append(answer["timings"]["retrieval_ms"])
        found = [h["document_id"] for h in answer["data"]]
        if relevant[item["function"]] in found:
            hits += 1
            ranks.append(1 / (found.index(relevant[item["function"]]) + 1))
        else:
            ranks.append(0.0)
    return {
        "queries": len(items),
        "documents": len(items),
        "chunks": chunks,
        "recall_at_5": hits / len(items),
        "mrr_at_5": sum(ranks) / len(items),
        "ingest_s": round(ingest_s, 2),
        "retrieval_ms_p50": round(percentile(latencies, 50), 3),
        "plan": plan,
    }


# 2. latency at scale ---------------------------------------------------------------------------
def fill(app, tenant_id: str, size: int, rng: np.random.Generator) -> tuple[str, np.ndarray, float]:
    """A collection of `size` synthetic unit vectors, written in batches; returns id, vectors, seconds."""
    from sqlalchemy import insert, update

    from app.extensions import db
    from app.inference.rag.models import Chunk, Collection, Document

    vectors = rng.standard_normal((size, DIMS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    started = time.perf_counter()
    with app.app_context():
        collection = Collection(
            tenant_id=tenant_id, name=f"synthetic-{size}", embedding_model="all-minilm-l6-v2", dimensions=DIMS
        )
        db.session.add(collection)
        db.session.flush()
        document = Document(
            tenant_id=tenant_id,
            collection_id=collection.id,
            meta={},
            chars=0,
            chunk_count=size,
            text_sha256="",
        )
        db.session.add(document)
        db.session.commit()
        collection_id, document_id = collection.id, document.id
        for start in range(0, size, 2000):
            rows = [
                {
                    "id": uuid.uuid4().hex,
                    "tenant_id": tenant_id,
                    "collection_id": collection_id,
                    "document_id": document_id,
                    "ordinal": i,
                    "start_char": 0,
                    "end_char": 0,
                    "text": f"synthetic chunk {i}",
                    "meta": {"bucket": i % 10},
                    "dimensions": DIMS,
                    "embedding": vectors[i],
                }
                for i in range(start, min(size, start + 2000))
            ]
            db.session.execute(insert(Chunk), rows)
            db.session.commit()
        db.session.execute(
            update(Collection).where(Collection.id == collection_id).values(revision=1, chunk_count=size)
        )
        db.session.commit()
    return collection_id, vectors, time.perf_counter() - started


def measure(
    app, store: str, tenant_id: str, filled: dict[str, Any], queries: int, plan: str
) -> dict[str, Any]:
    """p50/p99 of the store's search over one filled collection, and its top 5 against exact."""
    from app.extensions import db
    from app.inference.rag.stores import vector_store

    collection_id, ids, vectors, noisy = filled["id"], filled["ids"], filled["vectors"], filled["queries"]
    with app.app_context():
        store_impl = vector_store()
        started = time.perf_counter()
        store_impl.search(db.session, tenant_id, collection_id, 1, noisy[0], 5, ())
        cold_ms = (time.perf_counter() - started) * 1000
        db.session.commit()
        latencies, overlap, found_source = [], [], []
        for query, source in zip(noisy[:queries], filled["picks"][:queries], strict=True):
            started = time.perf_counter()
            hits = store_impl.search(db.session, tenant_id, collection_id, 1, query, 5, ())
            latencies.append((time.perf_counter() - started) * 1000)
            db.session.commit()  # each search its own transaction, as each request is
            exact = set(ids[np.argsort(-(vectors @ query))[:5]])
            overlap.append(len(exact & {h.chunk_id for h in hits}) / 5)
            found_source.append(bool(hits) and hits[0].chunk_id == ids[source])
    result = {
        "store": store,
        "chunks": len(ids),
        "plan": plan,
        "fill_s": filled["fill_s"],
        "cold_ms": round(cold_ms, 3),
        "p50_ms": round(percentile(latencies, 50), 3),
        "p99_ms": round(percentile(latencies, 99), 3),
        "recall_at_5_vs_exact": round(float(np.mean(overlap)), 4),
        "source_first": round(float(np.mean(found_source)), 4),
        "queries": queries,
    }
    print(f"  {store} {len(ids):>7} chunks ({plan}): p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
    return result


def scale(app, store: str, sizes: list[int], queries: int) -> list[dict[str, Any]]:
    """Each size in a collection of its own, in one table. pgvector is measured twice: with the
    planner's choice, then with the HNSW index forced, so both figures are known."""
    from app.extensions import db
    from app.inference.rag.models import Chunk

    rng = np.random.default_rng(7)
    tenant_id, _ = api_key(app)
    collections = []
    for size in sizes:
        collection_id, vectors, fill_s = fill(app, tenant_id, size, rng)
        picks = rng.integers(0, size, queries)
        noisy = vectors[picks] + rng.normal(0, 0.02, (queries, DIMS)).astype(np.float32)
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        with app.app_context():
            stmt = db.select(Chunk.id).where(Chunk.collection_id == collection_id).order_by(Chunk.ordinal)
            ids = np.array(db.session.scalars(stmt).all())
        collections.append(
            {
                "id": collection_id,
                "ids": ids,
                "picks": picks,
                "vectors": vectors,
                "queries": noisy,
                "fill_s": round(fill_s, 2),
            }
        )
    results = []
    for filled in collections:
        plan = plan_index(hnsw_plan(app, filled["id"], tenant_id)) if store == "pgvector" else "numpy scan"
        results.append(measure(app, store, tenant_id, filled, queries, plan))
    if store == "pgvector":
        force_hnsw(app)
        for filled in collections:
            plan = plan_index(hnsw_plan(app, filled["id"], tenant_id))
            results.append(measure(app, store, tenant_id, filled, queries, f"{plan} (forced)"))
    return results


# 3. end to end --------------------------------------------------------------------------------------
def end_to_end(app, items: list[dict[str, str]], runs: int) -> dict[str, Any]:
    client = app.test_client()
    _, key = api_key(app)
    collection = post(client, key, "/v1/collections", {"name": "e2e"})
    docs = [{"text": i["document"], "metadata": {}} for i in items[:16]]
    post(client, key, f"/v1/collections/{collection['id']}/documents", {"documents": docs})
    parts: dict[str, list[float]] = {"wall_ms": [], "embed_ms": [], "retrieval_ms": [], "generation_ms": []}
    parts["total_ms"] = []
    for item in (items * runs)[:runs]:
        body = {
            "collection_id": collection["id"],
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": item["query"]}],
            "top_k": 2,
            "max_tokens": 32,
            "temperature": 0,
        }
        started = time.perf_counter()
        answer = post(client, key, "/v1/rag/chat", body)
        parts["wall_ms"].append((time.perf_counter() - started) * 1000)
        for name in ("embed_ms", "retrieval_ms", "generation_ms", "total_ms"):
            parts[name].append(answer["timings"][name])
    return {"runs": runs, **{f"{k}_p50": round(percentile(v, 50), 2) for k, v in parts.items()}}


# report ------------------------------------------------------------------------------------------
def report(result: dict[str, Any], quick: bool) -> str:
    command = "python -m bench.rag_bench" + (" --quick" if quick else "")
    lines = [
        "# RAG: retrieval quality, search latency, end to end" + (" (quick run)" if quick else ""),
        "",
        f"`{command}`, commit {result['commit']}, {result['date']}, {os.cpu_count()} cores "
        "(shared with other work). In process: the gateway's code, real SQLite, PostgreSQL 15 with "
        f"pgvector {result['pgvector_version']} and Redis, real all-MiniLM-L6-v2 and SmolLM2.",
        "",
        "## Recall@5 (numpy docstrings: the summary line asks, the rest of the docstring answers)",
        "",
        "| store | queries | chunks | recall@5 | MRR@5 | retrieval p50 (ms) | ingest (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for store, r in result["recall"].items():
        lines.append(
            f"| {store} | {r['queries']} | {r['chunks']} | {r['recall_at_5']:.3f} | {r['mrr_at_5']:.3f} "
            f"| {r['retrieval_ms_p50']} | {r['ingest_s']} |"
        )
    lines += [
        "",
        "pgvector's figure is the HNSW index's: the plan used (EXPLAIN) was",
        "",
        "```",
        result["recall"]["pgvector"]["plan"],
        "```",
        "",
        "## Search latency at scale (synthetic unit vectors; the store's search, query embedded)",
        "",
        "| store | chunks | plan | p50 (ms) | p99 (ms) | first search (ms) | source first "
        "| recall@5 vs exact | fill (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["scale"]:
        lines.append(
            f"| {r['store']} | {r['chunks']} | {r['plan']} | {r['p50_ms']} | {r['p99_ms']} | {r['cold_ms']} "
            f"| {r['source_first']:.3f} | {r['recall_at_5_vs_exact']:.3f} | {r['fill_s']} |"
        )
    e2e = result["end_to_end"]
    lines += [
        "",
        "The exact store's first search reads the collection into memory (`first search`); later ones",
        "scan the cached matrix. `plan` is PostgreSQL's choice for the collection's query: the HNSW",
        "index, or the (tenant, collection) btree and an exact sort when the planner prices that",
        "lower; `(forced)` rows repeat the run with the btree dropped and seq scans off. Every size",
        "is a collection of its own in one table, so a forced HNSW scan walks past the other",
        "collections' rows (iterative scan) to find this one's. Each query is a stored vector plus",
        "noise: `source first` is the share of queries whose top hit is that vector. Synthetic",
        "vectors are uniform on the sphere, where the 2nd to 5th neighbours are near ties among",
        "thousands of almost orthogonal vectors: the hardest case for HNSW's recall@5 against exact.",
        "",
        f"## RAG end to end (POST /v1/rag/chat, exact store, SmolLM2, top_k 2, max_tokens 32, "
        f"{e2e['runs']} runs)",
        "",
        "| part | p50 (ms) |",
        "|---|---|",
        f"| embed the question | {e2e['embed_ms_p50']} |",
        f"| retrieve | {e2e['retrieval_ms_p50']} |",
        f"| generate | {e2e['generation_ms_p50']} |",
        f"| total, as the response reports it | {e2e['total_ms_p50']} |",
        f"| total, client wall time | {e2e['wall_ms_p50']} |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about 2 minutes")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    queries = 40 if args.quick else 200
    sizes = [1_000, 10_000] if args.quick else [10_000, 100_000]
    items = evaluation_set(queries, max_chars=2_000 if args.quick else 4_000)
    result: dict[str, Any] = {
        "commit": git_commit(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": args.quick,
        "recall": {},
        "scale": [],
    }
    workdir = Path(tempfile.mkdtemp(prefix="gw-ragbench-"))
    for store in ("exact", "pgvector"):
        print(f"{store}: recall on {len(items)} queries")
        with gateway(store, workdir, with_chat=False) as app:
            result["recall"][store] = recall(app, store, items)
            if store == "pgvector":
                from sqlalchemy import text

                from app.extensions import db

                with app.app_context():
                    result["pgvector_version"] = db.session.execute(
                        text("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
                    ).scalar()
        print(f"  recall@5 {result['recall'][store]['recall_at_5']:.3f}")
        with gateway(store, workdir, with_chat=store == "exact") as app:
            result["scale"] += scale(app, store, sizes, queries=50 if args.quick else 500)
            if store == "exact":
                print("exact: RAG end to end")
                result["end_to_end"] = end_to_end(app, items, runs=5 if args.quick else 30)
    (out / "rag.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "RAG.md").write_text(report(result, args.quick))
    if not args.quick:
        from bench.report import with_companions

        with_companions(out)
    print((out / "RAG.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
