"""ACME state: HTTP-01 challenges, the account at each CA, and every domain's orders.

Challenges are stored in the database because any edge may receive the CA's validation
request, not only the leader that asked for the certificate; expired challenges are never
served. The account's key is stored encrypted by the caller (:mod:`edge.secrets`). A
domain's order row counts failed orders in a row and holds the end of their backoff, so a
new leader carries on where the old one stopped; the certificates themselves are in
:mod:`edge.store.certificates`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from uuid import UUID

from edge.store.query import Executor, execute, fetch_all, fetch_one

# ---------------------------------------------------------------------------------------
# HTTP-01 challenges


@dataclass(frozen=True, slots=True)
class Challenge:
    token: str
    key_authorization: str
    domain: str
    expires_at: datetime


async def put(
    db: Executor, token: str, *, key_authorization: str, domain: str, expires_at: datetime
) -> Challenge:
    challenge = await fetch_one(
        db,
        Challenge,
        "INSERT INTO acme_challenges (token, key_authorization, domain, expires_at)"
        " VALUES ($1, $2, $3, $4) ON CONFLICT (token) DO UPDATE SET"
        " key_authorization = excluded.key_authorization, domain = excluded.domain,"
        " expires_at = excluded.expires_at RETURNING *",
        token,
        key_authorization,
        domain.lower(),
        expires_at,
    )
    assert challenge is not None
    return challenge


async def get(db: Executor, token: str) -> Challenge | None:
    """The live challenge for ``token``, or None (unknown or expired)."""
    return await fetch_one(
        db,
        Challenge,
        "SELECT * FROM acme_challenges WHERE token = $1 AND expires_at > now()",
        token,
    )


async def delete(db: Executor, token: str) -> None:
    await execute(db, "DELETE FROM acme_challenges WHERE token = $1", token)


async def delete_expired(db: Executor) -> int:
    return await execute(db, "DELETE FROM acme_challenges WHERE expires_at <= now()")


# ---------------------------------------------------------------------------------------
# Accounts


@dataclass(frozen=True, slots=True)
class Account:
    directory_url: str
    key_encrypted: bytes = field(repr=False)
    uri: str | None
    contact: str | None
    created_at: datetime
    updated_at: datetime


async def get_account(db: Executor, directory_url: str) -> Account | None:
    return await fetch_one(
        db, Account, "SELECT * FROM acme_accounts WHERE directory_url = $1", directory_url
    )


async def add_account(db: Executor, directory_url: str, *, key_encrypted: bytes) -> Account:
    """The directory's account: a new row with this key, or the one already there (another
    leader's, which wins)."""
    account = await fetch_one(
        db,
        Account,
        "INSERT INTO acme_accounts (directory_url, key_encrypted) VALUES ($1, $2)"
        " ON CONFLICT (directory_url) DO NOTHING RETURNING *",
        directory_url,
        key_encrypted,
    )
    if account is None:
        account = await get_account(db, directory_url)
    assert account is not None
    return account


async def set_registration(
    db: Executor, directory_url: str, *, uri: str | None, contact: str | None
) -> None:
    """Record the account's URI at the CA (its ``kid``) and the contact registered (None:
    the key is to be registered again)."""
    await execute(
        db,
        "UPDATE acme_accounts SET uri = $2, contact = $3, updated_at = now()"
        " WHERE directory_url = $1",
        directory_url,
        uri,
        contact,
    )


# ---------------------------------------------------------------------------------------
# Orders


@dataclass(frozen=True, slots=True)
class CertificateOrder:
    domain_id: UUID
    last_attempt_at: datetime | None
    order_url: str | None
    failures: int
    last_error: str | None
    next_attempt_at: datetime | None
    issued_at: datetime | None


@dataclass(frozen=True, slots=True)
class Due:
    """A verified domain whose certificate is to be ordered now."""

    domain_id: UUID
    name: str
    # The certificate it has (to be renewed), if any.
    not_after: datetime | None
    failures: int


