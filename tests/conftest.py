"""flaskr-style fixtures: `app`, `client`, `runner`, with a fresh database per test.

PostgreSQL and Redis tests use TEST_DATABASE_URL / TEST_REDIS_URL. Locally they skip when
those are unset; under CI=true they fail instead, so a missing service can't pass silently.
"""

from __future__ import annotations

import os
import tempfile

# Before anything imports prometheus_client: every process of a test run writes its metric
# samples here, as the gunicorn workers do in production.
os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gw-prom-")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["APP_ENV"] = "testing"
os.environ.pop("DATABASE_URL", None)
os.environ.pop("REDIS_URL", None)

import pytest

from tests import support


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Migrate once; each test copies the file, which is much faster than re-running Alembic."""
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    support.migrate(f"sqlite:///{path}")
    return str(path)


@pytest.fixture(scope="session")
def postgres_template():
    base = support.require_service("TEST_DATABASE_URL")
    url = support.create_postgres_template(base)
    yield url
    support.drop_postgres_database(url)  # a shared server must not collect one per test run


@pytest.fixture
def sqlite_url(sqlite_template: str, tmp_path) -> str:
    return support.copy_sqlite(sqlite_template, tmp_path / "test.db")


@pytest.fixture
def postgres_url(postgres_template: str):
    url = support.create_postgres_database(postgres_template)
    yield url
    support.drop_postgres_database(url)


@pytest.fixture
def redis_url() -> str:
    url = support.require_service("TEST_REDIS_URL")
    support.flush_redis(url)
    return url


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """The default engine; tests that must hold on both engines use `any_database_url`."""
    return sqlite_url


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database_url(request: pytest.FixtureRequest) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "postgres_url")


@pytest.fixture
def app_env() -> dict[str, str]:
    """Extra environment for the app under test; override in a module to change settings."""
    return {}


@pytest.fixture
def app(database_url: str, app_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", database_url)
    # The spool and the journal of this test's app, unless the test places its instance folder:
    # a test client leaves unclosed responses journalled, and no later run has this test's
    # database to recover them into.
    if "INSTANCE_PATH" not in app_env:
        monkeypatch.setenv("AUDIT_SPOOL_DIR", str(tmp_path / "audit-spool"))
    for key, value in app_env.items():
        monkeypatch.setenv(key, value)
    from app import create_app

    application = create_app()
    yield application
    from app.governance import audit

    audit.shutdown(application)  # nothing left to spool into instance/ once the database is gone
    application.extensions["usage_ledger"].close()
    drift = application.extensions.get("drift")
    if drift is not None:
        drift.stop()  # its refresh loop would go on writing into the next test's Redis
    with application.app_context():
        from app.extensions import db

        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture(scope="session")
def browser():
    """Debian's chromium through Playwright; under CI a missing chromium fails, never skips."""
    from pathlib import Path

    from tests.browser import CHROMIUM

    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"chromium not found at {CHROMIUM} (.ci/run installs Debian's chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield instance
        instance.close()


@pytest.fixture
def artifacts():
    """Where browser tests keep their screenshots: TEST_ARTIFACTS_DIR (CI), else a temp folder."""
    from pathlib import Path

    path = Path(os.environ.get("TEST_ARTIFACTS_DIR") or tempfile.mkdtemp(prefix="gw-artifacts-"))
    path.mkdir(parents=True, exist_ok=True)
    return path
