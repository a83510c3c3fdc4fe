"""What the instance receives and what the client gets back: target, body, headers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.harness import (
    UpstreamRequest,
    connected,
    eventually,
    exchange_on_one_connection,
    get,
    request,
    responder,
    running_edge,
)
from tests.integration.conftest import StartUpstream

APP = "app.example.com"

# Hop-by-hop request headers (RFC 9110 7.6.1) and the legacy proxy ones.
HOP_BY_HOP = (
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "proxy-connection",
    "proxy-authorization",
    "upgrade",
    "transfer-encoding",
)


def names(headers: list[tuple[str, str]]) -> set[str]:
    return {n.lower() for n, _ in headers}


@pytest.mark.asyncio
async def test_method_target_and_body_arrive_intact(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        body = b"a=1&b=%00\x01\xff binary \r\n body"
        resp = await request(
            edge.port,
            b"PATCH /p/a%20th;x?q=1&r=%2F HTTP/1.1\r\nHost: app.example.com\r\n"
            b"Content-Type: application/octet-stream\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body,
        )
    assert resp.status == 200
    [seen] = up.requests
    assert seen.method == "PATCH"
    assert seen.target == "/p/a%20th;x?q=1&r=%2F"  # verbatim, never re-encoded
    assert seen.body == body
    assert seen.header("content-length") == str(len(body))
    assert seen.header("content-type") == "application/octet-stream"
    assert seen.header("host") == APP


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("target", "host", "expected"),
    [
        ("http://app.example.com/abs/path?x=1", "app.example.com", "/abs/path?x=1"),
        ("http://APP.example.com", "app.example.com", "/"),
        ("http://app.example.com:8080/p", "app.example.com:8080", "/p"),
    ],
)
async def test_absolute_form_for_same_host_becomes_origin_form(
    tmp_path: Path, upstream: StartUpstream, target: str, host: str, expected: str
) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        resp = await request(edge.port, get(host, target))
    assert resp.status == 200
    [seen] = up.requests
    assert seen.target == expected


@pytest.mark.asyncio
async def test_hop_by_hop_request_headers_are_not_forwarded(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        resp = await request(
            edge.port,
            b"POST /x HTTP/1.1\r\nHost: app.example.com\r\n"
            b"Connection: keep-alive, X-Hop-One\r\nconnection: x-hop-two\r\n"
            b"Keep-Alive: timeout=5\r\nTE: trailers\r\nTrailer: X-Checksum\r\n"
            b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\n"
            b"Upgrade: websocket\r\n"  # not named in Connection: not an upgrade request
            b"X-Hop-One: 1\r\nX-Hop-Two: 2\r\nX-End-To-End: kept\r\n"
            b"Content-Length: 5\r\n\r\nhello",
        )
    assert resp.status == 200
    [seen] = up.requests
    forwarded = names(seen.headers)
    assert not forwarded & {*HOP_BY_HOP, "x-hop-one", "x-hop-two"}, seen.headers
    assert seen.header("x-end-to-end") == "kept"
    assert seen.body == b"hello"


@pytest.mark.asyncio
async def test_hop_by_hop_response_headers_are_not_forwarded(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    async def handler(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Resp-Hop\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\nProxy-Authenticate: Basic realm=x\r\n"
            b"TE: trailers\r\nTrailer: X-Checksum\r\nUpgrade: h2c\r\nX-Resp-Hop: secret\r\n"
            b"X-End-To-End: kept\r\nContent-Length: 2\r\n\r\nok"
        )

    up = await upstream(handler)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        resp = await request(edge.port, get(APP))
    assert resp.status == 200
    assert resp.body == b"ok"
    got = names(resp.headers)
    hop = {"keep-alive", "proxy-connection", "proxy-authenticate", "te", "trailer", "upgrade"}
    assert not got & {*hop, "x-resp-hop"}, resp.headers
    # A Connection header the edge itself adds may only carry its own tokens.
    assert resp.header("connection") in (None, "keep-alive")
    assert resp.header("x-end-to-end") == "kept"


@pytest.mark.asyncio
async def test_forwarding_headers_are_set(tmp_path: Path, upstream: StartUpstream) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        responses = await exchange_on_one_connection(
            edge.port, get("App.Example.com"), get("App.Example.com")
        )
        assert [r.status for r in responses] == [200, 200]
    first, second = up.requests
    assert first.header("x-forwarded-for") == "127.0.0.1"
    assert first.header("x-forwarded-proto") == "http"
    assert first.header("x-forwarded-host") == "App.Example.com"
    assert first.header("via") == "1.1 zeitwork"
    rid1, rid2 = first.header("x-request-id"), second.header("x-request-id")
    assert rid1 and rid2 and rid1 != rid2  # one id per request
    for seen in (first, second):
        for name in ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-request-id"):
            assert sum(n == name for n, _ in seen.headers) == 1, (name, seen.headers)


SPOOFED = (
    "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.1\r\n"
    "X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nX-Request-Id: client-id-1\r\n"
)


@pytest.mark.asyncio
async def test_untrusted_peer_cannot_spoof_forwarding_headers(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        resp = await request(edge.port, get(APP, extra=SPOOFED))
    assert resp.status == 200
    [seen] = up.requests
    assert seen.header("x-forwarded-for") == "127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == APP
    rid = seen.header("x-request-id")
    assert rid and rid != "client-id-1" and "client-id-1" not in rid


@pytest.mark.asyncio
async def test_trusted_peer_forwarding_headers_are_appended_and_kept(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream()
    async with running_edge(
        {APP: [up.address]}, tmp_path, trusted_proxies=("127.0.0.1/32",)
    ) as edge:
        resp = await request(edge.port, get(APP, extra=SPOOFED))
        resp2 = await request(edge.port, get(APP))
    assert resp.status == resp2.status == 200
    seen, plain = up.requests
    assert seen.header("x-forwarded-for") == "203.0.113.7, 198.51.100.1, 127.0.0.1"
    assert seen.header("x-request-id") == "client-id-1"
    # Without the client's own values the edge still sets them.
    assert plain.header("x-forwarded-for") == "127.0.0.1"
    assert plain.header("x-request-id")
    assert plain.header("x-forwarded-proto") == "http"


@pytest.mark.asyncio
async def test_via_is_appended_in_both_directions(tmp_path: Path, upstream: StartUpstream) -> None:
    async def handler(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        via = b"Via: 1.1 app-server\r\n" if req.target == "/with-via" else b""
        writer.write(b"HTTP/1.1 200 OK\r\n%sContent-Length: 2\r\n\r\nok" % via)

    up = await upstream(handler)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        with_via = await request(
            edge.port, get(APP, "/with-via", "Via: 1.0 fred, 1.1 p.example\r\n")
        )
        without = await request(edge.port, get(APP, "/plain"))
    assert up.requests[0].header("via") == "1.0 fred, 1.1 p.example, 1.1 zeitwork"
    assert up.requests[1].header("via") == "1.1 zeitwork"
    assert with_via.header("via") == "1.1 app-server, 1.1 zeitwork"
    assert without.header("via") == "1.1 zeitwork"


@pytest.mark.asyncio
async def test_close_delimited_response_is_rechunked_for_http11_client(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """An instance that ends its body by closing: an HTTP/1.1 client gets a complete,
    properly framed body (it cannot tell the connection's end from a truncation otherwise)."""
    payload = b"x" * 100_000

    async def handler(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + payload)
        await writer.drain()
        writer.close()

    up = await upstream(handler)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        resp = await request(edge.port, get(APP))
    assert resp.status == 200
    assert resp.body == payload
    assert resp.header("transfer-encoding") == "chunked" or resp.header("connection") == "close"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "host", ["APP.Example.COM", "app.example.com:8080", "app.example.com.", "app.example.com.:80"]
)
async def test_host_is_matched_case_insensitively_without_port(
    tmp_path: Path, upstream: StartUpstream, host: str
) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        resp = await request(edge.port, get(host))
    assert resp.status == 200
    assert up.requests[0].header("host") == host
    assert up.requests[0].header("x-forwarded-host") == host


