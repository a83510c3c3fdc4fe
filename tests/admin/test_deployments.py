"""The deployment routes: creating one as the operations guide does, the lists and their
filters, the current deployment, look-up by id and by name, instances, logs and metrics."""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID, uuid4

import pytest

from edge.store import deployments, environments, instances, logs, projects
from tests.admin.conftest import NO_TOKEN, AdminClient, error_of
from tests.seeding import force_status

# The operations guide's manual deployment, as written.
OPS_GUIDE_BODY = {
    "project": "dokedu",
    "org": "dokedu",
    "image": "ghcr.io/dokedu/app:sha-abc123",
    "commit_sha": "abc123def456",
    "commit_message": "Fix: Updated API endpoints",
    "instances_per_region": 3,
}


async def project(admin: AdminClient, org: str = "dokedu", name: str = "dokedu") -> Any:
    await admin.ok("POST", "/api/v1/projects", {"name": name, "org": org}, 201)
    return await projects.get_by_name(admin.pool, org, name)


async def deploy(admin: AdminClient, org: str, name: str, **fields: Any) -> dict[str, Any]:
    body = {"org": org, "project": name, "image": "ghcr.io/acme/app:1", **fields}
    return await admin.ok("POST", "/api/v1/deployments", body, 201)  # type: ignore[no-any-return]


async def make_current(admin: AdminClient, deployment: dict[str, Any]) -> None:
    """What the scheduler does when a deployment's instances are all healthy."""
    deployment_id = UUID(deployment["id"])
    for status in ("placing", "starting", "healthy", "active"):
        await force_status(admin.pool, deployment_id, status)
    found = await deployments.get(admin.pool, deployment_id)
    await environments.set_current(admin.pool, found.environment_id, deployment_id)


async def add_region(admin: AdminClient, code: str) -> None:
    regions = await admin.ok("GET", "/api/v1/regions")
    if code not in {r["code"] for r in regions}:
        body = {"code": code, "name": code, "country": "Germany"}
        await admin.ok("POST", "/api/v1/regions", body, 201)


async def add_node(admin: AdminClient, region: str, hostname: str) -> dict[str, Any]:
    await add_region(admin, region)
    body = {"hostname": hostname, "region": region, "address": "10.0.0.1", "vcpu": 8}
    return await admin.ok("POST", "/api/v1/nodes", {**body, "memory": 16384}, 201)  # type: ignore[no-any-return]


async def bad_request(admin: AdminClient, method: str, path: str, body: Any = None) -> str:
    """The field a 400 answer names."""
    response = await admin.call(method, path, body)
    assert response.status == 400, (path, response.status, response.body)
    return error_of(response).get("field") or ""


# -- creating -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_create_as_the_operations_guide_does(admin: AdminClient) -> None:
    dokedu = await project(admin)
    response = await admin.call("POST", "/api/v1/deployments", OPS_GUIDE_BODY)
    assert response.status == 201, response.body
    created = response.json()
    assert response.header("location") == f"/api/v1/deployments/{created['id']}"
    assert re.fullmatch(r"dokedu-[a-z0-9]{7}-dokedu", created["name"]), created["name"]
    assert created["url"] == f"https://{created['name']}.zeitwork.test"
    assert created["org"] == "dokedu" and created["project"] == "dokedu"
    assert created["environment"] == "production" and created["current"] is False
    assert created["status"] == "pending" and created["failure_reason"] is None
    assert created["image"] == "ghcr.io/dokedu/app:sha-abc123" and created["command"] is None
    assert created["commit_sha"] == "abc123def456"
    assert created["commit_message"] == "Fix: Updated API endpoints"
    assert created["instances_per_region"] == 3 and created["env"] == {}
    # Stored as answered, in the environment created for it.
    stored = await deployments.get(admin.pool, UUID(created["id"]))
    production = await environments.get_by_name(admin.pool, dokedu.id, "production")
    assert stored.environment_id == production.id and stored.status == "pending"
    assert stored.instances_per_region == 3 and stored.image == OPS_GUIDE_BODY["image"]
    audited = await admin.pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE action = 'POST /api/v1/deployments'"
    )
    assert audited == 1


