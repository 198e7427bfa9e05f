"""Settings classes read from the environment (12-factor).

This package imports only the standard library so that `gunicorn.conf.py` can validate the
configuration in the master process before any worker is forked and gevent-patched.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
DEV_SECRET = "dev-insecure-change-me"


class ConfigError(Exception):
    """A setting is missing or invalid; the message is one line naming the variable."""

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}")
        self.variable = variable


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(name, f"must be a number, got {raw!r}") from None


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(name, f"must be true or false, got {raw!r}")


def _rate_limit(env: Mapping[str, str], name: str, default: str) -> str:
    """flask-limiter's syntax ("600/minute", "10/second;1000/hour"), checked with its parser."""
    raw = env.get(name)
    if raw is None:
        return default
    if raw:
        from limits import parse_many

        try:
            parse_many(raw)
        except ValueError:
            raise ConfigError(name, f"not a rate limit like '600/minute', got {raw!r}") from None
    return raw


def normalise_database_url(name: str, url: str) -> str:
    """Accept sqlite and PostgreSQL URLs; PostgreSQL always goes through psycopg 3."""
    parts = urlsplit(url)
    scheme = parts.scheme
    if scheme in {"postgres", "postgresql", "postgresql+psycopg"}:
        if not parts.hostname and "host=" not in parts.query:
            raise ConfigError(name, f"PostgreSQL URL has no host: {url!r}")
        if not parts.path.strip("/"):
            raise ConfigError(name, f"PostgreSQL URL has no database name: {url!r}")
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    if scheme == "sqlite":
        if not url.startswith("sqlite:///") and url != "sqlite://":
            raise ConfigError(name, f"sqlite URL must look like sqlite:///path, got {url!r}")
        return url
    raise ConfigError(name, f"not a sqlite:/// or postgresql:// URL: {url!r}")


def _redis_url(env: Mapping[str, str], name: str) -> str | None:
    url = env.get(name) or None
    if url and urlsplit(url).scheme not in {"redis", "rediss", "unix"}:
        raise ConfigError(name, f"must be a redis:// URL, got {url!r}")
    return url


