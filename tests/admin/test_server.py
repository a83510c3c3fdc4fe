"""The admin port's HTTP/1.1 server on real sockets: keep-alive, limits, timeouts, errors,
shutdown.

Each test serves a small application of its own with :class:`HttpServer` (no database):
the server's behaviour does not depend on the admin routes. Limits that involve time are
set small (a fraction of a second) so the timeouts are exercised quickly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import pytest_asyncio

from edge.admin.http import MAX_BODY, HttpServer, Request, Response, ServerLimits
from tests.harness import HOST, connected, exchange_on_one_connection, request

MiB = 1024 * 1024


@dataclass
class App:
    """An application that answers with a JSON description of each request it gets."""

    calls: list[Request] = field(default_factory=list)
    # Replaces the echo for a test that needs another behaviour.
    behaviour: Callable[[Request], Awaitable[Response]] | None = None

    async def __call__(self, req: Request) -> Response:
        self.calls.append(req)
        if self.behaviour is not None:
            return await self.behaviour(req)
        body = {"method": req.method, "path": req.raw_path, "size": len(req.body)}
        return Response(200, json.dumps(body).encode())


@dataclass
class Served:
    server: HttpServer
    app: App

    @property
    def port(self) -> int:
        return self.server.port


Serve = Callable[..., Awaitable[Served]]


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an :class:`HttpServer` with the given limits; all are closed at the end."""
    servers: list[HttpServer] = []

    async def start(**limits: float) -> Served:
        app = App()
        server = HttpServer(app, ServerLimits(**limits))  # type: ignore[arg-type]
        await server.start(HOST, 0)
        servers.append(server)
        return Served(server, app)

    yield start
    for server in servers:
        await server.close(grace=1.0)


