"""The local CA of ``zeitwork up``: a certificate the standard TLS stack accepts for the apps'
hosts when it trusts the CA, kept across runs and renewed when due."""

from __future__ import annotations

import datetime
import ssl
import stat
import threading
from pathlib import Path

from cryptography import x509

from edge import localca


def _handshake(made: localca.LocalCertificates, server_name: str) -> x509.Certificate:
    """A real TLS handshake over a socket pair: the client trusts only the local CA."""
    import socket  # noqa: PLC0415

    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(made.server_cert, made.server_key)
    client_context = ssl.create_default_context(cafile=str(made.ca_cert))
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_context.wrap_socket(a, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_context.wrap_socket(b, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
            tls.send(b"x")
    finally:
        thread.join(5)
    assert der is not None and not errors, errors
    return x509.load_der_x509_certificate(der)


def test_the_apps_hosts_verify_against_the_local_ca(tmp_path: Path) -> None:
    made = localca.ensure(tmp_path / "tls", "zeitwork.app")
    for name in ("hello-abc1234-demo.zeitwork.app", "zeitwork.app", "localhost"):
        assert _handshake(made, name).subject.rfc4514_string() == "CN=*.zeitwork.app"
    assert stat.S_IMODE(made.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls" / "ca.key").stat().st_mode) == 0o600


def test_another_host_is_refused(tmp_path: Path) -> None:
    made = localca.ensure(tmp_path, "zeitwork.app")
    try:
        _handshake(made, "example.com")
    except ssl.SSLCertVerificationError as exc:
        assert "Hostname mismatch" in str(exc) or "doesn't match" in str(exc)
    else:
        raise AssertionError("a host outside the certificate was accepted")


def test_kept_across_runs_and_renewed_when_due(tmp_path: Path) -> None:
    first = localca.ensure(tmp_path, "zeitwork.app")
    ca_before = first.ca_cert.read_bytes()
    cert_before = first.server_cert.read_bytes()
    again = localca.ensure(tmp_path, "zeitwork.app")
    assert again.server_cert.read_bytes() == cert_before  # nothing to do
    # Another apps domain: a new server certificate from the same CA.
    other = localca.ensure(tmp_path, "apps.test")
    assert other.ca_cert.read_bytes() == ca_before
    assert other.server_cert.read_bytes() != cert_before
    leaf = x509.load_pem_x509_certificates(other.server_cert.read_bytes())[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "*.apps.test" in names.get_values_for_type(x509.DNSName)
    left = leaf.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert left > localca.RENEW_BEFORE
