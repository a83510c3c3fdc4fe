"""Hypothesis properties of the proxy, run through the real protocols on fake transports.

(1) However a valid stream of pipelined requests is cut into reads, the instances receive
    the same requests and the client the same responses.
(2) Random byte mutations of valid requests never raise out of ``data_received``, never
    leave a connection with nothing that will end it, never leak upstream connections, and
    never produce a 5xx other than 502/503/504 (and 505, the answer to an HTTP version the
    edge does not speak, RFC 9110 15.6.6).

Each example runs on its own event loop (``asyncio.run``), so loop state never leaks between
examples; fake instances answer every request they have received completely.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import math
import re
from dataclasses import dataclass

from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from tests.unit.fakes import FakeClient, ProtocolRig, ReceivedRequest, parse_responses

APP = "app.example.com"
A = "10.0.0.1:8080"
B = "10.0.0.2:8080"
ROUTES = {APP: [A, B], "other.example.com": [B]}

PROPERTY_SETTINGS = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- valid requests ------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    framing: str  # "none", "length", "chunked"
    chunks: tuple[int, ...]  # chunk sizes for "chunked"
    response: str  # how the instance frames its answer: "length", "chunked", "close"

    def wire(self) -> bytes:
        lines = [b"%s %s HTTP/1.1\r\n" % (self.method, self.target)]
        lines += [b"%s: %s\r\n" % h for h in self.headers]
        if self.framing == "length":
            lines.append(b"Content-Length: %d\r\n" % len(self.body))
        elif self.framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked\r\n")
        lines.append(b"\r\n")
        if self.framing == "length":
            lines.append(self.body)
        elif self.framing == "chunked":
            pos = 0
            for n in self.chunks:
                lines.append(b"%x\r\n%s\r\n" % (n, self.body[pos : pos + n]))
                pos += n
            lines.append(b"0\r\n\r\n")
        return b"".join(lines)


OPTIONAL_HEADERS = [
    (b"User-Agent", b"hypothesis/1"),
    (b"Accept", b"*/*"),
    (b"Accept-Encoding", b"gzip, br"),
    (b"Cookie", b"a=1; b=2"),
    (b"Connection", b"keep-alive"),
    (b"Keep-Alive", b"timeout=5"),
    (b"X-Custom", b"v a l u e"),
    (b"Via", b"1.0 fred"),
    (b"X-Forwarded-For", b"198.51.100.1"),
]

HOSTS = [b"app.example.com", b"APP.example.com", b"app.example.com:8000", b"other.example.com"]


UPGRADE = ((b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"))


@st.composite
def requests(draw: st.DrawFn, *, upgrades: bool = False) -> Req:
    """A valid request; with ``upgrades``, sometimes one asking for a WebSocket upgrade
    (the fake instances decline it: they never answer 101)."""
    method = draw(st.sampled_from([b"GET", b"HEAD", b"DELETE", b"POST", b"PUT", b"OPTIONS"]))
    path = draw(st.text(alphabet="abcxyz019-_/.~%", max_size=12)).encode()
    query = draw(st.one_of(st.just(b""), st.text(alphabet="a=&b1", max_size=8).map(str.encode)))
    target = b"/" + path + (b"?" + query if query else b"")
    host = draw(st.sampled_from(HOSTS))
    extra = draw(st.lists(st.sampled_from(OPTIONAL_HEADERS), max_size=4, unique=True))
    headers = [(b"Host", host), *extra]
    if upgrades and method == b"GET" and draw(st.integers(0, 9)) == 0:
        headers = [h for h in headers if h[0] != b"Connection"] + list(UPGRADE)
    body = b""
    framing = "none"
    chunks: tuple[int, ...] = ()
    if method in (b"POST", b"PUT"):
        framing = draw(st.sampled_from(["length", "chunked"]))
        body = draw(st.binary(max_size=300))
        if framing == "chunked" and body:
            inner = st.sets(st.integers(1, max(1, len(body) - 1)), max_size=4)
            cuts = sorted(draw(inner)) if len(body) > 1 else []
            edges = [0, *cuts, len(body)]
            chunks = tuple(b - a for a, b in itertools.pairwise(edges))
        if body and draw(st.booleans()):
            headers.append((b"Expect", b"100-continue"))
    response = draw(st.sampled_from(["length", "chunked", "close"]))
    return Req(method, target, tuple(headers), body, framing, chunks, response)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


# -- the fake instances' answers --------------------------------------------------------------


def answer_body(req: ReceivedRequest) -> bytes:
    return b"%s %s %d" % (req.method, req.target, len(req.body))


def answer(req: ReceivedRequest, style: str) -> tuple[bytes, bool]:
    """The instance's response to ``req`` framed per ``style``; True: then it hangs up."""
    body = b"" if req.method == b"HEAD" else answer_body(req)
    if style == "length":
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer_body(req))
        return head + body, False
    if style == "chunked":
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        if req.method == b"HEAD":
            return head, False
        half = len(body) // 2
        return head + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
            half,
            body[:half],
            len(body) - half,
            body[half:],
        ), False
    return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body, True


