"""`FlaskAIGateway`: the gateway as a Flask extension, mountable into an app someone else made.

    from flask import Flask
    from app import FlaskAIGateway

    shop = Flask(__name__)
    gateway = FlaskAIGateway(shop, url_prefix="/ai")  # or FlaskAIGateway(...).init_app(shop)

`init_app` registers our extensions (database, JWT, limiter, metrics, audit, drift, tracing),
our three blueprints and the docs under `url_prefix`, our error handlers and our CLI. What it
leaves to the host, unless asked:

- **Settings.** Ours are read from the environment as `create_app` reads them, then `config=`
  overrides them; a key the host has already set in `app.config` keeps the host's value
  (`SECRET_KEY`, for one). `create_app` builds a fresh app, so there everything is ours.
- **Errors.** Our JSON error shape answers only requests for our routes (our blueprints, or any
  path under a non-empty `url_prefix`). The host's own routes keep the host's error handlers, or
  Flask's defaults. `error_handlers="app"` makes our shape answer every route (`create_app`).
- **Logging.** The root logger and structlog are configured only with `configure_logging=True`.
- **OpenAPI.** Our spec documents only our routes, at `<url_prefix>/openapi.json`, with Swagger
  UI at `<url_prefix>/docs` and ReDoc at `<url_prefix>/redoc`; `openapi=False` turns the pages off.

One gateway per process: the extensions behind it are module-level singletons (the
cookiecutter-flask layout), so the host must not register a second Flask-SQLAlchemy,
JWTManager, Limiter or Flask-Migrate instance of its own on the same app.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from flask import Flask, request
from werkzeug.exceptions import HTTPException

from config import load_config

OUR_BLUEPRINTS = frozenset({"health", "inference", "governance", "docs_assets", "console"})
ErrorScope = Literal["gateway", "app"]
Handler = Callable[[Any], Any]


class FlaskAIGateway:
    """Inference and governance routes, and everything they need, on an existing Flask app."""

    def __init__(
        self,
        app: Flask | None = None,
        *,
        url_prefix: str = "",
        config: Mapping[str, object] | None = None,
        error_handlers: ErrorScope = "gateway",
        configure_logging: bool = False,
        openapi: bool = True,
    ) -> None:
        if url_prefix and (not url_prefix.startswith("/") or url_prefix.endswith("/")):
            raise ValueError(f"url_prefix must start with '/' and not end with one, got {url_prefix!r}")
        if error_handlers not in ("gateway", "app"):
            raise ValueError(f"error_handlers must be 'gateway' or 'app', got {error_handlers!r}")
        self.url_prefix = url_prefix
        self.config = dict(config or {})
        self.error_handlers = error_handlers
        self.configure_logging = configure_logging
        self.openapi = openapi
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        # The host's handlers, before flask-smorest registers its own app-wide HTTPException one.
        host_handlers = {
            exc_class: handler
            for by_class in app.error_handler_spec[None].values()  # keyed by status code, then class
            for exc_class, handler in by_class.items()
        }
        self._configure(app)
        app.extensions["ai_gateway"] = self
        _register_extensions(app)
        _register_blueprints(app, self.url_prefix)
        self._register_errorhandlers(app, host_handlers)
        _register_commands(app)

    # settings ----------------------------------------------------------------------------
    def _configure(self, app: Flask) -> None:
        settings = {**load_config(), **self.config}
        prefix = self.url_prefix
        settings["GATEWAY_CONFIGURE_LOGGING"] = self.configure_logging
        settings["GATEWAY_URL_PREFIX"] = prefix
        settings["OPENAPI_URL_PREFIX"] = f"{prefix}/" if self.openapi else None
        settings["OPENAPI_SWAGGER_UI_URL"] = f"{prefix}/docs/assets/swagger-ui/"
        settings["OPENAPI_REDOC_URL"] = f"{prefix}/docs/assets/redoc/redoc.standalone.js"
        for key, value in settings.items():
            if key in self.config:
                app.config[key] = value
            else:
                app.config.setdefault(key, value)
        redis_url = app.config.get("REDIS_URL")
        app.config.setdefault("RATELIMIT_STORAGE_URI", redis_url or "memory://")
        app.config.setdefault(
            "RATELIMIT_STORAGE_OPTIONS", {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
        )
        app.config.setdefault("RATELIMIT_HEADERS_ENABLED", True)
        app.config.setdefault("RATELIMIT_SWALLOW_ERRORS", app.config["RATELIMIT_FAIL_OPEN"])
        Path(app.instance_path).mkdir(parents=True, exist_ok=True)

    # errors ------------------------------------------------------------------------------
    def owns_request(self) -> bool:
        """Whether the current request is for one of our routes."""
        if self.error_handlers == "app" or request.blueprint in OUR_BLUEPRINTS:
            return True
        return bool(self.url_prefix) and (
            request.path == self.url_prefix or request.path.startswith(self.url_prefix + "/")
        )

    def _register_errorhandlers(self, app: Flask, host_handlers: Mapping[Any, Any]) -> None:
        """Ours for APIError, HTTPException and Exception, and in front of each handler the host
        had registered (a host's 404 page is more specific than our HTTPException handler, and
        would otherwise answer unknown URLs under our prefix). Host handlers registered after
        `init_app` answer everywhere: mount the gateway after registering them."""
        from app.errors import (
            APIError,
            handle_api_error,
            handle_http_exception,
            handle_unexpected,
            register_jwt_errors,
        )

        def ours_for(exc_class: Any) -> Handler:
            if isinstance(exc_class, type) and issubclass(exc_class, APIError):
                return handle_api_error
            if isinstance(exc_class, type) and issubclass(exc_class, HTTPException):
                return handle_http_exception
            return handle_unexpected

        for exc_class in {APIError, HTTPException, Exception, *host_handlers}:
            handler = self._scoped(host_handlers.get(exc_class), ours_for(exc_class))
            app.register_error_handler(exc_class, handler)
        register_jwt_errors()

    def _scoped(
        self, previous: Callable[[Any], Any] | None, ours: Callable[[Any], Any]
    ) -> Callable[[Any], Any]:
        """Our handler for our routes; for the host's, the handler it had (or Flask's default).
        Flask keeps one app-level handler per exception class, so registering ours replaces the
        host's: keeping it and delegating is what leaves the host's error pages alone."""
        if self.error_handlers == "app":
            return ours

        def handler(error: Any) -> Any:
            if self.owns_request():
                return ours(error)
            if previous is not None:
                return previous(error)
            if isinstance(error, HTTPException):
                return error  # Flask renders its default page
            raise error  # Flask's own 500 handling

        return handler


def _register_extensions(app: Flask) -> None:
    from app import admission, docs, health, identity, observability, tracing
    from app.extensions import api, db, jwt, limiter, metrics, migrate, redis_store
    from app.governance import audit, drift
    from app.inference import batches, catalogue, rag

    observability.init_app(app)
    admission.init_app(app)
    db.init_app(app)
    tracing.init_app(app)  # before the hooks below, so the request span is open when they run
    migrate.init_app(app, db, directory=app.config["MIGRATIONS_DIR"])
    redis_store.init_app(app)
    jwt.init_app(app)
    limiter.init_app(app)
    metrics.init_app(app)
    api.init_app(app)
    api.spec.components.security_scheme(
        "bearerAuth",
        {"type": "http", "scheme": "bearer", "description": "An API key (gw-...) or a JWT access token."},
    )
    api.spec.components.security_scheme("oauth2", identity.oauth2_scheme(app.config["GATEWAY_URL_PREFIX"]))
    health.init_app(app)
    docs.init_app(app)
    identity.init_app(app)
    catalogue.init_app(app)
    rag.init_app(app)
    batches.init_app(app)
    drift.init_app(app)
    audit.init_app(app)
    admission.install_gate(app)
    # Outermost: a flood's known-blocked key is refused before the gate, metrics and Flask.
    identity.auth_throttle.install_early_refusal(app)


def _register_blueprints(app: Flask, url_prefix: str) -> None:
    from app.console import bp as console
    from app.extensions import api
    from app.governance import blp as governance
    from app.health import blp as health
    from app.inference import blp as inference

    for blueprint in (health, inference, governance):
        api.register_blueprint(blueprint, url_prefix=url_prefix or None)
    app.register_blueprint(console, url_prefix=f"{url_prefix}/console")


def _register_commands(app: Flask) -> None:
    """`flask db` comes from Flask-Migrate, `flask openapi` from flask-smorest, identity's from identity."""
    from app.inference.cli import models_cli

    app.cli.add_command(models_cli)
