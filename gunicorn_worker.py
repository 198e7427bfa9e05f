"""The gunicorn worker: gevent's own, with two additions.

What gunicorn refuses itself answers in our JSON shape. gunicorn checks the request line and the
headers against `limit_request_line`, `limit_request_fields` and `limit_request_field_size` before the
application sees the request, and answers with an HTML page. Clients of an OpenAI-compatible API parse
JSON errors, so those answers (414 and 431) use the gateway's one error shape too.

Refusals are made before gunicorn's HTTP parser. Two layers of the app refuse a request from its head
alone: a bearer key this worker knows to be blocked (app/identity/auth_throttle.py, `EarlyRefusal`,
429) and a full admission gate (app/admission.py, `GatedApp`, 503). Made in WSGI, even those refusals
cost gunicorn's own per-request work: reading the request line and headers in Python, the environ,
the response object, 0.3-0.5 ms, so a 250/s auth flood took 8-14% of a core and, at 3x the
saturation rate, refusals took a third of the worker. So while either layer could refuse
(`active()`), a new connection's request is peeked at (MSG_PEEK, nothing consumed) and its head
framed by httptools (llhttp, in C). If a layer refuses it (`refuse_before_parsing`), the worker reads
exactly that request's bytes, writes the same answer itself, keeps the connection alive and looks at
the next request the same way. The first request no layer refuses, and any request this path does
not frame (a chunked or large body, an `Expect`, a `HEAD`, a head split across packets, anything
httptools rejects), goes with the rest of the connection to gunicorn untouched, from a request
boundary. A refusal made in WSGI closes its connection (`gateway.close_connection` in the environ),
so a refused client's next request comes on a new connection and meets this path.

gunicorn imports the worker class in the master, before any fork, so this module imports only what
gunicorn's gevent worker imports anyway (and httptools, a parser with no I/O), and never the app.
"""

from __future__ import annotations

import json
import socket
import urllib.parse
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import httptools
from gunicorn import util
from gunicorn.http.errors import LimitRequestHeaders, LimitRequestLine
from gunicorn.workers.ggevent import GeventWorker

# The environ key a refusal in the app sets (app/admission.py) to ask for the connection to be closed.
CLOSE_CONNECTION = "gateway.close_connection"
# A head longer than this, or a body over MAX_REFUSED_BODY, goes to gunicorn (which bounds both).
PEEK_BYTES = 16_384
MAX_REFUSED_BODY = 65_536
# After a refusal that closes the connection, how long unread bytes are drained so that closing
# the socket does not reset it (and destroy the answer) under a client still sending.
LINGER_S = 1.0


class _Head:
    """httptools callbacks for one request head: the few headers the refusal needs."""

    __slots__ = ("authorization", "complete", "content_length", "path", "refuse_here", "request_id")

    def __init__(self) -> None:
        self.path = ""
        self.authorization = ""
        self.request_id: str | None = None
        self.content_length = 0
        self.complete = False
        self.refuse_here = True  # cleared by anything this path leaves to gunicorn

    def on_url(self, url: bytes) -> None:
        # As gunicorn builds PATH_INFO, so a path compares the same here as in the app.
        self.path = urllib.parse.unquote(httptools.parse_url(url).path.decode("latin-1"), "latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"authorization":
            self.authorization = value.decode("latin-1")
        elif lname == b"x-request-id":
            self.request_id = value.decode("latin-1")
        elif lname == b"content-length":
            if self.content_length or not value.isdigit():
                self.refuse_here = False  # repeated or malformed: gunicorn answers it
            else:
                self.content_length = int(value)
        elif lname in (b"transfer-encoding", b"expect", b"upgrade"):
            self.refuse_here = False

    def on_headers_complete(self) -> None:
        self.complete = True


class _ClosingApp:
    """The WSGI app as gunicorn calls it, closing the connection when the app asked to: gunicorn
    drops a WSGI app's own Connection header, so a refusal sets CLOSE_CONNECTION instead."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)  # gunicorn.conf.py's hooks reach the Flask app's extensions

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        result = self.app(environ, start_response)
        if environ.get(CLOSE_CONNECTION):
            start_response.__self__.force_close()  # gunicorn's Response; its headers are not sent yet
        return result


class GatewayGeventWorker(GeventWorker):
    def load_wsgi(self) -> None:
        super().load_wsgi()
        # The app's layers that can refuse a request from its head alone, outermost first.
        self.refusers: list[Any] = getattr(self.wsgi, "extensions", {}).get("refusals_before_parsing", [])
        if self.refusers:
            self.wsgi = _ClosingApp(self.wsgi)

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        if (
            self.refusers
            and isinstance(addr, tuple)
            and not self.cfg.is_ssl
            and any(refuser.active() for refuser in self.refusers)
        ):
            try:
                hand_over = self._refuse_before_parsing(client, addr[0])
            except OSError:
                hand_over = False
            if not hand_over:
                util.close(client)
                return
        super().handle(listener, client, addr)

    def _refuse_before_parsing(self, client: Any, address: str) -> bool:
        """Answer this connection's requests that one of the app's refusers refuses, one by one,
        from a request boundary; True hands the connection (at the next unanswered request) to
        gunicorn, False means it is finished."""
        keepalive = self.cfg.keepalive
        while self.alive:
            data = None
            if keepalive:
                with self.timeout_ctx():  # as gunicorn's loop: the wait for a request is bounded
                    data = client.recv(PEEK_BYTES, socket.MSG_PEEK)
            else:
                data = client.recv(PEEK_BYTES, socket.MSG_PEEK)
            if not data:
                return False  # closed by the client, or idle past the keep-alive
            end = data.find(b"\r\n\r\n")
            if end < 0:
                return True
            head = _Head()
            parser = httptools.HttpRequestParser(head)
            try:
                parser.feed_data(data[: end + 4])
            except httptools.HttpParserError:
                return True
            if not (head.complete and head.refuse_here) or head.content_length > MAX_REFUSED_BODY:
                return True
            if parser.get_method() == b"HEAD":
                return True
            refused = None
            for refuser in self.refusers:
                refused = refuser.refuse_before_parsing(
                    address, head.path, head.authorization, head.request_id
                )
                if refused is not None:
                    break
            if refused is None:
                return True
            _consume(client, end + 4 + head.content_length)
            keep_alive = bool(keepalive) and parser.should_keep_alive() and self.alive
            client.sendall(_answer(*refused, keep_alive))
            if not keep_alive:
                _linger(client)
                return False
        return False

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


def _consume(client: Any, count: int) -> None:
    """Read and drop exactly `count` bytes: the refused request, head and body."""
    while count > 0:
        chunk = client.recv(min(count, 65_536))
        if not chunk:
            raise ConnectionResetError("the client closed the connection mid-request")
        count -= len(chunk)


def _answer(status: str, headers: list[tuple[str, str]], body: bytes, keep_alive: bool) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers)]
    lines += [f"Content-Length: {len(body)}", f"Connection: {'keep-alive' if keep_alive else 'close'}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _linger(client: Any) -> None:
    """Half-close, then drain what the client still sends (bounded), so the close can't reset it."""
    import gevent

    client.shutdown(socket.SHUT_WR)
    with gevent.Timeout(LINGER_S, False):
        while client.recv(65_536):
            pass
