"""Client connection persistence (RFC 9112 9.3), pipelining, and upstream connection reuse."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.harness import (
    UpstreamRequest,
    connected,
    echo_handler,
    exchange_on_one_connection,
    get,
    running_edge,
)
from tests.integration.conftest import StartUpstream

APP = "app.example.com"
OTHER = "other.example.com"


def split_raw(raw: bytes) -> tuple[bytes, bytes]:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw[:200]
    return head, body


def header_lines(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {n.strip().lower(): v.strip() for n, _, v in (line.partition(":") for line in lines)}


@pytest.mark.asyncio
async def test_http11_keeps_the_connection_alive_by_default(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            for i in range(3):
                await client.send(get(APP, f"/{i}"))
                resp = await client.read_response()
                assert resp.status == 200
                assert resp.header("connection") is None
                assert resp.json()["target"] == f"/{i}"
            assert len(edge.worker.clients) == 1
    assert [r.target for r in up.requests] == ["/0", "/1", "/2"]


@pytest.mark.asyncio
async def test_connection_close_closes_after_the_response(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(get(APP, "/bye", "Connection: close\r\n"))
            resp = await client.read_response()
            assert resp.status == 200
            assert resp.header("connection") == "close"
            assert await client.is_closed_by_peer()
        # The client's Connection header is hop-by-hop: the upstream connection stays pooled.
        assert edge.pool_sizes() == {up.address: (1, 0)}
    assert up.requests[0].header("connection") is None


@pytest.mark.asyncio
async def test_http10_closes_by_default(tmp_path: Path, upstream: StartUpstream) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(b"GET /old HTTP/1.0\r\nHost: app.example.com\r\n\r\n")
            raw = await client.read_raw_until_close(timeout=2)
    head, body = split_raw(raw)
    assert head.startswith(b"HTTP/1.1 200 ")
    headers = header_lines(head)
    assert headers.get("connection", "close").lower() == "close"
    assert int(headers["content-length"]) == len(body)
    assert up.requests[0].target == "/old"


@pytest.mark.asyncio
async def test_http10_keep_alive_is_honoured(tmp_path: Path, upstream: StartUpstream) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            for i in range(2):
                await client.send(
                    b"GET /%d HTTP/1.0\r\nHost: app.example.com\r\nConnection: keep-alive\r\n\r\n"
                    % i
                )
                resp = await client.read_response()
                assert resp.status == 200
                assert resp.header("connection") == "keep-alive"
                assert resp.json()["target"] == f"/{i}"
            assert not await client.is_closed_by_peer(timeout=0.1)
    assert len(up.requests) == 2


CHUNKED_BODY = [b"first part;", b"second part;", b"x" * 70_000]


async def chunked_handler(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for part in CHUNKED_BODY:
        writer.write(b"%x\r\n%s\r\n" % (len(part), part))
        await writer.drain()
    writer.write(b"0\r\n\r\n")


@pytest.mark.asyncio
@pytest.mark.parametrize("connection", ["", "Connection: keep-alive\r\n"])
async def test_http10_client_gets_close_delimited_body_for_unknown_length(
    tmp_path: Path, upstream: StartUpstream, connection: str
) -> None:
    """HTTP/1.0 has no chunked coding: the body of unknown length ends with the connection,
    even when the client asked for keep-alive."""
    up = await upstream(chunked_handler)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(
                f"GET / HTTP/1.0\r\nHost: {APP}\r\n{connection}\r\n".encode(),
            )
            raw = await client.read_raw_until_close(timeout=2)
        # The upstream response was complete: its connection goes back to the pool.
        assert edge.pool_sizes() == {up.address: (1, 0)}
    head, body = split_raw(raw)
    headers = header_lines(head)
    assert "transfer-encoding" not in headers
    assert "content-length" not in headers
    assert headers.get("connection", "close").lower() == "close"
    assert body == b"".join(CHUNKED_BODY)


@pytest.mark.asyncio
async def test_pipelined_requests_are_answered_in_order(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    async def slow_first(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        if req.target == "/1":
            await asyncio.sleep(0.05)  # a slow first answer must still come first
        await echo_handler(req, writer)

    a = await upstream(slow_first)
    b = await upstream()
    async with running_edge({APP: [a.address], OTHER: [b.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(
                get(APP, "/1")
                + get(OTHER, "/2")
                + get("unknown.example.com", "/3")
                + b"POST /4 HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 4\r\n\r\nbody"
                + get(OTHER, "/5")
            )
            responses = [await client.read_response() for _ in range(5)]
            assert [r.status for r in responses] == [200, 200, 404, 200, 200]
            targets = [r.json()["target"] for i, r in enumerate(responses) if i != 2]
            assert targets == ["/1", "/2", "/4", "/5"]
            assert responses[3].json()["body"] == "body"
            # Still usable after the pipeline.
            await client.send(get(APP, "/6"))
            assert (await client.read_response()).status == 200
    assert [r.target for r in a.requests] == ["/1", "/4", "/6"]
    assert [r.target for r in b.requests] == ["/2", "/5"]


@pytest.mark.asyncio
async def test_upstream_connections_are_reused(tmp_path: Path, upstream: StartUpstream) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        for i in range(3):  # a new client connection each time
            responses = await exchange_on_one_connection(
                edge.port, get(APP, f"/{i}/0"), get(APP, f"/{i}/1")
            )
            assert [r.status for r in responses] == [200, 200]
        assert edge.pool_sizes() == {up.address: (1, 0)}
    assert len(up.requests) == 6
    assert up.connections == 1


@pytest.mark.asyncio
async def test_nothing_after_connection_close_is_processed(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """RFC 9112 9.6: after a request with ``Connection: close`` the server must not process
    further requests on that connection."""
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(get(APP, "/last", "Connection: close\r\n") + get(APP, "/ignored"))
            resp = await client.read_response()
            assert resp.status == 200
            assert resp.header("connection") == "close"
            assert await client.is_closed_by_peer()
    assert [r.target for r in up.requests] == ["/last"]


@pytest.mark.asyncio
async def test_concurrent_clients_share_the_pool(tmp_path: Path, upstream: StartUpstream) -> None:
    async def slowish(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(0.05)
        await echo_handler(req, writer)

    up = await upstream(slowish)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:

        async def one(i: int) -> int:
            async with connected(edge.port) as client:
                await client.send(get(APP, f"/{i}"))
                resp = await client.read_response()
                assert resp.json()["target"] == f"/{i}"
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(10)))
        assert statuses == [200] * 10
        idle, busy = edge.pool_sizes()[up.address]
        assert busy == 0
        assert idle == up.connections == 10  # one per concurrent request, all kept
        # A second wave reuses them instead of connecting again.
        await asyncio.gather(*(one(i) for i in range(10)))
        assert up.connections == 10
        assert edge.pool_sizes()[up.address] == (10, 0)
