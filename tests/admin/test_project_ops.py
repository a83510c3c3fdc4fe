"""Operations on a project's environments: rollback, promote, and the routing and health views
an operator checks after one."""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

import pytest

from edge.store import deployments, domains, environments, instances, nodes, projects, regions
from tests.admin.conftest import AdminClient, error_of
from tests.seeding import force_status

PROJECT = "/api/v1/projects/acme/webapp"
APPS = "zeitwork.test"  # the fixture's apps domain


async def _project(admin: AdminClient) -> projects.Project:
    await admin.ok("POST", "/api/v1/projects", {"name": "webapp", "org": "acme"}, 201)
    return await projects.get_by_name(admin.pool, "acme", "webapp")


async def _env(admin: AdminClient, project: projects.Project, name: str) -> UUID:
    return (await environments.get_by_name(admin.pool, project.id, name)).id


async def _deploy(
    admin: AdminClient,
    project: projects.Project,
    environment: str = "production",
    *,
    current: bool = False,
    status: deployments.Status | None = None,
    **fields: Any,
) -> deployments.Deployment:
    env_id = await _env(admin, project, environment)
    fields.setdefault("image", "ghcr.io/acme/webapp:1")
    deployment = await deployments.create(
        admin.pool, project_id=project.id, environment_id=env_id, **fields
    )
    if status is not None:
        deployment = await force_status(admin.pool, deployment.id, status)
    if current:
        await environments.set_current(admin.pool, env_id, deployment.id)
    return deployment


def _name(deployment: deployments.Deployment) -> str:
    return f"webapp-{deployment.nanoid}-acme"


# -- rollback -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_rollback_swaps_current_and_previous(admin: AdminClient) -> None:
    project = await _project(admin)
    nothing = await admin.call("POST", PROJECT + "/rollback")
    assert nothing.status == 409
    assert "no previous deployment" in error_of(nothing)["message"]

    first = await _deploy(admin, project, current=True, commit_sha="aaa", status="active")
    only_one = await admin.call("POST", PROJECT + "/rollback")
    assert only_one.status == 409 and error_of(only_one)["field"] == "environment"
    # The first one is in its rollback window: its instances still run.
    await force_status(admin.pool, first.id, "draining")
    second = await _deploy(admin, project, current=True, commit_sha="bbb", status="active")

    # The guide's curl: no body, production. At once: 200.
    rolled = await admin.ok("POST", PROJECT + "/rollback")
    assert rolled["restarting"] is False
    assert rolled["environment"] == "production"
    assert rolled["current"]["id"] == str(first.id) and rolled["current"]["current"] is True
    assert rolled["current"]["name"] == _name(first)
    assert rolled["current"]["url"] == f"https://{_name(first)}.{APPS}"
    assert rolled["previous"]["id"] == str(second.id) and rolled["previous"]["current"] is False
    env = await environments.get_by_name(admin.pool, project.id, "production")
    assert (env.current_deployment_id, env.previous_deployment_id) == (first.id, second.id)
    detail = await admin.ok("GET", PROJECT)
    assert detail["environments"][0]["current_deployment"] == _name(first)
    assert detail["environments"][0]["previous_deployment"] == _name(second)

    # Through the lifecycle: the one left starts its rollback window.
    assert rolled["current"]["status"] == "active" and rolled["previous"]["status"] == "draining"

    # A second rollback undoes the first.
    again = await admin.ok("POST", PROJECT + "/rollback", {"environment": "production"})
    assert again["current"]["id"] == str(second.id) and again["previous"]["id"] == str(first.id)
    assert (await deployments.get(admin.pool, first.id)).status == "draining"
    assert (await deployments.get(admin.pool, second.id)).status == "active"


@pytest.mark.asyncio
async def test_rollback_after_the_window_restarts_the_previous_deployment(
    admin: AdminClient,
) -> None:
    project = await _project(admin)
    first = await _deploy(admin, project, current=True, status="inactive")
    second = await _deploy(admin, project, current=True, status="active")
    rolled = await admin.ok("POST", PROJECT + "/rollback", status=202)
    # Its instances were stopped: it is placed again, and stays previous until it is healthy
    # (the scheduler then makes it current); the current one keeps serving meanwhile.
    assert rolled["restarting"] is True
    assert rolled["current"]["id"] == str(second.id) and rolled["current"]["status"] == "active"
    assert rolled["previous"]["id"] == str(first.id) and rolled["previous"]["status"] == "placing"
    env = await environments.get_by_name(admin.pool, project.id, "production")
    assert (env.current_deployment_id, env.previous_deployment_id) == (second.id, first.id)
    # Asking again while it restarts changes nothing.
    again = await admin.ok("POST", PROJECT + "/rollback", status=202)
    assert again["previous"]["status"] == "placing"


