"""The one error shape, `{"error": {"message", "type", "param", "code"}, "request_id"}`, and its handlers.

OpenAI's shape is used on every route so that SDKs written for OpenAI surface our errors
unchanged; `request_id` lets an operator find the matching log line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import marshmallow as ma
import structlog
from flask import Response, jsonify
from werkzeug.exceptions import HTTPException

from app.observability import request_id

log = structlog.get_logger(__name__)

ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_timeout",
}
ERROR_CODES: dict[int, str] = {
    400: "invalid_value",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limit_exceeded",
    500: "internal_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}
# The message of marshmallow's unknown-field error in the strict (OpenAI) schemas; the handler
# gives such errors the code `unknown_parameter`, as OpenAI does.
UNKNOWN_PARAMETER = "Unrecognized request argument."
BODY_LOCATIONS = {"json", "form", "query", "querystring", "view_args", "path", "headers", "files"}


class APIError(Exception):
    """Raise anywhere while serving a request to answer in the one error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
        details: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or ERROR_CODES.get(status)
        self.param = param
        self.type = type or ERROR_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.headers = dict(headers or {})
        self.details = details

    def payload(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        return {"error": body, "request_id": request_id()}

    def response(self) -> Response:
        resp = jsonify(self.payload())
        resp.status_code = self.status
        for key, value in self.headers.items():
            resp.headers[key] = value
        if "Retry-After" in self.headers:
            # flask-limiter rewrites Retry-After on every response to its window's reset time;
            # observability restores ours (a full model frees up in a second, not a minute).
            resp.gateway_retry_after = self.headers["Retry-After"]  # type: ignore[attr-defined]
        return resp


def flatten_messages(messages: Any, prefix: str = "", top: bool = True) -> list[dict[str, str]]:
    """Turn webargs/marshmallow's nested messages into `[{"param": "a.0.b", "message": ...}]`.

    Only the outermost keys can be webargs locations: a body field named `query` is a field."""
    found: list[dict[str, str]] = []
    if isinstance(messages, Mapping):
        for key, value in messages.items():
            key = str(key)
            if top and key in BODY_LOCATIONS:
                found.extend(flatten_messages(value, "", top=False))
                continue
            name = prefix if key == "_schema" else (f"{prefix}.{key}" if prefix else key)
            found.extend(flatten_messages(value, name, top=False))
    elif isinstance(messages, list | tuple):
        if all(isinstance(m, str) for m in messages):
            found.extend({"param": prefix or None, "message": m} for m in messages)  # type: ignore[misc]
        else:
            for item in messages:
                found.extend(flatten_messages(item, prefix, top=False))
    else:
        found.append({"param": prefix or None, "message": str(messages)})  # type: ignore[dict-item]
    return found


def validation_error(
    status: int, messages: Any, fallback: str = "Invalid request.", headers: Mapping[str, str] | None = None
) -> APIError:
    """marshmallow's messages as one APIError naming the first offending field (all in `details`):
    for the routes' webargs errors and for a batch line validated by the same schema."""
    details = flatten_messages(messages)
    first = details[0] if details else {"param": None, "message": fallback}
    text = f"{first['param']}: {first['message']}" if first["param"] else first["message"]
    code = "unknown_parameter" if first["message"] == UNKNOWN_PARAMETER else "validation_error"
    return APIError(status, text, code=code, param=first["param"], details=details, headers=headers)


def handle_http_exception(error: HTTPException) -> Response:
    """Every werkzeug/flask-smorest/flask-limiter HTTP error, in our shape."""
    status = error.code or 500
    data = getattr(error, "data", None) or {}
    message = data.get("message") or error.description or error.name
    if status == 429 and not data.get("message"):
        message = f"Rate limit exceeded: {error.description}"
    headers = dict(data.get("headers") or {})
    messages = data.get("messages") or data.get("errors")
    if status == 400 and messages == {"json": ["Invalid JSON body."]}:
        return APIError(
            400, "The request body is not valid JSON.", code="invalid_json", headers=headers
        ).response()
    if messages:
        return validation_error(status, messages, message, headers).response()
    if status >= 500:
        log.error("http_error", status=status, error=message)
        message = error.name if status == 500 else message
    resp = APIError(status, str(message), headers=headers).response()
    if status == 405 and hasattr(error, "valid_methods") and error.valid_methods:
        resp.headers["Allow"] = ", ".join(error.valid_methods)
    return resp


def handle_api_error(error: APIError) -> Response:
    return error.response()


def rate_limit_unavailable() -> APIError:
    """Rate limiting's Redis is down and RATELIMIT_FAIL_OPEN is false: refuse, with our 503."""
    return APIError(
        503,
        "Rate limiting is unavailable, and this gateway is configured to fail closed; retry shortly.",
        code="rate_limit_unavailable",
        headers={"Retry-After": "1"},
    )


def _store_unavailable(error: Exception) -> str | None:
    """Which store a connection-level failure came from, if it is one: the database or Redis
    being down is an outage the client should retry (503), not a bug of ours (500)."""
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if isinstance(error, OperationalError | InterfaceError) or (
        isinstance(error, DBAPIError) and error.connection_invalidated
    ):
        return "database"
    if isinstance(error, RedisConnectionError | RedisTimeoutError):
        return "redis"
    return None


def _nul_in_input(error: Exception) -> bool:
    """PostgreSQL's text can't hold U+0000, so a NUL a client sent (a name, a filter, a path as %00)
    fails the statement that carries it: psycopg refuses to send it, or the server can't turn
    JSON's \\u0000 into text (SQLSTATE 22P05). That is the client's input, not our bug. (SQLite
    stores it; the audit trail replaces it on every database, see audit/records.py.)"""
    from sqlalchemy.exc import DataError

    if not isinstance(error, DataError):
        return False
    return "NUL (0x00)" in str(error.orig) or getattr(error.orig, "sqlstate", None) == "22P05"


def handle_unexpected(error: Exception) -> Response:
    """A bug: log the traceback, answer 500 without it. A store that is down: 503, retry. A NUL
    character that PostgreSQL can't store: 400, the client's to fix."""
    if isinstance(error, HTTPException):
        return handle_http_exception(error)
    if _nul_in_input(error):
        return APIError(
            400, "Text fields can't contain the NUL character (U+0000).", code="nul_character"
        ).response()
    store = _store_unavailable(error)
    if store is not None:
        log.warning(
            "store_unavailable", store=store, error_class=type(error).__name__, error=str(error)[:200]
        )
        return APIError(
            503,
            f"The {store} is unavailable; retry shortly.",
            code=f"{store}_unavailable",
            headers={"Retry-After": "1"},
        ).response()
    log.exception("unhandled_exception", error_class=type(error).__name__)
    return APIError(500, "The server had an internal error; quote the request_id to the operator.").response()


class ErrorDetailSchema(ma.Schema):
    message = ma.fields.String(required=True)
    type = ma.fields.String(required=True, metadata={"description": "Error class, as in OpenAI's API."})
    param = ma.fields.String(allow_none=True, required=True, metadata={"description": "Offending field."})
    code = ma.fields.String(
        allow_none=True, required=True, metadata={"description": "Machine-readable code."}
    )
    details = ma.fields.List(
        ma.fields.Dict(), metadata={"description": "All field errors of a validation failure."}
    )


class ErrorResponseSchema(ma.Schema):
    """The default error response of every operation."""

    error = ma.fields.Nested(ErrorDetailSchema, required=True)
    request_id = ma.fields.String(required=True)


def _jwt_error(status: int, code: str):
    def loader(*args: Any) -> Response:
        detail = args[0] if args and isinstance(args[0], str) else None
        messages = {
            "token_expired": "The access token has expired.",
            "invalid_token": "The bearer token is invalid.",
            "missing_token": "Authentication required: send 'Authorization: Bearer <token>'.",
            "token_revoked": "The token has been revoked.",
            "fresh_token_required": "A fresh token is required.",
        }
        message = messages[code] if code != "invalid_token" or not detail else f"Invalid token: {detail}"
        return APIError(status, message, code=code, headers={"WWW-Authenticate": "Bearer"}).response()

    return loader


def register_jwt_errors() -> None:
    """flask-jwt-extended answers its own errors (422 for a malformed token): ours are 401s."""
    from app.extensions import jwt

    jwt.expired_token_loader(_jwt_error(401, "token_expired"))
    jwt.invalid_token_loader(_jwt_error(401, "invalid_token"))
    jwt.unauthorized_loader(_jwt_error(401, "missing_token"))
    jwt.revoked_token_loader(_jwt_error(401, "token_revoked"))
    jwt.needs_fresh_token_loader(_jwt_error(401, "fresh_token_required"))
