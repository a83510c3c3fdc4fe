"""Environments of a project (``production``, ``staging``) and their current deployment.

The current deployment is what the environment's custom domains route to. Flipping it
keeps the one before as ``previous`` (the rollback target) in the same statement; a rollback
swaps the two back, also in one statement. The read models at the end (summaries, deployment
hosts, instance counts) are what the admin API shows of a project's environments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from edge.store.errors import Conflict, Invalid, NotFound, translated
from edge.store.query import Executor, execute, fetch_all, fetch_one, fetch_value


@dataclass(frozen=True, slots=True)
class Environment:
    id: UUID
    project_id: UUID
    name: str
    current_deployment_id: UUID | None
    previous_deployment_id: UUID | None
    created_at: datetime


async def create(db: Executor, project_id: UUID, name: str) -> Environment:
    env = await fetch_one(
        db,
        Environment,
        "INSERT INTO environments (project_id, name) VALUES ($1, $2) RETURNING *",
        project_id,
        name,
    )
    assert env is not None
    return env


_GET = "SELECT * FROM environments WHERE id = $1"
_GET_LOCKED = _GET + " FOR UPDATE"


async def get(db: Executor, environment_id: UUID, *, lock: bool = False) -> Environment:
    """``lock``: FOR UPDATE, until the end of the transaction ``db`` is in."""
    env = await fetch_one(
        db,
        Environment,
        _GET_LOCKED if lock else _GET,
        environment_id,
    )
    if env is None:
        raise NotFound(f"environment {environment_id} does not exist", field="id")
    return env


async def get_by_name(db: Executor, project_id: UUID, name: str) -> Environment:
    env = await fetch_one(
        db,
        Environment,
        "SELECT * FROM environments WHERE project_id = $1 AND name = $2",
        project_id,
        name,
    )
    if env is None:
        raise NotFound(f"environment {name!r} of project {project_id} does not exist", field="name")
    return env


async def list_for_project(db: Executor, project_id: UUID) -> list[Environment]:
    return await fetch_all(
        db,
        Environment,
        "SELECT * FROM environments WHERE project_id = $1 ORDER BY name",
        project_id,
    )


async def set_current(db: Executor, environment_id: UUID, deployment_id: UUID) -> Environment:
    """Route the environment to ``deployment_id`` (one of its own deployments); the former
    current one becomes ``previous``."""
    # SET's right-hand sides read the row as it was, so previous gets the old current.
    env = await fetch_one(
        db,
        Environment,
        "UPDATE environments SET previous_deployment_id = current_deployment_id,"
        " current_deployment_id = $2"
        " WHERE id = $1 AND current_deployment_id IS DISTINCT FROM $2"
        " AND EXISTS (SELECT 1 FROM deployments WHERE id = $2 AND environment_id = $1)"
        " RETURNING *",
        environment_id,
        deployment_id,
    )
    if env is not None:
        return env
    env = await get(db, environment_id)
    if env.current_deployment_id == deployment_id:
        return env
    owner = await fetch_value(
        db, "SELECT environment_id FROM deployments WHERE id = $1", deployment_id
    )
    if owner is None:
        raise NotFound(f"deployment {deployment_id} does not exist", field="deployment_id")
    raise Invalid(
        f"deployment {deployment_id} belongs to another environment", field="deployment_id"
    )


async def swap_current(db: Executor, environment_id: UUID) -> Environment:
    """Roll back: the previous deployment becomes current and the current one previous, in
    one statement (so a concurrent flip cannot interleave); :class:`Conflict` when there is
    no previous deployment."""
    # SET's right-hand sides read the row as it was: the two columns trade values.
    env = await fetch_one(
        db,
        Environment,
        "UPDATE environments SET current_deployment_id = previous_deployment_id,"
        " previous_deployment_id = current_deployment_id"
        " WHERE id = $1 AND previous_deployment_id IS NOT NULL RETURNING *",
        environment_id,
    )
    if env is not None:
        return env
    await get(db, environment_id)
    raise Conflict(
        f"environment {environment_id} has no previous deployment", field="previous_deployment"
    )


async def delete(db: Executor, environment_id: UUID) -> None:
    if not await execute(db, "DELETE FROM environments WHERE id = $1", environment_id):
        raise NotFound(f"environment {environment_id} does not exist", field="id")


@dataclass(frozen=True, slots=True)
class EnvironmentSummary:
    """An environment with the nanoids of its current and previous deployments and how many
    custom domains it has."""

    environment: Environment
    current_nanoid: str | None
    previous_nanoid: str | None
    domains: int


_SUMMARIES = (
    "SELECT e.*, c.nanoid AS summary_current, p.nanoid AS summary_previous,"
    " (SELECT count(*) FROM domains dom WHERE dom.environment_id = e.id) AS summary_domains"
    " FROM environments e"
    " LEFT JOIN deployments c ON c.id = e.current_deployment_id"
    " LEFT JOIN deployments p ON p.id = e.previous_deployment_id"
    " WHERE e.project_id = $1 ORDER BY e.name"
)


def _summary(values: dict[str, Any]) -> EnvironmentSummary:
    return EnvironmentSummary(
        environment=Environment(
            **{k: v for k, v in values.items() if not k.startswith("summary_")}
        ),
        current_nanoid=values["summary_current"],
        previous_nanoid=values["summary_previous"],
        domains=values["summary_domains"],
    )


async def summaries(db: Executor, project_id: UUID) -> list[EnvironmentSummary]:
    with translated():
        rows = await db.fetch(_SUMMARIES, project_id)
    return [_summary(dict(row)) for row in rows]


@dataclass(frozen=True, slots=True)
class DeploymentHost:
    """A deployment as the routing table sees its own host."""

    id: UUID
    environment_id: UUID
    nanoid: str
    status: str
    created_at: datetime
    # Whether the edge routes its host now (the rule of ``edge.store.routes.ROUTES_QUERY``).
    routed: bool


# Inactive and failed deployments are left out unless an instance of theirs still serves:
# their hosts answer no more, and a project gathers many of them over time. ``ready``: the
# routing table's rule for an instance it serves.
_DEPLOYMENT_HOSTS = (
    "SELECT d.id, d.environment_id, d.nanoid, d.status, d.created_at,"
    " (d.status = ANY($2::text[]) OR r.ready) AS routed"
    " FROM deployments d CROSS JOIN LATERAL (SELECT EXISTS (SELECT 1 FROM instances i"
    "  WHERE i.deployment_id = d.id AND i.state = 'running' AND i.healthy"
    "  AND i.address IS NOT NULL AND i.port IS NOT NULL) AS ready) r"
    " WHERE d.project_id = $1 AND (d.status NOT IN ('inactive', 'failed') OR r.ready)"
    " ORDER BY d.created_at DESC, d.id"
)


async def deployment_hosts(
    db: Executor, project_id: UUID, serving_statuses: Sequence[str]
) -> list[DeploymentHost]:
    """The project's deployments whose own host answers or will, newest first;
    ``serving_statuses``: the statuses whose host is routed even with no instance ready."""
    return await fetch_all(
        db, DeploymentHost, _DEPLOYMENT_HOSTS, project_id, list(serving_statuses)
    )


@dataclass(frozen=True, slots=True)
class RegionInstances:
    """Instances of an environment's current deployment in one region."""

    environment_id: UUID
    region: str
    # Meant to run: neither stopped nor failed.
    total: int
    running: int
    healthy: int
    failed: int


_CURRENT_INSTANCES = (
    "SELECT e.id AS environment_id, i.region,"
    " count(*) FILTER (WHERE i.state NOT IN ('stopped', 'failed')) AS total,"
    " count(*) FILTER (WHERE i.state = 'running') AS running,"
    " count(*) FILTER (WHERE i.state = 'running' AND i.healthy) AS healthy,"
    " count(*) FILTER (WHERE i.state = 'failed') AS failed"
    " FROM environments e JOIN instances i ON i.deployment_id = e.current_deployment_id"
    " WHERE e.project_id = $1 GROUP BY e.id, i.region ORDER BY e.id, i.region"
)


async def current_instances(db: Executor, project_id: UUID) -> list[RegionInstances]:
    """Per environment and region, the instances of its current deployment."""
    return await fetch_all(db, RegionInstances, _CURRENT_INSTANCES, project_id)
