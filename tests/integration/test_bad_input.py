"""Requests the edge answers itself: exact status, connection closed where it must be, and
nothing of them reaches the instance."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.harness import Client, Edge, Response, Upstream, connected, get, running_edge
from tests.integration.conftest import StartUpstream

APP = "app.example.com"
EMPTY = "empty.example.com"


@pytest_asyncio.fixture
async def edge_and_upstream(
    tmp_path: Path, upstream: StartUpstream
) -> AsyncIterator[tuple[Edge, Upstream]]:
    up = await upstream()
    async with running_edge(
        {APP: [up.address], EMPTY: []},
        tmp_path,
        max_header_size=4096,
        max_body_size=1000,
        header_timeout=0.3,
        keepalive_timeout=0.3,
    ) as edge:
        yield edge, up


async def exchange(edge: Edge, raw: bytes) -> tuple[Response, Client]:
    client = await Client.connect(edge.port)
    await client.send(raw)
    return await client.read_response(timeout=2), client


async def assert_rejected_and_closed(
    edge: Edge, up: Upstream, raw: bytes, status: int, *, head_valid: bool = False
) -> None:
    """``head_valid``: the head was fine and the body is not, so the edge may already have
    opened a connection to the instance (bodies stream); no request may reach it."""
    resp, client = await exchange(edge, raw)
    try:
        assert resp.status == status, resp.body
        assert resp.header("connection") == "close"
        assert await client.is_closed_by_peer()
    finally:
        await client.close()
    assert up.requests == []
    if not head_valid:
        assert up.connections == 0


HOST = b"Host: app.example.com\r\n"
# Malformed requests whose head is valid: only the chunked body is broken.
BAD_BODY = {
    "invalid_chunk_size",
    "negative_chunk_size",
    "overflowing_chunk_size",
    "chunk_data_overrun",
}

MALFORMED = {
    "cl_and_te": b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_and_cl": b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
    b"Content-Length: 5\r\n\r\n0\r\n\r\n",
    "differing_duplicate_cl": b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 5\r\n"
    b"Content-Length: 6\r\n\r\nhello!",
    "cl_list": b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 5, 6\r\n\r\nhello!",
    "te_gzip_chunked": b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip, chunked\r\n"
    b"\r\n0\r\n\r\n",
    "te_chunked_twice": b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te_identity": b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: identity\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\n" + HOST + b"X-Folded: first\r\n  continued\r\n\r\n",
    "bare_lf": b"GET / HTTP/1.1\n" + HOST.replace(b"\r\n", b"\n") + b"\n",
    "bare_lf_in_headers": b"GET / HTTP/1.1\r\n" + HOST + b"X-A: 1\nX-B: 2\r\n\r\n",
    "nul_in_value": b"GET / HTTP/1.1\r\n" + HOST + b"X-Bad: a\x00b\r\n\r\n",
    "cr_in_value": b"GET / HTTP/1.1\r\n" + HOST + b"X-Bad: a\rb\r\n\r\n",
    "invalid_chunk_size": b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
    b"\r\nzz\r\nhello\r\n0\r\n\r\n",
    "negative_chunk_size": b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
    b"\r\n-5\r\nhello\r\n0\r\n\r\n",
    "overflowing_chunk_size": b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
    b"\r\n10000000000000000000005\r\nhello\r\n0\r\n\r\n",
    "chunk_data_overrun": b"POST / HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: chunked\r\n"
    b"\r\n5\r\nhello, world\r\n0\r\n\r\n",
    "cl_plus_sign": b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: +5\r\n\r\nhello",
    "cl_negative": b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: -1\r\n\r\n",
    "cl_not_a_number": b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: five\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\n" + HOST + b"X-Bad : 1\r\n\r\n",
}


@pytest.mark.asyncio
@pytest.mark.parametrize("name", sorted(MALFORMED))
async def test_malformed_request_is_400_and_closed(
    edge_and_upstream: tuple[Edge, Upstream], name: str
) -> None:
    edge, up = edge_and_upstream
    await assert_rejected_and_closed(edge, up, MALFORMED[name], 400, head_valid=name in BAD_BODY)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost:\r\n\r\n",
        b"GET / HTTP/1.1\r\n" + HOST + HOST + b"\r\n",
        b"GET / HTTP/1.1\r\n" + HOST + b"Host: other.example.com\r\n\r\n",
    ],
    ids=["missing", "empty", "duplicate", "two_different"],
)
async def test_host_header_must_appear_exactly_once(
    edge_and_upstream: tuple[Edge, Upstream], raw: bytes
) -> None:
    edge, up = edge_and_upstream
    resp, client = await exchange(edge, raw)
    await client.close()
    assert resp.status == 400
    assert up.requests == []


@pytest.mark.asyncio
async def test_head_over_limit_is_431(edge_and_upstream: tuple[Edge, Upstream]) -> None:
    edge, up = edge_and_upstream
    raw = get(APP, "/", "".join(f"X-Filler-{i}: {'v' * 100}\r\n" for i in range(50)))
    assert len(raw) > 4096
    await assert_rejected_and_closed(edge, up, raw, 431)


@pytest.mark.asyncio
async def test_head_just_under_limit_is_served(edge_and_upstream: tuple[Edge, Upstream]) -> None:
    edge, up = edge_and_upstream
    raw = get(APP, "/", f"X-Filler: {'v' * 3500}\r\n")
    resp, client = await exchange(edge, raw)
    await client.close()
    assert resp.status == 200
    assert len(up.requests) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "target",
    [
        b"http://evil.example.com/",
        b"http://app.example.com.evil.example/",
        b"http://evil@/x",
        b"*",  # asterisk-form is for OPTIONS only
        b"app.example.com/x",  # no scheme
        b"ftp://app.example.com/x",
    ],
)
async def test_absolute_form_naming_another_host_is_400(
    edge_and_upstream: tuple[Edge, Upstream], target: bytes
) -> None:
    edge, up = edge_and_upstream
    resp, client = await exchange(edge, b"GET %s HTTP/1.1\r\n%s\r\n" % (target, HOST))
    await client.close()
    assert resp.status == 400
    assert up.requests == []


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "raw",
    [
        b"CONNECT app.example.com:443 HTTP/1.1\r\nHost: app.example.com:443\r\n\r\n",
        b"CONNECT evil.example.com:22 HTTP/1.1\r\nHost: evil.example.com:22\r\n\r\n",
    ],
)
async def test_connect_is_405_with_allow(
    edge_and_upstream: tuple[Edge, Upstream], raw: bytes
) -> None:
    edge, up = edge_and_upstream
    resp, client = await exchange(edge, raw)
    try:
        assert resp.status == 405
        allow = {m.strip() for m in (resp.header("allow") or "").split(",")}
        assert {"GET", "HEAD", "POST"} <= allow
        assert "CONNECT" not in allow
        # Never a tunnel: nothing sent after a CONNECT is relayed anywhere.
        await client.send(b"SSH-2.0-OpenSSH\r\n")
        assert await client.is_closed_by_peer()
    finally:
        await client.close()
    assert up.connections == 0


@pytest.mark.asyncio
async def test_http2_request_line_is_505(edge_and_upstream: tuple[Edge, Upstream]) -> None:
    edge, up = edge_and_upstream
    await assert_rejected_and_closed(
        edge, up, b"GET / HTTP/2.0\r\nHost: app.example.com\r\n\r\n", 505
    )


@pytest.mark.asyncio
async def test_declared_body_over_limit_is_413(edge_and_upstream: tuple[Edge, Upstream]) -> None:
    edge, up = edge_and_upstream
    resp, client = await exchange(
        edge, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1001\r\n\r\n" + b"x" * 100
    )
    try:
        assert resp.status == 413
        # The body was not read: the connection cannot be reused.
        assert await client.is_closed_by_peer()
    finally:
        await client.close()
    assert up.requests == []


@pytest.mark.asyncio
async def test_body_at_limit_is_served(edge_and_upstream: tuple[Edge, Upstream]) -> None:
    edge, up = edge_and_upstream
    resp, client = await exchange(
        edge, b"POST / HTTP/1.1\r\n" + HOST + b"Content-Length: 1000\r\n\r\n" + b"x" * 1000
    )
    await client.close()
    assert resp.status == 200
    assert up.requests[0].body == b"x" * 1000


@pytest.mark.asyncio
async def test_chunked_body_over_limit_is_413(edge_and_upstream: tuple[Edge, Upstream]) -> None:
    edge, up = edge_and_upstream
    chunk = b"x" * 600
    raw = (
        b"POST / HTTP/1.1\r\n"
        + HOST
        + b"Transfer-Encoding: chunked\r\n\r\n"
        + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2
        + b"0\r\n\r\n"
    )
    resp, client = await exchange(edge, raw)
    try:
        assert resp.status == 413
        assert await client.is_closed_by_peer()
    finally:
        await client.close()
    assert up.requests == []


@pytest.mark.asyncio
async def test_slowloris_gets_408_and_close(edge_and_upstream: tuple[Edge, Upstream]) -> None:
    edge, up = edge_and_upstream
    client = await Client.connect(edge.port)
    loop = asyncio.get_running_loop()
    try:
        await client.send(b"GET / HTTP/1.1\r\nHost: app.exa")
        start = loop.time()
        await asyncio.sleep(0.1)
        await client.send(b"mple.com\r\nX-Slow: 1\r\n")  # trickling does not extend the deadline
        resp = await client.read_response(timeout=2)
        assert resp.status == 408
        assert 0.2 <= loop.time() - start < 1.5
        assert await client.is_closed_by_peer()
    finally:
        await client.close()
    assert up.requests == []


@pytest.mark.asyncio
async def test_idle_keepalive_connection_is_closed(
    edge_and_upstream: tuple[Edge, Upstream],
) -> None:
    edge, _ = edge_and_upstream
    loop = asyncio.get_running_loop()
    resp, client = await exchange(edge, get(APP))
    try:
        assert resp.status == 200
        start = loop.time()
        assert await client.is_closed_by_peer(timeout=2)
        assert 0.2 <= loop.time() - start < 1.5
    finally:
        await client.close()
    assert not edge.worker.clients


@pytest.mark.asyncio
async def test_silent_connection_is_closed(edge_and_upstream: tuple[Edge, Upstream]) -> None:
    """A connection that never sends a byte is not kept forever (header timeout)."""
    edge, _ = edge_and_upstream
    async with connected(edge.port) as client:
        raw = await client.read_raw_until_close(timeout=2)
        assert raw == b"" or raw.startswith(b"HTTP/1.1 408 ")
    assert not edge.worker.clients


@pytest.mark.asyncio
async def test_unknown_host_is_404_small_plain_page(
    edge_and_upstream: tuple[Edge, Upstream],
) -> None:
    edge, up = edge_and_upstream
    resp, client = await exchange(edge, get("nobody.example.com"))
    try:
        assert resp.status == 404
        assert (resp.header("content-type") or "").startswith("text/plain")
        assert 0 < len(resp.body) < 512
        # A bodiless request leaves nothing unread: the connection stays usable.
        await client.send(get(APP))
        assert (await client.read_response()).status == 200
    finally:
        await client.close()
    assert [r.header("host") for r in up.requests] == [APP]


@pytest.mark.asyncio
async def test_route_without_instances_is_503_with_retry_after(
    edge_and_upstream: tuple[Edge, Upstream],
) -> None:
    edge, up = edge_and_upstream
    resp, client = await exchange(edge, get(EMPTY))
    await client.close()
    assert resp.status == 503
    retry_after = resp.header("retry-after")
    assert retry_after is not None and retry_after.isdigit()
    assert up.requests == []


@pytest.mark.asyncio
async def test_rejected_request_in_pipeline_is_answered_in_turn(
    edge_and_upstream: tuple[Edge, Upstream],
) -> None:
    """A malformed request behind a good one: the good one is answered first, then the 400,
    then the connection closes; nothing after the bad request is forwarded."""
    edge, up = edge_and_upstream
    async with connected(edge.port) as client:
        await client.send(get(APP, "/good") + MALFORMED["cl_and_te"] + get(APP, "/smuggled"))
        first = await client.read_response()
        second = await client.read_response()
        assert (first.status, second.status) == (200, 400)
        assert await client.is_closed_by_peer()
    assert [r.target for r in up.requests] == ["/good"]
