"""Deployments: listing them (all, or a project's), the current one of an environment,
creating one by hand, and a deployment's instances, logs and metrics.

A deployment is named in paths by its id or by its name ``<project>-<nanoid>-<org>`` (the
label of its host). Creating one only records it as ``pending``: the scheduler places,
starts and promotes it. Metrics are what the database knows now (instances, boot times,
timings); request counts are the proxy's and are not here.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from datetime import datetime
from uuid import UUID

from pydantic import ConfigDict, Field, field_validator

from edge.admin.api import (
    Api,
    ApiError,
    Call,
    Out,
    Page,
    QueryModel,
    Reply,
    Strict,
    not_found,
)
from edge.admin.views import DeploymentOut, deployment_out, project_of
from edge.store import deployments, environments, logs, projects
from edge.store.deployments import DeploymentView, Status
from edge.store.errors import Conflict, NotFound
from edge.store.instances import INSTANCE_STATES, InstanceState
from edge.store.logs import Stream

api = Api()

# The schema's checks on org and project names and environment names.
SLUG = r"^[a-z0-9][a-z0-9-]{0,38}$"
ENVIRONMENT = r"^[a-z0-9][a-z0-9-]{0,31}$"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ENV_NAME_MAX = 255
# The instance's port is the platform's to set.
RESERVED_ENV = "PORT"
# No NUL: PostgreSQL text and jsonb cannot hold it.
NO_NUL = r"^[^\x00]*$"
# <project>-<nanoid>-<org>, hyphens allowed in both names.
DEPLOYMENT_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,38}-[a-z0-9]{7}-[a-z0-9][a-z0-9-]{0,38}")
# instance_logs.id is a bigserial.
MAX_LOG_ID = 2**63 - 1


class DeploymentIn(Strict):
    # Either of image or command is enough; the model says so to OpenAPI, the handler
    # enforces it (so the error can name ``image``).
    model_config = ConfigDict(
        json_schema_extra={
            "anyOf": [
                {"required": ["image"], "properties": {"image": {"type": "string"}}},
                {"required": ["command"], "properties": {"command": {"type": "string"}}},
            ]
        }
    )

    project: str = Field(pattern=SLUG, description="the project's name")
    org: str = Field(pattern=SLUG)
    image: str | None = Field(
        None,
        max_length=512,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_./:@-]*$",
        description="container image, e.g. ghcr.io/dokedu/app:sha-abc123",
    )
    command: str | None = Field(
        None,
        min_length=1,
        max_length=8192,
        pattern=NO_NUL,
        description="what the process runtime runs (with PORT set)",
    )
    commit_sha: str | None = Field(None, pattern=r"^[0-9a-fA-F]{4,64}$")
    commit_message: str | None = Field(None, max_length=65536, pattern=NO_NUL)
    instances_per_region: int = Field(1, ge=1, le=100)
    environment: str = Field(
        "production", pattern=ENVIRONMENT, description="created if the project has none of it"
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        max_length=500,
        description="environment variables of its instances (PORT is set by the platform)",
        json_schema_extra={
            "propertyNames": {
                "pattern": f"^{ENV_NAME.pattern}$",
                "maxLength": ENV_NAME_MAX,
                "not": {"const": RESERVED_ENV},
            },
            "additionalProperties": {"type": "string", "maxLength": 65536, "pattern": NO_NUL},
        },
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name, value in env.items():
            if len(name) > ENV_NAME_MAX or not ENV_NAME.fullmatch(name):
                raise ValueError(
                    f"{name[:64]!r} is not a variable name (letters, digits and underscores,"
                    f" not starting with a digit, at most {ENV_NAME_MAX} characters)"
                )
            if name == RESERVED_ENV:
                raise ValueError(f"{name} is reserved: the platform sets it to the app's port")
            if len(value) > 65536 or "\x00" in value:
                raise ValueError(f"the value of {name} is over 64 KiB or contains NUL")
        return env


class ProjectDeploymentFilter(QueryModel):
    environment: str | None = Field(None, pattern=ENVIRONMENT)
    status: Status | None = None


class DeploymentFilter(QueryModel):
    org: str | None = Field(None, pattern=SLUG)
    project: str | None = Field(None, pattern=SLUG)
    environment: str | None = Field(None, pattern=ENVIRONMENT)
    status: Status | None = None


class CurrentQuery(QueryModel):
    environment: str = Field("production", pattern=ENVIRONMENT)


class LogQuery(QueryModel):
    after: int = Field(0, ge=0, le=MAX_LOG_ID, description="the last line id already seen")
    limit: int = Field(1000, ge=1, le=5000)


class InstanceOut(Out):
    id: UUID
    node_id: UUID | None
    node_hostname: str | None
    region: str
    state: InstanceState
    healthy: bool
    address: str | None
    port: int | None
    boot_time_ms: int | None
    message: str | None = Field(description="the agent's word on a failure or an exit")
    last_health_at: datetime | None
    created_at: datetime
    updated_at: datetime


class LogLineOut(Out):
    id: int
    instance_id: UUID
    stream: Stream
    line: str
    logged_at: datetime


class LogsOut(Out):
    lines: list[LogLineOut]
    next_after: int = Field(description="the ``after`` of the next poll")


class BootTime(Out):
    samples: int = Field(description="instances that reported a boot time")
    min: int
    avg: float
    max: int
    p50: float


class RegionInstances(Out):
    instances: int
    running: int
    healthy: int


class DeploymentMetricsOut(Out):
    id: UUID
    name: str
    status: Status
    instances: int
    healthy: int
    by_state: dict[str, int] = Field(description="every instance state, with its count")
    by_region: dict[str, RegionInstances]
    boot_time_ms: BootTime | None = Field(description="null while no instance reported one")
    age_seconds: float
    time_to_healthy_seconds: float | None = Field(
        description="from creation to healthy; null while it never was"
    )


async def deployment_of(call: Call) -> DeploymentView:
    """The deployment the path's ``{id}`` names, by id or by name, or 404."""
    ref = call.params["id"]
    pool = call.ctx.pool
    try:
        deployment_id = UUID(ref)
    except ValueError:
        # A name that cannot be one never reaches the database.
        if DEPLOYMENT_NAME.fullmatch(ref.lower()):
            try:
                return await deployments.get_view_by_name(pool, ref)
            except NotFound:
                pass
        raise not_found(f"deployment {ref!r}") from None
    try:
        return await deployments.get_view(pool, deployment_id)
    except NotFound:
        raise not_found(f"deployment {ref}") from None


