"""Leader failover of the embedded scheduler: two edges on one database, the scheduler runs
on the leader only; when the leader dies (SIGKILL of its whole process group, so nothing is
released politely), the other edge takes the leader lock and rolls out a deployment created
after the death within 10 s plus the deployment's own start time.

The stand-in agent (:mod:`tests.scheduler.standin`) talks to the edge that survives, as an
agent behind a load balancer would after the dead edge left it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.admin.process import EdgeProcess, running_edge
from tests.scheduler.standin import Api, deploy, seed_platform, start_agents, wait_for_status

pytestmark = pytest.mark.asyncio

ADMIN_TOKEN = "failover-admin-token-0123456789"
BOOTSTRAP_TOKEN = "failover-bootstrap-token-0123456789"
ENV = {"ZEITWORK_ADMIN_TOKEN": ADMIN_TOKEN, "ZEITWORK_BOOTSTRAP_TOKEN": BOOTSTRAP_TOKEN}
FLAGS = ("--admin-rate-limit", "1000/1000", "--scheduler-interval", "0.5", "--start-timeout", "8")
TAKEOVER = 10.0


async def is_leader(edge: EdgeProcess) -> bool:
    status, health = await Api(edge.admin_port, ADMIN_TOKEN).call("GET", "/health")
    assert status == 200, health
    return bool(health["leader"])


async def find_leader(a: EdgeProcess, b: EdgeProcess) -> tuple[EdgeProcess, EdgeProcess]:
    """(leader, follower), once exactly one of the two holds the lock."""
    deadline = time.monotonic() + 10
    while True:
        leaders = [await is_leader(a), await is_leader(b)]
        if any(leaders):
            assert leaders != [True, True], "two leaders"
            return (a, b) if leaders[0] else (b, a)
        assert time.monotonic() < deadline, "no leader within 10 s"
        await asyncio.sleep(0.2)


async def test_another_edge_takes_over_the_scheduler_within_ten_seconds(
    empty_database_url: str, tmp_path: Path
) -> None:
    with (
        running_edge(empty_database_url, tmp_path, *FLAGS, env=ENV, name="a") as a,
        running_edge(empty_database_url, tmp_path, *FLAGS, env=ENV, name="b") as b,
    ):
        leader, survivor = await find_leader(a, b)
        api = Api(survivor.admin_port, ADMIN_TOKEN)
        await seed_platform(api)
        agents = await start_agents(Api(survivor.admin_port, BOOTSTRAP_TOKEN), "node-a")
        try:
            # The leader rolls out a first deployment: how long one takes here.
            created = await deploy(api, "v1", per_region=1)
            began = time.monotonic()
            await wait_for_status(api, created, "active", 20)
            start_time = time.monotonic() - began

            os.killpg(os.getpgid(leader.proc.pid), signal.SIGKILL)
            killed = time.monotonic()
            created = await deploy(api, "v2", per_region=1)
            bound = TAKEOVER + start_time
            took_lock: float | None = None
            while True:
                if took_lock is None and await is_leader(survivor):
                    took_lock = time.monotonic() - killed
                found = await api.ok("GET", f"/api/v1/deployments/{created['id']}")
                if found["status"] == "active":
                    break
                assert found["status"] != "failed", found
                waited = time.monotonic() - killed
                assert waited < bound, (
                    f"v2 is {found['status']} {waited:.1f} s after the leader died "
                    f"(bound {bound:.1f} s); the survivor's log:\n{survivor.log()[-4000:]}"
                )
                await asyncio.sleep(0.1)
            active_after = time.monotonic() - killed
            assert leader.proc.wait(5) == -signal.SIGKILL
            print(
                f"\nv1 rolled out in {start_time:.2f} s; after SIGKILL of the leader, the other"
                f" edge took the lock in {took_lock or active_after:.2f} s and v2 was active"
                f" {active_after:.2f} s after the kill (bound {bound:.2f} s)"
            )
            assert await is_leader(survivor)
            assert found["current"] is True
        finally:
            for agent in agents:
                await agent.close()
        errors = [e for agent in agents for e in agent.errors]
        assert not errors, "\n".join(errors)
