"""``zeitwork agent`` as a real process against a real edge (admin API, scheduler, proxy) and
real PostgreSQL, running real app processes through the process runtime.

The app (``APP`` below, written to a file) is a small HTTP server: it answers ``hello <VERSION>``,
its health path ``/healthz`` answers 500 while the file named by ``$SICK`` exists, ``/exit``
makes it exit with status 3, and it writes a line to stdout and one to stderr at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from tests.admin.process import EdgeProcess, running_edge
from tests.conftest import require_tool
from tests.harness import HOST, free_port
from tests.integration.test_process import zeitwork_command
from tests.scheduler.standin import Api

TOKEN = "agent-test-admin-token-0123456789"
BOOTSTRAP = "agent-test-bootstrap-token-0123456789"
ORG, PROJECT, REGION = "acme", "shop", "local"

APP = """
import os, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/exit":
            os._exit(3)
        if self.path == "/healthz":
            status = 500 if os.path.exists(os.environ["SICK"]) else 200
        else:
            status = 200
        body = f"hello {os.environ['VERSION']}".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

print(f"listening on {os.environ['PORT']}", flush=True)
print("stderr works", file=sys.stderr, flush=True)
HTTPServer(("0.0.0.0", int(os.environ["PORT"])), Handler).serve_forever()
"""


@dataclass
class AgentProcess:
    proc: subprocess.Popen[bytes]
    metrics_port: int
    data_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self) -> dict[str, Any]:
        try:
            with urllib.request.urlopen(
                f"http://{HOST}:{self.metrics_port}/health", timeout=5
            ) as answer:
                return dict(json.loads(answer.read()))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read()))

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{HOST}:{self.metrics_port}/metrics", timeout=5) as a:
            return str(a.read().decode())


def agent_command(operator: str, data_dir: Path, metrics_port: int, *flags: str) -> list[str]:
    return [
        *zeitwork_command(),
        "agent",
        "--operator",
        operator,
        "--region",
        REGION,
        "--hostname",
        "worker-1",
        "--address",
        HOST,
        "--vcpu",
        "4",
        "--memory",
        "4096",
        "--data-dir",
        str(data_dir),
        "--metrics-host",
        HOST,
        "--metrics-port",
        str(metrics_port),
        "--health-interval",
        "0.3",
        "--stop-grace",
        "3",
        "--heartbeat-interval",
        "0.5",
        *flags,
    ]


@contextlib.contextmanager
def running_agent(
    operator: str, tmp_path: Path, *flags: str, data_dir: Path | None = None, name: str = "agent"
) -> Iterator[AgentProcess]:
    metrics_port = free_port()
    data_dir = data_dir or tmp_path / "agent-data"
    log_path = tmp_path / f"{name}.log"
    env = dict(os.environ, ZEITWORK_BOOTSTRAP_TOKEN=BOOTSTRAP)
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            agent_command(operator, data_dir, metrics_port, *flags),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    agent = AgentProcess(proc, metrics_port, data_dir, log_path)
    try:
        yield agent
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


@dataclass
class Platform:
    edge: EdgeProcess
    api: Api
    app: Path
    sick: Path
    tmp_path: Path

    @property
    def operator(self) -> str:
        return self.edge.admin_url

    async def deploy(self, version: str) -> dict[str, Any]:
        return dict(
            await self.api.ok(
                "POST",
                "/api/v1/deployments",
                {
                    "org": ORG,
                    "project": PROJECT,
                    "command": f"exec {sys.executable} {self.app}",
                    "env": {"VERSION": version, "SICK": str(self.sick)},
                },
                status=201,
            )
        )

    async def until(self, what: str, check: Any, timeout: float = 30.0) -> Any:
        """Poll ``check()`` (async) until it returns something truthy."""
        deadline = time.monotonic() + timeout
        while True:
            found = await check()
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: not within {timeout} s (last: {found!r})")
            await asyncio.sleep(0.1)

    async def status(self, deployment: dict[str, Any]) -> str:
        answer = await self.api.ok("GET", f"/api/v1/deployments/{deployment['id']}")
        return str(answer["status"])

    async def active(self, deployment: dict[str, Any], timeout: float = 30.0) -> None:
        async def check() -> bool:
            status = await self.status(deployment)
            assert status != "failed", await self.api.ok(
                "GET", f"/api/v1/deployments/{deployment['id']}"
            )
            return status == "active"

        await self.until(f"{deployment['name']} active", check, timeout)

    async def instances(self, deployment: dict[str, Any]) -> list[dict[str, Any]]:
        return list(await self.api.ok("GET", f"/api/v1/deployments/{deployment['id']}/instances"))

    async def through_edge(self, deployment: dict[str, Any]) -> tuple[int, bytes]:
        return await http_get(
            HOST, self.edge.http_port, "/", host=f"{deployment['name']}.zeitwork.app"
        )


async def http_get(
    address: str, port: int, path: str, *, host: str | None = None
) -> tuple[int, bytes]:
    """Status and body of one GET (in a thread: urllib is blocking)."""

    def fetch() -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://{address}:{port}{path}")
        if host:
            request.add_header("Host", host)
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return int(answer.status), bytes(answer.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), bytes(exc.read())

    return await asyncio.to_thread(fetch)


@pytest_asyncio.fixture
async def platform(empty_database_url: str, tmp_path: Path) -> AsyncIterator[Platform]:
    app = tmp_path / "app.py"
    app.write_text(APP)
    env = {"ZEITWORK_ADMIN_TOKEN": TOKEN, "ZEITWORK_BOOTSTRAP_TOKEN": BOOTSTRAP}
    with running_edge(
        empty_database_url,
        tmp_path,
        "--heartbeat-timeout",
        "4",
        "--scheduler-interval",
        "0.3",
        "--start-timeout",
        "20",
        "--rollback-window",
        "30",
        "--admin-rate-limit",
        "1000/1000",
        env=env,
    ) as edge:
        api = Api(edge.admin_port, TOKEN)
        await api.ok(
            "POST",
            "/api/v1/regions",
            {"code": REGION, "name": "Local", "country": "DE"},
            status=201,
        )
        await api.ok(
            "POST",
            "/api/v1/projects",
            {
                "org": ORG,
                "name": PROJECT,
                "health_check_path": "/healthz",
                "resources": {"vcpu": 0.5, "memory": 256},
            },
            status=201,
        )
        yield Platform(edge, api, app, tmp_path / "sick", tmp_path)


async def _node(platform: Platform) -> dict[str, Any]:
    nodes = await platform.api.ok("GET", "/api/v1/nodes")
    return dict(nodes[0]) if nodes else {}


async def _registered(platform: Platform) -> dict[str, Any]:
    async def check() -> dict[str, Any]:
        node = await _node(platform)
        return node if node.get("state") == "ready" else {}

    return dict(await platform.until("node registered", check))


def _app_pids(app: Path) -> list[int]:
    found = subprocess.run(["pgrep", "-f", str(app)], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


# -- the whole path ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_agent_registers_runs_reports_and_ships_logs(platform: Platform) -> None:
    promtool = require_tool("promtool")
    with running_agent(platform.operator, platform.tmp_path) as agent:
        node = await _registered(platform)
        assert (node["hostname"], node["region"], node["address"]) == ("worker-1", REGION, HOST)
        identity = agent.data_dir / "node.json"
        assert stat.S_IMODE(identity.stat().st_mode) == 0o600
        assert json.loads(identity.read_text())["node_id"] == node["id"]

        v1 = await platform.deploy("v1")
        await platform.active(v1)
        assert await platform.through_edge(v1) == (200, b"hello v1")
        (instance,) = await platform.instances(v1)
        assert instance["state"] == "running" and instance["healthy"] is True
        assert instance["port"] == 3000  # the project's app_port, in its own namespace as root
        assert instance["boot_time_ms"] is not None and instance["boot_time_ms"] > 0

        async def shipped() -> list[str]:
            logs = await platform.api.ok("GET", f"/api/v1/deployments/{v1['id']}/logs")
            got = [(entry["stream"], entry["line"]) for entry in logs["lines"]]
            wanted = [("stdout", "listening on 3000"), ("stderr", "stderr works")]
            return [line for _, line in got] if all(w in got for w in wanted) else []

        await platform.until("the app's output in the deployment's logs", shipped)

        health = agent.health()
        assert health["status"] == "ok" and health["node_id"] == node["id"], health
        assert (health["instances"], health["healthy_instances"]) == (1, 1)
        metrics = agent.metrics()
        assert "zeitwork_instance_boot_seconds_count 1.0" in metrics
        assert 'zeitwork_agent_instances{state="running"} 1.0' in metrics
        check = subprocess.run(  # noqa: ASYNC221 (a short check, nothing else runs)
            [promtool, "check", "metrics"], input=metrics, capture_output=True, text=True
        )
        assert check.returncode == 0 and not check.stdout.strip(), check

    # SIGTERM: the agent stops its instances, reports them and exits 0. (The scheduler may
    # already have placed a replacement for the stopped instance: look at the one that ran.)
    assert agent.proc.returncode == 0, agent.log()
    assert _app_pids(platform.app) == []
    ran = instance["id"]
    (instance,) = [i for i in await platform.instances(v1) if i["id"] == ran]
    assert instance["state"] == "stopped", instance


@pytest.mark.asyncio
async def test_unhealthy_healthy_again_and_exit_are_reported(platform: Platform) -> None:
    with running_agent(platform.operator, platform.tmp_path) as agent:
        await _registered(platform)
        v1 = await platform.deploy("v1")
        await platform.active(v1)
        (first,) = await platform.instances(v1)

        async def instance_is(**wanted: Any) -> dict[str, Any]:
            found = {i["id"]: i for i in await platform.instances(v1)}[first["id"]]
            return found if all(found[k] == v for k, v in wanted.items()) else {}

        platform.sick.touch()
        sick = await platform.until("reported unhealthy", lambda: instance_is(healthy=False))
        assert sick["state"] == "running" and "500" in sick["message"], sick
        # The edge stops routing to it: the only instance is gone from the table.
        await platform.until("not routed", lambda: _status_is(platform, v1, 503), timeout=10)
        platform.sick.unlink()
        await platform.until("healthy again", lambda: instance_is(healthy=True))
        # The edge follows within its reload (a notification and 50 ms).
        await platform.until("routed again", lambda: _status_is(platform, v1, 200), timeout=5)
        assert await platform.through_edge(v1) == (200, b"hello v1")

        # The app exits: reported failed with its status; the scheduler replaces it.
        assert first["address"] is not None
        with contextlib.suppress(OSError):
            await http_get(first["address"], first["port"], "/exit")
        failed = await platform.until("reported failed", lambda: instance_is(state="failed"))
        assert failed["message"] == "exited with status 3", failed

        async def replaced() -> bool:
            others = [i for i in await platform.instances(v1) if i["id"] != first["id"]]
            return any(i["state"] == "running" and i["healthy"] for i in others)

        await platform.until("a replacement serves", replaced)
        await platform.until("routed to it", lambda: _status_is(platform, v1, 200), timeout=5)
        assert await platform.through_edge(v1) == (200, b"hello v1")
        assert await platform.status(v1) == "active"
        assert "exited with status 3" in agent.log()


async def _status_is(platform: Platform, deployment: dict[str, Any], status: int) -> bool:
    return (await platform.through_edge(deployment))[0] == status


# -- failures ---------------------------------------------------------------------------


class Relay:
    """A TCP relay the test can cut: the operator becomes unreachable for the agent only."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, HOST, self.port)

    async def cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        self._writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.difference_update({writer, up_writer})


