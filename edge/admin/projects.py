"""``/api/v1/projects``: customer projects, their settings, and the operations on their
environments (rollback, promote) with the views an operator checks after one (routing,
health).

Every project gets the environments ``production`` and ``staging`` when it is created.
A rollback to a deployment that still runs (inside its rollback window) routes to it at once;
one whose instances were stopped is moved back to ``placing``, and the scheduler starts it
again and routes to it once healthy. A promote creates a deployment that the scheduler rolls
out like any other.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, Field

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
from edge.store import deployments, domains, environments, projects
from edge.store.errors import Conflict, NotFound
from edge.store.routes import SERVING_STATUSES

api = Api()
log = logging.getLogger("edge.admin")

ENVIRONMENTS = ("production", "staging")

# The schema's CHECK, less a trailing hyphen: org and name end up inside DNS labels.
LABEL = r"^[a-z0-9]([a-z0-9-]{0,37}[a-z0-9])?$"
ENVIRONMENT = r"^[a-z0-9][a-z0-9-]{0,31}$"
# GitHub: owners up to 39 characters, repositories up to 100.
GITHUB_REPO = r"^[A-Za-z0-9_.-]{1,39}/[A-Za-z0-9_.-]{1,100}$"
BRANCH = r"^[A-Za-z0-9._/+-]{1,255}$"
HEALTH_PATH = r"^/[!-~]{0,1023}$"
# ``<name>-<nanoid>-<org>`` must fit in one DNS label (63 characters), nanoid 7.
MAX_NAME_AND_ORG = 63 - 7 - 2
# The placeholders of the platform's default template, the only ones sure to be filled in.
IMAGE_PLACEHOLDERS = ("org", "repo", "sha")
# Printable ASCII but braces (the same in Python and in the schema's ECMA regex), and
# the placeholders.
IMAGE_TEMPLATE = re.compile(r"([!-z|~]|\{(" + "|".join(IMAGE_PLACEHOLDERS) + r")\})+")
# Well inside the int4 and numeric(6, 2) columns: the database never refuses a value.
MAX_RATE = 1_000_000
MAX_MEMORY_MB = 1 << 30
MAX_VCPU = 4096
# Two years: the schema's bound, and what HSTS preload lists ask for at most.
MAX_HSTS_AGE = 63_072_000
CENT = Decimal("0.01")


def _image_template(value: str) -> str:
    if not IMAGE_TEMPLATE.fullmatch(value):
        raise ValueError(
            "placeholders may only be "
            + ", ".join(f"{{{p}}}" for p in IMAGE_PLACEHOLDERS)
            + "; the rest printable ASCII without spaces or braces"
        )
    return value


Vcpu = Annotated[
    float,
    Field(
        ge=0.01,
        le=MAX_VCPU,
        allow_inf_nan=False,
        description="vCPUs, e.g. 0.5 or 2 (stored to hundredths)",
    ),
]
MemoryMb = Annotated[int, Field(gt=0, le=MAX_MEMORY_MB, description="MiB")]
Port = Annotated[int, Field(ge=1, le=65535)]
HealthPath = Annotated[str, Field(pattern=HEALTH_PATH, description="e.g. /healthz")]
GithubRepo = Annotated[str, Field(pattern=GITHUB_REPO, description="owner/repo")]
Branch = Annotated[str, Field(pattern=BRANCH)]
ImageTemplate = Annotated[
    str,
    Field(
        min_length=1,
        max_length=512,
        description="image of a deployment made from a push, e.g. ghcr.io/{org}/{repo}:sha-{sha}",
        # In the schema only: the validator's own message is clearer than a pattern's.
        json_schema_extra={"pattern": f"^{IMAGE_TEMPLATE.pattern}$"},
    ),
    AfterValidator(_image_template),
]


def _drop_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _unset() -> Any:
    """A field that may be left out (and then stays as it is) but not be null."""
    return Field(default=None, json_schema_extra=_drop_default)


HstsMaxAge = Annotated[
    int,
    Field(
        ge=0,
        le=MAX_HSTS_AGE,
        description="Strict-Transport-Security max-age (seconds) that the edge adds to the "
        "project's HTTPS responses unless the app sets its own; 0 tells browsers to forget it",
    ),
]


class ResourcesIn(Strict):
    vcpu: Vcpu = 1.0
    memory: MemoryMb = 512


class ResourcesPatch(Strict):
    """Resources to change; the ones left out stay."""

    vcpu: Vcpu = _unset()
    memory: MemoryMb = _unset()


class RateLimit(Strict):
    rps: int = Field(ge=1, le=MAX_RATE, description="requests per second")
    burst: int | None = Field(
        default=None, ge=1, le=MAX_RATE, description="bucket size (default: rps)"
    )


class ProjectIn(Strict):
    name: str = Field(pattern=LABEL)
    org: str = Field(pattern=LABEL)
    github_repo: GithubRepo | None = None
    branch: Branch = "main"
    auto_deploy: bool = False
    resources: ResourcesIn = Field(default_factory=ResourcesIn)
    app_port: Port = 3000
    health_check_path: HealthPath = "/"
    rate_limit: RateLimit | None = None
    image_template: ImageTemplate | None = Field(
        default=None, description="null: the platform's template"
    )
    hsts_max_age: HstsMaxAge | None = Field(default=None, description="null: no HSTS header")


class ProjectPatch(Strict):
    """The settings to change; the ones left out stay, null clears a nullable one."""

    github_repo: GithubRepo | None = _unset()
    branch: Branch = _unset()
    auto_deploy: bool = _unset()
    resources: ResourcesPatch = _unset()
    app_port: Port = _unset()
    health_check_path: HealthPath = _unset()
    rate_limit: RateLimit | None = Field(
        default=None,
        json_schema_extra=_drop_default,
        description="replaces the whole limit; null: no limit",
    )
    image_template: ImageTemplate | None = _unset()
    hsts_max_age: HstsMaxAge | None = _unset()


class ProjectFilter(QueryModel):
    org: str | None = Field(default=None, pattern=LABEL)


class ResourcesOut(Out):
    vcpu: float
    memory: int = Field(description="MiB")


class RateLimitOut(Out):
    rps: int
    burst: int | None


class ProjectOut(Out):
    id: UUID
    org: str
    name: str
    github_repo: str | None
    branch: str
    auto_deploy: bool
    resources: ResourcesOut
    app_port: int
    health_check_path: str
    rate_limit: RateLimitOut | None
    image_template: str | None
    hsts_max_age: int | None = Field(description="seconds; null: no HSTS header")
    created_at: datetime
    updated_at: datetime


class EnvironmentOut(Out):
    name: str
    current_deployment: str | None = Field(description="name of the deployment it routes to")
    previous_deployment: str | None = Field(description="what a rollback returns to")
    domains: int


class ProjectDetail(ProjectOut):
    environments: list[EnvironmentOut]
    domains: int
    deployments: int
    instances: int = Field(description="instances meant to run (neither stopped nor failed)")


class RollbackIn(Strict):
    environment: str = Field(default="production", pattern=ENVIRONMENT)


class RollbackOut(Out):
    environment: str
    current: DeploymentOut | None
    previous: DeploymentOut | None
    restarting: bool = Field(
        description="false: the previous deployment (still running) is current now; true: its "
        "instances were stopped and start again first, and it becomes current once healthy "
        "(answered with 202)"
    )


class PromoteIn(Strict):
    source: str = Field(default="staging", alias="from", pattern=ENVIRONMENT)
    target: str = Field(default="production", alias="to", pattern=ENVIRONMENT)


class DeploymentHostOut(Out):
    name: str
    host: str
    status: deployments.Status
    routed: bool = Field(description="whether the edge routes its host now")
    created_at: datetime


class EnvironmentRouting(Out):
    environment: str
    current: DeploymentOut | None
    hosts: list[str] = Field(
        description="hosts served by the current deployment: its own, then verified domains"
    )
    unverified_domains: list[str] = Field(description="domains that route once verified")
    deployments: list[DeploymentHostOut] = Field(
        description="the environment's other deployments whose own host answers or will"
    )


class RoutingOut(Out):
    org: str
    project: str
    environments: list[EnvironmentRouting]


HealthStatus = Literal["healthy", "degraded", "down", "no_deployment"]


class RegionHealth(Out):
    region: str
    total: int = Field(description="instances meant to run (neither stopped nor failed)")
    running: int
    healthy: int
    failed: int


class EnvironmentHealth(Out):
    environment: str
    deployment: str | None = Field(description="the current deployment")
    instances_per_region: int | None
    status: HealthStatus
    regions: list[RegionHealth]


class HealthOut(Out):
    org: str
    project: str
    status: HealthStatus
    environments: list[EnvironmentHealth]


def project_out(project: projects.Project) -> dict[str, Any]:
    rate_limit = None
    if project.rate_limit_rps is not None:
        rate_limit = {"rps": project.rate_limit_rps, "burst": project.rate_limit_burst}
    return {
        "id": project.id,
        "org": project.org,
        "name": project.name,
        "github_repo": project.github_repo,
        "branch": project.branch,
        "auto_deploy": project.auto_deploy,
        "resources": {"vcpu": float(project.vcpu), "memory": project.memory_mb},
        "app_port": project.app_port,
        "health_check_path": project.health_check_path,
        "rate_limit": rate_limit,
        "image_template": project.image_template,
        "hsts_max_age": project.hsts_max_age,
        "created_at": project.created_at,
        "updated_at": project.updated_at,
    }


def _deployment_name(project: projects.Project, nanoid: str | None) -> str | None:
    return None if nanoid is None else f"{project.name}-{nanoid}-{project.org}"


async def project_detail(call: Call, project: projects.Project) -> ProjectDetail:
    pool = call.ctx.pool
    counts = await projects.counts(pool, project.id)
    envs = [
        {
            "name": s.environment.name,
            "current_deployment": _deployment_name(project, s.current_nanoid),
            "previous_deployment": _deployment_name(project, s.previous_nanoid),
            "domains": s.domains,
        }
        for s in await environments.summaries(pool, project.id)
    ]
    return ProjectDetail.model_validate(
        {
            **project_out(project),
            "environments": envs,
            "domains": counts.domains,
            "deployments": counts.deployments,
            "instances": counts.instances,
        }
    )


def _settings(values: dict[str, Any]) -> dict[str, Any]:
    """The store's columns for the given fields of a body (only those given)."""
    settings = {
        k: v
        for k, v in values.items()
        if k not in ("name", "org", "resources", "rate_limit", "image_template")
    }
    if "image_template" in values:
        settings["image_template"] = values["image_template"]
    resources = values.get("resources") or {}
    if "vcpu" in resources:
        # The column is numeric(6, 2); rounded here, from the float's shortest decimal form
        # (0.29, not 0.28999... as Decimal(0.29) would have it).
        settings["vcpu"] = Decimal(str(resources["vcpu"])).quantize(CENT, ROUND_HALF_UP)
    if "memory" in resources:
        settings["memory_mb"] = resources["memory"]
    if "rate_limit" in values:
        limit = values["rate_limit"]
        settings["rate_limit_rps"] = limit["rps"] if limit else None
        settings["rate_limit_burst"] = limit.get("burst") if limit else None
    return settings


