"""Fake transports and a fake instance for driving the real proxy protocols without sockets.

A :class:`ProtocolRig` is a real :class:`ProxyWorker` (routes installed, ticker not started)
whose loop opens no sockets: ``create_connection`` hands the real ``UpstreamConnection`` a
:class:`FakeTransport`. Each upstream transport is seen from the instance's side by a
:class:`FakeInstance`, which parses what the proxy sent with h11 and answers by calling the
connection's ``data_received``. Time only moves when a test calls :meth:`fire_timeouts`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11

from edge.config import EdgeConfig, ProxyLimits, parse_networks
from edge.proxy.client import ClientConnection
from edge.proxy.http import as_protocol
from edge.proxy.upstream import UpstreamConnection, UpstreamPool
from edge.proxy.worker import ProxyWorker
from edge.routing import Address, FileRouteProvider, parse_address, parse_routes_document

CLIENT_PEER = ("203.0.113.7", 40000)
FIXED_DATE = b"Thu, 01 Jan 2026 00:00:00 GMT"
REQUEST_ID = re.compile(rb"X-Request-Id: ([0-9a-f]{32})\r\n")


class FakeTransport:
    """Records what a protocol does to its transport; delivers nothing by itself.

    ``close``/``abort`` schedule ``connection_lost`` on the loop the way a real transport
    does (when one is given), so a protocol sees its usual callback order.
    """

    def __init__(
        self,
        protocol: asyncio.BaseProtocol | None = None,
        *,
        peer: tuple[str, int] = CLIENT_PEER,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.protocol = protocol
        self.peer = peer
        self.loop = loop
        self.chunks: list[bytes] = []
        self.after_close: list[bytes] = []  # writes a real transport would have dropped
        self.reading = True
        self.pauses = 0
        self.resumes = 0
        self.closing = False
        self.aborted = False
        self.lost = False
        self.high_water: int | None = None

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def take(self) -> bytes:
        """Everything written since the last take."""
        data = self.data
        self.chunks.clear()
        return data

    # -- the asyncio.Transport surface the proxy uses ---------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        (self.after_close if self.closing else self.chunks).append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        # The proxy clears its list right after the call: copy now, like a real transport.
        for data in list_of_data:
            self.write(data)

    def pause_reading(self) -> None:
        if self.closing:
            return
        self.pauses += 1
        self.reading = False

    def resume_reading(self) -> None:
        if self.closing:
            return
        self.resumes += 1
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading and not self.closing

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.loop is not None:
            self.loop.call_soon(self._lose)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def _lose(self) -> None:
        if not self.lost and self.protocol is not None:
            self.lost = True
            self.protocol.connection_lost(None)

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high_water = high

    def get_write_buffer_size(self) -> int:
        return 0


@dataclass
class ReceivedRequest:
    """One request as an instance received it from the proxy."""

    raw: bytes  # exactly the bytes of this request on the wire
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes  # decoded (de-chunked)
    answered: bool = False

    @property
    def head(self) -> bytes:
        return self.raw[: self.raw.index(b"\r\n\r\n") + 4]

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return b", ".join(values) if values else None


def _server_parser() -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)


class FakeInstance:
    """The instance's end of one upstream connection, parsing requests with h11."""

    def __init__(self, conn: UpstreamConnection, transport: FakeTransport, address: str) -> None:
        self.conn = conn
        self.transport = transport
        self.address = address
        self.requests: list[ReceivedRequest] = []
        self._fed = 0  # bytes of transport.chunks given to the parser so far
        self.broken: str | None = None  # why h11 refused what the proxy sent, if it did
        self._parser = _server_parser()
        self._stream = b""  # bytes since the start of the request being parsed
        self._request: h11.Request | None = None
        self._body = b""

    def poll(self) -> list[ReceivedRequest]:
        """Parse what the proxy wrote since the last poll; return all complete requests."""
        chunks = self.transport.chunks
        while self._fed < len(chunks):
            data = chunks[self._fed]
            self._fed += 1
            self._stream += data
            if self.broken is not None:
                continue
            try:
                self._parser.receive_data(data)
                self._drain()
            except h11.RemoteProtocolError as exc:
                self.broken = str(exc)
        return self.requests

    def _drain(self) -> None:
        while True:
            event = self._parser.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._request = event
            elif isinstance(event, h11.Data):
                self._body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert self._request is not None
                rest, _ = self._parser.trailing_data
                raw = self._stream[: len(self._stream) - len(rest)]
                req = self._request
                self.requests.append(
                    ReceivedRequest(
                        raw, req.method, req.target, list(req.headers.raw_items()), self._body
                    )
                )
                # The proxy never pipelines upstream; parse whatever follows afresh.
                self._parser = _server_parser()
                self._stream = rest
                self._request = None
                self._body = b""
                if rest:
                    self._parser.receive_data(rest)
                    continue
                return

    def pending(self) -> list[ReceivedRequest]:
        return [r for r in self.poll() if not r.answered]

    def respond(self, data: bytes) -> None:
        """Bytes from the instance to the proxy (marks the oldest request answered)."""
        for req in self.poll():
            if not req.answered:
                req.answered = True
                break
        self.conn.data_received(data)

    def send(self, data: bytes) -> None:
        """Raw bytes from the instance, without marking anything answered."""
        self.conn.data_received(data)

    def hang_up(self) -> None:
        """The instance closed the connection."""
        if not self.transport.lost:
            self.transport.closing = True
            self.transport.lost = True
            self.conn.connection_lost(None)

    def pause_writing(self) -> None:
        """The proxy's write buffer towards this instance went above the high-water mark."""
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


