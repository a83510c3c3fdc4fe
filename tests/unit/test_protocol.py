"""The proxy protocols on fake transports: exact bytes both ways, order, flow control, errors.

No sockets: a real ProxyWorker with real ClientConnection/UpstreamConnection objects, whose
transports are fakes that record what the protocols do (see tests/unit/fakes.py).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.unit.conftest import MakeRig
from tests.unit.fakes import (
    FIXED_DATE,
    REQUEST_ID,
    FakeClient,
    FakeInstance,
    ProtocolRig,
    parse_responses,
    response,
)

APP = "app.example.com"
A = "10.0.0.1:8080"
B = "10.0.0.2:8080"
GET_ROOT = b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n"


def one_instance(make_rig: MakeRig, **kwargs: object) -> tuple[ProtocolRig, FakeInstance]:
    rig = make_rig({APP: [A]}, **kwargs)
    return rig, rig.add_idle_upstream(A)


def sent_on_one_instance(
    make_rig: MakeRig, *data: bytes, **kwargs: object
) -> tuple[ProtocolRig, FakeInstance, FakeClient]:
    """:func:`one_instance`, and a new client that has sent ``data`` (a read each)."""
    rig, up = one_instance(make_rig, **kwargs)
    client = rig.client()
    client.send(*data)
    return rig, up, client


def request_id(raw: bytes) -> bytes:
    match = REQUEST_ID.search(raw)
    assert match is not None, raw
    return match.group(1)


def forwarded(rid: bytes, host: bytes = b"app.example.com") -> bytes:
    """The headers the edge appends for an untrusted client at CLIENT_PEER."""
    return (
        b"X-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: " + host + b"\r\n"
        b"X-Request-Id: " + rid + b"\r\n"
        b"Via: 1.1 zeitwork\r\n"
    )


# -- request head ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_simple_get_is_forwarded_with_exact_rewritten_head(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(
        make_rig,
        b"GET /path?q=1 HTTP/1.1\r\n"
        b"Host: app.example.com\r\n"
        b"User-Agent: test/1\r\n"
        b"Connection: keep-alive, X-Hop\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Proxy-Authorization: Basic Zm9vOmJhcg==\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Hop: secret\r\n"
        b"Accept: */*\r\n"
        b"\r\n",
    )
    [req] = up.poll()
    rid = request_id(req.raw)
    assert rid.startswith(rig.worker.request_id_prefix)
    assert req.raw == (
        b"GET /path?q=1 HTTP/1.1\r\n"
        b"Host: app.example.com\r\n"
        b"User-Agent: test/1\r\n"
        b"Accept: */*\r\n" + forwarded(rid) + b"\r\n"
    )
    assert client.data == b""  # nothing answered yet
    assert rig.connects == []  # the idle pooled connection was used


@pytest.mark.asyncio
async def test_request_ids_are_unique_per_request(make_rig: MakeRig) -> None:
    rig, up = one_instance(make_rig)
    client = rig.client()
    for i in range(3):
        client.send(b"GET /%d HTTP/1.1\r\nHost: app.example.com\r\n\r\n" % i)
        up.respond(response())
    ids = [request_id(r.raw) for r in up.poll()]
    assert len(set(ids)) == 3
    assert len({i[:20] for i in ids}) == 1  # the per-worker prefix


@pytest.mark.asyncio
async def test_untrusted_client_forwarding_headers_are_replaced(make_rig: MakeRig) -> None:
    _, up, _ = sent_on_one_instance(
        make_rig,
        b"GET / HTTP/1.1\r\nHost: app.example.com\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: evil.example\r\nX-Request-Id: chosen-by-client\r\n"
        b"Via: 1.0 fred\r\n\r\n",
    )
    [req] = up.poll()
    assert req.header(b"x-forwarded-for") == b"203.0.113.7"
    assert req.header(b"x-forwarded-proto") == b"http"
    assert req.header(b"x-forwarded-host") == b"app.example.com"
    assert req.header(b"x-request-id") != b"chosen-by-client"
    assert len(req.header(b"x-request-id") or b"") == 32
    # Via is end-to-end: the edge appends itself to what earlier hops wrote.
    assert req.header(b"via") == b"1.0 fred, 1.1 zeitwork"


@pytest.mark.asyncio
async def test_trusted_proxy_forwarding_headers_are_kept_and_appended(make_rig: MakeRig) -> None:
    _, up, _ = sent_on_one_instance(
        make_rig,
        b"GET / HTTP/1.1\r\nHost: app.example.com\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\nX-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: www.example.org\r\nX-Request-Id: abc-123\r\n\r\n",
        trusted_proxies=("203.0.113.0/24",),
    )
    [req] = up.poll()
    assert req.header(b"x-forwarded-for") == b"1.2.3.4, 203.0.113.7"
    assert req.header(b"x-forwarded-proto") == b"https"
    assert req.header(b"x-forwarded-host") == b"www.example.org"
    assert req.header(b"x-request-id") == b"abc-123"


@pytest.mark.asyncio
async def test_trusted_proxy_without_xff_gets_its_own_address(make_rig: MakeRig) -> None:
    rig, up = one_instance(make_rig, trusted_proxies=("203.0.113.7",))
    rig.client().send(b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
    [req] = up.poll()
    assert req.header(b"x-forwarded-for") == b"203.0.113.7"
    assert len(req.header(b"x-request-id") or b"") == 32


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "host",
    [b"app.example.com", b"APP.Example.COM", b"app.example.com.", b"app.example.com:8000"],
)
async def test_host_is_matched_case_insensitively_without_port(
    make_rig: MakeRig, host: bytes
) -> None:
    rig, up = one_instance(make_rig)
    rig.client().send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
    [req] = up.poll()
    assert req.header(b"host") == host  # forwarded as the client wrote it
    assert req.header(b"x-forwarded-host") == host


@pytest.mark.asyncio
async def test_absolute_form_target_for_the_same_host_becomes_origin_form(
    make_rig: MakeRig,
) -> None:
    rig, up = one_instance(make_rig)
    rig.client().send(
        b"GET http://app.example.com/a/b?c=d HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
    )
    [req] = up.poll()
    assert req.raw.startswith(b"GET /a/b?c=d HTTP/1.1\r\n")


@pytest.mark.asyncio
async def test_http10_request_is_forwarded_as_http11(make_rig: MakeRig) -> None:
    rig, up = one_instance(make_rig)
    rig.client().send(b"GET / HTTP/1.0\r\nHost: app.example.com\r\n\r\n")
    [req] = up.poll()
    assert req.raw.startswith(b"GET / HTTP/1.1\r\nHost: app.example.com\r\n")


@pytest.mark.asyncio
async def test_content_length_body_is_streamed_as_it_arrives(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(
        make_rig, b"POST /upload HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 10\r\n\r\nhel"
    )
    head = up.transport.data
    rid = request_id(head)
    assert head == (
        b"POST /upload HTTP/1.1\r\nHost: app.example.com\r\n"
        + forwarded(rid)
        + b"Content-Length: 10\r\n\r\nhel"
    )
    assert up.poll() == []  # incomplete: the edge did not wait for the whole body
    client.send(b"lo", b"world")
    [req] = up.poll()
    assert req.body == b"helloworld"
    assert req.raw.endswith(b"Content-Length: 10\r\n\r\nhelloworld")


@pytest.mark.asyncio
async def test_chunked_request_is_rechunked_without_extensions_or_trailers(
    make_rig: MakeRig,
) -> None:
    rig, up = one_instance(make_rig)
    rig.client().send(
        b"POST /up HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n3\r\nabc\r\n0\r\nX-Checksum: 1\r\n\r\n"
    )
    [req] = up.poll()
    rid = request_id(req.raw)
    assert req.raw == (
        b"POST /up HTTP/1.1\r\nHost: app.example.com\r\n"
        + forwarded(rid)
        + b"Transfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
    )


@pytest.mark.asyncio
async def test_expect_100_continue_is_answered_by_the_edge(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(
        make_rig,
        b"PUT /f HTTP/1.1\r\nHost: app.example.com\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\n\r\n",
    )
    assert client.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert b"expect" not in up.transport.data.lower()
    client.send(b"hello")
    [req] = up.poll()
    assert req.body == b"hello"
    up.respond(response(b"stored"))
    [resp] = parse_responses(client.data)
    assert (resp.status, resp.body) == (200, b"stored")


# -- response head and body ------------------------------------------------------------


@pytest.mark.asyncio
async def test_response_head_is_rewritten_exactly(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(make_rig, GET_ROOT)
    up.respond(
        b"HTTP/1.1 200 Fine\r\n"
        b"Content-Type: text/plain\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"X-Secret: 1\r\n"
        b"Proxy-Authenticate: Basic\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Via: 1.0 cache\r\n"
        b"Server: app\r\n"
        b"Content-Length: 5\r\n"
        b"\r\n"
        b"hello"
    )
    assert client.data == (
        b"HTTP/1.1 200 Fine\r\n"
        b"Content-Type: text/plain\r\n"
        b"Server: app\r\n"
        b"Content-Length: 5\r\n"
        b"Via: 1.0 cache, 1.1 zeitwork\r\n"
        b"\r\n"
        b"hello"
    )
    assert not client.transport.is_closing()
    assert len(rig.pool(A).idle) == 1  # the upstream connection went back to its pool


@pytest.mark.asyncio
async def test_chunked_response_is_rechunked_for_http11_client(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(make_rig, GET_ROOT)
    up.respond(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"5;ext=1\r\nhello\r\n"
    )
    up.send(b"3\r\nabc\r\n0\r\nX-Sum: 9\r\n\r\n")
    assert client.data == (
        b"HTTP/1.1 200 OK\r\nVia: 1.1 zeitwork\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    assert not client.transport.is_closing()


@pytest.mark.asyncio
async def test_close_delimited_response_is_chunked_for_http11_client(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(make_rig, GET_ROOT)
    up.respond(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello ")
    up.send(b"world")
    up.hang_up()
    assert client.data == (
        b"HTTP/1.1 200 OK\r\nVia: 1.1 zeitwork\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"
    )
    # The client connection stays usable: the body's end is explicit now.
    assert not client.transport.is_closing()
    assert rig.pool(A).busy == 0
    assert rig.pool(A).idle == []


@pytest.mark.asyncio
async def test_chunked_response_to_http10_client_is_close_delimited(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(
        make_rig, b"GET / HTTP/1.0\r\nHost: app.example.com\r\nConnection: keep-alive\r\n\r\n"
    )
    up.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert client.data == (
        b"HTTP/1.1 200 OK\r\nVia: 1.1 zeitwork\r\nConnection: close\r\n\r\nhello"
    )
    assert client.transport.is_closing()


@pytest.mark.asyncio
async def test_http10_keep_alive_client_gets_keep_alive(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(
        make_rig, b"GET / HTTP/1.0\r\nHost: app.example.com\r\nConnection: keep-alive\r\n\r\n"
    )
    up.respond(response(b"hi"))
    assert client.data == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nVia: 1.1 zeitwork\r\n"
        b"Connection: keep-alive\r\n\r\nhi"
    )
    assert not client.transport.is_closing()


@pytest.mark.asyncio
async def test_http10_client_without_keep_alive_is_closed_after_response(
    make_rig: MakeRig,
) -> None:
    _, up, client = sent_on_one_instance(
        make_rig, b"GET / HTTP/1.0\r\nHost: app.example.com\r\n\r\n"
    )
    up.respond(response(b"hi"))
    [resp] = parse_responses(client.data, eof=True)
    assert resp.header(b"connection") == b"close"
    assert client.transport.is_closing()


@pytest.mark.asyncio
async def test_connection_close_from_client_closes_after_response(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(
        make_rig, b"GET / HTTP/1.1\r\nHost: app.example.com\r\nConnection: close\r\n\r\n"
    )
    [req] = up.poll()
    assert req.header(b"connection") is None
    up.respond(response(b"hi"))
    [resp] = parse_responses(client.data)
    assert resp.header(b"connection") == b"close"
    assert client.transport.is_closing()
    assert len(rig.pool(A).idle) == 1  # the upstream connection itself is still reusable


@pytest.mark.asyncio
async def test_upstream_connection_close_is_not_reused_but_client_stays(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(make_rig, GET_ROOT)
    up.respond(response(b"bye", close=True))
    [resp] = parse_responses(client.data)
    assert (resp.status, resp.body) == (200, b"bye")
    assert resp.header(b"connection") is None  # hop-by-hop: about the upstream connection
    assert not client.transport.is_closing()
    assert up.transport.is_closing()
    assert rig.pool(A).idle == []


@pytest.mark.asyncio
async def test_early_response_before_request_body_ends_closes_client(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(
        make_rig, b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 100\r\n\r\nabc"
    )
    up.send(response(b"too big", status=b"413 Payload Too Large"))
    [resp] = parse_responses(client.data, eof=True)
    assert (resp.status, resp.body) == (413, b"too big")
    # The rest of the body will never be read: neither connection can be reused.
    assert client.transport.is_closing()
    assert up.transport.is_closing()
    await rig.settle()
    assert rig.pool(A).busy == 0


@pytest.mark.asyncio
async def test_head_response_has_no_body_and_connection_stays_usable(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(
        make_rig, b"HEAD / HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
    )
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nVia: 1.1 zeitwork\r\n\r\n"
    client.send(GET_ROOT)
    await rig.settle()
    [(inst, req)] = rig.pending_requests()
    assert req.method == b"GET"
    inst.respond(response(b"body"))
    [resp] = parse_responses(client.data)
    assert (resp.status, resp.body) == (200, b"body")


@pytest.mark.asyncio
async def test_interim_103_is_passed_and_100_from_instance_is_not(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(make_rig, GET_ROOT)
    up.respond(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n" + response(b"x")
    )
    [resp] = parse_responses(client.data)
    assert resp.interim == [103]
    assert (resp.status, resp.body) == (200, b"x")


# -- pipelining --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_pipelined_requests_are_sent_upstream_one_at_a_time(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(
        make_rig,
        b"GET /1 HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: app.example.com\r\n\r\n",
    )
    assert [r.target for r in up.poll()] == [b"/1"]
    assert not client.transport.is_reading()  # the second request waits its turn
    up.respond(response(b"one"))
    assert [r.target for r in up.poll()] == [b"/1", b"/2"]
    assert client.transport.is_reading()
    up.respond(response(b"two"))
    assert [r.body for r in parse_responses(client.data)] == [b"one", b"two"]
    assert rig.connects == []  # both went over the one kept-alive connection


@pytest.mark.asyncio
async def test_pipelined_edge_answers_keep_their_place_in_line(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(
        make_rig,
        b"GET /1 HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: unknown.example.com\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: app.example.com\r\n\r\n",
    )
    assert client.data == b""  # the 404 must not overtake the first response
    up.respond(response(b"one", headers=b"X-N: 1\r\n"))
    up.respond(response(b"three", headers=b"X-N: 3\r\n"))
    responses = parse_responses(client.data)
    assert [r.status for r in responses] == [200, 404, 200]
    assert [r.body for r in responses][::2] == [b"one", b"three"]
    assert [r.target for r in up.poll()] == [b"/1", b"/3"]


@pytest.mark.asyncio
async def test_pipelined_request_with_body_split_across_reads(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(
        make_rig,
        b"GET /1 HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 6\r\n\r\nabc",
    )
    up.respond(response(b"one"))
    client.send(b"def")
    reqs = up.poll()
    assert [(r.target, r.body) for r in reqs] == [(b"/1", b""), (b"/2", b"abcdef")]


# -- flow control ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_client_reading_pauses_while_upstream_write_buffer_is_full(
    make_rig: MakeRig,
) -> None:
    _, up, client = sent_on_one_instance(
        make_rig, b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 100\r\n\r\nab"
    )
    assert client.transport.is_reading()
    up.pause_writing()
    assert not client.transport.is_reading()
    up.resume_writing()
    assert client.transport.is_reading()
    client.send(b"x" * 98)
    [req] = up.poll()
    assert len(req.body) == 100


@pytest.mark.asyncio
async def test_upstream_reading_pauses_while_client_write_buffer_is_full(
    make_rig: MakeRig,
) -> None:
    rig, up, client = sent_on_one_instance(
        make_rig, b"GET /big HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
    )
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    client.protocol.pause_writing()
    assert not up.transport.is_reading()
    client.protocol.resume_writing()
    assert up.transport.is_reading()
    client.protocol.pause_writing()
    up.send(b"67890")  # data already in flight still arrives and is written
    assert client.data.endswith(b"1234567890")
    client.protocol.resume_writing()
    assert up.transport.is_reading()
    assert len(rig.pool(A).idle) == 1


@pytest.mark.asyncio
async def test_upstream_attached_while_client_is_paused_starts_paused(make_rig: MakeRig) -> None:
    rig, up = one_instance(make_rig)
    client = rig.client()
    client.protocol.pause_writing()
    client.send(GET_ROOT)
    assert not up.transport.is_reading()
    client.protocol.resume_writing()
    assert up.transport.is_reading()


@pytest.mark.asyncio
async def test_idle_upstream_goes_back_to_pool_reading(make_rig: MakeRig) -> None:
    """A connection paused for a slow client must not stay paused in the pool."""
    rig, up, client = sent_on_one_instance(make_rig, GET_ROOT)
    client.protocol.pause_writing()
    up.respond(response(b"x" * 10))
    assert rig.pool(A).idle == [up.conn]
    assert up.transport.is_reading()


@pytest.mark.asyncio
async def test_body_buffered_while_connecting_pauses_then_resumes(make_rig: MakeRig) -> None:
    rig = make_rig({APP: [A]}, write_high_water=1024)
    client = rig.client()
    client.send(
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 4096\r\n\r\n" + b"x" * 2048
    )
    assert rig.instances == []  # the connection is being opened
    assert not client.transport.is_reading()  # and the buffered body is over the high-water mark
    await rig.settle()
    [inst] = rig.instances_of(A)
    assert client.transport.is_reading(), "reading must resume once the buffer went upstream"
    client.send(b"y" * 2048)
    [req] = inst.poll()
    assert req.body == b"x" * 2048 + b"y" * 2048


# -- the edge's own answers ----------------------------------------------------------------

BAD_REQUESTS = [
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, id="missing-host"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: app.example.com\r\nHost: b\r\n\r\n", 400, id="two-hosts"
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: \r\n\r\n", 400, id="empty-host"),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        id="cl-and-te",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 3\r\n"
        b"Content-Length: 4\r\n\r\nabcd",
        400,
        id="differing-cl",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        400,
        id="te-not-chunked",
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: identity\r\n\r\n",
        400,
        id="te-identity",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: app.example.com\r\nX-A: b\r\n c\r\n\r\n", 400, id="obs-fold"
    ),
    pytest.param(b"GET / HTTP/1.1\nHost: app.example.com\n\n", 400, id="bare-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: app.example.com\r\nX-A: a\x00b\r\n\r\n", 400, id="nul"),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: app.example.com\r\nX-A: a\rb\r\n\r\n", 400, id="bare-cr"
    ),
    pytest.param(
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nhello\r\n0\r\n\r\n",
        400,
        id="bad-chunk-size",
    ),
    pytest.param(
        b"GET http://other.example.com/ HTTP/1.1\r\nHost: app.example.com\r\n\r\n",
        400,
        id="absolute-form-other-host",
    ),
    pytest.param(b"GET / HTTP/2.0\r\nHost: app.example.com\r\n\r\n", 505, id="http2-version"),
    pytest.param(
        b"CONNECT app.example.com:443 HTTP/1.1\r\nHost: app.example.com:443\r\n\r\n",
        405,
        id="connect",
    ),
    pytest.param(
        b"GET / HTTP/1.1\r\nHost: app.example.com\r\nExpect: something\r\n\r\n",
        417,
        id="unknown-expect",
    ),
]


@pytest.mark.asyncio
@pytest.mark.parametrize(("raw", "status"), BAD_REQUESTS)
async def test_bad_request_is_answered_and_closed(
    make_rig: MakeRig, raw: bytes, status: int
) -> None:
    rig, up, client = sent_on_one_instance(make_rig, raw)
    [resp] = parse_responses(client.data, eof=True)
    assert resp.status == status
    assert resp.header(b"connection") == b"close"
    assert resp.header(b"content-type") == b"text/plain; charset=utf-8"
    assert resp.body.startswith(b"%d " % status)
    assert client.transport.is_closing()
    assert up.transport.data == b""  # nothing reached the instance
    assert rig.connects == []
    await rig.settle()
    assert rig.worker.clients == set()


@pytest.mark.asyncio
async def test_bad_request_exact_bytes(make_rig: MakeRig) -> None:
    _, _, client = sent_on_one_instance(make_rig, b"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n")
    data = client.data
    head, _, body = data.partition(b"\r\n\r\n")
    assert head == (
        b"HTTP/1.1 400 Bad Request\r\n"
        b"Server: zeitwork\r\n"
        b"Date: " + FIXED_DATE + b"\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: %d\r\n"
        b"Connection: close" % len(body)
    )
    assert body.startswith(b"400 Bad Request\n")
    assert client.transport.is_closing()


@pytest.mark.asyncio
async def test_connect_is_refused_with_allow(make_rig: MakeRig) -> None:
    _, _, client = sent_on_one_instance(
        make_rig, b"CONNECT app.example.com:443 HTTP/1.1\r\nHost: app.example.com:443\r\n\r\n"
    )
    assert client.data.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    [resp] = parse_responses(client.data, eof=True)
    allow = resp.header(b"allow") or b""
    assert b"GET" in allow
    assert b"CONNECT" not in allow
    assert client.transport.is_closing()


@pytest.mark.asyncio
async def test_unsupported_version_is_505(make_rig: MakeRig) -> None:
    _, _, client = sent_on_one_instance(
        make_rig, b"GET / HTTP/2.0\r\nHost: app.example.com\r\n\r\n"
    )
    assert client.data.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")
    assert client.transport.is_closing()


@pytest.mark.asyncio
@pytest.mark.parametrize("split", [False, True])
async def test_head_over_the_limit_is_431(make_rig: MakeRig, split: bool) -> None:
    rig, up = one_instance(make_rig, max_header_size=1024)
    client = rig.client()
    raw = b"GET / HTTP/1.1\r\nHost: app.example.com\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
    if split:
        client.send(*(raw[i : i + 100] for i in range(0, len(raw), 100)))
    else:
        client.send(raw)
    assert client.data.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"\r\nConnection: close\r\n" in client.data
    assert client.transport.is_closing()
    assert up.transport.data == b""


@pytest.mark.asyncio
async def test_many_small_headers_over_the_limit_are_431(make_rig: MakeRig) -> None:
    _, _, client = sent_on_one_instance(
        make_rig,
        b"GET / HTTP/1.1\r\nHost: app.example.com\r\n" + b"X-A: b\r\n" * 200 + b"\r\n",
        max_header_size=1024,
    )
    assert client.data.startswith(b"HTTP/1.1 431 ")
    assert client.transport.is_closing()


@pytest.mark.asyncio
async def test_head_just_under_the_limit_is_forwarded(make_rig: MakeRig) -> None:
    rig, up = one_instance(make_rig, max_header_size=1024)
    rig.client().send(
        b"GET / HTTP/1.1\r\nHost: app.example.com\r\nX-Big: " + b"a" * 900 + b"\r\n\r\n"
    )
    assert len(up.poll()) == 1


@pytest.mark.asyncio
async def test_body_over_the_limit_is_413(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(
        make_rig,
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 101\r\n\r\n",
        max_body_size=100,
    )
    assert client.data.startswith(b"HTTP/1.1 413 ")
    assert client.transport.is_closing()
    assert up.transport.data == b""


@pytest.mark.asyncio
async def test_chunked_body_over_the_limit_closes(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(
        make_rig,
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nTransfer-Encoding: chunked\r\n\r\n",
        max_body_size=100,
    )
    client.send(b"40\r\n" + b"a" * 64 + b"\r\n", b"40\r\n" + b"b" * 64 + b"\r\n")
    # Part of the body already went upstream: a 413 may no longer be possible, but the
    # connection must end and the instance must not see a complete request.
    assert client.transport.is_closing()
    assert up.poll() == []
    if client.data:
        assert client.data.startswith(b"HTTP/1.1 413 ")


@pytest.mark.asyncio
async def test_unknown_host_is_404_and_connection_stays(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(
        make_rig, b"GET / HTTP/1.1\r\nHost: nope.example.com\r\n\r\n"
    )
    [resp] = parse_responses(client.take())
    assert resp.status == 404
    assert resp.header(b"connection") is None
    assert resp.header(b"content-type") == b"text/plain; charset=utf-8"
    assert len(resp.header(b"x-request-id") or b"") == 32
    assert not client.transport.is_closing()
    client.send(GET_ROOT)
    up.respond(response(b"ok"))
    assert parse_responses(client.data)[0].status == 200


@pytest.mark.asyncio
async def test_unknown_host_with_body_is_404_and_closed(make_rig: MakeRig) -> None:
    _, _, client = sent_on_one_instance(
        make_rig, b"POST / HTTP/1.1\r\nHost: nope.example.com\r\nContent-Length: 3\r\n\r\nabc"
    )
    [resp] = parse_responses(client.data, eof=True)
    assert resp.status == 404
    assert client.transport.is_closing()


@pytest.mark.asyncio
async def test_head_to_unknown_host_has_no_body(make_rig: MakeRig) -> None:
    _, _, client = sent_on_one_instance(
        make_rig, b"HEAD / HTTP/1.1\r\nHost: nope.example.com\r\n\r\n"
    )
    head, _, body = client.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert body == b""


@pytest.mark.asyncio
async def test_route_without_instances_is_503_with_retry_after(make_rig: MakeRig) -> None:
    rig = make_rig({"empty.example.com": []})
    client = rig.client()
    client.send(b"GET / HTTP/1.1\r\nHost: empty.example.com\r\n\r\n")
    [resp] = parse_responses(client.data)
    assert resp.status == 503
    assert resp.header(b"retry-after") is not None


# -- upstream failures ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_refused_connect_is_retried_on_another_instance(make_rig: MakeRig) -> None:
    rig = make_rig({APP: [A, B]})
    rig.outcomes[A] = ConnectionRefusedError(111, "Connection refused")
    client = rig.client()
    for _ in range(8):
        client.send(GET_ROOT)
        await rig.settle()
        [inst] = rig.instances_of(B)
        inst.respond(response(b"from b"))
    # Every request was served, by B (after A's refusal where A was chosen first) ...
    assert [r.body for r in parse_responses(client.data)] == [b"from b"] * 8
    # ... and passive health kept the refusing instance out once it had refused.
    assert rig.connects.count(A) <= 1
    assert rig.connects.count(B) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "error", [ConnectionRefusedError(111, "Connection refused"), TimeoutError()]
)
async def test_every_instance_failing_to_connect_is_502(
    make_rig: MakeRig, error: BaseException
) -> None:
    rig = make_rig({APP: [A, B]})
    rig.outcomes[A] = rig.outcomes[B] = error
    client = rig.client()
    client.send(GET_ROOT)
    await rig.settle()
    assert sorted(rig.connects) == [A, B]
    [resp] = parse_responses(client.data)
    assert resp.status == 502
    assert rig.pool(A).busy == rig.pool(B).busy == 0


@pytest.mark.asyncio
async def test_reused_connection_closed_before_response_is_retried(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(
        make_rig, b"GET /1 HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
    )
    up.respond(response(b"one"))
    client.take()
    client.send(b"GET /2 HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
    assert len(up.poll()) == 2
    up.hang_up()  # the instance's keep-alive timeout raced with our reuse
    await rig.settle()
    assert rig.connects == [A]
    fresh = rig.instances_of(A)[1]
    [req] = fresh.poll()
    assert req.target == b"/2"
    assert req.header(b"x-request-id") == up.poll()[1].header(b"x-request-id")
    fresh.respond(response(b"two"))
    [resp] = parse_responses(client.data)
    assert (resp.status, resp.body) == (200, b"two")


@pytest.mark.asyncio
async def test_fresh_connection_closed_before_response_is_502(make_rig: MakeRig) -> None:
    rig = make_rig({APP: [A]})
    client = rig.client()
    client.send(b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 2\r\n\r\nhi")
    await rig.settle()
    [inst] = rig.instances_of(A)
    assert len(inst.poll()) == 1
    inst.hang_up()
    await rig.settle()
    assert rig.connects == [A]  # not retried: the instance may have acted on it
    [resp] = parse_responses(client.data)
    assert resp.status == 502


@pytest.mark.asyncio
async def test_invalid_response_is_502(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(make_rig, GET_ROOT)
    up.respond(b"HTTP/1.1 abc nonsense\r\n\r\n")
    [resp] = parse_responses(client.data)
    assert resp.status == 502
    assert up.transport.is_closing()


@pytest.mark.asyncio
async def test_upstream_dying_mid_body_closes_client_without_complete_body(
    make_rig: MakeRig,
) -> None:
    rig, up, client = sent_on_one_instance(make_rig, GET_ROOT)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    up.hang_up()
    assert client.transport.is_closing()
    assert client.data.endswith(b"\r\n\r\n12345")
    assert rig.pool(A).busy == 0


@pytest.mark.asyncio
async def test_upstream_dying_mid_chunked_body_never_sends_last_chunk(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(make_rig, GET_ROOT)
    up.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    up.hang_up()
    assert client.transport.is_closing()
    assert not client.data.endswith(b"0\r\n\r\n")
    assert parse_responses(client.data) == []  # an incomplete response, not a complete one


@pytest.mark.asyncio
async def test_client_gone_mid_request_discards_upstream(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(
        make_rig, b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 10\r\n\r\nabc"
    )
    assert up.transport.data
    client.protocol.connection_lost(ConnectionResetError())
    assert up.transport.aborted
    await rig.settle()
    pool = rig.pool(A)
    assert (pool.busy, pool.idle) == (0, [])
    assert rig.worker.clients == set()
    assert rig.worker.upstreams == set()
    up.send(response(b"late"))  # whatever the instance still sends goes nowhere


@pytest.mark.asyncio
async def test_client_gone_while_waiting_for_response(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(make_rig, GET_ROOT)
    client.protocol.connection_lost(None)
    assert up.transport.aborted
    await rig.settle()
    assert rig.pool(A).busy == 0
    assert rig.worker.upstreams == set()


@pytest.mark.asyncio
async def test_half_close_while_waiting_abandons_the_exchange(make_rig: MakeRig) -> None:
    """A client's FIN counts as giving up (nginx's default): the instance's connection is
    discarded at once instead of being held until its response comes."""
    rig, up, client = sent_on_one_instance(make_rig, GET_ROOT)
    assert not client.protocol.eof_received()
    assert client.transport.is_closing()
    assert up.transport.aborted
    await rig.settle()
    assert rig.pool(A).busy == 0
    assert client.data == b""


# -- timeouts ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_slow_request_head_is_408(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(
        make_rig, b"GET / HTTP/1.1\r\nHost: app.exa", header_timeout=5.0
    )
    rig.fire_timeouts(4.0)
    assert not client.transport.is_closing()
    client.send(b"mple.com\r\nX-Slow: 1\r\n")  # trickling bytes does not extend the deadline
    rig.fire_timeouts(2.0)
    assert client.data.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert client.transport.is_closing()
    assert up.transport.data == b""


@pytest.mark.asyncio
async def test_silent_connection_is_closed_after_header_timeout(make_rig: MakeRig) -> None:
    rig, _ = one_instance(make_rig, header_timeout=5.0)
    client = rig.client()
    rig.fire_timeouts(6.0)
    assert client.transport.is_closing()
    assert client.data == b""


@pytest.mark.asyncio
async def test_idle_keep_alive_is_closed_quietly(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(make_rig, GET_ROOT, keepalive_timeout=5.0)
    up.respond(response())
    answered = client.data
    rig.fire_timeouts(4.0)
    assert not client.transport.is_closing()
    rig.fire_timeouts(2.0)
    assert client.transport.is_closing()
    assert client.data == answered


@pytest.mark.asyncio
async def test_upstream_silence_is_504(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(make_rig, GET_ROOT, upstream_response_timeout=5.0)
    rig.fire_timeouts(6.0)
    [resp] = parse_responses(client.data)
    assert resp.status == 504
    assert up.transport.aborted
    assert rig.pool(A).busy == 0


@pytest.mark.asyncio
async def test_upstream_silence_mid_body_closes_client(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(make_rig, GET_ROOT, upstream_response_timeout=5.0)
    up.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
    rig.fire_timeouts(6.0)
    assert client.transport.is_closing()
    assert up.transport.aborted


@pytest.mark.asyncio
async def test_stalled_request_body_ends_the_exchange(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(
        make_rig,
        b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 10\r\n\r\nabc",
        body_timeout=5.0,
    )
    rig.fire_timeouts(6.0)
    assert client.transport.is_closing()
    assert up.transport.aborted
    await rig.settle()
    assert rig.pool(A).busy == 0


# -- upgrade -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_websocket_upgrade_is_tunnelled(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(
        make_rig,
        b"GET /ws HTTP/1.1\r\nHost: app.example.com\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\nearly",
    )
    head = up.transport.take()
    assert b"\r\nConnection: upgrade\r\nUpgrade: websocket\r\n" in head
    assert b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" in head
    up.send(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nhello-from-server"
    )
    out = client.take()
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nUpgrade: websocket\r\n" in out
    assert out.endswith(b"\r\n\r\nhello-from-server")
    assert up.transport.take() == b"early"  # held until the 101, then relayed
    assert client.transport.is_reading()
    client.send(b"\x81\x05hello")
    assert up.transport.take() == b"\x81\x05hello"
    up.send(b"\x81\x02hi")
    assert client.take() == b"\x81\x02hi"
    up.hang_up()
    assert client.transport.is_closing()


@pytest.mark.asyncio
async def test_tunnel_idles_out_only_when_both_sides_are_silent(make_rig: MakeRig) -> None:
    rig, up, client = sent_on_one_instance(
        make_rig,
        b"GET /ws HTTP/1.1\r\nHost: app.example.com\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\n",
        tunnel_idle_timeout=10.0,
    )
    up.send(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    client.take()
    for _ in range(3):  # the server pushes, the client never speaks
        rig.fire_timeouts(6.0)
        up.send(b"\x81\x02hi")
        assert client.take() == b"\x81\x02hi"
    assert not client.transport.is_closing()
    rig.fire_timeouts(11.0)
    assert client.transport.is_closing()


@pytest.mark.asyncio
async def test_upgrade_refused_by_instance_is_a_normal_response(make_rig: MakeRig) -> None:
    _, up, client = sent_on_one_instance(
        make_rig,
        b"GET /ws HTTP/1.1\r\nHost: app.example.com\r\nConnection: Upgrade\r\n"
        b"Upgrade: websocket\r\n\r\n",
    )
    up.respond(response(b"no websockets here", status=b"400 Bad Request"))
    [resp] = parse_responses(client.data)
    assert (resp.status, resp.body) == (400, b"no websockets here")
    # Declined: the connection goes on as HTTP/1.1 (RFC 9110 7.8) or is closed, but it must
    # not sit unread until the keep-alive timeout.
    assert client.transport.is_closing() or client.transport.is_reading()
    if not client.transport.is_closing():
        assert resp.header(b"connection") != b"close"
        client.send(b"GET /next HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
        assert [r.target for r in up.poll()] == [b"/ws", b"/next"]


# -- shutdown ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_graceful_shutdown_finishes_in_flight_and_closes_idle(make_rig: MakeRig) -> None:
    rig, up = one_instance(make_rig)
    idle = rig.client()
    busy = rig.client()
    busy.send(b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n")
    stopping = asyncio.get_running_loop().create_task(rig.worker.shutdown(grace=5.0))
    await rig.settle()
    assert idle.transport.is_closing()
    assert not busy.transport.is_closing()
    up.respond(response(b"done"))
    await asyncio.wait_for(stopping, 2.0)
    [resp] = parse_responses(busy.data)
    assert (resp.status, resp.body) == (200, b"done")
    assert resp.header(b"connection") == b"close"
    assert busy.transport.is_closing()


@pytest.mark.asyncio
async def test_shutdown_grace_expiry_aborts_in_flight(make_rig: MakeRig) -> None:
    rig, _, client = sent_on_one_instance(make_rig, GET_ROOT)
    await asyncio.wait_for(rig.worker.shutdown(grace=0.05), 2.0)
    assert client.transport.aborted
