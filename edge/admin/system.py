"""``/health``, ``/metrics`` and the OpenAPI document."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any, Literal

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge.admin.api import Api, Call, Out, Reply, openapi
from edge.store import analytics, deployments, instances, nodes
from edge.store.errors import StoreError

api = Api()
log = logging.getLogger("edge.admin")

# A database that takes longer than this to answer SELECT 1 counts as down for /health.
DATABASE_CHECK_TIMEOUT = 2.0


class DatabaseHealth(Out):
    status: Literal["up", "down", "none"]
    latency_ms: float | None
    error: str | None = None


class RoutingHealth(Out):
    table_age_seconds: float | None


class Health(Out):
    status: Literal["ok", "degraded", "down"]
    version: str
    region: str
    database: DatabaseHealth
    routing: RoutingHealth
    leader: bool


async def check_database(call: Call) -> DatabaseHealth:
    pool = call.ctx.pool
    metrics = call.ctx.metrics
    if pool is None:
        return DatabaseHealth(status="none", latency_ms=None)
    started = time.perf_counter()
    try:
        await asyncio.wait_for(pool.fetchval("SELECT 1"), DATABASE_CHECK_TIMEOUT)
    except Exception as exc:  # any failure means down; /health must answer regardless
        metrics.postgres_up.set(0)
        reason = "no answer in time" if isinstance(exc, TimeoutError) else str(exc)
        return DatabaseHealth(status="down", latency_ms=None, error=reason or type(exc).__name__)
    latency = time.perf_counter() - started
    metrics.postgres_up.set(1)
    metrics.database_latency.set(latency)
    return DatabaseHealth(status="up", latency_ms=round(latency * 1000, 3))


@api.route(
    "GET",
    "/health",
    auth="none",
    summary="Health of this edge",
    tag="system",
    response=Health,
    answers=((503, Health),),
)
async def get_health(call: Call) -> Reply:
    database = await check_database(call)
    age = call.ctx.routing_age()
    leader = call.ctx.is_leader()
    call.ctx.metrics.leader.set(1 if leader else 0)
    if age is not None:
        call.ctx.metrics.routing_table_age.set(age)
    # Stale beats down: without the database the workers keep serving their last table, so
    # the edge is degraded, not down; down is no routing table at all.
    if age is None:
        status: Literal["ok", "degraded", "down"] = "down"
    elif database.status == "down":
        status = "degraded"
    else:
        status = "ok"
    health = Health(
        status=status,
        version=call.ctx.settings.version,
        region=call.ctx.settings.region,
        database=database,
        routing=RoutingHealth(table_age_seconds=None if age is None else round(age, 3)),
        leader=leader,
    )
    return Reply(health, status=503 if status == "down" else 200)


@api.route(
    "GET",
    "/metrics",
    auth="none",
    summary="Prometheus metrics",
    tag="system",
    content_type=CONTENT_TYPE_LATEST,
)
async def get_metrics(call: Call) -> bytes:
    database = await check_database(call)
    if database.status == "up":
        await _platform_gauges(call)
    age = call.ctx.routing_age()
    # No table at all is the stalest there is (+Inf, so that a staleness alert fires).
    call.ctx.metrics.routing_table_age.set(float("inf") if age is None else age)
    call.ctx.metrics.leader.set(1 if call.ctx.is_leader() else 0)
    return generate_latest(call.ctx.metrics.registry)


async def _platform_gauges(call: Call) -> None:
    """The operator's view of the platform, read at each scrape (a failure here must not
    cost the scrape: the edge's own figures still matter most when the database is sick)."""
    metrics = call.ctx.metrics
    if not call.ctx.is_leader():
        # Platform-wide figures come from the leader only, so that an alert on them fires
        # once, not once per edge.
        for family in (metrics.deployments, metrics.instances, metrics.nodes):
            family.clear()
        metrics.deployment_duration.clear()
        metrics.deployment_success.set(float("nan"))
        return
    try:
        gauges = await analytics.platform_gauges(call.ctx.pool)
    except StoreError as exc:
        log.warning("metrics: platform gauges not read: %s", exc)
        return
    for status in deployments.STATUSES:
        metrics.deployments.labels(status).set(gauges.deployments.get(status, 0))
    for state in sorted(instances.INSTANCE_STATES):
        metrics.instances.labels(state).set(gauges.instances.get(state, 0))
    for state in sorted(nodes.NODE_STATES):
        metrics.nodes.labels(state).set(gauges.nodes.get(state, 0))
    # Nothing finished is no failure: the ratio alert must stay quiet on an idle platform.
    metrics.deployment_success.set(1.0 if gauges.success_ratio is None else gauges.success_ratio)
    for quantile, value in (("0.5", gauges.duration_p50), ("0.95", gauges.duration_p95)):
        if value is not None:
            metrics.deployment_duration.labels(quantile).set(value)
        else:  # no deployment became healthy in the last day: no figure, rather than 0 s
            with contextlib.suppress(KeyError):
                metrics.deployment_duration.remove(quantile)


@functools.cache
def _document(version: str) -> bytes:
    import json  # noqa: PLC0415

    from edge.admin.app import build_api  # noqa: PLC0415

    return json.dumps(openapi(build_api(), version=version)).encode()


class OpenApiDocument(Out):
    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]


@api.route(
    "GET",
    "/api/v1/openapi.json",
    auth="admin",
    summary="This API's OpenAPI document",
    tag="system",
    response=OpenApiDocument,
)
async def get_openapi(call: Call) -> bytes:
    return _document(call.ctx.settings.version)
