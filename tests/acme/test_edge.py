"""The whole way with a real ``zeitwork edge``: pebble validates HTTP-01 on the edge's plain
HTTP port, which answers the challenge from the database (through its routing table), and
the edge then serves the domain over HTTPS with the issued certificate, which chains to
pebble's root."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from edge.acme import CertificateManager
from edge.store import certificates
from tests.acme.conftest import SECRET, verified_domain
from tests.acme.pebble import HOST, Pebble, free_port, running_pebble
from tests.acme.test_issuance import check_stored, settings_for
from tests.admin.conftest import AdminClient
from tests.admin.process import EdgeProcess, running_edge
from tests.admin.test_domains import dns_zone

pytestmark = pytest.mark.needs_tool("pebble")

DOMAIN = "www.customer.test"


def served_certificate(port: int, server_name: str, root_pem: bytes) -> x509.Certificate:
    """The certificate the edge presents for ``server_name`` (SNI), after the handshake
    verified it up to ``root_pem`` for that name."""
    context = ssl.create_default_context(cadata=root_pem.decode())
    with (
        socket.create_connection((HOST, port), timeout=5) as sock,
        context.wrap_socket(sock, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@contextlib.asynccontextmanager
async def issued_through_the_edge(
    admin: AdminClient, migrated_url: str, tmp_path: Path
) -> AsyncIterator[tuple[EdgeProcess, Pebble, x509.Certificate, int]]:
    """An edge (HTTP and HTTPS, the test's certificate secret) and pebble validating on its
    HTTP port; a verified domain's certificate issued by one pass of the manager, with no
    stand-in: only the edge can answer the challenge. Yields the edge, pebble, the stored
    leaf (checked) and the HTTPS port."""
    secret_file = tmp_path / "certificate-secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o600)
    https_port = free_port()
    with (
        dns_zone() as (zone, dns_port),
        running_edge(
            migrated_url,
            tmp_path,
            "--https-port",
            str(https_port),
            "--certificate-secret-file",
            str(secret_file),
            # The test's manager orders, not the edge's own (see the last test).
            "--no-acme",
        ) as edge,
        running_pebble(tmp_path / "pebble", dns_port=dns_port, http_port=edge.http_port) as pebble,
    ):
        zone.addresses[DOMAIN] = "127.0.0.1"
        await verified_domain(admin, DOMAIN)
        # The edge loads a new challenge on its change notification: the default delay.
        manager = CertificateManager(admin.pool, settings_for(pebble, challenge_delay=1.0))
        [result] = await manager.run_once()
        assert result.ok, f"{result.error}\n--- edge log:\n{edge.log()}"
        leaf = check_stored(pebble, await certificates.get(admin.pool, DOMAIN))
        yield edge, pebble, leaf, https_port


@pytest.mark.asyncio
async def test_the_edge_answers_the_challenge(
    admin: AdminClient, migrated_url: str, tmp_path: Path
) -> None:
    async with issued_through_the_edge(admin, migrated_url, tmp_path):
        # Used and removed: the edge answers it no more.
        assert await admin.pool.fetchval("SELECT count(*) FROM acme_challenges") == 0


@pytest.mark.asyncio
async def test_the_edge_serves_the_issued_certificate(
    admin: AdminClient, migrated_url: str, tmp_path: Path
) -> None:
    async with issued_through_the_edge(admin, migrated_url, tmp_path) as (
        edge,
        pebble,
        leaf,
        https_port,
    ):
        # The edge reloads its certificates on the change notification; then a client
        # that trusts only pebble's root gets the new certificate for the domain's name.
        root_pem = pebble.root().public_bytes(serialization.Encoding.PEM)
        deadline = time.monotonic() + 10
        while True:
            try:
                served = await asyncio.to_thread(served_certificate, https_port, DOMAIN, root_pem)
                if served == leaf:
                    break
                problem = f"serves {served.subject.rfc4514_string()}"
            except (ssl.SSLError, OSError) as exc:
                problem = str(exc)
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the edge does not serve the issued certificate ({problem}):\n{edge.log()}"
                )
            await asyncio.sleep(0.1)


@pytest.mark.asyncio
async def test_the_leader_edge_orders_and_serves_by_itself(
    admin: AdminClient, migrated_url: str, tmp_path: Path
) -> None:
    """No manager in the test: the edge's leader loop orders the certificate of a domain
    once it is verified (woken by the notification) and the edge serves it."""
    secret_file = tmp_path / "certificate-secret"
    secret_file.write_text(SECRET + "\n")
    https_port, http_port = free_port(), free_port()
    with (
        dns_zone() as (zone, dns_port),
        running_pebble(tmp_path / "pebble", dns_port=dns_port, http_port=http_port) as pebble,
        running_edge(
            migrated_url,
            tmp_path,
            "--https-port",
            str(https_port),
            "--certificate-secret-file",
            str(secret_file),
            "--acme-directory",
            pebble.directory_url,
            "--acme-ca-bundle",
            str(pebble.ca.ca_pem),
            "--acme-email",
            "ops@zeitwork.test",
            # Where pebble validates HTTP-01 (the last --http-port wins).
            "--http-port",
            str(http_port),
        ) as edge,
    ):
        zone.addresses[DOMAIN] = "127.0.0.1"
        await verified_domain(admin, DOMAIN)
        root_pem = pebble.root().public_bytes(serialization.Encoding.PEM)
        deadline = time.monotonic() + 30
        while True:
            try:
                served = await asyncio.to_thread(served_certificate, https_port, DOMAIN, root_pem)
                break
            except (ssl.SSLError, OSError) as exc:
                problem = str(exc)
            if time.monotonic() > deadline:
                raise AssertionError(f"no certificate from pebble ({problem}):\n{edge.log()}")
            await asyncio.sleep(0.2)
        leaf = check_stored(pebble, await certificates.get(admin.pool, DOMAIN))
        assert served == leaf
