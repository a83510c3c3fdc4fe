"""TLS certificates per domain: the PEM chain and the private key, encrypted by the caller.

One certificate per domain; storing a renewed one replaces it. The ACME loop
(:mod:`edge.acme`) stores them with the key encrypted by :func:`edge.secrets.encrypt`;
removing a domain removes its certificate (:func:`edge.store.domains.delete`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from edge.store.errors import NotFound
from edge.store.query import Executor, execute, fetch_all, fetch_one


@dataclass(frozen=True, slots=True)
class Certificate:
    id: UUID
    domain: str
    cert_pem: str = field(repr=False)
    key_encrypted: bytes = field(repr=False)
    not_before: datetime
    not_after: datetime
    issuer: str | None
    created_at: datetime


async def store(
    db: Executor,
    domain: str,
    *,
    cert_pem: str,
    key_encrypted: bytes,
    not_before: datetime,
    not_after: datetime,
    issuer: str | None = None,
) -> Certificate:
    """Insert or replace the domain's certificate."""
    cert = await fetch_one(
        db,
        Certificate,
        "INSERT INTO certificates (domain, cert_pem, key_encrypted, not_before, not_after, issuer)"
        " VALUES ($1, $2, $3, $4, $5, $6)"
        " ON CONFLICT (domain) DO UPDATE SET cert_pem = excluded.cert_pem,"
        " key_encrypted = excluded.key_encrypted, not_before = excluded.not_before,"
        " not_after = excluded.not_after, issuer = excluded.issuer, created_at = now()"
        " RETURNING *",
        domain.lower(),
        cert_pem,
        key_encrypted,
        not_before,
        not_after,
        issuer,
    )
    assert cert is not None
    return cert


async def get(db: Executor, domain: str) -> Certificate:
    cert = await fetch_one(
        db, Certificate, "SELECT * FROM certificates WHERE domain = $1", domain.lower()
    )
    if cert is None:
        raise NotFound(f"no certificate for {domain!r}", field="domain")
    return cert


async def list_expiring(db: Executor, before: datetime) -> list[Certificate]:
    """Certificates that expire before ``before`` (renewal candidates), soonest first."""
    return await fetch_all(
        db,
        Certificate,
        "SELECT * FROM certificates WHERE not_after < $1 ORDER BY not_after",
        before,
    )


async def delete(db: Executor, domain: str) -> None:
    if not await execute(db, "DELETE FROM certificates WHERE domain = $1", domain.lower()):
        raise NotFound(f"no certificate for {domain!r}", field="domain")
