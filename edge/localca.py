"""A local certificate authority for ``zeitwork up``: HTTPS on one machine without a public CA.

``ensure(directory, apps_domain)`` keeps in ``directory`` a CA (``ca.crt``, ``ca.key``) and a
certificate for ``*.<apps domain>``, the apps domain itself, ``localhost`` and ``127.0.0.1``
signed by it (``server.crt`` with the chain, ``server.key``). Both are made on first use and
kept; the server certificate is made again when it has less than a month left, or when the
apps domain changed. Keys are ECDSA P-256, files 0600 except the certificates. Trust the CA in
curl with ``--cacert <directory>/ca.crt``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVER_DAYS = 397  # what browsers accept for a server certificate
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True, slots=True)
class LocalCertificates:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    tmp.replace(path)


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def key_pem(key: PrivateKey) -> bytes:
    """The key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def new_ca(
    common_name: str, *, days: int = CA_DAYS
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA (ECDSA P-256) that may sign server certificates, valid ``days``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    names: Sequence[str],
    *,
    days: int = SERVER_DAYS,
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A server certificate signed by ``ca`` for ``names`` (host names or IP addresses; the
    first is also its common name), with ``key`` or a new ECDSA P-256 one."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_alt_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / "ca.crt", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and cert.not_valid_after_utc > _now():
            return cert, key
    cert, key = new_ca("Zeitwork local CA")
    _write(key_path, key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    # A new CA: the server certificate of the old one is no good any more.
    (directory / "server.crt").unlink(missing_ok=True)
    return cert, key


def _names(apps_domain: str) -> list[str]:
    return [f"*.{apps_domain}", apps_domain, "localhost", "127.0.0.1"]


def _server_current(path: Path, ca: x509.Certificate, apps_domain: str) -> bool:
    if not path.exists() or not path.with_name("server.key").exists():
        return False
    cert = x509.load_pem_x509_certificates(path.read_bytes())[0]
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    return (
        cert.issuer == ca.subject
        and cert.not_valid_after_utc - _now() > RENEW_BEFORE
        and list(names) == [_alt_name(n) for n in _names(apps_domain)]
    )


def ensure(directory: Path, apps_domain: str) -> LocalCertificates:
    """The local CA and the apps' certificate in ``directory``, made or renewed as needed."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca(directory)
    server = LocalCertificates(
        directory / "ca.crt", directory / "server.crt", directory / "server.key"
    )
    if _server_current(server.server_cert, ca, apps_domain):
        return server
    cert, key = issue(ca, ca_key, _names(apps_domain))
    _write(server.server_key, key_pem(key), 0o600)
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca.public_bytes(
        serialization.Encoding.PEM
    )
    _write(server.server_cert, chain, 0o644)
    return server
