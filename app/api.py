"""flask-smorest glue: our error shape in handlers and docs, and a JSON-only body parser."""

from __future__ import annotations

import weakref
from typing import Any

import flask
import marshmallow as ma
from flask_smorest import Api, Blueprint
from webargs import core
from webargs.flaskparser import FlaskParser, abort
from werkzeug.datastructures import CombinedMultiDict
from werkzeug.exceptions import HTTPException

from app.errors import ErrorResponseSchema, handle_http_exception


class StrictJsonParser(FlaskParser):
    """webargs treats a non-JSON body as missing and answers 422; a client deserves 415.

    webargs also loads a missing body as `{}`, so an operation whose body the document marks
    required (flask-smorest's default) would accept no body at all when none of its fields is
    required. Schemas registered with `require_body` refuse that with the documented 422.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._body_required: weakref.WeakSet[ma.Schema] = weakref.WeakSet()

    def require_body(self, schema: ma.Schema) -> None:
        self._body_required.add(schema)

    def load_json(self, req: flask.Request, schema: ma.Schema) -> Any:
        data = super().load_json(req, schema)
        if data is core.missing and schema in self._body_required:
            raise ma.ValidationError("A JSON request body is required.")
        return data

    def load_files(self, req: flask.Request, schema: ma.Schema) -> Any:
        """A multipart body as one mapping, its files and its plain fields together: flask-smorest
        documents one schema per request body, and an upload such as OpenAI's (`file` beside
        `purpose`) needs both in it, or the document would drop one of them."""
        return self._makeproxy(CombinedMultiDict([req.files, req.form]), schema)

    def _raw_load_json(self, req: flask.Request) -> Any:
        if not core.is_json(req.mimetype):
            if req.content_length or req.headers.get("Transfer-Encoding"):
                abort(415, message=f"Content-Type must be application/json, got {req.mimetype or 'none'!r}")
            return core.missing
        return core.parse_json(req.get_data(cache=True))


class GatewayBlueprint(Blueprint):
    """Every blueprint of the gateway parses bodies strictly, with one schema instance per route."""

    ARGUMENTS_PARSER = StrictJsonParser()

    def arguments(self, schema: type[ma.Schema] | ma.Schema, *args: Any, **kwargs: Any) -> Any:
        # Given a class, webargs builds a new instance on every request, deep-copying every field:
        # about 0.3 ms of CPU per chat request, a sixth of the whole path. A schema holds no
        # per-call state (marshmallow 4 has no context), so one instance serves every request.
        instance = schema() if isinstance(schema, type) else schema
        body = kwargs.get("location", "json") == "json" and kwargs.get("required", True)
        if body and not any(field.required for field in instance.fields.values()):
            # With a required field, a missing body already fails naming that field.
            self.ARGUMENTS_PARSER.require_body(instance)
        return super().arguments(instance, *args, **kwargs)


def custom_field_schema(converter: Any, field: ma.fields.Field, **kwargs: Any) -> dict[str, Any]:
    """A custom field documents its own JSON Schema through `_jsonschema_type_mapping()` (OpenAI's
    `input`: a string or a list of strings); without this apispec documents it as anything. A
    Dict's key rules become `propertyNames`, which apispec leaves out (batch `metadata` keys)."""
    mapping = getattr(field, "_jsonschema_type_mapping", None)
    if callable(mapping):
        return mapping()
    keys = getattr(field, "key_field", None) if isinstance(field, ma.fields.Dict) else None
    if keys is not None:
        names = converter.field2property(keys)
        names = {k: v for k, v in names.items() if k in ("type", "minLength", "maxLength", "pattern", "enum")}
        return {"propertyNames": names} if set(names) - {"type"} else {}
    return {}


class GatewayApi(Api):
    """Api whose HTTP errors, and their documentation, use the gateway's one error shape."""

    ERROR_SCHEMA = ErrorResponseSchema

    def _init_spec(self, *args: Any, **kwargs: Any) -> None:
        super()._init_spec(*args, **kwargs)
        self.ma_plugin.converter.add_attribute_function(custom_field_schema)

    def handle_http_exception(self, error: HTTPException) -> flask.Response:  # type: ignore[override]
        return handle_http_exception(error)