async def _environment(
    call: Call, project: projects.Project, name: str, what: str = "environment"
) -> environments.Environment:
    try:
        return await environments.get_by_name(call.ctx.pool, project.id, name)
    except NotFound:
        raise ApiError(
            404,
            "not_found",
            f"{what} {name!r} of project {project.org}/{project.name} does not exist",
            field=what,
        ) from None


async def _deployment(call: Call, deployment_id: UUID | None) -> DeploymentOut | None:
    if deployment_id is None:
        return None
    view = await deployments.get_view(call.ctx.pool, deployment_id)
    return deployment_out(view, call.ctx.settings.apps_domain)


@api.route(
    "POST",
    "/api/v1/projects",
    auth="admin",
    summary="Register a project (with its production and staging environments)",
    tag="projects",
    body=ProjectIn,
    response=ProjectDetail,
    status=201,
    errors=(409,),
)
async def create_project(call: Call) -> ProjectDetail:
    body: ProjectIn = call.body
    if len(body.name) + len(body.org) > MAX_NAME_AND_ORG:
        raise ApiError(
            400,
            "invalid_value",
            f"name: name and org together may have at most {MAX_NAME_AND_ORG} characters, "
            "so that deployment hosts (<name>-<nanoid>-<org>) fit in a DNS label",
            field="name",
        )
    # Every field, defaults included: what the answer shows is what was asked for.
    settings = _settings(body.model_dump())
    try:
        project = await projects.create_with_environments(
            call.ctx.pool, body.org, body.name, ENVIRONMENTS, **settings
        )
    except Conflict:
        raise ApiError(
            409, "conflict", f"project {body.org}/{body.name} already exists", field="name"
        ) from None
    return await project_detail(call, project)


