"""The route-change trigger: a change to any table that feeds the routing table notifies
``zeitwork_routes`` (payload: the table), seen by a listener on another connection."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from edge.store import deployments, domains, environments, instances, projects, regions
from edge.store.db import connect

Change = Callable[[Any, dict[str, Any]], Awaitable[object]]

CHANGES: dict[str, Change] = {
    "projects": lambda db, s: projects.update(db, s["project"].id, rate_limit_rps=5),
    "environments": lambda db, s: environments.set_current(db, s["env"].id, s["deployment"].id),
    "deployments": lambda db, s: deployments.transition(
        db, s["deployment"].id, "pending", "placing"
    ),
    "instances": lambda db, s: instances.set_health(db, s["instance"].id, True),
    "domains": lambda db, s: domains.record_check(db, s["domain"].id, verified=True, pointing=True),
    # What the HTTPS listener serves, and the ACME challenges that plain HTTP answers.
    "certificates": lambda db, s: db.execute(
        "INSERT INTO certificates (domain, cert_pem, key_encrypted, not_before, not_after)"
        " VALUES ('app.customer.org', 'pem', 'key', now(), now() + interval '1 day')"
    ),
    "acme_challenges": lambda db, s: db.execute(
        "INSERT INTO acme_challenges (token, key_authorization, domain, expires_at)"
        " VALUES ('token', 'token.key', 'app.customer.org', now() + interval '1 minute')"
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("table", sorted(CHANGES))
async def test_change_notifies(pool: Any, migrated_url: str, table: str) -> None:
    project = await projects.create(pool, "acme", "web")
    env = await environments.create(pool, project.id, "production")
    deployment = await deployments.create(
        pool, project_id=project.id, environment_id=env.id, image="i"
    )
    await regions.create(pool, "eu", "Europe", "DE")
    setup = {
        "project": project,
        "env": env,
        "deployment": deployment,
        "instance": await instances.create(pool, deployment_id=deployment.id, region="eu"),
        "domain": await domains.create(
            pool, "app.customer.org", project_id=project.id, environment_id=env.id
        ),
    }
    listener = await connect(migrated_url)
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener(
            "zeitwork_routes", lambda _conn, _pid, _channel, payload: received.put_nowait(payload)
        )
        await CHANGES[table](pool, setup)
        payloads = {await asyncio.wait_for(received.get(), 5)}
        while not received.empty():
            payloads.add(received.get_nowait())
        assert payloads == {table}
    finally:
        await listener.close()


@pytest.mark.asyncio
async def test_other_tables_stay_quiet(pool: Any, migrated_url: str) -> None:
    listener = await connect(migrated_url)
    received: asyncio.Queue[str] = asyncio.Queue()
    try:
        await listener.add_listener(
            "zeitwork_routes", lambda _conn, _pid, _channel, payload: received.put_nowait(payload)
        )
        await regions.create(pool, "eu", "Europe", "DE")
        # A change that does notify, after the quiet one: when it arrives, the other would
        # have arrived before it (notifications keep commit order).
        await projects.create(pool, "acme", "web")
        assert await asyncio.wait_for(received.get(), 5) == "projects"
    finally:
        await listener.close()
