"""Deployments: one build of a project for an environment, its status and when it got there.

Each has a generated nanoid (7 characters of ``[a-z0-9]``) that names its host
(``<project>-<nanoid>-<org>.<apps domain>``). Every status has a ``<status>_at`` column set
when the deployment enters it (``pending`` is ``created_at``). Which status may follow which
is the scheduler's transition table; :func:`set_status` can guard against a concurrent
change with ``expected``.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from edge.store.errors import Conflict, Invalid, NotFound, translated
from edge.store.instances import Instance, InstanceState
from edge.store.query import Executor, execute, fetch_all, fetch_one, fetch_value
from scheduler.lifecycle import STATUSES, IllegalTransition, Status, check

__all__ = ["STATUSES", "Status"]  # re-exported: the store's users name them from here

# The transitions from a new deployment to a healthy one (benchmarks and tests seed with it).
PATH_TO_HEALTHY: tuple[tuple[Status, Status], ...] = (
    ("pending", "placing"),
    ("placing", "starting"),
    ("starting", "healthy"),
)

NANOID_ALPHABET = string.ascii_lowercase + string.digits
NANOID_LENGTH = 7
# 36**7 is 78 billion: a collision is rare, several in a row mean something else is wrong.
_NANOID_ATTEMPTS = 5

# One fixed statement per status (the timestamp column cannot be a parameter). Entering
# placing forgets the regions of an earlier run (a rollback places it anew); entering starting
# records them.
_TRANSITION: dict[str, str] = {
    status: (
        f"UPDATE deployments SET status = $2, {status}_at = now(),"  # noqa: S608
        " failure_reason = CASE WHEN $2 = 'failed' THEN $3 ELSE failure_reason END,"
        " regions = CASE WHEN $2 = 'placing' THEN NULL ELSE coalesce($5, regions) END"
        " WHERE id = $1 AND status = $4 RETURNING *"
    )
    for status in STATUSES
    if status != "pending"
}


@dataclass(frozen=True, slots=True)
class Deployment:
    id: UUID
    project_id: UUID
    environment_id: UUID
    nanoid: str
    status: Status
    image: str | None
    command: str | None
    commit_sha: str | None
    commit_message: str | None
    instances_per_region: int
    failure_reason: str | None
    created_at: datetime
    placing_at: datetime | None
    starting_at: datetime | None
    healthy_at: datetime | None
    active_at: datetime | None
    draining_at: datetime | None
    inactive_at: datetime | None
    failed_at: datetime | None
    # Environment variables of its instances.
    env: dict[str, Any]
    # The regions it runs in, recorded when it left placing.
    regions: list[str] | None


def new_nanoid() -> str:
    return "".join(secrets.choice(NANOID_ALPHABET) for _ in range(NANOID_LENGTH))


async def create(
    db: Executor,
    *,
    project_id: UUID,
    environment_id: UUID,
    image: str | None = None,
    command: str | None = None,
    commit_sha: str | None = None,
    commit_message: str | None = None,
    instances_per_region: int = 1,
    env: dict[str, str] | None = None,
) -> Deployment:
    """A ``pending`` deployment with a fresh nanoid; needs an image or a command."""
    if image is None and command is None:
        raise Invalid("a deployment needs an image or a command", field="image")
    for _ in range(_NANOID_ATTEMPTS):
        try:
            deployment = await fetch_one(
                db,
                Deployment,
                "INSERT INTO deployments (project_id, environment_id, nanoid, image, command,"
                " commit_sha, commit_message, instances_per_region, env)"
                " SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9"
                # The environment must be the project's own.
                " WHERE EXISTS (SELECT 1 FROM environments WHERE id = $2 AND project_id = $1)"
                " RETURNING *",
                project_id,
                environment_id,
                new_nanoid(),
                image,
                command,
                commit_sha,
                commit_message,
                instances_per_region,
                env or {},
            )
        except Conflict as exc:
            if exc.field == "nanoid":
                continue
            raise
        if deployment is None:
            raise NotFound(
                f"environment {environment_id} of project {project_id} does not exist",
                field="environment_id",
            )
        return deployment
    raise Conflict(f"no free nanoid after {_NANOID_ATTEMPTS} attempts", field="nanoid")


async def get(db: Executor, deployment_id: UUID) -> Deployment:
    deployment = await fetch_one(
        db, Deployment, "SELECT * FROM deployments WHERE id = $1", deployment_id
    )
    if deployment is None:
        raise NotFound(f"deployment {deployment_id} does not exist", field="id")
    return deployment


async def get_by_nanoid(db: Executor, nanoid: str) -> Deployment:
    deployment = await fetch_one(
        db, Deployment, "SELECT * FROM deployments WHERE nanoid = $1", nanoid
    )
    if deployment is None:
        raise NotFound(f"deployment {nanoid!r} does not exist", field="nanoid")
    return deployment


async def list_for_project(
    db: Executor,
    project_id: UUID,
    *,
    environment_id: UUID | None = None,
    limit: int = 100,
) -> list[Deployment]:
    """Newest first."""
    return await fetch_all(
        db,
        Deployment,
        "SELECT * FROM deployments WHERE project_id = $1"
        " AND ($2::uuid IS NULL OR environment_id = $2)"
        " ORDER BY created_at DESC, id LIMIT $3",
        project_id,
        environment_id,
        limit,
    )


async def list_by_status(db: Executor, *statuses: Status) -> list[Deployment]:
    """Deployments in any of ``statuses``, oldest first (the scheduler's work queue)."""
    return await fetch_all(
        db,
        Deployment,
        "SELECT * FROM deployments WHERE status = ANY($1::text[]) ORDER BY created_at, id",
        list(statuses),
    )


async def transition(
    db: Executor,
    deployment_id: UUID,
    source: Status,
    target: Status,
    *,
    reason: str | None = None,
    regions: list[str] | tuple[str, ...] | None = None,
) -> Deployment:
    """Move the deployment from ``source`` to ``target`` now (sets ``<target>_at``;
    ``reason`` goes with ``failed``, ``regions`` with ``starting``).

    :class:`Invalid` when the lifecycle's table does not allow the change; :class:`Conflict`
    when the deployment is no longer in ``source``: two writers never both move it.
    """
    try:
        check(source, target)
    except IllegalTransition as exc:
        raise Invalid(str(exc), field="status") from None
    if target == "failed" and not reason:
        raise Invalid("a failed deployment needs a reason", field="failure_reason")
    deployment = await fetch_one(
        db,
        Deployment,
        _TRANSITION[target],
        deployment_id,
        target,
        reason,
        source,
        list(regions) if regions is not None else None,
    )
    if deployment is not None:
        return deployment
    current = await fetch_value(db, "SELECT status FROM deployments WHERE id = $1", deployment_id)
    if current is None:
        raise NotFound(f"deployment {deployment_id} does not exist", field="id")
    raise Conflict(
        f"deployment {deployment_id} is {current}, not {source}; not moved to {target}",
        field="status",
    )


async def delete(db: Executor, deployment_id: UUID) -> None:
    if not await execute(db, "DELETE FROM deployments WHERE id = $1", deployment_id):
        raise NotFound(f"deployment {deployment_id} does not exist", field="id")


@dataclass(frozen=True, slots=True)
class DeploymentView:
    """A deployment with the names it is known by: its project's org and name, its
    environment's name, and whether it is that environment's current deployment."""

    deployment: Deployment
    org: str
    project: str
    environment: str
    current: bool

    @property
    def name(self) -> str:
        """``<project>-<nanoid>-<org>``: the deployment's host label."""
        return f"{self.project}-{self.deployment.nanoid}-{self.org}"


_VIEW = (
    "SELECT d.*, p.org AS view_org, p.name AS view_project, e.name AS view_environment,"
    " e.current_deployment_id IS NOT DISTINCT FROM d.id AS view_current"
    " FROM deployments d JOIN projects p ON p.id = d.project_id"
    " JOIN environments e ON e.id = d.environment_id"
)
_VIEW_FILTER = (
    " WHERE ($1::uuid IS NULL OR d.project_id = $1)"
    " AND ($2::text IS NULL OR p.org = $2)"
    " AND ($3::text IS NULL OR p.name = $3)"
    " AND ($4::text IS NULL OR d.status = $4)"
    " AND ($5::text IS NULL OR e.name = $5)"
)

# Constants joined at import; the values are parameters.
_VIEW_FROM = (
    " FROM deployments d JOIN projects p ON p.id = d.project_id"
    " JOIN environments e ON e.id = d.environment_id"
)
_VIEW_COUNT = "SELECT count(*)" + _VIEW_FROM + _VIEW_FILTER


def _view(row: Mapping[str, Any]) -> DeploymentView:
    values = dict(row)
    return DeploymentView(
        deployment=Deployment(**{k: v for k, v in values.items() if not k.startswith("view_")}),
        org=values["view_org"],
        project=values["view_project"],
        environment=values["view_environment"],
        current=values["view_current"],
    )


async def list_views(
    db: Executor,
    *,
    project_id: UUID | None = None,
    org: str | None = None,
    project: str | None = None,
    status: str | None = None,
    environment: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> tuple[list[DeploymentView], int]:
    """One page of deployments, newest first, and how many match the filters."""
    args = (project_id, org, project, status, environment)
    with translated():
        rows = await db.fetch(
            _VIEW + _VIEW_FILTER + " ORDER BY d.created_at DESC, d.id LIMIT $6 OFFSET $7",
            *args,
            limit,
            offset,
        )
        total = await db.fetchval(_VIEW_COUNT, *args)
    return [_view(row) for row in rows], int(total)


async def get_view(db: Executor, deployment_id: UUID) -> DeploymentView:
    with translated():
        row = await db.fetchrow(_VIEW + " WHERE d.id = $1", deployment_id)
    if row is None:
        raise NotFound(f"deployment {deployment_id} does not exist", field="id")
    return _view(row)


def _nanoid_candidates(name: str) -> list[str]:
    """Every 7-character ``[a-z0-9]`` label between two hyphens of ``name``: org and project
    names may contain hyphens themselves, so the nanoid's place is not fixed."""
    labels = name.split("-")
    return [
        label
        for label in labels[1:-1]
        if len(label) == NANOID_LENGTH and all(c in NANOID_ALPHABET for c in label)
    ]


async def get_view_by_name(db: Executor, name: str) -> DeploymentView:
    """The deployment named ``<project>-<nanoid>-<org>``."""
    candidates = _nanoid_candidates(name.lower())
    if candidates:
        with translated():
            rows = await db.fetch(
                _VIEW + " WHERE d.nanoid = ANY($1::text[])"
                " AND p.name || '-' || d.nanoid || '-' || p.org = $2",
                candidates,
                name.lower(),
            )
        if rows:
            return _view(rows[0])
    raise NotFound(f"deployment {name!r} does not exist", field="name")


@dataclass(frozen=True, slots=True)
class DeploymentInstance:
    """An instance of a deployment with the hostname of its node (None once unplaced)."""

    instance: Instance
    node_hostname: str | None


_INSTANCES_OF = (
    "SELECT i.*, n.hostname AS view_node_hostname FROM instances i"
    " LEFT JOIN nodes n ON n.id = i.node_id WHERE i.deployment_id = $1"
    " ORDER BY i.region, i.created_at, i.id LIMIT $2 OFFSET $3"
)


async def list_instances(
    db: Executor, deployment_id: UUID, *, limit: int = 100, offset: int = 0
) -> tuple[list[DeploymentInstance], int]:
    """One page of the deployment's instances, by region, and how many it has."""
    with translated():
        rows = await db.fetch(_INSTANCES_OF, deployment_id, limit, offset)
        total = await db.fetchval(
            "SELECT count(*) FROM instances WHERE deployment_id = $1", deployment_id
        )
    found = []
    for row in rows:
        values = dict(row)
        hostname = values.pop("view_node_hostname")
        found.append(DeploymentInstance(Instance(**values), hostname))
    return found, int(total)


@dataclass(frozen=True, slots=True)
class InstanceCount:
    """How many of a deployment's instances are in one region and state, and how many of
    those are healthy."""

    region: str
    state: InstanceState
    instances: int
    healthy: int


@dataclass(frozen=True, slots=True)
class DeploymentMetrics:
    """What the database knows of a deployment now, measured on the database's clock."""

    counts: list[InstanceCount]
    # Over the instances that reported a boot time; all None when none did.
    boot_samples: int
    boot_min_ms: int | None
    boot_avg_ms: float | None
    boot_max_ms: int | None
    boot_p50_ms: float | None
    age_seconds: float
    # healthy_at - created_at; None while it never became healthy.
    time_to_healthy_seconds: float | None


_COUNTS = (
    "SELECT region, state, count(*) AS instances, count(*) FILTER (WHERE healthy) AS healthy"
    " FROM instances WHERE deployment_id = $1 GROUP BY region, state ORDER BY region, state"
)
_TIMES = (
    "SELECT extract(epoch FROM now() - d.created_at)::float8 AS age_seconds,"
    " extract(epoch FROM d.healthy_at - d.created_at)::float8 AS time_to_healthy_seconds,"
    " b.* FROM deployments d, LATERAL ("
    " SELECT count(boot_time_ms) AS boot_samples, min(boot_time_ms) AS boot_min_ms,"
    " avg(boot_time_ms)::float8 AS boot_avg_ms, max(boot_time_ms) AS boot_max_ms,"
    " percentile_cont(0.5) WITHIN GROUP (ORDER BY boot_time_ms) AS boot_p50_ms"
    " FROM instances WHERE deployment_id = d.id) b"
    " WHERE d.id = $1"
)


async def metrics(db: Executor, deployment_id: UUID) -> DeploymentMetrics:
    """Instance counts by region and state, boot times, age and time to healthy."""
    with translated():
        times = await db.fetchrow(_TIMES, deployment_id)
        rows = await db.fetch(_COUNTS, deployment_id)
    if times is None:
        raise NotFound(f"deployment {deployment_id} does not exist", field="id")
    return DeploymentMetrics(
        counts=[
            InstanceCount(r["region"], r["state"], int(r["instances"]), int(r["healthy"]))
            for r in rows
        ],
        boot_samples=int(times["boot_samples"]),
        boot_min_ms=times["boot_min_ms"],
        boot_avg_ms=times["boot_avg_ms"],
        boot_max_ms=times["boot_max_ms"],
        boot_p50_ms=times["boot_p50_ms"],
        age_seconds=times["age_seconds"],
        time_to_healthy_seconds=times["time_to_healthy_seconds"],
    )
