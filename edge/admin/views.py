"""Answers and look-ups shared by several areas of the API: projects by their path, and
deployments as operators see them (with their name and URL)."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import Field

from edge.admin.api import Call, Out, not_found
from edge.store import projects
from edge.store.deployments import DeploymentView, Status
from edge.store.errors import NotFound


class DeploymentOut(Out):
    id: UUID
    name: str = Field(description="<project>-<nanoid>-<org>, the label of its host")
    url: str
    org: str
    project: str
    environment: str
    current: bool = Field(description="whether its environment routes to it")
    status: Status
    image: str | None
    command: str | None
    commit_sha: str | None
    commit_message: str | None
    instances_per_region: int
    env: dict[str, str]
    failure_reason: str | None
    regions: list[str] | None = Field(
        description="the regions its instances run in, recorded when placement completed"
    )
    created_at: datetime
    placing_at: datetime | None
    starting_at: datetime | None
    healthy_at: datetime | None
    active_at: datetime | None
    draining_at: datetime | None
    inactive_at: datetime | None
    failed_at: datetime | None


def deployment_out(view: DeploymentView, apps_domain: str) -> DeploymentOut:
    d = view.deployment
    # The model takes what it declares of the deployment's own fields (extra ones dropped).
    values: dict[str, Any] = {f.name: getattr(d, f.name) for f in fields(d)}
    values.update(
        name=view.name,
        url=f"https://{view.name}.{apps_domain}",
        org=view.org,
        project=view.project,
        environment=view.environment,
        current=view.current,
    )
    return DeploymentOut.model_validate(values)


async def project_of(call: Call) -> projects.Project:
    """The project named by the path's ``{org}`` and ``{name}``, or 404."""
    org, name = call.params["org"], call.params["name"]
    try:
        return await projects.get_by_name(call.ctx.pool, org, name)
    except NotFound:
        raise not_found(f"project {org}/{name}") from None
