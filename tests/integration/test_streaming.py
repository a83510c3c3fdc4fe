"""Bodies are streamed both ways, in both framings, with flow control on both sides."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from tests.harness import (
    Client,
    UpstreamRequest,
    connected,
    exchange_on_one_connection,
    get,
    responder,
    running_edge,
)
from tests.integration.conftest import StartRaw, StartUpstream

APP = "app.example.com"
MiB = 1024 * 1024


async def digest_handler(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
    body = hashlib.sha256(req.body).hexdigest().encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def pieces(data: bytes, sizes: tuple[int, ...] = (1, 7, 65_536, 100_003, 250_000)) -> list[bytes]:
    """Split ``data`` into irregular pieces (cycling through ``sizes``)."""
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        out.append(data[i : i + n])
        i += n
        k += 1
    return out


@pytest.mark.asyncio
async def test_content_length_request_body_is_streamed_intact(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    payload = os.urandom(5 * MiB)
    up = await upstream(digest_handler)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(
                b"PUT /upload HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
                % (APP.encode(), len(payload))
            )
            for piece in pieces(payload):
                await client.send(piece)
            resp = await client.read_response()
    assert resp.status == 200
    assert resp.body.decode() == hashlib.sha256(payload).hexdigest()
    [seen] = up.requests
    assert seen.header("content-length") == str(len(payload))
    assert seen.body == payload


@pytest.mark.asyncio
async def test_chunked_request_body_is_streamed_intact(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    payload = os.urandom(4 * MiB + 123)
    up = await upstream(digest_handler)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(
                b"POST /upload HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n"
                % APP.encode()
            )
            wire = b"".join(
                b"%x;ext=1\r\n%s\r\n" % (len(c), c) if i % 3 == 0 else b"%X\r\n%s\r\n" % (len(c), c)
                for i, c in enumerate(pieces(payload))
            )
            wire += b"0\r\nX-Trailer: t\r\n\r\n"
            for piece in pieces(wire, (3, 65_536, 333_333)):  # chunk boundaries split at random
                await client.send(piece)
            resp = await client.read_response()
            # The connection stays usable after a chunked body.
            await client.send(get(APP, "/after"))
            after = await client.read_response()
    assert resp.status == after.status == 200
    assert resp.body.decode() == hashlib.sha256(payload).hexdigest()
    seen = up.requests[0]
    assert seen.body == payload
    assert up.requests[1].target == "/after"


@pytest.mark.asyncio
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_large_response_body_is_streamed_intact(
    tmp_path: Path, upstream: StartUpstream, framing: str
) -> None:
    payload = os.urandom(6 * MiB)

    async def handler(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        if framing == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for piece in pieces(payload):
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
            for piece in pieces(payload):
                writer.write(piece)
                await writer.drain()

    up = await upstream(handler)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        # The same again on the same connection: it is still good.
        resp, again = await exchange_on_one_connection(
            edge.port, get(APP, "/big"), get(APP, "/again")
        )
        assert edge.pool_sizes() == {up.address: (1, 0)}
    assert resp.status == 200
    assert len(resp.body) == len(payload)
    assert resp.body == payload
    assert again.body == payload
    if framing == "content-length":
        assert resp.header("content-length") == str(len(payload))
    else:
        assert resp.header("transfer-encoding") == "chunked"


@pytest.mark.asyncio
async def test_response_body_reaches_client_before_upstream_finishes(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """The first part of a slow body is delivered while the upstream still holds the rest:
    the upstream sends its last part only after the test saw the first one at the client, so
    an edge that buffered the body whole would never deliver it (timeout)."""
    first_seen = asyncio.Event()
    for_framing = {
        "chunked": b"Transfer-Encoding: chunked\r\n",
        "length": b"Content-Length: 10\r\n",
    }
    results: dict[str, bytes] = {}

    async def handler(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        chunked = req.target == "/chunked"
        writer.write(b"HTTP/1.1 200 OK\r\n" + for_framing["chunked" if chunked else "length"])
        writer.write(b"\r\n" + (b"5\r\nfirst\r\n" if chunked else b"first"))
        await writer.drain()
        async with asyncio.timeout(2):
            await first_seen.wait()
        writer.write(b"5\r\nlast!\r\n0\r\n\r\n" if chunked else b"last!")

    up = await upstream(handler)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        for framing in ("chunked", "length"):
            first_seen.clear()
            async with connected(edge.port) as client:
                await client.send(get(APP, f"/{framing}"))
                head = await client.read_head(timeout=2)
                assert head.startswith(b"HTTP/1.1 200")
                received = b""
                async with asyncio.timeout(2):
                    while b"first" not in received:
                        received += await client.reader.read(65536)
                first_seen.set()
                async with asyncio.timeout(2):
                    while b"last!" not in received:
                        received += await client.reader.read(65536)
                results[framing] = received
    assert results["length"] == b"firstlast!"
    assert results["chunked"].startswith(b"5\r\nfirst\r\n")


async def stalled(counter: list[int], timeout: float = 5.0, quiet: float = 0.2) -> None:
    """Wait until ``counter[0]`` (a progress counter) stops growing for ``quiet`` s."""
    async with asyncio.timeout(timeout):
        last = -1
        while counter[0] != last:
            last = counter[0]
            await asyncio.sleep(quiet)


@pytest.mark.asyncio
async def test_flow_control_slow_client_pauses_upstream(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """A client that does not read while the instance writes 64 MiB.

    The socket buffers between the three parties hold at most some tens of MiB on loopback, so
    with flow control the upstream's writes stall (its ``drain()`` stops returning) well
    before 64 MiB, while the edge's own buffer towards the client (its client transport's
    write buffer, in this process) stays near the high-water mark. An edge that kept reading
    the upstream would let the upstream write everything and hold it in that buffer.
    Afterwards the client reads everything, so nothing was lost either.
    """
    total = 64 * MiB
    block = b"z" * MiB
    written = [0]

    async def handler(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        while written[0] < total:
            writer.write(block)
            await writer.drain()
            written[0] += len(block)

    up = await upstream(handler)
    async with running_edge({APP: [up.address]}, tmp_path, write_high_water=256 * 1024) as edge:
        async with connected(edge.port) as client:
            await client.send(get(APP, "/huge"))
            await stalled(written)
            assert written[0] < total, "the upstream wrote everything: the edge never paused"
            [conn] = edge.worker.clients
            assert conn.transport is not None
            buffered = conn.transport.get_write_buffer_size()
            assert buffered < 4 * MiB, f"edge holds {buffered} bytes for the client"
            # Now read it all: nothing lost, and the stall resolves.
            head = await client.read_head()
            assert b"content-length: %d" % total in head.lower()
            got = 0
            async with asyncio.timeout(20):
                while got < total:
                    data = await client.reader.read(MiB)
                    assert data, "connection closed early"
                    got += len(data)
            assert got == total


@pytest.mark.asyncio
async def test_flow_control_slow_upstream_pauses_client(
    tmp_path: Path, raw_upstream: StartRaw
) -> None:
    """The mirror case: a client uploads 64 MiB to an instance that reads nothing after the
    head. The client's writes must stall (the edge pauses reading it) while the edge's
    buffer towards the instance (its upstream transport's write buffer) stays bounded."""
    total = 64 * MiB
    block = b"u" * MiB
    sent = [0]
    reading = asyncio.Event()

    async def stalling(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reading.wait()
        got = 0
        while got < total:
            data = await reader.read(MiB)
            if not data:
                return
            got += len(data)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%d" % (len(str(got)), got))
        await writer.drain()

    port = await raw_upstream(stalling)
    async with running_edge({APP: [f"127.0.0.1:{port}"]}, tmp_path) as edge:
        client = await Client.connect(edge.port)

        async def upload() -> None:
            await client.send(
                b"POST /up HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n"
                % (APP.encode(), total)
            )
            while sent[0] < total:
                await client.send(block)
                sent[0] += len(block)

        uploader = asyncio.create_task(upload())
        try:
            await stalled(sent)
            assert sent[0] < total, "the client sent everything: the edge never paused"
            [up_conn] = edge.worker.upstreams
            assert up_conn.transport is not None
            buffered = up_conn.transport.get_write_buffer_size()
            assert buffered < 4 * MiB, f"edge holds {buffered} bytes for the instance"
            reading.set()
            async with asyncio.timeout(20):
                await uploader
                resp = await client.read_response()
            assert resp.status == 200
            assert resp.body == str(total).encode()
        finally:
            uploader.cancel()
            await client.close()


@pytest.mark.asyncio
async def test_request_body_reaches_upstream_before_client_finishes(
    tmp_path: Path, raw_upstream: StartRaw
) -> None:
    """The instance gets the first part of a body while the client still holds the rest."""
    upstream_got_first = asyncio.Event()

    async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        assert b"content-length: 10" in head.lower()
        assert await reader.readexactly(5) == b"first"
        upstream_got_first.set()
        assert await reader.readexactly(5) == b"last!"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    port = await raw_upstream(server)
    async with running_edge({APP: [f"127.0.0.1:{port}"]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(
                b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 10\r\n\r\nfirst"
            )
            async with asyncio.timeout(2):
                await upstream_got_first.wait()
            await client.send(b"last!")
            resp = await client.read_response()
    assert resp.status == 200
    assert resp.body == b"ok"


@pytest.mark.asyncio
async def test_expect_100_continue(tmp_path: Path, upstream: StartUpstream) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(
                b"PUT /e HTTP/1.1\r\nHost: app.example.com\r\nExpect: 100-continue\r\n"
                b"Content-Length: 11\r\n\r\n"
            )
            interim = await client.read_head(timeout=2)
            assert interim.startswith(b"HTTP/1.1 100 ")
            assert not up.requests  # the body is not there yet
            await client.send(b"hello world")
            resp = await client.read_response()
    assert resp.status == 200
    [seen] = up.requests
    assert seen.body == b"hello world"
    assert seen.header("expect") is None


@pytest.mark.asyncio
async def test_expect_100_continue_without_body_gets_no_interim(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        resp_raw = b""
        async with connected(edge.port) as client:
            await client.send(get(APP, "/e", "Expect: 100-continue\r\nConnection: close\r\n"))
            resp_raw = await client.read_raw_until_close(timeout=2)
    assert resp_raw.startswith(b"HTTP/1.1 200 ")
    assert b" 100 " not in resp_raw.split(b"\r\n", 1)[0]
    assert up.requests[0].header("expect") is None


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("host", "length", "status"),
    [("unknown.example.com", 10, 404), (APP, 10 * MiB, 413)],
    ids=["unknown_host", "too_large"],
)
async def test_expect_100_continue_refused_without_waiting_for_body(
    tmp_path: Path, upstream: StartUpstream, host: str, length: int, status: int
) -> None:
    """A request the edge will refuse gets its final status at once instead of 100 (RFC 9110
    10.1.1): the client never has to send a body that would be thrown away."""
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path, max_body_size=MiB) as edge:
        async with connected(edge.port) as client:
            await client.send(
                b"PUT /e HTTP/1.1\r\nHost: %s\r\nExpect: 100-continue\r\n"
                b"Content-Length: %d\r\n\r\n" % (host.encode(), length)
            )
            resp = await client.read_response(timeout=2)
            assert resp.status == status
            assert await client.is_closed_by_peer()
    assert up.requests == []


@pytest.mark.asyncio
async def test_chunked_response_with_extensions_and_trailers_stays_in_sync(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    trailers = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"5;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 42\r\n\r\n"
    )
    up = await upstream(
        responder(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext", {"/trailers": trailers})
    )
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        first, second = await exchange_on_one_connection(
            edge.port, get(APP, "/trailers"), get(APP, "/next")
        )
    assert first.body == b"hello world"
    assert second.body == b"next"
    assert up.connections == 1


@pytest.mark.asyncio
async def test_messages_split_into_tiny_pieces(tmp_path: Path, upstream: StartUpstream) -> None:
    """Heads and bodies that arrive a few bytes at a time, in both directions."""
    response = b"HTTP/1.1 200 OK\r\nX-Piece: yes\r\nTransfer-Encoding: chunked\r\n\r\n"
    response += b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"

    async def trickle(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        for i in range(0, len(response), 7):
            writer.write(response[i : i + 7])
            await writer.drain()
            await asyncio.sleep(0.002)

    up = await upstream(trickle)
    raw = b"POST /tiny HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 9\r\n\r\nsmall body"
    raw = raw[:-1]  # "small bod": 9 bytes
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            for i in range(0, len(raw), 3):
                await client.send(raw[i : i + 3])
                await asyncio.sleep(0.002)
            resp = await client.read_response()
    assert resp.status == 200
    assert resp.header("x-piece") == "yes"
    assert resp.body == b"abcde"
    [seen] = up.requests
    assert (seen.target, seen.body) == ("/tiny", b"small bod")
