"""The scheduler's passes against PostgreSQL: snapshot, plan, fenced and guarded apply, and
the loop waking on notifications. Agents are played through the store's own report calls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import pytest
import pytest_asyncio

from edge.leader import KEY, LeaderLock
from edge.scheduling import SchedulerLoop
from edge.store import Conflict, deployments, environments, instances, nodes, projects, regions
from edge.store.db import create_pool
from edge.store.scheduling import apply_plan, holds_lock, load_snapshot
from scheduler.reconciler import Settings, plan
from tests.store.conftest import TABLES

SETTINGS = Settings(start_timeout=30, rollback_window=0.5, heartbeat_timeout=30)


@dataclass
class Platform:
    pool: Any
    lock: LeaderLock
    loop: SchedulerLoop
    env: UUID
    project: UUID
    nodes: list[UUID]

    async def deploy(self, per_region: int = 1, **fields: Any) -> UUID:
        made = await deployments.create(
            self.pool,
            project_id=self.project,
            environment_id=self.env,
            command="serve",
            instances_per_region=per_region,
            **fields,
        )
        return made.id

    async def run_all(self, deployment_id: UUID, *, healthy: bool = True) -> None:
        """The agents start the deployment's pending instances and report them."""
        for n, i in enumerate(await instances.list_for_deployment(self.pool, deployment_id)):
            if i.state == "pending":
                await instances.report(
                    self.pool, i.id, "running", address="127.0.0.1", port=20000 + n
                )
                await instances.set_health(self.pool, i.id, healthy)

    async def passes(self, count: int = 3) -> None:
        for _ in range(count):
            await self.loop.run_pass()

    async def status(self, deployment_id: UUID) -> str:
        return (await deployments.get(self.pool, deployment_id)).status


@pytest_asyncio.fixture
async def platform(migrated_url: str) -> AsyncIterator[Platform]:
    pool = await create_pool(migrated_url, min_size=1, max_size=4)
    await pool.execute(f"TRUNCATE {TABLES} CASCADE")
    await regions.create(pool, "eu", "Europe", "DE")
    made = [
        await nodes.create(
            pool, region="eu", hostname=f"n{i}", address=f"10.0.0.{i}", vcpu=4, memory_mb=4096
        )
        for i in range(3)
    ]
    for node in made:
        await nodes.heartbeat(pool, node.id)
    project = await projects.create_with_environments(pool, "acme", "web", ["production"])
    env = await environments.get_by_name(pool, project.id, "production")
    lock = LeaderLock(migrated_url, interval=0.1)
    lock.start()
    for _ in range(100):
        if lock.is_leader:
            break
        await asyncio.sleep(0.05)
    assert lock.is_leader
    loop = SchedulerLoop(pool, migrated_url, lock, SETTINGS, interval=30.0)
    yield Platform(pool, lock, loop, env.id, project.id, [n.id for n in made])
    await loop.stop()
    await lock.stop()
    await pool.close()


@pytest.mark.asyncio
async def test_rollout_through_the_database(platform: Platform) -> None:
    p = platform
    v1 = await p.deploy(per_region=2)
    await p.passes(1)
    d = await deployments.get(p.pool, v1)
    assert (d.status, d.regions) == ("starting", ["eu"])
    assert d.placing_at is not None and d.starting_at is not None
    placed = await instances.list_for_deployment(p.pool, v1)
    assert len(placed) == 2 and len({i.node_id for i in placed}) == 2
    # The agents see them.
    assert placed[0].node_id is not None
    assigned = await instances.list_assignments(p.pool, placed[0].node_id)
    assert [a.instance_id for a in assigned] == [placed[0].id]

    await p.run_all(v1)
    await p.passes()
    d = await deployments.get(p.pool, v1)
    assert d.status == "active" and d.healthy_at is not None and d.active_at is not None
    assert (await environments.get(p.pool, p.env)).current_deployment_id == v1

    v2 = await p.deploy(per_region=2)
    await p.passes()
    await p.run_all(v2)
    await p.passes()
    env = await environments.get(p.pool, p.env)
    assert (env.current_deployment_id, env.previous_deployment_id) == (v2, v1)
    assert await p.status(v1) == "draining"
    await asyncio.sleep(0.6)  # the rollback window
    await p.passes()
    assert await p.status(v1) == "inactive"
    assert {i.state for i in await instances.list_for_deployment(p.pool, v1)} == {"stopping"}


