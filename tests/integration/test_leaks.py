"""Clients that vanish mid-exchange: the upstream connection is discarded and nothing leaks
(file descriptors of this process, where the edge runs, and pool accounting)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import struct
from pathlib import Path

import pytest

from edge.proxy.client import ClientConnection, Exchange
from edge.proxy.upstream import UpstreamConnection
from tests.harness import (
    Client,
    Edge,
    Upstream,
    UpstreamRequest,
    connected,
    eventually,
    get,
    open_fds,
    request,
    running_edge,
)
from tests.integration.conftest import StartUpstream

APP = "app.example.com"


def settled(edge: Edge, up: Upstream, fds: int) -> bool:
    """Back to the start: no client, no busy or stray upstream connection, same fd count."""
    return (
        not edge.worker.clients
        and not edge.worker.upstreams
        and edge.pool_sizes() == {up.address: (0, 0)}
        and up.open_connections == 0
        and open_fds() == fds
    )


def describe(edge: Edge, up: Upstream, fds: int) -> str:
    return (
        f"clients={len(edge.worker.clients)} upstreams={len(edge.worker.upstreams)} "
        f"pools={edge.pool_sizes()} upstream_open={up.open_connections} "
        f"fds={open_fds()} (start {fds})"
    )


async def wait_until_upstream_has_it(edge: Edge, up: Upstream) -> None:
    """The request reached the instance over a connection the edge holds busy."""
    assert await eventually(lambda: up.open_connections == 1)
    assert await eventually(lambda: edge.pool_sizes() == {up.address: (0, 1)})


@pytest.mark.asyncio
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_disconnecting_mid_request_body(
    tmp_path: Path, upstream: StartUpstream, framing: str, how: str
) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        fds = open_fds()
        for _ in range(3):  # a leak per request would add up
            client = await Client.connect(edge.port)
            if framing == "chunked":
                await client.send(
                    b"POST / HTTP/1.1\r\nHost: app.example.com\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n" + b"8000\r\n" + b"x" * 0x8000 + b"\r\n"
                )
            else:
                await client.send(
                    b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 100000\r\n\r\n"
                    + b"x" * 50_000
                )
            await wait_until_upstream_has_it(edge, up)
            await disconnect(client, how)
            assert await eventually(lambda: settled(edge, up, fds)), describe(edge, up, fds)
        # The instance never got a complete request (no invented end of body), and the edge
        # still works.
        assert up.requests == []
        async with connected(edge.port) as client:
            await client.send(
                b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 2\r\n\r\nok"
            )
            assert (await client.read_response()).status == 200
    assert [r.body for r in up.requests] == [b"ok"]


async def disconnect(client: Client, how: str) -> None:
    """Close the client's socket: a FIN ("close"), or an RST ("reset", zero linger)."""
    if how == "reset":
        sock = client.writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_disconnecting_while_waiting_for_response(
    tmp_path: Path, upstream: StartUpstream, how: str
) -> None:
    """The client gives up on a slow response (closes its socket, or resets it). The edge
    must notice and drop the upstream connection instead of holding it (and the instance's
    work) until the response timeout."""
    closed_by_edge = asyncio.Event()

    async def slow(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        """Never answers; returns when the edge drops the connection."""
        assert req.reader is not None
        with contextlib.suppress(ConnectionError):
            await req.reader.read()
        closed_by_edge.set()
        writer.close()

    up = await upstream(slow)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        fds = open_fds()
        client = await Client.connect(edge.port)
        await client.send(b"GET /slow HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        await wait_until_upstream_has_it(edge, up)
        assert await eventually(lambda: len(up.requests) == 1)
        await disconnect(client, how)
        async with asyncio.timeout(2):
            await closed_by_edge.wait()  # the upstream connection was discarded, not pooled
        assert await eventually(lambda: settled(edge, up, fds)), describe(edge, up, fds)


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_disconnecting_mid_response_body(
    tmp_path: Path, upstream: StartUpstream, how: str
) -> None:
    """The client leaves while a large response streams (and the edge may be paused on it)."""

    async def big(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        total = 32 * 1024 * 1024
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        block = b"b" * 1024 * 1024
        for _ in range(total // len(block)):
            writer.write(block)
            await writer.drain()

    up = await upstream(big)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        fds = open_fds()
        client = await Client.connect(edge.port)
        await client.send(b"GET /big HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        await client.read_head()
        await client.read_exactly(100_000)
        await disconnect(client, how)
        assert await eventually(lambda: settled(edge, up, fds)), describe(edge, up, fds)


@pytest.mark.asyncio
async def test_closed_connections_are_freed_without_the_cyclic_collector(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """Closed client and instance connections and their exchanges hold no reference cycle:
    they are freed when they close, not left for the garbage collector, whose passes would
    otherwise grow with every connection a busy edge closed since the last one."""

    async def closing(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()

    up = await upstream(closing)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        kinds = (ClientConnection, UpstreamConnection, Exchange)
        gc.collect()
        gc.disable()
        try:
            # Objects of earlier tests that something still holds are not this test's.
            before = {id(o) for o in gc.get_objects() if isinstance(o, kinds)}
            for _ in range(20):
                response = await request(edge.port, get(APP, extra="Connection: close\r\n"))
                assert response.status == 200
            assert await eventually(lambda: not edge.worker.clients and not edge.worker.upstreams)
            left = [o for o in gc.get_objects() if isinstance(o, kinds) and id(o) not in before]
        finally:
            gc.enable()
    assert left == [], f"{len(left)} closed connection objects wait for the collector"