def _out(call: Call, view: DeploymentView) -> DeploymentOut:
    return deployment_out(view, call.ctx.settings.apps_domain)


@api.route(
    "GET",
    "/api/v1/projects/{org}/{name}/deployments",
    auth="admin",
    summary="A project's deployments, newest first",
    tag="deployments",
    query=ProjectDeploymentFilter,
    response=DeploymentOut,
    many=True,
    errors=(404,),
)
async def list_project_deployments(call: Call) -> Page:
    query: ProjectDeploymentFilter = call.query
    project = await project_of(call)
    found, total = await deployments.list_views(
        call.ctx.pool,
        project_id=project.id,
        environment=query.environment,
        status=query.status,
        limit=call.page.limit,
        offset=call.page.offset,
    )
    return Page([_out(call, view) for view in found], total)


@api.route(
    "GET",
    "/api/v1/projects/{org}/{name}/deployments/current",
    auth="admin",
    summary="The deployment an environment (production by default) routes to",
    tag="deployments",
    query=CurrentQuery,
    response=DeploymentOut,
    errors=(404,),
)
async def current_deployment(call: Call) -> DeploymentOut:
    query: CurrentQuery = call.query
    project = await project_of(call)
    where = f"{query.environment} of {project.org}/{project.name}"
    try:
        env = await environments.get_by_name(call.ctx.pool, project.id, query.environment)
    except NotFound:
        raise ApiError(
            404, "not_found", f"environment {where} does not exist", field="environment"
        ) from None
    if env.current_deployment_id is None:
        raise ApiError(
            404,
            "not_found",
            f"{where} has no current deployment: none of its deployments became healthy yet",
            field="environment",
        )
    try:
        view = await deployments.get_view(call.ctx.pool, env.current_deployment_id)
    except NotFound:
        # Deleted since the environment was read (the pointer is then cleared).
        raise ApiError(
            404, "not_found", f"{where} has no current deployment", field="environment"
        ) from None
    return _out(call, view)


async def _environment(call: Call, project_id: UUID, name: str) -> environments.Environment:
    """The project's environment ``name``, created on first use."""
    pool = call.ctx.pool
    try:
        return await environments.get_by_name(pool, project_id, name)
    except NotFound:
        pass
    try:
        return await environments.create(pool, project_id, name)
    except Conflict:
        # Another request created it meanwhile.
        return await environments.get_by_name(pool, project_id, name)


