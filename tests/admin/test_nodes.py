"""Regions and the operator's node routes: list, register, detail, drain, delete."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import pytest

from edge.store import deployments, environments, instances, projects
from tests.admin.conftest import AdminClient, error_of

NODE = {"region": "us-east", "address": "10.0.0.1", "vcpu": 4, "memory": 8192}


async def _region(admin: AdminClient, code: str = "us-east") -> None:
    await admin.ok("POST", "/api/v1/regions", {"code": code, "name": code, "country": "US"}, 201)


async def _node(admin: AdminClient, hostname: str, **fields: Any) -> Any:
    return await admin.ok("POST", "/api/v1/nodes", {**NODE, "hostname": hostname, **fields}, 201)


async def _instance_on(admin: AdminClient, node_id: str, *, vcpu: str = "0.5") -> Any:
    """A live instance of a deployment of a project with ``vcpu`` and 256 MiB, on the node."""
    project = await projects.create(
        admin.pool, "acme", f"web{uuid4().hex[:6]}", vcpu=vcpu, memory_mb=256
    )
    env = await environments.create(admin.pool, project.id, "production")
    deployment = await deployments.create(
        admin.pool, project_id=project.id, environment_id=env.id, image="img:1"
    )
    return await instances.create(
        admin.pool, deployment_id=deployment.id, region="us-east", node_id=UUID(node_id)
    )


@pytest.mark.asyncio
async def test_regions(admin: AdminClient) -> None:
    created = await admin.ok(
        "POST", "/api/v1/regions", {"code": "eu-west", "name": "EU West", "country": "Ireland"}, 201
    )
    assert (created["code"], created["name"], created["country"]) == (
        "eu-west",
        "EU West",
        "Ireland",
    )
    again = await admin.call(
        "POST", "/api/v1/regions", {"code": "eu-west", "name": "x", "country": "IE"}
    )
    assert again.status == 409 and "already exists" in error_of(again)["message"]
    bad = await admin.call(
        "POST", "/api/v1/regions", {"code": "EU West", "name": "x", "country": "IE"}
    )
    assert bad.status == 400 and error_of(bad)["field"] == "code"
    assert [r["code"] for r in await admin.ok("GET", "/api/v1/regions")] == ["eu-west"]


@pytest.mark.asyncio
async def test_registration(admin: AdminClient) -> None:
    await _region(admin)
    node = await _node(admin, "w1")
    assert node["token"].startswith("zwn_") and node["state"] == "ready"
    assert node["capacity"] == {"vcpu": 4, "memory": 8192}
    assert node["used"] == {"vcpu": 0, "memory": 0} and node["instances"] == 0
    taken = await admin.call("POST", "/api/v1/nodes", {**NODE, "hostname": "w1"})
    assert taken.status == 409 and error_of(taken)["field"] == "hostname"
    unknown = await admin.call(
        "POST", "/api/v1/nodes", {**NODE, "hostname": "w2", "region": "mars"}
    )
    assert unknown.status == 400 and error_of(unknown)["field"] == "region"
    assert "POST /api/v1/regions" in error_of(unknown)["message"]
    for field, value in (("vcpu", 0), ("memory", "lots"), ("hostname", "-bad-")):
        bad = await admin.call("POST", "/api/v1/nodes", {**NODE, "hostname": "w3", field: value})
        assert bad.status == 400 and error_of(bad)["field"] == field, field
    # The token is shown once: the node's other answers never carry it.
    detail = await admin.ok("GET", f"/api/v1/nodes/{node['id']}")
    assert "token" not in detail


@pytest.mark.asyncio
async def test_list_detail_and_usage(admin: AdminClient) -> None:
    await _region(admin)
    await _region(admin, "eu-west")
    busy = await _node(admin, "w1")
    await _node(admin, "w2")
    await _node(admin, "e1", region="eu-west")
    first = await _instance_on(admin, busy["id"])
    await _instance_on(admin, busy["id"])
    stopped = await _instance_on(admin, busy["id"])
    await instances.report(admin.pool, stopped.id, "stopped")

    listed = await admin.call("GET", "/api/v1/nodes")
    assert listed.header("x-total-count") == "3"
    rows = {n["hostname"]: n for n in listed.json()}
    # Stopped instances neither count nor use capacity.
    assert rows["w1"]["instances"] == 2
    assert rows["w1"]["used"] == {"vcpu": 1.0, "memory": 512}
    assert rows["w2"]["instances"] == 0
    east = await admin.ok("GET", "/api/v1/nodes?region=us-east")
    assert [n["hostname"] for n in east] == ["w1", "w2"]
    assert await admin.ok("GET", "/api/v1/nodes?state=down") == []
    bad = await admin.call("GET", "/api/v1/nodes?state=sleepy")
    assert bad.status == 400 and error_of(bad)["field"] == "state"

    detail = await admin.ok("GET", f"/api/v1/nodes/{busy['id']}")
    assert detail["instances"] == 2
    assert {i["id"] for i in detail["instance_list"]} >= {str(first.id)}
    assert len(detail["instance_list"]) == 2
    for missing in (str(uuid4()), "not-a-uuid"):
        gone = await admin.call("GET", f"/api/v1/nodes/{missing}")
        assert gone.status == 404, missing


@pytest.mark.asyncio
async def test_drain_then_delete(admin: AdminClient) -> None:
    await _region(admin)
    node = await _node(admin, "w1")
    instance = await _instance_on(admin, node["id"])
    drained = await admin.ok("POST", f"/api/v1/nodes/{node['id']}/drain")
    assert drained["state"] == "draining"
    # Draining again changes nothing.
    assert (await admin.ok("POST", f"/api/v1/nodes/{node['id']}/drain"))["state"] == "draining"

    busy = await admin.call("DELETE", f"/api/v1/nodes/{node['id']}")
    assert busy.status == 409
    assert "still runs 1 instance(s)" in error_of(busy)["message"]
    await instances.report(admin.pool, instance.id, "stopped")
    gone = await admin.call("DELETE", f"/api/v1/nodes/{node['id']}")
    assert gone.status == 204 and gone.body == b""
    assert (await admin.call("GET", f"/api/v1/nodes/{node['id']}")).status == 404
    assert (await admin.call("DELETE", f"/api/v1/nodes/{node['id']}")).status == 404
    assert (await admin.call("POST", f"/api/v1/nodes/{uuid4()}/drain")).status == 404