def answer_pending(rig: ProtocolRig, styles: dict[bytes, str], log: list[ReceivedRequest]) -> bool:
    """Answer every request an instance has completely received; True if there was one."""
    answered = False
    for instance in list(rig.instances):
        if instance.transport.closing or instance.transport.lost:
            continue
        if instance.broken is not None:
            # The instance cannot parse what it got: it says so and hangs up, as servers do.
            instance.respond(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            instance.hang_up()
            answered = True
            continue
        for req in instance.pending():
            log.append(req)
            data, hang_up = answer(req, styles.get(req.target, "length"))
            instance.respond(data)
            if hang_up:
                instance.hang_up()
            answered = True
            break  # the proxy sends one request per connection at a time
    return answered


async def drive(
    rig: ProtocolRig, chunks: list[bytes], styles: dict[bytes, str]
) -> tuple[FakeClient, list[ReceivedRequest], list[bytes]]:
    """Feed ``chunks`` (honouring pause_reading), answer upstream, until nothing moves."""
    client = rig.client()
    received: list[ReceivedRequest] = []
    waiting = list(chunks)
    settled = False
    while True:
        transport = client.transport
        if waiting and transport.reading and not transport.closing:
            client.send(waiting.pop(0))
            settled = False
            continue
        if answer_pending(rig, styles, received):
            settled = False
            continue
        if settled:
            return client, received, waiting
        await rig.settle()
        settled = True


# -- comparing runs ---------------------------------------------------------------------------

_RID_PREFIX = re.compile(rb"(X-Request-Id: )[0-9a-f]{20}")
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def normalized_head(req: ReceivedRequest) -> bytes:
    # The per-worker random prefix differs between runs; the per-request counter does not.
    return _RID_PREFIX.sub(rb"\1" + b"p" * 20, req.head)


def client_view(client: FakeClient, methods: list[bytes]) -> list[tuple[int, list[str], bytes]]:
    responses = parse_responses(client.data, methods, eof=client.transport.closing)
    return [
        (
            r.status,
            sorted(
                f"{n.decode().lower()}: {v.decode('latin-1')}"
                for n, v in r.headers
                if n.lower() not in (b"date", b"x-request-id")
            ),
            r.body,
        )
        for r in responses
    ]


async def run_stream(
    reqs: list[Req], chunks: list[bytes]
) -> tuple[list[tuple[bytes, bytes]], list[tuple[int, list[str], bytes]]]:
    rig = ProtocolRig.create(ROUTES)
    rig.add_idle_upstream(A)
    styles = {r.target: r.response for r in reqs}
    client, received, waiting = await drive(rig, chunks, styles)
    assert waiting == [], "the client connection stopped reading before the end of the stream"
    rig.check_loop_errors()
    assert all(p.busy == 0 for p in rig.worker.pools.values())
    # Exact bytes per request, except that a chunked body is compared decoded: the edge
    # re-chunks it as it arrives, so its chunk boundaries follow the reads.
    upstream = [
        (normalized_head(r), r.body if r.header(b"transfer-encoding") else r.raw[len(r.head) :])
        for r in received
    ]
    return upstream, client_view(client, [r.method for r in reqs])


def unique_targets(reqs: list[Req]) -> list[Req]:
    """Make targets unique so each request's answer style can be looked up by target."""
    return [dataclasses.replace(r, target=b"/%d%s" % (i, r.target)) for i, r in enumerate(reqs)]


# -- property 1 -------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(reqs=st.lists(requests(), min_size=1, max_size=5), data=st.data())
def test_any_split_of_a_request_stream_gives_the_same_exchanges(
    reqs: list[Req], data: st.DataObject
) -> None:
    reqs = unique_targets(reqs)
    stream = b"".join(r.wire() for r in reqs)
    cuts = data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=30), "cuts")
    if data.draw(st.booleans(), "byte by byte"):
        cuts = list(range(1, len(stream)))

    async def both() -> None:
        whole_up, whole_client = await run_stream(reqs, [stream])
        split_up, split_client = await run_stream(reqs, split(stream, cuts))
        # What the instances received: every request, in order, unchanged by the cuts.
        assert [b for _, b in whole_up] == [r.body for r in reqs]
        for (head, _), r in zip(whole_up, reqs, strict=True):
            assert head.startswith(b"%s %s HTTP/1.1\r\n" % (r.method, r.target))
        assert split_up == whole_up
        # What the client saw: one response per request, in order, the same either way.
        assert [body for _, _, body in whole_client] == [
            b"" if r.method == b"HEAD" else b"%s %s %d" % (r.method, r.target, len(r.body))
            for r in reqs
        ]
        assert split_client == whole_client
        reads = len(split(stream, cuts))
        event(f"{len(reqs)} requests")
        event("reads: " + ("1" if reads == 1 else "2-10" if reads <= 10 else "more"))

    asyncio.run(both())


