"""The admin port's HTTP/1.1 server, on h11: strict parsing, simple code, off the hot path.

Each connection is one task that reads a request, hands it to the application, writes the
answer, and loops while the client keeps the connection alive. The server enforces what h11
leaves to it: a deadline for a request head (slowloris) and for an idle keep-alive
connection, the head size (431), and the body size (413, refused from ``Content-Length``
before the body is read, or as soon as a chunked body passes the limit).

Limits: bodies are buffered whole (the API's are small, at most ``max_body``); no pipelining
beyond what h11 does (one request at a time per connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

import h11

log = logging.getLogger("edge.admin")

SERVER_NAME = b"zeitwork"
MAX_BODY = 1024 * 1024
MAX_HEAD = 64 * 1024


@dataclass(slots=True)
class Request:
    method: str
    # The path percent-decoded segment by segment (a %2F inside a segment stays in it).
    segments: list[str]
    raw_path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes
    client: str

    @property
    def path(self) -> str:
        return self.raw_path


@dataclass(slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


Application = Callable[[Request], Awaitable[Response]]


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_body: int = MAX_BODY
    max_head: int = MAX_HEAD
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 60.0


class _Reject(Exception):
    """The request cannot be served: answer with this status, then close."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class HttpServer:
    """Serves ``app`` on h11 connections accepted by ``asyncio.start_server``."""

    def __init__(self, app: Application, limits: ServerLimits | None = None) -> None:
        self.app = app
        self.limits = limits or ServerLimits()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, host, port, reuse_address=True, limit=self.limits.max_head
        )

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; give requests in progress ``grace`` seconds, then cut."""
        if self._server is not None:
            self._server.close()
        if self._connections:
            _, pending = await asyncio.wait(self._connections, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await _Connection(self.app, self.limits, reader, writer).serve()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


class _Connection:
    def __init__(
        self,
        app: Application,
        limits: ServerLimits,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.app = app
        self.limits = limits
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
        peer = writer.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) else "local"

    async def serve(self) -> None:
        first = True
        while True:
            timeout = self.limits.header_timeout if first else self.limits.keepalive_timeout
            first = False
            try:
                request = await self._read_request(timeout)
            except _Reject as reject:
                await self._reject(reject)
                return
            if request is None:
                return
            try:
                response = await self.app(request)
            except Exception:
                log.exception("admin API: %s %s failed", request.method, request.raw_path)
                response = Response(500, error_body("internal", "internal server error"))
            await self._send(response, head_only=request.method == "HEAD")
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is not h11.DONE:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return

    async def _next_event(self, deadline: float) -> object:
        loop = asyncio.get_running_loop()
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            data = await asyncio.wait_for(self.reader.read(65536), remaining)
            self.conn.receive_data(data)

    async def _read_request(self, wait: float) -> Request | None:
        loop = asyncio.get_running_loop()
        try:
            event = await self._next_event(loop.time() + wait)
        except TimeoutError:
            # An idle keep-alive connection closes quietly; a started, unfinished head is 408.
            if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
                return None
            raise _Reject(408, "request_timeout", "the request head took too long") from None
        except h11.RemoteProtocolError as exc:
            if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
                # Connection closed before a request: nothing to answer.
                return None
            raise self._protocol_reject(exc) from None
        if isinstance(event, h11.ConnectionClosed):
            return None
        assert isinstance(event, h11.Request)
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers}
        length = headers.get("content-length")
        if length is not None and int(length) > self.limits.max_body:
            raise _Reject(413, "body_too_large", f"the body is over {self.limits.max_body} bytes")
        target = event.target.decode("latin-1")
        split = urlsplit(target)
        if not split.path.startswith("/"):
            raise _Reject(400, "bad_request", f"request target {target!r} is not a path")
        body = await self._read_body(loop.time() + self.limits.body_timeout)
        try:
            query = parse_qsl(split.query, keep_blank_values=True, strict_parsing=False)
        except ValueError as exc:
            raise _Reject(400, "bad_query", f"bad query string: {exc}") from None
        return Request(
            method=event.method.decode("ascii"),
            segments=[unquote(s) for s in split.path.split("/")[1:]],
            raw_path=split.path,
            query=query,
            headers=headers,
            body=body,
            client=self.client,
        )

    async def _read_body(self, deadline: float) -> bytes:
        if self.conn.they_are_waiting_for_100_continue:
            await self._write(
                self.conn.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = await self._next_event(deadline)
            except TimeoutError:
                raise _Reject(408, "request_timeout", "the request body took too long") from None
            except h11.RemoteProtocolError as exc:
                raise self._protocol_reject(exc) from None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.limits.max_body:
                    raise _Reject(
                        413, "body_too_large", f"the body is over {self.limits.max_body} bytes"
                    )
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("client closed the connection mid-body")

    def _protocol_reject(self, exc: h11.RemoteProtocolError) -> _Reject:
        # h11's hint is 400, or 431 for a head over max_incomplete_event_size.
        status = exc.error_status_hint
        code = "header_too_large" if status == 431 else "bad_request"
        return _Reject(status, code, f"malformed HTTP request: {exc}")

    async def _reject(self, reject: _Reject) -> None:
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        response = Response(
            reject.status,
            error_body(reject.code, str(reject)),
            headers=[("connection", "close")],
        )
        with contextlib.suppress(h11.LocalProtocolError):
            await self._send(response, head_only=False)

    async def _send(self, response: Response, *, head_only: bool) -> None:
        headers = [
            ("server", "zeitwork"),
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        if response.status == 204:
            headers = [h for h in headers if h[0] not in ("content-length", "content-type")]
        data = self.conn.send(h11.Response(status_code=response.status, headers=headers))
        assert data is not None
        if response.body and not head_only and response.status != 204:
            data += self.conn.send(h11.Data(data=response.body)) or b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        await self._write(data)

    async def _write(self, data: bytes | None) -> None:
        if data:
            self.writer.write(data)
            await self.writer.drain()