@api.route(
    "GET",
    "/api/v1/projects",
    auth="admin",
    summary="List projects",
    tag="projects",
    query=ProjectFilter,
    response=ProjectOut,
    many=True,
)
async def list_projects(call: Call) -> Page:
    query: ProjectFilter = call.query
    found, total = await projects.list_page(
        call.ctx.pool, org=query.org, limit=call.page.limit, offset=call.page.offset
    )
    return Page([project_out(p) for p in found], total)


@api.route(
    "GET",
    "/api/v1/projects/{org}/{name}",
    auth="admin",
    summary="A project with its environments and counts",
    tag="projects",
    response=ProjectDetail,
    errors=(404,),
)
async def get_project(call: Call) -> ProjectDetail:
    return await project_detail(call, await project_of(call))


@api.route(
    "PATCH",
    "/api/v1/projects/{org}/{name}",
    auth="admin",
    summary="Change some settings of a project",
    tag="projects",
    body=ProjectPatch,
    response=ProjectDetail,
    errors=(404,),
)
async def update_project(call: Call) -> ProjectDetail:
    body: ProjectPatch = call.body
    project = await project_of(call)
    settings = _settings(body.model_dump(exclude_unset=True))
    try:
        project = await projects.update(call.ctx.pool, project.id, **settings)
    except NotFound:
        # Deleted between the look-up and the update.
        raise not_found(f"project {project.org}/{project.name}") from None
    return await project_detail(call, project)