def get(path: str = "/", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: admin\r\n{extra}\r\n".encode()


def error_code(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert error["message"], error
    return str(error["code"])


@pytest.mark.asyncio
async def test_keep_alive_serves_two_requests_on_one_connection(serve: Serve) -> None:
    served = await serve()
    first, second = await exchange_on_one_connection(served.port, get("/one"), get("/two"))
    assert (first.status, second.status) == (200, 200)
    assert [c.raw_path for c in served.app.calls] == ["/one", "/two"]
    assert first.header("connection") is None


@pytest.mark.asyncio
async def test_pipelined_requests_are_answered_in_order(serve: Serve) -> None:
    served = await serve()
    async with connected(served.port) as client:
        await client.send(get("/p1") + get("/p2") + get("/p3"))
        paths = [json.loads((await client.read_response()).body)["path"] for _ in range(3)]
    assert paths == ["/p1", "/p2", "/p3"]


@pytest.mark.asyncio
async def test_connection_close_is_honoured(serve: Serve) -> None:
    served = await serve()
    async with connected(served.port) as client:
        await client.send(get("/", "Connection: close\r\n"))
        response = await client.read_response()
        assert response.status == 200
        assert response.header("connection") == "close"
        assert await client.is_closed_by_peer(timeout=2.0)


@pytest.mark.asyncio
async def test_body_of_exactly_the_limit_is_accepted(serve: Serve) -> None:
    served = await serve()
    body = b"x" * MAX_BODY
    head = f"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    response = await request(served.port, head + body)
    assert response.status == 200 and response.json()["size"] == MAX_BODY


@pytest.mark.asyncio
async def test_body_over_the_limit_is_refused_by_content_length_unread(serve: Serve) -> None:
    served = await serve()
    async with connected(served.port) as client:
        # No body follows, and the client waits for 100-continue: a 413 can only come from
        # the Content-Length, before anything was read (and no 100 is sent first).
        await client.send(
            b"POST /b HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1)
        )
        head = await client.read_head(timeout=2.0)
        assert head.startswith(b"HTTP/1.1 413 "), head
        assert b"connection: close" in head.lower()
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert error_code(await client.read_exactly(length)) == "body_too_large"
    assert served.app.calls == []


@pytest.mark.asyncio
async def test_chunked_body_passing_the_limit_is_refused(serve: Serve) -> None:
    served = await serve()
    chunk = b"y" * 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MiB // len(chunk) + 2))
    async with connected(served.port) as client:
        # The server answers while the client is still sending; it reads and drops the rest
        # so the client's writes do not fail and the answer is not lost to a reset.
        sending = asyncio.create_task(
            client.send(b"POST /b HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
        )
        response = await client.read_response(timeout=5.0)
        await asyncio.wait_for(sending, 5.0)
    assert response.status == 413 and error_code(response.body) == "body_too_large"
    assert served.app.calls == []


@pytest.mark.asyncio
@pytest.mark.parametrize("pieces", [1, 3], ids=["whole", "in-pieces"])
async def test_head_over_the_limit_is_431(serve: Serve, pieces: int) -> None:
    served = await serve(max_head=1024)
    raw = get("/", f"X-Filler: {'f' * 2000}\r\n")
    async with connected(served.port) as client:
        # Whole: a complete head in one read (h11 only measures incomplete ones); in pieces:
        # an incomplete head growing past the limit.
        step = -(-len(raw) // pieces)
        for start in range(0, len(raw), step):
            await client.send(raw[start : start + step])
            await asyncio.sleep(0.02)
        response = await client.read_response()
    assert response.status == 431 and error_code(response.body) == "header_too_large"
    assert served.app.calls == []


@pytest.mark.asyncio
async def test_head_within_the_limit_is_served(serve: Serve) -> None:
    served = await serve(max_head=1024)
    response = await request(served.port, get("/", f"X-Filler: {'f' * 900}\r\n"))
    assert response.status == 200


@pytest.mark.asyncio
async def test_slow_head_gets_408_after_header_timeout(serve: Serve) -> None:
    served = await serve(header_timeout=0.3)
    async with connected(served.port) as client:
        started = time.monotonic()
        await client.send(b"GET / HTTP/1.1\r\nHost: a\r\n")  # never finished
        response = await client.read_response(timeout=3.0)
        elapsed = time.monotonic() - started
        assert response.status == 408 and error_code(response.body) == "request_timeout"
        assert 0.25 <= elapsed < 2.0, elapsed
        assert await client.is_closed_by_peer()


@pytest.mark.asyncio
async def test_slow_head_on_a_kept_alive_connection_gets_header_timeout(serve: Serve) -> None:
    # Once a later request's first byte arrives, its head has header_timeout, not the much
    # longer keep-alive wait.
    served = await serve(header_timeout=0.3, keepalive_timeout=30.0)
    async with connected(served.port) as client:
        await client.send(get())
        assert (await client.read_response()).status == 200
        started = time.monotonic()
        await client.send(b"GET /slow HTTP/1.1\r\n")
        response = await client.read_response(timeout=3.0)
        assert response.status == 408
        assert time.monotonic() - started < 2.0


@pytest.mark.asyncio
async def test_idle_keep_alive_connection_is_closed_quietly(serve: Serve) -> None:
    served = await serve(keepalive_timeout=0.3)
    async with connected(served.port) as client:
        await client.send(get())
        assert (await client.read_response()).status == 200
        started = time.monotonic()
        # Closed with nothing written: no 408 to a client that is merely idle.
        assert await client.read_raw_until_close(timeout=3.0) == b""
        assert 0.25 <= time.monotonic() - started < 2.0


@pytest.mark.asyncio
async def test_connection_that_never_sends_is_closed_quietly(serve: Serve) -> None:
    served = await serve(header_timeout=0.3)
    async with connected(served.port) as client:
        assert await client.read_raw_until_close(timeout=3.0) == b""


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n",
        b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",  # not a path
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",  # framed two ways
    ],
    ids=["no-method", "no-version", "no-host", "bad-length", "asterisk-target", "cl-and-te"],
)
async def test_malformed_request_is_400_json(serve: Serve, raw: bytes) -> None:
    served = await serve()
    async with connected(served.port) as client:
        await client.send(raw)
        response = await client.read_response()
        assert response.status == 400
        assert response.header("content-type") == "application/json"
        assert error_code(response.body) == "bad_request"
        assert await client.is_closed_by_peer()
    assert served.app.calls == []


@pytest.mark.asyncio
async def test_expect_100_continue_is_answered(serve: Serve) -> None:
    served = await serve()
    async with connected(served.port) as client:
        await client.send(
            b"POST /e HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        # The client waits for the interim answer before it sends the body.
        assert await client.read_head(timeout=2.0) == b"HTTP/1.1 100 \r\n\r\n"
        await client.send(b"hello")
        response = await client.read_response()
    assert response.status == 200 and response.json()["size"] == 5


@pytest.mark.asyncio
async def test_head_gives_the_headers_without_the_body(serve: Serve) -> None:
    served = await serve()

    async def fixed(req: Request) -> Response:
        return Response(200, b'{"the":"body"}')

    served.app.behaviour = fixed
    length = len((await request(served.port, get("/h"))).body)
    async with connected(served.port) as client:
        await client.send(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n")
        head = await client.read_head()
        assert head.startswith(b"HTTP/1.1 200 ")
        assert f"content-length: {length}".encode() in head.lower()
        # Had a body followed the head, it would come before the next answer.
        await client.send(get("/next"))
        following = await client.read_head()
        assert following.startswith(b"HTTP/1.1 200 "), following


@pytest.mark.asyncio
async def test_handler_exception_is_500_json_and_logged(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    served = await serve()

    async def explode(req: Request) -> Response:
        raise RuntimeError("secret internals of the failure")

    served.app.behaviour = explode
    with caplog.at_level(logging.ERROR, logger="edge.admin"):
        first, second = await exchange_on_one_connection(served.port, get("/x"), get("/y"))
    assert first.status == 500 and error_code(first.body) == "internal"
    assert b"secret" not in first.body and b"Traceback" not in first.body
    # The connection survives an application error.
    assert second.status == 500
    failures = [r for r in caplog.records if r.name == "edge.admin" and r.exc_info]
    assert failures and "GET /x" in failures[0].getMessage()
    assert "secret internals" in caplog.text


@pytest.mark.asyncio
async def test_invalid_answer_from_the_application_is_500(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    served = await serve()

    async def bad_header(req: Request) -> Response:
        return Response(200, b"{}", headers=[("x-broken", "line\r\nInjected: yes")])

    served.app.behaviour = bad_header
    with caplog.at_level(logging.ERROR, logger="edge.admin"):
        response = await request(served.port, get("/bad"))
    assert response.status == 500 and response.header("injected") is None
    assert "invalid answer to GET /bad" in caplog.text


@pytest.mark.asyncio
async def test_close_finishes_requests_in_flight(serve: Serve) -> None:
    served = await serve()
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(req: Request) -> Response:
        entered.set()
        await release.wait()
        return Response(200, b'{"done":true}')

    served.app.behaviour = slow
    port = served.port
    async with connected(port) as busy, connected(port) as idle:
        await busy.send(get("/slow"))
        await asyncio.wait_for(entered.wait(), 2.0)
        closing = asyncio.create_task(served.server.close(grace=5.0))
        # Idle connections end at once; no new ones are accepted.
        assert await idle.is_closed_by_peer(timeout=1.0)
        with pytest.raises(OSError):
            await asyncio.wait_for(asyncio.open_connection(HOST, port), 1.0)
        assert not closing.done()
        release.set()
        response = await busy.read_response()
        assert response.status == 200 and response.json() == {"done": True}
        assert response.header("connection") == "close"
        await asyncio.wait_for(closing, 2.0)
        assert await busy.is_closed_by_peer()


@pytest.mark.asyncio
async def test_close_cuts_requests_after_the_grace_period(serve: Serve) -> None:
    served = await serve()
    entered = asyncio.Event()

    async def forever(req: Request) -> Response:
        entered.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    served.app.behaviour = forever
    async with connected(served.port) as client:
        await client.send(get("/forever"))
        await asyncio.wait_for(entered.wait(), 2.0)
        started = time.monotonic()
        await served.server.close(grace=0.2)
        assert time.monotonic() - started < 1.5
        assert await client.read_raw_until_close(timeout=2.0) == b""
