"""Upgrade (WebSocket): the edge relays raw bytes both ways after the instance's 101."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.harness import Client, UpstreamRequest, connected, eventually, get, running_edge
from tests.integration.conftest import StartUpstream

APP = "app.example.com"

UPGRADE_REQUEST = (
    b"GET /ws HTTP/1.1\r\nHost: app.example.com\r\nConnection: keep-alive, Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


async def websocket_echo(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
    """Accept the upgrade, greet, then echo every byte back upper-cased until EOF."""
    if req.header("upgrade") != "websocket":
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        return
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello from upstream|"
    )
    assert req.reader is not None
    if req.rest:
        writer.write(req.rest.upper())
    while data := await req.reader.read(65536):
        writer.write(data.upper())
        await writer.drain()
    writer.close()


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    headers = {n.strip().lower(): v.strip() for n, _, v in (ln.partition(":") for ln in lines)}
    return int(status_line.split()[1]), headers


async def read_until(client: Client, marker: bytes, timeout: float = 2.0) -> bytes:
    data = b""
    async with asyncio.timeout(timeout):
        while marker not in data:
            more = await client.reader.read(65536)
            assert more, f"closed; got {data!r}"
            data += more
    return data


@pytest.mark.asyncio
async def test_websocket_upgrade_is_tunnelled(tmp_path: Path, upstream: StartUpstream) -> None:
    up = await upstream(websocket_echo)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            # Bytes right behind the head belong to the new protocol and must not be lost.
            await client.send(UPGRADE_REQUEST + b"early bytes|")
            status, headers = parse_head(await client.read_head())
            assert status == 101
            assert headers["upgrade"].lower() == "websocket"
            assert "upgrade" in headers["connection"].lower()
            assert headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
            assert await read_until(client, b"EARLY BYTES|") == (
                b"hello from upstream|EARLY BYTES|"
            )
            # Both ways, several round trips, including bytes that look like HTTP.
            for message in (b"ping", b"\x00\xff binary \r\n\r\n", b"GET / HTTP/1.1\r\n\r\n"):
                await client.send(message)
                assert await read_until(client, message.upper()) == message.upper()
            big = bytes(range(97, 123)) * 40_000  # ~1 MiB
            await client.send(big)
            assert await client.read_exactly(len(big)) == big.upper()
        # The client's close ends the tunnel on both sides.
        assert await eventually(lambda: up.open_connections == 0)
        assert await eventually(lambda: not edge.worker.clients and not edge.worker.upstreams)
    [seen] = up.requests
    assert seen.header("upgrade") == "websocket"
    assert "upgrade" in (seen.header("connection") or "").lower()
    assert seen.header("sec-websocket-key") == "dGhlIHNhbXBsZSBub25jZQ=="


@pytest.mark.asyncio
async def test_upstream_closing_tunnel_closes_client(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    async def one_message(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"\r\nbye"
        )
        await writer.drain()
        writer.close()

    up = await upstream(one_message)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(UPGRADE_REQUEST)
            status, _ = parse_head(await client.read_head())
            assert status == 101
            assert await client.read_raw_until_close(timeout=2) == b"bye"
        assert await eventually(lambda: not edge.worker.clients and not edge.worker.upstreams)


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [200, 400])
async def test_refused_upgrade_response_reaches_client(
    tmp_path: Path, upstream: StartUpstream, status: int
) -> None:
    """An instance may ignore or refuse an upgrade with an ordinary response (RFC 9110
    7.8). The client gets that response; the connection then either goes on as HTTP/1.1 or
    is closed by the edge, but it must not hang."""

    async def refuse(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        body = b"no upgrade for %s" % req.target.encode()
        writer.write(
            b"HTTP/1.1 %d Whatever\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)
        )

    up = await upstream(refuse)
    async with running_edge({APP: [up.address]}, tmp_path, keepalive_timeout=5.0) as edge:
        async with connected(edge.port) as client:
            await client.send(UPGRADE_REQUEST)
            resp = await client.read_response()
            assert resp.status == status
            assert resp.body == b"no upgrade for /ws"
            assert resp.header("upgrade") is None
            if resp.header("connection") == "close":
                assert await client.is_closed_by_peer()
            else:
                await client.send(get(APP, "/next"))
                nxt = await client.read_response(timeout=2)
                assert nxt.body == b"no upgrade for /next"
