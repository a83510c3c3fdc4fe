"""The proof of the embedded scheduler: a steady stream of requests through a real
``zeitwork edge`` process never fails while deployments roll out, roll back, get promoted,
and while nodes drain or go silent.

One edge (one worker, the scheduler on it as leader), three stand-in nodes
(:mod:`tests.scheduler.standin`) and a project whose production environment has a verified
custom domain. A few keep-alive clients send requests with that domain as Host throughout,
recording for each (when sent, when answered, status, version); a watcher polls the admin
API for the environment's current deployment and records when each flip was seen. At the
end: every response is a 200, and its version is the one current at that moment, give or
take a settle interval around each flip (routing follows a flip within a second; the watcher
sees it within a poll).

Limits: one region; the stand-in agents' instances are loopback HTTP servers, not images.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import pytest

from edge.store.db import connect
from tests.admin.process import EdgeProcess, running_edge
from tests.harness import Client, get, request
from tests.scheduler.standin import (
    ORG,
    PROJECT,
    Api,
    Record,
    StandInAgent,
    current_deployment,
    deploy,
    instances_of,
    seed_platform,
    start_agents,
    wait_for_status,
)

ADMIN_TOKEN = "proof-admin-token-0123456789"
BOOTSTRAP_TOKEN = "proof-bootstrap-token-0123456789"
ENV = {"ZEITWORK_ADMIN_TOKEN": ADMIN_TOKEN, "ZEITWORK_BOOTSTRAP_TOKEN": BOOTSTRAP_TOKEN}
DOMAIN = "shop.example.com"
# Around each observed flip, the old and the new version are both right.
SETTLE = 1.0
# The test's own admin API calls (polls every 0.1 s) must not meet the per-token limit.
COMMON_FLAGS = ("--admin-rate-limit", "1000/1000", "--scheduler-interval", "0.5")
ROLLOUT_TIMEOUT = 15.0
# After a flip, traffic flows this long before the next step: longer than the settle
# interval on both sides, so that each version serves alone for a while.
HOLD = 2 * SETTLE + 1.0
PER_REGION = 2  # instances of each deployment (one region)


# -- the stream of requests -------------------------------------------------------------


@dataclass
class Sample:
    sent: float
    received: float
    status: int  # 0: no response
    version: str
    detail: str = ""


@dataclass
class Traffic:
    """``clients`` keep-alive connections to the edge, each sending GETs with ``host`` one
    after the other (``pause`` between them), until stopped or a bound is reached."""

    port: int
    host: str
    clients: int = 4
    pause: float = 0.01
    max_requests: int = 40_000
    max_seconds: float = 120.0
    samples: list[Sample] = field(default_factory=list)
    connections: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(n)) for n in range(self.clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _client(self, n: int) -> None:
        deadline = time.monotonic() + self.max_seconds
        client: Client | None = None
        try:
            while (
                not self._stop.is_set()
                and len(self.samples) < self.max_requests
                and time.monotonic() < deadline
            ):
                sent = time.monotonic()
                try:
                    if client is None:
                        client = await Client.connect(self.port)
                        self.connections += 1
                    await client.send(get(self.host, f"/?client={n}"))
                    response = await client.read_response(timeout=5.0)
                except (OSError, TimeoutError, h11.ProtocolError) as exc:
                    self.samples.append(Sample(sent, time.monotonic(), 0, "", repr(exc)))
                    if client is not None:
                        await client.close()
                    client = None
                    continue
                body = response.body.decode(errors="replace")
                version = body.split(" ", 1)[0] if response.status == 200 else ""
                detail = "" if response.status == 200 else body[:200]
                self.samples.append(
                    Sample(sent, time.monotonic(), response.status, version, detail)
                )
                if (response.header("connection") or "").lower() == "close":
                    await client.close()
                    client = None
                await asyncio.sleep(self.pause)
        finally:
            if client is not None:
                await client.close()


# -- the flips of the current deployment ------------------------------------------------


@dataclass
class Flip:
    at: float
    version: str
    name: str
    deployment_id: str


@dataclass
class FlipWatcher:
    """Polls the environment's current deployment; records each change when seen."""

    api: Api
    environment: str = "production"
    interval: float = 0.1
    flips: list[Flip] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def current(self) -> str | None:
        return self.flips[-1].version if self.flips else None

    async def _run(self) -> None:
        last: str | None = None
        while True:
            try:
                found = await current_deployment(self.api, self.environment)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors.append(repr(exc))
                found = None
            if found is not None and found["id"] != last:
                last = found["id"]
                self.flips.append(
                    Flip(time.monotonic(), found["env"]["VERSION"], found["name"], found["id"])
                )
            await asyncio.sleep(self.interval)