@pytest.mark.asyncio
async def test_rollback_to_a_failed_deployment_is_refused(admin: AdminClient) -> None:
    project = await _project(admin)
    first = await _deploy(admin, project, current=True, status="active")
    await _deploy(admin, project, current=True, status="active")
    await force_status(admin.pool, first.id, "failed", reason="test")
    refused = await admin.call("POST", PROJECT + "/rollback")
    assert refused.status == 409
    assert "is failed; it cannot serve again" in error_of(refused)["message"]


@pytest.mark.asyncio
async def test_rollback_of_another_environment(admin: AdminClient) -> None:
    project = await _project(admin)
    old = await _deploy(admin, project, "staging", current=True, status="draining")
    new = await _deploy(admin, project, "staging", current=True, status="active")
    production = await _deploy(admin, project, current=True)
    rolled = await admin.ok("POST", PROJECT + "/rollback", {"environment": "staging"})
    assert rolled["environment"] == "staging"
    assert rolled["current"]["id"] == str(old.id) and rolled["previous"]["id"] == str(new.id)
    env = await environments.get_by_name(admin.pool, project.id, "production")
    assert env.current_deployment_id == production.id


@pytest.mark.asyncio
async def test_rollback_when_the_current_one_was_deleted(admin: AdminClient) -> None:
    project = await _project(admin)
    first = await _deploy(admin, project, current=True, status="draining")
    second = await _deploy(admin, project, current=True, status="active")
    await deployments.delete(admin.pool, second.id)
    rolled = await admin.ok("POST", PROJECT + "/rollback")
    assert rolled["current"]["id"] == str(first.id) and rolled["previous"] is None


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"environment": "qa"}, 404, "environment"),
        ({"environment": "Production"}, 400, "environment"),
        ({"environment": None}, 400, "environment"),
        ({"env": "production"}, 400, "env"),
    ],
)
@pytest.mark.asyncio
async def test_rollback_errors(
    admin: AdminClient, body: dict[str, Any], status: int, field: str
) -> None:
    await _project(admin)
    response = await admin.call("POST", PROJECT + "/rollback", body)
    assert response.status == status, response.body
    assert error_of(response)["field"] == field


# -- promote ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_promote_staging_to_production(admin: AdminClient) -> None:
    project = await _project(admin)
    empty = await admin.call("POST", PROJECT + "/promote", {"from": "staging", "to": "production"})
    assert empty.status == 409 and error_of(empty)["field"] == "from"
    assert "no current deployment" in error_of(empty)["message"]

    staged = await _deploy(
        admin,
        project,
        "staging",
        current=True,
        status="placing",
        image="ghcr.io/acme/webapp:sha-abc123",
        command="./serve --port $PORT",
        commit_sha="abc123def456",
        commit_message="Fix: Updated API endpoints",
        instances_per_region=3,
        env={"MODE": "prod", "LOG": "info"},
    )
    # The guide's curl.
    promoted = await admin.ok(
        "POST", PROJECT + "/promote", {"from": "staging", "to": "production"}, 201
    )
    assert promoted["environment"] == "production" and promoted["status"] == "pending"
    assert promoted["id"] != str(staged.id) and promoted["current"] is False
    assert promoted["image"] == "ghcr.io/acme/webapp:sha-abc123"
    assert promoted["command"] == "./serve --port $PORT"
    assert promoted["commit_sha"] == "abc123def456"
    assert promoted["commit_message"] == "Fix: Updated API endpoints"
    assert promoted["instances_per_region"] == 3
    assert promoted["env"] == {"MODE": "prod", "LOG": "info"}
    assert re.fullmatch(r"webapp-[a-z0-9]{7}-acme", promoted["name"])
    assert promoted["url"] == f"https://{promoted['name']}.{APPS}"
    production = await _env(admin, project, "production")
    made = await deployments.get(admin.pool, UUID(promoted["id"]))
    assert made.environment_id == production and made.project_id == project.id
    # Traffic moves only once the scheduler has it healthy.
    env = await environments.get(admin.pool, production)
    assert env.current_deployment_id is None

    # Without a body: staging to production as well.
    again = await admin.ok("POST", PROJECT + "/promote", None, 201)
    assert again["environment"] == "production" and again["id"] != promoted["id"]
    assert (await deployments.list_views(admin.pool, project_id=project.id))[1] == 3