async def due(db: Executor, *, renew_fraction: float, limit: int = 100) -> list[Due]:
    """Verified domains without a certificate, or whose certificate has less than
    ``renew_fraction`` of its lifetime left, and whose backoff is over; the ones without a
    certificate first, then by expiry."""
    return await fetch_all(
        db,
        Due,
        "SELECT d.id AS domain_id, d.name, c.not_after, coalesce(o.failures, 0) AS failures"
        " FROM domains d"
        " LEFT JOIN certificates c ON c.domain = d.name"
        " LEFT JOIN certificate_orders o ON o.domain_id = d.id"
        " WHERE d.verified_at IS NOT NULL"
        " AND (o.failures IS NULL OR o.failures = 0 OR o.next_attempt_at <= now())"
        " AND (c.id IS NULL OR c.not_after - now() < (c.not_after - c.not_before) * $1)"
        " ORDER BY c.not_after NULLS FIRST, d.name LIMIT $2",
        renew_fraction,
        limit,
    )


async def get_order(db: Executor, domain_id: UUID) -> CertificateOrder | None:
    return await fetch_one(
        db, CertificateOrder, "SELECT * FROM certificate_orders WHERE domain_id = $1", domain_id
    )


async def record_attempt(db: Executor, domain_id: UUID) -> CertificateOrder | None:
    """An order for the domain starts now (None: the domain was removed meanwhile)."""
    return await fetch_one(
        db,
        CertificateOrder,
        "INSERT INTO certificate_orders (domain_id, last_attempt_at)"
        " SELECT id, now() FROM domains WHERE id = $1"
        " ON CONFLICT (domain_id) DO UPDATE SET last_attempt_at = excluded.last_attempt_at,"
        " order_url = NULL RETURNING *",
        domain_id,
    )


async def record_order_url(db: Executor, domain_id: UUID, order_url: str | None) -> None:
    await execute(
        db,
        "UPDATE certificate_orders SET order_url = $2 WHERE domain_id = $1",
        domain_id,
        order_url,
    )


async def record_success(
    db: Executor, domain_id: UUID, *, renew_at: datetime
) -> CertificateOrder | None:
    """The order succeeded: failures reset, the next attempt is the renewal at ``renew_at``."""
    return await fetch_one(
        db,
        CertificateOrder,
        "UPDATE certificate_orders SET failures = 0, last_error = NULL, next_attempt_at = $2,"
        " issued_at = now() WHERE domain_id = $1 RETURNING *",
        domain_id,
        renew_at,
    )


async def record_failure(
    db: Executor, domain_id: UUID, error: str, *, backoff: float, max_backoff: float
) -> CertificateOrder | None:
    """The order failed with ``error``: one more failure in a row, and the next attempt
    after ``backoff`` seconds doubled for each earlier failure in the row, at most
    ``max_backoff``."""
    return await fetch_one(
        db,
        CertificateOrder,
        "UPDATE certificate_orders SET failures = failures + 1, last_error = $2,"
        " next_attempt_at = now() + make_interval(secs => least($4::float8,"
        " $3::float8 * power(2::float8, least(failures, 60))))"
        " WHERE domain_id = $1 RETURNING *",
        domain_id,
        error,
        backoff,
        max_backoff,
    )


# The certificate status of a domain row ``d`` with its certificate ``c`` and order ``o``
# (left joined): issued while a certificate is valid (a failing renewal shows in the
# order's failures and error), failed after a failed order, pending while a verified
# domain waits for its first one, none for a domain not verified.
STATUS_SQL = (
    "CASE WHEN c.not_after > now() THEN 'issued'"
    " WHEN coalesce(o.failures, 0) > 0 THEN 'failed'"
    " WHEN d.verified_at IS NOT NULL THEN 'pending'"
    " ELSE 'none' END"
)


@dataclass(frozen=True, slots=True)
class Overview:
    """Verified domains by certificate status, and the soonest expiry among them."""

    issued: int
    pending: int
    failed: int
    soonest_expiry: datetime | None


async def overview(db: Executor) -> Overview:
    rows = await fetch_all(
        db,
        _StatusCount,
        f"SELECT {STATUS_SQL} AS status, count(*) AS count, min(c.not_after) AS soonest"  # noqa: S608
        " FROM domains d"
        " LEFT JOIN certificates c ON c.domain = d.name"
        " LEFT JOIN certificate_orders o ON o.domain_id = d.id"
        " WHERE d.verified_at IS NOT NULL GROUP BY 1",
    )
    counts = {row.status: row.count for row in rows}
    soonest = [row.soonest for row in rows if row.soonest is not None]
    return Overview(
        issued=counts.get("issued", 0),
        pending=counts.get("pending", 0),
        failed=counts.get("failed", 0),
        soonest_expiry=min(soonest) if soonest else None,
    )


@dataclass(frozen=True, slots=True)
class _StatusCount:
    status: str
    count: int
    soonest: datetime | None
