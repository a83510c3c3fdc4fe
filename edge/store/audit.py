"""The audit log: who did what to which target, append-only."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from edge.store.query import Executor, fetch_all, fetch_one


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    target: str | None
    details: dict[str, Any]


async def record(
    db: Executor,
    actor: str,
    action: str,
    target: str | None = None,
    details: dict[str, Any] | None = None,
) -> AuditEntry:
    entry = await fetch_one(
        db,
        AuditEntry,
        "INSERT INTO audit_log (actor, action, target, details) VALUES ($1, $2, $3, $4)"
        " RETURNING *",
        actor,
        action,
        target,
        details or {},
    )
    assert entry is not None
    return entry


async def recent(
    db: Executor, *, limit: int = 100, actor: str | None = None, target: str | None = None
) -> list[AuditEntry]:
    """Newest first, optionally of one actor or one target."""
    return await fetch_all(
        db,
        AuditEntry,
        "SELECT * FROM audit_log WHERE ($2::text IS NULL OR actor = $2)"
        " AND ($3::text IS NULL OR target = $3) ORDER BY id DESC LIMIT $1",
        limit,
        actor,
        target,
    )
