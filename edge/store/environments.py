"""Environments of a project (``production``, ``staging``) and their current deployment.

The current deployment is what the environment's custom domains route to. Flipping it
keeps the one before as ``previous`` (the rollback target) in the same statement.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from edge.store.errors import Invalid, NotFound
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


async def get(db: Executor, environment_id: UUID) -> Environment:
    env = await fetch_one(
        db, Environment, "SELECT * FROM environments WHERE id = $1", environment_id
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


async def delete(db: Executor, environment_id: UUID) -> None:
    if not await execute(db, "DELETE FROM environments WHERE id = $1", environment_id):
        raise NotFound(f"environment {environment_id} does not exist", field="id")