@pytest.mark.asyncio
async def test_operator_outage_keeps_instances_running(platform: Platform) -> None:
    relay = Relay(platform.edge.admin_port)
    await relay.open()
    try:
        with running_agent(f"http://{HOST}:{relay.port}", platform.tmp_path) as agent:
            await _registered(platform)
            v1 = await platform.deploy("v1")
            await platform.active(v1)
            (instance,) = await platform.instances(v1)

            await relay.cut()

            async def unreachable() -> bool:
                await asyncio.sleep(0)
                return bool(agent.health()["operator"] == "unreachable")

            await platform.until("the agent sees the outage", unreachable, timeout=40)
            # The instance keeps serving through the outage...
            served = await http_get(instance["address"], instance["port"], "/")
            assert served == (200, b"hello v1")
            # ... and what happens meanwhile is reported once the operator is back.
            platform.sick.touch()
            await asyncio.sleep(1.0)
            await relay.open()

            async def reachable() -> bool:
                await asyncio.sleep(0)
                return bool(agent.health()["operator"] == "reachable")

            await platform.until("the agent reaches the operator again", reachable, timeout=40)

            async def reported_sick() -> bool:
                found = await platform.instances(v1)
                return found[0]["healthy"] is False

            await platform.until("the outage's report arrives", reported_sick)
            assert "heartbeat failed" in agent.log()
            platform.sick.unlink()
    finally:
        await relay.cut()