@api.route(
    "POST",
    "/api/v1/deployments",
    auth="admin",
    summary="Deploy an image or a command (the scheduler rolls it out)",
    tag="deployments",
    body=DeploymentIn,
    response=DeploymentOut,
    status=201,
    errors=(404,),
)
async def create_deployment(call: Call) -> Reply:
    body: DeploymentIn = call.body
    if body.image is None and body.command is None:
        raise ApiError(
            400,
            "missing_field",
            "image is required (or a command for the process runtime)",
            field="image",
        )
    try:
        project = await projects.get_by_name(call.ctx.pool, body.org, body.project)
    except NotFound:
        raise ApiError(
            404, "not_found", f"project {body.org}/{body.project} does not exist", field="project"
        ) from None
    env = await _environment(call, project.id, body.environment)
    deployment = await deployments.create(
        call.ctx.pool,
        project_id=project.id,
        environment_id=env.id,
        image=body.image,
        command=body.command,
        commit_sha=body.commit_sha,
        commit_message=body.commit_message,
        instances_per_region=body.instances_per_region,
        env=body.env,
    )
    view = DeploymentView(deployment, project.org, project.name, env.name, current=False)
    return Reply(_out(call, view), headers=[("location", f"/api/v1/deployments/{deployment.id}")])


@api.route(
    "GET",
    "/api/v1/deployments",
    auth="admin",
    summary="All deployments, newest first",
    tag="deployments",
    query=DeploymentFilter,
    response=DeploymentOut,
    many=True,
)
async def list_deployments(call: Call) -> Page:
    query: DeploymentFilter = call.query
    found, total = await deployments.list_views(
        call.ctx.pool,
        org=query.org,
        project=query.project,
        environment=query.environment,
        status=query.status,
        limit=call.page.limit,
        offset=call.page.offset,
    )
    return Page([_out(call, view) for view in found], total)


@api.route(
    "GET",
    "/api/v1/deployments/{id}",
    auth="admin",
    summary="A deployment, by id or by name (<project>-<nanoid>-<org>)",
    tag="deployments",
    response=DeploymentOut,
    errors=(404,),
)
async def get_deployment(call: Call) -> DeploymentOut:
    return _out(call, await deployment_of(call))


@api.route(
    "GET",
    "/api/v1/deployments/{id}/instances",
    auth="admin",
    summary="A deployment's instances, by region",
    tag="deployments",
    response=InstanceOut,
    many=True,
    errors=(404,),
)
async def list_deployment_instances(call: Call) -> Page:
    view = await deployment_of(call)
    found, total = await deployments.list_instances(
        call.ctx.pool, view.deployment.id, limit=call.page.limit, offset=call.page.offset
    )
    return Page(
        [
            InstanceOut.model_validate({**asdict(i.instance), "node_hostname": i.node_hostname})
            for i in found
        ],
        total,
    )


@api.route(
    "GET",
    "/api/v1/deployments/{id}/logs",
    auth="admin",
    summary="A deployment's instance log lines after a line id (poll with next_after)",
    tag="deployments",
    query=LogQuery,
    response=LogsOut,
    errors=(404,),
)
async def deployment_logs(call: Call) -> LogsOut:
    query: LogQuery = call.query
    view = await deployment_of(call)
    lines = await logs.read(call.ctx.pool, view.deployment.id, after=query.after, limit=query.limit)
    return LogsOut(
        lines=[LogLineOut.model_validate(line) for line in lines],
        next_after=lines[-1].id if lines else query.after,
    )


@api.route(
    "GET",
    "/api/v1/deployments/{id}/metrics",
    auth="admin",
    summary="A deployment's instances by state and region, boot times and timings",
    tag="deployments",
    response=DeploymentMetricsOut,
    errors=(404,),
)
async def deployment_metrics(call: Call) -> DeploymentMetricsOut:
    view = await deployment_of(call)
    try:
        known = await deployments.metrics(call.ctx.pool, view.deployment.id)
    except NotFound:
        raise not_found(f"deployment {call.params['id']!r}") from None
    by_state = dict.fromkeys(sorted(INSTANCE_STATES), 0)
    by_region: dict[str, RegionInstances] = {}
    for count in known.counts:
        by_state[count.state] += count.instances
        region = by_region.setdefault(
            count.region, RegionInstances(instances=0, running=0, healthy=0)
        )
        region.instances += count.instances
        region.healthy += count.healthy
        if count.state == "running":
            region.running += count.instances
    boot = None
    if known.boot_samples:
        assert known.boot_min_ms is not None and known.boot_max_ms is not None
        assert known.boot_avg_ms is not None and known.boot_p50_ms is not None
        boot = BootTime(
            samples=known.boot_samples,
            min=known.boot_min_ms,
            avg=round(known.boot_avg_ms, 3),
            max=known.boot_max_ms,
            p50=known.boot_p50_ms,
        )
    return DeploymentMetricsOut(
        id=view.deployment.id,
        name=view.name,
        status=view.deployment.status,
        instances=sum(by_state.values()),
        healthy=sum(r.healthy for r in by_region.values()),
        by_state=by_state,
        by_region=by_region,
        boot_time_ms=boot,
        age_seconds=round(known.age_seconds, 3),
        time_to_healthy_seconds=(
            None
            if known.time_to_healthy_seconds is None
            else round(known.time_to_healthy_seconds, 3)
        ),
    )