@pytest.mark.asyncio
async def test_create_with_a_command_env_and_another_environment(admin: AdminClient) -> None:
    acme = await project(admin, "acme", "webapp")
    before = {e.name for e in await environments.list_for_project(admin.pool, acme.id)}
    assert "preview" not in before
    first = await deploy(
        admin,
        "acme",
        "webapp",
        image=None,
        command="python -m http.server $PORT",
        environment="preview",
        env={"DATABASE_URL": "postgres://db/app", "_X1": ""},
    )
    assert first["command"] == "python -m http.server $PORT" and first["image"] is None
    assert first["environment"] == "preview" and first["instances_per_region"] == 1
    assert first["env"] == {"DATABASE_URL": "postgres://db/app", "_X1": ""}
    stored = await deployments.get(admin.pool, UUID(first["id"]))
    assert stored.env == first["env"]
    # The second deployment to preview goes to the environment the first one created; both
    # an image and a command are fine.
    second = await deploy(admin, "acme", "webapp", command="./serve", environment="preview")
    assert second["image"] == "ghcr.io/acme/app:1" and second["command"] == "./serve"
    names = [e.name for e in await environments.list_for_project(admin.pool, acme.id)]
    assert sorted(names) == sorted({*before, "preview"})
    again = await deployments.get(admin.pool, UUID(second["id"]))
    assert again.environment_id == stored.environment_id


@pytest.mark.asyncio
async def test_create_validation_names_the_field(admin: AdminClient) -> None:
    await project(admin)
    environments_before = await admin.pool.fetchval("SELECT count(*) FROM environments")
    path = "/api/v1/deployments"
    base = {"project": "dokedu", "org": "dokedu", "image": "ghcr.io/dokedu/app:1"}
    neither = await admin.call("POST", path, {"project": "dokedu", "org": "dokedu"})
    assert neither.status == 400 and error_of(neither)["field"] == "image"
    assert "command" in error_of(neither)["message"]
    both_null = {"project": "dokedu", "org": "dokedu", "image": None, "command": None}
    assert await bad_request(admin, "POST", path, both_null) == "image"
    port = await admin.call("POST", path, {**base, "env": {"PORT": "80"}})
    assert port.status == 400 and error_of(port)["field"] == "env"
    assert "PORT is reserved" in error_of(port)["message"]
    for name in ("1ABC", "MY-VAR", "", "A B"):
        assert await bad_request(admin, "POST", path, {**base, "env": {name: "x"}}) == "env"
    assert await bad_request(admin, "POST", path, {**base, "env": {"A": 1}}) == "env.A"
    for count in (0, 101, -1, 2**31):
        body = {**base, "instances_per_region": count}
        assert await bad_request(admin, "POST", path, body) == "instances_per_region"
    wrong_type = await admin.call("POST", path, {**base, "instances_per_region": "3"})
    assert wrong_type.status == 400 and error_of(wrong_type)["code"] == "wrong_type"
    assert await bad_request(admin, "POST", path, {**base, "environment": "Prod"}) == (
        "environment"
    )
    assert await bad_request(admin, "POST", path, {**base, "commit_sha": "xyz"}) == "commit_sha"
    assert await bad_request(admin, "POST", path, {**base, "image": "has space"}) == "image"
    assert await bad_request(admin, "POST", path, {**base, "command": ""}) == "command"
    nul = {**base, "commit_message": "a\u0000b"}
    assert await bad_request(admin, "POST", path, nul) == "commit_message"
    assert await bad_request(admin, "POST", path, {**base, "replicas": 2}) == "replicas"
    assert await bad_request(admin, "POST", path, {"org": "dokedu", "image": "x"}) == "project"
    assert await bad_request(admin, "POST", path, {**base, "org": "Dokedu"}) == "org"
    unknown = await admin.call("POST", path, {**base, "project": "nope"})
    assert unknown.status == 404 and error_of(unknown)["field"] == "project"
    assert "dokedu/nope" in error_of(unknown)["message"]
    assert (await admin.call("POST", path, base, token=NO_TOKEN)).status == 401
    # Nothing of the failed attempts was stored, not even an environment.
    assert await admin.pool.fetchval("SELECT count(*) FROM deployments") == 0
    after = await admin.pool.fetchval("SELECT count(*) FROM environments")
    assert after == environments_before