@pytest.mark.asyncio
async def test_never_healthy_fails_with_its_reason_in_the_database(platform: Platform) -> None:
    p = platform
    p.loop.settings = Settings(start_timeout=0.5, rollback_window=60, heartbeat_timeout=30)
    v1 = await p.deploy()
    await p.passes(1)
    await p.run_all(v1, healthy=False)
    await asyncio.sleep(0.6)
    await p.passes()
    d = await deployments.get(p.pool, v1)
    assert d.status == "failed" and d.failed_at is not None
    assert d.failure_reason is not None
    assert d.failure_reason.startswith("not healthy within 0.5 s (eu: 0 of 1 healthy")
    assert (await environments.get(p.pool, p.env)).current_deployment_id is None


@pytest.mark.asyncio
async def test_a_silent_node_is_marked_down_and_replaced(platform: Platform) -> None:
    p = platform
    v1 = await p.deploy(per_region=2)
    await p.passes(1)
    await p.run_all(v1)
    await p.passes()
    lost = (await instances.list_for_deployment(p.pool, v1))[0]
    assert lost.node_id is not None
    await p.pool.execute(
        "UPDATE nodes SET last_heartbeat = now() - interval '1 minute' WHERE id = $1",
        lost.node_id,
    )
    await p.passes(1)
    assert (await nodes.get(p.pool, lost.node_id)).state == "down"
    after = {i.id: i for i in await instances.list_for_deployment(p.pool, v1)}
    hostname = (await nodes.get(p.pool, lost.node_id)).hostname
    assert after[lost.id].state == "stopped"
    assert after[lost.id].message == f"node {hostname} is down"
    fresh = [i for i in after.values() if i.state == "pending"]
    assert len(fresh) == 1 and fresh[0].node_id not in (lost.node_id,)
    # A node that heartbeats again is ready, but gets nothing back by itself.
    await nodes.check_in(p.pool, lost.node_id)
    await p.passes()
    assert (await nodes.get(p.pool, lost.node_id)).state == "ready"
    assert len(await instances.list_assignments(p.pool, lost.node_id)) == 0


@pytest.mark.asyncio
async def test_a_stale_plan_writes_nothing(platform: Platform) -> None:
    p = platform
    v1 = await p.deploy()
    async with p.pool.acquire() as conn:
        stale = plan(await load_snapshot(conn), SETTINGS)
    # Meanwhile the deployment moved on (another writer).
    await deployments.transition(p.pool, v1, "pending", "placing")
    async with p.pool.acquire() as conn:
        with pytest.raises(Conflict, match="not pending"):
            await apply_plan(conn, stale.actions, SETTINGS)
    assert await instances.list_for_deployment(p.pool, v1) == []


@pytest.mark.asyncio
async def test_writes_are_fenced_by_the_leader_lock(platform: Platform) -> None:
    p = platform
    fence = p.lock.fence
    assert fence is not None
    async with p.pool.acquire() as conn:
        assert await holds_lock(conn, *fence)
        assert not await holds_lock(conn, KEY, fence[1] + 1)
        assert not await holds_lock(conn, KEY + 1, fence[1])
    v1 = await p.deploy()

    other_session = fence[1] + 1

    class Deposed:
        """An edge that still believes it leads: its lock session is another one."""

        is_leader = True
        fence = (KEY, other_session)

    stale = SchedulerLoop(p.pool, "", Deposed(), SETTINGS)
    assert await stale.run_pass() is None
    assert await p.status(v1) == "pending"


@pytest.mark.asyncio
async def test_the_loop_wakes_on_a_new_deployment(platform: Platform, migrated_url: str) -> None:
    p = platform
    p.loop.start()  # tick every 30 s: only a notification can wake it in time
    await asyncio.sleep(0.5)  # it listens once it has seen it leads
    v1 = await p.deploy()
    for _ in range(100):
        if await p.status(v1) == "starting":
            break
        await asyncio.sleep(0.05)
    assert await p.status(v1) == "starting"