@dataclass
class FakeClient:
    protocol: ClientConnection
    transport: FakeTransport

    def send(self, *chunks: bytes) -> None:
        for chunk in chunks:
            self.protocol.data_received(chunk)

    @property
    def data(self) -> bytes:
        return self.transport.data

    def take(self) -> bytes:
        return self.transport.take()


# The outcome of a connect attempt to one address: None connects; an exception is raised.
ConnectOutcome = BaseException | None


@dataclass
class _FakeConnectLoop:
    """The real loop, except that ``create_connection`` never opens a socket."""

    loop: asyncio.AbstractEventLoop
    connect: Callable[..., Awaitable[tuple[FakeTransport, asyncio.BaseProtocol]]]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)

    def create_connection(self, factory: Any, host: str, port: int) -> Any:
        return self.connect(factory, host, port)


@dataclass
class ProtocolRig:
    worker: ProxyWorker
    loop: asyncio.AbstractEventLoop
    instances: list[FakeInstance] = field(default_factory=list)
    connects: list[str] = field(default_factory=list)  # addresses create_connection was asked
    outcomes: dict[str, ConnectOutcome] = field(default_factory=dict)
    loop_errors: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        routes: dict[str, list[str]],
        *,
        trusted_proxies: tuple[str, ...] = (),
        **limits: Any,
    ) -> ProtocolRig:
        """Build a worker on the running loop; fails the test if that loop reports an error."""
        loop = asyncio.get_running_loop()
        routes_path = Path("/nonexistent/routes.json")
        config = EdgeConfig(
            routes_path=routes_path,
            http_host="127.0.0.1",
            http_port=8000,
            workers=1,
            trusted_proxies=parse_networks(list(trusted_proxies)),
            limits=ProxyLimits(**limits),
        )
        worker = ProxyWorker(config, FileRouteProvider(routes_path))
        worker.install(parse_routes_document({"routes": routes}, "test"))
        worker.date = FIXED_DATE
        rig = cls(worker, loop)
        worker.loop = _FakeConnectLoop(loop, rig._create_connection)  # type: ignore[assignment]
        loop.set_exception_handler(lambda _loop, context: rig.loop_errors.append(context))
        return rig

    # -- clients ---------------------------------------------------------------------

    def client(self, peer: tuple[str, int] = CLIENT_PEER) -> FakeClient:
        protocol = ClientConnection(self.worker)
        transport = FakeTransport(as_protocol(protocol), peer=peer, loop=self.loop)
        protocol.connection_made(transport)  # type: ignore[arg-type]
        return FakeClient(protocol, transport)

    # -- instances -------------------------------------------------------------------

    def pool(self, address: str) -> UpstreamPool:
        return self.worker.pools[parse_address(address)]

    def _open(self, pool: UpstreamPool, conn: UpstreamConnection) -> FakeInstance:
        transport = FakeTransport(as_protocol(conn), peer=(pool.host, pool.port), loop=self.loop)
        conn.connection_made(transport)  # type: ignore[arg-type]
        instance = FakeInstance(conn, transport, str(pool.address))
        self.instances.append(instance)
        return instance

    def add_idle_upstream(self, address: str) -> FakeInstance:
        """An already open, idle kept-alive connection in the instance's pool."""
        pool = self.pool(address)
        conn = UpstreamConnection(pool)
        instance = self._open(pool, conn)
        pool.busy += 1
        pool.release(conn)
        return instance

    async def _create_connection(
        self, factory: Callable[[], asyncio.BaseProtocol], host: str, port: int
    ) -> tuple[FakeTransport, asyncio.BaseProtocol]:
        address = str(Address(host, port))
        self.connects.append(address)
        outcome = self.outcomes.get(address)
        if outcome is not None:
            raise outcome
        conn = factory()
        assert isinstance(conn, UpstreamConnection)
        instance = self._open(self.pool(address), conn)
        return instance.transport, conn

    def instances_of(self, address: str) -> list[FakeInstance]:
        return [i for i in self.instances if i.address == address]

    def pending_requests(self) -> list[tuple[FakeInstance, ReceivedRequest]]:
        return [(i, r) for i in self.instances for r in i.pending()]

    # -- time and the loop ------------------------------------------------------------

    async def settle(self, rounds: int = 20) -> None:
        """Let scheduled callbacks (connects, connection_lost) run."""
        for _ in range(rounds):
            await asyncio.sleep(0)

    def fire_timeouts(self, advance: float) -> None:
        """Move the worker's clock and run one tick of its deadline checks."""
        worker = self.worker
        now = worker.now = worker.now + advance
        for client in [c for c in worker.clients if c.deadline < now]:
            client.on_timeout()
        for upstream in [u for u in worker.upstreams if u.deadline < now]:
            upstream.on_timeout()

    def check_loop_errors(self) -> None:
        assert not self.loop_errors, f"the loop reported errors: {self.loop_errors}"