@pytest.mark.asyncio
async def test_promote_production_back_to_staging(admin: AdminClient) -> None:
    project = await _project(admin)
    await _deploy(admin, project, current=True, image="ghcr.io/acme/webapp:prod")
    made = await admin.ok(
        "POST", PROJECT + "/promote", {"from": "production", "to": "staging"}, 201
    )
    assert made["environment"] == "staging" and made["image"] == "ghcr.io/acme/webapp:prod"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"from": "staging", "to": "staging"}, 400, "to"),
        ({"to": "staging"}, 400, "to"),
        ({"from": "qa"}, 404, "from"),
        ({"to": "qa"}, 404, "to"),
        ({"from": "Staging"}, 400, "from"),
        ({"from": 1}, 400, "from"),
        ({"source": "staging"}, 400, "source"),
    ],
)
@pytest.mark.asyncio
async def test_promote_errors(
    admin: AdminClient, body: dict[str, Any], status: int, field: str
) -> None:
    project = await _project(admin)
    await _deploy(admin, project, "staging", current=True)
    response = await admin.call("POST", PROJECT + "/promote", body)
    assert response.status == status, response.body
    assert error_of(response)["field"] == field
    assert (await deployments.list_views(admin.pool, project_id=project.id))[1] == 1


# -- routing ------------------------------------------------------------------------------


async def _verified(admin: AdminClient, project: projects.Project, name: str, env: str) -> None:
    domain = await domains.create(
        admin.pool, name, project_id=project.id, environment_id=await _env(admin, project, env)
    )
    await domains.record_check(admin.pool, domain.id, verified=True, pointing=True)


@pytest.mark.asyncio
async def test_routing(admin: AdminClient) -> None:
    pool = admin.pool
    project = await _project(admin)
    nothing = await admin.ok("GET", PROJECT + "/routing")
    assert nothing == {
        "org": "acme",
        "project": "webapp",
        "environments": [
            {
                "environment": env,
                "current": None,
                "hosts": [],
                "unverified_domains": [],
                "deployments": [],
            }
            for env in ("production", "staging")
        ],
    }

    await regions.create(pool, "us-east", "US East", "United States")
    old = await _deploy(admin, project, current=True, status="draining")
    live = await _deploy(admin, project, current=True, status="active")
    coming = await _deploy(admin, project)  # pending
    broken = await deployments.create(
        pool,
        project_id=project.id,
        environment_id=await _env(admin, project, "production"),
        image="x",
    )
    await force_status(pool, broken.id, "failed", reason="never healthy")
    # Inactive, but one instance still serves until its agent stops it.
    lingering = await _deploy(admin, project, status="inactive")
    instance = await instances.create(pool, deployment_id=lingering.id, region="us-east")
    await instances.report(pool, instance.id, "running", address="10.0.0.9", port=3000)
    await instances.set_health(pool, instance.id, True)
    await _deploy(admin, project, status="inactive")  # gone for good
    staged = await _deploy(admin, project, "staging", current=True, status="active")
    await _verified(admin, project, "app.acme.com", "production")
    await _verified(admin, project, "acme.com", "production")
    await _verified(admin, project, "staging.acme.com", "staging")
    await domains.create(
        pool,
        "www.acme.com",
        project_id=project.id,
        environment_id=await _env(admin, project, "production"),
    )

    routing = await admin.ok("GET", PROJECT + "/routing")
    production, staging = routing["environments"]
    assert production["environment"] == "production"
    assert production["current"]["id"] == str(live.id)
    assert production["current"]["current"] is True
    assert production["hosts"] == [f"{_name(live)}.{APPS}", "acme.com", "app.acme.com"]
    assert production["unverified_domains"] == ["www.acme.com"]
    others = {d["name"]: d for d in production["deployments"]}
    assert set(others) == {_name(old), _name(coming), _name(lingering)}
    assert others[_name(old)]["host"] == f"{_name(old)}.{APPS}"
    assert (others[_name(old)]["status"], others[_name(old)]["routed"]) == ("draining", True)
    # The failed one and the inactive one with nothing running are not listed.
    assert _name(broken) not in others
    assert (others[_name(coming)]["status"], others[_name(coming)]["routed"]) == ("pending", False)
    assert (others[_name(lingering)]["status"], others[_name(lingering)]["routed"]) == (
        "inactive",
        True,
    )
    # Newest first.
    assert [d["name"] for d in production["deployments"]] == [
        _name(lingering),
        _name(coming),
        _name(old),
    ]
    assert staging["current"]["id"] == str(staged.id)
    assert staging["hosts"] == [f"{_name(staged)}.{APPS}", "staging.acme.com"]
    assert staging["deployments"] == []


