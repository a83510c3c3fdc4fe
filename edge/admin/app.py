"""The admin application: its shared context, the assembled routes, and the server.

:class:`AdminContext` holds what handlers share (the database pool, the authenticator, the
settings, the sources of /health, the metrics registry). :func:`build_api` gathers the
routes of every area module; :class:`AdminServer` serves them on the admin port.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge import __version__
from edge.admin.api import Api, Route, dispatch
from edge.admin.auth import Authenticator, Principal
from edge.admin.http import HttpServer, Request, Response, ServerLimits
from edge.ratelimit import Limiter
from edge.store import audit
from edge.store.errors import StoreError

log = logging.getLogger("edge.admin")

DEFAULT_IMAGE_TEMPLATE = "ghcr.io/{org}/{repo}:sha-{sha}"


@dataclass(frozen=True, slots=True)
class AdminSettings:
    apps_domain: str = "zeitwork.app"
    # The host customers' domains point at with a CNAME.
    edge_host: str = "edge.zeitwork.com"
    # Nameservers for domain verification (empty: the system's).
    nameservers: tuple[str, ...] = ()
    # Image of a deployment made from a GitHub push, unless the project has its own template.
    image_template: str = DEFAULT_IMAGE_TEMPLATE
    region: str = ""
    version: str = __version__


class AdminMetrics:
    """The admin process's own metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "zeitwork_admin_requests_total",
            "Admin API requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "zeitwork_admin_request_duration_seconds",
            "Admin API request latency by route template.",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=self.registry,
        )
        self.postgres_up = Gauge(
            "postgres_up", "Whether the last database check succeeded.", registry=self.registry
        )
        self.database_latency = Gauge(
            "zeitwork_database_latency_seconds",
            "Round trip of the last database check.",
            registry=self.registry,
        )
        self.routing_table_age = Gauge(
            "zeitwork_routing_table_age_seconds",
            "Age of the oldest routing table among the edge's workers.",
            registry=self.registry,
        )
        self.leader = Gauge(
            "zeitwork_leader", "1 while this edge holds the leader lock.", registry=self.registry
        )
        self.deployments = Gauge(
            "zeitwork_deployments", "Deployments by status.", ["status"], registry=self.registry
        )
        self.instances = Gauge(
            "zeitwork_instances", "Instances by state.", ["state"], registry=self.registry
        )
        self.nodes = Gauge("zeitwork_nodes", "Nodes by state.", ["state"], registry=self.registry)
        self.deployment_success = Gauge(
            "zeitwork_deployment_success_ratio",
            "Share of the deployments finished in the last day that became healthy"
            " (1 when none finished; NaN on an edge that is not the leader).",
            registry=self.registry,
        )
        self.deployment_duration = Gauge(
            "zeitwork_deployment_duration_seconds",
            "Creation to healthy of the deployments that became healthy in the last day.",
            ["quantile"],
            registry=self.registry,
        )
        info = Gauge(
            "zeitwork_build_info",
            "Version of the running edge.",
            ["version"],
            registry=self.registry,
        )
        info.labels(__version__).set(1)


def _no_age() -> float | None:
    return None


def _not_leader() -> bool:
    return False


@dataclass
class AdminContext:
    pool: Any
    auth: Authenticator
    settings: AdminSettings = field(default_factory=AdminSettings)
    # Age in seconds of the oldest worker routing table (None: no worker has one yet).
    routing_age: Callable[[], float | None] = _no_age
    is_leader: Callable[[], bool] = _not_leader
    metrics: AdminMetrics = field(default_factory=AdminMetrics)
    # More metrics in the same scrape (the proxy workers' counts).
    collectors: tuple[Any, ...] = ()
    # Requests per token (None: not limited).
    limiter: Limiter | None = None

    def __post_init__(self) -> None:
        for collector in self.collectors:
            self.metrics.registry.register(collector)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.metrics.requests.labels(route, method, str(status)).inc()
        self.metrics.duration.labels(route).observe(seconds)

    async def audit(self, principal: Principal, route: Route, request: Request) -> None:
        """Record an operator's change; a failure to record is logged, not the caller's."""
        try:
            await audit.record(
                self.pool,
                principal.name,
                f"{route.method} {route.path}",
                request.raw_path,
                {"client": request.client},
            )
        except StoreError as exc:
            log.error(
                "admin API: could not record %s %s in the audit log: %s",
                request.method,
                request.raw_path,
                exc,
            )


def build_api() -> Api:
    """Every route of the admin API."""
    # Imported here: each area module registers its routes on its own Api at import.
    from edge.admin import (  # noqa: PLC0415
        agents,
        analytics,
        deployments,
        domains,
        github,
        nodes,
        projects,
        regions,
        system,
    )

    api = Api()
    for area in (system, regions, nodes, agents, projects, deployments, domains, github, analytics):
        api.include(area.api)
    return api


class AdminServer:
    """The admin API on its port."""

    def __init__(
        self, ctx: AdminContext, limits: ServerLimits | None = None, api: Api | None = None
    ) -> None:
        self.ctx = ctx
        self.api = api or build_api()
        self._http = HttpServer(self._serve, limits)

    async def _serve(self, request: Request) -> Response:
        return await dispatch(self.api, self.ctx, request)

    @property
    def port(self) -> int:
        return self._http.port

    async def start(self, host: str, port: int) -> None:
        await self._http.start(host, port)

    async def close(self) -> None:
        await self._http.close()
