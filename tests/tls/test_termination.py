"""TLS termination in a worker, over real sockets: which certificate a handshake gets, the
protocol settings, resumption, what is forwarded, HSTS, plain HTTP's redirect and ACME
challenges, the handshake counts, and certificates replaced under open connections."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import warnings
from pathlib import Path

import pytest

from edge import metrics
from edge.tls import load_files, load_pem
from tests.harness import HOST, Client, Response, get
from tests.integration.conftest import StartUpstream
from tests.tls.certs import CA, no_verify_context, peer_serial
from tests.tls.conftest import APPS, TlsEdge, tls_edge

pytestmark = pytest.mark.asyncio

APP = f"app.{APPS}"


async def tls_client(
    edge: TlsEdge, ctx: ssl.SSLContext, server_name: str | None = APP
) -> tuple[Client, ssl.SSLObject]:
    """A :class:`Client` on a new TLS connection, and its SSL object."""
    reader, writer = await asyncio.open_connection(
        HOST, edge.https_port, ssl=ctx, server_hostname=server_name or ""
    )
    ssl_object = writer.get_extra_info("ssl_object")
    return Client(reader, writer), ssl_object


async def presented(edge: TlsEdge, server_name: str | None) -> int:
    """The serial of the certificate a handshake naming ``server_name`` gets."""
    client, ssl_object = await tls_client(edge, no_verify_context(), server_name)
    try:
        return peer_serial(ssl_object)
    finally:
        await client.close()


async def tls_get(edge: TlsEdge, ctx: ssl.SSLContext, host: str, target: str = "/") -> Response:
    client, _ = await tls_client(edge, ctx, host)
    try:
        await client.send(get(host, target))
        return await client.read_response()
    finally:
        await client.close()


async def http_request(edge: TlsEdge, raw: bytes) -> Response:
    client = await Client.connect(edge.http_port)
    try:
        await client.send(raw)
        return await client.read_response()
    finally:
        await client.close()


# -- which certificate -------------------------------------------------------------------


async def test_sni_exact_then_wildcard_then_default(ca: CA, tmp_path: Path) -> None:
    apps = ca.issue(f"*.{APPS}", APPS)
    exact = ca.issue("app.customer.org")
    other = ca.issue("*.other.org")
    own = ca.issue(f"special.{APPS}")
    database = {"app.customer.org": exact, "*.other.org": other, f"special.{APPS}": own}
    async with tls_edge({}, tmp_path, files=apps, database=database) as edge:
        assert await presented(edge, "app.customer.org") == exact.serial
        assert await presented(edge, "APP.Customer.org") == exact.serial
        assert await presented(edge, "x.other.org") == other.serial
        # A wildcard covers one label only, and not the domain itself.
        assert await presented(edge, "a.b.other.org") == apps.serial
        assert await presented(edge, "other.org") == apps.serial
        # The apps wildcard from the files; a name of its own in the database wins.
        assert await presented(edge, f"web-abc1234-acme.{APPS}") == apps.serial
        assert await presented(edge, APPS) == apps.serial
        assert await presented(edge, f"special.{APPS}") == own.serial
        # Anything else, and a handshake without SNI, get the default: the files'.
        assert await presented(edge, "unknown.example.com") == apps.serial
        assert await presented(edge, None) == apps.serial
        # The client's own check passes where the certificate names the host.
        client, _ = await tls_client(edge, ca.client_context(), "app.customer.org")
        await client.close()
        assert edge.counts == (11, [0] * len(metrics.TLS_FAILURES))


async def test_database_wildcard_is_the_default_without_files(ca: CA, tmp_path: Path) -> None:
    apps = ca.issue(f"*.{APPS}")
    customer = ca.issue("app.customer.org")
    async with tls_edge({}, tmp_path, database={f"*.{APPS}": apps}) as edge:
        assert await presented(edge, None) == apps.serial
        certificate = load_pem(customer.cert_pem, customer.key_pem, "test")
        edge.store.set_database({"app.customer.org": certificate})
        # No certificate for the name and no default: the handshake is refused and counted.
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await presented(edge, "unknown.example.com")
        assert await presented(edge, "app.customer.org") == customer.serial
        _, failures = edge.counts
        assert failures[metrics.TLS_NO_CERTIFICATE] == 1


# -- protocol settings -------------------------------------------------------------------


async def test_tls_12_and_13_only(ca: CA, tmp_path: Path) -> None:
    async with tls_edge({}, tmp_path, files=ca.issue(APP)) as edge:
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            client, ssl_object = await tls_client(edge, ca.client_context(maximum=version))
            assert ssl_object.version() == ("TLSv1.2" if version.name == "TLSv1_2" else "TLSv1.3")
            cipher, _, _ = ssl_object.cipher()  # type: ignore[misc]
            assert "GCM" in cipher or "CHACHA20" in cipher, cipher
            assert ssl_object.compression() is None
            await client.close()
        # A client that goes no higher than TLS 1.1 is refused by the edge.
        with warnings.catch_warnings():  # the ssl module deprecates them, rightly
            warnings.simplefilter("ignore", DeprecationWarning)
            old = no_verify_context(
                minimum_version=ssl.TLSVersion.TLSv1, maximum_version=ssl.TLSVersion.TLSv1_1
            )
        old.set_ciphers("ALL:@SECLEVEL=0")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await tls_client(edge, old)
        # CBC suites are not offered for TLS 1.2 either.
        cbc = no_verify_context(maximum_version=ssl.TLSVersion.TLSv1_2)
        cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:AES128-SHA")
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await tls_client(edge, cbc)
        await asyncio.sleep(0.05)
        handshakes, failures = edge.counts
        assert handshakes == 2
        assert failures[metrics.TLS_PROTOCOL] == 2, failures


async def test_alpn_offers_http_11_only(ca: CA, tmp_path: Path) -> None:
    async with tls_edge({}, tmp_path, files=ca.issue(APP)) as edge:
        client, ssl_object = await tls_client(edge, ca.client_context(alpn=["h2", "http/1.1"]))
        assert ssl_object.selected_alpn_protocol() == "http/1.1"
        await client.close()
        # A client that asks for h2 only still gets through, without ALPN (and speaks 1.1).
        client, ssl_object = await tls_client(edge, ca.client_context(alpn=["h2"]))
        assert ssl_object.selected_alpn_protocol() is None
        await client.close()


def _resumed(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> ssl.SSLSocket:
    """A blocking TLS connection (the ssl module resumes sessions on those only) that has
    made one request, so that TLS 1.3's tickets have arrived."""
    sock = ctx.wrap_socket(
        socket.create_connection((HOST, port), timeout=5), server_hostname=APP, session=session
    )
    sock.sendall(get(APP, "/missing-host-is-fine"))
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    return sock


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["TLSv1.2", "TLSv1.3"]
)
async def test_session_resumption(ca: CA, tmp_path: Path, version: ssl.TLSVersion) -> None:
    async with tls_edge({}, tmp_path, files=ca.issue(APP)) as edge:
        ctx = ca.client_context(maximum=version)

        def run() -> list[bool]:
            reused: list[bool] = []
            session = None
            for step in range(3):
                if step == 2:
                    # A new certificate leaves the tickets valid (they are the listener's).
                    edge.store.set_files(load_pem(renewed.cert_pem, renewed.key_pem, "new"))
                sock = _resumed(edge.https_port, ctx, session)
                reused.append(bool(sock.session_reused))
                session = sock.session
                sock.close()
            return reused

        renewed = ca.issue(APP)
        assert await asyncio.to_thread(run) == [False, True, True]