@pytest.mark.asyncio
async def test_routing_without_a_current_deployment_routes_no_domain(
    admin: AdminClient,
) -> None:
    project = await _project(admin)
    await _verified(admin, project, "app.acme.com", "production")
    pending = await _deploy(admin, project)
    routing = await admin.ok("GET", PROJECT + "/routing")
    production = routing["environments"][0]
    assert production["current"] is None and production["hosts"] == []
    assert [d["name"] for d in production["deployments"]] == [_name(pending)]


# -- health -------------------------------------------------------------------------------


async def _instance(
    admin: AdminClient,
    deployment: deployments.Deployment,
    region: str,
    state: instances.InstanceState = "running",
    *,
    healthy: bool = True,
) -> instances.Instance:
    node = await nodes.get_by_hostname(admin.pool, f"w-{region}")
    instance = await instances.create(
        admin.pool, deployment_id=deployment.id, region=region, node_id=node.id
    )
    if state != "pending":
        await instances.report(admin.pool, instance.id, state, address="10.0.0.1", port=3000)
    if healthy:
        instance = await instances.set_health(admin.pool, instance.id, True)
    return instance


@pytest.mark.asyncio
async def test_health(admin: AdminClient) -> None:
    pool = admin.pool
    project = await _project(admin)
    for code in ("eu-west", "us-east"):
        await regions.create(pool, code, code, "Somewhere")
        await nodes.create(
            pool, region=code, hostname=f"w-{code}", address="10.0.0.1", vcpu=8, memory_mb=8192
        )
    nothing = await admin.ok("GET", PROJECT + "/health")
    assert nothing == {
        "org": "acme",
        "project": "webapp",
        "status": "no_deployment",
        "environments": [
            {
                "environment": env,
                "deployment": None,
                "instances_per_region": None,
                "status": "no_deployment",
                "regions": [],
            }
            for env in ("production", "staging")
        ],
    }

    live = await _deploy(admin, project, current=True, status="active", instances_per_region=2)
    east = [await _instance(admin, live, "us-east") for _ in range(2)]
    west = [await _instance(admin, live, "eu-west") for _ in range(2)]
    # Instances of a deployment that is not current do not count.
    other = await _deploy(admin, project)
    await _instance(admin, other, "us-east", "failed", healthy=False)

    health = await admin.ok("GET", PROJECT + "/health")
    assert health["status"] == "healthy"
    production = health["environments"][0]
    assert production["deployment"] == _name(live) and production["instances_per_region"] == 2
    assert production["status"] == "healthy"
    assert production["regions"] == [
        {"region": "eu-west", "total": 2, "running": 2, "healthy": 2, "failed": 0},
        {"region": "us-east", "total": 2, "running": 2, "healthy": 2, "failed": 0},
    ]
    assert health["environments"][1]["status"] == "no_deployment"

    # One unhealthy, one failed (and replaced by one still starting).
    await instances.set_health(pool, west[0].id, False)
    await instances.report(pool, east[0].id, "failed", message="exited 1")
    await _instance(admin, live, "us-east", "starting", healthy=False)
    degraded = await admin.ok("GET", PROJECT + "/health")
    assert degraded["status"] == "degraded"
    assert degraded["environments"][0]["status"] == "degraded"
    assert degraded["environments"][0]["regions"] == [
        {"region": "eu-west", "total": 2, "running": 2, "healthy": 1, "failed": 0},
        {"region": "us-east", "total": 2, "running": 1, "healthy": 1, "failed": 1},
    ]

    for instance in [east[1], west[1]]:
        await instances.report(pool, instance.id, "stopped")
    await instances.set_health(pool, west[0].id, False)
    down = await admin.ok("GET", PROJECT + "/health")
    assert down["status"] == "down" and down["environments"][0]["status"] == "down"

    # Staging healthy, production down: the project as a whole is degraded.
    staged = await _deploy(admin, project, "staging", current=True, status="active")
    await _instance(admin, staged, "eu-west")
    mixed = await admin.ok("GET", PROJECT + "/health")
    assert [e["status"] for e in mixed["environments"]] == ["down", "healthy"]
    assert mixed["status"] == "degraded"


@pytest.mark.asyncio
async def test_health_of_a_current_deployment_without_instances_is_down(
    admin: AdminClient,
) -> None:
    project = await _project(admin)
    await _deploy(admin, project, current=True, status="active")
    health = await admin.ok("GET", PROJECT + "/health")
    assert health["status"] == "down"
    assert health["environments"][0]["regions"] == []