@pytest.mark.asyncio
async def test_a_killed_agent_leaves_no_orphans(platform: Platform) -> None:
    data_dir = platform.tmp_path / "agent-data"
    with running_agent(platform.operator, platform.tmp_path, data_dir=data_dir) as first:
        await _registered(platform)
        v1 = await platform.deploy("v1")
        await platform.active(v1)
        (old_pid,) = _app_pids(platform.app)
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(10)
    # The agent is gone, its instance still runs (nothing stopped it).
    assert _app_pids(platform.app) == [old_pid]

    with running_agent(
        platform.operator, platform.tmp_path, data_dir=data_dir, name="agent-2"
    ) as second:

        async def restarted() -> list[int]:
            pids = _app_pids(platform.app)
            instances = await platform.instances(v1)
            serving = instances[0]["state"] == "running" and instances[0]["healthy"]
            return pids if serving and pids and old_pid not in pids else []

        pids = await platform.until("the instance started again, the old one gone", restarted)
        assert len(pids) == 1
        assert "left behind" in second.log()
        await platform.until("routed to it", lambda: _status_is(platform, v1, 200), timeout=5)
        assert await platform.through_edge(v1) == (200, b"hello v1")
        assert await platform.status(v1) == "active"


# -- the command line -------------------------------------------------------------------


