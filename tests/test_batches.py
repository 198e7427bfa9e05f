"""Batch jobs: OpenAI's Files and Batch APIs, lines run by Celery workers on Redis.

In-process (SQLite): the routes without Redis or without a worker (503), input validation (400
naming the line), the file size limit (413), tenant isolation (404), and the worker's line path
run in the test's own process, to pin down that a line delivered again is recorded and billed once.

With real processes (PostgreSQL, Redis, gunicorn+gevent, `python -m app.inference.batches.worker`,
the upstream simulator): 200 lines over 2 workers through the `openai` SDK; a worker SIGKILLed while
it runs a line; a cancel mid-batch.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from sqlalchemy import create_engine, func, select

from app.governance.audit.models import AuditRecord
from app.identity.models import TokenUsage
from app.inference.batches import queue
from app.inference.batches.models import BatchLine
from bench.upstream_sim import Simulator, pseudo_embedding, run_simulator
from config import normalise_database_url
from tests import support
from tests.support import ROOT, GunicornServer

CHAT = "/v1/chat/completions"
SIM_TOKENS = 16  # the simulator's completion length; max_tokens below cuts it


def catalogue(path: Path, models: dict[str, str]) -> str:
    entries = "".join(
        f"  - name: {name}\n    backend: openai_compatible\n    params:\n      base_url: {url}\n"
        "      model: sim-model\n      first_byte_timeout_s: 10\n      deadline_s: 20\n"
        "      breaker_fail_max: 1000\n    limits:\n      max_concurrency: 64\n"
        for name, url in models.items()
    )
    path.write_text("models:\n" + entries)
    return str(path)


def chat_line(n: int, model: str = "upstream-chat") -> dict[str, Any]:
    """Line n asks for (n % 16) + 1 tokens, so every answer is different and checkable."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"question {n}"}],
        "max_tokens": n % 16 + 1,
    }
    return {"custom_id": f"req-{n}", "method": "POST", "url": CHAT, "body": body}


def expected_content(n: int) -> str:
    return "".join(f"tok{i}" if i == 0 else f" tok{i}" for i in range(min(SIM_TOKENS, n % 16 + 1)))


def jsonl(items: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(item) + "\n" for item in items).encode()


def upload(client: Any, headers: dict[str, str], content: bytes, purpose: str = "batch") -> Any:
    return client.post(
        "/v1/files",
        headers=headers,
        data={"purpose": purpose, "file": (io.BytesIO(content), "input.jsonl")},
        content_type="multipart/form-data",
    )


