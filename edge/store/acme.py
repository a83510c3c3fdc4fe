"""ACME HTTP-01 challenges: the key authorization the edge answers for a token.

Stored in the database because any edge may receive the CA's validation request, not only
the leader that asked for the certificate. Expired challenges are never served.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from edge.store.query import Executor, execute, fetch_one


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
