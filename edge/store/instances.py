"""Instances: one running copy of a deployment on a node -- its state, address and health.

The routing table serves the ``running`` and healthy ones; the agent reports the rest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal, get_args
from uuid import UUID

from edge.store.errors import Invalid, NotFound, translated
from edge.store.query import Executor, execute, fetch_all, fetch_one

InstanceState = Literal["pending", "starting", "running", "stopping", "stopped", "failed"]
INSTANCE_STATES: frozenset[str] = frozenset(get_args(InstanceState))


@dataclass(frozen=True, slots=True)
class Instance:
    id: UUID
    deployment_id: UUID
    node_id: UUID | None
    region: str
    state: InstanceState
    address: str | None
    port: int | None
    healthy: bool
    boot_time_ms: int | None
    last_health_at: datetime | None
    created_at: datetime
    updated_at: datetime
    # The agent's word on a failure, an exit or a failed health check.
    message: str | None


async def create(
    db: Executor, *, deployment_id: UUID, region: str, node_id: UUID | None = None
) -> Instance:
    """A ``pending`` instance, placed on ``node_id``."""
    instance = await fetch_one(
        db,
        Instance,
        "INSERT INTO instances (deployment_id, node_id, region) VALUES ($1, $2, $3) RETURNING *",
        deployment_id,
        node_id,
        region,
    )
    assert instance is not None
    return instance


async def get(db: Executor, instance_id: UUID) -> Instance:
    instance = await fetch_one(db, Instance, "SELECT * FROM instances WHERE id = $1", instance_id)
    if instance is None:
        raise NotFound(f"instance {instance_id} does not exist", field="id")
    return instance


async def list_for_deployment(db: Executor, deployment_id: UUID) -> list[Instance]:
    return await fetch_all(
        db,
        Instance,
        "SELECT * FROM instances WHERE deployment_id = $1 ORDER BY region, created_at, id",
        deployment_id,
    )


async def list_for_node(db: Executor, node_id: UUID) -> list[Instance]:
    """The node's instances that are not stopped or failed (what its agent must run)."""
    return await fetch_all(
        db,
        Instance,
        "SELECT * FROM instances WHERE node_id = $1 AND state NOT IN ('stopped', 'failed')"
        " ORDER BY created_at, id",
        node_id,
    )


async def report(
    db: Executor,
    instance_id: UUID,
    state: InstanceState,
    *,
    address: str | None = None,
    port: int | None = None,
    boot_time_ms: int | None = None,
    message: str | None = None,
) -> Instance:
    """Record what the agent reports; address, port and boot time stay unless given, the
    message is replaced. An instance that leaves ``running`` is no longer healthy."""
    if state not in INSTANCE_STATES:
        raise Invalid(
            f"instance state {state!r} is not one of {sorted(INSTANCE_STATES)}", field="state"
        )
    instance = await fetch_one(
        db,
        Instance,
        "UPDATE instances SET state = $2, address = coalesce($3, address),"
        " port = coalesce($4, port), boot_time_ms = coalesce($5, boot_time_ms),"
        " healthy = healthy AND $2 = 'running', message = $6, updated_at = now()"
        " WHERE id = $1 RETURNING *",
        instance_id,
        state,
        address,
        port,
        boot_time_ms,
        message,
    )
    if instance is None:
        raise NotFound(f"instance {instance_id} does not exist", field="id")
    return instance


async def set_health(db: Executor, instance_id: UUID, healthy: bool) -> Instance:
    # Only a change is written: the trigger wakes every edge on each statement that touches
    # instances, and health checks repeat every few seconds.
    instance = await fetch_one(
        db,
        Instance,
        "UPDATE instances SET healthy = $2, last_health_at = now(), updated_at = now()"
        " WHERE id = $1 AND healthy IS DISTINCT FROM $2 RETURNING *",
        instance_id,
        healthy,
    )
    return instance if instance is not None else await get(db, instance_id)


async def delete(db: Executor, instance_id: UUID) -> None:
    if not await execute(db, "DELETE FROM instances WHERE id = $1", instance_id):
        raise NotFound(f"instance {instance_id} does not exist", field="id")


# -- what the agents see ------------------------------------------------------------------

# The instances a node's agent must know of: those it must run (not stopped or failed, of a
# deployment that is not over) and those the platform is stopping, whatever their deployment.
_ASSIGNED = (
    " FROM instances i JOIN deployments d ON d.id = i.deployment_id"
    " JOIN projects p ON p.id = d.project_id"
    " WHERE i.node_id = $1 AND (i.state = 'stopping' OR (i.state NOT IN ('stopped', 'failed')"
    " AND d.status NOT IN ('inactive', 'failed')))"
)
# Constants joined at import; the values are parameters.
_ASSIGNMENTS = (
    "SELECT i.id AS instance_id, i.deployment_id, i.state, p.org, p.name AS project,"
    " d.nanoid, d.image, d.command, d.env, p.app_port, p.health_check_path, p.vcpu,"
    " p.memory_mb" + _ASSIGNED + " ORDER BY i.created_at, i.id"
)
_UNASSIGNED = (
    "SELECT r.id FROM unnest($2::uuid[]) WITH ORDINALITY AS r (id, n)"  # noqa: S608
    " WHERE NOT EXISTS (SELECT 1" + _ASSIGNED + " AND i.id = r.id) ORDER BY r.n"
)


@dataclass(frozen=True, slots=True)
class Assignment:
    """An instance its node must run (or stop, when ``state`` is ``stopping``), with what
    the agent needs to run it."""

    instance_id: UUID
    deployment_id: UUID
    state: InstanceState
    org: str
    project: str
    nanoid: str
    image: str | None
    command: str | None
    env: dict[str, Any]
    app_port: int
    health_check_path: str
    vcpu: Decimal
    memory_mb: int

    @property
    def deployment_name(self) -> str:
        return f"{self.project}-{self.nanoid}-{self.org}"


async def list_assignments(db: Executor, node_id: UUID) -> list[Assignment]:
    """The node's assignments, oldest instance first."""
    return await fetch_all(db, Assignment, _ASSIGNMENTS, node_id)


async def unassigned(db: Executor, node_id: UUID, instance_ids: Sequence[UUID]) -> list[UUID]:
    """Those of ``instance_ids`` that are not among the node's assignments, in their order."""
    with translated():
        rows = await db.fetch(_UNASSIGNED, node_id, list(instance_ids))
    return [row["id"] for row in rows]


async def lock_on_node(
    db: Executor, node_id: UUID, instance_ids: Sequence[UUID]
) -> dict[UUID, Instance]:
    """Those of ``instance_ids`` that are on the node, locked for update until the end of
    the transaction (``db`` must be a connection in one)."""
    # Locked in id order: two batches over the same instances cannot deadlock.
    found = await fetch_all(
        db,
        Instance,
        "SELECT * FROM instances WHERE node_id = $1 AND id = ANY($2::uuid[])"
        " ORDER BY id FOR UPDATE",
        node_id,
        list(instance_ids),
    )
    return {instance.id: instance for instance in found}
