"""``/health`` and ``/metrics`` of the admin port."""

from __future__ import annotations

import pytest

from tests.admin.conftest import NO_TOKEN, AdminClient


@pytest.mark.asyncio
async def test_health_reports_table_age_leadership_and_version(admin: AdminClient) -> None:
    admin.ctx.is_leader = lambda: True
    health = await admin.call("GET", "/health", token=NO_TOKEN)
    assert health.status == 200
    body = health.json()
    assert body["status"] == "ok" and body["leader"] is True
    assert body["routing"]["table_age_seconds"] == 0.5
    assert body["database"]["status"] == "up" and body["database"]["latency_ms"] >= 0
    assert body["version"] and body["region"] == "local"


@pytest.mark.asyncio
async def test_health_is_503_without_any_routing_table(admin: AdminClient) -> None:
    admin.ctx.routing_age = lambda: None
    health = await admin.call("GET", "/health", token=NO_TOKEN)
    # Down, with the same body (a load balancer reads the status, a person the body).
    assert health.status == 503
    assert health.json()["status"] == "down"
    assert health.json()["routing"]["table_age_seconds"] is None


@pytest.mark.asyncio
async def test_metrics_need_no_token_and_carry_the_admin_figures(admin: AdminClient) -> None:
    admin.ctx.is_leader = lambda: True
    await admin.call("GET", "/api/v1/regions")
    await admin.call("GET", "/api/v1/regions", token=NO_TOKEN)
    metrics = await admin.call("GET", "/metrics", token=NO_TOKEN)
    assert metrics.status == 200
    assert metrics.header(
        "content-type",
    ).startswith("text/plain")  # type: ignore[union-attr]
    text = metrics.body.decode()
    assert "postgres_up 1.0" in text and "zeitwork_leader 1.0" in text
    assert "zeitwork_routing_table_age_seconds 0.5" in text
    assert (
        'zeitwork_admin_requests_total{method="GET",route="/api/v1/regions",status="200"} 1.0'
        in text
    )
    assert (
        'zeitwork_admin_requests_total{method="GET",route="/api/v1/regions",status="401"} 1.0'
        in text
    )
    assert 'zeitwork_build_info{version="' in text


@pytest.mark.asyncio
async def test_platform_gauges_come_from_the_leader_only(admin: AdminClient) -> None:
    await admin.ok("POST", "/api/v1/regions", {"code": "eu", "name": "EU", "country": "DE"}, 201)
    node = {"region": "eu", "address": "10.0.0.1", "vcpu": 2, "memory": 1024}
    await admin.ok("POST", "/api/v1/nodes", {"hostname": "a", **node}, 201)
    down = await admin.ok("POST", "/api/v1/nodes", {"hostname": "b", **node}, 201)
    await admin.pool.execute("UPDATE nodes SET state = 'down' WHERE id = $1", down["id"])
    admin.ctx.is_leader = lambda: True
    text = (await admin.call("GET", "/metrics", token=NO_TOKEN)).body.decode()
    assert 'zeitwork_nodes{state="down"} 1.0' in text
    assert 'zeitwork_nodes{state="ready"} 1.0' in text
    assert 'zeitwork_deployments{status="pending"} 0.0' in text
    assert "zeitwork_deployment_success_ratio 1.0" in text  # nothing finished: no failure
    admin.ctx.is_leader = lambda: False
    text = (await admin.call("GET", "/metrics", token=NO_TOKEN)).body.decode()
    assert "zeitwork_nodes{" not in text
    assert "zeitwork_deployment_success_ratio NaN" in text


@pytest.mark.asyncio
async def test_no_routing_table_is_an_infinite_age(admin: AdminClient) -> None:
    admin.ctx.routing_age = lambda: None
    text = (await admin.call("GET", "/metrics", token=NO_TOKEN)).body.decode()
    assert "zeitwork_routing_table_age_seconds +Inf" in text
