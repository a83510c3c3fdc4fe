"""The embedded scheduler: the leader edge's loop around :mod:`scheduler.reconciler`.

Every edge's master runs a :class:`SchedulerLoop`; it only works while its edge holds the
leader lock (:mod:`edge.leader`). A pass loads a snapshot, plans, and applies the plan in one
transaction fenced by the lock (:mod:`edge.store.scheduling`). Passes run on every database
notification that can matter (``zeitwork_routes``: deployments, instances, environments;
``zeitwork_scheduler``: nodes added, removed or changing state), debounced, and on a periodic
tick (``interval``) that catches the timeouts (heartbeats, start, rollback window). A pass
that finds the state changed under it runs again at once; a database failure is logged (at
most every 30 s) and retried on the next tick. Nothing is kept between passes but log
throttling, so a new leader picks up where the old one stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Callable
from typing import Any
from uuid import UUID

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge.leader import FencedLeadership, Notifications, cancel_task
from edge.ratelimit import LogThrottle
from edge.store.errors import TRANSLATED, Conflict, StoreError, translate
from edge.store.scheduling import apply_plan, load_snapshot
from scheduler.reconciler import (
    Action,
    MarkNodeDown,
    MarkNodeDrained,
    PlaceInstance,
    Plan,
    Settings,
    Snapshot,
    StopInstance,
    Transition,
    plan,
)

log = logging.getLogger("edge.scheduler")

CHANNELS = ("zeitwork_routes", "zeitwork_scheduler")
_FAILURES: tuple[type[BaseException], ...] = (StoreError, *TRANSLATED)
_ERROR_LOG_INTERVAL = 30.0


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.passes = Counter(
            "zeitwork_scheduler_passes_total",
            "Scheduler passes on this edge by result (ok, conflict: the state changed under "
            "it and it ran again, error: the database failed).",
            ["result"],
            registry=registry,
        )
        self.actions = Counter(
            "zeitwork_scheduler_actions_total",
            "Changes the scheduler made, by kind.",
            ["action"],
            registry=registry,
        )
        self.duration = Histogram(
            "zeitwork_scheduler_pass_duration_seconds",
            "Duration of a scheduler pass (snapshot, plan, apply).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self.waiting = Gauge(
            "zeitwork_scheduler_waiting_deployments",
            "Deployments the last pass could not move on (placement shortfall, backoff).",
            registry=registry,
        )


class SchedulerLoop:
    def __init__(
        self,
        pool: Any,
        dsn: str,
        leader: FencedLeadership,
        settings: Settings,
        *,
        interval: float = 1.0,
        debounce: float = 0.05,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pool = pool
        self.dsn = dsn
        self.leader = leader
        self.settings = settings
        self.interval = interval
        self.debounce = debounce
        self.metrics = SchedulerMetrics(registry) if registry is not None else None
        self._clock = clock
        self._wake = asyncio.Event()
        self._notifications = Notifications(dsn, CHANNELS, self._wake)
        self._task: asyncio.Task[None] | None = None
        self._waiting: dict[UUID, str] = {}
        self._errors = LogThrottle(_ERROR_LOG_INTERVAL)
        self._was_leader = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    async def stop(self) -> None:
        await cancel_task(self._task)
        self._task = None
        await self._notifications.drop()

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            if self.leader.is_leader:
                if not self._was_leader:
                    log.info("scheduler running on this edge (the leader)")
                    self._was_leader = True
                await self._listen()
                await asyncio.sleep(self.debounce)  # let a burst of notifications settle
                self._wake.clear()
                await self.run_pass()
            else:
                if self._was_leader:
                    log.info("scheduler stopped: this edge is no longer the leader")
                    self._was_leader = False
                    self._waiting.clear()
                await self._notifications.drop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)

    async def _listen(self) -> None:
        try:
            await self._notifications.listen()
        except _FAILURES as exc:
            self._error(f"cannot listen for changes (ticks go on): {translate(exc)}")

    def _error(self, message: str) -> None:
        if self._errors.allow(self._clock()) is not None:
            log.error("scheduler: %s", message)

    async def run_pass(self) -> Plan | None:
        """One pass now, if this edge leads: the plan applied (None: not leader, a conflict or
        a database failure)."""
        fence = self.leader.fence
        if fence is None:
            return None
        started = self._clock()
        try:
            async with self.pool.acquire() as conn:
                snapshot = await load_snapshot(conn)
                # In a thread: a big plan (hundreds of deployments to place) takes a second of
                # CPU, which would stall the admin API and the leader lock's checks.
                result = await asyncio.to_thread(plan, snapshot, self.settings)
                if result.actions:
                    await apply_plan(conn, result.actions, self.settings, fence=fence)
        except Conflict as exc:
            # Someone else (an operator, an agent) changed what the plan was built on.
            log.debug("scheduler: the state changed during the pass (%s); again", exc)
            self._count("conflict")
            self._wake.set()
            return None
        except _FAILURES as exc:
            self._error(f"pass failed: {translate(exc)}")
            self._count("error")
            return None
        self._count("ok")
        if self.metrics is not None:
            self.metrics.duration.observe(self._clock() - started)
            for kind, count in Tally(type(a).__name__ for a in result.actions).items():
                self.metrics.actions.labels(kind).inc(count)
            self.metrics.waiting.set(len(result.waiting))
        self._report(snapshot, result)
        return result

    def _count(self, result: str) -> None:
        if self.metrics is not None:
            self.metrics.passes.labels(result).inc()

    def _report(self, snapshot: Snapshot, result: Plan) -> None:
        names = {d.id: d.name for d in snapshot.deployments}
        for action in result.actions:
            _log_action(action)
        _log_grouped(result.actions, names)
        for deployment, reason in result.waiting.items():
            if self._waiting.get(deployment) != reason:
                log.info("deployment %s waits: %s", names.get(deployment, deployment), reason)
        self._waiting = dict(result.waiting)


def _log_action(action: Action) -> None:
    if isinstance(action, Transition):
        level = logging.WARNING if action.target == "failed" else logging.INFO
        detail = f": {action.reason}" if action.reason else ""
        log.log(
            level, "deployment %s: %s -> %s%s", action.name, action.source, action.target, detail
        )
    elif isinstance(action, MarkNodeDown):
        log.warning("node %s is down: %s", action.hostname, action.reason)
    elif isinstance(action, MarkNodeDrained):
        log.info("node %s is drained", action.hostname)


def _log_grouped(actions: list[Action], names: dict[UUID, str]) -> None:
    """Placements and stops, one line per deployment."""
    placed: dict[UUID, list[str]] = defaultdict(list)
    stopped: dict[tuple[UUID, str], int] = defaultdict(int)
    for action in actions:
        if isinstance(action, PlaceInstance):
            placed[action.deployment_id].append(f"{action.hostname} ({action.region})")
        elif isinstance(action, StopInstance):
            stopped[action.deployment_id, action.message] += 1
    for deployment, where in placed.items():
        log.info(
            "deployment %s: %d instance(s) placed on %s",
            names.get(deployment, deployment),
            len(where),
            ", ".join(where),
        )
    for (deployment, message), count in stopped.items():
        log.info(
            "deployment %s: stopping %d instance(s): %s",
            names.get(deployment, deployment),
            count,
            message,
        )
