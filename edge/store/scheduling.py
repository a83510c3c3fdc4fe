"""The scheduler's reads and writes: a consistent snapshot in, a plan applied atomically.

:func:`load_snapshot` reads what :func:`scheduler.reconciler.plan` needs in one
repeatable-read transaction, every age computed on the database's clock (the one the
heartbeats and timestamps were written with, the same for every edge).

:func:`apply_plan` writes a plan in one transaction. First it checks that the caller still
holds the leader lock (fencing: an edge that lost the lock without noticing yet cannot write);
then every action is guarded by what the plan saw -- the status a deployment must still be in,
the environment's current deployment, a node still silent or still ready -- and a guard that
fails raises :class:`~edge.store.errors.Conflict`, which rolls the whole plan back. An instance
that changed meanwhile is simply not stopped (its agent reported first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from uuid import UUID

from edge.store import deployments
from edge.store.errors import Conflict, translated
from scheduler import lifecycle
from scheduler.reconciler import (
    FAILURE_MEMORY,
    HOLDING,
    LIVE_INSTANCE,
    Action,
    DeploymentInfo,
    EnvironmentInfo,
    InstanceInfo,
    MarkNodeDown,
    MarkNodeDrained,
    NodeInfo,
    PlaceInstance,
    SetCurrent,
    Settings,
    Snapshot,
    StopInstance,
    Transition,
)

_LIVE = sorted(lifecycle.LIVE)

_NODES = (
    "SELECT id, hostname, region, state, vcpu, memory_mb,"
    " extract(epoch FROM now() - coalesce(last_heartbeat, created_at))::float8 AS silent_for"
    " FROM nodes"
)
_DEPLOYMENTS = (
    "SELECT d.id, d.environment_id, p.name || '-' || d.nanoid || '-' || p.org AS name,"
    " d.status, d.instances_per_region, p.vcpu, p.memory_mb,"
    " coalesce(d.placing_at, d.created_at) AS requested_at, d.created_at,"
    " extract(epoch FROM now() - d.placing_at)::float8 AS placing_for,"
    " extract(epoch FROM now() - d.draining_at)::float8 AS draining_for, d.regions"
    " FROM deployments d JOIN projects p ON p.id = d.project_id"
    " WHERE d.status = ANY($1::text[])"
)
_INSTANCES = (
    "SELECT i.id, i.deployment_id, i.node_id, i.region, i.state, i.healthy,"
    " (i.address IS NOT NULL AND i.port IS NOT NULL) AS addressed, i.message,"
    " extract(epoch FROM now() - i.updated_at)::float8 AS since, p.vcpu, p.memory_mb"
    " FROM instances i JOIN deployments d ON d.id = i.deployment_id"
    " JOIN projects p ON p.id = d.project_id"
    " WHERE i.state = ANY($1::text[]) OR (i.state = 'failed' AND d.status = ANY($2::text[])"
    " AND i.updated_at > now() - make_interval(secs => $3))"
    " ORDER BY i.created_at, i.id"
)
_ENVIRONMENTS = (
    "SELECT id, current_deployment_id AS current, previous_deployment_id AS previous"
    " FROM environments WHERE id IN"
    " (SELECT environment_id FROM deployments WHERE status = ANY($1::text[]))"
)


async def load_snapshot(conn: Any) -> Snapshot:
    """The platform as the scheduler sees it (``conn``: a connection, not in a transaction)."""
    with translated():
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            nodes = await conn.fetch(_NODES)
            found = await conn.fetch(_DEPLOYMENTS, _LIVE)
            instances = await conn.fetch(_INSTANCES, sorted(HOLDING), _LIVE, FAILURE_MEMORY)
            environments = await conn.fetch(_ENVIRONMENTS, _LIVE)
    return Snapshot(
        nodes=tuple(NodeInfo(**row) for row in nodes),
        deployments=tuple(
            DeploymentInfo(**{**row, "regions": tuple(row["regions"] or ()) or None})
            for row in found
        ),
        instances=tuple(InstanceInfo(**row) for row in instances),
        environments=tuple(EnvironmentInfo(**row) for row in environments),
    )


async def holds_lock(conn: Any, key: int, pid: int) -> bool:
    """Whether the session ``pid`` holds the advisory lock ``key`` (one bigint)."""
    # pg_locks shows a bigint key as classid (high half) and objid (low half), objsubid 1.
    high, low = (key >> 32) & 0xFFFF_FFFF, key & 0xFFFF_FFFF
    with translated():
        return bool(
            await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                " AND classid = $1::bigint::oid AND objid = $2::bigint::oid AND objsubid = 1"
                " AND pid = $3 AND granted)",
                high,
                low,
                pid,
            )
        )


async def apply_plan(
    conn: Any,
    actions: Sequence[Action],
    settings: Settings,
    *,
    fence: tuple[int, int] | None = None,
) -> None:
    """Write ``actions`` in one transaction on ``conn``; :class:`Conflict` (nothing written)
    when a guard finds the state changed. ``fence``: (lock key, session pid) that must still
    hold the leader lock."""
    with translated():
        async with conn.transaction():
            if fence is not None and not await holds_lock(conn, *fence):
                raise Conflict("this edge no longer holds the leader lock", field="leader")
            stops: list[StopInstance] = []
            places: list[PlaceInstance] = []
            for action in actions:
                if isinstance(action, StopInstance):
                    stops.append(action)
                elif isinstance(action, PlaceInstance):
                    places.append(action)
                else:
                    await _apply(conn, action, settings)
            await _stop(conn, stops)
            await _place(conn, places)


async def _apply(conn: Any, action: Action, settings: Settings) -> None:
    if isinstance(action, Transition):
        await deployments.transition(
            conn,
            action.deployment_id,
            action.source,
            action.target,
            reason=action.reason if action.target == "failed" else None,
            regions=action.regions,
        )
    elif isinstance(action, SetCurrent):
        changed = await conn.fetchval(
            "UPDATE environments SET previous_deployment_id = current_deployment_id,"
            " current_deployment_id = $2"
            " WHERE id = $1 AND current_deployment_id IS NOT DISTINCT FROM $3 RETURNING id",
            action.environment_id,
            action.deployment_id,
            action.expected,
        )
        if changed is None:
            raise Conflict(
                f"environment {action.environment_id} no longer routes to {action.expected}",
                field="current_deployment_id",
            )
    elif isinstance(action, MarkNodeDown):
        changed = await conn.fetchval(
            "UPDATE nodes SET state = 'down' WHERE id = $1 AND state IN ('ready', 'draining')"
            " AND coalesce(last_heartbeat, created_at) < now() - make_interval(secs => $2)"
            " RETURNING id",
            action.node_id,
            settings.heartbeat_timeout,
        )
        if changed is None:
            raise Conflict(f"node {action.hostname} is back or changed", field="node")
    elif isinstance(action, MarkNodeDrained):
        changed = await conn.fetchval(
            "UPDATE nodes SET state = 'drained' WHERE id = $1 AND state = 'draining'"
            " AND NOT EXISTS (SELECT 1 FROM instances WHERE node_id = $1"
            " AND state = ANY($2::text[])) RETURNING id",
            action.node_id,
            sorted(HOLDING),
        )
        if changed is None:
            raise Conflict(f"node {action.hostname} has instances again", field="node")
    else:  # pragma: no cover - every kind is handled above or batched
        raise TypeError(f"unknown action {action!r}")


async def _stop(conn: Any, stops: Sequence[StopInstance]) -> None:
    if not stops:
        return
    # Only from a state it may leave so: an instance its agent reported stopped or failed
    # meanwhile keeps that report.
    await conn.execute(
        "UPDATE instances i SET state = CASE WHEN s.at_once THEN 'stopped' ELSE 'stopping' END,"
        " healthy = false, message = s.message, updated_at = now()"
        " FROM unnest($1::uuid[], $2::text[], $3::bool[]) AS s (id, message, at_once)"
        " WHERE i.id = s.id AND (i.state = ANY($4::text[])"
        " OR (s.at_once AND i.state = 'stopping'))",
        [s.instance_id for s in stops],
        [s.message for s in stops],
        [s.at_once for s in stops],
        sorted(LIVE_INSTANCE),
    )


async def _place(conn: Any, places: Sequence[PlaceInstance]) -> None:
    if not places:
        return
    # Only on a node that is still ready: a node drained or removed meanwhile aborts the plan.
    inserted = await conn.fetchval(
        "WITH added AS (INSERT INTO instances (deployment_id, node_id, region)"
        " SELECT p.deployment_id, p.node_id, p.region"
        " FROM unnest($1::uuid[], $2::uuid[], $3::text[]) AS p (deployment_id, node_id, region)"
        " JOIN nodes n ON n.id = p.node_id AND n.state = 'ready' RETURNING 1)"
        " SELECT count(*) FROM added",
        [p.deployment_id for p in places],
        [p.node_id for p in places],
        [p.region for p in places],
    )
    if inserted != len(places):
        raise Conflict(
            f"{len(places) - inserted} of {len(places)} placements found their node no longer"
            " ready",
            field="node",
        )


def ids(actions: Sequence[Action]) -> list[UUID]:
    """The deployments ``actions`` touch, each once, in order (for logs)."""
    seen: dict[UUID, None] = {}
    for action in actions:
        deployment = getattr(action, "deployment_id", None)
        if deployment is not None:
            seen[deployment] = None
    return list(seen)