def error(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error", "request_id"} and set(body["error"]) >= {"message", "type", "param", "code"}
    return body["error"]


def create(client: Any, headers: dict[str, str], file_id: str, endpoint: str = CHAT) -> Any:
    return client.post(
        "/v1/batches",
        headers=headers,
        json={"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"},
    )


# in-process ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sim() -> Any:
    with run_simulator(latency_ms=1) as simulator:
        yield simulator


@pytest.fixture(autouse=True)
def fresh_counts(sim: Simulator) -> None:
    sim.reset()


@pytest.fixture
def app_env(redis_url: str, sim: Simulator, tmp_path: Path) -> dict[str, str]:
    return {
        "BATCH_FILE_MAX_BYTES": "4096",
        "REDIS_URL": redis_url,
        "MODELS_CONFIG": catalogue(tmp_path / "models.yaml", {"upstream-chat": sim.base_url}),
        "MODELS_DIR": str(tmp_path),
    }


@pytest.fixture
def keys(database_url: str) -> dict[str, dict[str, str]]:
    return {
        tenant: {"Authorization": f"Bearer {support.issue_key(database_url, tenant)}"}
        for tenant in ("acme", "globex")
    }


@pytest.mark.parametrize("app_env", [{}], ids=["no-redis"])
def test_without_redis_the_batch_routes_say_so_and_files_still_work(client, keys):
    acme = keys["acme"]
    for resp in (create(client, acme, "file-x"), client.get("/v1/batches", headers=acme)):
        assert error(resp, 503)["code"] == "batch_queue_unavailable"
        assert "REDIS_URL" in resp.get_json()["error"]["message"]
    uploaded = upload(client, acme, jsonl([chat_line(1)]))
    assert uploaded.status_code == 200, uploaded.get_data(as_text=True)
    file_id = uploaded.get_json()["id"]
    assert client.get(f"/v1/files/{file_id}/content", headers=acme).data == jsonl([chat_line(1)])
    assert [f["id"] for f in client.get("/v1/files", headers=acme).get_json()["data"]] == [file_id]
    assert client.delete(f"/v1/files/{file_id}", headers=acme).get_json() == {
        "id": file_id,
        "object": "file",
        "deleted": True,
    }
    assert error(client.get(f"/v1/files/{file_id}", headers=acme), 404)


@pytest.mark.redis
def test_creating_a_batch_with_no_worker_running_is_a_clear_503(client, keys):
    file_id = upload(client, keys["acme"], jsonl([chat_line(1)])).get_json()["id"]
    resp = create(client, keys["acme"], file_id)
    assert error(resp, 503)["code"] == "batch_worker_unavailable"
    assert "make worker" in resp.get_json()["error"]["message"]
    assert client.get("/v1/batches", headers=keys["acme"]).get_json()["data"] == []  # nothing was created


BAD_FILES = {
    "not json": (
        b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n{oops\n',
        2,
    ),
    "method": (jsonl([{**chat_line(1), "method": "GET"}]), 1),
    "url": (jsonl([chat_line(1), {**chat_line(2), "url": "/v1/embeddings"}]), 2),
    "body": (jsonl([chat_line(1), chat_line(2), {**chat_line(3), "body": "hello"}]), 3),
    "duplicate": (jsonl([chat_line(1), chat_line(2), chat_line(1)]), 3),
    "custom_id": (jsonl([{**chat_line(1), "custom_id": ""}]), 1),
    "unknown key": (jsonl([{**chat_line(1), "extra": 1}]), 1),
}


@pytest.mark.redis
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_input_line_is_a_400_naming_it(client, keys, case):
    content, line = BAD_FILES[case]
    file_id = upload(client, keys["acme"], content).get_json()["id"]
    err = error(create(client, keys["acme"], file_id), 400)
    assert err["code"] == "invalid_batch_line" and err["param"] == "input_file_id"
    assert err["message"].startswith(f"Line {line}: "), err


@pytest.mark.redis
def test_other_input_file_problems(client, keys):
    acme = keys["acme"]
    empty = upload(client, acme, b"\n\n").get_json()["id"]
    assert error(create(client, acme, empty), 400)["code"] == "empty_file"
    assert error(create(client, acme, "file-missing"), 404)["param"] == "input_file_id"
    bad = client.post("/v1/batches", headers=acme, json={"input_file_id": empty, "endpoint": CHAT})
    assert error(bad, 400)["param"] == "completion_window"
    wrong = {"input_file_id": empty, "endpoint": "/v1/completions", "completion_window": "24h"}
    assert error(client.post("/v1/batches", headers=acme, json=wrong), 400)["param"] == "endpoint"
    assert error(upload(client, acme, b"{}", purpose="fine-tune"), 400)["param"] == "purpose"


@pytest.mark.redis
def test_a_file_past_the_size_limit_is_a_413(client, keys):
    err = error(upload(client, keys["acme"], b"x" * 5000), 413)  # BATCH_FILE_MAX_BYTES=4096 here
    assert "4096" in err["message"] and err["param"] == "file"
    err = error(upload(client, keys["acme"], b"x" * 200_000), 413)  # refused while the body is read
    assert "4096" in err["message"]
    assert upload(client, keys["acme"], b"x" * 4096).status_code == 200


@pytest.mark.redis
def test_another_tenants_files_are_not_found(client, keys):
    acme, globex = keys["acme"], keys["globex"]
    file_id = upload(client, acme, jsonl([chat_line(1)])).get_json()["id"]
    for resp in (
        client.get(f"/v1/files/{file_id}", headers=globex),
        client.get(f"/v1/files/{file_id}/content", headers=globex),
        client.delete(f"/v1/files/{file_id}", headers=globex),
        create(client, globex, file_id),
    ):
        assert error(resp, 404)
    assert client.get("/v1/files", headers=globex).get_json()["data"] == []
    assert client.get(f"/v1/files/{file_id}", headers=acme).status_code == 200


@pytest.mark.redis
def test_a_line_delivered_again_is_recorded_and_billed_once(app, client, keys, redis_url, sim):
    """The test process is the worker here: it announces itself, then runs the queue's work itself."""
    from app.extensions import db
    from app.inference.batches import execution

    acme = keys["acme"]
    queue.beat(redis.Redis.from_url(redis_url), "test-worker")
    file_id = upload(client, acme, jsonl([chat_line(n) for n in range(1, 4)])).get_json()["id"]
    batch = create(client, acme, file_id).get_json()
    assert batch["status"] == "in_progress" and batch["request_counts"] == {
        "total": 3,
        "completed": 0,
        "failed": 0,
    }
    with app.app_context():
        # Line 2's first worker died after claiming it: the claim is there, no result.
        row = db.session.get(BatchLine, (batch["id"], 2))
        row.attempts, row.started_at = 1, execution.utcnow()
        db.session.commit()
    for line in (1, 2, 3, 1, 2):  # lines 1 and 2 are delivered twice
        with app.app_context():
            execution.run_line(batch["id"], line)
    done = client.get(f"/v1/batches/{batch['id']}", headers=acme).get_json()
    assert done["status"] == "completed" and done["request_counts"] == {
        "total": 3,
        "completed": 3,
        "failed": 0,
    }
    output = [
        json.loads(line)
        for line in client.get(f"/v1/files/{done['output_file_id']}/content", headers=acme).data.splitlines()
    ]
    assert [o["custom_id"] for o in output] == ["req-1", "req-2", "req-3"]
    assert [o["response"]["body"]["choices"][0]["message"]["content"] for o in output] == [
        expected_content(n) for n in (1, 2, 3)
    ]
    assert sim.stats()["by_path"][CHAT] == 3
    with app.app_context():
        attempts = db.session.scalars(
            select(BatchLine.attempts).where(BatchLine.batch_id == batch["id"]).order_by(BatchLine.line)
        )
        assert list(attempts) == [1, 2, 1]
        billed = db.session.scalar(select(func.sum(TokenUsage.tokens)))
    assert billed == sum(o["response"]["body"]["usage"]["total_tokens"] for o in output)


def run_all(app: Any, batch_id: str, count: int) -> None:
    """Deliver every line once, in order, as a worker would (the test process is the worker)."""
    from app.inference.batches import execution

    for line in range(1, count + 1):
        with app.app_context():
            execution.run_line(batch_id, line)


def results(client: Any, headers: dict[str, str], batch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = {}
    for file_id in (batch["output_file_id"], batch["error_file_id"]):
        if file_id is not None:
            content = client.get(f"/v1/files/{file_id}/content", headers=headers).data
            found |= {item["custom_id"]: item for item in map(json.loads, content.splitlines())}
    return found


@pytest.mark.redis
def test_policy_and_quota_apply_per_line(app, client, keys, database_url, redis_url, sim):
    """A line the tenant's policy blocks, and lines past the tenant's token quota, fail on their
    own (in the error file) while the others are answered; only answered lines are billed."""
    queue.beat(redis.Redis.from_url(redis_url), "test-worker")
    admin = {"Authorization": f"Bearer {support.issue_key(database_url, 'acme', ('governance:write',))}"}
    policy = {"rules": {"pii": {"email": "block"}}}
    assert client.put("/v1/governance/policies", headers=admin, json=policy).status_code == 201
    leaking = {
        **chat_line(2),
        "body": {**chat_line(2)["body"], "messages": [{"role": "user", "content": "a@b.com"}]},
    }
    items = [chat_line(1), leaking, chat_line(3)]
    batch = create(
        client, keys["acme"], upload(client, keys["acme"], jsonl(items)).get_json()["id"]
    ).get_json()
    run_all(app, batch["id"], 3)
    done = client.get(f"/v1/batches/{batch['id']}", headers=keys["acme"]).get_json()
    assert done["status"] == "completed" and done["request_counts"] == {
        "total": 3,
        "completed": 2,
        "failed": 1,
    }
    found = results(client, keys["acme"], done)
    blocked = found["req-2"]["response"]
    assert (
        blocked["status_code"] == 400 and blocked["body"]["error"]["code"] and found["req-2"]["error"] is None
    )
    assert sim.stats()["by_path"][CHAT] == 2  # the blocked line never reached the model

    # 60 tokens a day; each line reserves 34 (18 bytes of prompt + 8, and max_tokens 16) and uses 18.
    quota = {"Authorization": f"Bearer {support.issue_key(database_url, 'initech', token_quota=60)}"}
    items = [{**chat_line(15), "custom_id": f"q{n}"} for n in range(4)]
    batch = create(client, quota, upload(client, quota, jsonl(items)).get_json()["id"]).get_json()
    run_all(app, batch["id"], 4)
    done = client.get(f"/v1/batches/{batch['id']}", headers=quota).get_json()
    assert done["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    found = results(client, quota, done)
    assert [found[f"q{n}"]["response"]["status_code"] for n in range(4)] == [200, 200, 429, 429]
    assert found["q3"]["response"]["body"]["error"]["code"] == "insufficient_quota"
    answered = sum(found[f"q{n}"]["response"]["body"]["usage"]["total_tokens"] for n in range(2))
    with app.app_context():
        from app.extensions import db
        from app.identity.models import Tenant

        tenant = db.session.scalar(select(Tenant.id).where(Tenant.name == "initech"))
        assert db.session.scalar(select(TokenUsage.tokens).where(TokenUsage.tenant_id == tenant)) == answered


@pytest.mark.redis
def test_an_embeddings_batch_answers_as_the_route_does(app, client, keys, redis_url):
    queue.beat(redis.Redis.from_url(redis_url), "test-worker")
    texts = ["first text", "second text", "a third"]
    items = [
        {
            "custom_id": f"e{n}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "upstream-chat", "input": text},
        }
        for n, text in enumerate(texts)
    ]
    file_id = upload(client, keys["acme"], jsonl(items)).get_json()["id"]
    batch = create(client, keys["acme"], file_id, endpoint="/v1/embeddings").get_json()
    run_all(app, batch["id"], 3)
    done = client.get(f"/v1/batches/{batch['id']}", headers=keys["acme"]).get_json()
    assert done["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    found = results(client, keys["acme"], done)
    for n, text in enumerate(texts):
        direct = client.post("/v1/embeddings", headers=keys["acme"], json=items[n]["body"]).get_json()
        body = found[f"e{n}"]["response"]["body"]
        assert body["object"] == "list" and body["usage"] == direct["usage"]
        assert body["data"][0]["embedding"] == pytest.approx(pseudo_embedding(text, 384), rel=1e-6)
        assert body["data"][0]["embedding"] == direct["data"][0]["embedding"]


# real processes ------------------------------------------------------------------------------
class Worker:
    """`python -m app.inference.batches.worker`, in a process group of its own (its pool with it)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.log_path = log
        with open(log, "wb") as out:  # the child has its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app.inference.batches.worker"],
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


class Stack:
    """A 2-worker gunicorn gateway and N batch workers on one PostgreSQL and one Redis."""

    def __init__(self, tmp_path: Path, database_url: str, redis_url: str, models: dict[str, str]) -> None:
        self.tmp_path = tmp_path
        self.env = {
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "MODELS_CONFIG": catalogue(tmp_path / "models.yaml", models),
            "MODELS_DIR": str(tmp_path),
            "INSTANCE_PATH": str(tmp_path / "instance"),
            "RATE_LIMIT_DEFAULT": "1000000/minute",
            "BATCH_VISIBILITY_TIMEOUT": "8",
            "LOG_FORMAT": "json",
        }
        self.redis = redis.Redis.from_url(redis_url)
        self.workers: list[Worker] = []
        self.server = GunicornServer(self.env)

    def __enter__(self) -> Stack:
        self.server.__enter__()
        return self

    def start_workers(self, count: int) -> None:
        for _ in range(count):
            n = len(self.workers)
            env = {**self.env, "PROMETHEUS_MULTIPROC_DIR": str(self.tmp_path / f"prom-worker-{n}")}
            self.workers.append(Worker(env, self.tmp_path / f"worker-{n}.log"))
        deadline = time.monotonic() + 120
        while queue.workers_alive(self.redis) < len(self.workers):
            assert time.monotonic() < deadline, self.logs()
            assert all(w.proc.poll() is None for w in self.workers), self.logs()
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(w.log_path.read_text(errors="replace")[-3000:] for w in self.workers)

    def __exit__(self, *exc: object) -> None:
        for worker in self.workers:
            worker.stop()
        self.server.__exit__()


def http(stack: Stack, key: str) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {key}"
    return session


def submit(stack: Stack, session: requests.Session, items: list[dict[str, Any]]) -> dict[str, Any]:
    uploaded = session.post(
        stack.server.url + "/v1/files",
        files={"file": ("in.jsonl", jsonl(items))},
        data={"purpose": "batch"},
        timeout=30,
    )
    assert uploaded.status_code == 200, uploaded.text
    body = {"input_file_id": uploaded.json()["id"], "endpoint": CHAT, "completion_window": "24h"}
    created = session.post(stack.server.url + "/v1/batches", json=body, timeout=30)
    assert created.status_code == 200, created.text
    return created.json()


def wait_for(
    stack: Stack, session: requests.Session, batch_id: str, done: Any, timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        batch = session.get(f"{stack.server.url}/v1/batches/{batch_id}", timeout=10).json()
        if done(batch):
            return batch
        assert time.monotonic() < deadline, f"{batch}\n{stack.logs()}"
        time.sleep(0.1)


def file_lines(session: requests.Session, url: str, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    resp = session.get(f"{url}/v1/files/{file_id}/content", timeout=10)
    assert resp.status_code == 200
    return [json.loads(line) for line in resp.text.splitlines()]


def ledger_total(database_url: str) -> int:
    engine = create_engine(normalise_database_url("DATABASE_URL", database_url))
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.sum(TokenUsage.tokens), 0))).scalar())
    finally:
        engine.dispose()


def line_attempts(database_url: str, batch_id: str) -> list[int]:
    engine = create_engine(normalise_database_url("DATABASE_URL", database_url))
    try:
        with engine.connect() as conn:
            return sorted(
                conn.execute(select(BatchLine.attempts).where(BatchLine.batch_id == batch_id)).scalars()
            )
    finally:
        engine.dispose()


@pytest.mark.server
@pytest.mark.postgres
@pytest.mark.redis
def test_200_lines_over_two_workers_through_the_openai_sdk(postgres_url, redis_url, tmp_path):
    import openai

    with (
        run_simulator(latency_ms=2) as upstream,
        Stack(tmp_path, postgres_url, redis_url, {"upstream-chat": upstream.base_url}) as stack,
    ):
        key = support.issue_key(postgres_url, "acme")
        other = support.issue_key(postgres_url, "globex")
        stack.start_workers(2)
        sdk = openai.OpenAI(base_url=stack.server.url + "/v1", api_key=key, max_retries=0)
        items = [chat_line(n) for n in range(200)]
        uploaded = sdk.files.create(file=("input.jsonl", jsonl(items)), purpose="batch")
        batch = sdk.batches.create(
            input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h", metadata={"run": "test"}
        )
        assert batch.status == "in_progress" and batch.request_counts.total == 200
        deadline = time.monotonic() + 180
        while (batch := sdk.batches.retrieve(batch.id)).status != "completed":
            assert batch.status == "in_progress" and time.monotonic() < deadline, f"{batch}\n{stack.logs()}"
            time.sleep(0.2)
        assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
            200,
            200,
            0,
        )
        assert batch.metadata == {"run": "test"} and batch.error_file_id is None
        assert batch.completed_at >= batch.in_progress_at >= batch.created_at
        output = [json.loads(line) for line in sdk.files.content(batch.output_file_id).text.splitlines()]
        assert sorted(o["custom_id"] for o in output) == sorted(
            i["custom_id"] for i in items
        )  # each exactly once
        for item in output:
            n = int(item["custom_id"].removeprefix("req-"))
            assert item["error"] is None and item["response"]["status_code"] == 200
            body = item["response"]["body"]
            assert body["object"] == "chat.completion" and body["model"] == "upstream-chat"
            assert body["choices"][0]["message"]["content"] == expected_content(n)
            assert body["usage"]["completion_tokens"] == min(SIM_TOKENS, n % 16 + 1)
        assert upstream.stats()["by_path"][CHAT] == 200
        # The usage ledger holds every line's tokens once, the moment the batch is complete.
        assert ledger_total(postgres_url) == sum(
            o["response"]["body"]["usage"]["total_tokens"] for o in output
        )
        assert support.metric(stack.server.url, "gateway_batch_requests", state="completed") == 200
        assert support.metric(stack.server.url, "gateway_batches", status="completed") == 1
        # Another tenant can't see it.
        outsider = http(stack, other)
        assert outsider.get(f"{stack.server.url}/v1/batches/{batch.id}", timeout=10).status_code == 404
        assert (
            outsider.get(
                f"{stack.server.url}/v1/files/{batch.output_file_id}/content", timeout=10
            ).status_code
            == 404
        )
        assert outsider.get(f"{stack.server.url}/v1/batches", timeout=10).json()["data"] == []
        # One audit record per line, written by the workers.
        engine = create_engine(normalise_database_url("DATABASE_URL", postgres_url))
        deadline = time.monotonic() + 20
        with engine.connect() as conn:
            query = select(func.count()).select_from(AuditRecord).where(AuditRecord.endpoint == CHAT)
            while (audited := conn.execute(query).scalar()) < 200 and time.monotonic() < deadline:
                time.sleep(0.2)
        engine.dispose()
        assert audited == 200


@pytest.mark.server
@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.fault
def test_a_worker_killed_mid_line_the_line_runs_again_once(postgres_url, redis_url, tmp_path):
    with (
        run_simulator(latency_ms=3000) as slow,
        Stack(tmp_path, postgres_url, redis_url, {"slow-chat": slow.base_url}) as stack,
    ):
        session = http(stack, support.issue_key(postgres_url, "acme"))
        stack.start_workers(2)
        batch = submit(stack, session, [chat_line(n, "slow-chat") for n in range(6)])
        deadline = time.monotonic() + 60
        while slow.stats()["in_flight"] < 2:  # each worker is waiting on its line's upstream call
            assert time.monotonic() < deadline, stack.logs()
            time.sleep(0.05)
        stack.workers[0].kill()
        assert (
            session.get(f"{stack.server.url}/v1/batches/{batch['id']}", timeout=10).json()["status"]
            == "in_progress"
        )
        done = wait_for(stack, session, batch["id"], lambda b: b["status"] != "in_progress", 120)
        assert done["status"] == "completed", done
        assert done["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
        output = file_lines(session, stack.server.url, done["output_file_id"])
        assert sorted(o["custom_id"] for o in output) == sorted(f"req-{n}" for n in range(6))
        # The line in flight reached the upstream twice (the kill, then the retry) and was recorded once.
        assert slow.stats()["by_path"][CHAT] == 7
        assert line_attempts(postgres_url, batch["id"]) == [1, 1, 1, 1, 1, 2]
        assert ledger_total(postgres_url) == sum(
            o["response"]["body"]["usage"]["total_tokens"] for o in output
        )


@pytest.mark.server
@pytest.mark.postgres
@pytest.mark.redis
def test_cancel_mid_batch_stops_within_seconds(postgres_url, redis_url, tmp_path):
    with (
        run_simulator(latency_ms=300) as upstream,
        Stack(tmp_path, postgres_url, redis_url, {"upstream-chat": upstream.base_url}) as stack,
    ):
        session = http(stack, support.issue_key(postgres_url, "acme"))
        stack.start_workers(1)
        batch = submit(stack, session, [chat_line(n) for n in range(40)])
        wait_for(stack, session, batch["id"], lambda b: b["request_counts"]["completed"] >= 3, 60)
        asked = time.monotonic()
        cancelling = session.post(f"{stack.server.url}/v1/batches/{batch['id']}/cancel", timeout=10)
        assert cancelling.status_code == 200 and cancelling.json()["status"] in ("cancelling", "cancelled")
        done = wait_for(stack, session, batch["id"], lambda b: b["status"] == "cancelled", 10)
        took = time.monotonic() - asked
        assert took < 5, took
        ran = upstream.stats()["by_path"][CHAT]
        time.sleep(2)  # would the worker go on with the queued lines?
        assert upstream.stats()["by_path"][CHAT] == ran
        counts = done["request_counts"]
        assert counts["completed"] + counts["failed"] == ran < 40 and counts["failed"] == 0
        assert done["cancelled_at"] >= done["cancelling_at"]
        assert len(file_lines(session, stack.server.url, done["output_file_id"])) == ran
        again = session.post(f"{stack.server.url}/v1/batches/{batch['id']}/cancel", timeout=10)
        assert again.status_code == 200 and again.json()["status"] == "cancelled"
        print(f"BATCH cancel: cancelled {took:.2f}s after the request, {ran} of 40 lines ran")