@api.route(
    "DELETE",
    "/api/v1/projects/{org}/{name}",
    auth="admin",
    summary="Delete a project with its environments, deployments, instances and domains",
    tag="projects",
    errors=(404,),
)
async def delete_project(call: Call) -> None:
    project = await project_of(call)
    try:
        await projects.delete(call.ctx.pool, project.id)
    except NotFound:
        raise not_found(f"project {project.org}/{project.name}") from None


@api.route(
    "POST",
    "/api/v1/projects/{org}/{name}/rollback",
    auth="admin",
    # At once (200) while the previous deployment still runs (its rollback window); else its
    # instances start again and it becomes current once healthy (202).
    summary="Route an environment back to its previous deployment (202: restarting it first)",
    tag="projects",
    body=RollbackIn,
    body_required=False,
    response=RollbackOut,
    answers=((202, RollbackOut),),
    errors=(404, 409),
)
async def rollback(call: Call) -> Reply:
    body: RollbackIn = call.body or RollbackIn()
    project = await project_of(call)
    env = await _environment(call, project, body.environment)
    where = f"environment {env.name} of {project.org}/{project.name}"
    try:
        env, restarting = await _roll_back(call.ctx.pool, env.id, where)
    except Conflict:
        raise ApiError(
            409,
            "conflict",
            f"{where} changed during the rollback; look at it again and retry",
            field="environment",
        ) from None
    answer = RollbackOut(
        environment=env.name,
        current=await _deployment(call, env.current_deployment_id),
        previous=await _deployment(call, env.previous_deployment_id),
        restarting=restarting,
    )
    return Reply(answer, status=202 if restarting else 200)


async def _roll_back(pool: Any, environment_id: UUID, where: str) -> tuple[Any, bool]:
    """Make the previous deployment current again (True: once its restarted instances are
    healthy), every status change through the lifecycle's table, in one transaction."""
    async with pool.acquire() as conn, conn.transaction():
        env = await environments.get(conn, environment_id, lock=True)
        if env.previous_deployment_id is None:
            raise ApiError(
                409,
                "conflict",
                f"{where} has no previous deployment to roll back to",
                field="environment",
            )
        previous = await deployments.get(conn, env.previous_deployment_id)
        current = env.current_deployment_id and await deployments.get(
            conn, env.current_deployment_id
        )
        if previous.status == "draining":
            await deployments.transition(conn, previous.id, "draining", "active")
            if current and current.status == "active":
                await deployments.transition(conn, current.id, "active", "draining")
            env = await environments.swap_current(conn, env.id)
            log.info("rollback of %s: deployment %s is current again", where, previous.nanoid)
            return env, False
        if previous.status == "inactive":
            await deployments.transition(conn, previous.id, "inactive", "placing")
            log.info("rollback of %s: deployment %s starts again", where, previous.nanoid)
            return env, True
        if previous.status in ("pending", "placing", "starting", "healthy"):
            return env, True  # restarting already, from an earlier rollback
        raise ApiError(
            409,
            "conflict",
            f"the previous deployment of {where} is {previous.status}; it cannot serve again",
            field="environment",
        )