# -- lists --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_project_deployments_newest_first_with_filters(admin: AdminClient) -> None:
    await project(admin)
    await project(admin, "dokedu", "other")
    made = [await deploy(admin, "dokedu", "dokedu") for _ in range(3)]
    staging = await deploy(admin, "dokedu", "dokedu", environment="staging")
    await deploy(admin, "dokedu", "other")
    await force_status(admin.pool, UUID(made[0]["id"]), "failed", reason="no health")

    path = "/api/v1/projects/dokedu/dokedu/deployments"
    response = await admin.call("GET", path)
    assert response.status == 200 and response.header("x-total-count") == "4"
    listed = response.json()
    assert [d["id"] for d in listed] == [staging["id"]] + [d["id"] for d in reversed(made)]
    assert {d["project"] for d in listed} == {"dokedu"}

    only_staging = await admin.ok("GET", f"{path}?environment=staging")
    assert [d["id"] for d in only_staging] == [staging["id"]]
    failed = await admin.ok("GET", f"{path}?status=failed")
    assert [(d["id"], d["failure_reason"]) for d in failed] == [(made[0]["id"], "no health")]
    assert await admin.ok("GET", f"{path}?environment=production&status=pending") == list(
        reversed(made[1:])
    )

    page = await admin.call("GET", f"{path}?per_page=2&page=2")
    assert [d["id"] for d in page.json()] == [made[1]["id"], made[0]["id"]]
    assert page.header("x-total-count") == "4" and 'rel="prev"' in (page.header("link") or "")

    assert await bad_request(admin, "GET", f"{path}?status=running") == "status"
    assert await bad_request(admin, "GET", f"{path}?environment=A%20B") == "environment"
    assert await bad_request(admin, "GET", f"{path}?org=dokedu") == "org"
    missing = await admin.call("GET", "/api/v1/projects/dokedu/nope/deployments")
    assert missing.status == 404 and "dokedu/nope" in error_of(missing)["message"]
    assert (await admin.call("GET", path, token=NO_TOKEN)).status == 401


@pytest.mark.asyncio
async def test_all_deployments_by_org_as_the_monthly_report(admin: AdminClient) -> None:
    for org, name in (("dokedu", "dokedu"), ("acme", "webapp"), ("acme", "api")):
        await project(admin, org, name)
    await deploy(admin, "dokedu", "dokedu")
    await deploy(admin, "acme", "webapp")
    api_one = await deploy(admin, "acme", "api")
    await deploy(admin, "acme", "webapp", environment="staging")
    await force_status(admin.pool, UUID(api_one["id"]), "placing")

    response = await admin.call("GET", "/api/v1/deployments")
    assert response.status == 200 and response.header("x-total-count") == "4"
    listed = response.json()
    # jq 'group_by(.org) | map({org: .[0].org, count: length})'
    by_org: dict[str, int] = {}
    for item in listed:
        by_org[item["org"]] = by_org.get(item["org"], 0) + 1
    assert by_org == {"acme": 3, "dokedu": 1}

    acme = await admin.ok("GET", "/api/v1/deployments?org=acme")
    assert len(acme) == 3 and {d["org"] for d in acme} == {"acme"}
    webapp = await admin.ok("GET", "/api/v1/deployments?project=webapp")
    assert [d["environment"] for d in webapp] == ["staging", "production"]
    placing = await admin.ok("GET", "/api/v1/deployments?status=placing")
    assert [d["id"] for d in placing] == [api_one["id"]]
    assert await admin.ok("GET", "/api/v1/deployments?org=acme&project=dokedu") == []
    staging = await admin.ok("GET", "/api/v1/deployments?environment=staging")
    assert [d["project"] for d in staging] == ["webapp"]

    assert await bad_request(admin, "GET", "/api/v1/deployments?status=bogus") == "status"
    assert await bad_request(admin, "GET", "/api/v1/deployments?org=Acme") == "org"
    assert await bad_request(admin, "GET", "/api/v1/deployments?per_page=0") == "per_page"
    assert (await admin.call("GET", "/api/v1/deployments", token=NO_TOKEN)).status == 401