def allowed_versions(flips: list[Flip], start: float, end: float) -> set[str]:
    """The versions current at some moment of ``[start, end]``."""
    versions = set()
    current = None
    for flip in flips:
        if flip.at <= start:
            current = flip.version
        elif flip.at <= end:
            versions.add(flip.version)
    if current is not None:
        versions.add(current)
    return versions


def check_stream(samples: list[Sample], flips: list[Flip], never: Collection[str]) -> list[str]:
    """What is wrong with the stream: failed requests, versions not current at the time
    (give or take :data:`SETTLE`), versions that must never appear."""
    problems = []
    for s in samples:
        if s.status != 200:
            problems.append(f"{s.sent:.3f}: status {s.status} {s.detail}")
            continue
        if s.version in never:
            problems.append(f"{s.sent:.3f}: {s.version} served, which must never serve")
        allowed = allowed_versions(flips, s.sent - SETTLE, s.received + SETTLE)
        if s.version not in allowed:
            problems.append(f"{s.sent:.3f}-{s.received:.3f}: {s.version}, not in {allowed}")
    return problems


def steady_periods(samples: list[Sample], flips: list[Flip]) -> list[tuple[Flip, int]]:
    """For each flip after the stream began, how many requests were sent and answered
    between its settle interval and the next flip's."""
    first = samples[0].sent if samples else float("inf")
    periods = []
    for flip, after in zip(flips, [*flips[1:], None], strict=True):
        start = flip.at + SETTLE
        end = after.at - SETTLE if after is not None else float("inf")
        if flip.at < first:
            continue
        count = sum(1 for s in samples if start <= s.sent and s.received <= end)
        periods.append((flip, count))
    return periods


def healthy_at(records: list[Record], deployment_id: str, at: float) -> set[str]:
    """The deployment's instances that agents had found healthy and not been told to stop,
    as of ``at`` (the agents' records, in time order)."""
    up: set[str] = set()
    for record in records:
        if record.at > at:
            break
        if record.deployment_id != deployment_id:
            continue
        if record.what == "healthy":
            up.add(record.instance_id)
        else:
            up.discard(record.instance_id)
    return up


def largest_gap(samples: list[Sample]) -> float:
    """The longest time without an answered request (a stall would hide failures)."""
    times = sorted(s.received for s in samples)
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


# -- the scenario -----------------------------------------------------------------------


