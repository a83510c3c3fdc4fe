"""Each rule of the routing table as compiled from the database (edge.store.routes)."""

from __future__ import annotations

from typing import Any

import pytest

from edge.routing import RoutingTable, parse_address
from edge.store.routes import load_routes
from tests.live_routes.seed import Seed

pytestmark = pytest.mark.asyncio

APPS = "zeitwork.app"


async def table(db: Any, apps_domain: str = APPS) -> RoutingTable:
    return await load_routes(db, apps_domain)


def hosts(t: RoutingTable) -> dict[str, list[str]]:
    return {host: sorted(str(a) for a in addresses) for host, addresses in t.routes.items()}


async def test_deployment_host_is_project_nanoid_org_under_the_apps_domain(
    db: Any, seed: Seed
) -> None:
    _, _, deployment, nano = await seed.app("acme", "shop")
    _, a = await seed.instance(deployment, region="eu-1")
    _, b = await seed.instance(deployment, region="us-1")
    t = await table(db)
    assert hosts(t) == {f"shop-{nano}-acme.zeitwork.app": sorted([a, b])}
    assert {str(k): v for k, v in t.regions.items()} == {a: "eu-1", b: "us-1"}
    other = await table(db, "apps.example.net")
    assert list(other.routes) == [f"shop-{nano}-acme.apps.example.net"]


async def test_only_running_healthy_instances_with_an_address_serve(db: Any, seed: Seed) -> None:
    _, _, deployment, nano = await seed.app()
    _, ready = await seed.instance(deployment)
    await seed.instance(deployment, healthy=False)
    await seed.instance(deployment, state="starting")
    await seed.instance(deployment, state="stopping")
    await seed.instance(deployment, state="stopped")
    await seed.instance(deployment, state="failed")
    await seed.instance(deployment, state="pending", healthy=False)
    await seed.instance(deployment, address=None)
    assert hosts(await table(db)) == {f"web-{nano}-acme.zeitwork.app": [ready]}


async def test_an_instance_leaves_the_route_when_it_turns_unhealthy_or_stops(
    db: Any, seed: Seed
) -> None:
    _, _, deployment, nano = await seed.app()
    first, a = await seed.instance(deployment)
    second, b = await seed.instance(deployment)
    host = f"web-{nano}-acme.zeitwork.app"
    assert hosts(await table(db))[host] == sorted([a, b])
    await seed.set_instance(first, healthy=False)
    assert hosts(await table(db))[host] == [b]
    await seed.set_instance(second, state="stopped")
    assert hosts(await table(db))[host] == []  # active deployment: still routed, 503


@pytest.mark.parametrize(
    ("status", "routed"),
    [
        ("pending", False),
        ("placing", False),
        ("starting", False),
        ("healthy", True),
        ("active", True),
        ("draining", True),
        ("inactive", False),
        ("failed", False),
    ],
)
async def test_a_deployment_without_ready_instances_is_routed_only_while_it_serves(
    db: Any, seed: Seed, status: str, routed: bool
) -> None:
    _, _, deployment, nano = await seed.app(status=status)
    await seed.instance(deployment, state="starting", healthy=False)
    expected: dict[str, list[str]] = {f"web-{nano}-acme.zeitwork.app": []} if routed else {}
    assert hosts(await table(db)) == expected


async def test_a_starting_deployment_with_a_ready_instance_is_routed(db: Any, seed: Seed) -> None:
    # Its own URL reaches it before it becomes current (the rollout's health checks).
    _, _, deployment, nano = await seed.app(status="starting")
    _, a = await seed.instance(deployment)
    assert hosts(await table(db)) == {f"web-{nano}-acme.zeitwork.app": [a]}


async def test_an_unverified_domain_is_not_routed(db: Any, seed: Seed) -> None:
    project, environment, deployment, nano = await seed.app()
    await seed.instance(deployment)
    await seed.domain("shop.example.com", project, environment, verified=False)
    assert list((await table(db)).routes) == [f"web-{nano}-acme.zeitwork.app"]


