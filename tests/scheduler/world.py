"""An in-memory platform for the reconciler's tests: a model of the store, not the store.

It holds nodes, deployments, instances and environments as the snapshot shows them, applies a
plan's actions the way ``edge.store.scheduling.apply_plan`` does (the integration tests check
the real one against PostgreSQL), and plays the agents (start what is assigned, report it
healthy or not) and the clock.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import UUID

from scheduler.lifecycle import check
from scheduler.reconciler import (
    DeploymentInfo,
    EnvironmentInfo,
    InstanceInfo,
    MarkNodeDown,
    MarkNodeDrained,
    NodeInfo,
    PlaceInstance,
    Plan,
    SetCurrent,
    Settings,
    Snapshot,
    StopInstance,
    Transition,
    plan,
)

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@dataclasses.dataclass
class Clocked:
    """Times of a record in seconds on the world's clock."""

    at: float = 0.0


class World:
    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or Settings(
            start_timeout=60, rollback_window=120, heartbeat_timeout=30
        )
        self.now = 0.0
        self.nodes: dict[UUID, NodeInfo] = {}
        self.heartbeat: dict[UUID, float] = {}
        self.deployments: dict[UUID, DeploymentInfo] = {}
        self.entered: dict[tuple[UUID, str], float] = {}
        self.instances: dict[UUID, InstanceInfo] = {}
        self.changed: dict[UUID, float] = {}
        self.environments: dict[UUID, EnvironmentInfo] = {}
        self.history: list[Plan] = []
        self._ids = 0

    def _id(self) -> UUID:
        # Counted, not random: the same steps give the same world (hypothesis replays).
        self._ids += 1
        return UUID(int=self._ids)

    # -- seeding

    def node(self, hostname: str, region: str = "eu", *, vcpu: int = 4, memory: int = 4096) -> UUID:
        node = NodeInfo(self._id(), hostname, region, "ready", vcpu, memory, 0.0)
        self.nodes[node.id] = node
        self.heartbeat[node.id] = self.now
        return node.id

    def environment(self) -> UUID:
        env = EnvironmentInfo(self._id(), None, None)
        self.environments[env.id] = env
        return env.id

    def deploy(
        self,
        environment: UUID,
        name: str,
        *,
        per_region: int = 1,
        vcpu: str = "1",
        memory: int = 512,
    ) -> UUID:
        d = DeploymentInfo(
            id=self._id(),
            environment_id=environment,
            name=name,
            status="pending",
            instances_per_region=per_region,
            vcpu=Decimal(vcpu),
            memory_mb=memory,
            requested_at=self._time(),
            created_at=self._time(),
        )
        self.deployments[d.id] = d
        self.entered[d.id, "pending"] = self.now
        return d.id

    def _time(self) -> datetime:
        return EPOCH + timedelta(seconds=self.now)

    # -- what the scheduler sees

    def snapshot(self) -> Snapshot:
        deployments = []
        for d in self.deployments.values():
            if d.status in ("inactive", "failed"):
                continue
            placing = self.entered.get((d.id, "placing"))
            draining = self.entered.get((d.id, "draining"))
            deployments.append(
                dataclasses.replace(
                    d,
                    placing_for=None if placing is None else self.now - placing,
                    draining_for=None if draining is None else self.now - draining,
                )
            )
        live = {d.id for d in deployments}
        instances = [
            dataclasses.replace(i, since=self.now - self.changed[i.id])
            for i in self.instances.values()
            if i.state in ("pending", "starting", "running", "stopping")
            or (i.state == "failed" and i.deployment_id in live)
        ]
        nodes = [
            dataclasses.replace(n, silent_for=self.now - self.heartbeat[n.id])
            for n in self.nodes.values()
        ]
        envs = {d.environment_id for d in deployments}
        return Snapshot(
            nodes=tuple(nodes),
            deployments=tuple(deployments),
            instances=tuple(instances),
            environments=tuple(e for e in self.environments.values() if e.id in envs),
        )

    def step(self) -> Plan:
        """One scheduler pass, applied."""
        result = plan(self.snapshot(), self.settings)
        for action in result.actions:
            self.apply(action)
        self.history.append(result)
        return result

    def settle(self, passes: int = 5) -> None:
        for _ in range(passes):
            if not self.step().actions:
                return

    def apply(self, action: object) -> None:
        if isinstance(action, Transition):
            d = self.deployments[action.deployment_id]
            assert d.status == action.source, (d.status, action)
            check(d.status, action.target)
            regions = d.regions
            if action.target == "placing":
                regions = None
            elif action.regions is not None:
                regions = action.regions
            requested = self._time() if action.target == "placing" else d.requested_at
            self.deployments[d.id] = dataclasses.replace(
                d, status=action.target, regions=regions, requested_at=requested
            )
            self.entered[d.id, action.target] = self.now
        elif isinstance(action, SetCurrent):
            env = self.environments[action.environment_id]
            assert env.current == action.expected
            self.environments[env.id] = EnvironmentInfo(env.id, action.deployment_id, env.current)
        elif isinstance(action, PlaceInstance):
            assert self.nodes[action.node_id].state == "ready"
            d = self.deployments[action.deployment_id]
            instance = InstanceInfo(
                id=self._id(),
                deployment_id=d.id,
                node_id=action.node_id,
                region=action.region,
                state="pending",
                healthy=False,
                addressed=False,
                message=None,
                since=0.0,
                vcpu=d.vcpu,
                memory_mb=d.memory_mb,
            )
            self.instances[instance.id] = instance
            self.changed[instance.id] = self.now
        elif isinstance(action, StopInstance):
            i = self.instances[action.instance_id]
            state = "stopped" if action.at_once else "stopping"
            self._set(i.id, state=state, healthy=False, message=action.message)
        elif isinstance(action, MarkNodeDown):
            self.nodes[action.node_id] = dataclasses.replace(
                self.nodes[action.node_id], state="down"
            )
        elif isinstance(action, MarkNodeDrained):
            self.nodes[action.node_id] = dataclasses.replace(
                self.nodes[action.node_id], state="drained"
            )
        else:
            raise AssertionError(action)

    # -- the agents and the operator

    def _set(self, instance_id: UUID, **changes: object) -> None:
        self.instances[instance_id] = dataclasses.replace(
            self.instances[instance_id],
            **changes,  # type: ignore[arg-type]
        )
        self.changed[instance_id] = self.now

    def run_assigned(self, *, healthy: bool = True, only: UUID | None = None) -> None:
        """Every agent starts its pending instances (of ``only``, if given) and reports them
        running, healthy or not; stops the stopping ones."""
        for i in list(self.instances.values()):
            if self.nodes[i.node_id].state == "down" if i.node_id else True:
                continue
            if i.state == "pending" and (only is None or i.deployment_id == only):
                self._set(i.id, state="running", healthy=healthy, addressed=True)
            elif i.state == "stopping":
                self._set(i.id, state="stopped")

    def fail(self, instance_id: UUID, message: str = "exited with status 1") -> None:
        self._set(instance_id, state="failed", healthy=False, message=message)

    def drain(self, node_id: UUID) -> None:
        self.nodes[node_id] = dataclasses.replace(self.nodes[node_id], state="draining")

    def advance(self, seconds: float, *, silent: frozenset[UUID] = frozenset()) -> None:
        """Time passes; every node but ``silent`` heartbeats."""
        self.now += seconds
        for node_id in self.nodes:
            if node_id not in silent:
                self.heartbeat[node_id] = self.now

    # -- reading

    def status(self, deployment_id: UUID) -> str:
        return self.deployments[deployment_id].status

    def of(self, deployment_id: UUID, *states: str) -> list[InstanceInfo]:
        return [
            i
            for i in self.instances.values()
            if i.deployment_id == deployment_id and (not states or i.state in states)
        ]

    def deployed(self, environment: UUID, name: str, **kw: object) -> UUID:
        """A deployment rolled out to active, its agents doing their part."""
        d = self.deploy(environment, name, **kw)  # type: ignore[arg-type]
        self.settle()
        self.run_assigned(only=d)
        self.settle()
        assert self.status(d) == "active", self.status(d)
        return d