@pytest.mark.asyncio
async def test_head_response_has_no_body_and_connection_stays_usable(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    async def handler(req: UpstreamRequest, writer: asyncio.StreamWriter) -> None:
        if req.method == "HEAD":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nX-Head: yes\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nget")

    up = await upstream(handler)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(b"HEAD / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
            head = await client.read_head()
            assert head.startswith(b"HTTP/1.1 200")
            assert b"content-length: 1000" in head.lower()
            assert b"x-head: yes" in head.lower()
            # No body bytes follow: the next response comes right after the head.
            await client.send(get(APP, "/after"))
            resp = await client.read_response()
            assert resp.body == b"get"
    assert [r.method for r in up.requests] == ["HEAD", "GET"]


@pytest.mark.asyncio
@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses_keep_the_connection_in_sync(
    tmp_path: Path, upstream: StartUpstream, status: int
) -> None:
    extra = b'ETag: "v1"\r\n' if status == 304 else b""
    up = await upstream(
        responder(
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext",
            {"/empty": b"HTTP/1.1 %d Nothing\r\n%s\r\n" % (status, extra)},
        )
    )
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        first, second = await exchange_on_one_connection(
            edge.port, get(APP, "/empty"), get(APP, "/next")
        )
        assert edge.pool_sizes() == {up.address: (1, 0)}
    assert first.status == status
    assert first.body == b""
    assert first.header("transfer-encoding") is None
    assert second.body == b"next"
    assert up.connections == 1


@pytest.mark.asyncio
async def test_response_with_both_te_and_cl_cannot_desync_the_client(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    """Transfer-Encoding overrides Content-Length (RFC 9112 6.3): the edge must not pass on
    a Content-Length that no longer matches the body it sends (response splitting), so the
    client either gets the de-chunked body framed correctly or a 502."""

    both = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"a\r\n0123456789\r\n0\r\n\r\n"
    )
    up = await upstream(
        responder(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond", {"/both": both})
    )
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        async with connected(edge.port) as client:
            await client.send(get(APP, "/both") + get(APP, "/second"))
            first = await client.read_response()
            if first.status == 200:
                assert first.body == b"0123456789"
                assert first.header("content-length") in (None, "10")
                second = await client.read_response()
                assert (second.status, second.body) == (200, b"second")
            else:
                assert first.status == 502


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "response",
    [
        b"HELLO THERE\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * 70_000 + b"\r\n\r\n",
    ],
    ids=["garbage", "bad_length", "two_lengths", "huge_head"],
)
async def test_invalid_upstream_response_is_502(
    tmp_path: Path, upstream: StartUpstream, response: bytes
) -> None:
    up = await upstream(responder(response))
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        resp = await request(edge.port, get(APP), timeout=2)
        assert await eventually(lambda: edge.pool_sizes() == {up.address: (0, 0)})
    assert resp.status == 502


@pytest.mark.asyncio
async def test_options_asterisk_is_forwarded(tmp_path: Path, upstream: StartUpstream) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        resp = await request(edge.port, b"OPTIONS * HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
    assert resp.status == 200
    assert (up.requests[0].method, up.requests[0].target) == ("OPTIONS", "*")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "status_line, extra",
    [(b"HTTP/1.1 200 OK", b"Connection: close\r\n"), (b"HTTP/1.0 200 OK", b"")],
    ids=["connection_close", "http10"],
)
async def test_upstream_connection_that_will_close_is_not_reused(
    tmp_path: Path, upstream: StartUpstream, status_line: bytes, extra: bytes
) -> None:
    """An instance that says it will close (or speaks HTTP/1.0 without keep-alive) may keep
    its socket open a little longer; the edge must not send the next request over it. Its
    ``Connection: close`` is hop-by-hop: the client's own connection stays open."""

    lazy_closer = responder(status_line + b"\r\n" + extra + b"Content-Length: 2\r\n\r\nok")
    up = await upstream(lazy_closer)
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        responses = await exchange_on_one_connection(
            edge.port, get(APP, "/0"), get(APP, "/1"), timeout=2
        )
    for resp in responses:
        assert resp.status == 200
        assert resp.header("connection") is None
    assert [r.target for r in up.requests] == ["/0", "/1"]
    assert up.connections == 2