# -- property 2 -------------------------------------------------------------------------------

ALLOWED_5XX = {502, 503, 504, 505}


@st.composite
def mutated_streams(draw: st.DrawFn) -> bytes:
    reqs = draw(st.lists(requests(upgrades=True), min_size=1, max_size=3))
    data = bytearray(b"".join(r.wire() for r in reqs))
    special = st.sampled_from(b"\r\n\x00 :;,\t0123456789abcdefABCDEF-\x7f\x80\xff/?#")
    for _ in range(draw(st.one_of(st.integers(1, 2), st.integers(1, 8)))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["flip", "set", "insert", "delete", "dup"]))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.one_of(special, st.integers(0, 255)))
        elif kind == "insert":
            data[pos:pos] = bytes([draw(st.one_of(special, st.integers(0, 255)))])
        elif kind == "delete":
            del data[pos]
        else:
            n = draw(st.integers(1, 40))
            data[pos:pos] = data[pos : pos + n]
    return bytes(data)


@PROPERTY_SETTINGS
@given(stream=mutated_streams(), cuts=st.lists(st.integers(1, 2000), max_size=12))
@example(stream=b"GET / HTTP/2.0\r\nHost: app.example.com\r\n\r\n", cuts=[])
@example(
    stream=b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    cuts=[30],
)
@example(
    stream=b"GET / HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
    b"POST / HTTP/1.1\r\nHost: app.example.com\r\nContent-Length: 999999\r\n\r\nab",
    cuts=[10, 50],
)
def test_mutated_requests_never_crash_hang_or_leak(stream: bytes, cuts: list[int]) -> None:

    async def run() -> None:
        rig = ProtocolRig.create(ROUTES, max_header_size=4096, max_body_size=1000)
        rig.add_idle_upstream(A)
        # An exception out of data_received propagates straight into this test.
        client, _, waiting = await drive(rig, split(stream, cuts), {})
        protocol, transport = client.protocol, client.transport

        # Never hang: something will end or advance this connection.
        if not transport.closing:
            in_flight = any(p.busy for p in rig.worker.pools.values())
            assert protocol.deadline < math.inf or in_flight, (
                "open connection with no deadline and nothing in flight"
            )
            if waiting and not transport.reading:
                assert in_flight, "reading paused with input waiting and nothing in flight"

        # The clocks run out: everything ends, cleanly.
        for _ in range(3):
            rig.fire_timeouts(1e6)
            answer_pending(rig, {}, [])
            await rig.settle()
        assert transport.closing, "the connection outlived every timeout"
        assert rig.worker.clients == set()
        for pool in rig.worker.pools.values():
            assert pool.busy == 0, f"{pool.address}: {pool.busy} connections still busy"
        rig.check_loop_errors()
        # What the edge forwards is always a well-formed request, however bad its input.
        refused = [(i.broken, i.transport.data) for i in rig.instances if i.broken]
        assert not refused, f"an instance could not parse what the edge sent: {refused}"

        statuses = [int(s) for s in _STATUS.findall(client.data)]
        for status in sorted(set(statuses)):
            event(f"status {status}")
        event("upstream saw a request" if any(i.requests for i in rig.instances) else "none")
        bad = [s for s in statuses if s >= 500 and s not in ALLOWED_5XX]
        assert not bad, f"5xx from the edge: {bad}\n{client.data!r}"

    asyncio.run(run())
