"""Instance log lines (stdout and stderr), read back per deployment in arrival order.

Limits: a plain table; retention is :func:`prune`'s caller's job. Lines are paged by their
increasing id, so a follower polls with ``after`` = the last id it saw.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal
from uuid import UUID

from edge.store.query import Executor, execute, execute_many, fetch_all

Stream = Literal["stdout", "stderr"]


@dataclass(frozen=True, slots=True)
class LogLine:
    id: int
    instance_id: UUID
    deployment_id: UUID
    stream: Stream
    line: str
    logged_at: datetime


async def append(
    db: Executor, instance_id: UUID, deployment_id: UUID, lines: Iterable[tuple[Stream, str]]
) -> None:
    await execute_many(
        db,
        "INSERT INTO instance_logs (instance_id, deployment_id, stream, line)"
        " VALUES ($1, $2, $3, $4)",
        [(instance_id, deployment_id, stream, line) for stream, line in lines],
    )


async def read(
    db: Executor, deployment_id: UUID, *, after: int = 0, limit: int = 1000
) -> list[LogLine]:
    """The deployment's lines with an id above ``after``, oldest first."""
    return await fetch_all(
        db,
        LogLine,
        "SELECT * FROM instance_logs WHERE deployment_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        deployment_id,
        after,
        limit,
    )


async def prune(db: Executor, before: datetime) -> int:
    """Delete the lines logged before ``before``; how many."""
    return await execute(db, "DELETE FROM instance_logs WHERE logged_at < $1", before)