# -- current ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_current_deployment(admin: AdminClient) -> None:
    await project(admin)
    path = "/api/v1/projects/dokedu/dokedu/deployments/current"
    no_environment = await admin.call("GET", f"{path}?environment=preview")
    assert no_environment.status == 404
    assert "preview of dokedu/dokedu does not exist" in error_of(no_environment)["message"]
    assert error_of(no_environment)["field"] == "environment"

    first = await deploy(admin, "dokedu", "dokedu")
    none_yet = await admin.call("GET", path)
    assert none_yet.status == 404 and "no current deployment" in error_of(none_yet)["message"]

    await make_current(admin, first)
    await deploy(admin, "dokedu", "dokedu")  # newer, not current
    current = await admin.ok("GET", path)
    assert current["id"] == first["id"] and current["current"] is True
    assert current["status"] == "active" and current["active_at"] is not None
    assert await admin.ok("GET", f"{path}?environment=production") == current
    listed = await admin.ok("GET", "/api/v1/projects/dokedu/dokedu/deployments")
    assert [d["current"] for d in listed] == [False, True]

    staging = await deploy(admin, "dokedu", "dokedu", environment="staging")
    assert (await admin.call("GET", f"{path}?environment=staging")).status == 404
    await make_current(admin, staging)
    assert (await admin.ok("GET", f"{path}?environment=staging"))["id"] == staging["id"]
    assert (await admin.ok("GET", path))["id"] == first["id"]

    assert await bad_request(admin, "GET", f"{path}?environment=-x") == "environment"
    assert await bad_request(admin, "GET", f"{path}?page=1") == "page"
    gone = await admin.call("GET", "/api/v1/projects/nobody/dokedu/deployments/current")
    assert gone.status == 404 and "nobody/dokedu" in error_of(gone)["message"]
    assert (await admin.call("GET", path, token=NO_TOKEN)).status == 401


# -- one deployment -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_get_by_id_and_by_name(admin: AdminClient) -> None:
    await project(admin)
    await project(admin, "big-co", "my-app")
    await project(admin, "co", "big-my-app")
    created = await deploy(admin, "dokedu", "dokedu", **{"env": {"A": "1"}})
    by_id = await admin.ok("GET", f"/api/v1/deployments/{created['id']}")
    assert by_id == created
    by_name = await admin.ok("GET", f"/api/v1/deployments/{created['name']}")
    assert by_name == created
    assert await admin.ok("GET", f"/api/v1/deployments/{created['name'].upper()}") == created

    # Hyphens in both names: the nanoid's place is found, not assumed.
    hyphens = await deploy(admin, "big-co", "my-app")
    assert re.fullmatch(r"my-app-[a-z0-9]{7}-big-co", hyphens["name"])
    found = await admin.ok("GET", f"/api/v1/deployments/{hyphens['name']}")
    assert found["id"] == hyphens["id"] and found["org"] == "big-co"
    assert found["project"] == "my-app"
    nanoid = hyphens["name"].split("-")[2]
    # Same labels, other split: project big-my-app of org co has no such deployment.
    other = f"big-my-app-{nanoid}-co"
    assert (await admin.call("GET", f"/api/v1/deployments/{other}")).status == 404

    for ref in (
        str(uuid4()),
        "dokedu-zzzzzzz-dokedu",
        f"dokedu-{created['name'].split('-')[1]}-acme",
        "not-a-deployment",
        "x",
        "%00",
        "a" * 300,
    ):
        missing = await admin.call("GET", f"/api/v1/deployments/{ref}")
        assert missing.status == 404, (ref, missing.body)
        assert error_of(missing)["code"] == "not_found"
    assert (
        await admin.call("GET", f"/api/v1/deployments/{created['id']}", token=NO_TOKEN)
    ).status == 401


