"""Revocation on a real gunicorn with 2 gevent workers: revoked through one worker, refused by all.

Requests go out on fresh connections in concurrent bursts so both workers accept some; the JSON
access log (`pid`, `request_id`) shows which worker served each, and so that the revocation did
not just happen to land on the worker that later refused the credential.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from sqlalchemy import update

from tests import support
from tests.support import GunicornServer
from tests.test_identity import PASSWORD, World, bearer, seed

pytestmark = pytest.mark.server

BURST = 48


@pytest.fixture(scope="module")
def served(sqlite_template: str, tmp_path_factory: pytest.TempPathFactory):
    """One server for the module: seeding and starting it are the slow part."""
    redis_url = support.require_service("TEST_REDIS_URL")
    support.flush_redis(redis_url)
    database_url = support.copy_sqlite(sqlite_template, tmp_path_factory.mktemp("served") / "test.db")
    from app import create_app
    from app.extensions import db
    from app.identity.models import Tenant

    with support.environ(DATABASE_URL=database_url, REDIS_URL=redis_url):
        app = create_app()
    world = seed(app)
    with app.app_context():
        # The bursts below must measure revocation, not acme's default rate limit.
        db.session.execute(update(Tenant).values(rate_limit="100000/minute"))
        db.session.commit()
        db.engine.dispose()
    with GunicornServer({"DATABASE_URL": database_url, "REDIS_URL": redis_url}, workers=2) as server:
        yield server, world
        assert "Traceback" not in server.log() and '"level": "error"' not in server.log()


def burst(server: GunicornServer, token: str, tag: str) -> list[requests.Response]:
    def call(i: int) -> requests.Response:
        headers = {**bearer(token), "Connection": "close", "X-Request-ID": f"{tag}-{i}"}
        return requests.get(server.url + "/v1/auth/me", headers=headers, timeout=30)

    with ThreadPoolExecutor(BURST) as pool:
        return list(pool.map(call, range(BURST)))


def pids(server: GunicornServer, tag: str) -> set[int]:
    found = set()
    for line in server.log().splitlines():
        if '"event": "request"' in line:
            entry = json.loads(line)
            if str(entry.get("request_id", "")).startswith(f"{tag}-"):
                found.add(entry["pid"])
    return found


def burst_until_both_workers_served(server: GunicornServer, token: str, tag: str) -> list[requests.Response]:
    responses: list[requests.Response] = []
    for round_ in range(5):
        responses += burst(server, token, f"{tag}{round_}")
        if len(set().union(*(pids(server, f"{tag}{r}") for r in range(round_ + 1)))) == 2:
            return responses
    pytest.fail(f"one worker served every {tag} request")


def test_revoked_jwt_is_refused_by_every_worker(served: tuple[GunicornServer, World]):
    server, _ = served
    form = {"grant_type": "password", "username": "alice", "password": PASSWORD}
    tokens = requests.post(server.url + "/v1/auth/token", data=form, timeout=30).json()
    access = tokens["access_token"]
    assert {r.status_code for r in burst_until_both_workers_served(server, access, "jwt-warm")} == {200}

    revoke = requests.post(
        server.url + "/v1/auth/revoke",
        headers={**bearer(access), "X-Request-ID": "jwt-revoke-0", "Connection": "close"},
        timeout=30,
    )
    assert revoke.json() == {"revoked": ["access", "refresh"]}
    (revoking_worker,) = pids(server, "jwt-revoke")

    refused = burst_until_both_workers_served(server, access, "jwt-after")
    assert {r.status_code for r in refused} == {401}
    assert {r.json()["error"]["code"] for r in refused} == {"token_revoked"}
    other_workers = set().union(*(pids(server, f"jwt-after{r}") for r in range(5))) - {revoking_worker}
    assert other_workers, "the other worker must have refused the token too"
    refresh = requests.post(
        server.url + "/v1/auth/refresh", headers=bearer(tokens["refresh_token"]), timeout=30
    )
    assert refresh.status_code == 401 and refresh.json()["error"]["code"] == "token_revoked"


def test_revoked_api_key_is_refused_by_every_worker_at_once(served: tuple[GunicornServer, World]):
    """Both workers have the key in their verified-key cache; the revision bump empties both."""
    server, world = served
    assert {
        r.status_code for r in burst_until_both_workers_served(server, world.a_inference_key, "key-warm")
    } == {200}
    created = requests.post(
        server.url + "/v1/governance/keys",
        headers={**bearer(world.a_key), "Connection": "close"},
        json={"name": "doomed"},
        timeout=30,
    ).json()
    key = created["key"]
    assert {r.status_code for r in burst_until_both_workers_served(server, key, "new-warm")} == {200}

    revoke = requests.post(
        server.url + f"/v1/governance/keys/{created['id']}/revoke",
        headers={**bearer(world.a_key), "X-Request-ID": "key-revoke-0", "Connection": "close"},
        timeout=30,
    )
    assert revoke.status_code == 200 and revoke.json()["revoked_at"]
    (revoking_worker,) = pids(server, "key-revoke")

    refused = burst_until_both_workers_served(server, key, "key-after")
    assert {r.status_code for r in refused} == {401}
    assert {r.json()["error"]["code"] for r in refused} == {"invalid_api_key"}
    assert set().union(*(pids(server, f"key-after{r}") for r in range(5))) - {revoking_worker}
    # The tenant's other key, cached on both workers too, still works.
    assert {r.status_code for r in burst(server, world.a_inference_key, "key-other")} == {200}


def test_openai_sdk_with_a_revoked_key_raises_authentication_error(served: tuple[GunicornServer, World]):
    """Acceptance 5: the official SDK works with a gateway key, and maps its revocation to the
    SDK's AuthenticationError (a 401 in OpenAI's error shape), not a generic APIError."""
    server, world = served
    created = requests.post(
        server.url + "/v1/governance/keys",
        headers=bearer(world.a_key),
        json={"name": "sdk", "scopes": ["models:read"]},
        timeout=30,
    ).json()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=created["key"], max_retries=0, timeout=30)
    assert client.models.list().object == "list"  # authenticated (this server's catalogue is empty)
    revoke = requests.post(
        server.url + f"/v1/governance/keys/{created['id']}/revoke", headers=bearer(world.a_key), timeout=30
    )
    assert revoke.status_code == 200
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert info.value.body["type"] == "authentication_error"
