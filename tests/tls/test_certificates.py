"""Certificates without sockets: the contexts' settings, loading from PEM and files and the
errors that name what is wrong, the store's choice by name, the file watch, and the options
that turn HTTPS on."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from edge import metrics
from edge.cli import build_parser, edge_config
from edge.config import ConfigError, TlsConfig
from edge.tls import (
    Certificate,
    CertificateError,
    CertificateStore,
    FileWatch,
    decrypt_key,
    failure_reason,
    load_files,
    load_pem,
    server_context,
)
from tests.tls.certs import CA


def test_context_settings() -> None:
    ctx = server_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert not ctx.options & ssl.OP_NO_TICKET
    for cipher in ctx.get_ciphers():
        assert cipher["aead"], cipher["name"]
        if cipher["protocol"] == "TLSv1.2":
            assert cipher["kea"] == "kx-ecdhe", cipher["name"]


def test_pem_and_files_load_with_their_names(ca: CA, tmp_path: Path) -> None:
    leaf = ca.issue("a.example", "*.b.example")
    cert = load_pem(leaf.cert_pem, leaf.key_pem, "test")
    assert cert.names == ("a.example", "*.b.example")
    assert "a.example, *.b.example (expires " in cert.describe()
    cert_file, key_file = leaf.write(tmp_path)
    assert load_files(cert_file, key_file).names == cert.names
    # Nothing of the key is left behind in a file.
    assert not [p for p in Path("/proc/self/fd").iterdir() if "memfd" in os.path.realpath(p)]


def test_broken_certificates_are_named(ca: CA, tmp_path: Path) -> None:
    leaf, other = ca.issue("a.example"), ca.issue("a.example")
    with pytest.raises(CertificateError, match=r"db a\.example: not a PEM certificate"):
        load_pem(b"-----BEGIN CERTIFICATE-----\nnope\n", leaf.key_pem, "db a.example")
    with pytest.raises(CertificateError, match="does not belong to the certificate"):
        load_pem(leaf.cert_pem, other.key_pem, "db a.example")
    with pytest.raises(CertificateError, match="cannot load the certificate and key"):
        load_pem(leaf.cert_pem, b"not a key", "db a.example")
    cert_file, key_file = leaf.write(tmp_path)
    with pytest.raises(CertificateError, match=r"cannot read .*missing\.crt"):
        load_files(tmp_path / "missing.crt", key_file)
    with pytest.raises(CertificateError, match=r"missing\.key"):
        load_files(cert_file, tmp_path / "missing.key")


def test_a_key_with_a_passphrase_is_refused_without_prompting(ca: CA) -> None:
    leaf = ca.issue("a.example")
    key = serialization.load_pem_private_key(leaf.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    locked = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(CertificateError, match="passphrase"):
        load_pem(leaf.cert_pem, locked, "test")


def test_store_lookup(ca: CA) -> None:
    def loaded(*names: str) -> Certificate:
        leaf = ca.issue(*names)
        return load_pem(leaf.cert_pem, leaf.key_pem, names[0])

    store = CertificateStore("zeitwork.app")
    assert store.lookup("a.zeitwork.app") is None and store.lookup(None) is None
    files = loaded("*.zeitwork.app", "zeitwork.app")
    store.set_files(files)
    exact = loaded("shop.example")
    store.set_database({"shop.example": exact, "*.zeitwork.app": loaded("*.zeitwork.app")})
    assert len(store) == 3
    assert store.lookup("SHOP.example.") is exact.context
    db_wildcard = store.database["*.zeitwork.app"].context
    # The database's certificate for a name wins over the files'.
    assert store.lookup("x.zeitwork.app") is db_wildcard
    assert store.lookup("zeitwork.app") is files.context
    assert store.lookup("a.b.zeitwork.app") is files.context
    assert store.lookup(None) is files.context
    store.set_files(None)
    # Without files, the apps wildcard from the database is the default.
    assert store.lookup("unknown.example") is db_wildcard


def test_file_watch_waits_for_the_files_to_settle(ca: CA, tmp_path: Path) -> None:
    cert_file, key_file = ca.issue("a.example").write(tmp_path)
    watch = FileWatch(cert_file, key_file)
    assert not watch.changed()
    ca.issue("a.example").write(tmp_path)
    os.utime(cert_file, ns=(1, 1))  # a different mtime whatever the clock's resolution
    assert not watch.changed()  # seen changing: wait for one more look
    assert watch.changed()
    watch.loaded()
    assert not watch.changed()
    key_file.unlink()
    assert not watch.changed() and not watch.changed()  # half a pair is never loaded


def test_failure_reasons() -> None:
    refused = ssl.SSLError(1, "[SSL: CALLBACK_FAILED] callback failed")
    refused.reason = "CALLBACK_FAILED"
    version = ssl.SSLError(1, "[SSL: UNSUPPORTED_PROTOCOL] unsupported protocol")
    version.reason = "UNSUPPORTED_PROTOCOL"
    assert failure_reason(refused) == metrics.TLS_NO_CERTIFICATE
    assert failure_reason(version) == metrics.TLS_PROTOCOL
    assert failure_reason(ConnectionAbortedError("SSL handshake is taking longer")) == (
        metrics.TLS_TIMEOUT
    )
    assert failure_reason(ConnectionResetError()) == metrics.TLS_CLOSED
    assert failure_reason(None) == metrics.TLS_CLOSED
    assert failure_reason(RuntimeError()) == metrics.TLS_OTHER


def test_keys_are_plain_pem_without_a_secret_else_decrypted(ca: CA) -> None:
    from edge import secrets  # noqa: PLC0415

    leaf = ca.issue("a.example")
    assert decrypt_key(leaf.key_pem, None) == leaf.key_pem
    secret = "a-secret-of-the-operators-0123"
    stored = secrets.encrypt(secret, leaf.key_pem)
    assert decrypt_key(stored, secret) == leaf.key_pem
    with pytest.raises(CertificateError, match="cannot decrypt"):
        decrypt_key(stored, "another-secret-0123456789")


# -- the options ---------------------------------------------------------------------------


def _tls(*argv: str) -> TlsConfig:
    return edge_config(build_parser().parse_args(["edge", "--routes", "r.json", *argv])).tls


def test_https_is_on_with_a_certificate_or_a_port(
    ca: CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("edge.cli.DEFAULT_TLS_CERT", tmp_path / "server.crt")
    monkeypatch.setattr("edge.cli.DEFAULT_TLS_KEY", tmp_path / "server.key")
    monkeypatch.delenv("ZEITWORK_CERTIFICATE_SECRET", raising=False)
    assert not _tls().enabled
    assert _tls("--https-port", "8443") == TlsConfig(port=8443)
    cert, key = ca.issue("a.example").write(tmp_path, "other")
    given = _tls("--tls-cert", str(cert), "--tls-key", str(key), "--no-https-redirect")
    assert (given.port, given.cert_file, given.key_file, given.redirect) == (443, cert, key, False)
    assert not _tls("--tls-cert", str(cert), "--tls-key", str(key), "--https-port", "0").enabled
    with pytest.raises(ConfigError, match="needs its key file"):
        _tls("--tls-cert", str(cert))
    # The operations guide's files, where both exist.
    default_cert, default_key = ca.issue("a.example").write(tmp_path)
    assert _tls() == TlsConfig(port=443, cert_file=default_cert, key_file=default_key)
    default_key.unlink()
    with pytest.raises(ConfigError, match=r"server.crt exists but not .*server.key"):
        _tls()


def test_certificate_secret_from_file_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZEITWORK_CERTIFICATE_SECRET", "from-the-environment-0123")
    assert _tls("--https-port", "1").certificate_secret == "from-the-environment-0123"
    secret = tmp_path / "secret"
    secret.write_text("from-the-file-0123456789\n")
    tls = _tls("--https-port", "1", "--certificate-secret-file", str(secret))
    assert tls.certificate_secret == "from-the-file-0123456789"
    assert "from-the-file" not in repr(tls)
    secret.write_text("short")
    with pytest.raises(ConfigError, match="at least 16"):
        _tls("--https-port", "1", "--certificate-secret-file", str(secret))


def test_ports_must_differ() -> None:
    with pytest.raises(ConfigError, match="HTTPS port and the HTTP port"):
        edge_config(build_parser().parse_args(["edge", "--routes", "r", "--https-port", "8000"]))
    with pytest.raises(ConfigError, match="admin port and the HTTPS port"):
        edge_config(build_parser().parse_args(["edge", "--routes", "r", "--https-port", "8080"]))
