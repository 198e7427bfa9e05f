"""A blocked client's flood, refused by the gunicorn worker before gunicorn's HTTP parser
(gunicorn_worker.py), on a real gunicorn + gevent worker and real Redis.

The worker's own answers are told from gunicorn's by the `Server: gunicorn` header, which gunicorn
adds to everything it answers and the worker's refusal does not. Requests are sent on raw sockets,
pipelined where it matters, so what is asserted is what happens on one connection.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

import pytest
import requests

from tests import support
from tests.support import GunicornServer
from tests.test_identity import World, bearer, seed

pytestmark = pytest.mark.server

FORGED_SECRET = "A" * 43
ATTACKER = "127.0.0.7"  # loopback: any 127/8 address is this machine's
OWNER = "127.0.0.8"
LIMIT = 5


class Served(NamedTuple):
    server: GunicornServer
    world: World


class Answer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes


@pytest.fixture(scope="module")
def served(sqlite_template: str, tmp_path_factory: pytest.TempPathFactory):
    redis_url = support.require_service("TEST_REDIS_URL")
    support.flush_redis(redis_url)
    database_url = support.copy_sqlite(sqlite_template, tmp_path_factory.mktemp("flood") / "test.db")
    from app import create_app

    with support.environ(DATABASE_URL=database_url, REDIS_URL=redis_url):
        world = seed(create_app())
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "AUTH_FAILURE_LIMIT_PER_ADDRESS": f"{LIMIT}/minute",
        "AUTH_KEY_CACHE_TTL": "300",
    }
    with GunicornServer(env, workers=1) as server:
        yield Served(server, world)
        assert "Traceback" not in server.log()


def connect(server: GunicornServer, source: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10, source_address=(source, 0))
    return sock


def request(key: str, extra: str = "", body: bytes = b"") -> bytes:
    head = (
        f"GET /v1/auth/me HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {key}\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def read_answer(reader) -> Answer:
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers: dict[str, str] = {}
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(status_line.split()[1]), headers, reader.read(int(headers["content-length"])))


def exchange(server: GunicornServer, source: str, payload: bytes, answers: int) -> list[Answer]:
    with connect(server, source) as sock, sock.makefile("rb") as reader:
        sock.sendall(payload)
        return [read_answer(reader) for _ in range(answers)]


def early_refusals(server: GunicornServer) -> float:
    text = requests.get(server.url + "/metrics", timeout=10).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("gateway_auth_throttled_early_total")
    )


def assert_throttled(answer: Answer) -> dict:
    import json

    assert answer.status == 429, answer
    body = json.loads(answer.body)
    assert body["error"]["code"] == "auth_failures_throttled"
    assert body["error"]["type"] == "rate_limit_error"
    assert body["request_id"] == answer.headers["x-request-id"]
    assert 0 < int(answer.headers["retry-after"]) <= 60
    return body


def test_a_blocked_flood_is_refused_before_gunicorns_parser(served: Served):
    server, world = served
    forged = f"{world.a_prefix}_{FORGED_SECRET}"
    # The valid key is verified (and cached by the worker) from the owner's address.
    owner = requests.get(server.url + "/v1/auth/me", headers=bearer(world.a_key), timeout=10)
    assert owner.status_code == 200
    # Five failures, then the app learns the block, then the WSGI-level early refusal: all on one
    # connection, through gunicorn, which the last answer closes.
    answers = exchange(server, ATTACKER, request(forged) * (LIMIT + 2), LIMIT + 2)
    assert [a.status for a in answers] == [401] * LIMIT + [429, 429]
    assert all(a.headers["server"] == "gunicorn" for a in answers)
    assert answers[-1].headers["connection"] == "close"
    assert_throttled(answers[-1])

    before = early_refusals(server)
    # A new connection: two refused by the worker itself (kept alive, the client's request id
    # kept), then the owner's cached key from the same address, served by the app on the same
    # connection: the worker handed it over at the request boundary.
    payload = (
        request(forged) + request(forged, "X-Request-ID: flood-probe-7\r\n", b"{}") + request(world.a_key)
    )
    first, second, served_owner = exchange(server, ATTACKER, payload, 3)
    for answer in (first, second):
        assert_throttled(answer)
        assert "server" not in answer.headers, "refused by the worker, before gunicorn's parser"
        assert answer.headers["connection"] == "keep-alive"
    assert second.headers["x-request-id"] == "flood-probe-7"
    assert served_owner.status == 200 and served_owner.headers["server"] == "gunicorn"
    assert early_refusals(server) == before + 2


def test_what_the_worker_does_not_frame_goes_to_gunicorn(served: Served):
    """A chunked body, a head the parser rejects, HTTP/1.0: gunicorn's own path still answers."""
    server, world = served
    forged = f"{world.a_prefix}_{FORGED_SECRET}"
    exchange(server, ATTACKER, request(forged) * (LIMIT + 1), LIMIT + 1)  # blocked (again) for sure

    chunked = (
        f"POST /v1/auth/me HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {forged}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
    ).encode()
    (answer,) = exchange(server, ATTACKER, chunked, 1)
    assert_throttled(answer)
    assert answer.headers["server"] == "gunicorn"

    (answer,) = exchange(server, ATTACKER, b"GET /v1/auth/me HTTP/1.1\r\nBad Header\r\n\r\n", 1)
    assert answer.status == 400  # gunicorn's own answer to a malformed head

    http10 = f"GET /v1/auth/me HTTP/1.0\r\nAuthorization: Bearer {forged}\r\n\r\n".encode()
    with connect(server, ATTACKER) as sock, sock.makefile("rb") as reader:
        sock.sendall(http10)
        answer = read_answer(reader)
        assert reader.read() == b"", "an HTTP/1.0 refusal closes the connection"
    assert_throttled(answer)
    assert answer.headers["connection"] == "close" and "server" not in answer.headers

    # Another address is not blocked: its bad secret is verified by the app (401), not refused.
    (answer,) = exchange(server, OWNER, request(forged), 1)
    assert answer.status == 401