@dataclass
class Proof:
    edge: EdgeProcess
    api: Api
    agents: list[StandInAgent] = field(default_factory=list)
    watcher: FlipWatcher | None = None
    traffic: Traffic | None = None
    t0: float = field(default_factory=time.monotonic)
    # (seconds since t0, what was done or seen)
    steps: list[tuple[float, str]] = field(default_factory=list)

    def records(self) -> list[Record]:
        return sorted((r for agent in self.agents for r in agent.records), key=lambda r: r.at)

    def step(self, what: str) -> None:
        self.steps.append((time.monotonic() - self.t0, what))

    async def hold(self) -> None:
        await asyncio.sleep(HOLD)

    async def setup(self, database_url: str, node_names: tuple[str, ...]) -> None:
        await seed_platform(self.api)
        self.agents = await start_agents(Api(self.edge.admin_port, BOOTSTRAP_TOKEN), *node_names)
        await self.api.ok(
            "POST", f"/api/v1/projects/{ORG}/{PROJECT}/domains", {"domain": DOMAIN}, status=201
        )
        # Test seeding, not the API: verification needs DNS, which this machine has not.
        conn = await connect(database_url)
        try:
            await conn.execute("UPDATE domains SET verified_at = now() WHERE name = $1", DOMAIN)
        finally:
            await conn.close()
        self.watcher = FlipWatcher(self.api)
        self.watcher.start()
        self.step("platform seeded")

    async def start_traffic(self, version: str) -> None:
        """Once the domain serves ``version`` through the edge, start the stream."""
        deadline = time.monotonic() + 5
        while True:
            response = await request(self.edge.http_port, get(DOMAIN), timeout=5)
            if response.status == 200 and response.body.startswith(f"{version} ".encode()):
                break
            assert time.monotonic() < deadline, (response.status, response.body)
            await asyncio.sleep(0.05)
        self.traffic = Traffic(self.edge.http_port, DOMAIN)
        self.traffic.start()
        self.step("traffic started")

    async def rollout(self, version: str, **options: Any) -> dict[str, Any]:
        created = await deploy(self.api, version, per_region=PER_REGION, **options)
        self.step(f"{version} created ({created['name']})")
        active = await wait_for_status(self.api, created, "active", ROLLOUT_TIMEOUT)
        self.step(f"{version} active")
        return active

    async def until(
        self, what: str, check: Callable[[], Awaitable[bool]], timeout: float = ROLLOUT_TIMEOUT
    ) -> None:
        deadline = time.monotonic() + timeout
        while not await check():
            assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
            await asyncio.sleep(0.1)
        self.step(what)

    async def serving(self, deployment: dict[str, Any], *, avoid: Collection[str] = ()) -> bool:
        """Whether the deployment has its full count of running, healthy instances, and no
        instance meant to run on a node of ``avoid``."""
        found = await instances_of(self.api, deployment["id"])
        healthy = [i for i in found if i["state"] == "running" and i["healthy"]]
        stuck = [
            i for i in found if i["node_id"] in avoid and i["state"] not in ("stopped", "failed")
        ]
        return len(healthy) == deployment["instances_per_region"] and not stuck

    async def node(self, agent: StandInAgent) -> dict[str, Any]:
        return await self.api.ok("GET", f"/api/v1/nodes/{agent.node_id}")  # type: ignore[no-any-return]

    async def agent_hosting(
        self, deployment: dict[str, Any], among: list[StandInAgent]
    ) -> StandInAgent:
        """The first of ``among`` whose node runs an instance of ``deployment``."""
        found = await instances_of(self.api, deployment["id"])
        nodes = {i["node_id"] for i in found if i["state"] == "running"}
        for agent in among:
            if agent.node_id in nodes:
                return agent
        raise AssertionError(
            f"no instance of {deployment['name']} on {[a.hostname for a in among]}"
        )

    async def finish(self, never: Collection[str] = ()) -> None:
        """Stop everything, print the summary, and check the stream and the agents."""
        assert self.traffic is not None and self.watcher is not None
        await self.traffic.stop()
        await self.watcher.stop()
        for agent in self.agents:
            await agent.close()
        samples, flips = self.traffic.samples, self.watcher.flips
        problems = check_stream(samples, flips, never)
        failed = sum(1 for s in samples if s.status != 200)
        seconds = samples[-1].received - samples[0].sent if samples else 0.0
        print(
            f"\n{len(samples)} requests in {seconds:.1f} s on {self.traffic.connections}"
            f" connections, {failed} failed, largest gap {largest_gap(samples):.3f} s"
        )
        periods = steady_periods(samples, flips)
        steady = {id(flip): count for flip, count in periods}
        for flip in flips:
            alone = f", then {steady[id(flip)]} requests served alone" if id(flip) in steady else ""
            print(f"  flip at {flip.at - self.t0:6.2f} s -> {flip.version} ({flip.name}){alone}")
        for at, what in self.steps:
            print(f"  {at:6.2f} s  {what}")
        for agent in self.agents:
            print(f"  {agent.hostname}: {agent.heartbeats} heartbeats, {len(agent.notes)} notes")
        assert not self.watcher.errors, self.watcher.errors
        errors = [e for agent in self.agents for e in agent.errors]
        assert not errors, "\n".join(errors)
        assert samples, "no request was sent"
        assert not problems, f"{len(problems)} problems, the first:\n" + "\n".join(problems[:30])
        assert largest_gap(samples) < 2.0
        # Each version the stream met served alone for a while (the checks are not vacuous).
        assert all(count > 0 for _, count in periods), periods
        # No flip before the deployment's instances were up and healthy.
        for flip in flips:
            up = healthy_at(self.records(), flip.deployment_id, flip.at)
            assert len(up) >= PER_REGION, (flip, up)

    def diagnostics(self) -> str:
        parts = [agent.diagnostics() for agent in self.agents]
        parts.append("edge log (tail):\n" + "\n".join(self.edge.log().splitlines()[-80:]))
        return "\n".join(parts)


@contextlib.contextmanager
def explained(proof: Proof) -> Iterator[None]:
    """On a failure, print what the agents and the edge saw."""
    try:
        yield
    except BaseException:
        print(proof.diagnostics())
        raise


