"""Requests the edge answers itself: exact status, connection closed where it must be, and
nothing of them reaches the instance."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.harness import Client, Edge, Response, Upstream, connected, get, request, running_edge
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


@contextlib.asynccontextmanager
async def exchange(edge: Edge, raw: bytes) -> AsyncIterator[tuple[Response, Client]]:
    """Send ``raw`` on a new connection and read the response; the connection stays open,
    for checks on it, until the block ends."""
    async with connected(edge.port) as client:
        await client.send(raw)
        yield await client.read_response(timeout=2), client


async def assert_rejected_and_closed(
    edge: Edge, up: Upstream, raw: bytes, status: int, *, head_valid: bool = False
) -> None:
    """``head_valid``: the head was fine and the body is not, so the edge may already have
    opened a connection to the instance (bodies stream); no request may reach it."""
    async with exchange(edge, raw) as (resp, client):
        assert resp.status == status, resp.body
        assert resp.header("connection") == "close"
        assert await client.is_closed_by_peer()
    assert up.requests == []
    if not head_valid:
        assert up.connections == 0


HOST = b"Host: app.example.com\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"


def post(headers: bytes, body: bytes = b"") -> bytes:
    """``POST /`` to APP with the header lines ``headers`` (each ending in CRLF), then
    ``body``."""
    return b"POST / HTTP/1.1\r\n" + HOST + headers + b"\r\n" + body


def get_with(headers: bytes) -> bytes:
    """``GET /`` to APP with the header lines ``headers`` (each ending in CRLF)."""
    return b"GET / HTTP/1.1\r\n" + HOST + headers + b"\r\n"


# Malformed requests whose head is valid: only the chunked body is broken.
BAD_BODY = {
    "invalid_chunk_size",
    "negative_chunk_size",
    "overflowing_chunk_size",
    "chunk_data_overrun",
}

MALFORMED = {
    "cl_and_te": post(b"Content-Length: 5\r\n" + CHUNKED, b"0\r\n\r\n"),
    "te_and_cl": post(CHUNKED + b"Content-Length: 5\r\n", b"0\r\n\r\n"),
    "differing_duplicate_cl": post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
    "cl_list": post(b"Content-Length: 5, 6\r\n", b"hello!"),
    "te_gzip_chunked": post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
    "te_chunked_twice": post(CHUNKED + CHUNKED, b"0\r\n\r\n"),
    "te_identity": post(b"Transfer-Encoding: identity\r\n"),
    "obs_fold": get_with(b"X-Folded: first\r\n  continued\r\n"),
    "bare_lf": b"GET / HTTP/1.1\n" + HOST.replace(b"\r\n", b"\n") + b"\n",
    "bare_lf_in_headers": get_with(b"X-A: 1\nX-B: 2\r\n"),
    "nul_in_value": get_with(b"X-Bad: a\x00b\r\n"),
    "cr_in_value": get_with(b"X-Bad: a\rb\r\n"),
    "invalid_chunk_size": post(CHUNKED, b"zz\r\nhello\r\n0\r\n\r\n"),
    "negative_chunk_size": post(CHUNKED, b"-5\r\nhello\r\n0\r\n\r\n"),
    "overflowing_chunk_size": post(CHUNKED, b"10000000000000000000005\r\nhello\r\n0\r\n\r\n"),
    "chunk_data_overrun": post(CHUNKED, b"5\r\nhello, world\r\n0\r\n\r\n"),
    "cl_plus_sign": post(b"Content-Length: +5\r\n", b"hello"),
    "cl_negative": post(b"Content-Length: -1\r\n"),
    "cl_not_a_number": post(b"Content-Length: five\r\n"),
    "space_before_colon": get_with(b"X-Bad : 1\r\n"),
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
    resp = await request(edge.port, raw, timeout=2)
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
    resp = await request(edge.port, raw, timeout=2)
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
    resp = await request(edge.port, b"GET %s HTTP/1.1\r\n%s\r\n" % (target, HOST), timeout=2)
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
    async with exchange(edge, raw) as (resp, client):
        assert resp.status == 405
        allow = {m.strip() for m in (resp.header("allow") or "").split(",")}
        assert {"GET", "HEAD", "POST"} <= allow
        assert "CONNECT" not in allow
        # Never a tunnel: nothing sent after a CONNECT is relayed anywhere.
        await client.send(b"SSH-2.0-OpenSSH\r\n")
        assert await client.is_closed_by_peer()
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
    async with exchange(edge, post(b"Content-Length: 1001\r\n", b"x" * 100)) as (resp, client):
        assert resp.status == 413
        # The body was not read: the connection cannot be reused.
        assert await client.is_closed_by_peer()
    assert up.requests == []


@pytest.mark.asyncio
async def test_body_at_limit_is_served(edge_and_upstream: tuple[Edge, Upstream]) -> None:
    edge, up = edge_and_upstream
    resp = await request(edge.port, post(b"Content-Length: 1000\r\n", b"x" * 1000), timeout=2)
    assert resp.status == 200
    assert up.requests[0].body == b"x" * 1000


@pytest.mark.asyncio
async def test_chunked_body_over_limit_is_413(edge_and_upstream: tuple[Edge, Upstream]) -> None:
    edge, up = edge_and_upstream
    chunk = b"x" * 600
    raw = post(CHUNKED, (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2 + b"0\r\n\r\n")
    async with exchange(edge, raw) as (resp, client):
        assert resp.status == 413
        assert await client.is_closed_by_peer()
    assert up.requests == []


@pytest.mark.asyncio
async def test_slowloris_gets_408_and_close(edge_and_upstream: tuple[Edge, Upstream]) -> None:
    edge, up = edge_and_upstream
    loop = asyncio.get_running_loop()
    async with connected(edge.port) as client:
        await client.send(b"GET / HTTP/1.1\r\nHost: app.exa")
        start = loop.time()
        await asyncio.sleep(0.1)
        await client.send(b"mple.com\r\nX-Slow: 1\r\n")  # trickling does not extend the deadline
        resp = await client.read_response(timeout=2)
        assert resp.status == 408
        assert 0.2 <= loop.time() - start < 1.5
        assert await client.is_closed_by_peer()
    assert up.requests == []


@pytest.mark.asyncio
async def test_idle_keepalive_connection_is_closed(
    edge_and_upstream: tuple[Edge, Upstream],
) -> None:
    edge, _ = edge_and_upstream
    loop = asyncio.get_running_loop()
    async with exchange(edge, get(APP)) as (resp, client):
        assert resp.status == 200
        start = loop.time()
        assert await client.is_closed_by_peer(timeout=2)
        assert 0.2 <= loop.time() - start < 1.5
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
    async with exchange(edge, get("nobody.example.com")) as (resp, client):
        assert resp.status == 404
        assert (resp.header("content-type") or "").startswith("text/plain")
        assert 0 < len(resp.body) < 512
        # A bodiless request leaves nothing unread: the connection stays usable.
        await client.send(get(APP))
        assert (await client.read_response()).status == 200
    assert [r.header("host") for r in up.requests] == [APP]


@pytest.mark.asyncio
async def test_route_without_instances_is_503_with_retry_after(
    edge_and_upstream: tuple[Edge, Upstream],
) -> None:
    edge, up = edge_and_upstream
    resp = await request(edge.port, get(EMPTY), timeout=2)
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
