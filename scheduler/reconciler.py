"""The scheduler's decisions, sans-IO: a snapshot of the platform in, a plan of changes out.

The edge's leader loads a :class:`Snapshot` (nodes, the deployments still in the lifecycle,
their instances, the environments' current and previous deployments, with every age measured
on the database's clock), calls :func:`plan` and applies the :class:`Plan` in one transaction
whose guards (the status a deployment is expected to be in, the environment's expected current
deployment) make a concurrent change abort the whole plan; the next pass starts from the new
state. Passes are level-triggered: a plan depends only on the snapshot, so a lost pass, a
restart or a new leader changes nothing.

What one pass decides, in this order:

1. Nodes silent for longer than the heartbeat timeout are ``down``; instances on a down or
   removed node are stopped at once (no agent will confirm) and count as gone.
2. Each deployment still in the lifecycle, the serving ones first (``active``, ``draining``,
   ``healthy``), then the new ones, oldest request first:

   - ``pending`` becomes ``placing``.
   - ``placing``/``starting``: an instance that failed since placement began fails the
     deployment at once; so does the start timeout (counted from placement), with the reason.
   - Placement: ``instances_per_region`` instances in each target region (while placing: every
     region with a ready node; from ``starting`` on: the regions recorded then) that do not sit
     on a draining node; the missing ones are placed with :func:`scheduler.placement.place`.
     Replacing a failed instance of a running deployment backs off (1 s doubling to 60 s by the
     failures of the last ten minutes), so a crashing app does not flood its nodes.
   - A draining node's instance stops once its region has ``instances_per_region`` running,
     healthy instances elsewhere.
   - ``placing`` with everything placed becomes ``starting``; ``starting`` with every instance
     running and healthy becomes ``healthy``; ``healthy`` becomes ``active`` (its environment's
     current; the former current one becomes ``draining``) unless a deployment of the
     environment requested later is current already, in which case it is superseded
     (``inactive``).
   - ``draining`` becomes ``inactive`` when its rollback window is over or it is no longer its
     environment's previous deployment (nothing can roll back to it).
   - Leaving the lifecycle (``inactive``, ``failed``) stops every instance.
3. A draining node with no instance left (stopping ones included) is ``drained``.

Limits: a region that gains its first ready node later does not get instances of deployments
that are already running; the crash backoff is computed from the snapshot, which holds the
failures of the last ten minutes only.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Literal
from uuid import UUID

from scheduler import lifecycle, placement
from scheduler.lifecycle import Status

NodeState = Literal["ready", "draining", "drained", "down"]
InstanceState = Literal["pending", "starting", "running", "stopping", "stopped", "failed"]

# Instances that hold (or are about to hold) their node's resources.
HOLDING: frozenset[str] = frozenset({"pending", "starting", "running", "stopping"})
# Instances meant to run.
LIVE_INSTANCE: frozenset[str] = frozenset({"pending", "starting", "running"})
# How far back failed instances count for the replacement backoff (and are loaded).
FAILURE_MEMORY = 600.0

# Serving deployments first: they keep the traffic up; then the new ones, oldest first.
_ORDER: dict[str, int] = {
    "active": 0,
    "draining": 1,
    "healthy": 2,
    "starting": 3,
    "placing": 4,
    "pending": 5,
}


@dataclass(frozen=True, slots=True)
class Settings:
    """Timeouts in seconds."""

    start_timeout: float = 300.0
    rollback_window: float = 600.0
    heartbeat_timeout: float = 30.0
    backoff_max: float = 60.0

    def __post_init__(self) -> None:
        for name in ("start_timeout", "rollback_window", "heartbeat_timeout", "backoff_max"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, not {value!r}")


@dataclass(frozen=True, slots=True)
class NodeInfo:
    id: UUID
    hostname: str
    region: str
    state: NodeState
    vcpu: int
    memory_mb: int
    # Seconds since its last heartbeat (since registration when it never sent one).
    silent_for: float


@dataclass(frozen=True, slots=True)
class DeploymentInfo:
    id: UUID
    environment_id: UUID
    # ``org/project/nanoid``, for reasons and logs.
    name: str
    status: Status
    instances_per_region: int
    vcpu: Decimal
    memory_mb: int
    # When placement was last requested (placing_at, else created_at), then created_at: orders
    # the deployments of an environment, so the newest request wins the environment.
    requested_at: datetime
    created_at: datetime
    # Seconds since placement began (None before it did) and since draining began.
    placing_for: float | None = None
    draining_for: float | None = None
    # The regions it runs in, recorded when it left ``placing``.
    regions: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    id: UUID
    deployment_id: UUID
    node_id: UUID | None
    region: str
    state: InstanceState
    healthy: bool
    # Whether it has an address and a port (the routing table needs both).
    addressed: bool
    message: str | None
    # Seconds since its last change.
    since: float
    vcpu: Decimal
    memory_mb: int

    @property
    def serving(self) -> bool:
        return self.state == "running" and self.healthy and self.addressed


@dataclass(frozen=True, slots=True)
class EnvironmentInfo:
    id: UUID
    current: UUID | None
    previous: UUID | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    nodes: tuple[NodeInfo, ...] = ()
    # The deployments in a status of ``lifecycle.LIVE``.
    deployments: tuple[DeploymentInfo, ...] = ()
    # Every instance that holds a node (``HOLDING``), and those of the live deployments that
    # failed in the last ``FAILURE_MEMORY`` seconds.
    instances: tuple[InstanceInfo, ...] = ()
    # The environments of the live deployments.
    environments: tuple[EnvironmentInfo, ...] = ()


# -- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MarkNodeDown:
    node_id: UUID
    hostname: str
    reason: str


@dataclass(frozen=True, slots=True)
class MarkNodeDrained:
    node_id: UUID
    hostname: str


@dataclass(frozen=True, slots=True)
class Transition:
    """Move a deployment from ``source`` (it must still be there) to ``target``."""

    deployment_id: UUID
    name: str
    source: Status
    target: Status
    reason: str | None = None
    # Recorded on entering ``starting``: the regions it runs in.
    regions: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        lifecycle.check(self.source, self.target)


@dataclass(frozen=True, slots=True)
class SetCurrent:
    """Route the environment to ``deployment_id`` if its current one is still ``expected``;
    the former current one becomes its previous."""

    environment_id: UUID
    deployment_id: UUID
    expected: UUID | None


@dataclass(frozen=True, slots=True)
class PlaceInstance:
    deployment_id: UUID
    name: str
    region: str
    node_id: UUID
    hostname: str


@dataclass(frozen=True, slots=True)
class StopInstance:
    """Tell the instance's agent to stop it; ``at_once``: record it stopped now (its node is
    down or gone, no agent will confirm)."""

    instance_id: UUID
    deployment_id: UUID
    message: str
    at_once: bool = False


Action = MarkNodeDown | MarkNodeDrained | Transition | SetCurrent | PlaceInstance | StopInstance


@dataclass(slots=True)
class Plan:
    actions: list[Action] = field(default_factory=list)
    # Why a deployment did not move on in this pass (a placement shortfall, a backoff, ...).
    waiting: dict[UUID, str] = field(default_factory=dict)


# -- planning -----------------------------------------------------------------------------


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _seconds(value: float) -> str:
    return f"{value:g} s"


class _Pass:
    """The working state of one :func:`plan` call: what the snapshot says, updated with every
    decision made so far, so later decisions see earlier ones."""

    def __init__(self, snapshot: Snapshot, settings: Settings) -> None:
        self.settings = settings
        self.plan = Plan()
        self.nodes = {node.id: node for node in snapshot.nodes}
        self.node_state: dict[UUID, str] = {node.id: node.state for node in snapshot.nodes}
        self.deployments = {d.id: d for d in snapshot.deployments}
        self.status: dict[UUID, Status] = {d.id: d.status for d in snapshot.deployments}
        self.environments = {e.id: e for e in snapshot.environments}
        self.instances = {i.id: i for i in snapshot.instances}
        self.instance_state: dict[UUID, str] = {i.id: i.state for i in snapshot.instances}
        self.of_deployment: dict[UUID, list[InstanceInfo]] = defaultdict(list)
        for instance in snapshot.instances:
            self.of_deployment[instance.deployment_id].append(instance)
        # Use of each node in milli-vCPU and MiB, and replicas per deployment on it.
        self.used: dict[UUID, list[int]] = {node.id: [0, 0] for node in snapshot.nodes}
        self.replicas: dict[UUID, Counter[UUID]] = defaultdict(Counter)
        self._placement: dict[UUID, placement.Node] = {}
        for instance in snapshot.instances:
            if instance.state in HOLDING and instance.node_id in self.used:
                self._use(
                    instance.node_id, instance.deployment_id, instance.vcpu, instance.memory_mb
                )
        # The nodes as placement sees them, built when first needed and rebuilt only when
        # their use changes: a pass that places many deployments must not copy the fleet for
        # each one.
        self.by_region: dict[str, list[UUID]] = defaultdict(list)
        for node in snapshot.nodes:
            self.by_region[node.region].append(node.id)

    # -- bookkeeping

    def _use(
        self, node_id: UUID, deployment_id: UUID, vcpu: Decimal, memory_mb: int, sign: int = 1
    ) -> None:
        used = self.used[node_id]
        used[0] += sign * _millicpu(vcpu)
        used[1] += sign * memory_mb
        self.replicas[node_id][deployment_id] += sign
        self._placement.pop(node_id, None)

    def _release(self, instance: InstanceInfo) -> None:
        if instance.node_id in self.used:
            self._use(
                instance.node_id, instance.deployment_id, instance.vcpu, instance.memory_mb, -1
            )

    def emit(self, action: Action) -> None:
        self.plan.actions.append(action)

    def stop(self, instance: InstanceInfo, message: str, *, at_once: bool = False) -> None:
        state = self.instance_state[instance.id]
        if state not in LIVE_INSTANCE and not (at_once and state == "stopping"):
            return
        self.emit(StopInstance(instance.id, instance.deployment_id, message, at_once))
        self.instance_state[instance.id] = "stopped" if at_once else "stopping"
        if at_once:
            self._release(instance)

    def move(
        self,
        d: DeploymentInfo,
        target: Status,
        reason: str | None = None,
        regions: tuple[str, ...] | None = None,
    ) -> None:
        self.emit(Transition(d.id, d.name, self.status[d.id], target, reason, regions))
        self.status[d.id] = target

    def live(self, d: DeploymentInfo) -> list[InstanceInfo]:
        return [i for i in self.of_deployment[d.id] if self.instance_state[i.id] in LIVE_INSTANCE]

    def leaving(self, instance: InstanceInfo) -> bool:
        return instance.node_id is not None and self.node_state.get(instance.node_id) == "draining"

    def hostname(self, node_id: UUID | None) -> str:
        node = self.nodes.get(node_id) if node_id is not None else None
        return node.hostname if node is not None else "no node"

    # -- steps

    def nodes_down(self) -> None:
        timeout = self.settings.heartbeat_timeout
        for node in sorted(self.nodes.values(), key=lambda n: n.hostname):
            if node.state in ("ready", "draining") and node.silent_for > timeout:
                reason = f"no heartbeat for {node.silent_for:.0f} s (timeout {_seconds(timeout)})"
                self.emit(MarkNodeDown(node.id, node.hostname, reason))
                self.node_state[node.id] = "down"
        for instance in self.instances.values():
            if instance.state not in HOLDING:
                continue
            if instance.node_id is None or instance.node_id not in self.nodes:
                self.stop(instance, "its node was removed", at_once=True)
            elif self.node_state[instance.node_id] == "down":
                self.stop(instance, f"node {self.hostname(instance.node_id)} is down", at_once=True)

    def orphans(self) -> None:
        """Live instances of deployments that left the lifecycle (stopped on the way out, but a
        change made outside the scheduler can leave some)."""
        for instance in self.instances.values():
            if instance.deployment_id not in self.deployments:
                self.stop(instance, "its deployment is no longer running")

    def deployments_in_order(self) -> list[DeploymentInfo]:
        return sorted(
            self.deployments.values(),
            key=lambda d: (_ORDER[d.status], _order(d), str(d.id)),
        )

    def finish(self, d: DeploymentInfo, target: Status, reason: str) -> None:
        """Leave the lifecycle (``failed`` or ``inactive``) and stop every instance; what
        this pass placed for it is not placed after all."""
        placed = [
            a for a in self.plan.actions if isinstance(a, PlaceInstance) and a.deployment_id == d.id
        ]
        if placed:
            self.plan.actions = [a for a in self.plan.actions if a not in placed]
            for action in placed:
                self._use(action.node_id, d.id, d.vcpu, d.memory_mb, -1)
        self.move(d, target, reason)
        for instance in self.of_deployment[d.id]:
            self.stop(instance, f"deployment {target}: {reason}")

    def deployment(self, d: DeploymentInfo) -> None:
        if self.status[d.id] == "pending":
            self.move(d, "placing")
            d = _restarted(d)
        status = self.status[d.id]
        if status in ("placing", "starting") and self._failed_start(d):
            return
        regions = self._regions(d)
        complete = self._place(d, regions)
        if complete is None:
            return  # failed on timeout
        self._drain_replaced(d)
        if self.status[d.id] == "placing" and complete:
            self.move(d, "starting", regions=tuple(regions))
        if self.status[d.id] == "starting":
            self._check_healthy(d, regions)
        if self.status[d.id] == "healthy":
            self._activate(d)
        if self.status[d.id] == "draining":
            self._window(d)

    def _failed_start(self, d: DeploymentInfo) -> bool:
        started = d.placing_for if d.placing_for is not None else 0.0
        failed = [
            i
            for i in self.of_deployment[d.id]
            if self.instance_state[i.id] == "failed" and i.since <= started
        ]
        if not failed:
            return False
        first = failed[0]
        reason = (
            f"instance {first.id} on {self.hostname(first.node_id)} failed: "
            f"{first.message or 'no message'}"
        )
        if len(failed) > 1:
            reason += f" (and {_plural(len(failed) - 1, 'other instance')})"
        self.finish(d, "failed", reason)
        return True

    def _regions(self, d: DeploymentInfo) -> list[str]:
        if self.status[d.id] == "placing" or d.regions is None:
            ready = {
                node.region for node in self.nodes.values() if self.node_state[node.id] == "ready"
            }
            ready.update(i.region for i in self.live(d))
            return sorted(ready)
        return list(d.regions)

    def _timed_out(self, d: DeploymentInfo) -> bool:
        return d.placing_for is not None and d.placing_for > self.settings.start_timeout

    def _place(self, d: DeploymentInfo, regions: Sequence[str]) -> bool | None:
        """Place the missing instances; whether none is missing any more (None: the start
        timeout failed the deployment)."""
        status = self.status[d.id]
        placing = status == "placing"
        staying = Counter(i.region for i in self.live(d) if not self.leaving(i))
        need = {r: d.instances_per_region - staying[r] for r in regions}
        need = {r: n for r, n in need.items() if n > 0}
        if not regions:
            reason = "no region has a ready node"
            if placing and self._timed_out(d):
                self.finish(d, "failed", f"not placed within {self._limit()}: {reason}")
                return None
            self.plan.waiting[d.id] = reason
            return False
        if not need:
            return True
        if placing and self._timed_out(d):
            # The deadline passed while placing: placing now would only start what fails.
            self.finish(d, "failed", f"not placed within {self._limit()}: {self._why(d, need)}")
            return None
        if status not in {"placing", "starting"}:
            need = {r: n for r, n in need.items() if not self._backing_off(d, r)}
        shortfalls: list[str] = []
        for region, count in need.items():
            demand = placement.Demand(str(d.id), count, d.vcpu, d.memory_mb, regions=(region,))
            result = placement.place(self._placement_nodes(region), demand)
            if not result.complete:
                shortfalls.append(result.reason)
            for assignment in result.assignments:
                node_id = UUID(assignment.node_id)
                self.emit(PlaceInstance(d.id, d.name, region, node_id, self.hostname(node_id)))
                self._use(node_id, d.id, d.vcpu, d.memory_mb)
        if shortfalls:
            self.plan.waiting[d.id] = "; ".join(shortfalls)
        return not shortfalls

    def _why(self, d: DeploymentInfo, need: dict[str, int]) -> str:
        """Why ``need`` cannot be placed now (a placement's shortfall reasons)."""
        reasons = []
        for region, count in need.items():
            demand = placement.Demand(str(d.id), count, d.vcpu, d.memory_mb, regions=(region,))
            result = placement.place(self._placement_nodes(region), demand)
            reasons.append(result.reason or f"{region}: {count} still to place")
        return "; ".join(reasons)

    def _limit(self) -> str:
        return _seconds(self.settings.start_timeout)

    def _backing_off(self, d: DeploymentInfo, region: str) -> bool:
        failures = [
            i
            for i in self.of_deployment[d.id]
            if i.region == region and i.state == "failed" and i.since < FAILURE_MEMORY
        ]
        if not failures:
            return False
        delay = min(2.0 ** (len(failures) - 1), self.settings.backoff_max)
        latest = min(i.since for i in failures)
        if latest >= delay:
            return False
        self.plan.waiting[d.id] = (
            f"{region}: replacing a failed instance in {delay - latest:.0f} s "
            f"({_plural(len(failures), 'failure')} in the last {FAILURE_MEMORY:g} s)"
        )
        return True

    def _placement_nodes(self, region: str) -> list[placement.Node]:
        """The region's nodes as placement sees them now."""
        found = []
        for node_id in self.by_region.get(region, ()):
            cached = self._placement.get(node_id)
            if cached is None or cached.ready != (self.node_state[node_id] == "ready"):
                node = self.nodes[node_id]
                cached = self._placement[node_id] = placement.Node(
                    id=str(node_id),
                    region=node.region,
                    ready=self.node_state[node_id] == "ready",
                    vcpu=node.vcpu,
                    memory=node.memory_mb,
                    used_vcpu=Decimal(self.used[node_id][0]) / placement.MILLI,
                    used_memory=self.used[node_id][1],
                    instances_of={str(k): v for k, v in self.replicas[node_id].items() if v},
                )
            found.append(cached)
        return found

    def _serving(self, d: DeploymentInfo) -> Counter[str]:
        """Per region, the deployment's instances that serve and are not leaving."""
        return Counter(i.region for i in self.live(d) if i.serving and not self.leaving(i))

    def _drain_replaced(self, d: DeploymentInfo) -> None:
        leaving = [i for i in self.live(d) if self.leaving(i)]
        if not leaving:
            return
        serving = self._serving(d)
        for instance in leaving:
            if serving[instance.region] >= d.instances_per_region:
                self.stop(instance, f"node {self.hostname(instance.node_id)} is draining; replaced")

    def _check_healthy(self, d: DeploymentInfo, regions: Sequence[str]) -> None:
        serving = self._serving(d)
        short = [
            (region, serving[region])
            for region in regions
            if serving[region] < d.instances_per_region
        ]
        if not short:
            self.move(d, "healthy")
            return
        if not self._timed_out(d):
            return
        detail = ", ".join(
            f"{region}: {count} of {d.instances_per_region} healthy" for region, count in short
        )
        sick = [i for i in self.live(d) if not i.serving]
        if sick:
            first = sick[0]
            health = "unhealthy" if first.state == "running" else first.state
            detail += f"; instance {first.id} on {self.hostname(first.node_id)} is {health}" + (
                f": {first.message}" if first.message else ""
            )
        self.finish(d, "failed", f"not healthy within {self._limit()} ({detail})")

    def _activate(self, d: DeploymentInfo) -> None:
        env = self.environments.get(d.environment_id)
        current_id = env.current if env is not None else None
        current = self.deployments.get(current_id) if current_id is not None else None
        if current is not None and current.id != d.id and _order(current) > _order(d):
            self.finish(d, "inactive", f"superseded by {current.name}, requested later")
            return
        self.move(d, "active")
        if current_id == d.id:
            return
        self.emit(SetCurrent(d.environment_id, d.id, current_id))
        if current is not None and self.status[current.id] == "active":
            self.move(current, "draining", f"replaced by {d.name}")
        self.environments[d.environment_id] = EnvironmentInfo(d.environment_id, d.id, current_id)

    def _window(self, d: DeploymentInfo) -> None:
        env = self.environments.get(d.environment_id)
        if env is None or d.id not in (env.previous, env.current):
            self.finish(d, "inactive", "no longer the rollback target")
        elif d.draining_for is not None and d.draining_for > self.settings.rollback_window:
            window = _seconds(self.settings.rollback_window)
            self.finish(d, "inactive", f"rollback window of {window} is over")

    def drained(self) -> None:
        busy = {
            i.node_id
            for i in self.instances.values()
            if self.instance_state[i.id] in HOLDING and i.node_id is not None
        }
        for node in sorted(self.nodes.values(), key=lambda n: n.hostname):
            if self.node_state[node.id] == "draining" and node.id not in busy:
                self.emit(MarkNodeDrained(node.id, node.hostname))
                self.node_state[node.id] = "drained"


@functools.lru_cache(maxsize=256)
def _millicpu(vcpu: Decimal) -> int:
    # Projects share a few sizes: converting each instance's Decimal anew cost a third of a
    # steady-state pass.
    return placement.to_millicpu(vcpu, round_up=True)


def _order(d: DeploymentInfo) -> tuple[datetime, datetime]:
    return d.requested_at, d.created_at


def _restarted(d: DeploymentInfo) -> DeploymentInfo:
    """``d`` as it is on entering ``placing`` now."""
    return DeploymentInfo(
        id=d.id,
        environment_id=d.environment_id,
        name=d.name,
        status="placing",
        instances_per_region=d.instances_per_region,
        vcpu=d.vcpu,
        memory_mb=d.memory_mb,
        requested_at=d.requested_at,
        created_at=d.created_at,
        placing_for=0.0,
        draining_for=None,
        regions=None,
    )


def plan(snapshot: Snapshot, settings: Settings | None = None) -> Plan:
    """What to change, by the rules of this module's docstring."""
    work = _Pass(snapshot, settings or Settings())
    work.nodes_down()
    work.orphans()
    for deployment in work.deployments_in_order():
        work.deployment(deployment)
    work.drained()
    return work.plan


def describe(actions: Iterable[Action]) -> Counter[str]:
    """How many actions of each kind (for logs and metrics)."""
    return Counter(type(action).__name__ for action in actions)