async def _close(proof: Proof) -> None:
    if proof.traffic is not None:
        await proof.traffic.stop()
    if proof.watcher is not None:
        await proof.watcher.stop()
    for agent in proof.agents:
        await agent.close()


@pytest.mark.asyncio
async def test_no_failed_request_through_rollouts_rollback_promote_drain_and_node_loss(
    empty_database_url: str, tmp_path: Path
) -> None:
    flags = (
        *COMMON_FLAGS,
        "--heartbeat-timeout",
        "3",
        "--rollback-window",
        "30",
        "--start-timeout",
        "8",
    )
    with running_edge(empty_database_url, tmp_path, *flags, env=ENV) as edge:
        proof = Proof(edge, Api(edge.admin_port, ADMIN_TOKEN))
        try:
            with explained(proof):
                await _rollouts(proof, empty_database_url)
        finally:
            await _close(proof)


async def _rollouts(proof: Proof, database_url: str) -> None:
    api = proof.api
    await proof.setup(database_url, ("node-a", "node-b", "node-c"))

    # 1. The first deployment; the stream starts once the domain serves it.
    v1 = await proof.rollout("v1")
    await proof.start_traffic("v1")
    await proof.hold()

    # 2. The next one; the former one drains (its instances still run for the window).
    v2 = await proof.rollout("v2")
    assert (await wait_for_status(api, v1, "draining", 5))["current"] is False
    await proof.hold()

    # 3. Rollback inside the window (v1's instances still run): v1 is current at once.
    assert await proof.serving(v1)
    back = await api.ok("POST", f"/api/v1/projects/{ORG}/{PROJECT}/rollback", {})
    proof.step("rolled back to v1 (200)")
    assert back["restarting"] is False and back["current"]["id"] == v1["id"], back
    assert back["previous"]["id"] == v2["id"], back
    await wait_for_status(api, v1, "active", 5)
    await wait_for_status(api, v2, "draining", 5)
    await proof.hold()

    # 4. Staging gets its own deployment, which is then promoted to production.
    staged = await proof.rollout("vS", environment="staging")
    assert (await current_deployment(api, "staging") or {}).get("id") == staged["id"]
    promoted = await api.ok(
        "POST",
        f"/api/v1/projects/{ORG}/{PROJECT}/promote",
        {"from": "staging", "to": "production"},
        status=201,
    )
    proof.step(f"promoted vS to production ({promoted['name']})")
    assert promoted["environment"] == "production" and promoted["env"]["VERSION"] == "vS"
    promoted = await wait_for_status(api, promoted, "active", ROLLOUT_TIMEOUT)
    proof.step("promoted vS active")
    await proof.hold()

    # 5. Drain a node that runs an instance of the current deployment.
    drained = await proof.agent_hosting(promoted, proof.agents)
    answer = await api.ok("POST", f"/api/v1/nodes/{drained.node_id}/drain")
    assert answer["state"] in ("draining", "drained"), answer
    proof.step(f"draining {drained.hostname}")

    async def drained_and_replaced() -> bool:
        node = await proof.node(drained)
        return (
            node["state"] == "drained"
            and not node["instance_list"]
            and not drained.servers
            and await proof.serving(promoted, avoid={drained.node_id})
        )

    await proof.until(f"{drained.hostname} drained, its instances replaced", drained_and_replaced)
    # Each of the drained node's instances of the current deployment was told to stop only
    # once its replacement was healthy: the deployment never ran short.
    records = proof.records()
    stops = [
        r
        for r in records
        if r.node_id == drained.node_id and r.deployment_id == promoted["id"] and r.what == "stop"
    ]
    assert stops, records
    for stop in stops:
        assert len(healthy_at(records, promoted["id"], stop.at)) >= PER_REGION, (stop, records)

    # 6. Another node that runs an instance of the current deployment goes silent.
    others = [a for a in proof.agents if a is not drained]
    silent = await proof.agent_hosting(promoted, others)
    await silent.kill_heartbeat()
    proof.step(f"{silent.hostname} silent")

    async def down_and_replaced() -> bool:
        node = await proof.node(silent)
        return node["state"] == "down" and await proof.serving(
            promoted, avoid={silent.node_id, drained.node_id}
        )

    await proof.until(f"{silent.hostname} down, its instances replaced", down_and_replaced)
    for instance in await instances_of(api, promoted["id"]):
        if instance["node_id"] == silent.node_id:
            assert instance["state"] == "stopped", instance
            message = instance["message"] or ""
            assert silent.hostname in message or silent.node_id in message, instance

    # 7. A deployment that never gets healthy fails; the current one keeps serving.
    broken = await deploy(api, "v3", per_region=PER_REGION, env={"FAIL_HEALTH": "1"})
    proof.step(f"v3 created ({broken['name']}), unhealthy")
    failed = await wait_for_status(api, broken, "failed", 8 + ROLLOUT_TIMEOUT)
    proof.step(f"v3 failed: {failed['failure_reason']}")
    assert failed["failure_reason"], failed
    assert failed["current"] is False
    assert (await current_deployment(api) or {}).get("id") == promoted["id"]
    unhealthy = [r for r in proof.records() if r.deployment_id == broken["id"]]
    assert any(r.what == "unhealthy" for r in unhealthy), unhealthy
    live = [a for a in proof.agents if not a.partitioned]

    async def v3_stopped() -> bool:
        return not any(s.version == "v3" for a in live for s in a.servers.values())

    await proof.until("v3's instances stopped", v3_stopped, 5)
    await asyncio.sleep(1.5)  # the stream goes on through the failure's aftermath
    await proof.finish(never={"v3"})