async def test_a_verified_domain_follows_the_current_deployment(db: Any, seed: Seed) -> None:
    project, environment, old, old_nano = await seed.app()
    _, old_instance = await seed.instance(old)
    new, new_nano = await seed.deployment(project, environment, status="healthy")
    _, new_instance = await seed.instance(new, region="us-1")
    await seed.domain("shop.example.com", project, environment)
    t = await table(db)
    assert hosts(t) == {
        "shop.example.com": [old_instance],
        f"web-{old_nano}-acme.zeitwork.app": [old_instance],
        f"web-{new_nano}-acme.zeitwork.app": [new_instance],
    }
    await seed.set_current(environment, new)
    t = await table(db)
    assert hosts(t)["shop.example.com"] == [new_instance]
    assert t.regions[parse_address(new_instance)] == "us-1"
    await seed.set_current(environment, old)  # rollback
    assert hosts(await table(db))["shop.example.com"] == [old_instance]


async def test_a_verified_domain_with_nothing_ready_answers_503_and_without_current_404(
    db: Any, seed: Seed
) -> None:
    project, environment, _, _ = await seed.app()
    await seed.domain("shop.example.com", project, environment)
    assert hosts(await table(db))["shop.example.com"] == []
    await seed.set_current(environment, None)
    assert "shop.example.com" not in (await table(db)).routes


async def test_domains_of_other_environments_follow_their_own(db: Any, seed: Seed) -> None:
    project, production, prod_deployment, _ = await seed.app()
    staging = await seed.environment(project, "staging")
    staging_deployment, _ = await seed.deployment(project, staging)
    await seed.set_current(staging, staging_deployment)
    _, prod = await seed.instance(prod_deployment)
    _, stage = await seed.instance(staging_deployment)
    await seed.domain("shop.example.com", project, production)
    await seed.domain("staging.shop.example.com", project, staging)
    t = hosts(await table(db))
    assert t["shop.example.com"] == [prod]
    assert t["staging.shop.example.com"] == [stage]


async def test_a_deployment_host_wins_over_a_domain_of_the_same_name(db: Any, seed: Seed) -> None:
    _, _, deployment, nano = await seed.app()
    _, mine = await seed.instance(deployment)
    other_project, other_env, other_deployment, _ = await seed.app("evil", "corp")
    await seed.instance(other_deployment)
    await seed.domain(f"web-{nano}-acme.zeitwork.app", other_project, other_env)
    assert hosts(await table(db))[f"web-{nano}-acme.zeitwork.app"] == [mine]


async def test_many_hosts_share_instance_addresses_once(db: Any, seed: Seed) -> None:
    project, environment, deployment, _ = await seed.app()
    await seed.instance(deployment)
    for i in range(3):
        await seed.domain(f"d{i}.example.com", project, environment)
    t = await table(db)
    assert len(t) == 4
    first = [addresses[0] for addresses in t.routes.values()]
    assert all(address is first[0] for address in first)  # one Address object, shared


async def test_hosts_of_a_rate_limited_project_carry_its_limit(db: Any, seed: Seed) -> None:
    project, environment, deployment, nano = await seed.app("acme", "shop")
    await seed.instance(deployment)
    await seed.domain("shop.example.org", project, environment)
    _, _, other, other_nano = await seed.app("acme", "blog")
    await seed.instance(other)
    await db.execute(
        "UPDATE projects SET rate_limit_rps = 50, rate_limit_burst = 80 WHERE id = $1", project
    )
    t = await table(db)
    limit = (str(project), 50, 80)
    assert t.limits == {f"shop-{nano}-acme.zeitwork.app": limit, "shop.example.org": limit}
    assert f"blog-{other_nano}-acme.zeitwork.app" not in t.limits
    # Without a burst, a second's worth.
    await db.execute("UPDATE projects SET rate_limit_burst = NULL WHERE id = $1", project)
    assert (await table(db)).limits["shop.example.org"] == (str(project), 50, 50)
