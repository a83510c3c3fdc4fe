"""``/api/v1/analytics``: deployment frequency, duration and success rate over a window of
days, and the resources each org reserves now.

The window (``?days=``, 1 to 365, default 30) is whole UTC days ending today; a deployment
counts in it when it was created in it. Each answer is one object: the window, the rows per
group and the total. The SQL is in :mod:`edge.store.analytics`.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from pydantic import Field

from edge.admin.api import Api, Call, Out, QueryModel
from edge.store import analytics

api = Api()


class Window(QueryModel):
    days: int = Field(default=30, ge=1, le=365, description="whole UTC days, today included")


class ProjectCount(Out):
    org: str
    project: str
    deployments: int


class OrgCount(Out):
    org: str
    deployments: int


class DayCount(Out):
    day: date
    deployments: int


class Frequency(Out):
    window_days: int
    since: datetime
    total: int
    by_org: list[OrgCount] = Field(description="busiest first")
    by_project: list[ProjectCount] = Field(description="busiest first")
    by_day: list[DayCount] = Field(description="every day of the window, oldest first")


class DurationStats(Out):
    deployments: int = Field(description="deployments that became healthy")
    avg_seconds: float | None
    p50_seconds: float | None
    p95_seconds: float | None
    min_seconds: float | None
    max_seconds: float | None


class ProjectDuration(DurationStats):
    org: str
    project: str


class Durations(Out):
    """Seconds from a deployment's creation to all its instances being healthy."""

    window_days: int
    since: datetime
    overall: DurationStats
    projects: list[ProjectDuration]


class OutcomeStats(Out):
    deployments: int = Field(description="created in the window")
    finished: int = Field(description="healthy, active, draining, inactive or failed")
    succeeded: int = Field(description="became healthy (healthy, active, draining, inactive)")
    failed: int
    rate: float | None = Field(description="succeeded / finished; null when none finished")


class ProjectOutcome(OutcomeStats):
    org: str
    project: str


class SuccessRate(Out):
    window_days: int
    since: datetime
    overall: OutcomeStats
    projects: list[ProjectOutcome]


class ResourceStats(Out):
    projects: int
    instances: int = Field(description="live instances (not stopped or failed)")
    instances_running: int
    vcpu: float = Field(description="vCPUs the live instances reserve")
    memory_mb: int = Field(description="MiB the live instances reserve")


class OrgResources(ResourceStats):
    org: str


class ResourcesByOrg(Out):
    at: datetime
    total: ResourceStats
    orgs: list[OrgResources]


def _days(call: Call) -> int:
    query: Window = call.query
    return query.days


@api.route(
    "GET",
    "/api/v1/analytics/deployments/frequency",
    auth="admin",
    summary="Deployments per org, project and day",
    tag="analytics",
    query=Window,
    response=Frequency,
)
async def deployment_frequency(call: Call) -> Frequency:
    days, pool = _days(call), call.ctx.pool
    since = await analytics.window_start(pool, days)
    per_day = await analytics.deployments_per_day(pool, since)
    per_org = await analytics.deployments_per_org(pool, since)
    per_project = await analytics.deployments_per_project(pool, since)
    return Frequency(
        window_days=days,
        since=since,
        total=sum(d.deployments for d in per_day),
        by_org=[OrgCount.model_validate(r) for r in per_org],
        by_project=[ProjectCount.model_validate(r) for r in per_project],
        by_day=[DayCount.model_validate(r) for r in per_day],
    )


@api.route(
    "GET",
    "/api/v1/analytics/deployments/duration",
    auth="admin",
    summary="Time from creation to healthy, per project (average, median, 95th percentile)",
    tag="analytics",
    query=Window,
    response=Durations,
)
async def deployment_duration(call: Call) -> Durations:
    days, pool = _days(call), call.ctx.pool
    since = await analytics.window_start(pool, days)
    rows = await analytics.durations(pool, since)
    overall = next(r for r in rows if r.org is None)
    return Durations(
        window_days=days,
        since=since,
        overall=DurationStats.model_validate(overall),
        projects=[ProjectDuration.model_validate(r) for r in rows if r.org is not None],
    )


def _outcome(row: analytics.Outcomes) -> dict[str, object]:
    return {
        "org": row.org,
        "project": row.project,
        "deployments": row.deployments,
        "finished": row.finished,
        "succeeded": row.succeeded,
        "failed": row.failed,
        "rate": round(row.succeeded / row.finished, 4) if row.finished else None,
    }


@api.route(
    "GET",
    "/api/v1/analytics/deployments/success-rate",
    auth="admin",
    summary="Share of finished deployments that became healthy, per project",
    tag="analytics",
    query=Window,
    response=SuccessRate,
)
async def deployment_success_rate(call: Call) -> SuccessRate:
    days, pool = _days(call), call.ctx.pool
    since = await analytics.window_start(pool, days)
    rows = await analytics.outcomes(pool, since)
    overall = next(r for r in rows if r.org is None)
    return SuccessRate(
        window_days=days,
        since=since,
        overall=OutcomeStats.model_validate(_outcome(overall)),
        projects=[ProjectOutcome.model_validate(_outcome(r)) for r in rows if r.org is not None],
    )


def _resources(row: analytics.OrgResources) -> dict[str, object]:
    return {
        "org": row.org,
        "projects": row.projects,
        "instances": row.instances,
        "instances_running": row.instances_running,
        "vcpu": float(row.vcpu),
        "memory_mb": row.memory_mb,
    }


@api.route(
    "GET",
    "/api/v1/analytics/resources/by-org",
    auth="admin",
    summary="Projects, live instances and the vCPU and memory they reserve, per org (now)",
    tag="analytics",
    response=ResourcesByOrg,
)
async def resources_by_org(call: Call) -> ResourcesByOrg:
    pool = call.ctx.pool
    rows = await analytics.resources_by_org(pool)
    total = next(r for r in rows if r.org is None)
    return ResourcesByOrg(
        at=datetime.now(UTC),
        total=ResourceStats.model_validate(_resources(total)),
        orgs=[OrgResources.model_validate(_resources(r)) for r in rows if r.org is not None],
    )
