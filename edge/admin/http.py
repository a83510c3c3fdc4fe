"""The admin port's HTTP/1.1 server, on h11: strict parsing, simple code, off the hot path.

Each connection is one task that reads a request, hands it to the application, writes the
answer, and loops while the client keeps the connection alive. The server enforces what h11
leaves to it:

- time: an idle connection waits at most ``header_timeout`` for its first request and
  ``keepalive_timeout`` for each later one, then closes quietly; once a request's first byte
  has arrived its head must be complete within ``header_timeout`` (else 408, slowloris) and
  its body within ``body_timeout``;
- size: the head at most ``max_head`` bytes (431), the body at most ``max_body`` (413,
  refused from ``Content-Length`` before any of it is read, or as soon as a chunked body
  passes the limit). After such a refusal the connection lingers briefly, discarding what
  the client is still sending, so that it reads the answer instead of a reset.

Shutdown (:meth:`HttpServer.close`) stops accepting, closes idle connections at once and lets
requests in progress finish (their answers say ``Connection: close``) within a grace period.

Limits: bodies are buffered whole (the API's are small, at most ``max_body``); one request at
a time per connection (a pipelined request waits for the answer to the one before it).
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
READ_SIZE = 65536
# After refusing a request whose body is still coming: how long, and how much of it, to
# read and discard before closing (closing with unread data makes the kernel send a reset,
# which can destroy the answer before the client reads it).
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024


@dataclass(slots=True)
class Request:
    method: str
    # The path percent-decoded segment by segment (a %2F inside a segment stays in it).
    segments: list[str]
    # The path as the client sent it (still percent-encoded), without the query.
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
        self.closing = False
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], _Connection] = {}

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(
            self._on_connection, host, port, reuse_address=True, limit=self.limits.max_head
        )

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; close idle connections, give requests in progress ``grace``
        seconds to finish, then cut what is left."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for task, connection in list(self._connections.items()):
            if connection.idle:
                task.cancel()
        if self._connections:
            _, pending = await asyncio.wait(list(self._connections), timeout=grace)
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
        connection = _Connection(self, reader, writer)
        self._connections[task] = connection
        try:
            if not self.closing:
                await connection.serve()
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # close() ended the connection; finishing normally keeps the cancellation of a
            # callback task nobody awaits out of asyncio's error reporting.
            if not self.closing:
                raise
        finally:
            self._connections.pop(task, None)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await writer.wait_closed()


class _Connection:
    def __init__(
        self, server: HttpServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.app = server.app
        self.limits = server.limits
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        # Waiting for the first byte of a request: close() may end the connection at once.
        self.idle = True
        peer = writer.get_extra_info("peername")
        self.client = str(peer[0]) if isinstance(peer, tuple) else "local"

    async def serve(self) -> None:
        wait = self.limits.header_timeout
        while True:
            try:
                request = await self._read_request(wait)
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
            await self._send(response, request)
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is not h11.DONE:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
            wait = self.limits.keepalive_timeout

    async def _next_event(self, deadline: float) -> object:
        loop = asyncio.get_running_loop()
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), remaining)
            self.conn.receive_data(data)

    async def _read_head(self, wait: float) -> h11.Request | None:
        """The next request's head; None when the connection ends (or idles out) first."""
        loop = asyncio.get_running_loop()
        limits = self.limits
        # Bytes of this request and any after it that h11 holds (a pipelined request).
        received = len(self.conn.trailing_data[0])
        started = received > 0
        deadline = loop.time() + (limits.header_timeout if started else wait)
        self.idle = not started
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                if not started:
                    return None  # closed before a request: nothing to answer
                raise self._protocol_reject(exc) from None
            if isinstance(event, h11.Request):
                # h11 checks the size of an incomplete head only; one that arrives whole in
                # a single read is measured here.
                if received - len(self.conn.trailing_data[0]) > limits.max_head:
                    raise _Reject(431, "header_too_large", "the request head is too large")
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                data = await asyncio.wait_for(self.reader.read(READ_SIZE), remaining)
            except TimeoutError:
                if not started:
                    return None  # an idle connection closes quietly
                raise _Reject(408, "request_timeout", "the request head took too long") from None
            if data and not started:
                started = True
                self.idle = False
                deadline = loop.time() + limits.header_timeout
            received += len(data)
            self.conn.receive_data(data)

    async def _read_request(self, wait: float) -> Request | None:
        event = await self._read_head(wait)
        if event is None:
            return None
        self.idle = False
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in event.headers}
        if "transfer-encoding" in headers and "content-length" in headers:
            # h11 lets Transfer-Encoding win and keeps the connection; a request framed two
            # ways is a smuggling attempt more often than a mistake, refused as the proxy does.
            raise _Reject(400, "bad_request", "both Content-Length and Transfer-Encoding")
        # h11 has checked that Content-Length is a number (and agrees with any duplicate).
        length = headers.get("content-length")
        if length is not None and int(length) > self.limits.max_body:
            raise _Reject(413, "body_too_large", f"the body is over {self.limits.max_body} bytes")
        target = event.target.decode("latin-1")
        split = urlsplit(target)
        if not split.path.startswith("/"):
            raise _Reject(400, "bad_request", f"request target {target!r} is not a path")
        loop = asyncio.get_running_loop()
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
        try:
            await self._send(response, None)
        except h11.LocalProtocolError:
            return
        if reject.status in (413, 431):
            await self._linger()

    async def _linger(self) -> None:
        """Discard what the client still sends (bounded), so the answer is not reset."""
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER_SECONDS
        discarded = 0
        with contextlib.suppress(TimeoutError, ConnectionError):
            while discarded < LINGER_BYTES:
                data = await asyncio.wait_for(
                    self.reader.read(READ_SIZE), max(0.0, deadline - loop.time())
                )
                if not data:
                    return
                discarded += len(data)

    def _head(self, response: Response) -> h11.Response:
        headers = [
            ("server", "zeitwork"),
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        if response.status == 204:
            headers = [h for h in headers if h[0] not in ("content-length", "content-type")]
        if self.server.closing:
            headers.append(("connection", "close"))
        return h11.Response(status_code=response.status, headers=headers)

    async def _send(self, response: Response, request: Request | None) -> None:
        try:
            head = self._head(response)
        except (h11.LocalProtocolError, UnicodeError, ValueError):
            # A header the application made is not valid HTTP: a bug, answered as one.
            log.exception(
                "admin API: invalid answer to %s %s",
                request.method if request else "-",
                request.raw_path if request else "-",
            )
            response = Response(500, error_body("internal", "internal server error"))
            head = self._head(response)
        data = self.conn.send(head) or b""
        head_only = request is not None and request.method == "HEAD"
        if response.body and not head_only and response.status != 204:
            data += self.conn.send(h11.Data(data=response.body)) or b""
        data += self.conn.send(h11.EndOfMessage()) or b""
        await self._write(data)

    async def _write(self, data: bytes | None) -> None:
        if data:
            self.writer.write(data)
            await self.writer.drain()
