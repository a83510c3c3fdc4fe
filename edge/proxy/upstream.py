"""Upstream side of the proxy: per-instance connection pools and the response protocol.

An :class:`UpstreamConnection` carries one exchange at a time (no upstream pipelining). It
parses the instance's response with httptools and streams it to the client, re-framing the
body where the client needs another framing (chunked for HTTP/1.1 when the length is
unknown, close-delimited for HTTP/1.0). Connections that end a response cleanly go back to
their instance's pool, most recently used first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from time import perf_counter as _clock
from typing import TYPE_CHECKING, Final, cast

import httptools

from edge import metrics
from edge.proxy.http import (
    CLOSED_RESPONSE_PARSER,
    HOP_BY_HOP,
    VIA_TOKEN,
    as_protocol,
    connection_options,
    drop_fields,
    length_mask,
)
from edge.routing import Address

if TYPE_CHECKING:
    from edge.proxy.client import ClientConnection, Exchange
    from edge.proxy.worker import ProxyWorker

log = logging.getLogger("edge.upstream")

INF: Final = float("inf")

# How the response body is framed towards the client.
BODY_NONE: Final = 0  # HEAD, 1xx, 204, 304
BODY_LENGTH: Final = 1  # Content-Length passed through
BODY_CHUNKED: Final = 2  # re-chunked for an HTTP/1.1 client
BODY_RAW: Final = 3  # close-delimited, for an HTTP/1.0 client

# Response headers handled specially; everything else is copied as is.
_R_DROP: Final = 1
_R_TE: Final = 2
_R_CONNECTION: Final = 3
_R_CONTENT_LENGTH: Final = 4
_R_VIA: Final = 5
_R_UPGRADE: Final = 6
_R_HSTS: Final = 7
RESPONSE_SPECIAL = {
    **dict.fromkeys(HOP_BY_HOP, _R_DROP),
    b"connection": _R_CONNECTION,
    b"transfer-encoding": _R_TE,
    b"upgrade": _R_UPGRADE,
    b"content-length": _R_CONTENT_LENGTH,
    b"via": _R_VIA,
    b"strict-transport-security": _R_HSTS,
}
# Date, Server, Content-Type ... are told ordinary by the length of their name alone.
_SPECIAL_LENGTHS: Final = length_mask(RESPONSE_SPECIAL)

MAX_RESPONSE_HEAD: Final = 64 * 1024
_STATUS_200: Final = b"HTTP/1.1 200 OK\r\n"


class UpstreamError(Exception):
    """The instance sent something that is not a valid HTTP/1.1 response."""


class UpstreamPool:
    """Kept-alive connections to one instance, shared by every route that names it."""

    __slots__ = (
        "address",
        "busy",
        "closed",
        "down_until",
        "failures",
        "host",
        "idle",
        "port",
        "region",
        "worker",
    )

    def __init__(self, worker: ProxyWorker, address: Address) -> None:
        self.worker = worker
        self.address = address
        self.host = address.host
        self.port = address.port
        self.idle: list[UpstreamConnection] = []
        self.busy = 0  # connections carrying an exchange or being opened
        self.region = ""
        # Passive health: an instance that refused a connection or timed out is ejected (not
        # chosen) until down_until, for longer after each failure in a row.
        self.down_until = 0.0
        self.failures = 0
        self.closed = False

    def eject(self, now: float) -> None:
        limits = self.worker.limits
        self.failures += 1
        period = limits.ejection_time * 2 ** min(self.failures - 1, 16)
        self.down_until = now + min(period, limits.max_ejection_time)

    def acquire(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                self.busy += 1
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        self.busy -= 1
        if self.closed or len(self.idle) >= self.worker.limits.upstream_max_idle:
            conn.close()
            return
        conn.deadline = self.worker.now + self.worker.limits.upstream_idle_timeout
        self.idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        """Forget a connection that is closing (idle or busy)."""
        if conn.ex is not None or conn.connecting:
            self.busy -= 1
        else:
            with contextlib.suppress(ValueError):
                self.idle.remove(conn)

    def connect(self, client: ClientConnection, ex: Exchange) -> None:
        self.busy += 1
        self.worker.loop.create_task(self._connect(client, ex))

    async def _connect(self, client: ClientConnection, ex: Exchange) -> None:
        worker = self.worker
        conn = UpstreamConnection(self)
        conn.connecting = True
        try:
            await asyncio.wait_for(
                worker.loop.create_connection(lambda: as_protocol(conn), self.host, self.port),
                worker.limits.upstream_connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            self.busy -= 1
            self.eject(worker.now)
            timed_out = isinstance(exc, TimeoutError)
            worker.metrics.upstream_error(metrics.CONNECT_TIMEOUT if timed_out else metrics.CONNECT)
            kind = "timeout" if timed_out else (exc.strerror or str(exc))
            client.upstream_connect_failed(ex, self, kind)
            return
        conn.connecting = False
        if client.transport is None or ex.upstream is not None or ex.finished:
            # The client went away (or the exchange ended) while we connected: keep the
            # fresh connection for the next request.
            self.release(conn)
            return
        conn.attach(client, ex)
        conn.flush_request()

    def close(self) -> None:
        self.closed = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class UpstreamConnection:
    """The protocol of one connection to an instance (an asyncio protocol by its methods)."""

    __slots__ = (
        "chunked_in",
        "client",
        "connecting",
        "content_length",
        "deadline",
        "ex",
        "got_bytes",
        "has_hsts",
        "head_size",
        "headers",
        "headers_done",
        "interim",
        "keep_alive",
        "mode",
        "out",
        "parser",
        "pool",
        "reason",
        "response_timeout",
        "reused",
        "special",
        "transport",
        "tunnel",
        "worker",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.worker = pool.worker
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.client: ClientConnection | None = None
        self.ex: Exchange | None = None
        self.connecting = False
        self.deadline = INF
        self.reused = False
        self.tunnel = False
        self.out: list[bytes] = []
        self.interim = False
        self.mode = BODY_NONE
        self.keep_alive = False
        self.chunked_in = False
        self.response_timeout = pool.worker.limits.upstream_response_timeout
        self._reset_response()

    def _reset_response(self) -> None:
        # mode, keep_alive, chunked_in and content_length are set with every head.
        self.got_bytes = False
        # The head being built: [status line, name, ": ", value, "\r\n", ...].
        self.headers: list[bytes] = [b""]
        self.special: list[tuple[int, bytes, bytes]] = []
        self.content_length: bytes | None = None
        self.reason = b""
        self.head_size = 0
        self.headers_done = False
        # The instance set its own Strict-Transport-Security: the edge adds none.
        self.has_hsts = False

    # -- transport callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(high=self.worker.limits.write_high_water)
        self.worker.upstreams.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.parser = CLOSED_RESPONSE_PARSER
        self.worker.upstreams.discard(self)
        ex = self.ex
        self.pool.discard(self)
        if ex is None:
            return
        self.ex = None
        ex.upstream = None
        client = self.client
        self.client = None
        if client is None:
            return
        started = self.headers_done and not self.interim
        if self.tunnel:
            client.close()
        elif started and self.mode in (BODY_CHUNKED, BODY_RAW) and not self.chunked_in:
            # A response delimited by the connection's end (no length, not chunked) is
            # complete exactly now.
            if self.mode == BODY_CHUNKED:
                self.out.append(b"0\r\n\r\n")
            self._flush_to(client)
            client.response_done(ex)
        elif started:
            # Died mid-body: closing the client is the only honest signal left.
            self.worker.metrics.upstream_error(metrics.RESET)
            self._flush_to(client)
            client.abort("upstream closed mid-response")
        else:
            self.worker.metrics.upstream_error(metrics.RESET)
            client.upstream_lost(ex, self.pool, retryable=self.reused and not self.got_bytes)

    def eof_received(self) -> bool | None:
        # Let connection_lost decide (a close-delimited body ends here).
        return None

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_for_upstream()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_for_upstream()

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            # Bytes on an idle connection: the instance is confused; never reuse it.
            self.close()
            return
        self.deadline = self.worker.now + self.response_timeout
        if self.tunnel:
            # Traffic either way keeps a tunnel alive.
            client.deadline = self.worker.now + self.worker.limits.tunnel_idle_timeout
            client.write(data)
            return
        self.got_bytes = True
        head_pending = not self.headers_done
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._flush_to(client)
            if self.ex is not None and self.parser.get_status_code() == 101:
                client.start_tunnel(self, data[exc.args[0] :])
            else:
                self._bad_response("upgrade without 101")
            return
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, UpstreamError):
                self._bad_response(str(exc.__context__))
                return
            raise
        except httptools.HttpParserError as exc:
            self._bad_response(f"invalid response: {exc}")
            return
        if self.out:
            self._flush_to(client)
        if head_pending and not self.headers_done and self.ex is not None:
            # Responses are not pipelined: every byte since this one began is its head.
            self.head_size += len(data)
            if self.head_size > MAX_RESPONSE_HEAD:
                self._bad_response("response head too large")

    # -- request side ----------------------------------------------------------------

    def attach(self, client: ClientConnection, ex: Exchange) -> None:
        self.client = client
        self.ex = ex
        ex.upstream = self
        self.deadline = self.worker.now + self.worker.limits.upstream_response_timeout
        if client.write_paused and self.transport is not None:
            self.transport.pause_reading()

    def flush_request(self) -> None:
        ex = self.ex
        if ex is None or self.transport is None:
            return
        out = ex.out
        ex.head_sent = True
        if ex.out_size:
            ex.body_sent = True
            ex.out_size = 0
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()
        if self.client is not None and self.client.paused:
            self.client.resume_for_buffer()

    # -- parser callbacks ------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.headers_done:
            return  # trailer fields are not forwarded
        # Ordinary fields go straight into the head being built (after its status line).
        headers = self.headers
        if (_SPECIAL_LENGTHS >> len(name)) & 1:
            code = RESPONSE_SPECIAL.get(name.lower())
            if code == _R_CONTENT_LENGTH:
                self.content_length = value
            elif code == _R_HSTS:
                self.has_hsts = True
            elif code is not None:
                self.special.append((code, name, value))
                return
        headers.append(name)
        headers.append(b": ")
        headers.append(value)
        headers.append(b"\r\n")

    def on_headers_complete(self) -> None:
        ex = self.ex
        if ex is None:
            raise UpstreamError("sent a response nobody asked for")
        status = self.parser.get_status_code()
        self.headers_done = True
        if status < 200 and status != 101:
            self.interim = True
            # 100 Continue was already answered by the edge itself; other interim
            # responses (103 Early Hints) are passed to HTTP/1.1 clients.
            if status != 100 and ex.version_11:
                parts, _ = self._copy_headers(status)
                parts.append(b"\r\n")
                self.out.append(b"".join(parts))
            return
        self.keep_alive = self.parser.should_keep_alive()
        ex.status = status
        self.worker.metrics.upstream_answered(_clock() - ex.sent_at)
        parts, upgrade = self._copy_headers(status)
        if status == 101:
            # httptools reports the message complete, then raises HttpParserUpgrade with the
            # offset where the tunnel's bytes start; data_received switches to the tunnel.
            self.interim = True
            parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade or b"", b"\r\n\r\n")
            self.out.append(b"".join(parts))
            return
        if ex.hsts and not self.has_hsts:
            parts.append(ex.hsts)
        if ex.upgrade or not ex.request_done:
            # The client's parser handed its connection over to the upgrade, or the rest of
            # the request body would have to be drained: either way this connection ends here.
            ex.keep_alive = False
        if ex.is_head or status in (204, 304):
            mode = BODY_NONE
        elif self.content_length is not None:
            mode = BODY_LENGTH
        elif ex.version_11:
            mode = BODY_CHUNKED
            parts.append(b"Transfer-Encoding: chunked\r\n")
        else:
            mode = BODY_RAW
            ex.keep_alive = False
        self.mode = mode
        if self.worker.shutting_down:
            ex.keep_alive = False
        if not ex.keep_alive:
            parts.append(b"Connection: close\r\n")
        elif not ex.version_11:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(b"\r\n")
        head = b"".join(parts)
        if len(head) > MAX_RESPONSE_HEAD:
            self.headers_done = False  # nothing of it reached the client: answer 502
            raise UpstreamError("response head too large")
        self.out.append(head)
        if ex.is_head:
            # httptools cannot be told that a HEAD response has no body, so the parser would
            # wait for Content-Length bytes that never come: end the exchange here and do
            # not reuse this connection.
            self.keep_alive = False
            self._flush_to(self.client)
            self._finish(ex)

    def _copy_headers(self, status: int) -> tuple[list[bytes], bytes | None]:
        """The status line and the end-to-end headers of the response, plus Via."""
        parts = self.headers
        reason = self.reason
        if status == 200 and reason == b"OK":
            parts[0] = _STATUS_200
        else:
            parts[0] = b"HTTP/1.1 %d %s\r\n" % (status, reason)
        self.chunked_in = False
        via = None
        drop_extra: list[bytes] | None = None
        if self.content_length is not None and (status < 200 or status == 204):
            drop_extra = [b"content-length"]  # these never have a body to frame
        upgrade = None
        for code, _, value in self.special:
            if code == _R_TE:
                self.chunked_in = True
            elif code == _R_VIA:
                via = value if via is None else via + b", " + value
            elif code == _R_UPGRADE:
                upgrade = value
            elif code == _R_CONNECTION:
                extra = connection_options(value)
                if extra:
                    drop_extra = (drop_extra or []) + extra
        if drop_extra:
            parts = drop_fields(parts, 1, drop_extra)
        parts += (b"Via: ", via + b", " + VIA_TOKEN if via else VIA_TOKEN, b"\r\n")
        return parts, upgrade

    def on_body(self, body: bytes) -> None:
        mode = self.mode
        if mode == BODY_CHUNKED:
            self.out += (b"%x\r\n" % len(body), body, b"\r\n")
        elif mode != BODY_NONE:
            self.out.append(body)

    def on_message_complete(self) -> None:
        if self.interim:
            # The final response's head follows.
            self.interim = False
            self.headers = [b""]
            self.special = []
            self.content_length = None
            self.reason = b""
            self.head_size = 0
            self.headers_done = False
            self.has_hsts = False
            return
        ex = self.ex
        if ex is None or ex.finished:
            return  # a HEAD exchange already ended at its head
        out = self.out
        if self.mode == BODY_CHUNKED:
            out.append(b"0\r\n\r\n")
        if out:
            self._flush_to(self.client)
        self._finish(ex)

    # -- endings ---------------------------------------------------------------------

    def _finish(self, ex: Exchange) -> None:
        client = self.client
        reusable = self.keep_alive and ex.request_done and not self.tunnel
        self.ex = None
        self.client = None
        ex.upstream = None
        self.pool.failures = 0  # it answered: a later failure starts a short ejection again
        self._reset_response()
        if reusable:
            self.reused = True
            self.deadline = INF
            if client is not None and client.write_paused and self.transport is not None:
                self.transport.resume_reading()  # paused for that client; idle reads see EOF
            self.pool.release(self)
        else:
            self.pool.busy -= 1
            self.close()
        if client is not None:
            client.response_done(ex)

    def _flush_to(self, client: ClientConnection | None) -> None:
        if self.out:
            if client is not None:
                client.write_many(self.out)
            self.out.clear()

    def _bad_response(self, why: str) -> None:
        ex, client = self.ex, self.client
        log.warning("upstream %s: %s", self.pool.address, why)
        self.worker.metrics.upstream_error(metrics.PROTOCOL)
        self.ex = None
        self.client = None
        if ex is not None:
            ex.upstream = None
            self.pool.busy -= 1
        else:
            self.pool.discard(self)  # it was idle in its pool already
        self._abandon()
        if client is None or ex is None:
            return
        if self.headers_done:
            client.abort(why)
        else:
            client.upstream_failed(ex, 502, "the instance sent an invalid response")

    def on_timeout(self) -> None:
        ex, client = self.ex, self.client
        if ex is None or client is None:
            self.close()  # idle in the pool for too long
            return
        self.ex = None
        self.client = None
        ex.upstream = None
        self.pool.busy -= 1
        if not self.tunnel:
            self.pool.eject(self.worker.now)
            self.worker.metrics.upstream_error(metrics.TIMEOUT)
        self._abandon()
        if self.tunnel:
            client.close()
        elif self.headers_done:
            client.abort("upstream response timed out")
        else:
            client.upstream_failed(ex, 504, "the instance did not answer in time")

    def detach_from_client(self) -> None:
        """The client went away: this connection is mid-exchange and cannot be reused."""
        if self.ex is not None:
            self.ex.upstream = None
            self.ex = None
            self.pool.busy -= 1
        self.client = None
        self._abandon()

    def _abandon(self) -> None:
        self.worker.upstreams.discard(self)
        self.pool = _DETACHED
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class _DetachedPool(UpstreamPool):
    """The pool of a connection already accounted for and being torn down: it has no worker
    and forgets nothing, because nothing of the connection is left in any pool."""

    def __init__(self) -> None:  # no super().__init__: there is no worker to belong to
        self.address = Address("detached", 0)
        self.host = self.address.host
        self.port = 0
        self.idle = []
        self.busy = 0
        self.region = ""
        self.down_until = 0.0
        self.failures = 0
        self.closed = True

    def discard(self, conn: UpstreamConnection) -> None:
        pass


_DETACHED: UpstreamPool = _DetachedPool()
