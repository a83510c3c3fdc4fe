"""The leader's periodic DNS check of verified custom domains.

A domain stays verified once verified (its route and certificate do not flap with a DNS
hiccup), but every ``interval`` the leader looks it up again, the same way
``POST .../domains/{domain}/verify`` does, and records what it found (``last_checked_at``,
``pointing_at_edge``, ``last_check_ok``). A domain whose DNS no longer leads to the edge --
neither the CNAME to the edge host nor the TXT token -- is logged once as a warning, counted
in ``zeitwork_domains_not_pointing``, and shows ``dns_ok: false`` in the API. Recording a
check does not reload the edges' routing tables (migration 0006).

At most ``batch`` domains per pass, the longest unchecked first, looked up a few at a time:
a platform with many domains spreads its checks over the interval.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from prometheus_client import CollectorRegistry, Counter, Gauge

from edge import dns
from edge.leader import Leadership, cancel_task
from edge.store import domains
from edge.store.errors import TRANSLATED, StoreError, translate, translated

log = logging.getLogger("edge.domains")

_FAILURES: tuple[type[BaseException], ...] = (StoreError, *TRANSLATED)
_DUE = (
    "SELECT id, name, verification_token FROM domains WHERE verified_at IS NOT NULL"
    " AND (last_checked_at IS NULL OR last_checked_at < now() - make_interval(secs => $1))"
    " ORDER BY last_checked_at NULLS FIRST, name LIMIT $2"
)
_NOT_POINTING = (
    "SELECT count(*) FROM domains WHERE verified_at IS NOT NULL AND last_check_ok = false"
)


class DomainChecker:
    def __init__(
        self,
        pool: Any,
        leader: Leadership,
        edge_host: str,
        *,
        nameservers: Sequence[str] = (),
        interval: float = 3600.0,
        batch: int = 200,
        parallel: int = 10,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.pool = pool
        self.leader = leader
        self.edge_host = edge_host
        self.nameservers = tuple(nameservers)
        self.interval = interval
        self.batch = batch
        self.parallel = parallel
        self._task: asyncio.Task[None] | None = None
        self._lost: set[UUID] = set()
        registry = registry or CollectorRegistry()
        self.checks = Counter(
            "zeitwork_domain_checks_total",
            "Periodic DNS checks of verified domains by result (pointing, lost).",
            ["result"],
            registry=registry,
        )
        self.not_pointing = Gauge(
            "zeitwork_domains_not_pointing",
            "Verified domains whose last DNS check did not lead to the edge.",
            registry=registry,
        )

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="domain-checks")

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None

    async def _run(self) -> None:
        # A pass every tenth of the interval: each domain is looked at about once an interval.
        period = max(1.0, self.interval / 10)
        while True:
            if self.leader.is_leader:
                try:
                    await self.run_once()
                except _FAILURES as exc:
                    log.error("domain checks failed: %s", translate(exc))
                await asyncio.sleep(period)
            else:
                await asyncio.sleep(min(period, 2.0))  # it may take over the lock any moment

    async def run_once(self) -> int:
        """Check the domains that are due; how many were checked."""
        with translated():
            due = await self.pool.fetch(_DUE, self.interval, self.batch)
        limit = asyncio.Semaphore(self.parallel)

        async def one(row: Any) -> None:
            async with limit:
                await self._check(row["id"], row["name"], row["verification_token"])

        await asyncio.gather(*(one(row) for row in due))
        with translated():
            self.not_pointing.set(await self.pool.fetchval(_NOT_POINTING))
        return len(due)

    async def _check(self, domain_id: UUID, name: str, token: str) -> None:
        check = await dns.check_domain(name, token, self.edge_host, nameservers=self.nameservers)
        # Still leading to the edge by either record (a domain verified by TXT, an apex, has
        # no CNAME to compare).
        pointing = check.verified
        await domains.record_check(
            self.pool, domain_id, verified=check.verified, pointing=check.pointing
        )
        self.checks.labels("pointing" if pointing else "lost").inc()
        if pointing:
            if domain_id in self._lost:
                self._lost.discard(domain_id)
                log.info("domain %s leads to the edge again", name)
            return
        if domain_id not in self._lost:
            self._lost.add(domain_id)
            log.warning(
                "domain %s no longer leads to the edge: CNAME %s, TXT %s %s",
                name,
                check.cname or check.cname_error,
                dns.txt_name(name),
                "missing the token" if not check.txt_error else check.txt_error,
            )
