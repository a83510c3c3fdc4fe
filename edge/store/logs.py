"""Instance log lines (stdout and stderr), read back per deployment in arrival order.

Limits: a plain table; retention is :func:`prune`'s caller's job. Lines are paged by their
increasing id, so a follower polls with ``after`` = the last id it saw. :func:`append_for_node`
takes the lines an agent sends, keeping only those of its own node's instances.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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


async def append_for_node(
    db: Executor,
    node_id: UUID,
    lines: Sequence[tuple[UUID, Stream, str, datetime | None]],
) -> int:
    """Store ``(instance id, stream, line, logged at or None for now)`` in their order, those
    of instances on ``node_id`` only; how many were stored."""
    if not lines:
        return 0
    instance_ids, streams, texts, times = zip(*lines, strict=True)
    # One statement for the whole batch; the join drops the lines of other nodes' instances
    # and ORDINALITY keeps the agent's order in the ids.
    return await execute(
        db,
        "INSERT INTO instance_logs (instance_id, deployment_id, stream, line, logged_at)"
        " SELECT i.id, i.deployment_id, l.stream, l.line, coalesce(l.at, now())"
        " FROM unnest($2::uuid[], $3::text[], $4::text[], $5::timestamptz[])"
        " WITH ORDINALITY AS l (instance_id, stream, line, at, n)"
        " JOIN instances i ON i.id = l.instance_id AND i.node_id = $1"
        " ORDER BY l.n",
        node_id,
        list(instance_ids),
        list(streams),
        list(texts),
        list(times),
    )
