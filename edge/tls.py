"""TLS termination: each worker's certificates, chosen by SNI, replaced without a restart.

A :class:`CertificateStore` per worker holds one ``ssl.SSLContext`` per certificate, indexed
by exact name and by wildcard (``*.zeitwork.app`` serves ``a.zeitwork.app`` but neither
``zeitwork.app`` nor ``a.b.zeitwork.app``), plus a default. The HTTPS listener's own context
has no certificate: its ``sni_callback`` picks one per handshake (the exact name's, else the
wildcard's, else the default; no SNI gets the default) and switches the connection to it.
Certificates come from

- the files ``--tls-cert``/``--tls-key``: the apps wildcard, and the default certificate;
- the database's ``certificates`` table (:class:`DatabaseCertificates`): a row's ``domain``
  (``app.customer.org`` or ``*.zeitwork.app``) names what it serves, and it wins over the
  files for that name. Its key is encrypted at rest (:func:`decrypt_key`).

Every context has the same settings: TLS 1.2 and 1.3 only, AEAD cipher suites with forward
secrecy for TLS 1.2 (TLS 1.3's are all AEAD), no compression, no renegotiation, ALPN
``http/1.1``, session tickets. Tickets and the session cache belong to the listening context
(OpenSSL keeps the first context as the session context), so replacing a certificate does not
end resumption.

Replacing is one assignment of a new index: handshakes in progress and open connections keep
the context they have, new handshakes get the new one. A certificate that fails to load
(bad PEM, a key that does not match) is logged and the current one stays.

Handshakes are counted with their outcome (:class:`TlsServer`): the loop's SSL protocol is
built here, as the loop itself does for ``create_server(ssl=...)``, but with a waiter whose
result says whether and why a handshake failed, which ``create_server`` keeps to itself.

Limits: ticket keys are per worker process, so a client resumes only when its next
connection reaches the same worker; contexts are built eagerly, about a millisecond each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from edge import metrics
from edge.store.routes import load_certificate_versions, load_certificates

log = logging.getLogger("edge.tls")

# TLS 1.2 suites: ECDHE key exchange, AES-GCM or ChaCha20-Poly1305 only. TLS 1.3's fixed set
# (AES-GCM, ChaCha20-Poly1305) is all AEAD already.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
ALPN = ["http/1.1"]

# What a handshake failure counts as (label ``reason`` of
# zeitwork_tls_handshake_failures_total), by the error the SSL protocol reports.
_CALLBACK_FAILED = "CALLBACK_FAILED"  # our sni_callback refused: no certificate for the name


class CertificateError(ValueError):
    """A certificate or key cannot be used; the message names where it came from."""


def server_context() -> ssl.SSLContext:
    """A server context with the edge's protocol settings and no certificate yet."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options &= ~ssl.OP_NO_TICKET
    # ALPN is selected with the context a connection has after SNI: set on every context.
    ctx.set_alpn_protocols(ALPN)
    return ctx


def decrypt_key(blob: bytes, secret: str | None) -> bytes:
    """The PEM private key of a ``certificates`` row from its ``key_encrypted`` column.

    The one place that knows how keys are stored: without a certificate secret, as plain
    PEM; with one, encrypted by :mod:`edge.secrets` (AES-GCM under a key derived from it).
    """
    if secret is None:
        return blob
    try:
        from edge import secrets  # noqa: PLC0415 (only edges given a secret need it)

        return secrets.decrypt(secret, blob)
    except ImportError as exc:
        raise CertificateError(f"cannot decrypt the private key: {exc}") from None
    except ValueError as exc:  # secrets.SecretError
        raise CertificateError(str(exc)) from None


def _no_passphrase() -> bytes:
    raise CertificateError("the private key is protected by a passphrase; store it without one")


@dataclass(frozen=True, slots=True)
class Certificate:
    """A loaded certificate: the names it serves, its context, and where it came from."""

    names: tuple[str, ...]
    not_after: datetime
    context: ssl.SSLContext = field(repr=False)
    source: str

    def describe(self) -> str:
        shown = ", ".join(self.names[:3]) + (" ..." if len(self.names) > 3 else "")
        return f"{shown} (expires {self.not_after:%Y-%m-%d %H:%M} UTC) from {self.source}"


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a certificate is for: its subjectAltName, else its common name."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [
            str(attr.value) for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
    return tuple(dict.fromkeys(n.strip().lower().rstrip(".") for n in names if n.strip()))


