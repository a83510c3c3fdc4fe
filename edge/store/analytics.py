"""Reports over deployments and instances for operators: how often orgs and projects deploy,
how long deployments take to become healthy, how many succeed, and what each org reserves.

A window of ``days`` is whole UTC days ending today (:func:`window_start`): it starts at
midnight UTC ``days - 1`` days ago, so the per-day rows add up to the totals. A deployment
counts in the window it was created in. Each report is one statement (rows per group and,
with ``GROUPING SETS``, the total), read-only, on the live tables: fine for thousands of
deployments a day, not meant for years of history.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal

from edge.store.errors import translated
from edge.store.query import Executor, fetch_all, fetch_value


async def window_start(db: Executor, days: int) -> datetime:
    """When the window of ``days`` days starts: the reports take it as their ``since``, so
    that all of one answer's reports cover the same window."""
    start: datetime = await fetch_value(
        db,
        "SELECT (date_trunc('day', now() AT TIME ZONE 'UTC')"
        " - make_interval(days => $1::int - 1)) AT TIME ZONE 'UTC'",
        days,
    )
    return start


@dataclass(frozen=True, slots=True)
class ProjectCount:
    org: str
    project: str
    deployments: int


@dataclass(frozen=True, slots=True)
class OrgCount:
    org: str
    deployments: int


@dataclass(frozen=True, slots=True)
class DayCount:
    day: date
    deployments: int


_PER_PROJECT = (
    "SELECT p.org, p.name AS project, count(*) AS deployments"
    " FROM deployments d JOIN projects p ON p.id = d.project_id"
    " WHERE d.created_at >= $1 GROUP BY p.org, p.name"
    " ORDER BY deployments DESC, p.org, p.name"
)


async def deployments_per_project(db: Executor, since: datetime) -> list[ProjectCount]:
    """Projects that deployed in the window, busiest first."""
    return await fetch_all(db, ProjectCount, _PER_PROJECT, since)


_PER_ORG = (
    "SELECT p.org, count(*) AS deployments"
    " FROM deployments d JOIN projects p ON p.id = d.project_id"
    " WHERE d.created_at >= $1 GROUP BY p.org ORDER BY deployments DESC, p.org"
)


async def deployments_per_org(db: Executor, since: datetime) -> list[OrgCount]:
    """Orgs that deployed in the window, busiest first."""
    return await fetch_all(db, OrgCount, _PER_ORG, since)


# UTC days are 24 hours, whatever the session's time zone.
_PER_DAY = (
    "SELECT (g.day AT TIME ZONE 'UTC')::date AS day, count(d.id) AS deployments"
    " FROM generate_series($1::timestamptz, now(), interval '24 hours') AS g(day)"
    " LEFT JOIN deployments d ON d.created_at >= g.day"
    " AND d.created_at < g.day + interval '24 hours'"
    " GROUP BY g.day ORDER BY g.day"
)


async def deployments_per_day(db: Executor, since: datetime) -> list[DayCount]:
    """Every UTC day of the window, oldest first, with its deployments (zero included)."""
    return await fetch_all(db, DayCount, _PER_DAY, since)


@dataclass(frozen=True, slots=True)
class Duration:
    """Seconds from creation to healthy of the deployments that got healthy; ``org`` and
    ``project`` are None in the row of all projects."""

    org: str | None
    project: str | None
    deployments: int
    avg_seconds: float | None
    p50_seconds: float | None
    p95_seconds: float | None
    min_seconds: float | None
    max_seconds: float | None


_DURATIONS = (
    "WITH t AS (SELECT p.org, p.name,"
    "   extract(epoch FROM d.healthy_at - d.created_at)::float8 AS seconds"
    "   FROM deployments d JOIN projects p ON p.id = d.project_id"
    "   WHERE d.healthy_at IS NOT NULL AND d.created_at >= $1)"
    " SELECT org, name AS project, count(*) AS deployments, avg(seconds) AS avg_seconds,"
    " percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) AS p50_seconds,"
    " percentile_cont(0.95) WITHIN GROUP (ORDER BY seconds) AS p95_seconds,"
    " min(seconds) AS min_seconds, max(seconds) AS max_seconds"
    " FROM t GROUP BY GROUPING SETS ((org, name), ())"
    " ORDER BY GROUPING(org, name), org, name"
)


async def durations(db: Executor, since: datetime) -> list[Duration]:
    """Per project (by name), then the row of all of them (its times null when none got
    healthy)."""
    return await fetch_all(db, Duration, _DURATIONS, since)


