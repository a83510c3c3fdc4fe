"""Certificates for the TLS tests: a test CA that issues ECDSA leaf certificates by name, and
client contexts that trust it."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from edge import localca


@dataclass(frozen=True)
class Leaf:
    """An issued certificate: its PEM (leaf then CA), its key's PEM and its serial."""

    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    serial: int
    names: tuple[str, ...]

    def write(self, directory: Path, stem: str = "server") -> tuple[Path, Path]:
        """Write ``<stem>.crt`` and ``<stem>.key``; their paths."""
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        key.chmod(0o600)
        return cert, key


class CA:
    """A self-signed CA that signs leaf certificates for any names (edge.localca's)."""

    def __init__(self, name: str = "Zeitwork Test CA") -> None:
        self.cert, self.key = localca.new_ca(name, days=30)
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, *names: str, days: int = 30, rsa_bits: int = 0) -> Leaf:
        """A certificate for ``names`` (the first is also its common name), with an ECDSA
        P-256 key, or an RSA key of ``rsa_bits``."""
        key = (
            rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits) if rsa_bits else None
        )
        cert, used = localca.issue(self.cert, self.key, names, days=days, key=key)
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.pem
        return Leaf(chain, localca.key_pem(used), cert.serial_number, names)

    def client_context(
        self,
        *,
        maximum: ssl.TLSVersion | None = None,
        alpn: list[str] | None = None,
    ) -> ssl.SSLContext:
        """A client context that trusts this CA and checks host names."""
        ctx = ssl.create_default_context(cadata=self.pem.decode())
        if maximum is not None:
            ctx.maximum_version = maximum
        if alpn is not None:
            ctx.set_alpn_protocols(alpn)
        return ctx


def peer_serial(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> int:
    """The serial number of the certificate a connection's server presented."""
    der = ssl_object.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def no_verify_context(**versions: ssl.TLSVersion) -> ssl.SSLContext:
    """A client context that accepts any certificate (to see which one is presented)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for attribute, version in versions.items():
        setattr(ctx, attribute, version)
    return ctx


def handshake_serial(server: ssl.SSLContext, server_name: str | None) -> int:
    """The serial of the certificate ``server`` presents to a client naming ``server_name``,
    from a handshake in memory (no sockets)."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = no_verify_context().wrap_bio(client_in, client_out, server_hostname=server_name)
    tls = server.wrap_bio(server_in, server_out, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, (side, out, into) in enumerate(
            ((client, client_out, server_in), (tls, server_out, client_in))
        ):
            if not done[i]:
                try:
                    side.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            data = out.read()
            if data:
                into.write(data)
        if all(done):
            return peer_serial(client)
    raise AssertionError("the handshake in memory did not finish")
