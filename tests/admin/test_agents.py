"""The agent endpoints, driven with the nodes' own tokens over real sockets and PostgreSQL.

Two nodes in one region; node A runs a deployment's instances in every state (and those of
an inactive deployment), node B one instance of its own that A must never touch.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
import pytest_asyncio

from edge.store import deployments, environments, instances, logs, nodes, projects
from edge.store.deployments import Deployment
from tests.admin.conftest import BOOTSTRAP_TOKEN, NO_TOKEN, AdminClient, error_of
from tests.harness import Response
from tests.seeding import force_status


@dataclass
class World:
    node_a: UUID
    token_a: str
    node_b: UUID
    token_b: str
    deployment: Deployment
    old: Deployment
    # On node A: pending; stopping; stopped; running but of the inactive deployment;
    # stopping of the inactive deployment. On node B: pending.
    a_run: UUID
    a_stop: UUID
    a_done: UUID
    a_old: UUID
    a_old_stopping: UUID
    b_run: UUID


async def _register(admin: AdminClient, hostname: str) -> tuple[UUID, str]:
    response = await admin.call(
        "POST",
        "/api/v1/nodes",
        {
            "hostname": hostname,
            "region": "us-east",
            "address": "10.0.0.1",
            "vcpu": 4,
            "memory": 8192,
        },
        token=BOOTSTRAP_TOKEN,
    )
    assert response.status == 201, response.body
    node = response.json()
    return UUID(node["id"]), node["token"]


@pytest_asyncio.fixture
async def world(admin: AdminClient) -> World:
    await admin.ok(
        "POST", "/api/v1/regions", {"code": "us-east", "name": "US East", "country": "US"}, 201
    )
    node_a, token_a = await _register(admin, "worker-a")
    node_b, token_b = await _register(admin, "worker-b")
    pool = admin.pool
    project = await projects.create(
        pool,
        "acme",
        "web",
        vcpu=0.5,
        memory_mb=256,
        app_port=8080,
        health_check_path="/healthz",
    )
    env = await environments.create(pool, project.id, "production")
    deployment = await deployments.create(
        pool,
        project_id=project.id,
        environment_id=env.id,
        image="ghcr.io/acme/web:2",
        command="python app.py",
        env={"GREETING": "hi"},
    )
    old = await deployments.create(
        pool, project_id=project.id, environment_id=env.id, image="ghcr.io/acme/web:1"
    )
    await force_status(pool, old.id, "inactive")

    async def instance(of: Deployment, node: UUID, state: instances.InstanceState) -> UUID:
        created = await instances.create(pool, deployment_id=of.id, region="us-east", node_id=node)
        if state != "pending":
            await instances.report(pool, created.id, state)
        return created.id

    return World(
        node_a=node_a,
        token_a=token_a,
        node_b=node_b,
        token_b=token_b,
        deployment=deployment,
        old=old,
        a_run=await instance(deployment, node_a, "pending"),
        a_stop=await instance(deployment, node_a, "stopping"),
        a_done=await instance(deployment, node_a, "stopped"),
        a_old=await instance(old, node_a, "running"),
        a_old_stopping=await instance(old, node_a, "stopping"),
        b_run=await instance(deployment, node_b, "pending"),
    )


async def _as(
    admin: AdminClient, token: str, method: str, path: str, body: Any = None, status: int = 200
) -> Any:
    response = await admin.call(method, path, body, token=token)
    assert response.status == status, (method, path, response.status, response.body)
    return response.json()


def _bad(response: Response, field: str) -> None:
    assert response.status == 400, response.body
    assert error_of(response)["field"] == field, response.body


# -- heartbeat ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_heartbeat_revives_a_down_node_and_names_instances_to_stop(
    admin: AdminClient, world: World
) -> None:
    await nodes.set_state(admin.pool, world.node_a, "down")
    stranger = uuid4()
    before = datetime.now(UTC)
    beat = await _as(
        admin,
        world.token_a,
        "POST",
        f"/api/v1/nodes/{world.node_a}/heartbeat",
        {
            "vcpu": 8,
            "memory": 16384,
            "instances": [
                str(world.a_run),
                str(world.b_run),
                str(world.a_done),
                str(stranger),
                str(world.a_old),
                str(world.a_stop),
                str(world.a_run),
            ],
        },
    )
    assert beat["node_id"] == str(world.node_a)
    assert beat["state"] == "ready"
    assert beat["capacity"] == {"vcpu": 8, "memory": 16384}
    assert beat["heartbeat_interval"] == 5
    # Another node's instance, a stopped one, an unknown id and one of an inactive
    # deployment are to be stopped; a stopping one comes with the assignments.
    assert beat["unknown_instances"] == [
        str(world.b_run),
        str(world.a_done),
        str(stranger),
        str(world.a_old),
    ]
    server_time = datetime.fromisoformat(beat["server_time"])
    assert abs(server_time - before) < timedelta(seconds=5)
    detail = await admin.ok("GET", f"/api/v1/nodes/{world.node_a}")
    assert detail["state"] == "ready"
    assert detail["capacity"] == {"vcpu": 8, "memory": 16384}
    assert datetime.fromisoformat(detail["last_heartbeat"]) == server_time

    # A draining node stays draining; without a body the capacity stays.
    await nodes.set_state(admin.pool, world.node_a, "draining")
    beat = await _as(admin, world.token_a, "POST", f"/api/v1/nodes/{world.node_a}/heartbeat")
    assert beat["state"] == "draining"
    assert beat["capacity"] == {"vcpu": 8, "memory": 16384}
    assert beat["unknown_instances"] == []
    assert datetime.fromisoformat(beat["server_time"]) > server_time
    # Node B's own heartbeat does not touch A.
    beat = await _as(admin, world.token_b, "POST", f"/api/v1/nodes/{world.node_b}/heartbeat", {})
    assert beat["state"] == "ready" and beat["capacity"] == {"vcpu": 4, "memory": 8192}


@pytest.mark.asyncio
async def test_heartbeat_rejects_bad_bodies(admin: AdminClient, world: World) -> None:
    path = f"/api/v1/nodes/{world.node_a}/heartbeat"
    for body, field in [
        ({"vcpu": 0}, "vcpu"),
        ({"vcpu": "8"}, "vcpu"),
        ({"memory": 1 << 31}, "memory"),
        ({"instances": ["nope"]}, "instances[0]"),
        ({"instances": [str(uuid4())] * 10_001}, "instances"),
        ({"hostname": "x"}, "hostname"),
    ]:
        _bad(await admin.call("POST", path, body, token=world.token_a), field)
    node = await nodes.get(admin.pool, world.node_a)
    assert node.last_heartbeat is None and node.vcpu == 4


# -- assignments --------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_assignments_list_what_the_node_runs_and_stops(
    admin: AdminClient, world: World
) -> None:
    answer = await _as(admin, world.token_a, "GET", f"/api/v1/nodes/{world.node_a}/assignments")
    assert set(answer) == {"version", "instances"}
    listed = {item["instance_id"]: item for item in answer["instances"]}
    # Not the stopped one, not the running one of the inactive deployment, not B's.
    assert list(listed) == [str(world.a_run), str(world.a_stop), str(world.a_old_stopping)]
    assert listed[str(world.a_run)] == {
        "instance_id": str(world.a_run),
        "deployment_id": str(world.deployment.id),
        "deployment_name": f"web-{world.deployment.nanoid}-acme",
        "desired": "running",
        "image": "ghcr.io/acme/web:2",
        "command": "python app.py",
        "env": {"GREETING": "hi"},
        "app_port": 8080,
        "health_check_path": "/healthz",
        "resources": {"vcpu": 0.5, "memory": 256},
    }
    assert listed[str(world.a_stop)]["desired"] == "stopped"
    assert listed[str(world.a_old_stopping)]["desired"] == "stopped"
    assert listed[str(world.a_old_stopping)]["image"] == "ghcr.io/acme/web:1"
    again = await _as(admin, world.token_a, "GET", f"/api/v1/nodes/{world.node_a}/assignments")
    assert again["version"] == answer["version"]

    theirs = await _as(admin, world.token_b, "GET", f"/api/v1/nodes/{world.node_b}/assignments")
    assert [i["instance_id"] for i in theirs["instances"]] == [str(world.b_run)]
    assert theirs["version"] != answer["version"]

    # A failed deployment's instances are no longer the node's to run.
    await force_status(admin.pool, world.deployment.id, "failed", reason="test")
    after = await _as(admin, world.token_a, "GET", f"/api/v1/nodes/{world.node_a}/assignments")
    assert [i["instance_id"] for i in after["instances"]] == [
        str(world.a_stop),
        str(world.a_old_stopping),
    ]
    assert after["version"] != answer["version"]


@pytest.mark.asyncio
async def test_assignments_long_poll(admin: AdminClient, world: World) -> None:
    path = f"/api/v1/nodes/{world.node_a}/assignments"
    version = (await _as(admin, world.token_a, "GET", path))["version"]

    # Nothing changes: the answer comes when the wait is over, with the same version.
    started = time.monotonic()
    same = await _as(admin, world.token_a, "GET", f"{path}?wait=1&version={version}")
    assert 0.9 <= time.monotonic() - started < 3
    assert same["version"] == version

    # The agent's version is out of date: no wait at all.
    started = time.monotonic()
    await _as(admin, world.token_a, "GET", f"{path}?wait=20&version=stale")
    assert time.monotonic() - started < 1

    # A change during the wait ends it early.
    started = time.monotonic()
    waiting = asyncio.create_task(
        admin.call("GET", f"{path}?wait=20&version={version}", token=world.token_a)
    )
    await asyncio.sleep(0.3)
    assert not waiting.done()
    added = await instances.create(
        admin.pool, deployment_id=world.deployment.id, region="us-east", node_id=world.node_a
    )
    response = await waiting
    assert response.status == 200, response.body
    assert time.monotonic() - started < 3
    changed = response.json()
    assert changed["version"] != version
    assert str(added.id) in [i["instance_id"] for i in changed["instances"]]

    for query, field in [("wait=31", "wait"), ("wait=soon", "wait"), ("since=1", "since")]:
        _bad(await admin.call("GET", f"{path}?{query}", token=world.token_a), field)
    _bad(await admin.call("GET", f"{path}?version={'v' * 129}", token=world.token_a), "version")


# -- reports ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_report_one_instance(admin: AdminClient, world: World) -> None:
    base = f"/api/v1/nodes/{world.node_a}/instances"
    running = await _as(
        admin,
        world.token_a,
        "POST",
        f"{base}/{world.a_run}/report",
        {
            "state": "running",
            "healthy": True,
            "address": "10.1.2.3",
            "port": 31000,
            "boot_time_ms": 120,
        },
    )
    assert running["id"] == str(world.a_run)
    assert running["node_id"] == str(world.node_a)
    assert (running["state"], running["healthy"]) == ("running", True)
    assert (running["address"], running["port"], running["boot_time_ms"]) == (
        "10.1.2.3",
        31000,
        120,
    )
    assert running["message"] is None and running["last_health_at"] is not None

    sick = await _as(
        admin,
        world.token_a,
        "POST",
        f"{base}/{world.a_run}/report",
        {"state": "running", "healthy": False, "message": "GET /healthz: 500\x00"},
    )
    assert sick["healthy"] is False and sick["message"] == "GET /healthz: 500\ufffd"
    assert (sick["address"], sick["port"]) == ("10.1.2.3", 31000)

    # Health counts only while running.
    restarting = await _as(
        admin,
        world.token_a,
        "POST",
        f"{base}/{world.a_run}/report",
        {"state": "starting", "healthy": True, "address": "::1"},
    )
    assert (restarting["state"], restarting["healthy"]) == ("starting", False)
    assert restarting["message"] is None and restarting["address"] == "::1"
    stored = await instances.get(admin.pool, world.a_run)
    assert (stored.state, stored.healthy, stored.address) == ("starting", False, "::1")

    # Another node's instance through A's path, and ids that are no instance: 404.
    for other in (world.b_run, uuid4(), "not-an-id"):
        response = await admin.call(
            "POST", f"{base}/{other}/report", {"state": "running"}, token=world.token_a
        )
        assert response.status == 404 and error_of(response)["code"] == "not_found"
    assert (await instances.get(admin.pool, world.b_run)).state == "pending"

    # A stopping instance may only finish stopping; a stopped one is not revived.
    for stopped in (world.a_stop, world.a_done):
        response = await admin.call(
            "POST", f"{base}/{stopped}/report", {"state": "running"}, token=world.token_a
        )
        assert response.status == 409 and error_of(response)["field"] == "state"
    assert (await instances.get(admin.pool, world.a_stop)).state == "stopping"
    done = await _as(
        admin, world.token_a, "POST", f"{base}/{world.a_stop}/report", {"state": "stopped"}
    )
    assert done["state"] == "stopped"
    listed = await _as(admin, world.token_a, "GET", f"/api/v1/nodes/{world.node_a}/assignments")
    assert str(world.a_stop) not in [i["instance_id"] for i in listed["instances"]]

    path = f"{base}/{world.a_run}/report"
    for body, field in [
        ({"state": "dead"}, "state"),
        ({}, "state"),
        ({"state": "running", "port": 0}, "port"),
        ({"state": "running", "port": 65536}, "port"),
        ({"state": "running", "boot_time_ms": -1}, "boot_time_ms"),
        ({"state": "running", "boot_time_ms": 2**31}, "boot_time_ms"),
        ({"state": "running", "message": "x" * 2001}, "message"),
        ({"state": "running", "address": "no such host!"}, "address"),
        ({"state": "running", "healthy": "yes"}, "healthy"),
        ({"state": "running", "node_id": str(world.node_b)}, "node_id"),
    ]:
        _bad(await admin.call("POST", path, body, token=world.token_a), field)
    assert (await instances.get(admin.pool, world.a_run)).state == "starting"


@pytest.mark.asyncio
async def test_report_batch(admin: AdminClient, world: World) -> None:
    path = f"/api/v1/nodes/{world.node_a}/reports"
    stranger = uuid4()
    answer = await _as(
        admin,
        world.token_a,
        "POST",
        path,
        {
            "reports": [
                {"instance_id": str(world.a_run), "state": "starting"},
                {"instance_id": str(world.b_run), "state": "running"},
                {
                    "instance_id": str(world.a_run),
                    "state": "running",
                    "healthy": True,
                    "address": "10.1.2.3",
                    "port": 31000,
                    "message": "up",
                },
                {"instance_id": str(stranger), "state": "running"},
                {"instance_id": str(world.a_done), "state": "running"},
                {"instance_id": str(world.a_stop), "state": "stopped", "message": "exit 0"},
            ]
        },
    )
    assert answer["applied"] == 3
    assert [r["instance_id"] for r in answer["rejected"]] == [
        str(world.b_run),
        str(stranger),
        str(world.a_done),
    ]
    assert "not on node" in answer["rejected"][0]["reason"]
    assert "stopped" in answer["rejected"][2]["reason"]
    run = await instances.get(admin.pool, world.a_run)
    assert (run.state, run.healthy, run.address, run.port, run.message) == (
        "running",
        True,
        "10.1.2.3",
        31000,
        "up",
    )
    stop = await instances.get(admin.pool, world.a_stop)
    assert (stop.state, stop.message) == ("stopped", "exit 0")
    assert (await instances.get(admin.pool, world.b_run)).state == "pending"
    assert (await instances.get(admin.pool, world.a_done)).state == "stopped"

    empty = await _as(admin, world.token_a, "POST", path, {"reports": []})
    assert empty == {"applied": 0, "rejected": []}
    # A bad report refuses the whole batch before anything is applied.
    response = await admin.call(
        "POST",
        path,
        {
            "reports": [
                {"instance_id": str(world.a_run), "state": "stopped"},
                {"instance_id": str(world.a_run), "state": "running", "port": 0},
            ]
        },
        token=world.token_a,
    )
    _bad(response, "reports[1].port")
    assert (await instances.get(admin.pool, world.a_run)).state == "running"
    too_many = [{"instance_id": str(world.a_run), "state": "running"}] * 501
    _bad(await admin.call("POST", path, {"reports": too_many}, token=world.token_a), "reports")
    _bad(await admin.call("POST", path, {}, token=world.token_a), "reports")


# -- logs ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_logs(admin: AdminClient, world: World) -> None:
    path = f"/api/v1/nodes/{world.node_a}/logs"
    answer = await _as(
        admin,
        world.token_a,
        "POST",
        path,
        {
            "lines": [
                {
                    "instance_id": str(world.a_run),
                    "stream": "stdout",
                    "line": "listening on 8080",
                    "at": "2024-05-01T12:00:00+02:00",
                },
                {"instance_id": str(world.b_run), "stream": "stdout", "line": "not yours"},
                {"instance_id": str(world.a_run), "stream": "stderr", "line": "warn\x00ing"},
                {"instance_id": str(uuid4()), "stream": "stdout", "line": "nobody's"},
                {"instance_id": str(world.a_done), "stream": "stdout", "line": "last words"},
            ]
        },
        202,
    )
    assert answer == {"accepted": 3, "rejected": 2}
    stored = await logs.read(admin.pool, world.deployment.id)
    assert [(ln.instance_id, ln.stream, ln.line) for ln in stored] == [
        (world.a_run, "stdout", "listening on 8080"),
        (world.a_run, "stderr", "warn\ufffding"),
        (world.a_done, "stdout", "last words"),
    ]
    assert stored[0].logged_at == datetime(2024, 5, 1, 10, tzinfo=UTC)
    assert abs(stored[1].logged_at - datetime.now(UTC)) < timedelta(seconds=30)

    assert await _as(admin, world.token_a, "POST", path, {"lines": []}, 202) == {
        "accepted": 0,
        "rejected": 0,
    }
    line = {"instance_id": str(world.a_run), "stream": "stdout", "line": "x"}
    for bad, field in [
        ({**line, "line": "x" * (16 * 1024 + 1)}, "lines[0].line"),
        # 8193 characters, 16386 bytes of UTF-8.
        ({**line, "line": "é" * 8193}, "lines[0].line"),
        ({**line, "stream": "stdin"}, "lines[0].stream"),
        ({**line, "at": "2024-05-01T12:00:00"}, "lines[0].at"),
        ({**line, "at": "0001-01-01T00:00:00+01:00"}, "lines[0].at"),
        ({**line, "instance_id": 7}, "lines[0].instance_id"),
    ]:
        _bad(await admin.call("POST", path, {"lines": [bad]}, token=world.token_a), field)
    _bad(await admin.call("POST", path, {"lines": [line] * 5001}, token=world.token_a), "lines")
    full = await _as(
        admin, world.token_a, "POST", path, {"lines": [{**line, "line": "é" * 8192}]}, 202
    )
    assert full == {"accepted": 1, "rejected": 0}
    assert len(await logs.read(admin.pool, world.deployment.id)) == 4


# -- who may call -------------------------------------------------------------------------


def _routes(node: UUID | str, instance: UUID | str) -> list[tuple[str, str, Any]]:
    base = f"/api/v1/nodes/{node}"
    return [
        ("POST", f"{base}/heartbeat", {}),
        ("GET", f"{base}/assignments", None),
        ("POST", f"{base}/instances/{instance}/report", {"state": "starting"}),
        ("POST", f"{base}/reports", {"reports": []}),
        ("POST", f"{base}/logs", {"lines": []}),
    ]


@pytest.mark.asyncio
async def test_only_the_node_itself_or_the_admin(admin: AdminClient, world: World) -> None:
    forged = f"zwn_{world.node_b.hex}_not-the-secret"
    for method, path, body in _routes(world.node_b, world.b_run):
        for token, status in [
            (world.token_a, 403),
            (BOOTSTRAP_TOKEN, 403),
            (NO_TOKEN, 401),
            (forged, 401),
        ]:
            response = await admin.call(method, path, body, token=token)
            assert response.status == status, (method, path, token, response.body)
            error_of(response)
        assert (await admin.call(method, path, body, token=world.token_b)).status in (200, 202)
        assert (await admin.call(method, path, body)).status in (200, 202)
    # The admin token on a node that does not exist.
    for node in (uuid4(), "not-a-node"):
        for method, path, body in _routes(node, world.b_run):
            response = await admin.call(method, path, body)
            assert response.status == 404, (method, path, response.body)
            assert error_of(response)["code"] == "not_found"
    # The agents' traffic is not the operators' audit log.
    audited = await admin.pool.fetchval(
        "SELECT count(*) FROM audit_log WHERE action LIKE '%/api/v1/nodes/{id}/%'"
    )
    assert audited == 0

    doc = await admin.ok("GET", "/api/v1/openapi.json")
    for _, path, _ in _routes("{id}", "{instance_id}"):
        assert path in doc["paths"], path
    report = doc["paths"]["/api/v1/nodes/{id}/instances/{instance_id}/report"]["post"]
    assert {"401", "403", "404", "409"} <= set(report["responses"])
