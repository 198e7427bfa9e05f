"""The gunicorn worker: gevent's own, except that what gunicorn refuses itself answers in our JSON shape.

gunicorn checks the request line and the headers against `limit_request_line`, `limit_request_fields`
and `limit_request_field_size` before the application sees the request, and answers with an HTML page.
Clients of an OpenAI-compatible API parse JSON errors, so those answers (414 and 431) use the gateway's
one error shape too. gunicorn imports the worker class in the master, before any fork, so this module
imports only what gunicorn's gevent worker imports anyway, and never the app.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from gunicorn import util
from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine
from gunicorn.workers.ggevent import GeventWorker


class GatewayGeventWorker(GeventWorker):
    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if isinstance(exc, LimitRequestLine):
            status, reason, code = 414, "URI Too Long", "request_line_too_long"
            message = (
                f"The request line (method, path and query) is longer than this server's limit of "
                f"{self.cfg.limit_request_line} bytes."
            )
        elif isinstance(exc, LimitRequestHeaders):
            status, reason, code = 431, "Request Header Fields Too Large", "headers_too_large"
            message = (
                f"{exc}: this server takes at most {self.cfg.limit_request_fields} header fields of at "
                f"most {self.cfg.limit_request_field_size} bytes each."
            )
        else:
            super().handle_error(req, client, addr, exc)
            return
        self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
        request_id = uuid.uuid4().hex
        body = json.dumps(
            {
                "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code},
                "request_id": request_id,
            }
        )
        head = (
            f"HTTP/1.1 {status} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"X-Request-ID: {request_id}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        try:
            util.write_nonblock(client, (head + body).encode())
        except OSError:
            self.log.debug("Failed to send error message.")
