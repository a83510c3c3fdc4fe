"""Client side of the proxy: parses requests with httptools and hands them to upstreams.

One :class:`ClientConnection` per accepted socket. Requests are :class:`Exchange` objects
served strictly in order: a pipelined request waits in a queue (and reading pauses) until the
response before it is complete. The proxy answers itself only what it must: malformed or
over-limit requests, unknown hosts, and instances that cannot be reached.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from time import perf_counter as _clock
from typing import TYPE_CHECKING, Any, Final, cast

import httptools

from edge import accesslog
from edge.proxy.http import (
    ACME_CHALLENGE,
    ALLOWED_METHODS,
    CLOSED_REQUEST_PARSER,
    CONTINUE_100,
    HOP_BY_HOP,
    VIA_TOKEN,
    RequestRejected,
    connection_options,
    drop_fields,
    error_response,
    https_location,
    length_mask,
)

if TYPE_CHECKING:
    from edge.proxy.upstream import UpstreamConnection, UpstreamPool
    from edge.proxy.worker import ProxyWorker, Route
    from edge.ratelimit import Limiter

log = logging.getLogger("edge.proxy")

_VIA_LINE: Final = b"\r\nVia: " + VIA_TOKEN + b"\r\n"

INF: Final = float("inf")

# Reasons for which reading from the client is paused (a bit mask).
_PAUSE_UPSTREAM: Final = 1  # the upstream's write buffer is above its high-water mark
_PAUSE_PIPELINE: Final = 2  # a pipelined request waits for the response before it
_PAUSE_BUFFER: Final = 4  # request body buffered while the upstream connection is being opened
_PAUSE_DEAD: Final = 8  # the parser failed or the connection is closing: never read again

# Request headers handled specially; all others are forwarded as they are.
_H_DROP: Final = 1
_H_HOST: Final = 2
_H_CONTENT_LENGTH: Final = 3
_H_TE: Final = 4
_H_CONNECTION: Final = 5
_H_UPGRADE: Final = 6
_H_EXPECT: Final = 7
_H_XFF: Final = 8
_H_XFP: Final = 9
_H_XFH: Final = 10
_H_REQUEST_ID: Final = 11
_H_VIA: Final = 12
REQUEST_SPECIAL = {
    **dict.fromkeys(HOP_BY_HOP, _H_DROP),
    b"host": _H_HOST,
    b"content-length": _H_CONTENT_LENGTH,
    b"transfer-encoding": _H_TE,
    b"connection": _H_CONNECTION,
    b"upgrade": _H_UPGRADE,
    b"expect": _H_EXPECT,
    b"x-forwarded-for": _H_XFF,
    b"x-forwarded-proto": _H_XFP,
    b"x-forwarded-host": _H_XFH,
    b"x-request-id": _H_REQUEST_ID,
    b"via": _H_VIA,
}

# Most fields (User-Agent aside) are told ordinary by the length of their name alone.
_SPECIAL_LENGTHS: Final = length_mask(REQUEST_SPECIAL)


class Exchange:
    """One request and its response."""

    __slots__ = (
        "attempts",
        "body_len",
        "body_sent",
        "bytes_out",
        "chunked",
        "error",
        "expect_continue",
        "finished",
        "head",
        "head_sent",
        "host",
        "hsts",
        "is_head",
        "keep_alive",
        "method",
        "out",
        "out_size",
        "pool",
        "request_done",
        "request_id",
        "route",
        "sent_at",
        "started",
        "status",
        "target",
        "upgrade",
        "upstream",
        "version_11",
    )

    def __init__(self) -> None:
        self.head = b""
        self.head_sent = False
        self.out: list[bytes] = []
        self.out_size = 0  # body bytes in ``out`` not yet written upstream
        self.body_len = 0
        self.body_sent = False
        self.chunked = False
        self.request_done = False
        self.finished = False
        self.keep_alive = True
        self.version_11 = True
        self.is_head = False
        self.expect_continue = False
        self.upgrade = False
        self.error: RequestRejected | None = None
        self.route: Route | None = None
        # The route's Strict-Transport-Security line, on HTTPS (b"": none to add).
        self.hsts = b""
        self.upstream: UpstreamConnection | None = None
        self.request_id = b""
        self.attempts = 0
        # For the metrics: the response's status, when the request began and when it was
        # last sent to an instance (monotonic seconds).
        self.status = 0
        self.started = _clock()
        self.sent_at = 0.0
        # The instance it was last sent to, and what the access log needs (set only while
        # the access log is on).
        self.pool: UpstreamPool | None = None
        self.method = self.target = self.host = b""
        self.bytes_out = 0


class ClientConnection:
    """The protocol of one client connection (an asyncio protocol by its methods: a class
    compiled by mypyc cannot subclass :class:`asyncio.Protocol`)."""

    __slots__ = (
        "active",
        "bytes_out",
        "closing",
        "cur",
        "deadline",
        "feeding",
        "forwarded",
        "head_size",
        "headers",
        "host",
        "host_count",
        "limits",
        "parser",
        "paused",
        "peer",
        "queue",
        "scheme",
        "special",
        "tls",
        "transport",
        "trusted",
        "tunnel",
        "tunnel_buf",
        "url",
        "worker",
        "write_paused",
    )

    def __init__(self, worker: ProxyWorker, *, tls: bool = False) -> None:
        self.worker = worker
        # Whether the connection came in on the HTTPS listener (TLS terminated below us).
        self.tls = tls
        self.scheme = b"https" if tls else b"http"
        self.limits = worker.limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.cur: Exchange | None = None  # being parsed
        self.active: Exchange | None = None  # being answered
        self.queue: deque[Exchange] | None = None  # parsed, waiting their turn
        self.url = b""
        self.headers: list[bytes] = []
        self.special: list[tuple[int, bytes]] = []
        self.host = b""
        self.host_count = 0
        self.head_size = 0
        self.paused = 0
        self.write_paused = False
        self.closing = False
        self.deadline = INF
        self.feeding = False
        self.peer = b""
        # Bytes written to the client so far (the access log's bytes out).
        self.bytes_out = 0
        self.forwarded = b""
        self.trusted = False
        self.tunnel: UpstreamConnection | None = None
        self.tunnel_buf: list[bytes] | None = None

    # -- transport callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        ip = peer[0] if peer else ""
        self.peer = ip.encode()
        self.trusted = self.worker.is_trusted(ip)
        self.forwarded = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: " % (
            self.peer,
            self.scheme,
        )
        transport.set_write_buffer_limits(high=self.limits.write_high_water)
        self.worker.clients.add(self)
        # A connection that never sends a request is closed like an idle keep-alive one.
        self.deadline = self.worker.now + self.limits.header_timeout
        if self.worker.shutting_down:
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.parser = CLOSED_REQUEST_PARSER
        self.worker.clients.discard(self)
        self._release_all()

    def _release_all(self) -> None:
        """Drop every exchange; their upstream connections are mid-use and are discarded."""
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.detach_from_client()
        exchanges = [ex for ex in (self.active, self.cur) if ex is not None]
        if self.queue:
            exchanges += self.queue
        self.active = self.cur = None
        self.queue = None
        for ex in exchanges:
            ex.finished = True
            if ex.upstream is not None:
                ex.upstream.detach_from_client()

    def eof_received(self) -> bool:
        # The client closed its side. Like nginx (without proxy_ignore_client_abort), treat
        # that as giving up: whatever is in flight is abandoned and the instance's connection
        # discarded, instead of holding both until the response comes.
        if self.active is not None or self.cur is not None or self.tunnel is not None:
            log.debug("client %s: closed the connection before its response", self.peer.decode())
        self.close()
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        up = self.tunnel or (self.active.upstream if self.active is not None else None)
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        up = self.tunnel or (self.active.upstream if self.active is not None else None)
        if up is not None and up.transport is not None:
            up.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            self.deadline = self.worker.now + self.limits.tunnel_idle_timeout
            if tunnel.transport is not None:
                tunnel.transport.write(data)
            return
        if self.tunnel_buf is not None:
            self.tunnel_buf.append(data)
            return
        self.feeding = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_pending(data[exc.args[0] :])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if not isinstance(cause, RequestRejected):
                raise
            self._reject(cause)
        except httptools.HttpParserError as exc:
            self._reject(RequestRejected(400, f"malformed request: {exc}"))
        finally:
            self.feeding = False
        ex = self.active
        if ex is not None and ex.out and ex.upstream is not None:
            ex.upstream.flush_request()

    # -- request parsing -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.cur = Exchange()
        self.url = b""
        # The head for the instance is built as the fields arrive: [method, " ", target,
        # " HTTP/1.1\r\n", name, ": ", value, "\r\n", ...]; special fields wait aside.
        self.headers = [b"", b" ", b"", b" HTTP/1.1\r\n"]
        self.special = []
        self.host_count = 0
        self.head_size = 0
        self.deadline = self.worker.now + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self.url += url
        self.head_size += len(url)
        if self.head_size > self.limits.max_header_size:
            raise RequestRejected(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.head_size += len(name) + len(value) + 4
        if self.head_size > self.limits.max_header_size:
            raise RequestRejected(431, "request header fields too large")
        ex = self.cur
        if ex is None or ex.head:
            return  # a trailer field of a chunked body; not forwarded
        headers = self.headers
        if (_SPECIAL_LENGTHS >> len(name)) & 1:
            code = REQUEST_SPECIAL.get(name.lower())
            if code is not None:
                if code != _H_HOST:
                    self.special.append((code, value))
                    return
                self.host_count += 1
                self.host = value
        headers.append(name)
        headers.append(b": ")
        headers.append(value)
        headers.append(b"\r\n")

    def on_headers_complete(self) -> None:
        ex = self.cur
        assert ex is not None
        parser = self.parser
        worker = self.worker
        version = parser.get_http_version()
        if version == "1.1":
            pass
        elif version == "1.0":
            ex.version_11 = False
        else:
            raise RequestRejected(505, f"HTTP/{version} is not supported")
        method = parser.get_method()
        if method == b"CONNECT":
            raise RequestRejected(405, "CONNECT is not allowed", close=True)
        ex.is_head = method == b"HEAD"

        host = self.host
        host_count = self.host_count
        content_length = te = connection = upgrade = expect = None
        xff = xfp = xfh = request_id = via = None
        parts = self.headers
        for code, value in self.special:
            if code == _H_CONTENT_LENGTH:
                content_length = value
            elif code == _H_TE:
                te = value if te is None else te + b"," + value
            elif code == _H_CONNECTION:
                connection = value if connection is None else connection + b"," + value
            elif code == _H_XFF:
                xff = value if xff is None else xff + b", " + value
            elif code == _H_XFP:
                xfp = value
            elif code == _H_XFH:
                xfh = value
            elif code == _H_REQUEST_ID:
                request_id = value
            elif code == _H_VIA:
                via = value if via is None else via + b", " + value
            elif code == _H_UPGRADE:
                upgrade = value
            elif code == _H_EXPECT:
                expect = value

        if upgrade is not None and parser.should_upgrade():
            # The parser hands the rest of the connection to the upgrade: unless a 101 turns
            # it into a tunnel, it ends with this exchange. (It upgrades only with an Upgrade
            # header: CONNECT, its other case, was refused above.)
            ex.keep_alive = False
        if host_count != 1 or not host:
            raise RequestRejected(
                400, "missing Host header" if host_count == 0 else "exactly one Host header needed"
            )
        if te is not None:
            if te.strip().lower() != b"chunked":
                raise RequestRejected(400, "Transfer-Encoding other than chunked")
            ex.chunked = True
            if not ex.version_11:
                ex.keep_alive = False
        elif content_length is not None:
            size = int(content_length)
            if size > self.limits.max_body_size:
                raise RequestRejected(413, "request body too large")
        has_body = ex.chunked or (content_length is not None and content_length != b"0")
        if expect is not None:
            if expect.lower() != b"100-continue":
                raise RequestRejected(417, "unsupported Expect")
            ex.expect_continue = has_body and ex.version_11

        trusted = self.trusted
        if trusted and request_id:
            ex.request_id = request_id
        else:
            worker.request_count += 1
            ex.request_id = b"%s%012x" % (worker.request_id_prefix, worker.request_count)

        target = self.url
        if target[:1] != b"/":
            target = self._origin_form(method, target, host)

        if worker.access_log is not None:
            ex.method, ex.target, ex.host = method, target, host
            ex.bytes_out = self.bytes_out
        limiter = worker.client_limiter
        if limiter is not None and not target.startswith(ACME_CHALLENGE):
            # The client after trusted-proxy handling: the address that reached the proxy
            # nearest to us, else the peer. ACME challenges are never limited (issuance
            # must not fail because a validator shares an address with a flood).
            client = xff.rpartition(b",")[2].strip() if trusted and xff else self.peer
            wait = limiter.check(client, ex.started)
            if wait:
                self._refuse(ex, limiter, client, wait, host=host, body=has_body, scope=0)
                return

        # Plain HTTP: redirected to HTTPS, or an ACME challenge answered from the table.
        if (
            not self.tls
            and (
                worker.https_redirect is not None
                or (worker.challenges is not None and target.startswith(ACME_CHALLENGE))
            )
            and self._plain_http(ex, target, host, has_body)
        ):
            return

        # The Host as sent is the usual key; only when it is not one is a port or a trailing
        # dot taken off (no route's host has either).
        name = host.lower()
        route = worker.routes.get(name)
        if route is None:
            if b":" in name and name[-1:].isdigit():
                name = name.rpartition(b":")[0]
            route = worker.routes.get(name.rstrip(b"."))
        if route is not None and self.tls:
            ex.hsts = route.hsts
        if route is None or not route.pools:
            status, message = (404, "no such host") if route is None else (503, "no instances")
            # Without a body the connection can stay: nothing is left unread.
            error = RequestRejected(status, message, close=has_body)
            if not has_body:
                ex.error = error
                ex.request_done = True  # nothing follows the head
                self._submit(ex)
                return
            raise error
        limiter = route.limiter
        if limiter is not None and not target.startswith(ACME_CHALLENGE):
            wait = limiter.check(b"", ex.started)
            if wait:
                self._refuse(ex, limiter, b"", wait, host=host, body=has_body, scope=1)
                return
        ex.route = route

        # HTTP/1.1 without a Connection header keeps the connection; only other cases ask.
        if (connection is not None or not ex.version_11) and not parser.should_keep_alive():
            ex.keep_alive = False
        if connection is not None:
            extra = connection_options(connection)
            if extra:
                parts = drop_fields(parts, 4, extra)
            if upgrade is not None and parser.should_upgrade():
                ex.upgrade = True
                parts += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n")

        if not trusted and via is None:
            # The common case, with the per-connection part precomputed.
            parts += (self.forwarded, host, b"\r\nX-Request-Id: ", ex.request_id, _VIA_LINE)
        else:
            parts += (
                b"X-Forwarded-For: ",
                xff + b", " + self.peer if trusted and xff else self.peer,
                b"\r\nX-Forwarded-Proto: ",
                xfp if trusted and xfp else self.scheme,
                b"\r\nX-Forwarded-Host: ",
                xfh if trusted and xfh else host,
                b"\r\nX-Request-Id: ",
                ex.request_id,
                b"\r\nVia: ",
                via + b", " + VIA_TOKEN if via else VIA_TOKEN,
                b"\r\n",
            )
        if ex.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
        elif content_length is not None:
            parts += (b"Content-Length: ", content_length, b"\r\n\r\n")
        else:
            parts.append(b"\r\n")
        parts[0] = method
        parts[2] = target
        ex.head = b"".join(parts)
        ex.out.append(ex.head)
        if has_body:
            self.deadline = worker.now + self.limits.body_timeout
        else:
            self.deadline = INF
        self._submit(ex)

    def _plain_http(self, ex: Exchange, target: bytes, host: bytes, has_body: bool) -> bool:
        """Answer a plain HTTP request that is not proxied: an ACME challenge (from the
        routing table), or, while HTTPS is on, a redirect to it. False: proxy it."""
        worker = self.worker
        if target.startswith(ACME_CHALLENGE):
            challenges = worker.challenges
            if challenges is None:
                return False  # no challenges from a routes file: the app may answer its own
            token = target[len(ACME_CHALLENGE) :].partition(b"?")[0]
            found = challenges.get(token)
            if found is not None and found[1] > time.time():
                answer = RequestRejected(
                    200, "", close=has_body, body=found[0], content_type=b"text/plain"
                )
            else:
                answer = RequestRejected(404, "no such ACME challenge", close=has_body)
        elif worker.https_redirect is None:
            return False
        else:
            location = https_location(host, target, worker.https_redirect)
            if location is None:
                raise RequestRejected(400, "invalid Host header")
            answer = RequestRejected(
                308,
                location.decode("latin-1"),
                close=has_body,
                extra=b"Location: " + location + b"\r\n",
            )
        if has_body:
            raise answer  # the body is left unread: the connection closes after the answer
        ex.error = answer
        ex.request_done = True
        self._submit(ex)
        return True

    def _refuse(
        self,
        ex: Exchange,
        limiter: Limiter,
        key: bytes,
        wait: float,
        *,
        host: bytes,
        body: bool,
        scope: int,
    ) -> None:
        """Answer 429 for a request over ``limiter`` (scope 0: its client, 1: its project),
        ``wait`` seconds before it would pass; with a body unread, the connection closes."""
        self.worker.rate_limited(key or self.peer, host, limiter, scope)
        error = RequestRejected(
            429,
            "too many requests",
            close=body,
            extra=limiter.deny_headers(key, ex.started, wait),
        )
        if body:
            raise error
        ex.error = error
        ex.request_done = True
        self._submit(ex)

    def _origin_form(self, method: bytes, target: bytes, host: bytes) -> bytes:
        """Turn an absolute-form target into origin form; refuse one naming another host."""
        if target == b"*" and method == b"OPTIONS":
            return target
        lowered = target[:8].lower()
        if not (lowered.startswith((b"http://", b"https://"))):
            raise RequestRejected(400, "invalid request target")
        try:
            # Any: httptools' stubs promise bytes and int where a missing part is None, and
            # compiled code checks the promise.
            url: Any = httptools.parse_url(target)
        except httptools.HttpParserInvalidURLError:
            raise RequestRejected(400, "invalid request target") from None
        if not url.host:
            raise RequestRejected(400, "invalid request target")
        url_host: bytes = url.host.lower()
        authority = url_host + (b":%d" % url.port if url.port else b"")
        wanted = host.lower()
        if wanted not in (authority, url_host):
            raise RequestRejected(400, "request target names another host than Host")
        path: bytes = url.path or b"/"
        return path + b"?" + url.query if url.query else path

    def on_body(self, body: bytes) -> None:
        ex = self.cur
        if ex is None:
            return
        n = len(body)
        ex.body_len += n
        if ex.chunked:
            if ex.body_len > self.limits.max_body_size:
                raise RequestRejected(413, "request body too large")
            ex.out += (b"%x\r\n" % n, body, b"\r\n")
        else:
            ex.out.append(body)
        ex.out_size += n
        self.deadline = self.worker.now + self.limits.body_timeout
        if ex.upstream is None and ex.out_size > self.limits.write_high_water:
            self._pause(_PAUSE_BUFFER)

    def on_message_complete(self) -> None:
        ex = self.cur
        if ex is None:
            return  # answered and closed while its head was being parsed
        self.cur = None
        ex.request_done = True
        if ex.chunked:
            ex.out.append(b"0\r\n\r\n")
        if not ex.finished:
            self.deadline = INF

    def _upgrade_pending(self, rest: bytes) -> None:
        """The parser handed over an upgrade request: hold the client's bytes until 101."""
        self.tunnel_buf = [rest] if rest else []
        self._pause(_PAUSE_DEAD)

    # -- exchanges -------------------------------------------------------------------

    def _submit(self, ex: Exchange) -> None:
        if self.active is None:
            self._start(ex)
        else:
            if self.queue is None:
                self.queue = deque()
            self.queue.append(ex)
            self._pause(_PAUSE_PIPELINE)

    def _start(self, ex: Exchange) -> None:
        self.active = ex
        if ex.error is not None:
            self._answer(ex, ex.error)
            return
        route = ex.route
        assert route is not None
        pools = route.pools
        pool = pools[0] if len(pools) == 1 else route.pick(self.worker.now, None)
        if ex.expect_continue and not ex.request_done:
            self.write(CONTINUE_100)
        self._dispatch(ex, pool)

    def _dispatch(self, ex: Exchange, pool: UpstreamPool) -> None:
        ex.attempts += 1
        ex.sent_at = _clock()
        ex.pool = pool
        conn = pool.acquire()
        if conn is not None:
            conn.attach(self, ex)
            if not self.feeding:
                conn.flush_request()
            return
        pool.connect(self, ex)

    def _retry(self, ex: Exchange, failed: UpstreamPool, status: int, why: str) -> None:
        if (
            ex.attempts <= self.limits.retries
            and not ex.body_sent
            and ex.route is not None
            and self.transport is not None
        ):
            pool = ex.route.pick(self.worker.now, failed)
            self.worker.metrics.retries += 1
            if ex.head_sent:
                ex.out.insert(0, ex.head)
                ex.head_sent = False
            self._dispatch(ex, pool)
            return
        log.warning("upstream %s failed for %s: %s", failed.address, ex.request_id.decode(), why)
        self.upstream_failed(ex, status, "the instance could not be reached")

    def upstream_connect_failed(self, ex: Exchange, pool: UpstreamPool, why: str) -> None:
        if ex.finished or self.transport is None:
            return
        self._retry(ex, pool, 502, f"connect: {why}")

    def upstream_lost(self, ex: Exchange, pool: UpstreamPool, retryable: bool) -> None:
        """An upstream closed before sending any response byte."""
        if ex.finished or self.transport is None:
            return
        if retryable:
            self._retry(ex, pool, 502, "reused connection closed")
        else:
            self.upstream_failed(ex, 502, "the instance closed the connection")

    def upstream_failed(self, ex: Exchange, status: int, message: str) -> None:
        """Answer ``ex`` with a gateway error (nothing of the response was sent yet)."""
        if ex.finished or self.transport is None:
            return
        ex.upstream = None
        # The request body may still be arriving; without it the connection cannot be reused.
        close = not ex.request_done
        self._answer(ex, RequestRejected(status, message, close=close))

    def response_done(self, ex: Exchange) -> None:
        ex.finished = True
        if ex.status:
            self.worker.metrics.request_done(ex.status, _clock() - ex.started)
            if self.worker.access_log is not None:
                self._log_access(ex)
        if self.active is ex:
            self.active = None
        if self.transport is None:
            return
        if self.paused:
            self._resume(_PAUSE_UPSTREAM)
        if not ex.keep_alive or not ex.request_done or self.closing:
            self.close()
            return
        queue = self.queue
        if queue:
            nxt = queue.popleft()
            if not queue:
                self._resume(_PAUSE_PIPELINE)
            self._start(nxt)
            return
        if self.paused:
            self._resume(_PAUSE_PIPELINE)
        if self.cur is None:
            self.deadline = self.worker.now + self.limits.keepalive_timeout

    def _answer(self, ex: Exchange, error: RequestRejected) -> None:
        """Write the proxy's own response for ``ex`` and end the exchange."""
        close = error.close or not ex.keep_alive or self.worker.shutting_down
        extra = error.extra
        if error.status == 503:
            extra = b"Retry-After: 5\r\n"
        elif error.status == 405:
            extra = b"Allow: " + ALLOWED_METHODS + b"\r\n"
        if ex.hsts:
            extra += ex.hsts
        self.write(
            error_response(
                error.status,
                error.message,
                close=close,
                date=self.worker.date,
                request_id=ex.request_id,
                extra=extra,
                head_only=ex.is_head,
                body=error.body,
                content_type=error.content_type,
            )
        )
        ex.keep_alive = not close
        ex.status = error.status
        self.response_done(ex)

    def _reject(self, error: RequestRejected) -> None:
        """The request being parsed cannot be served: answer in turn, then close."""
        error.close = True
        self._pause(_PAUSE_DEAD)
        ex = self.cur or Exchange()
        self.cur = None
        submitted = bool(ex.head) or ex.error is not None
        ex.error = error
        ex.keep_alive = False
        if ex is self.active:
            up = ex.upstream
            if up is not None:
                # A chunked body outgrew the limit or broke while being streamed.
                started = up.headers_done
                up.detach_from_client()
                if started:
                    self.abort(error.message)
                    return
            self._answer(ex, error)
        elif not submitted and not ex.finished:
            self._submit(ex)

    def start_tunnel(self, upstream: UpstreamConnection, rest: bytes) -> None:
        """The instance answered 101: relay raw bytes both ways from now on."""
        ex = self.active
        if ex is None or not ex.upgrade or self.tunnel_buf is None:
            upstream.detach_from_client()
            self.abort("101 for a request that did not ask to upgrade")
            return
        self.active = None
        ex.finished = True
        upstream.tunnel = True
        upstream.deadline = INF
        self.tunnel = upstream
        self.deadline = self.worker.now + self.limits.tunnel_idle_timeout
        if rest:
            self.write(rest)
        if upstream.transport is not None:
            upstream.transport.writelines(self.tunnel_buf)
        self.tunnel_buf = None
        self.paused = 0
        if self.transport is not None:
            self.transport.resume_reading()

    # -- output and flow control -----------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)
            self.bytes_out += len(data)

    def write_many(self, data: list[bytes]) -> None:
        if self.transport is not None:
            joined = data[0] if len(data) == 1 else b"".join(data)
            self.transport.write(joined)
            self.bytes_out += len(joined)

    def _log_access(self, ex: Exchange) -> None:
        log = self.worker.access_log
        assert log is not None
        pool = ex.pool
        log.record(
            {
                "time": accesslog.timestamp(),
                "request_id": ex.request_id.decode("latin-1"),
                "client": self.peer.decode("latin-1"),
                "host": ex.host.decode("latin-1"),
                "method": ex.method.decode("latin-1"),
                "path": ex.target.decode("latin-1"),
                "status": ex.status,
                "bytes_in": ex.body_len,
                "bytes_out": self.bytes_out - ex.bytes_out,
                "duration_ms": round((_clock() - ex.started) * 1000, 3),
                "upstream": None if pool is None else str(pool.address),
                "region": None if pool is None else pool.region or None,
            }
        )

    def pause_for_upstream(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def resume_for_upstream(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    def resume_for_buffer(self) -> None:
        self._resume(_PAUSE_BUFFER)

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None:
                self.transport.resume_reading()

    # -- endings ---------------------------------------------------------------------

    def on_timeout(self) -> None:
        ex = self.cur
        if self.tunnel is not None or ex is None:
            self.close()  # idle keep-alive, idle tunnel, or a connection that never spoke
            return
        why = "request head" if not ex.head else "request body"
        log.debug("client %s: %s timed out", self.peer.decode(), why)
        if self.active is None or self.active is ex:
            if ex.upstream is not None:
                ex.upstream.detach_from_client()
                self.abort(f"{why} timed out")
                return
            self.write(error_response(408, f"{why} timed out", close=True, date=self.worker.date))
        self.close()

    def shutdown(self) -> None:
        """Graceful stop: finish what is in flight, then close."""
        self.closing = True
        if self.active is None and self.cur is None and self.tunnel is None:
            self.close()

    def abort(self, why: str) -> None:
        log.info("client %s: connection closed: %s", self.peer.decode(), why)
        self.close()

    def close(self) -> None:
        self.paused |= _PAUSE_DEAD
        if self.transport is not None:
            self.transport.close()
        self._release_all()