@api.route(
    "POST",
    "/api/v1/projects/{org}/{name}/promote",
    auth="admin",
    summary="Deploy the current deployment of one environment (staging) to another",
    tag="projects",
    body=PromoteIn,
    body_required=False,
    response=DeploymentOut,
    status=201,
    errors=(404, 409),
)
async def promote(call: Call) -> DeploymentOut:
    body: PromoteIn = call.body or PromoteIn()
    project = await project_of(call)
    if body.source == body.target:
        raise ApiError(400, "invalid_value", "to: must differ from from", field="to")
    source = await _environment(call, project, body.source, "from")
    target = await _environment(call, project, body.target, "to")
    if source.current_deployment_id is None:
        raise ApiError(
            409,
            "conflict",
            f"environment {source.name} of {project.org}/{project.name} has no current "
            "deployment to promote",
            field="from",
        )
    pool = call.ctx.pool
    origin = await deployments.get(pool, source.current_deployment_id)
    created = await deployments.create(
        pool,
        project_id=project.id,
        environment_id=target.id,
        image=origin.image,
        command=origin.command,
        commit_sha=origin.commit_sha,
        commit_message=origin.commit_message,
        instances_per_region=origin.instances_per_region,
        env=origin.env,
    )
    answer = await _deployment(call, created.id)
    assert answer is not None
    return answer


@api.route(
    "GET",
    "/api/v1/projects/{org}/{name}/routing",
    auth="admin",
    summary="Which deployment serves which host, per environment",
    tag="projects",
    response=RoutingOut,
    errors=(404,),
)
async def routing(call: Call) -> RoutingOut:
    project = await project_of(call)
    pool = call.ctx.pool
    apps_domain = call.ctx.settings.apps_domain
    envs = await environments.list_for_project(pool, project.id)
    custom = await domains.list_for_project(pool, project.id)
    hosts = await environments.deployment_hosts(pool, project.id, SERVING_STATUSES)
    answer = []
    for env in envs:
        current = await _deployment(call, env.current_deployment_id)
        served = [] if current is None else [f"{current.name}.{apps_domain}"]
        if current is not None:
            served += [d.name for d in custom if d.environment_id == env.id and d.verified_at]
        others = []
        for h in hosts:
            if h.environment_id != env.id or h.id == env.current_deployment_id:
                continue
            name = f"{project.name}-{h.nanoid}-{project.org}"
            others.append(
                {
                    "name": name,
                    "host": f"{name}.{apps_domain}",
                    "status": h.status,
                    "routed": h.routed,
                    "created_at": h.created_at,
                }
            )
        answer.append(
            EnvironmentRouting.model_validate(
                {
                    "environment": env.name,
                    "current": current,
                    "hosts": served,
                    "unverified_domains": [
                        d.name for d in custom if d.environment_id == env.id and not d.verified_at
                    ],
                    "deployments": others,
                }
            )
        )
    return RoutingOut(org=project.org, project=project.name, environments=answer)


def _status(counts: list[tuple[int, int]]) -> HealthStatus:
    """Of (total, healthy) pairs, one per current deployment."""
    if not counts:
        return "no_deployment"
    if all(total > 0 and healthy == total for total, healthy in counts):
        return "healthy"
    if all(healthy == 0 for _, healthy in counts):
        return "down"
    return "degraded"


@api.route(
    "GET",
    "/api/v1/projects/{org}/{name}/health",
    auth="admin",
    summary="Instance health per region of each environment's current deployment",
    tag="projects",
    response=HealthOut,
    errors=(404,),
)
async def health(call: Call) -> HealthOut:
    project = await project_of(call)
    pool = call.ctx.pool
    rows = await environments.current_instances(pool, project.id)
    answer = []
    totals: list[tuple[int, int]] = []
    for env in await environments.list_for_project(pool, project.id):
        regions = [r for r in rows if r.environment_id == env.id]
        current = None
        if env.current_deployment_id is not None:
            try:
                current = await deployments.get(pool, env.current_deployment_id)
            except NotFound:
                current = None  # deleted meanwhile: the pointer is being set to null
        status: HealthStatus = "no_deployment"
        if current is not None:
            pair = (sum(r.total for r in regions), sum(r.healthy for r in regions))
            totals.append(pair)
            status = _status([pair])
        answer.append(
            EnvironmentHealth(
                environment=env.name,
                deployment=_deployment_name(project, current.nanoid if current else None),
                instances_per_region=current.instances_per_region if current else None,
                status=status,
                regions=[
                    RegionHealth(
                        region=r.region,
                        total=r.total,
                        running=r.running,
                        healthy=r.healthy,
                        failed=r.failed,
                    )
                    for r in regions
                ]
                if current is not None
                else [],
            )
        )
    return HealthOut(
        org=project.org, project=project.name, status=_status(totals), environments=answer
    )