class BaseConfig:
    """Defaults shared by every environment; `from_env` overlays the environment."""

    ENV_NAME = "base"
    DEBUG = False
    TESTING = False
    SECRET_KEY = DEV_SECRET
    JWT_SECRET_KEY = DEV_SECRET
    JWT_ACCESS_TOKEN_EXPIRES_S = 900
    JWT_REFRESH_TOKEN_EXPIRES_S = 86400 * 7
    REDIS_URL: str | None = None
    MAX_CONTENT_LENGTH = 1 * 1024 * 1024
    WEB_CONCURRENCY = 1
    WORKER_CONNECTIONS = 1000
    CHEAP_ROUTE_CONCURRENCY = 4
    # Worker admission (app/admission.py): requests being worked on, and those waiting for a turn.
    # Unset, they are half and a quarter of WORKER_CONNECTIONS: the gate can only shed below
    # gunicorn's own ceiling, and the rest of the connections stay free for the probes and streams.
    MAX_IN_FLIGHT: int | None = None
    MAX_PENDING: int | None = None
    MAX_PENDING_WAIT_S = 2.0
    # The gate's adaptive limit (app/admission.py, LagLimit): past this hub lateness the worker
    # admits fewer requests at once. 0 turns it off (a fixed MAX_IN_FLIGHT).
    ADMISSION_LAG_TARGET_MS = 0.0
    DB_MAX_CONNECTIONS = 20
    LOG_FORMAT = "json"
    LOG_LEVEL = "INFO"
    MODELS_CONFIG = str(ROOT / "config" / "models.yaml")
    MODELS_LOAD = "background"
    REGISTRY_POLL_S = 1.0
    POLICY_PHONE_REGIONS = "US"
    AUDIT_ENABLED = True
    AUDIT_BUFFER_MAX = 10_000
    AUDIT_BATCH_SIZE = 500
    AUDIT_FLUSH_INTERVAL_MS = 200
    AUDIT_JOURNAL = True
    DRIFT_WINDOW = 1000
    DRIFT_MIN_SAMPLES = 100
    DRIFT_PSI_THRESHOLD = 0.2
    DRIFT_P_VALUE = 0.01
    DRIFT_CENTROID_THRESHOLD = 0.3
    DRIFT_INTERVAL_S = 60.0
    USAGE_LEDGER_FLUSH_S = 1.0
    # How long a quota reservation outlives a worker that died holding it (see identity/quota.py).
    QUOTA_LEASE_S = 30.0
    DRIFT_REFERENCE_TEXTS = str(ROOT / "config" / "drift_reference_texts.txt")
    SSE_PING_INTERVAL_S = 5.0
    # RAG: the embedding model a new collection uses unless it names one, and the memory each
    # process may give the exact (SQLite) store's in-process matrices.
    RAG_EMBEDDING_MODEL = "all-minilm-l6-v2"
    RAG_EXACT_CACHE_MB = 512
    BOOTSTRAP = True
    RATELIMIT_FAIL_OPEN = True
    # Moving window: a burst at a window's edge can't double the limit, as it can in fixed windows.
    RATELIMIT_STRATEGY = "moving-window"
    RATE_LIMIT_DEFAULT = "600/minute"
    RATE_LIMIT_PER_KEY_DEFAULT = ""
    AUTH_TOKEN_RATE_LIMIT = "30/minute"
    # Failed API-key verifications before further ones are refused unhashed (identity/auth_throttle.py).
    AUTH_FAILURE_LIMIT_PER_ADDRESS = "20/minute"
    AUTH_FAILURE_LIMIT_PER_PREFIX = "50/minute"
    AUTH_KEY_CACHE_TTL_S = 30
    UPSTREAM_SIM = False
    # Batch jobs (app/inference/batches): the largest file POST /v1/files takes, the most lines
    # one batch may have, and how long a line may run before the queue hands it to another
    # worker (it must exceed every model's deadline; it is also how soon a killed worker's line
    # is retried).
    BATCH_FILE_MAX_BYTES = 8 * 1024 * 1024
    BATCH_MAX_LINES = 50_000
    BATCH_VISIBILITY_TIMEOUT_S = 300.0
    BATCH_WORKER_CONCURRENCY = 1  # pool processes per worker (each runs one line at a time)

    # flask-smorest / OpenAPI: documentation is only served when the prefix is set.
    API_TITLE = "flask-ai-gateway"
    API_VERSION = "v1"
    OPENAPI_VERSION = "3.1.0"
    OPENAPI_URL_PREFIX = "/"
    OPENAPI_JSON_PATH = "openapi.json"
    OPENAPI_SWAGGER_UI_PATH = "/docs"
    # Served by app/docs from our own origin, so the pages render without internet.
    OPENAPI_SWAGGER_UI_URL = "/docs/assets/swagger-ui/"
    OPENAPI_REDOC_PATH = "/redoc"
    OPENAPI_REDOC_URL = "/docs/assets/redoc/redoc.standalone.js"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> dict[str, object]:
        """Build the Flask config mapping, failing with one ConfigError on the first bad value."""
        env = os.environ if env is None else env
        cfg: dict[str, object] = {k: getattr(cls, k) for k in dir(cls) if k.isupper()}
        instance = Path(env.get("INSTANCE_PATH") or ROOT / "instance")
        cfg["INSTANCE_PATH"] = str(instance)
        cfg["MIGRATIONS_DIR"] = env.get("MIGRATIONS_DIR") or str(ROOT / "migrations")
        cfg["SECRET_KEY"] = env.get("SECRET_KEY") or cls.SECRET_KEY
        cfg["JWT_SECRET_KEY"] = env.get("JWT_SECRET_KEY") or cls.JWT_SECRET_KEY
        cfg["API_KEY_PEPPER"] = env.get("API_KEY_PEPPER") or derived_pepper(str(cfg["SECRET_KEY"]))
        cfg["API_KEY_PEPPERS_PREVIOUS"] = [
            p.strip() for p in (env.get("API_KEY_PEPPERS_PREVIOUS") or "").split(",") if p.strip()
        ]
        cfg["JWT_ACCESS_TOKEN_EXPIRES_S"] = _int(
            env, "JWT_ACCESS_TOKEN_EXPIRES", cls.JWT_ACCESS_TOKEN_EXPIRES_S, 1
        )
        cfg["JWT_REFRESH_TOKEN_EXPIRES_S"] = _int(
            env, "JWT_REFRESH_TOKEN_EXPIRES", cls.JWT_REFRESH_TOKEN_EXPIRES_S, 1
        )
        db_url = env.get("DATABASE_URL") or f"sqlite:///{instance / 'gateway.db'}"
        cfg["SQLALCHEMY_DATABASE_URI"] = normalise_database_url("DATABASE_URL", db_url)
        cfg["REDIS_URL"] = _redis_url(env, "REDIS_URL") or cls.REDIS_URL
        cfg["MAX_CONTENT_LENGTH"] = _int(env, "MAX_CONTENT_LENGTH", cls.MAX_CONTENT_LENGTH, 1024)
        cfg["WEB_CONCURRENCY"] = _int(env, "WEB_CONCURRENCY", cls.WEB_CONCURRENCY, 1)
        cfg["WORKER_CONNECTIONS"] = _int(env, "WORKER_CONNECTIONS", cls.WORKER_CONNECTIONS, 1)
        cfg["CHEAP_ROUTE_CONCURRENCY"] = _int(env, "CHEAP_ROUTE_CONCURRENCY", cls.CHEAP_ROUTE_CONCURRENCY, 1)
        connections = int(cfg["WORKER_CONNECTIONS"])  # type: ignore[call-overload]
        cfg["MAX_IN_FLIGHT"] = _int(env, "MAX_IN_FLIGHT", cls.MAX_IN_FLIGHT or max(1, connections // 2), 1)
        cfg["MAX_PENDING"] = _int(env, "MAX_PENDING", cls.MAX_PENDING or connections // 4, 0)
        cfg["MAX_PENDING_WAIT_S"] = _float(env, "MAX_PENDING_WAIT", cls.MAX_PENDING_WAIT_S)
        if float(cfg["MAX_PENDING_WAIT_S"]) < 0:  # type: ignore[arg-type]
            raise ConfigError("MAX_PENDING_WAIT", "must be >= 0 seconds")
        cfg["ADMISSION_LAG_TARGET_MS"] = _float(env, "ADMISSION_LAG_TARGET_MS", cls.ADMISSION_LAG_TARGET_MS)
        if float(cfg["ADMISSION_LAG_TARGET_MS"]) < 0:  # type: ignore[arg-type]
            raise ConfigError("ADMISSION_LAG_TARGET_MS", "must be >= 0 milliseconds (0 turns it off)")
        cfg["DB_MAX_CONNECTIONS"] = _int(env, "DB_MAX_CONNECTIONS", cls.DB_MAX_CONNECTIONS, 1)
        cfg["TRACING_ENABLED"], cfg["OTEL_TRACES_EXPORTER"] = _tracing(env)
        cfg["LOG_FORMAT"] = env.get("LOG_FORMAT") or cls.LOG_FORMAT
        if cfg["LOG_FORMAT"] not in {"json", "console"}:
            raise ConfigError("LOG_FORMAT", f"must be json or console, got {cfg['LOG_FORMAT']!r}")
        cfg["LOG_LEVEL"] = (env.get("LOG_LEVEL") or cls.LOG_LEVEL).upper()
        if cfg["LOG_LEVEL"] not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError("LOG_LEVEL", f"must be DEBUG, INFO, WARNING or ERROR, got {cfg['LOG_LEVEL']!r}")
        cfg["MODELS_CONFIG"] = env.get("MODELS_CONFIG") or cls.MODELS_CONFIG
        cfg["MODELS_DIR"] = env.get("MODELS_DIR") or str(instance / "models")
        cfg["MODELS_LOAD"] = env.get("MODELS_LOAD") or cls.MODELS_LOAD
        if cfg["MODELS_LOAD"] not in {"background", "eager"}:
            raise ConfigError("MODELS_LOAD", f"must be background or eager, got {cfg['MODELS_LOAD']!r}")
        cfg["SSE_PING_INTERVAL_S"] = _float(env, "SSE_PING_INTERVAL", cls.SSE_PING_INTERVAL_S)
        cfg["REGISTRY_POLL_S"] = _float(env, "REGISTRY_POLL", cls.REGISTRY_POLL_S)
        cfg["RAG_EMBEDDING_MODEL"] = env.get("RAG_EMBEDDING_MODEL") or cls.RAG_EMBEDDING_MODEL
        cfg["RAG_EXACT_CACHE_MB"] = _int(env, "RAG_EXACT_CACHE_MB", cls.RAG_EXACT_CACHE_MB, 1)
        cfg["POLICY_PHONE_REGIONS"] = env.get("POLICY_PHONE_REGIONS") or cls.POLICY_PHONE_REGIONS
        cfg["AUDIT_ENABLED"] = _bool(env, "AUDIT_ENABLED", cls.AUDIT_ENABLED)
        cfg["AUDIT_JOURNAL"] = _bool(env, "AUDIT_JOURNAL", cls.AUDIT_JOURNAL)
        cfg["AUDIT_BUFFER_MAX"] = _int(env, "AUDIT_BUFFER_MAX", cls.AUDIT_BUFFER_MAX, 1)
        cfg["AUDIT_BATCH_SIZE"] = _int(env, "AUDIT_BATCH_SIZE", cls.AUDIT_BATCH_SIZE, 1)
        cfg["AUDIT_FLUSH_INTERVAL_MS"] = _int(env, "AUDIT_FLUSH_INTERVAL_MS", cls.AUDIT_FLUSH_INTERVAL_MS, 1)
        cfg["AUDIT_SPOOL_DIR"] = env.get("AUDIT_SPOOL_DIR") or str(instance / "audit-spool")
        cfg["DRIFT_WINDOW"] = _int(env, "DRIFT_WINDOW", cls.DRIFT_WINDOW, 10)
        cfg["DRIFT_MIN_SAMPLES"] = _int(env, "DRIFT_MIN_SAMPLES", cls.DRIFT_MIN_SAMPLES, 1)
        cfg["DRIFT_PSI_THRESHOLD"] = _float(env, "DRIFT_PSI_THRESHOLD", cls.DRIFT_PSI_THRESHOLD)
        cfg["DRIFT_P_VALUE"] = _float(env, "DRIFT_P_VALUE", cls.DRIFT_P_VALUE)
        cfg["DRIFT_CENTROID_THRESHOLD"] = _float(
            env, "DRIFT_CENTROID_THRESHOLD", cls.DRIFT_CENTROID_THRESHOLD
        )
        cfg["DRIFT_INTERVAL_S"] = _float(env, "DRIFT_INTERVAL", cls.DRIFT_INTERVAL_S)
        cfg["USAGE_LEDGER_FLUSH_S"] = _float(env, "USAGE_LEDGER_FLUSH_INTERVAL", cls.USAGE_LEDGER_FLUSH_S)
        if float(cfg["USAGE_LEDGER_FLUSH_S"]) <= 0:  # type: ignore[arg-type]
            raise ConfigError("USAGE_LEDGER_FLUSH_INTERVAL", "must be > 0 seconds")
        cfg["QUOTA_LEASE_S"] = _float(env, "QUOTA_LEASE_SECONDS", cls.QUOTA_LEASE_S)
        if float(cfg["QUOTA_LEASE_S"]) <= 0:  # type: ignore[arg-type]
            raise ConfigError("QUOTA_LEASE_SECONDS", "must be > 0 seconds")
        cfg["DRIFT_REFERENCE_TEXTS"] = env.get("DRIFT_REFERENCE_TEXTS") or cls.DRIFT_REFERENCE_TEXTS
        cfg["BOOTSTRAP"] = _bool(env, "BOOTSTRAP", cls.BOOTSTRAP)
        cfg["RATELIMIT_FAIL_OPEN"] = _bool(env, "RATELIMIT_FAIL_OPEN", cls.RATELIMIT_FAIL_OPEN)
        for name in ("RATE_LIMIT_DEFAULT", "RATE_LIMIT_PER_KEY_DEFAULT", "AUTH_TOKEN_RATE_LIMIT"):
            cfg[name] = _rate_limit(env, name, getattr(cls, name))
        for name in ("AUTH_FAILURE_LIMIT_PER_ADDRESS", "AUTH_FAILURE_LIMIT_PER_PREFIX"):
            cfg[name] = _rate_limit(env, name, getattr(cls, name))
            if not cfg[name] or ";" in str(cfg[name]):
                raise ConfigError(name, f"must be one rate limit like '20/minute', got {cfg[name]!r}")
        cfg["AUTH_KEY_CACHE_TTL_S"] = _int(env, "AUTH_KEY_CACHE_TTL", cls.AUTH_KEY_CACHE_TTL_S, 0)
        cfg["UPSTREAM_TIMEOUT_S"] = _float(env, "UPSTREAM_TIMEOUT", 60.0)
        cfg["BATCH_FILE_MAX_BYTES"] = _int(env, "BATCH_FILE_MAX_BYTES", cls.BATCH_FILE_MAX_BYTES, 1024)
        cfg["BATCH_MAX_LINES"] = _int(env, "BATCH_MAX_LINES", cls.BATCH_MAX_LINES, 1)
        cfg["BATCH_VISIBILITY_TIMEOUT_S"] = _float(
            env, "BATCH_VISIBILITY_TIMEOUT", cls.BATCH_VISIBILITY_TIMEOUT_S
        )
        cfg["BATCH_WORKER_CONCURRENCY"] = _int(
            env, "BATCH_WORKER_CONCURRENCY", cls.BATCH_WORKER_CONCURRENCY, 1
        )
        if float(cfg["BATCH_VISIBILITY_TIMEOUT_S"]) < 2:  # type: ignore[arg-type]
            raise ConfigError("BATCH_VISIBILITY_TIMEOUT", "must be >= 2 seconds")
        cfg["SQLALCHEMY_ENGINE_OPTIONS"] = engine_options(
            str(cfg["SQLALCHEMY_DATABASE_URI"]),
            int(cfg["WORKER_CONNECTIONS"]),
            int(cfg["DB_MAX_CONNECTIONS"]),
        )
        cls.validate(cfg)
        return cfg

    @classmethod
    def validate(cls, cfg: dict[str, object]) -> None:
        """Cross-setting rules every environment shares."""
        if int(cfg["WEB_CONCURRENCY"]) > 1 and not cfg["REDIS_URL"]:  # type: ignore[call-overload]
            raise ConfigError(
                "REDIS_URL",
                "required when WEB_CONCURRENCY>1: rate limits, quotas and token revocation "
                "must be shared by all workers",
            )


def _tracing(env: Mapping[str, str]) -> tuple[bool, str]:
    """OpenTelemetry's own variables decide, as the SDK reads them: on when an exporter is named
    (`OTEL_TRACES_EXPORTER=otlp|console`) or an OTLP endpoint is set; `OTEL_SDK_DISABLED=true` wins."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False, "none"
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not exporter:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        return (True, "otlp") if endpoint else (False, "none")
    if exporter not in {"otlp", "console", "none"}:
        raise ConfigError("OTEL_TRACES_EXPORTER", f"must be otlp, console or none, got {exporter!r}")
    return exporter != "none", exporter


def engine_options(url: str, worker_connections: int, max_connections: int) -> dict[str, object]:
    """Size the pool from the gevent worker's concurrency.

    Every greenlet that touches the database at once needs a connection; past the pool's size
    greenlets wait cooperatively for `pool_timeout` instead of opening more server connections
    than PostgreSQL allows. No overflow: overflow connections are closed as soon as they are
    returned, so under steady load a worker would reconnect on almost every request.
    """
    if url.startswith("sqlite"):
        return {"connect_args": {"check_same_thread": False, "timeout": 15}}
    return {
        "pool_size": max(1, min(worker_connections, max_connections)),
        "max_overflow": 0,
        "pool_timeout": 10,
        "pool_pre_ping": True,
        "pool_recycle": 1800,
        "connect_args": {"connect_timeout": 5},
    }


class DevelopmentConfig(BaseConfig):
    ENV_NAME = "development"
    DEBUG = True
    LOG_FORMAT = "console"


class TestingConfig(BaseConfig):
    ENV_NAME = "testing"
    TESTING = True
    BOOTSTRAP = False
    MODELS_CONFIG = ""  # a test names the catalogue it needs; most need no model at all
    MODELS_LOAD = "eager"
    DRIFT_INTERVAL_S = 0.0  # no background refresh thread outliving each test's app
    SECRET_KEY = "testing-secret-key-with-enough-bytes-for-hs256"
    JWT_SECRET_KEY = "testing-jwt-key-with-enough-bytes-for-hs256"


class ProductionConfig(BaseConfig):
    ENV_NAME = "production"
    BOOTSTRAP = False
    SECRET_KEY = ""
    JWT_SECRET_KEY = ""

    @classmethod
    def validate(cls, cfg: dict[str, object]) -> None:
        super().validate(cfg)
        for name in ("SECRET_KEY", "JWT_SECRET_KEY", "API_KEY_PEPPER"):
            value = str(cfg[name] or "")
            if not value:
                raise ConfigError(name, "required in production")
            if value == DEV_SECRET or len(value) < 32:
                raise ConfigError(name, "must be a random value of at least 32 characters in production")


CONFIGS: dict[str, type[BaseConfig]] = {
    "development": DevelopmentConfig,
    "testing": TestingConfig,
    "production": ProductionConfig,
}


def load_config(env: Mapping[str, str] | None = None) -> dict[str, object]:
    """Pick the settings class from APP_ENV (default development) and read the environment."""
    env = os.environ if env is None else env
    name = (env.get("APP_ENV") or "development").lower()
    if name not in CONFIGS:
        raise ConfigError("APP_ENV", f"must be one of {', '.join(CONFIGS)}, got {name!r}")
    return CONFIGS[name].from_env(env)


def derived_pepper(secret_key: str) -> str:
    """The API key pepper when API_KEY_PEPPER is unset: HMAC-SHA256 of a fixed label under
    SECRET_KEY, so `make run` and existing deployments need no new variable. Rotating SECRET_KEY
    then changes the pepper: list the old one in API_KEY_PEPPERS_PREVIOUS
    (`python -c 'import config; print(config.derived_pepper("<old SECRET_KEY>"))'`)."""
    return hmac.new(secret_key.encode(), b"flask-ai-gateway api-key pepper v1", hashlib.sha256).hexdigest()


def random_secret() -> str:
    """For operators: `python -c 'import config; print(config.random_secret())'`."""
    return secrets.token_urlsafe(48)
