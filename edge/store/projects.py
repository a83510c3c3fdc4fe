"""Projects: an org's app -- its GitHub repo, resources, app port, health check, rate limit,
HSTS.

``(org, name)`` is unique; both appear in the deployment hosts
(``<name>-<nanoid>-<org>.<apps domain>``), hence the lower-case DNS-label checks.
A project is created with its environments in one transaction
(:func:`create_with_environments`), so none exists without somewhere to deploy to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from edge.store import environments
from edge.store.errors import Invalid, NotFound, translated
from edge.store.query import Executor, execute, fetch_all, fetch_one, fetch_value

# What update() may change; identity (org, name) and timestamps are not settings.
SETTINGS = frozenset(
    {
        "github_repo",
        "branch",
        "auto_deploy",
        "vcpu",
        "memory_mb",
        "app_port",
        "health_check_path",
        "rate_limit_rps",
        "rate_limit_burst",
        "image_template",
        "hsts_max_age",
    }
)


@dataclass(frozen=True, slots=True)
class Project:
    id: UUID
    org: str
    name: str
    github_repo: str | None
    branch: str
    auto_deploy: bool
    vcpu: Decimal
    memory_mb: int
    app_port: int
    health_check_path: str
    rate_limit_rps: int | None
    rate_limit_burst: int | None
    image_template: str | None
    created_at: datetime
    updated_at: datetime
    # Strict-Transport-Security max-age (seconds) of its HTTPS responses; None: no header.
    hsts_max_age: int | None


def _check_settings(settings: dict[str, Any]) -> None:
    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise Invalid(f"unknown project setting(s): {', '.join(unknown)}", field=unknown[0])


async def create(db: Executor, org: str, name: str, **settings: Any) -> Project:
    """A project with the given settings (the rest default); :class:`Conflict` on a taken
    ``org/name``."""
    _check_settings(settings)
    columns = ["org", "name", *settings]
    placeholders = ", ".join(f"${i}" for i in range(1, len(columns) + 1))
    # Column names come from SETTINGS only; values are parameters.
    query = f"INSERT INTO projects ({', '.join(columns)}) VALUES ({placeholders}) RETURNING *"  # noqa: S608
    project = await fetch_one(db, Project, query, org, name, *settings.values())
    assert project is not None
    return project


async def create_with_environments(
    pool: Any, org: str, name: str, environment_names: Sequence[str], **settings: Any
) -> Project:
    """:func:`create` and its environments, all or nothing (``pool``: an ``asyncpg.Pool``)."""
    # translated(): taking a connection from the pool can fail on its own (server down).
    with translated():
        async with pool.acquire() as conn, conn.transaction():
            project = await create(conn, org, name, **settings)
            for environment in environment_names:
                await environments.create(conn, project.id, environment)
    return project


async def get(db: Executor, project_id: UUID) -> Project:
    project = await fetch_one(db, Project, "SELECT * FROM projects WHERE id = $1", project_id)
    if project is None:
        raise NotFound(f"project {project_id} does not exist", field="id")
    return project


async def get_by_name(db: Executor, org: str, name: str) -> Project:
    project = await fetch_one(
        db, Project, "SELECT * FROM projects WHERE org = $1 AND name = $2", org, name
    )
    if project is None:
        raise NotFound(f"project {org}/{name} does not exist", field="name")
    return project


async def list_all(db: Executor, *, org: str | None = None) -> list[Project]:
    return await fetch_all(
        db,
        Project,
        "SELECT * FROM projects WHERE ($1::text IS NULL OR org = $1) ORDER BY org, name",
        org,
    )


_PAGE = (
    "SELECT * FROM projects WHERE ($1::text IS NULL OR org = $1)"
    " ORDER BY org, name LIMIT $2 OFFSET $3"
)
_COUNT = "SELECT count(*) FROM projects WHERE ($1::text IS NULL OR org = $1)"


async def list_page(
    db: Executor, *, org: str | None = None, limit: int = 100, offset: int = 0
) -> tuple[list[Project], int]:
    """One page of projects by org and name, and how many match."""
    found = await fetch_all(db, Project, _PAGE, org, limit, offset)
    total = await fetch_value(db, _COUNT, org)
    return found, int(total)


@dataclass(frozen=True, slots=True)
class ProjectCounts:
    domains: int
    deployments: int
    # Instances meant to run (neither stopped nor failed) across all its deployments.
    instances: int


_COUNTS = (
    "SELECT (SELECT count(*) FROM domains WHERE project_id = $1) AS domains,"
    " (SELECT count(*) FROM deployments WHERE project_id = $1) AS deployments,"
    " (SELECT count(*) FROM instances i JOIN deployments d ON d.id = i.deployment_id"
    "  WHERE d.project_id = $1 AND i.state NOT IN ('stopped', 'failed')) AS instances"
)


async def counts(db: Executor, project_id: UUID) -> ProjectCounts:
    found = await fetch_one(db, ProjectCounts, _COUNTS, project_id)
    assert found is not None  # scalar subqueries: always one row
    return found


async def update(db: Executor, project_id: UUID, **settings: Any) -> Project:
    """Change some settings; the others stay."""
    _check_settings(settings)
    if not settings:
        return await get(db, project_id)
    assignments = ", ".join(f"{column} = ${i}" for i, column in enumerate(settings, start=2))
    # Column names come from SETTINGS only; values are parameters.
    query = f"UPDATE projects SET {assignments}, updated_at = now() WHERE id = $1 RETURNING *"  # noqa: S608
    project = await fetch_one(db, Project, query, project_id, *settings.values())
    if project is None:
        raise NotFound(f"project {project_id} does not exist", field="id")
    return project


async def delete(db: Executor, project_id: UUID) -> None:
    """Delete the project with its environments, deployments, instances and domains."""
    if not await execute(db, "DELETE FROM projects WHERE id = $1", project_id):
        raise NotFound(f"project {project_id} does not exist", field="id")
