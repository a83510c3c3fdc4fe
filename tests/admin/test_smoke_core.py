"""The framework through the routes that exist first: health, regions, nodes."""

from __future__ import annotations

import pytest

from tests.admin.conftest import NO_TOKEN, AdminClient, error_of


@pytest.mark.asyncio
async def test_health_and_regions(admin: AdminClient) -> None:
    health = await admin.call("GET", "/health", token=NO_TOKEN)
    assert health.status == 200, health.body
    assert health.json()["database"]["status"] == "up"
    created = await admin.ok(
        "POST",
        "/api/v1/regions",
        {"code": "us-east", "name": "US East", "country": "United States"},
        201,
    )
    assert created["code"] == "us-east"
    listed = await admin.call("GET", "/api/v1/regions")
    assert listed.status == 200 and listed.header("x-total-count") == "1"
    bad = await admin.call(
        "POST", "/api/v1/regions", {"code": "x", "name": "X", "country": "Y", "zz": 1}
    )
    assert bad.status == 400 and error_of(bad)["field"] == "zz"
    node = await admin.ok(
        "POST",
        "/api/v1/nodes",
        {"hostname": "w1", "region": "us-east", "address": "127.0.0.1", "vcpu": 4, "memory": 8192},
        201,
    )
    assert node["token"].startswith("zwn_")
    detail = await admin.ok("GET", f"/api/v1/nodes/{node['id']}")
    assert detail["instances"] == 0 and detail["instance_list"] == []
    assert (await admin.call("GET", "/api/v1/nodes", token=NO_TOKEN)).status == 401
    assert (await admin.call("GET", "/api/v1/nodes", token=node["token"])).status == 403
    doc = await admin.ok("GET", "/api/v1/openapi.json")
    assert "/api/v1/nodes/{id}" in doc["paths"]
    gone = await admin.call("DELETE", f"/api/v1/nodes/{node['id']}")
    assert gone.status == 204
    assert (await admin.call("PUT", "/api/v1/regions")).status == 405
