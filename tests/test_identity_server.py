"""Revocation across processes: revoked through one gunicorn instance, refused by the other at once.

Two instances (one gevent worker each) share the database and Redis, exactly as two workers of
one master or two machines do. Each is driven explicitly, so no assertion depends on which
worker the kernel hands a connection to.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import openai
import pytest
import requests
from sqlalchemy import update

from tests import support
from tests.support import GunicornServer
from tests.test_identity import PASSWORD, World, bearer, seed

pytestmark = pytest.mark.server

BURST = 24


class Pair(NamedTuple):
    first: GunicornServer
    second: GunicornServer
    world: World


@pytest.fixture(scope="module")
def served(sqlite_template: str, tmp_path_factory: pytest.TempPathFactory):
    """Two servers for the module: seeding and starting them are the slow part."""
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
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
    with GunicornServer(env, workers=1) as first, GunicornServer(env, workers=1) as second:
        yield Pair(first, second, world)
        for server in (first, second):
            assert "Traceback" not in server.log() and '"level": "error"' not in server.log()


def burst(server: GunicornServer, token: str) -> set[int]:
    """The statuses of BURST concurrent requests on fresh connections."""

    def call(_: int) -> int:
        headers = {**bearer(token), "Connection": "close"}
        return requests.get(server.url + "/v1/auth/me", headers=headers, timeout=30).status_code

    with ThreadPoolExecutor(BURST) as pool:
        return set(pool.map(call, range(BURST)))


def codes(server: GunicornServer, token: str) -> set[str]:
    return {
        requests.get(server.url + "/v1/auth/me", headers=bearer(token), timeout=30).json()["error"]["code"]
    }


def test_revoked_jwt_is_refused_by_every_instance(served: Pair):
    first, second, _ = served
    form = {"grant_type": "password", "username": "alice", "password": PASSWORD}
    tokens = requests.post(first.url + "/v1/auth/token", data=form, timeout=30).json()
    access = tokens["access_token"]
    assert burst(first, access) == burst(second, access) == {200}

    revoke = requests.post(first.url + "/v1/auth/revoke", headers=bearer(access), timeout=30)
    assert revoke.json() == {"revoked": ["access", "refresh"]}

    assert burst(second, access) == burst(first, access) == {401}
    assert codes(second, access) == {"token_revoked"}
    refresh = requests.post(
        second.url + "/v1/auth/refresh", headers=bearer(tokens["refresh_token"]), timeout=30
    )
    assert refresh.status_code == 401 and refresh.json()["error"]["code"] == "token_revoked"


def test_revoked_api_key_is_refused_by_every_instance_at_once(served: Pair):
    """Both instances have the key in their verified-key cache; the revision bump empties both."""
    first, second, world = served
    assert burst(first, world.a_inference_key) == burst(second, world.a_inference_key) == {200}
    created = requests.post(
        first.url + "/v1/governance/keys", headers=bearer(world.a_key), json={"name": "doomed"}, timeout=30
    ).json()
    key = created["key"]
    assert burst(first, key) == burst(second, key) == {200}  # cached on both

    revoke = requests.post(
        first.url + f"/v1/governance/keys/{created['id']}/revoke", headers=bearer(world.a_key), timeout=30
    )
    assert revoke.status_code == 200 and revoke.json()["revoked_at"]

    assert burst(second, key) == burst(first, key) == {401}
    assert codes(second, key) == {"invalid_api_key"}
    # The tenant's other key, cached on both instances too, still works.
    assert burst(second, world.a_inference_key) == burst(first, world.a_inference_key) == {200}


def test_openai_sdk_with_a_revoked_key_raises_authentication_error(served: Pair):
    """Acceptance 5: the official SDK works with a gateway key, and maps its revocation to the
    SDK's AuthenticationError (a 401 in OpenAI's error shape), not a generic APIError."""
    server, _, world = served
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