@dataclass(frozen=True, slots=True)
class Outcomes:
    """Deployments created in the window and how they ended; ``org`` and ``project`` are
    None in the row of all projects."""

    org: str | None
    project: str | None
    deployments: int
    finished: int
    succeeded: int
    failed: int


_OUTCOMES = (
    "SELECT p.org, p.name AS project, count(*) AS deployments,"
    " count(*) FILTER (WHERE d.status IN"
    "   ('healthy', 'active', 'draining', 'inactive', 'failed')) AS finished,"
    " count(*) FILTER (WHERE d.status IN ('healthy', 'active', 'draining', 'inactive'))"
    "   AS succeeded,"
    " count(*) FILTER (WHERE d.status = 'failed') AS failed"
    " FROM deployments d JOIN projects p ON p.id = d.project_id"
    " WHERE d.created_at >= $1 GROUP BY GROUPING SETS ((p.org, p.name), ())"
    " ORDER BY GROUPING(p.org, p.name), p.org, p.name"
)


async def outcomes(db: Executor, since: datetime) -> list[Outcomes]:
    """Per project (by name), then the row of all of them (zeros without deployments)."""
    return await fetch_all(db, Outcomes, _OUTCOMES, since)


@dataclass(frozen=True, slots=True)
class OrgResources:
    """An org's projects and live instances (not stopped or failed), and the vCPU and memory
    those reserve (their project's resources each); ``org`` is None in the total row."""

    org: str | None
    projects: int
    instances: int
    instances_running: int
    vcpu: Decimal
    memory_mb: int


async def resources_by_org(db: Executor) -> list[OrgResources]:
    """Per org with projects (by name), then the total row (zeros without projects)."""
    return await fetch_all(
        db,
        OrgResources,
        "SELECT p.org, count(DISTINCT p.id) AS projects, count(i.id) AS instances,"
        " count(i.id) FILTER (WHERE i.state = 'running') AS instances_running,"
        " coalesce(sum(p.vcpu) FILTER (WHERE i.id IS NOT NULL), 0) AS vcpu,"
        " coalesce(sum(p.memory_mb) FILTER (WHERE i.id IS NOT NULL), 0)::bigint AS memory_mb"
        " FROM projects p"
        " LEFT JOIN deployments d ON d.project_id = p.id"
        " LEFT JOIN instances i ON i.deployment_id = d.id"
        " AND i.state NOT IN ('stopped', 'failed')"
        " GROUP BY GROUPING SETS ((p.org), ()) ORDER BY GROUPING(p.org), p.org",
    )


@dataclass(frozen=True, slots=True)
class PlatformGauges:
    """What the operator's metrics report of the platform's state at a scrape."""

    deployments: dict[str, int]
    instances: dict[str, int]
    nodes: dict[str, int]
    # Of the deployments finished (became healthy, or failed) in the last day; None: none.
    success_ratio: float | None
    # Creation to healthy, of the deployments that became healthy in the last day.
    duration_p50: float | None
    duration_p95: float | None


async def platform_gauges(db: Executor) -> PlatformGauges:
    with translated():
        deployments = await db.fetch("SELECT status, count(*) AS n FROM deployments GROUP BY 1")
        instances = await db.fetch("SELECT state, count(*) AS n FROM instances GROUP BY 1")
        nodes = await db.fetch("SELECT state, count(*) AS n FROM nodes GROUP BY 1")
        day = await db.fetchrow(
            "SELECT count(*) FILTER (WHERE healthy_at IS NOT NULL) AS succeeded,"
            " count(*) FILTER (WHERE failed_at IS NOT NULL AND healthy_at IS NULL) AS failed,"
            " percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM"
            "   healthy_at - created_at)) AS p50,"
            " percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM"
            "   healthy_at - created_at)) AS p95"
            " FROM deployments WHERE coalesce(healthy_at, failed_at) > now() - interval '1 day'"
        )
    assert day is not None
    finished = day["succeeded"] + day["failed"]
    return PlatformGauges(
        deployments={r["status"]: r["n"] for r in deployments},
        instances={r["state"]: r["n"] for r in instances},
        nodes={r["state"]: r["n"] for r in nodes},
        success_ratio=day["succeeded"] / finished if finished else None,
        duration_p50=None if day["p50"] is None else float(day["p50"]),
        duration_p95=None if day["p95"] is None else float(day["p95"]),
    )
