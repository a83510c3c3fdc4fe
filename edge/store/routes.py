"""The routing table compiled from the platform's state: the only SQL the edge's data plane runs.

Two kinds of host, as ``DESIGN.md`` has them:

- each deployment's own ``<project>-<nanoid>-<org>.<apps domain>``, served by that
  deployment's instances;
- each verified custom domain, served by its environment's *current* deployment.

A host lists only instances that are running, healthy and have an address. A host with no
such instance is still routed (the proxy answers 503: the app exists but is down) while its
deployment is meant to serve (healthy, active or draining) or, for a domain, while its
environment has a current deployment; otherwise it is absent (404).

One statement, one round trip, flat rows: Postgres does the joins with its indexes, Python
only groups rows by host, which keeps 100,000 hosts well under a second. A second, small one
reads the live ACME challenges, which the edge answers on plain HTTP from the table.

The certificates the HTTPS listener serves are read here too (:func:`load_certificate_versions`
and :func:`load_certificates`), on their own notifications, not with every table.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Protocol

from edge.routing import Address, ProjectLimit, RoutingTable
from edge.store.errors import translated

# Deployment statuses whose URL answers even with no instance ready (503 instead of 404).
SERVING_STATUSES = ("healthy", "active", "draining")

# $1: the apps domain. ``kind`` 0 is a deployment host, 1 a custom domain: a deployment host
# wins over a custom domain of the same name (the admin API should never allow one).
ROUTES_QUERY = """
SELECT 0 AS kind,
       p.name || '-' || d.nanoid || '-' || p.org || '.' || $1 AS host,
       i.address, i.port, i.region, p.id::text AS project, p.rate_limit_rps, p.rate_limit_burst,
       p.hsts_max_age
FROM deployments d
JOIN projects p ON p.id = d.project_id
LEFT JOIN instances i
       ON i.deployment_id = d.id
      AND i.state = 'running' AND i.healthy
      AND i.address IS NOT NULL AND i.port IS NOT NULL
WHERE i.id IS NOT NULL OR d.status IN ('healthy', 'active', 'draining')
UNION ALL
SELECT 1 AS kind, dom.name AS host, i.address, i.port, i.region,
       p.id::text AS project, p.rate_limit_rps, p.rate_limit_burst, p.hsts_max_age
FROM domains dom
JOIN environments e ON e.id = dom.environment_id
JOIN projects p ON p.id = dom.project_id
LEFT JOIN instances i
       ON i.deployment_id = e.current_deployment_id
      AND i.state = 'running' AND i.healthy
      AND i.address IS NOT NULL AND i.port IS NOT NULL
WHERE dom.verified_at IS NOT NULL AND e.current_deployment_id IS NOT NULL
"""

CHALLENGES_QUERY = """
SELECT token, key_authorization, extract(epoch FROM expires_at)::float8 AS expires
FROM acme_challenges WHERE expires_at > now()
"""

# A version per certificate row: a reload fetches the PEM of changed rows only.
CERTIFICATE_VERSIONS_QUERY = """
SELECT domain, md5(cert_pem || encode(key_encrypted, 'hex')) AS version FROM certificates
"""

CERTIFICATES_QUERY = """
SELECT domain, cert_pem, key_encrypted, md5(cert_pem || encode(key_encrypted, 'hex')) AS version
FROM certificates WHERE domain = ANY($1::text[])
"""


class Fetcher(Protocol):
    """What :func:`load_routes` needs of an asyncpg connection or pool."""

    async def fetch(
        self,
        query: str,
        *args: object,
        timeout: float | None = None,  # noqa: ASYNC109 (asyncpg's own signature)
    ) -> Sequence[Any]: ...


async def load_routes(
    conn: Fetcher,
    apps_domain: str,
    *,
    source: str = "postgresql",
    query_timeout: float | None = None,
) -> RoutingTable:
    """Compile the routing table in one query on ``conn`` (a connection or a pool).

    Raises :class:`~edge.store.errors.DatabaseUnavailable` when the connection fails or the
    query outlives ``query_timeout``, another :class:`~edge.store.errors.StoreError` on any
    other database error; the caller keeps its current table either way.
    """
    with translated():
        rows = await conn.fetch(ROUTES_QUERY, apps_domain, timeout=query_timeout)
        challenges = await conn.fetch(CHALLENGES_QUERY, timeout=query_timeout)
    # The compile allocates a few objects per row and makes no reference cycles: the cyclic
    # collector would only rescan the growing table again and again (it doubled the time for
    # 100,000 hosts). Paused only around code with no await, so nothing else runs meanwhile.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        table = _compile(rows, source)
    finally:
        if was_enabled:
            gc.enable()
    live = {token: (key, expires) for token, key, expires in challenges}
    return replace(table, challenges=live)


async def load_certificate_versions(
    conn: Fetcher, *, query_timeout: float | None = None
) -> dict[str, str]:
    """domain -> a hash of its certificate and key, for every row of ``certificates``."""
    with translated():
        rows = await conn.fetch(CERTIFICATE_VERSIONS_QUERY, timeout=query_timeout)
    return {domain: version for domain, version in rows}


async def load_certificates(
    conn: Fetcher, domains: Sequence[str], *, query_timeout: float | None = None
) -> list[tuple[str, str, bytes, str]]:
    """(domain, cert_pem, key_encrypted, version) of the given domains' certificates."""
    with translated():
        rows = await conn.fetch(CERTIFICATES_QUERY, list(domains), timeout=query_timeout)
    return [(r[0], r[1], bytes(r[2]), r[3]) for r in rows]


def _compile(rows: Sequence[Any], source: str) -> RoutingTable:
    hosts: dict[str, list[Address]] = {}
    domains: dict[str, list[Address]] = {}
    regions: dict[Address, str] = {}
    # Only hosts of projects with a rate limit have an entry (most have none).
    limits: dict[str, ProjectLimit] = {}
    hsts: dict[str, int] = {}
    # One Address object per distinct instance, however many hosts it serves: the table stays
    # small, and equal addresses are identical objects, which makes the duplicate check below
    # an identity check instead of hashing dataclasses (this loop runs once per row).
    interned: dict[tuple[str, int], Address] = {}
    for kind, host, address, port, region, project, rps, burst, hsts_max_age in rows:
        into = domains if kind else hosts
        addresses = into.get(host)
        if addresses is None:
            addresses = into[host] = []
            if not kind or host not in hosts:
                if rps is not None:
                    limits[host] = ProjectLimit(project, rps, burst or max(1, rps))
                if hsts_max_age is not None:
                    hsts[host] = hsts_max_age
        if address is None:
            continue  # the LEFT JOIN found no ready instance: the host answers 503
        key = (address, port)
        instance = interned.get(key)
        if instance is None:
            instance = interned[key] = Address(address, port)
            regions[instance] = region
        addresses.append(instance)
    for host, addresses in domains.items():
        hosts.setdefault(host, addresses)
    routes = {host: _distinct(addresses) for host, addresses in hosts.items()}
    return RoutingTable(routes, source=source, regions=regions, limits=limits, hsts=hsts)


def _distinct(addresses: list[Address]) -> tuple[Address, ...]:
    """The addresses in order, each once (two instance rows may claim one address:port)."""
    if len(addresses) < 2 or len({id(a) for a in addresses}) == len(addresses):
        return tuple(addresses)
    return tuple({id(a): a for a in addresses}.values())