# -- instances ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_instances_by_region(admin: AdminClient) -> None:
    await project(admin)
    east = await add_node(admin, "us-east", "east-1")
    west = await add_node(admin, "eu-west", "west-1")
    created = await deploy(admin, "dokedu", "dokedu")
    deployment_id = UUID(created["id"])
    path = f"/api/v1/deployments/{created['name']}/instances"
    assert await admin.ok("GET", path) == []

    a = await instances.create(
        admin.pool, deployment_id=deployment_id, region="us-east", node_id=UUID(east["id"])
    )
    b = await instances.create(
        admin.pool, deployment_id=deployment_id, region="eu-west", node_id=UUID(west["id"])
    )
    c = await instances.create(admin.pool, deployment_id=deployment_id, region="us-east")
    await instances.report(
        admin.pool, a.id, "running", address="10.1.0.5", port=3000, boot_time_ms=125
    )
    await instances.set_health(admin.pool, a.id, True)
    await instances.report(admin.pool, b.id, "failed", message="exited with status 1")
    # Another deployment's instance is not listed.
    other = await deploy(admin, "dokedu", "dokedu")
    await instances.create(admin.pool, deployment_id=UUID(other["id"]), region="us-east")

    response = await admin.call("GET", path)
    assert response.status == 200 and response.header("x-total-count") == "3"
    listed = response.json()
    assert [i["id"] for i in listed] == [str(b.id), str(a.id), str(c.id)]
    west_one, running, unplaced = listed
    assert running == {
        "id": str(a.id),
        "node_id": east["id"],
        "node_hostname": "east-1",
        "region": "us-east",
        "state": "running",
        "healthy": True,
        "address": "10.1.0.5",
        "port": 3000,
        "boot_time_ms": 125,
        "message": None,
        "last_health_at": running["last_health_at"],
        "created_at": running["created_at"],
        "updated_at": running["updated_at"],
    }
    assert running["last_health_at"] is not None
    assert west_one["state"] == "failed" and west_one["message"] == "exited with status 1"
    assert west_one["node_hostname"] == "west-1" and west_one["healthy"] is False
    assert unplaced["node_id"] is None and unplaced["node_hostname"] is None

    by_id = await admin.ok(
        "GET", f"/api/v1/deployments/{created['id']}/instances?per_page=1&page=3"
    )
    assert [i["id"] for i in by_id] == [str(c.id)]
    assert await bad_request(admin, "GET", f"{path}?state=running") == "state"
    missing = await admin.call("GET", f"/api/v1/deployments/{uuid4()}/instances")
    assert missing.status == 404
    assert (await admin.call("GET", path, token=NO_TOKEN)).status == 401


# -- logs ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_logs_follow_by_id(admin: AdminClient) -> None:
    await project(admin)
    created = await deploy(admin, "dokedu", "dokedu")
    deployment_id = UUID(created["id"])
    path = f"/api/v1/deployments/{created['name']}/logs"
    assert await admin.ok("GET", path) == {"lines": [], "next_after": 0}
    assert await admin.ok("GET", f"{path}?after=42") == {"lines": [], "next_after": 42}

    await add_region(admin, "local-a")
    await add_region(admin, "local-b")
    one = await instances.create(admin.pool, deployment_id=deployment_id, region="local-a")
    two = await instances.create(admin.pool, deployment_id=deployment_id, region="local-b")
    await logs.append(admin.pool, one.id, deployment_id, [("stdout", "listening on 3000")])
    await logs.append(admin.pool, two.id, deployment_id, [("stderr", "warning: x")])
    await logs.append(admin.pool, one.id, deployment_id, [("stdout", f"req {n}") for n in range(3)])
    other = await deploy(admin, "dokedu", "dokedu")
    three = await instances.create(admin.pool, deployment_id=UUID(other["id"]), region="local-a")
    await logs.append(admin.pool, three.id, UUID(other["id"]), [("stdout", "not mine")])

    everything = await admin.ok("GET", path)
    lines = everything["lines"]
    assert [line["line"] for line in lines] == [
        "listening on 3000",
        "warning: x",
        "req 0",
        "req 1",
        "req 2",
    ]
    assert set(lines[0]) == {"id", "instance_id", "stream", "line", "logged_at"}
    assert lines[1]["stream"] == "stderr" and lines[1]["instance_id"] == str(two.id)
    assert everything["next_after"] == lines[-1]["id"]

    # A follower: pages of two, each poll after the last id it saw.
    seen: list[str] = []
    after = 0
    for _ in range(4):
        page = await admin.ok("GET", f"{path}?after={after}&limit=2")
        seen += [line["line"] for line in page["lines"]]
        assert len(page["lines"]) <= 2
        after = page["next_after"]
    assert seen == [line["line"] for line in lines] and after == lines[-1]["id"]
    await logs.append(admin.pool, two.id, deployment_id, [("stdout", "later")])
    newer = await admin.ok("GET", f"/api/v1/deployments/{created['id']}/logs?after={after}")
    assert [line["line"] for line in newer["lines"]] == ["later"]

    for query, field in (
        ("limit=0", "limit"),
        ("limit=5001", "limit"),
        ("after=-1", "after"),
        (f"after={2**63}", "after"),
        ("after=x", "after"),
        ("page=2", "page"),
    ):
        assert await bad_request(admin, "GET", f"{path}?{query}") == field, query
    assert len((await admin.ok("GET", f"{path}?limit=5000"))["lines"]) == 6
    assert (await admin.call("GET", "/api/v1/deployments/a-bcdefgh-c/logs")).status == 404
    assert (await admin.call("GET", path, token=NO_TOKEN)).status == 401