def _parse_leaf(cert_pem: bytes, source: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise CertificateError(f"{source}: not a PEM certificate: {exc}") from None


def _context_from(cert_path: str, key_path: str, source: str) -> ssl.SSLContext:
    ctx = server_context()
    try:
        ctx.load_cert_chain(cert_path, key_path, password=_no_passphrase)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if reason == "KEY_VALUES_MISMATCH":
            reason = "the private key does not belong to the certificate"
        raise CertificateError(f"{source}: cannot load the certificate and key: {reason}") from None
    except OSError as exc:
        raise CertificateError(f"{source}: {exc.strerror or exc}") from None
    return ctx


def load_files(cert_file: Path, key_file: Path) -> Certificate:
    """The certificate (with its chain) and key of two PEM files."""
    source = f"{cert_file} and {key_file}"
    try:
        cert_pem = cert_file.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {cert_file}: {exc.strerror or exc}") from None
    leaf = _parse_leaf(cert_pem, str(cert_file))
    ctx = _context_from(str(cert_file), str(key_file), source)
    return Certificate(certificate_names(leaf), leaf.not_valid_after_utc, ctx, source)


def load_pem(cert_pem: bytes, key_pem: bytes, source: str) -> Certificate:
    """A certificate from PEM bytes (the chain, then the key), through an anonymous memory
    file: ``ssl`` loads only from paths, and a key must not touch the disk."""
    leaf = _parse_leaf(cert_pem, source)
    fd = os.memfd_create("zeitwork-certificate", os.MFD_CLOEXEC)
    try:
        data = memoryview(cert_pem.rstrip(b"\n") + b"\n" + key_pem)
        while data:
            data = data[os.write(fd, data) :]
        path = f"/proc/self/fd/{fd}"
        ctx = _context_from(path, path, source)
    finally:
        os.close(fd)
    return Certificate(certificate_names(leaf), leaf.not_valid_after_utc, ctx, source)


# -- the store -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Index:
    """What the SNI callback reads: swapped whole, never changed in place."""

    exact: Mapping[str, ssl.SSLContext] = field(default_factory=dict)
    # "zeitwork.app" -> the context of "*.zeitwork.app"
    wildcard: Mapping[str, ssl.SSLContext] = field(default_factory=dict)
    default: ssl.SSLContext | None = None


class CertificateStore:
    """One worker's certificates and the listening context that chooses among them."""

    def __init__(self, apps_domain: str = "zeitwork.app") -> None:
        self.apps_domain = apps_domain
        self.files: Certificate | None = None
        # By the ``domain`` of their row.
        self.database: Mapping[str, Certificate] = {}
        self._index = _Index()
        self.context = server_context()
        self.context.sni_callback = self._sni

    def __len__(self) -> int:
        return len(self.database) + (self.files is not None)

    def set_files(self, certificate: Certificate | None) -> None:
        self.files = certificate
        self._rebuild()

    def set_database(self, certificates: Mapping[str, Certificate]) -> None:
        self.database = certificates
        self._rebuild()

    def _rebuild(self) -> None:
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        files = self.files
        if files is not None:
            for name in files.names:
                _add(exact, wildcard, name, files.context)
        for domain, cert in self.database.items():
            _add(exact, wildcard, domain, cert.context)
        default = files.context if files is not None else None
        if default is None:
            # Without files, the apps wildcard from the database is the best default there is.
            default = wildcard.get(self.apps_domain)
        self._index = _Index(exact, wildcard, default)

    def lookup(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context for a handshake naming ``server_name`` (None: no SNI)."""
        index = self._index
        if server_name:
            name = server_name.lower()
            if name[-1:] == ".":
                name = name[:-1]
            ctx = index.exact.get(name)
            if ctx is not None:
                return ctx
            parent = name.partition(".")[2]
            if parent:
                ctx = index.wildcard.get(parent)
                if ctx is not None:
                    return ctx
        return index.default

    def _sni(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> int | None:
        ctx = self.lookup(server_name)
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        ssl_object.context = ctx
        return None


def _add(
    exact: dict[str, ssl.SSLContext],
    wildcard: dict[str, ssl.SSLContext],
    name: str,
    ctx: ssl.SSLContext,
) -> None:
    name = name.lower().rstrip(".")
    if name.startswith("*."):
        wildcard[name[2:]] = ctx
    elif name:
        exact[name] = ctx


# -- certificates from the files -------------------------------------------------------------


def file_signature(cert_file: Path, key_file: Path) -> tuple[object, ...] | None:
    """What changes when either file is replaced or rewritten (None: one is missing)."""
    try:
        a, b = cert_file.stat(), key_file.stat()
    except OSError:
        return None
    return (a.st_ino, a.st_mtime_ns, a.st_size, b.st_ino, b.st_mtime_ns, b.st_size)


class FileWatch:
    """Notices changed certificate files: a change counts once the files have stayed the
    same for one more check, so a certificate copied before its key is not loaded half-way.
    The edge's master checks about once a second and tells the workers to reload."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._loaded = file_signature(cert_file, key_file)
        self._seen = self._loaded

    def changed(self) -> bool:
        """Whether the files changed since the last load and have settled since."""
        now = file_signature(self.cert_file, self.key_file)
        settled = now == self._seen
        self._seen = now
        return settled and now is not None and now != self._loaded

    def loaded(self) -> None:
        """The files as they are now were handled (loaded, or refused and logged)."""
        self._loaded = self._seen = file_signature(self.cert_file, self.key_file)


# -- certificates from the database ----------------------------------------------------------


class DatabaseCertificates:
    """Follows the ``certificates`` table into a :class:`CertificateStore`.

    A reload reads every row's version (a hash of certificate and key) and fetches only the
    rows that changed, so the periodic full reload stays cheap with thousands of domains.
    A row that cannot be loaded is logged once per version; its domain keeps the certificate
    it had (none if it never had one).
    """

    # Contexts built between two yields to the event loop (a few ms of work).
    BATCH = 16

    def __init__(self, store: CertificateStore, secret: str | None) -> None:
        self.store = store
        self.secret = secret
        self._versions: dict[str, str] = {}
        self._failed: dict[str, str] = {}

    async def reload(self, conn: Any) -> None:
        """Bring the store up to date on ``conn``; database errors propagate."""
        versions = await load_certificate_versions(conn)
        wanted = [
            domain
            for domain, version in versions.items()
            if self._versions.get(domain) != version and self._failed.get(domain) != version
        ]
        current = dict(self.store.database)
        changed = False
        for domain in [d for d in current if d not in versions]:
            del current[domain]
            self._versions.pop(domain, None)
            changed = True
        for domain in [d for d in self._failed if d not in versions]:
            del self._failed[domain]
        if wanted:
            rows = await load_certificates(conn, wanted)
            for i, (domain, cert_pem, key_blob, version) in enumerate(rows):
                if i and i % self.BATCH == 0:
                    await asyncio.sleep(0)
                try:
                    key_pem = decrypt_key(key_blob, self.secret)
                    cert = load_pem(cert_pem.encode(), key_pem, f"the database ({domain})")
                except CertificateError as exc:
                    self._failed[domain] = version
                    log.error(
                        "TLS: certificate of %s not loaded, keeping the current: %s", domain, exc
                    )
                    continue
                self._failed.pop(domain, None)
                self._versions[domain] = version
                current[domain] = cert
                changed = True
                _warn_if_expired(cert)
        if changed:
            self.store.set_database(current)


def _warn_if_expired(cert: Certificate) -> None:
    if cert.not_after <= datetime.now(UTC):
        log.warning("TLS: certificate %s has expired", cert.describe())


# -- the HTTPS listener ---------------------------------------------------------------------


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Callable[..., asyncio.BaseProtocol]:
    """The loop's own SSL protocol (uvloop's or asyncio's; the same constructor)."""
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415
        import uvloop.loop  # noqa: PLC0415

        if isinstance(loop, uvloop.Loop):
            return uvloop.loop.SSLProtocol  # type: ignore[attr-defined,no-any-return]
    import asyncio.sslproto  # noqa: PLC0415

    return asyncio.sslproto.SSLProtocol


def failure_reason(exc: BaseException | None) -> int:
    """Index in :data:`edge.metrics.TLS_FAILURES` of a failed handshake's error."""
    if isinstance(exc, ssl.SSLError):
        return (
            metrics.TLS_NO_CERTIFICATE if exc.reason == _CALLBACK_FAILED else metrics.TLS_PROTOCOL
        )
    if isinstance(exc, ConnectionAbortedError):  # what both loops raise at the timeout
        return metrics.TLS_TIMEOUT
    if exc is None or isinstance(exc, (ConnectionResetError, BrokenPipeError)):
        return metrics.TLS_CLOSED
    return metrics.TLS_OTHER


class TlsServer:
    """Builds each accepted connection's SSL protocol around an application protocol, and
    counts the handshakes' outcomes into ``counts`` (a worker's ``ProxyMetrics``)."""

    def __init__(
        self,
        store: CertificateStore,
        app_factory: Callable[[], Any],
        counts: metrics.ProxyMetrics,
        *,
        handshake_timeout: float,
    ) -> None:
        self.store = store
        self.app_factory = app_factory
        self.counts = counts
        self.handshake_timeout = handshake_timeout
        self.loop = asyncio.get_running_loop()
        self._protocol = _ssl_protocol_class(self.loop)

    def __call__(self) -> asyncio.BaseProtocol:
        app = self.app_factory()
        waiter = self.loop.create_future()
        waiter.add_done_callback(lambda done: self._handshake_done(app, done))
        return self._protocol(
            self.loop,
            app,
            self.store.context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=self.handshake_timeout,
        )

    def _handshake_done(self, app: Any, done: asyncio.Future[None]) -> None:
        exc = None if done.cancelled() else done.exception()
        # Success: the app's connection_made ran just before (its connection_lost, if any,
        # can only run later). No error and no transport: the connection ended mid-handshake.
        if exc is None and app.transport is not None:
            self.counts.tls_handshakes += 1
            return
        # A handshake that ended with the connection (no error) never reached the app.
        self.counts.tls_failures[failure_reason(exc)] += 1
