"""Analytics: the numbers of each report checked against deployments and instances the test
creates (statuses set with the store, timestamps moved where a duration must be exact)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest

from edge.store import deployments, environments, instances, nodes, projects, regions
from edge.store.deployments import Status
from tests.admin.conftest import NO_TOKEN, AdminClient, error_of
from tests.seeding import force_status

BASE = "/api/v1/analytics"


async def make_project(pool: Any, org: str, name: str, **settings: Any) -> tuple[UUID, UUID]:
    project = await projects.create(pool, org, name, **settings)
    env = await environments.create(pool, project.id, "production")
    return project.id, env.id


async def deploy(
    pool: Any, ids: tuple[UUID, UUID], *statuses: Status, age: timedelta | None = None
) -> UUID:
    """A deployment taken through ``statuses``, created ``age`` ago."""
    made = await deployments.create(pool, project_id=ids[0], environment_id=ids[1], image="i")
    for status in statuses:
        reason = "crashed" if status == "failed" else None
        await force_status(pool, made.id, status, reason=reason)
    if age is not None:
        await pool.execute(
            "UPDATE deployments SET created_at = now() - $2::interval WHERE id = $1", made.id, age
        )
    return made.id


async def took(pool: Any, deployment_id: UUID, seconds: float) -> None:
    """Make the deployment have become healthy ``seconds`` after its creation."""
    await pool.execute(
        "UPDATE deployments SET healthy_at = created_at + make_interval(secs => $2) WHERE id = $1",
        deployment_id,
        seconds,
    )


@pytest.mark.asyncio
async def test_frequency(admin: AdminClient) -> None:
    pool = admin.pool
    web = await make_project(pool, "acme", "web")
    api = await make_project(pool, "acme", "api")
    blog = await make_project(pool, "dokedu", "blog")
    await make_project(pool, "quiet", "idle")
    for _ in range(3):
        await deploy(pool, web)
    await deploy(pool, api)
    await deploy(pool, blog)
    await deploy(pool, blog, age=timedelta(days=2))
    await deploy(pool, blog, age=timedelta(days=40))

    report = await admin.ok("GET", BASE + "/deployments/frequency")
    assert report["window_days"] == 30
    assert report["total"] == 6
    assert report["by_org"] == [
        {"org": "acme", "deployments": 4},
        {"org": "dokedu", "deployments": 2},
    ]
    assert report["by_project"] == [
        {"org": "acme", "project": "web", "deployments": 3},
        {"org": "dokedu", "project": "blog", "deployments": 2},
        {"org": "acme", "project": "api", "deployments": 1},
    ]
    days = report["by_day"]
    today = datetime.now(UTC).date()
    assert len(days) == 30
    assert days[-1]["day"] == today.isoformat()
    assert days[0]["day"] == (today - timedelta(days=29)).isoformat()
    assert sum(d["deployments"] for d in days) == 6
    # The one of two days ago is on its own UTC day (unless the test straddles midnight).
    assert days[-1]["deployments"] + days[-3]["deployments"] == 6
    since = datetime.fromisoformat(report["since"])
    assert since == datetime.combine(today - timedelta(days=29), datetime.min.time(), UTC)

    longer = await admin.ok("GET", BASE + "/deployments/frequency?days=60")
    assert longer["window_days"] == 60 and longer["total"] == 7 and len(longer["by_day"]) == 60
    assert longer["by_org"][0] == {"org": "acme", "deployments": 4}
    assert {"org": "dokedu", "deployments": 3} in longer["by_org"]
    today_only = await admin.ok("GET", BASE + "/deployments/frequency?days=1")
    assert len(today_only["by_day"]) == 1
    assert today_only["total"] == today_only["by_day"][0]["deployments"]


@pytest.mark.asyncio
async def test_duration(admin: AdminClient) -> None:
    pool = admin.pool
    web = await make_project(pool, "acme", "web")
    blog = await make_project(pool, "dokedu", "blog")
    for seconds in (10, 20, 30, 40, 100):
        made = await deploy(pool, web, "placing", "starting", "healthy")
        await took(pool, made, seconds)
    made = await deploy(pool, blog, "placing", "starting", "healthy", "active")
    await took(pool, made, 5)
    # Never healthy: not in the durations.
    await deploy(pool, blog, "placing", "failed")
    await deploy(pool, blog)
    old = await deploy(pool, blog, "healthy", age=timedelta(days=100))
    await took(pool, old, 1000)

    report = await admin.ok("GET", BASE + "/deployments/duration?days=7")
    assert report["window_days"] == 7
    by_project = {(p["org"], p["project"]): p for p in report["projects"]}
    assert list(by_project) == [("acme", "web"), ("dokedu", "blog")]
    acme = by_project[("acme", "web")]
    assert acme["deployments"] == 5
    assert acme["avg_seconds"] == pytest.approx(40.0)
    assert acme["p50_seconds"] == pytest.approx(30.0)
    # percentile_cont: between 40 and 100 at 0.95 of the way from the first to the last.
    assert acme["p95_seconds"] == pytest.approx(88.0)
    assert (acme["min_seconds"], acme["max_seconds"]) == (pytest.approx(10), pytest.approx(100))
    blog_row = by_project[("dokedu", "blog")]
    assert blog_row["deployments"] == 1 and blog_row["p50_seconds"] == pytest.approx(5.0)
    overall = report["overall"]
    assert overall["deployments"] == 6
    assert overall["avg_seconds"] == pytest.approx(205 / 6)
    assert overall["max_seconds"] == pytest.approx(100)

    yearly = await admin.ok("GET", BASE + "/deployments/duration?days=365")
    assert yearly["overall"]["deployments"] == 7
    assert yearly["overall"]["max_seconds"] == pytest.approx(1000)


@pytest.mark.asyncio
async def test_success_rate(admin: AdminClient) -> None:
    pool = admin.pool
    web = await make_project(pool, "acme", "web")
    blog = await make_project(pool, "dokedu", "blog")
    await deploy(pool, web, "placing", "starting", "healthy")
    await deploy(pool, web, "placing", "starting", "healthy", "active")
    await deploy(pool, web, "placing", "starting", "healthy", "active", "draining", "inactive")
    await deploy(pool, web, "placing", "failed")
    await deploy(pool, web, "placing")
    await deploy(pool, web)
    # Only in progress: nothing finished, no rate.
    await deploy(pool, blog, "placing", "starting")
    await deploy(pool, web, "failed", age=timedelta(days=45))

    report = await admin.ok("GET", BASE + "/deployments/success-rate")
    assert report["window_days"] == 30
    assert report["projects"] == [
        {
            "org": "acme",
            "project": "web",
            "deployments": 6,
            "finished": 4,
            "succeeded": 3,
            "failed": 1,
            "rate": 0.75,
        },
        {
            "org": "dokedu",
            "project": "blog",
            "deployments": 1,
            "finished": 0,
            "succeeded": 0,
            "failed": 0,
            "rate": None,
        },
    ]
    assert report["overall"] == {
        "deployments": 7,
        "finished": 4,
        "succeeded": 3,
        "failed": 1,
        "rate": 0.75,
    }
    longer = await admin.ok("GET", BASE + "/deployments/success-rate?days=90")
    assert longer["overall"]["failed"] == 2 and longer["overall"]["rate"] == 0.6


@pytest.mark.asyncio
async def test_empty_reports(admin: AdminClient) -> None:
    frequency = await admin.ok("GET", BASE + "/deployments/frequency?days=3")
    assert frequency["total"] == 0 and frequency["by_org"] == [] and frequency["by_project"] == []
    assert [d["deployments"] for d in frequency["by_day"]] == [0, 0, 0]
    duration = await admin.ok("GET", BASE + "/deployments/duration")
    assert duration["projects"] == []
    assert duration["overall"] == {
        "deployments": 0,
        "avg_seconds": None,
        "p50_seconds": None,
        "p95_seconds": None,
        "min_seconds": None,
        "max_seconds": None,
    }
    rate = await admin.ok("GET", BASE + "/deployments/success-rate")
    assert rate["projects"] == [] and rate["overall"]["rate"] is None
    resources = await admin.ok("GET", BASE + "/resources/by-org")
    assert resources["orgs"] == []
    assert resources["total"] == {
        "projects": 0,
        "instances": 0,
        "instances_running": 0,
        "vcpu": 0.0,
        "memory_mb": 0,
    }


@pytest.mark.asyncio
async def test_resources_by_org(admin: AdminClient) -> None:
    pool = admin.pool
    await regions.create(pool, "us-east", "US East", "United States")
    node = await nodes.create(
        pool, region="us-east", hostname="w1", address="10.0.0.1", vcpu=64, memory_mb=65536
    )
    web = await make_project(pool, "acme", "web", vcpu=Decimal("0.5"), memory_mb=256)
    api = await make_project(pool, "acme", "api", vcpu=2, memory_mb=1024)
    await make_project(pool, "acme", "idle")
    blog = await make_project(pool, "dokedu", "blog", vcpu=1, memory_mb=512)
    await make_project(pool, "quiet", "nothing")

    async def instance(ids: tuple[UUID, UUID], *states: instances.InstanceState) -> None:
        deployment = await deploy(pool, ids, "placing")
        for state in states:
            made = await instances.create(
                pool, deployment_id=deployment, region="us-east", node_id=node.id
            )
            if state != "pending":
                await instances.report(pool, made.id, state)

    await instance(web, "running", "running", "starting", "stopped")
    await instance(web, "failed")
    await instance(api, "running", "pending")
    await instance(blog, "stopping")

    report = await admin.ok("GET", BASE + "/resources/by-org")
    assert datetime.fromisoformat(report["at"]) <= datetime.now(UTC)
    assert report["orgs"] == [
        {
            "org": "acme",
            "projects": 3,
            # 3 live of web (stopped and failed ones reserve nothing) and 2 of api.
            "instances": 5,
            "instances_running": 3,
            "vcpu": 3 * 0.5 + 2 * 2,
            "memory_mb": 3 * 256 + 2 * 1024,
        },
        {
            "org": "dokedu",
            "projects": 1,
            "instances": 1,
            "instances_running": 0,
            "vcpu": 1.0,
            "memory_mb": 512,
        },
        {
            "org": "quiet",
            "projects": 1,
            "instances": 0,
            "instances_running": 0,
            "vcpu": 0.0,
            "memory_mb": 0,
        },
    ]
    assert report["total"] == {
        "projects": 5,
        "instances": 6,
        "instances_running": 3,
        "vcpu": 6.5,
        "memory_mb": 3328,
    }


@pytest.mark.asyncio
async def test_analytics_inputs(admin: AdminClient) -> None:
    windowed = ("/deployments/frequency", "/deployments/duration", "/deployments/success-rate")
    for path in windowed:
        for bad in ("0", "366", "-1", "abc", "1e3"):
            response = await admin.call("GET", f"{BASE}{path}?days={bad}")
            assert response.status == 400, (path, bad)
            assert error_of(response)["field"] == "days", (path, bad)
        unknown = await admin.call("GET", f"{BASE}{path}?org=acme")
        assert unknown.status == 400 and error_of(unknown)["field"] == "org"
        assert (await admin.ok("GET", f"{BASE}{path}?days=365"))["window_days"] == 365
    for path in (*windowed, "/resources/by-org"):
        assert (await admin.call("GET", BASE + path, token=NO_TOKEN)).status == 401
    assert (await admin.call("GET", BASE + "/resources/by-org?days=3")).status == 400