# -- metrics ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_metrics(admin: AdminClient) -> None:
    await project(admin)
    await add_node(admin, "us-east", "east-1")
    await add_node(admin, "eu-west", "west-1")
    created = await deploy(admin, "dokedu", "dokedu")
    deployment_id = UUID(created["id"])
    path = f"/api/v1/deployments/{created['name']}/metrics"

    empty = await admin.ok("GET", path)
    assert empty["id"] == created["id"] and empty["name"] == created["name"]
    assert empty["status"] == "pending" and empty["instances"] == 0 and empty["healthy"] == 0
    assert empty["by_state"] == dict.fromkeys(
        ["failed", "pending", "running", "starting", "stopped", "stopping"], 0
    )
    assert empty["by_region"] == {} and empty["boot_time_ms"] is None
    assert empty["time_to_healthy_seconds"] is None
    assert 0 <= empty["age_seconds"] < 60
    assert "requests" not in str(empty)

    reports = (
        ("us-east", "running", 100, True),
        ("us-east", "running", 600, False),
        ("us-east", "starting", None, False),
        ("eu-west", "running", 200, True),
        ("eu-west", "failed", None, False),
    )
    for region, state, boot, healthy in reports:
        instance = await instances.create(admin.pool, deployment_id=deployment_id, region=region)
        await instances.report(admin.pool, instance.id, state, boot_time_ms=boot)  # type: ignore[arg-type]
        if healthy:
            await instances.set_health(admin.pool, instance.id, True)
    for status in ("placing", "starting", "healthy"):
        await force_status(admin.pool, deployment_id, status)

    known = await admin.ok("GET", f"/api/v1/deployments/{created['id']}/metrics")
    assert known["status"] == "healthy"
    assert known["instances"] == 5 and known["healthy"] == 2
    assert known["by_state"] == {
        "failed": 1,
        "pending": 0,
        "running": 3,
        "starting": 1,
        "stopped": 0,
        "stopping": 0,
    }
    assert known["by_region"] == {
        "eu-west": {"instances": 2, "running": 1, "healthy": 1},
        "us-east": {"instances": 3, "running": 2, "healthy": 1},
    }
    assert known["boot_time_ms"] == {
        "samples": 3,
        "min": 100,
        "avg": 300.0,
        "max": 600,
        "p50": 200.0,
    }
    stored = await deployments.get(admin.pool, deployment_id)
    assert stored.healthy_at is not None
    expected = (stored.healthy_at - stored.created_at).total_seconds()
    assert known["time_to_healthy_seconds"] == pytest.approx(expected, abs=0.001)
    assert known["age_seconds"] >= known["time_to_healthy_seconds"]

    for ref in (str(uuid4()), "dokedu-0000000-dokedu"):
        assert (await admin.call("GET", f"/api/v1/deployments/{ref}/metrics")).status == 404
    assert await bad_request(admin, "GET", f"{path}?window=1h") == "window"
    assert (await admin.call("GET", path, token=NO_TOKEN)).status == 401


@pytest.mark.asyncio
async def test_openapi_describes_the_routes(admin: AdminClient) -> None:
    doc = await admin.ok("GET", "/api/v1/openapi.json")
    paths = doc["paths"]
    for path, method in (
        ("/api/v1/projects/{org}/{name}/deployments", "get"),
        ("/api/v1/projects/{org}/{name}/deployments/current", "get"),
        ("/api/v1/deployments", "post"),
        ("/api/v1/deployments", "get"),
        ("/api/v1/deployments/{id}", "get"),
        ("/api/v1/deployments/{id}/instances", "get"),
        ("/api/v1/deployments/{id}/logs", "get"),
        ("/api/v1/deployments/{id}/metrics", "get"),
    ):
        operation = paths[path][method]
        assert operation["tags"] == ["deployments"]
        if "{" in path:
            assert "404" in operation["responses"], (path, method)
    create = paths["/api/v1/deployments"]["post"]
    assert set(create["responses"]) >= {"201", "400", "401", "404"}
    schema = doc["components"]["schemas"]["DeploymentIn"]
    assert schema["properties"]["env"]["propertyNames"]["not"] == {"const": "PORT"}
