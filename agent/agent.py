"""The node agent: register, heartbeat, fetch assignments, reconcile, report.

Loops, each with its own connection to the admin API:

- **heartbeat** (every ``heartbeat_interval`` the operator gives, 5 s by default): capacity and
  the instances running here; the operator answers which of them it no longer assigns, and
  those are stopped.
- **assignments** (long poll): on every change, reconcile -- start what is assigned and not
  running, stop what is told to stop or no longer assigned.
- **reports**: the latest state of each instance, sent in batches; kept while the operator is
  unreachable and sent when it is back.
- **logs**: instances' output lines, shipped in batches (a bounded buffer: the oldest lines go
  first when the operator is away for long, and are counted).

One supervisor task per instance starts it through the runtime, health-checks it over HTTP
until it answers 2xx/3xx (its boot time is start to first healthy answer), keeps checking, and
reports each change: unhealthy, healthy again, exited. While the operator is unreachable every
instance keeps running and every loop retries with jittered exponential backoff (0.5 s to 30 s).

On start the runtime sweeps what a previous agent run left behind (so a crashed or restarted
agent never leaves orphans) and the assignments start again; on a clean stop every instance is
stopped (SIGTERM, then SIGKILL after the grace period) and reported stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agent import health
from agent.client import Endpoint, OperatorClient, OperatorRefused, OperatorUnavailable
from agent.http import SmallServer, json_answer
from agent.runtimes.base import Address, InstanceSpec, Runtime, RuntimeFailure, Stream

log = logging.getLogger("agent")

BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
MAX_LOG_BUFFER = 20_000
LOG_BATCH = 1000
MAX_LINE_BYTES = 16 * 1024
REPORT_BATCH = 500
MAX_MESSAGE = 2000


class AgentError(Exception):
    """The agent cannot go on (the message says why and what to do)."""


@dataclass(frozen=True, slots=True)
class AgentConfig:
    operator: Endpoint
    data_dir: Path
    region: str
    hostname: str
    # Where the edges reach this node.
    address: str
    vcpu: int
    memory_mb: int
    node_token: str | None = field(default=None, repr=False)
    bootstrap_token: str | None = field(default=None, repr=False)
    # None: the interval the operator answers a heartbeat with.
    heartbeat_interval: float | None = None
    boot_timeout: float = 60.0
    health_interval: float = 5.0
    health_timeout: float = 2.0
    stop_grace: float = 10.0
    poll_wait: int = 25
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8081

    @property
    def identity_file(self) -> Path:
        return self.data_dir / "node.json"


@dataclass(frozen=True, slots=True)
class Identity:
    node_id: str
    token: str = field(repr=False)


def node_id_of(token: str) -> str:
    """The node id inside a node token (``zwn_<id>_<secret>``)."""
    parts = token.split("_")
    if len(parts) != 3 or parts[0] != "zwn" or len(parts[1]) != 32:
        raise AgentError("the node token is not a Zeitwork node token (zwn_<id>_<secret>)")
    raw = parts[1]
    return f"{raw[:8]}-{raw[8:12]}-{raw[12:16]}-{raw[16:20]}-{raw[20:]}"


class Backoff:
    def __init__(self) -> None:
        self.delay = 0.0

    def failed(self) -> float:
        self.delay = min(BACKOFF_MAX, max(BACKOFF_MIN, self.delay * 2))
        return self.delay * random.uniform(0.8, 1.2)

    def ok(self) -> None:
        self.delay = 0.0


@dataclass
class Instance:
    spec: InstanceSpec
    health_path: str
    state: str = "starting"
    address: Address | None = None
    healthy: bool | None = None
    started_at: float = 0.0
    task: asyncio.Task[None] | None = None
    stopping: bool = False


class AgentMetrics:
    def __init__(self, agent: Agent) -> None:
        self.registry = CollectorRegistry()
        self.instances = Gauge(
            "zeitwork_agent_instances",
            "Instances on this node by state (starting, running, stopping).",
            ["state"],
            registry=self.registry,
        )
        self.healthy = Gauge(
            "zeitwork_agent_instances_healthy",
            "Instances on this node whose last health check passed.",
            registry=self.registry,
        )
        self.boot = Histogram(
            "zeitwork_instance_boot_seconds",
            "Start of an instance to its first healthy answer.",
            buckets=(0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
            registry=self.registry,
        )
        self.heartbeat_failures = Counter(
            "zeitwork_agent_heartbeat_failures_total",
            "Heartbeats the operator did not answer.",
            registry=self.registry,
        )
        self.report_failures = Counter(
            "zeitwork_agent_report_failures_total",
            "Report batches that could not be delivered (they are sent again).",
            registry=self.registry,
        )
        self.log_lines_dropped = Counter(
            "zeitwork_agent_log_lines_dropped_total",
            "Instance output lines dropped because the buffer was full.",
            registry=self.registry,
        )
        self.operator_up = Gauge(
            "zeitwork_agent_operator_up",
            "1 while the last heartbeat reached the operator.",
            registry=self.registry,
        )
        self._agent = agent

    def render(self) -> bytes:
        for state in ("starting", "running", "stopping"):
            self.instances.labels(state).set(
                sum(1 for i in self._agent.instances.values() if i.state == state)
            )
        self.healthy.set(sum(1 for i in self._agent.instances.values() if i.healthy))
        return generate_latest(self.registry)


class Agent:
    def __init__(
        self,
        config: AgentConfig,
        runtime_factory: Callable[[Callable[[str, Stream, str], None]], Runtime],
    ) -> None:
        self.config = config
        self.runtime = runtime_factory(self._on_output)
        self.identity: Identity | None = None
        self.instances: dict[str, Instance] = {}
        self.metrics = AgentMetrics(self)
        self.heartbeat_interval = config.heartbeat_interval or 5.0
        self.last_heartbeat: float | None = None
        self.node_state = "unknown"
        self._reports: dict[str, dict[str, Any]] = {}
        self._reports_ready = asyncio.Event()
        self._logs: deque[dict[str, Any]] = deque()
        self._logs_ready = asyncio.Event()
        self._assignments_version: str | None = None
        self._server = SmallServer(self._http)
        self._fatal: AgentError | None = None
        self._stop = asyncio.Event()

    # -- lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; :class:`AgentError` when the agent cannot go on."""
        await self._server.start(self.config.metrics_host, self.config.metrics_port)
        log.info(
            "agent metrics and health on http://%s:%d",
            self.config.metrics_host,
            self._server.port,
        )
        try:
            self.identity = await self._register(stop)
            if self.identity is None:
                return
            swept = await self.runtime.sweep()
            if swept:
                log.warning(
                    "stopped %d instance(s) a previous agent run left behind; "
                    "the assignments start again",
                    len(swept),
                )
            loops = [
                asyncio.create_task(self._heartbeats(), name="heartbeats"),
                asyncio.create_task(self._assignments(), name="assignments"),
                asyncio.create_task(self._send_reports(), name="reports"),
                asyncio.create_task(self._ship_logs(), name="logs"),
            ]
            waiter = asyncio.create_task(self._stop_or(stop))
            await asyncio.wait([waiter, *loops], return_when=asyncio.FIRST_COMPLETED)
            for task in [waiter, *loops]:
                task.cancel()
            for task in loops:
                with contextlib.suppress(asyncio.CancelledError):
                    exc = await asyncio.gather(task, return_exceptions=True)
                    if exc and isinstance(exc[0], Exception):
                        log.error("agent loop %s failed: %r", task.get_name(), exc[0])
            await self._shutdown()
            if self._fatal is not None:
                raise self._fatal
        finally:
            await self._server.close()

    async def _stop_or(self, stop: asyncio.Event) -> None:
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(self._stop.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _give_up(self, error: AgentError) -> None:
        self._fatal = error
        self._stop.set()

    async def _shutdown(self) -> None:
        """Stop every instance and send what is left to report (briefly: we are leaving)."""
        if self.instances:
            log.info("stopping %d instance(s)", len(self.instances))
        await asyncio.gather(*(self._stop_instance(i) for i in list(self.instances)))
        client = self._client(timeout=3.0)
        try:
            with contextlib.suppress(OperatorUnavailable, OperatorRefused):
                await self._flush_reports(client)
            with contextlib.suppress(OperatorUnavailable, OperatorRefused):
                await self._flush_logs(client)
        finally:
            await client.close()

    def _client(self, timeout: float = 10.0) -> OperatorClient:
        token = self.identity.token if self.identity else None
        return OperatorClient(self.config.operator, token, timeout=timeout)

    # -- registration

    async def _register(self, stop: asyncio.Event) -> Identity | None:
        path = self.config.identity_file
        if path.exists():
            try:
                data = json.loads(path.read_text())
                identity = Identity(str(data["node_id"]), str(data["token"]))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise AgentError(f"cannot read the node identity {path}: {exc}") from None
            log.info("node %s (from %s)", identity.node_id, path)
            return identity
        if self.config.node_token:
            identity = Identity(node_id_of(self.config.node_token), self.config.node_token)
            log.info("node %s (from its token)", identity.node_id)
            return identity
        if not self.config.bootstrap_token:
            raise AgentError(
                f"no node identity in {path} and no token to register with: give the node "
                "token ($ZEITWORK_NODE_TOKEN) or a bootstrap token ($ZEITWORK_BOOTSTRAP_TOKEN)"
            )
        client = OperatorClient(self.config.operator, self.config.bootstrap_token)
        body = {
            "hostname": self.config.hostname,
            "region": self.config.region,
            "address": self.config.address,
            "vcpu": self.config.vcpu,
            "memory": self.config.memory_mb,
        }
        backoff = Backoff()
        try:
            while not stop.is_set():
                try:
                    answer = await client.call("POST", "/api/v1/nodes", body)
                    break
                except OperatorRefused as exc:
                    hint = (
                        " (a node of this hostname exists: remove it with DELETE "
                        "/api/v1/nodes/{id}, or give its token)"
                        if exc.status == 409
                        else ""
                    )
                    raise AgentError(
                        f"the operator refused to register this node: {exc}{hint}"
                    ) from None
                except OperatorUnavailable as exc:
                    delay = backoff.failed()
                    log.warning("cannot register yet (%s); again in %.1f s", exc, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), delay)
            else:
                return None
        finally:
            await client.close()
        identity = Identity(str(answer["id"]), str(answer["token"]))
        self._save_identity(identity)
        log.info(
            "registered as node %s (%s in %s); identity saved in %s",
            identity.node_id,
            self.config.hostname,
            self.config.region,
            path,
        )
        return identity

    def _save_identity(self, identity: Identity) -> None:
        path = self.config.identity_file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump({"node_id": identity.node_id, "token": identity.token}, out)
        tmp.replace(path)

    def _node_path(self, suffix: str) -> str:
        assert self.identity is not None
        return f"/api/v1/nodes/{self.identity.node_id}/{suffix}"

    def _refused(self, exc: OperatorRefused, what: str) -> None:
        if exc.status in (401, 403, 404):
            self._give_up(
                AgentError(
                    f"the operator no longer accepts this node ({what}: {exc}); if the node "
                    f"was removed, delete {self.config.identity_file} to register it again"
                )
            )
        else:
            log.error("%s refused by the operator: %s", what, exc)

    # -- heartbeats

    async def _heartbeats(self) -> None:
        client = self._client()
        backoff = Backoff()
        try:
            while True:
                body = {
                    "vcpu": self.config.vcpu,
                    "memory": self.config.memory_mb,
                    "instances": [i for i, inst in self.instances.items() if not inst.stopping],
                }
                try:
                    answer = await client.call("POST", self._node_path("heartbeat"), body)
                except OperatorUnavailable as exc:
                    self.metrics.heartbeat_failures.inc()
                    self.metrics.operator_up.set(0)
                    delay = min(backoff.failed(), self.heartbeat_interval)
                    log.warning("heartbeat failed (%s); instances keep running", exc)
                    await asyncio.sleep(delay)
                    continue
                except OperatorRefused as exc:
                    self._refused(exc, "heartbeat")
                    return
                backoff.ok()
                self.metrics.operator_up.set(1)
                self.last_heartbeat = time.monotonic()
                if self.node_state != answer["state"]:
                    log.info("node state: %s", answer["state"])
                    self.node_state = answer["state"]
                if self.config.heartbeat_interval is None:
                    self.heartbeat_interval = float(answer["heartbeat_interval"])
                for instance_id in answer["unknown_instances"]:
                    if instance_id in self.instances:
                        log.info("instance %s is not assigned here any more", instance_id)
                        self._begin_stop(instance_id, report=False)
                await asyncio.sleep(self.heartbeat_interval)
        finally:
            await client.close()

    # -- assignments

    async def _assignments(self) -> None:
        client = self._client(timeout=self.config.poll_wait + 15)
        backoff = Backoff()
        try:
            while True:
                path = self._node_path("assignments")
                if self._assignments_version is not None:
                    path += f"?wait={self.config.poll_wait}&version={self._assignments_version}"
                try:
                    answer = await client.call("GET", path)
                except OperatorUnavailable as exc:
                    delay = backoff.failed()
                    log.warning("cannot fetch assignments (%s); again in %.1f s", exc, delay)
                    await asyncio.sleep(delay)
                    continue
                except OperatorRefused as exc:
                    self._refused(exc, "assignments")
                    return
                backoff.ok()
                if answer["version"] != self._assignments_version:
                    self._assignments_version = answer["version"]
                    self.reconcile(answer["instances"])
        finally:
            await client.close()

    def reconcile(self, assignments: list[dict[str, Any]]) -> None:
        """Start what is assigned and not running; stop what must stop or is not assigned."""
        assigned = {a["instance_id"]: a for a in assignments}
        for instance_id, a in assigned.items():
            if a["desired"] == "running":
                if instance_id not in self.instances:
                    self._start(a)
            elif instance_id in self.instances:
                self._begin_stop(instance_id)
            else:
                # Stopped before this agent ever ran it: say so, or the platform waits.
                self._report(instance_id, "stopped")
        for instance_id in list(self.instances):
            if instance_id not in assigned:
                self._begin_stop(instance_id, report=False)

    # -- instances

    def _start(self, a: dict[str, Any]) -> None:
        resources = a["resources"]
        spec = InstanceSpec(
            instance_id=a["instance_id"],
            deployment_id=a["deployment_id"],
            deployment_name=a["deployment_name"],
            command=a.get("command"),
            image=a.get("image"),
            app_port=int(a["app_port"]),
            vcpu=float(resources["vcpu"]),
            memory_mb=int(resources["memory"]),
            env=dict(a.get("env") or {}),
        )
        instance = Instance(spec, a["health_check_path"])
        self.instances[spec.instance_id] = instance
        instance.task = asyncio.create_task(
            self._guarded(instance), name=f"instance-{spec.instance_id}"
        )

    async def _guarded(self, instance: Instance) -> None:
        """Supervise; a failure of the agent's own (a bug, an unexpected OS error) fails the
        instance with the reason instead of leaving it unsupervised."""
        try:
            await self._supervise(instance)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            instance_id = instance.spec.instance_id
            log.exception("instance %s: supervision failed", instance_id)
            with contextlib.suppress(Exception):
                await self.runtime.stop(instance_id, self.config.stop_grace)
            self.instances.pop(instance_id, None)
            self._report(instance_id, "failed", message=f"agent error: {exc!r}"[:MAX_MESSAGE])

    def _begin_stop(self, instance_id: str, *, report: bool = True) -> None:
        instance = self.instances.get(instance_id)
        if instance is None or instance.stopping:
            return
        instance.stopping = True
        task = asyncio.create_task(self._stop_instance(instance_id, report=report))
        task.add_done_callback(_log_failure)

    async def _stop_instance(self, instance_id: str, *, report: bool = True) -> None:
        instance = self.instances.get(instance_id)
        if instance is None:
            return
        instance.stopping = True
        instance.state = "stopping"
        if instance.task is not None and instance.task is not asyncio.current_task():
            instance.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await instance.task
        try:
            await self.runtime.stop(instance_id, self.config.stop_grace)
        except RuntimeFailure as exc:
            log.error("instance %s: stop failed: %s", instance_id, exc)
        self.instances.pop(instance_id, None)
        log.info("instance %s (%s) stopped", instance_id, instance.spec.deployment_name)
        if report:
            self._report(instance_id, "stopped")

    async def _supervise(self, instance: Instance) -> None:
        spec = instance.spec
        name = f"instance {spec.instance_id} ({spec.deployment_name})"
        instance.started_at = time.monotonic()
        try:
            await self.runtime.prepare(spec)
            address = await self.runtime.start(spec)
        except RuntimeFailure as exc:
            log.error("%s cannot start: %s", name, exc)
            with contextlib.suppress(RuntimeFailure):
                await self.runtime.stop(spec.instance_id, 0)
            self.instances.pop(spec.instance_id, None)
            self._report(spec.instance_id, "failed", message=f"cannot start: {exc}")
            return
        instance.address = address
        log.info("%s started on %s:%d", name, address.host, address.port)
        self._report(spec.instance_id, "starting", address=address)
        if await self._boot(instance, name):
            await self._watch(instance, name)

    async def _exited(self, instance: Instance, name: str) -> bool:
        """Whether the instance's process exited (then reported failed and released)."""
        status = await self.runtime.status(instance.spec.instance_id)
        if status.state == "running":
            return False
        code = status.exit_code
        message = "exited" if code is None else f"exited with status {code}"
        log.warning("%s %s", name, message)
        instance.state = "failed"
        with contextlib.suppress(RuntimeFailure):
            await self.runtime.stop(instance.spec.instance_id, 0)
        self.instances.pop(instance.spec.instance_id, None)
        self._report(instance.spec.instance_id, "failed", message=message)
        return True

    async def _boot(self, instance: Instance, name: str) -> bool:
        """Check health until the first healthy answer or the boot timeout; False when the
        instance exited meanwhile."""
        assert instance.address is not None
        delay = 0.05
        detail = ""
        while time.monotonic() - instance.started_at < self.config.boot_timeout:
            if await self._exited(instance, name):
                return False
            ok, detail = await health.check(
                instance.address.host,
                instance.address.port,
                instance.health_path,
                timeout=self.config.health_timeout,
            )
            if ok:
                seconds = time.monotonic() - instance.started_at
                self.metrics.boot.observe(seconds)
                instance.state, instance.healthy = "running", True
                log.info("%s healthy after %.0f ms", name, seconds * 1000)
                self._report(
                    instance.spec.instance_id,
                    "running",
                    address=instance.address,
                    healthy=True,
                    boot_time_ms=round(seconds * 1000),
                )
                return True
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        instance.state, instance.healthy = "running", False
        message = (
            f"not healthy within {self.config.boot_timeout:g} s: "
            f"GET {instance.health_path}: {detail}"
        )
        log.warning("%s %s", name, message)
        self._report(
            instance.spec.instance_id,
            "running",
            address=instance.address,
            healthy=False,
            message=message,
        )
        return True

    async def _watch(self, instance: Instance, name: str) -> None:
        assert instance.address is not None
        while True:
            await asyncio.sleep(self.config.health_interval)
            if await self._exited(instance, name):
                return
            ok, detail = await health.check(
                instance.address.host,
                instance.address.port,
                instance.health_path,
                timeout=self.config.health_timeout,
            )
            if ok == instance.healthy:
                continue
            instance.healthy = ok
            message = None if ok else f"health check GET {instance.health_path}: {detail}"
            log.log(
                logging.INFO if ok else logging.WARNING,
                "%s is %s",
                name,
                "healthy again" if ok else f"unhealthy ({message})",
            )
            self._report(
                instance.spec.instance_id,
                "running",
                address=instance.address,
                healthy=ok,
                message=message,
            )

    # -- reports

    def _report(
        self,
        instance_id: str,
        state: str,
        *,
        address: Address | None = None,
        healthy: bool | None = None,
        boot_time_ms: int | None = None,
        message: str | None = None,
    ) -> None:
        report: dict[str, Any] = {"instance_id": instance_id, "state": state}
        if address is not None:
            report.update(address=address.host, port=address.port)
        if healthy is not None:
            report["healthy"] = healthy
        if boot_time_ms is not None:
            report["boot_time_ms"] = boot_time_ms
        if message is not None:
            report["message"] = message[:MAX_MESSAGE]
        previous = self._reports.get(instance_id)
        if previous is not None and "boot_time_ms" in previous and "boot_time_ms" not in report:
            report["boot_time_ms"] = previous["boot_time_ms"]  # never lose the boot time
        self._reports[instance_id] = report
        self._reports_ready.set()

    async def _send_reports(self) -> None:
        await self._deliver(
            "reports", self._reports_ready, self._flush_reports, self.metrics.report_failures
        )

    async def _deliver(
        self,
        what: str,
        ready: asyncio.Event,
        flush: Callable[[OperatorClient], Awaitable[None]],
        failures: Counter | None = None,
        gather: float = 0.0,
    ) -> None:
        """Send what ``flush`` has whenever ``ready`` is set (after ``gather`` seconds, to
        batch), on a connection of its own; kept and sent again with backoff while the
        operator is unreachable."""
        client = self._client()
        backoff = Backoff()
        try:
            while True:
                await ready.wait()
                if gather:
                    await asyncio.sleep(gather)
                try:
                    await flush(client)
                except OperatorUnavailable as exc:
                    if failures is not None:
                        failures.inc()
                    delay = backoff.failed()
                    log.warning("cannot send %s (%s); again in %.1f s", what, exc, delay)
                    await asyncio.sleep(delay)
                    continue
                except OperatorRefused as exc:
                    self._refused(exc, what)
                    if self._fatal is not None:
                        return
                backoff.ok()
        finally:
            await client.close()

    async def _flush_reports(self, client: OperatorClient) -> None:
        while self._reports:
            batch = dict(list(self._reports.items())[:REPORT_BATCH])
            self._reports_ready.clear()
            try:
                answer = await client.call(
                    "POST", self._node_path("reports"), {"reports": list(batch.values())}
                )
            except OperatorRefused:
                for key, sent in batch.items():  # a refused batch is not sent again
                    if self._reports.get(key) is sent:
                        del self._reports[key]
                raise
            for key, sent in batch.items():
                if self._reports.get(key) is sent:  # not superseded meanwhile
                    del self._reports[key]
            for rejected in answer.get("rejected", []):
                log.info(
                    "report of instance %s refused: %s",
                    rejected["instance_id"],
                    rejected["reason"],
                )

    # -- logs

    def _on_output(self, instance_id: str, stream: Stream, line: str) -> None:
        encoded = line.encode()
        if len(encoded) > MAX_LINE_BYTES:
            line = encoded[:MAX_LINE_BYTES].decode(errors="ignore")
        if len(self._logs) >= MAX_LOG_BUFFER:
            self._logs.popleft()
            self.metrics.log_lines_dropped.inc()
        self._logs.append(
            {
                "instance_id": instance_id,
                "stream": stream,
                "line": line,
                "at": _now_iso(),
            }
        )
        self._logs_ready.set()

    async def _ship_logs(self) -> None:
        await self._deliver("logs", self._logs_ready, self._flush_logs, gather=0.2)

    async def _flush_logs(self, client: OperatorClient) -> None:
        while self._logs:
            batch = [self._logs[i] for i in range(min(LOG_BATCH, len(self._logs)))]
            self._logs_ready.clear()
            try:
                await client.call("POST", self._node_path("logs"), {"lines": batch})
            except OperatorRefused:
                for _ in batch:  # a refused batch would be refused again
                    self._logs.popleft()
                raise
            for _ in batch:
                self._logs.popleft()

    # -- the agent's own HTTP endpoints

    def _http(self, path: str) -> tuple[int, str, bytes] | None:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, self.metrics.render()
        if path == "/health":
            age = None if self.last_heartbeat is None else time.monotonic() - self.last_heartbeat
            reachable = age is not None and age < 3 * self.heartbeat_interval + 5
            body = {
                "status": "ok" if reachable else "degraded",
                "node_id": self.identity.node_id if self.identity else None,
                "node_state": self.node_state,
                "operator": "reachable" if reachable else "unreachable",
                "last_heartbeat_seconds": None if age is None else round(age, 3),
                "runtime": self.runtime.name,
                "instances": len(self.instances),
                "healthy_instances": sum(1 for i in self.instances.values() if i.healthy),
            }
            return json_answer(200 if self.identity else 503, body)
        return None


def _now_iso() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("agent task failed: %r", task.exception())