def response(
    body: bytes = b"ok", *, status: bytes = b"200 OK", headers: bytes = b"", close: bool = False
) -> bytes:
    """A Content-Length framed response from an instance."""
    return b"HTTP/1.1 %s\r\n%sContent-Length: %d\r\n%s\r\n%s" % (
        status,
        headers,
        len(body),
        b"Connection: close\r\n" if close else b"",
        body,
    )


def echo_json(req: ReceivedRequest) -> bytes:
    return json.dumps(
        {"method": req.method.decode(), "target": req.target.decode(), "n": len(req.body)}
    ).encode()


@dataclass
class ParsedResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    interim: list[int] = field(default_factory=list)  # 1xx statuses before this response

    def header(self, name: bytes) -> bytes | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return b", ".join(values) if values else None


def parse_responses(
    data: bytes, methods: list[bytes] | None = None, *, eof: bool = False
) -> list[ParsedResponse]:
    """Strictly parse (with h11) the complete responses in what a client received.

    ``methods`` are the request methods in order (HEAD responses have no body); GET when
    not given. ``eof``: the connection was closed after ``data`` (ends a close-delimited body).
    """
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    conn.receive_data(data)
    if eof:
        conn.receive_data(b"")
    out: list[ParsedResponse] = []
    methods = list(methods or [])
    while True:
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        if conn.our_state is not h11.IDLE or not conn.trailing_data[0]:
            return out
        method = methods.pop(0) if methods else b"GET"
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        interim: list[int] = []
        head: h11.Response | None = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
                return out
            if isinstance(event, h11.InformationalResponse):
                interim.append(event.status_code)
            elif isinstance(event, h11.Response):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                out.append(
                    ParsedResponse(head.status_code, list(head.headers.raw_items()), body, interim)
                )
                break
