"""Two upstream clients behind one interface, so the twin is measured with the client the articles
recommend (``httpx.AsyncClient``) and with the fastest asyncio one (``aiohttp``), chosen by
``TWIN_HTTP_CLIENT``. Nobody can then say we picked its slow client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

import aiohttp
import httpx
import orjson


class UpstreamError(Exception):
    """The upstream could not be reached or timed out (a status code is not an error here)."""

    def __init__(self, message: str, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class UpstreamStream(Protocol):
    status: int

    def lines(self) -> AsyncIterator[bytes]: ...

    async def read(self) -> bytes: ...

    async def aclose(self) -> None: ...


class Upstream(Protocol):
    async def request(
        self, method: str, path: str, payload: Any | None, headers: Mapping[str, str]
    ) -> tuple[int, bytes]: ...

    async def open_stream(self, path: str, payload: Any, headers: Mapping[str, str]) -> UpstreamStream: ...

    async def aclose(self) -> None: ...


JSON_HEADERS = {"Content-Type": "application/json"}


class HttpxUpstream:
    """httpx with no cap on connections (its default of 100 would cap the streams scenario).

    Keep-alive stays at httpx's default of 20 idle connections: httpcore scans its whole pool on
    every request, and keeping hundreds idle measured slower here, not faster.
    """

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.client = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=20, keepalive_expiry=30),
        )

    async def request(
        self, method: str, path: str, payload: Any | None, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        content = None if payload is None else orjson.dumps(payload)
        try:
            response = await self.client.request(
                method, path, content=content, headers={**JSON_HEADERS, **headers}
            )
        except httpx.TimeoutException as exc:
            raise UpstreamError(str(exc) or "timeout", timeout=True) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(str(exc) or type(exc).__name__) from exc
        return response.status_code, response.content

    async def open_stream(self, path: str, payload: Any, headers: Mapping[str, str]) -> UpstreamStream:
        request = self.client.build_request(
            "POST", path, content=orjson.dumps(payload), headers={**JSON_HEADERS, **headers}
        )
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            raise UpstreamError(str(exc) or "timeout", timeout=True) from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(str(exc) or type(exc).__name__) from exc
        return _HttpxStream(response)

    async def aclose(self) -> None:
        await self.client.aclose()


class _HttpxStream:
    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.status = response.status_code

    async def lines(self) -> AsyncIterator[bytes]:
        try:
            async for line in self.response.aiter_lines():
                yield line.encode()
        except httpx.HTTPError as exc:
            raise UpstreamError(str(exc) or type(exc).__name__) from exc

    async def read(self) -> bytes:
        return await self.response.aread()

    async def aclose(self) -> None:
        await self.response.aclose()


class AiohttpUpstream:
    """aiohttp with an unlimited connector (its default is 100 connections too)."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=timeout_s, sock_connect=5.0),
            auto_decompress=False,
        )

    async def request(
        self, method: str, path: str, payload: Any | None, headers: Mapping[str, str]
    ) -> tuple[int, bytes]:
        data = None if payload is None else orjson.dumps(payload)
        try:
            async with self.session.request(
                method, self.base_url + path, data=data, headers={**JSON_HEADERS, **headers}
            ) as response:
                return response.status, await response.read()
        except TimeoutError as exc:
            raise UpstreamError("timeout", timeout=True) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(str(exc) or type(exc).__name__) from exc

    async def open_stream(self, path: str, payload: Any, headers: Mapping[str, str]) -> UpstreamStream:
        try:
            response = await self.session.post(
                self.base_url + path, data=orjson.dumps(payload), headers={**JSON_HEADERS, **headers}
            )
        except TimeoutError as exc:
            raise UpstreamError("timeout", timeout=True) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(str(exc) or type(exc).__name__) from exc
        return _AiohttpStream(response)

    async def aclose(self) -> None:
        await self.session.close()


class _AiohttpStream:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.status = response.status

    async def lines(self) -> AsyncIterator[bytes]:
        try:
            async for line in self.response.content:
                yield line.rstrip(b"\r\n")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(str(exc) or type(exc).__name__) from exc

    async def read(self) -> bytes:
        return await self.response.read()

    async def aclose(self) -> None:
        self.response.release()


def make_upstream(kind: str, base_url: str, timeout_s: float) -> Upstream:
    clients: dict[str, type[HttpxUpstream] | type[AiohttpUpstream]] = {
        "httpx": HttpxUpstream,
        "aiohttp": AiohttpUpstream,
    }
    if kind not in clients:
        raise ValueError(f"TWIN_HTTP_CLIENT must be httpx or aiohttp, got {kind!r}")
    return clients[kind](base_url, timeout_s)