# -- what is forwarded and answered --------------------------------------------------------


async def test_https_is_proxied_with_forwarded_proto(
    ca: CA, tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream()
    async with tls_edge({APP: [up.address]}, tmp_path, files=ca.issue(APP), redirect=False) as edge:
        response = await tls_get(edge, ca.client_context(), APP, "/path?q=1")
        assert response.status == 200
        seen = response.json()
        assert seen["target"] == "/path?q=1"
        headers = dict(seen["headers"])
        assert headers["x-forwarded-proto"] == "https"
        assert headers["x-forwarded-host"] == APP
        assert headers["x-forwarded-for"] == HOST
        assert response.header("strict-transport-security") is None
        # Without the redirect, plain HTTP is served too, and says so.
        plain = await http_request(edge, get(APP))
        assert dict(plain.json()["headers"])["x-forwarded-proto"] == "http"


async def test_hsts_on_https_responses_of_projects_that_set_it(
    ca: CA, tmp_path: Path, upstream: StartUpstream
) -> None:
    echo = await upstream()

    async def own_hsts(req: object, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nStrict-Transport-Security: max-age=5\r\nContent-Length: 2\r\n"
            b"\r\nok"
        )

    app_sets_its_own = await upstream(own_hsts)
    routes = {
        APP: [echo.address],
        f"own.{APPS}": [app_sets_its_own.address],
        f"plain.{APPS}": [echo.address],
        f"down.{APPS}": [],
    }
    hsts = {APP: 31536000, f"own.{APPS}": 600, f"down.{APPS}": 60}
    async with tls_edge(
        routes, tmp_path, files=ca.issue(f"*.{APPS}"), redirect=False, hsts=hsts
    ) as edge:
        ctx = ca.client_context()
        response = await tls_get(edge, ctx, APP)
        assert response.header("strict-transport-security") == "max-age=31536000"
        response = await tls_get(edge, ctx, f"own.{APPS}")
        assert response.header("strict-transport-security") == "max-age=5"
        assert (await tls_get(edge, ctx, f"plain.{APPS}")).header(
            "strict-transport-security"
        ) is None
        # The edge's own answer for the host (no instance: 503) carries it too.
        down = await tls_get(edge, ctx, f"down.{APPS}")
        assert down.status == 503 and down.header("strict-transport-security") == "max-age=60"
        # Never on plain HTTP (RFC 6797 7.2).
        plain = await http_request(edge, get(APP))
        assert plain.status == 200 and plain.header("strict-transport-security") is None


async def test_plain_http_is_redirected_to_https(ca: CA, tmp_path: Path) -> None:
    async with tls_edge({APP: []}, tmp_path, files=ca.issue(APP)) as edge:
        base = f"https://{APP}:{edge.https_port}"
        response = await http_request(edge, get(f"{APP}:8000", "/a/b?c=d&e"))
        assert response.status == 308
        assert response.header("location") == f"{base}/a/b?c=d&e"
        # Every host, known or not, and any method, with the body left unread.
        assert (await http_request(edge, get("Other.Example", "/"))).header(
            "location"
        ) == f"https://other.example:{edge.https_port}/"
        client = await Client.connect(edge.http_port)
        await client.send(
            f"POST /form HTTP/1.1\r\nHost: {APP}\r\nContent-Length: 5\r\n\r\nhello".encode()
        )
        posted = await client.read_response()
        assert posted.status == 308 and posted.header("connection") == "close"
        assert await client.is_closed_by_peer()
        await client.close()
        # GETs keep the connection; a HEAD gets no body.
        client = await Client.connect(edge.http_port)
        for _ in range(2):
            await client.send(get(APP, "/again"))
            again = await client.read_response()
            assert again.status == 308 and again.header("location") == f"{base}/again"
        await client.close()
        client = await Client.connect(edge.http_port)
        await client.send(f"HEAD / HTTP/1.1\r\nHost: {APP}\r\n\r\n".encode())
        head = await client.read_head()
        assert head.startswith(b"HTTP/1.1 308 ") and b"\r\nLocation: https://" in head
        await client.send(get(APP))  # nothing but the head came before this one's answer
        assert (await client.read_response()).status == 308
        await client.close()
        # IPv6 literals keep their brackets; a Host that is no host name is refused.
        literal = await http_request(edge, get("[::1]:80"))
        assert literal.header("location") == f"https://[::1]:{edge.https_port}/"
        assert (await http_request(edge, get("a/b"))).status == 400


async def test_redirect_leaves_out_the_default_port(ca: CA, tmp_path: Path) -> None:
    from edge.proxy.http import https_location  # noqa: PLC0415

    assert https_location(b"app.example:80", b"/x", b"") == b"https://app.example/x"
    assert https_location(b"app.example", b"*", b":8443") == b"https://app.example:8443/"
    for bad in (b"", b"a b", b"-x.org", b"[::1", b"[zz]", b"x.org:http", b"x@y.org"):
        assert https_location(bad, b"/", b"") is None, bad


async def test_acme_challenges_are_answered_on_http(
    ca: CA, tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream()
    challenges = {
        "tok-1_A": ("tok-1_A.thumbprint", time.time() + 60),
        "old": ("old.thumbprint", time.time() - 1),
    }
    async with tls_edge(
        {APP: [up.address]}, tmp_path, files=ca.issue(APP), challenges=challenges
    ) as edge:
        path = "/.well-known/acme-challenge/"
        answer = await http_request(edge, get("app.customer.org", path + "tok-1_A"))
        assert answer.status == 200
        assert answer.body == b"tok-1_A.thumbprint"
        assert answer.header("content-type") == "text/plain"
        for token in ("old", "unknown", ""):
            assert (await http_request(edge, get(APP, path + token))).status == 404
        assert (await http_request(edge, get(APP, "/.well-known/other"))).status == 308
        assert not up.requests


async def test_challenge_paths_are_proxied_without_challenges_from_the_source(
    ca: CA, tmp_path: Path, upstream: StartUpstream
) -> None:
    """From a routes file (no challenges), an app may answer its own, even with the
    redirect on."""
    up = await upstream()
    async with tls_edge({APP: [up.address]}, tmp_path, files=ca.issue(APP)) as edge:
        path = "/.well-known/acme-challenge/token"
        response = await http_request(edge, get(APP, path))
        assert response.status == 200 and response.json()["target"] == path
        assert (await http_request(edge, get(APP, "/"))).status == 308


# -- handshake counts ----------------------------------------------------------------------


async def test_handshake_failures_are_counted_by_reason(ca: CA, tmp_path: Path) -> None:
    async with tls_edge({}, tmp_path, files=ca.issue(APP), tls_handshake_timeout=0.3) as edge:
        client, _ = await tls_client(edge, ca.client_context())
        await client.close()
        # Plain HTTP to the HTTPS port: a protocol error.
        reader, writer = await asyncio.open_connection(HOST, edge.https_port)
        writer.write(get(APP))
        await reader.read()
        writer.close()
        # A client that says nothing: the handshake times out.
        reader, writer = await asyncio.open_connection(HOST, edge.https_port)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        # A client that leaves half-way.
        reader, writer = await asyncio.open_connection(HOST, edge.https_port)
        writer.write(b"\x16\x03\x01\x00")
        writer.close()
        expected = [0] * len(metrics.TLS_FAILURES)
        expected[metrics.TLS_PROTOCOL] = expected[metrics.TLS_TIMEOUT] = 1
        expected[metrics.TLS_CLOSED] = 1
        deadline = time.monotonic() + 2
        while edge.counts != (1, expected) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert edge.counts == (1, expected)

        block = [0.0] * metrics.SIZE
        edge.worker.metrics.publish(block, 0, 0)
        families = {
            f.name: f for f in metrics.ProxyCollector([block], [0.0] * metrics.SIZE).collect()
        }
        assert families["zeitwork_tls_handshakes"].samples[0].value == 1
        failures = {
            s.labels["reason"]: s.value for s in families["zeitwork_tls_handshake_failures"].samples
        }
        assert failures == {
            "timeout": 1,
            "protocol": 1,
            "no_certificate": 0,
            "closed": 1,
            "other": 0,
        }


# -- replacing certificates ----------------------------------------------------------------


async def test_new_certificate_for_new_handshakes_open_connections_kept(
    ca: CA, tmp_path: Path, upstream: StartUpstream
) -> None:
    up = await upstream()
    old, new = ca.issue(APP), ca.issue(APP)
    async with tls_edge({APP: [up.address]}, tmp_path, files=old, redirect=False) as edge:
        ctx = ca.client_context()
        kept, kept_ssl = await tls_client(edge, ctx)
        await kept.send(get(APP))
        assert (await kept.read_response()).status == 200
        cert_file, key_file = new.write(tmp_path, "renewed")
        edge.store.set_files(load_files(cert_file, key_file))
        assert await presented(edge, APP) == new.serial
        # The connection made before goes on with the certificate it had.
        await kept.send(get(APP))
        assert (await kept.read_response()).status == 200
        assert peer_serial(kept_ssl) == old.serial
        await kept.close()