def _run_agent(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ZEITWORK_")} | (
        env or {}
    )
    return subprocess.run(
        [*zeitwork_command(), "agent", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env=environment,
        check=False,
    )


def test_bad_options_exit_2_naming_the_problem(tmp_path: Path) -> None:
    missing = _run_agent("--operator", "http://127.0.0.1:1")
    assert missing.returncode == 2
    assert "--region (or $ZEITWORK_REGION) is required" in missing.stderr
    bad_url = _run_agent("--region", "x", "--operator", "https://op:8080")
    assert bad_url.returncode == 2 and "only http:// is supported" in bad_url.stderr
    bad_number = _run_agent("--region", "x", "--vcpu", "many")
    assert bad_number.returncode == 2 and "'many' is not a number" in bad_number.stderr
    assert "Traceback" not in missing.stderr + bad_url.stderr + bad_number.stderr


def test_no_token_exits_1_saying_which(tmp_path: Path) -> None:
    done = _run_agent(
        "--region",
        REGION,
        "--operator",
        "http://127.0.0.1:1",
        "--data-dir",
        str(tmp_path),
        "--metrics-port",
        str(free_port()),
    )
    assert done.returncode == 1, done.stderr
    assert "no token to register with" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.asyncio
async def test_a_removed_node_stops_the_agent_with_a_clear_error(platform: Platform) -> None:
    with running_agent(platform.operator, platform.tmp_path) as agent:
        node = await _registered(platform)
        await platform.api.ok("DELETE", f"/api/v1/nodes/{node['id']}", status=204)
        code = await asyncio.to_thread(agent.proc.wait, 30)
    assert code == 1, agent.log()
    assert "no longer accepts this node" in agent.log()
    assert "node.json to register it again" in agent.log()
