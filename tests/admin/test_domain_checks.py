"""The leader's periodic DNS check of verified domains, against a DNS server on loopback and
real PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from edge.domain_checks import DomainChecker
from edge.store import domains, environments
from edge.store.db import connect
from tests.admin.conftest import AdminClient
from tests.admin.test_domains import EDGE, Zone, make_project
from tests.admin.test_domains import zone as zone_fixture  # noqa: F401 (a fixture)


class Leader:
    is_leader = True


async def _domain(pool: Any, name: str, *, verified: bool = True) -> domains.Domain:
    project = await make_project(pool, "acme", name.split(".", maxsplit=1)[0])
    env = await environments.get_by_name(pool, project.id, "production")
    made = await domains.create(pool, name, project_id=project.id, environment_id=env.id)
    if verified:
        made = await domains.record_check(pool, made.id, verified=True, pointing=True)
        # Verified a while ago: due for its periodic check.
        await pool.execute(
            "UPDATE domains SET last_checked_at = now() - interval '2 minutes' WHERE id = $1",
            made.id,
        )
    return made


@pytest.mark.asyncio
async def test_verified_domains_are_checked_again_and_a_lost_one_is_flagged(
    admin: AdminClient,
    zone_fixture: tuple[Zone, int],  # noqa: F811 (the imported fixture)
    caplog: pytest.LogCaptureFixture,
) -> None:
    records, port = zone_fixture
    pool = admin.pool
    by_cname = await _domain(pool, "shop.example.com")
    by_txt = await _domain(pool, "apex.example.org")
    pending = await _domain(pool, "new.example.net", verified=False)
    records.cnames["shop.example.com"] = EDGE
    records.txts["_zeitwork.apex.example.org"] = [by_txt.verification_token]
    registry = CollectorRegistry()
    checker = DomainChecker(
        pool, Leader(), EDGE, nameservers=[f"127.0.0.1:{port}"], interval=60, registry=registry
    )

    assert await checker.run_once() == 2  # the verified ones only
    for made, cname in ((by_cname, True), (by_txt, False)):
        found = await domains.get_by_name(pool, made.name)
        assert found.last_check_ok is True and found.last_checked_at is not None
        assert found.pointing_at_edge is cname  # the CNAME alone
    assert (await domains.get_by_name(pool, pending.name)).last_checked_at is None
    # Checked within the interval: not again yet.
    assert await checker.run_once() == 0

    # The customer moves the domain away: the next check flags it, once in the log, and it
    # stays verified (its route does not flap on a DNS change).
    records.cnames["shop.example.com"] = "elsewhere.example.net"
    await pool.execute("UPDATE domains SET last_checked_at = now() - interval '2 minutes'")
    with caplog.at_level(logging.WARNING, logger="edge.domains"):
        assert await checker.run_once() == 2
        await pool.execute("UPDATE domains SET last_checked_at = now() - interval '2 minutes'")
        assert await checker.run_once() == 2
    lost = await domains.get_by_name(pool, "shop.example.com")
    assert lost.last_check_ok is False and lost.verified_at is not None
    assert lost.pointing_at_edge is False
    # The API flags it.
    (answer,) = await admin.ok("GET", "/api/v1/projects/acme/shop/domains")
    assert answer["dns_ok"] is False and answer["state"] == "verified"
    warnings = [r.getMessage() for r in caplog.records if "no longer leads" in r.getMessage()]
    assert warnings == [
        "domain shop.example.com no longer leads to the edge: CNAME elsewhere.example.net, "
        "TXT _zeitwork.shop.example.com NXDOMAIN"
    ]
    assert registry.get_sample_value("zeitwork_domains_not_pointing") == 1
    assert registry.get_sample_value("zeitwork_domain_checks_total", {"result": "lost"}) == 2

    # Back: recorded, and logged as such.
    records.cnames["shop.example.com"] = EDGE
    await pool.execute("UPDATE domains SET last_checked_at = now() - interval '2 minutes'")
    with caplog.at_level(logging.INFO, logger="edge.domains"):
        await checker.run_once()
    assert (await domains.get_by_name(pool, "shop.example.com")).last_check_ok is True
    assert "domain shop.example.com leads to the edge again" in caplog.text
    assert registry.get_sample_value("zeitwork_domains_not_pointing") == 0


@pytest.mark.asyncio
async def test_only_the_leader_checks(
    admin: AdminClient,
    zone_fixture: tuple[Zone, int],  # noqa: F811 (the imported fixture)
) -> None:
    class Follower:
        is_leader = False

    records, port = zone_fixture
    records.cnames["shop.example.com"] = EDGE
    made = await _domain(admin.pool, "shop.example.com")
    await admin.pool.execute("UPDATE domains SET last_checked_at = now() - interval '1 hour'")
    before = (await domains.get_by_name(admin.pool, made.name)).last_checked_at

    async def checked_after(leader: Any, seconds: float) -> bool:
        checker = DomainChecker(
            admin.pool, leader, EDGE, nameservers=[f"127.0.0.1:{port}"], interval=60
        )
        checker.start()
        try:
            await asyncio.sleep(seconds)
        finally:
            await checker.stop()
        return (await domains.get_by_name(admin.pool, made.name)).last_checked_at != before

    assert not await checked_after(Follower(), 0.5)
    assert await checked_after(Leader(), 1.0)


@pytest.mark.asyncio
async def test_recording_a_check_does_not_reload_the_routes(
    admin: AdminClient, migrated_url: str
) -> None:
    made = await _domain(admin.pool, "shop.example.com", verified=False)
    heard: list[str] = []
    listener = await connect(migrated_url)
    try:
        await listener.add_listener("zeitwork_routes", lambda *args: heard.append(args[3]))
        # Verifying changes what routes: every edge reloads.
        await domains.record_check(admin.pool, made.id, verified=True, pointing=True)
        await asyncio.sleep(0.3)
        assert heard == ["domains"]
        # Checking it again changes nothing that routes.
        await domains.record_check(admin.pool, made.id, verified=False, pointing=False)
        await domains.record_check(admin.pool, made.id, verified=True, pointing=True)
        await asyncio.sleep(0.3)
        assert heard == ["domains"]
    finally:
        await listener.close()