@pytest.mark.asyncio
async def test_rollback_after_the_window_restarts_the_old_deployment(
    empty_database_url: str, tmp_path: Path
) -> None:
    flags = (*COMMON_FLAGS, "--rollback-window", "1", "--start-timeout", "8")
    with running_edge(empty_database_url, tmp_path, *flags, env=ENV) as edge:
        proof = Proof(edge, Api(edge.admin_port, ADMIN_TOKEN))
        try:
            with explained(proof):
                await _late_rollback(proof, empty_database_url)
        finally:
            await _close(proof)


async def _late_rollback(proof: Proof, database_url: str) -> None:
    api = proof.api
    await proof.setup(database_url, ("node-a", "node-b", "node-c"))
    v1 = await proof.rollout("v1")
    await proof.start_traffic("v1")
    await proof.hold()
    v2 = await proof.rollout("v2")

    # Past the window, v1 is inactive and its instances stopped (by the agents).
    await wait_for_status(api, v1, "inactive", 10)

    async def v1_stopped() -> bool:
        found = await instances_of(api, v1["id"])
        running = [s for a in proof.agents for s in a.servers.values() if s.version == "v1"]
        return bool(found) and all(i["state"] == "stopped" for i in found) and not running

    await proof.until("v1 inactive, its instances stopped", v1_stopped)
    await proof.hold()

    status, answer = await api.call("POST", f"/api/v1/projects/{ORG}/{PROJECT}/rollback", {})
    assert status == 202, (status, answer)
    proof.step("rollback to v1 accepted (202)")
    # v2 stays current until v1 runs again.
    assert answer["restarting"] is True, answer
    assert answer["current"]["id"] == v2["id"] and answer["previous"]["id"] == v1["id"], answer
    v1 = await wait_for_status(api, v1, "active", ROLLOUT_TIMEOUT)
    assert v1["current"] is True
    proof.step("v1 active again")
    assert await proof.serving(v1)
    await proof.hold()
    await proof.finish()


def test_the_stream_check_is_not_vacuous() -> None:
    """The checks above catch a failed request, a version served well after its flip away,
    one served before its flip, and a version that must never serve."""
    flips = [Flip(10.0, "v1", "a", "1"), Flip(20.0, "v2", "b", "2")]
    good = [
        Sample(11.0, 11.1, 200, "v1"),
        Sample(20.5, 20.6, 200, "v1"),  # within the settle interval after the flip
        Sample(19.5, 19.6, 200, "v2"),  # the flip was seen late, routing followed at once
        Sample(25.0, 25.1, 200, "v2"),
    ]
    assert check_stream(good, flips, never={"v3"}) == []
    bad = [
        Sample(12.0, 12.1, 502, "", "bad gateway"),
        Sample(22.0, 22.1, 200, "v1"),
        Sample(15.0, 15.1, 200, "v2"),
        Sample(16.0, 16.1, 200, "v3"),
    ]
    assert len(check_stream(bad, flips, never={"v3"})) == 5
    # v1 flipped before the stream began; v2 then served alone once.
    assert [(f.version, count) for f, count in steady_periods(good, flips)] == [("v2", 1)]
