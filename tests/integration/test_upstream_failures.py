"""Instances that refuse, time out, close kept-alive connections, or die mid-response."""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from collections.abc import Iterator
from pathlib import Path

import h11
import pytest

from tests.harness import (
    HOST,
    Client,
    Handler,
    UpstreamRequest,
    connected,
    eventually,
    exchange_on_one_connection,
    free_port,
    get,
    request,
    responder,
    running_edge,
)
from tests.integration.conftest import StartUpstream

APP = "app.example.com"


@contextlib.contextmanager
def unresponsive_address() -> Iterator[str]:
    """A loopback address whose SYNs go unanswered: a listening socket with backlog 0 that
    is never accepted from, its accept queue filled by connections of our own. Linux drops
    SYNs to a listener whose accept queue is full (``tcp_abort_on_overflow`` only changes
    what happens to the final ACK), so a further connect neither succeeds nor is refused."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind((HOST, 0))
        listener.listen(0)
        address = listener.getsockname()
        for _ in range(16):
            s = socket.socket()
            fillers.append(s)
            s.setblocking(False)
            s.connect_ex(address)
            _, writable, _ = select.select([], [s], [], 0.05)
            if not writable:
                break  # this one is left hanging in SYN-SENT: the queue is full
        else:
            pytest.fail("could not fill the accept queue of a loopback listener")
        yield f"{address[0]}:{address[1]}"
    finally:
        for s in fillers:
            s.close()
        listener.close()


@pytest.mark.asyncio
async def test_connection_refused_on_every_instance_is_502(tmp_path: Path) -> None:
    dead = [f"{HOST}:{free_port()}", f"{HOST}:{free_port()}"]
    async with running_edge({APP: dead}, tmp_path) as edge:
        responses = await exchange_on_one_connection(edge.port, get(APP), get(APP), timeout=2)
        for resp in responses:
            assert resp.status == 502
            assert (resp.header("content-type") or "").startswith("text/plain")
        assert edge.pool_sizes() == {dead[0]: (0, 0), dead[1]: (0, 0)}


@pytest.mark.asyncio
async def test_dead_instance_is_retried_on_a_live_one(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    live = await upstream()
    dead = f"{HOST}:{free_port()}"
    async with running_edge({APP: [dead, live.address]}, tmp_path) as edge:
        statuses = []
        for i in range(6):
            async with connected(edge.port) as client:
                # Bodies too: what was held for the failed connect goes to the live one.
                await client.send(
                    b"POST /%d HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 6\r\n\r\n"
                    b"body-%d" % (i, i)
                )
                statuses.append((await client.read_response(timeout=2)).status)
        assert edge.pool_sizes() == {dead: (0, 0), live.address: (1, 0)}
    assert statuses == [200] * 6
    assert [r.target for r in live.requests] == [f"/{i}" for i in range(6)]
    assert [r.body for r in live.requests] == [b"body-%d" % i for i in range(6)]


@pytest.mark.asyncio
async def test_upstream_connect_timeout_is_502(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    with unresponsive_address() as address:
        async with running_edge({APP: [address]}, tmp_path, upstream_connect_timeout=0.3) as edge:
            async with connected(edge.port) as client:
                start = loop.time()
                await client.send(get(APP))
                resp = await client.read_response(timeout=3)
                elapsed = loop.time() - start
    assert resp.status == 502
    assert 0.2 <= elapsed < 2.0  # the timeout path, not a refusal


@pytest.mark.asyncio
async def test_connect_timeout_is_retried_on_a_live_instance(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    live = await upstream()
    with unresponsive_address() as address:
        async with running_edge(
            {APP: [address, live.address]}, tmp_path, upstream_connect_timeout=0.3
        ) as edge:
            responses = await exchange_on_one_connection(
                edge.port, get(APP, "/0"), get(APP, "/1"), get(APP, "/2"), timeout=3
            )
            assert [r.status for r in responses] == [200, 200, 200]
    assert len(live.requests) == 3


@pytest.mark.asyncio
async def test_upstream_response_timeout_is_504(tmp_path: Path, upstream: StartUpstream) -> None:
    async def never(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        await asyncio.Event().wait()

    up = await upstream(never)
    loop = asyncio.get_running_loop()
    async with running_edge({APP: [up.address]}, tmp_path, upstream_response_timeout=0.3) as edge:
        async with connected(edge.port) as client:
            start = loop.time()
            await client.send(get(APP))
            resp = await client.read_response(timeout=3)
            elapsed = loop.time() - start
            # A bodiless request was fully read: the client connection stays usable.
            assert resp.header("connection") != "close"
        # The stuck upstream connection was abandoned, not pooled.
        assert edge.pool_sizes() == {up.address: (0, 0)}
    assert resp.status == 504
    assert 0.2 <= elapsed < 2.0
    assert len(up.requests) == 1  # never retried: the instance may be processing it


@pytest.mark.asyncio
async def test_upstream_closing_idle_connection_between_requests(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """The instance closes its kept-alive connection while it sits idle in the pool (its own
    keep-alive timeout): the next request goes over a new connection."""

    async def answer_then_close(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.close()

    up = await upstream(answer_then_close)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            for i in range(3):
                await client.send(get(APP, f"/{i}"))
                assert (await client.read_response(timeout=2)).status == 200
                await asyncio.sleep(0.1)
    assert [r.target for r in up.requests] == ["/0", "/1", "/2"]
    assert up.connections == 3


def reset_after_first(reset_on: str) -> Handler:
    """A handler that answers, and after answering ``reset_on`` waits for the next request's
    bytes to arrive and resets the connection without processing them."""

    async def handler(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        body = req.target.encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await writer.drain()
        if req.target == reset_on:
            assert req.reader is not None
            if not req.rest:
                await req.reader.read(1)
            writer.transport.abort()

    return handler


@pytest.mark.asyncio
async def test_reused_connection_closed_on_arrival_is_retried(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """The race of an instance's keep-alive timeout with a new request: the pooled connection
    looks fine, the edge sends the next request on it, and the instance resets it without
    having processed any of it. Nothing of the response came back, so the edge sends the
    (idempotent) request again on a new connection; the instance processes it exactly once."""
    up = await upstream(reset_after_first("/first"))
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        first, resp = await exchange_on_one_connection(
            edge.port, get(APP, "/first"), get(APP, "/second"), timeout=2
        )
    assert first.body == b"/first"
    assert resp.status == 200
    assert resp.body == b"/second"
    assert [r.target for r in up.requests] == ["/first", "/second"]
    assert up.connections == 2


@pytest.mark.asyncio
async def test_post_on_reset_reused_connection_is_never_processed_twice(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """Same race with a POST: the edge may retry it (it knows the instance did not answer)
    or answer 502 (RFC 9112 9.3.1: a proxy must not retry non-idempotent requests on its
    own), but the instance never processes it twice, and a retried body arrives whole."""
    up = await upstream(reset_after_first("/first"))
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        first, resp = await exchange_on_one_connection(
            edge.port,
            get(APP, "/first"),
            b"POST /second HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 4\r\n\r\nbody",
            timeout=2,
        )
    assert first.body == b"/first"
    processed = [r for r in up.requests if r.target == "/second"]
    if resp.status == 200:
        assert [r.body for r in processed] == [b"body"]
    else:
        assert resp.status == 502
        assert processed == []


def dies_after(raw: bytes) -> Handler:
    """A handler that writes ``raw`` (a response cut short), then resets the connection."""

    async def die(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.transport.abort()

    return die


async def raw_until_close(client: Client) -> bytes:
    try:
        return await client.read_raw_until_close(timeout=2)
    except ConnectionResetError:
        return b"<reset>"


@pytest.mark.asyncio
async def test_upstream_dying_mid_body_closes_client(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream(dies_after(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789"))
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(get(APP))
            with pytest.raises((ConnectionError, h11.RemoteProtocolError)):
                await client.read_response(timeout=2)
        # And on the wire: the head and the 10 bytes, then the end of the connection.
        async with connected(edge.port) as client:
            await client.send(get(APP))
            raw = await raw_until_close(client)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-length: 1000" in head.lower()
    assert body == b"0123456789"


@pytest.mark.asyncio
@pytest.mark.parametrize("version", ["1.1", "1.0"])
async def test_upstream_dying_mid_chunked_body_never_looks_complete(
    tmp_path: Path, upstream: StartUpstream, version: str
) -> None:
    up = await upstream(
        dies_after(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n5\r\nab"
        )
    )
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(f"GET / HTTP/{version}\r\nHost: {APP}\r\n\r\n".encode())
            raw = await raw_until_close(client)
        assert not edge.worker.clients
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    if version == "1.1":
        # Re-chunked for the client, but never terminated with the last chunk.
        assert body.startswith(b"a\r\n0123456789\r\n")
        assert not body.endswith(b"0\r\n\r\n")
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", APP)]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(raw)
        conn.receive_data(b"")
        with pytest.raises(h11.RemoteProtocolError):
            while conn.next_event() is not h11.PAUSED:
                pass
    else:
        # HTTP/1.0 has no way to tell the end of the body from a truncation other than a
        # length; a close-delimited body cut short is the best possible (and what we get).
        assert body.startswith(b"0123456789")


@pytest.mark.asyncio
async def test_upstream_closing_before_any_response_is_502(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """A fresh (not reused) connection closed after the request was sent: the instance may
    have acted on it, so it is not retried."""

    async def close_silently(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        writer.close()

    up = await upstream(close_silently)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        resp = await request(
            edge.port,
            b"POST /x HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 2\r\n\r\nhi",
            timeout=2,
        )
    assert resp.status == 502
    assert len(up.requests) == 1


@pytest.mark.asyncio
async def test_upstream_stalling_mid_body_closes_client(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    async def stall(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789")
        await writer.drain()
        assert req.reader is not None
        await req.reader.read()  # silent until the edge gives up on us

    up = await upstream(stall)
    loop = asyncio.get_running_loop()
    async with running_edge({APP: [up.address]}, tmp_path, upstream_response_timeout=0.3) as edge:
        async with connected(edge.port) as client:
            start = loop.time()
            await client.send(get(APP))
            raw = await raw_until_close(client)
            elapsed = loop.time() - start
        assert await eventually(lambda: edge.pool_sizes() == {up.address: (0, 0)})
        assert await eventually(lambda: up.open_connections == 0)
    assert raw.endswith(b"\r\n\r\n0123456789")
    assert 0.2 <= elapsed < 2.0


@pytest.mark.asyncio
async def test_bytes_after_a_complete_response_do_not_break_the_edge(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """An instance that sends more than the response it was asked for (here a second,
    unsolicited response) gets its connection dropped; the client's response is the first
    one, and the next request is served on a fresh connection."""
    up = await upstream(
        responder(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra"
        )
    )
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        first = await request(edge.port, get(APP, "/one"))
        assert (first.status, first.body) == (200, b"ok")
        second = await request(edge.port, get(APP, "/two"))
        assert (second.status, second.body) == (200, b"ok")
    assert up.connections == 2
