"""Worker nodes: their region, address, capacity, state and last heartbeat.

The node token is stored as a hash only (``token_hash``); checking it is the admin API's job.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, get_args
from uuid import UUID

from edge.store.errors import Invalid, NotFound, translated
from edge.store.query import Executor, execute, fetch_all, fetch_one

NodeState = Literal["ready", "draining", "drained", "down"]
NODE_STATES: frozenset[str] = frozenset(get_args(NodeState))


@dataclass(frozen=True, slots=True)
class Node:
    id: UUID
    region: str
    hostname: str
    address: str
    vcpu: int
    memory_mb: int
    state: NodeState
    token_hash: str | None = field(repr=False)
    last_heartbeat: datetime | None
    created_at: datetime


async def create(
    db: Executor,
    *,
    region: str,
    hostname: str,
    address: str,
    vcpu: int,
    memory_mb: int,
    token_hash: str | None = None,
) -> Node:
    """Register a node (state ``ready``); :class:`Conflict` if the hostname is taken."""
    node = await fetch_one(
        db,
        Node,
        "INSERT INTO nodes (region, hostname, address, vcpu, memory_mb, token_hash)"
        " VALUES ($1, $2, $3, $4, $5, $6) RETURNING *",
        region,
        hostname,
        address,
        vcpu,
        memory_mb,
        token_hash,
    )
    assert node is not None
    return node


async def get(db: Executor, node_id: UUID) -> Node:
    node = await fetch_one(db, Node, "SELECT * FROM nodes WHERE id = $1", node_id)
    if node is None:
        raise NotFound(f"node {node_id} does not exist", field="id")
    return node


async def get_by_hostname(db: Executor, hostname: str) -> Node:
    node = await fetch_one(db, Node, "SELECT * FROM nodes WHERE hostname = $1", hostname)
    if node is None:
        raise NotFound(f"node {hostname!r} does not exist", field="hostname")
    return node


async def list_all(
    db: Executor, *, region: str | None = None, state: NodeState | None = None
) -> list[Node]:
    return await fetch_all(
        db,
        Node,
        "SELECT * FROM nodes WHERE ($1::text IS NULL OR region = $1)"
        " AND ($2::text IS NULL OR state = $2) ORDER BY region, hostname",
        region,
        state,
    )


async def set_state(db: Executor, node_id: UUID, state: NodeState) -> Node:
    if state not in NODE_STATES:
        raise Invalid(f"node state {state!r} is not one of {sorted(NODE_STATES)}", field="state")
    node = await fetch_one(
        db, Node, "UPDATE nodes SET state = $2 WHERE id = $1 RETURNING *", node_id, state
    )
    if node is None:
        raise NotFound(f"node {node_id} does not exist", field="id")
    return node


async def heartbeat(db: Executor, node_id: UUID) -> Node:
    """Record a heartbeat now (the database's clock, the same for every edge)."""
    node = await fetch_one(
        db, Node, "UPDATE nodes SET last_heartbeat = now() WHERE id = $1 RETURNING *", node_id
    )
    if node is None:
        raise NotFound(f"node {node_id} does not exist", field="id")
    return node


async def mark_silent_down(db: Executor, timeout_seconds: float) -> list[Node]:
    """Mark ``down`` the ready or draining nodes silent for longer than the timeout."""
    return await fetch_all(
        db,
        Node,
        "UPDATE nodes SET state = 'down' WHERE state IN ('ready', 'draining')"
        " AND coalesce(last_heartbeat, created_at) < now() - make_interval(secs => $1)"
        " RETURNING *",
        timeout_seconds,
    )


async def delete(db: Executor, node_id: UUID) -> None:
    if not await execute(db, "DELETE FROM nodes WHERE id = $1", node_id):
        raise NotFound(f"node {node_id} does not exist", field="id")


@dataclass(frozen=True, slots=True)
class NodeUsage:
    """A node with what its live instances (not stopped or failed) take of it."""

    node: Node
    instances: int
    used_vcpu: Decimal
    used_memory_mb: int


_USAGE = (
    "SELECT n.*, count(i.id) AS instance_count,"
    " coalesce(sum(p.vcpu), 0) AS used_vcpu, coalesce(sum(p.memory_mb), 0) AS used_memory_mb"
    " FROM nodes n"
    " LEFT JOIN instances i ON i.node_id = n.id AND i.state NOT IN ('stopped', 'failed')"
    " LEFT JOIN deployments d ON d.id = i.deployment_id"
    " LEFT JOIN projects p ON p.id = d.project_id"
)


def _usage(row: Mapping[str, Any]) -> NodeUsage:
    values = dict(row)
    count = values.pop("instance_count")
    vcpu = values.pop("used_vcpu")
    memory = values.pop("used_memory_mb")
    return NodeUsage(Node(**values), int(count), Decimal(vcpu), int(memory))


async def list_usage(
    db: Executor,
    *,
    region: str | None = None,
    state: NodeState | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[NodeUsage], int]:
    """One page of nodes (by region, hostname) with their usage, and how many match."""
    where = " WHERE ($1::text IS NULL OR n.region = $1) AND ($2::text IS NULL OR n.state = $2)"
    with translated():
        rows = await db.fetch(
            _USAGE + where + " GROUP BY n.id ORDER BY n.region, n.hostname LIMIT $3 OFFSET $4",
            region,
            state,
            limit,
            offset,
        )
        # where is a constant of this function; values are parameters.
        total = await db.fetchval(f"SELECT count(*) FROM nodes n{where}", region, state)  # noqa: S608
    return [_usage(row) for row in rows], int(total)


async def get_usage(db: Executor, node_id: UUID) -> NodeUsage:
    with translated():
        row = await db.fetchrow(_USAGE + " WHERE n.id = $1 GROUP BY n.id", node_id)
    if row is None:
        raise NotFound(f"node {node_id} does not exist", field="id")
    return _usage(row)


async def check_in(
    db: Executor, node_id: UUID, *, vcpu: int | None = None, memory_mb: int | None = None
) -> Node:
    """A heartbeat of the node's agent, at the database's clock: the capacity it reports
    (when given) replaces the recorded one, and a node marked ``down`` is ``ready`` again (a
    draining or drained node stays so: that was an operator's decision)."""
    node = await fetch_one(
        db,
        Node,
        "UPDATE nodes SET last_heartbeat = now(), vcpu = coalesce($2, vcpu),"
        " memory_mb = coalesce($3, memory_mb),"
        " state = CASE WHEN state = 'down' THEN 'ready' ELSE state END"
        " WHERE id = $1 RETURNING *",
        node_id,
        vcpu,
        memory_mb,
    )
    if node is None:
        raise NotFound(f"node {node_id} does not exist", field="id")
    return node


async def set_token_hash(db: Executor, node_id: UUID, token_hash: str) -> None:
    if not await execute(db, "UPDATE nodes SET token_hash = $2 WHERE id = $1", node_id, token_hash):
        raise NotFound(f"node {node_id} does not exist", field="id")


async def delete_idle(db: Executor, node_id: UUID) -> bool:
    """Delete the node unless it has live instances (not stopped or failed), in one
    statement, so an instance placed meanwhile is never orphaned; whether it was deleted."""
    return bool(
        await execute(
            db,
            "DELETE FROM nodes WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM instances"
            " WHERE node_id = $1 AND state NOT IN ('stopped', 'failed'))",
            node_id,
        )
    )
