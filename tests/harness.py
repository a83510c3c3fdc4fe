"""Real-socket test harness: an edge worker in the test's event loop, upstreams, clients.

The edge runs as a :class:`ProxyWorker` on a loopback port inside the test's own loop, so a
test can look at its pools and connection sets; the upstreams are real asyncio servers that
a test scripts per request (echo, stream, stall, die mid-response ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h11

from edge.config import EdgeConfig, ProxyLimits, parse_networks
from edge.proxy.worker import ProxyWorker, listen_socket
from edge.ratelimit import RateLimit
from edge.routing import FileRouteProvider, parse_routes_document

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


# -- upstream servers ------------------------------------------------------------------


@dataclass
class UpstreamRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    # For handlers that take the connection over (a tunnel after 101, a scripted close): the
    # connection's reader, and bytes already received after this request.
    reader: asyncio.StreamReader | None = field(default=None, repr=False, compare=False)
    rest: bytes = field(default=b"", repr=False, compare=False)

    def header(self, name: str) -> str | None:
        name = name.lower()
        values = [v for n, v in self.headers if n == name]
        return ", ".join(values) if values else None


Handler = Callable[[UpstreamRequest, asyncio.StreamWriter], Awaitable[None]]


def responder(default: bytes, by_target: dict[str, bytes] | None = None) -> Handler:
    """A handler that writes the raw response ``by_target[req.target]``, or ``default`` for
    a target not in ``by_target``."""
    by_target = by_target or {}

    async def handler(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(by_target.get(req.target, default))

    return handler


async def echo_handler(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
    """Answer with a JSON description of the request as the instance received it."""
    body = json.dumps(
        {
            "method": req.method,
            "target": req.target,
            "headers": req.headers,
            "body": req.body.decode("latin-1"),
        }
    ).encode()
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body)
    )


@dataclass
class Upstream:
    """A real HTTP/1.1 server on loopback (h11 parses the requests the edge sends it)."""

    handler: Handler = echo_handler
    port: int = 0
    requests: list[UpstreamRequest] = field(default_factory=list)
    connections: int = 0  # accepted so far
    open_connections: int = 0
    _server: asyncio.AbstractServer | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    async def start(self) -> Upstream:
        self._server = await asyncio.start_server(self._serve, HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            # Handlers that never answer (stalls) would otherwise outlive the test.
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open_connections += 1
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = await self._read_request(conn, reader)
                if req is None:
                    break
                req.reader = reader
                req.rest = conn.trailing_data[0]
                self.requests.append(req)
                await self.handler(req, writer)
                await writer.drain()
                if writer.is_closing():
                    break
                # The handler wrote raw bytes; start h11 afresh for the next request, with
                # whatever it had already received after this one.
                conn = h11.Connection(h11.SERVER)
                if req.rest:
                    conn.receive_data(req.rest)
        except (ConnectionError, h11.RemoteProtocolError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # stop() cancelled a handler that never finishes; ending normally keeps asyncio's
            # server callback from reporting the cancellation to the loop.
            pass
        finally:
            self.open_connections -= 1
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> UpstreamRequest | None:
        request = None
        body = b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                if not data and request is None:
                    return None
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return UpstreamRequest(
                    request.method.decode(),
                    request.target.decode(),
                    [(n.decode(), v.decode("latin-1")) for n, v in request.headers],
                    body,
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None


# -- the edge under test ----------------------------------------------------------------


@dataclass
class Edge:
    worker: ProxyWorker
    port: int
    routes_path: Path

    def set_routes(self, routes: dict[str, list[str]]) -> None:
        self.routes_path.write_text(json.dumps({"routes": routes}))

    async def reload(self) -> bool:
        return await self.worker.reload()

    def pool_sizes(self) -> dict[str, tuple[int, int]]:
        """address -> (idle, busy) connections of each instance pool."""
        return {str(a): (len(p.idle), p.busy) for a, p in self.worker.pools.items()}


@contextlib.asynccontextmanager
async def running_edge(
    routes: dict[str, list[str]],
    tmp_path: Path,
    *,
    trusted_proxies: tuple[str, ...] = (),
    region: str = "",
    client_rate_limit: RateLimit | None = None,
    **limits: float,
) -> AsyncIterator[Edge]:
    """Start a proxy worker on a free loopback port with ``routes``; stop it afterwards."""
    routes_path = tmp_path / "routes.json"
    routes_path.write_text(json.dumps({"routes": routes}))
    config = EdgeConfig(
        routes_path=routes_path,
        http_host=HOST,
        http_port=1,  # unused: the socket is bound below on a free port
        workers=1,
        trusted_proxies=parse_networks(list(trusted_proxies)),
        region=region,
        client_rate_limit=client_rate_limit,
        limits=ProxyLimits(**limits),  # type: ignore[arg-type]
    )
    provider = FileRouteProvider(routes_path)
    worker = ProxyWorker(config, provider)
    worker.install(parse_routes_document({"routes": routes}, "test"))
    sock = listen_socket(HOST, 0, 128)
    port = sock.getsockname()[1]
    await worker.start(sock)
    # An exception that escapes a protocol callback reaches the loop's exception handler
    # (and would only be logged in production): here it fails the test.
    loop = asyncio.get_running_loop()
    escaped: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: escaped.append(context))
    try:
        yield Edge(worker, port, routes_path)
    finally:
        await worker.shutdown(grace=1.0)
        loop.set_exception_handler(previous)
    assert not escaped, f"exceptions escaped to the event loop: {escaped}"


# -- clients ----------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    http_version: str = "1.1"

    def header(self, name: str) -> str | None:
        name = name.lower()
        values = [v for n, v in self.headers if n == name]
        return ", ".join(values) if values else None

    def json(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.body)  # type: ignore[no-any-return]


class Client:
    """A raw HTTP/1.1 client on one connection; responses are parsed strictly with h11."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_response(self, timeout: float = 5.0, head_request: bool = False) -> Response:
        """Read one complete response (interim 1xx responses are skipped)."""
        # Raw bytes are written by tests, so h11's own client state is driven by a dummy
        # request each time; it only serves to parse the response strictly.
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        if self.conn.our_state is h11.IDLE:
            method = b"HEAD" if head_request else b"GET"
            self.conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
            self.conn.send(h11.EndOfMessage())
        async with asyncio.timeout(timeout):
            response = None
            body = b""
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self.conn.receive_data(await self.reader.read(65536))
                    continue
                if isinstance(event, h11.Response):
                    response = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert response is not None
                    return Response(
                        response.status_code,
                        [(n.decode(), v.decode("latin-1")) for n, v in response.headers],
                        body,
                        response.http_version.decode(),
                    )
                elif isinstance(event, h11.ConnectionClosed):
                    raise ConnectionError("connection closed before a complete response")

    async def read_raw_until_close(self, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.read(-1)

    async def read_head(self, timeout: float = 5.0) -> bytes:
        """Read one raw response head (up to and including the empty line), unparsed."""
        async with asyncio.timeout(timeout):
            return await self.reader.readuntil(b"\r\n\r\n")

    async def read_exactly(self, n: int, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.reader.readexactly(n)

    async def is_closed_by_peer(self, timeout: float = 2.0) -> bool:
        """True when the edge closes the connection within ``timeout`` (nothing more sent)."""
        try:
            async with asyncio.timeout(timeout):
                rest = await self.reader.read(-1)
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return rest == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def connected(port: int) -> AsyncIterator[Client]:
    """A :class:`Client` on a new connection to ``port``, closed when the block ends."""
    client = await Client.connect(port)
    try:
        yield client
    finally:
        await client.close()


async def request(port: int, raw: bytes, timeout: float = 5.0) -> Response:
    """Send one raw request on a new connection and read its response."""
    async with connected(port) as client:
        await client.send(raw)
        return await client.read_response(timeout)


async def exchange_on_one_connection(
    port: int, *raw_requests: bytes, timeout: float = 5.0
) -> list[Response]:
    """Send ``raw_requests`` one after the other on one new connection, each after the
    response to the one before it; return the responses in order."""
    responses = []
    async with connected(port) as client:
        for raw in raw_requests:
            await client.send(raw)
            responses.append(await client.read_response(timeout))
    return responses


def get(host: str, target: str = "/", extra: str = "") -> bytes:
    return f"GET {target} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


async def eventually(
    predicate: Callable[[], bool], timeout: float = 2.0, interval: float = 0.01
) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; return its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            return predicate()
        await asyncio.sleep(interval)
    return True
