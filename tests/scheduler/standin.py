"""Stand-in node agents for the scheduler's process-level tests, the admin API client they
and the tests share, and the few platform operations the tests repeat (seed, deploy, wait).

:class:`StandInAgent` is test code standing in for the real node agent (which arrives with
its own issue): it speaks the agent protocol of ``edge/admin/agents.py`` over real HTTP --
registers a node, heartbeats, long-polls its assignments (``wait`` + ``version``) and
reconciles them -- but instead of running an image it starts, per instance, a small real
HTTP/1.1 server on 127.0.0.1 (:class:`InstanceServer`) that answers every request with 200
and the deployment's ``VERSION``, and its health path with 200 (500 when the deployment has
``FAIL_HEALTH=1``). It health-checks each instance with a real GET before reporting it
``running``; on a stop it stops accepting, lets in-flight requests finish, closes, and reports
``stopped``.

Limits: one health report per start (no periodic re-checks); no resources are enforced;
no logs are shipped. Every loop and action is bounded by timeouts and records what it
raises in :attr:`StandInAgent.errors` (the tests assert it stays empty); answers that are
legitimate races with the platform (a report refused because the platform stopped the
instance meanwhile) go to :attr:`StandInAgent.notes` instead.
"""

from __future__ import annotations

import asyncio
import json
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11

from tests.harness import HOST, get, request

# How long one admin API call may take (a long poll adds its wait).
CALL_TIMEOUT = 10.0
HEARTBEAT_INTERVAL = 0.4
POLL_WAIT = 5
HEALTH_TIMEOUT = 2.0
# How long a stopping instance waits for its in-flight requests before it closes anyway.
STOP_GRACE = 5.0


class ApiFailure(AssertionError):
    """An admin API call answered with a status other than the one expected."""


@dataclass
class Api:
    """The admin API of an edge over real HTTP/1.1, one connection per call."""

    port: int
    token: str

    async def call(
        self, method: str, path: str, body: Any = None, *, timeout: float = CALL_TIMEOUT
    ) -> tuple[int, Any]:
        """Status and answer (parsed JSON, else text) of one request."""
        payload = b"" if body is None else json.dumps(body).encode()
        head = [
            f"{method} {path} HTTP/1.1",
            f"Host: {HOST}:{self.port}",
            f"Authorization: Bearer {self.token}",
            "Connection: close",
        ]
        if method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(payload)}")
        if payload:
            head.append("Content-Type: application/json")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
        response = await request(self.port, raw, timeout=timeout)
        kind = response.header("content-type") or ""
        if kind.startswith("application/json") and response.body:
            return response.status, json.loads(response.body)
        return response.status, response.body.decode(errors="replace")

    async def ok(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        status: int = 200,
        timeout: float = CALL_TIMEOUT,
    ) -> Any:
        """The answer of a call that must succeed with ``status``."""
        got, answer = await self.call(method, path, body, timeout=timeout)
        if got != status:
            raise ApiFailure(f"{method} {path}: expected {status}, got {got}: {answer}")
        return answer


# -- the instances ----------------------------------------------------------------------


class InstanceServer:
    """One instance: a minimal HTTP/1.1 server (keep-alive) on an ephemeral loopback port."""

    def __init__(self, instance_id: str, version: str, health_path: str, fail_health: bool):
        self.instance_id = instance_id
        self.version = version
        self.health_path = health_path
        self.fail_health = fail_health
        self.port = 0
        self.requests = 0
        # Connections the peer broke mid-request (the edge closing pooled connections).
        self.broken_connections = 0
        self.forced_close = False
        # Anything else a connection raised (a bug of this server): the agent reports it.
        self.errors: list[str] = []
        self._server: asyncio.AbstractServer | None = None
        self._closing = False
        # writer -> whether a request is being answered on it now
        self._connections: dict[asyncio.StreamWriter, bool] = {}

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self, grace: float = STOP_GRACE) -> None:
        """Stop accepting, close idle connections, let busy ones finish their request (up to
        ``grace`` seconds, then close them anyway)."""
        self._closing = True
        if self._server is None:
            return
        self._server.close()
        for writer, busy in list(self._connections.items()):
            if not busy:
                writer.close()
        deadline = time.monotonic() + grace
        while self._connections and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self._connections:
            self.forced_close = True
            for writer in list(self._connections):
                writer.close()
        await asyncio.wait_for(self._server.wait_closed(), grace)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        self._connections[writer] = False
        try:
            while not self._closing:
                target = await self._read_request(conn, reader)
                if target is None:
                    break
                self._connections[writer] = True
                self._answer(conn, writer, target)
                await writer.drain()
                self._connections[writer] = False
                if self._closing or conn.our_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.RemoteProtocolError):
            # The peer went away mid-request: the edge's business, counted for the record.
            self.broken_connections += 1
        except Exception:
            self.errors.append(f"instance {self.instance_id}: {traceback.format_exc()}")
        finally:
            self._connections.pop(writer, None)
            writer.close()

    @staticmethod
    async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> str | None:
        """The target of the next complete request, or None when the peer closed."""
        target = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                target = event.target.decode("latin-1")
            elif isinstance(event, h11.EndOfMessage):
                assert target is not None
                return target
            elif isinstance(event, h11.ConnectionClosed):
                return None

    def _answer(self, conn: h11.Connection, writer: asyncio.StreamWriter, target: str) -> None:
        self.requests += 1
        if target.partition("?")[0] == self.health_path:
            status, body = (500, b"unhealthy\n") if self.fail_health else (200, b"ok\n")
        else:
            status, body = 200, f"{self.version} {self.instance_id}\n".encode()
        headers = [
            ("content-type", "text/plain"),
            ("content-length", str(len(body))),
            ("x-instance", self.instance_id),
        ]
        if self._closing:
            headers.append(("connection", "close"))
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        writer.write(conn.send(h11.Data(data=body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")


# -- the agent ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """What an agent saw or did with an instance, when: ``healthy`` or ``unhealthy`` (its
    first health check passed or not, before the report went out) or ``stop`` (the platform
    told it to stop, or no longer assigned it)."""

    at: float
    node_id: str
    instance_id: str
    deployment_id: str
    what: str


@dataclass
class StandInAgent:
    """A node and its (stand-in) agent: see the module's docstring."""

    api: Api  # the admin API with a token that may register nodes
    hostname: str
    region: str
    vcpu: int = 64
    memory: int = 65536
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    poll_wait: int = POLL_WAIT
    node_id: str = ""
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # (monotonic time, what happened), for the test's diagnostics.
    events: list[tuple[float, str]] = field(default_factory=list)
    servers: dict[str, InstanceServer] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    partitioned: bool = False
    heartbeats: int = 0
    _node_api: Api | None = None
    _loops: list[asyncio.Task[None]] = field(default_factory=list)
    _actions: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # What the agent last set out to do with each instance: running, stopped or gone.
    _desire: dict[str, str] = field(default_factory=dict)
    _stopped_reported: set[str] = field(default_factory=set)
    _deployment_of: dict[str, str] = field(default_factory=dict)

    @property
    def node(self) -> Api:
        assert self._node_api is not None, "register() first"
        return self._node_api

    async def register(self) -> None:
        answer = await self.api.ok(
            "POST",
            "/api/v1/nodes",
            {
                "hostname": self.hostname,
                "region": self.region,
                "address": HOST,
                "vcpu": self.vcpu,
                "memory": self.memory,
            },
            status=201,
        )
        self.node_id = answer["id"]
        self._node_api = Api(self.api.port, answer["token"])

    async def start(self) -> None:
        """Register (when not yet), send a first heartbeat, and start the loops."""
        if not self.node_id:
            await self.register()
        await self._heartbeat()
        self._loops = [
            asyncio.create_task(self._heartbeat_loop(), name=f"{self.hostname}-heartbeat"),
            asyncio.create_task(self._poll_loop(), name=f"{self.hostname}-assignments"),
        ]

    async def kill_heartbeat(self) -> None:
        """Go silent like a partitioned node: every loop and action ends, the instance
        servers keep running (and serving)."""
        self.partitioned = True
        self._event("partitioned")
        await self._cancel_all()

    async def close(self) -> None:
        await self._cancel_all()
        servers, self.servers = list(self.servers.values()), {}
        await asyncio.gather(*(s.stop(grace=1.0) for s in servers))
        for server in servers:
            self.errors += server.errors

    def diagnostics(self) -> str:
        lines = [f"{self.hostname} ({self.node_id}):"]
        lines += [f"  {t:10.3f} {what}" for t, what in self.events[-40:]]
        lines += [f"  note: {n}" for n in self.notes[-20:]]
        lines += [f"  ERROR: {e}" for e in self.errors]
        return "\n".join(lines)

    # -- loops ----------------------------------------------------------------------------

    async def _cancel_all(self) -> None:
        tasks = [*self._loops, *self._actions.values()]
        self._loops, self._actions = [], {}
        for task in tasks:
            task.cancel()
        # Everything here ends on cancellation; a cancelled task's CancelledError is expected.
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                self.errors.append(f"{self.hostname}: on cancel: {result!r}")

    async def _guard(self, what: str, action: Awaitable[None]) -> None:
        try:
            await action
        except asyncio.CancelledError:
            raise
        except Exception:
            self.errors.append(f"{self.hostname}: {what}: {traceback.format_exc()}")

    def _event(self, what: str) -> None:
        self.events.append((time.monotonic(), what))

    def _record(self, iid: str, what: str) -> None:
        deployment = self._deployment_of.get(iid, "")
        self.records.append(Record(time.monotonic(), self.node_id, iid, deployment, what))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            await self._guard("heartbeat", self._heartbeat())

    async def _heartbeat(self) -> None:
        answer = await self.node.ok(
            "POST",
            f"/api/v1/nodes/{self.node_id}/heartbeat",
            {"instances": sorted(self.servers)},
        )
        self.heartbeats += 1
        for iid in answer["unknown_instances"]:
            if iid in self.servers:
                self._event(f"heartbeat: {iid} is not assigned here")
                self._want(iid, "gone", None)

    async def _poll_loop(self) -> None:
        version: str | None = None
        while True:
            path = f"/api/v1/nodes/{self.node_id}/assignments"
            if version is not None:
                path += f"?wait={self.poll_wait}&version={version}"
            try:
                answer = await self.node.ok("GET", path, timeout=self.poll_wait + CALL_TIMEOUT)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.errors.append(f"{self.hostname}: assignments: {traceback.format_exc()}")
                await asyncio.sleep(0.5)
                continue
            if answer["version"] != version:
                version = answer["version"]
                self._reconcile(answer["instances"])

    # -- reconciling ----------------------------------------------------------------------

    def _reconcile(self, assignments: list[dict[str, Any]]) -> None:
        seen = set()
        for assignment in assignments:
            iid = assignment["instance_id"]
            seen.add(iid)
            self._want(iid, assignment["desired"], assignment)
        for iid in list(self._desire):
            if iid not in seen and self._desire[iid] == "running":
                self._want(iid, "gone", None)

    def _want(self, iid: str, desire: str, assignment: dict[str, Any] | None) -> None:
        if self._desire.get(iid) == desire:
            return
        self._desire[iid] = desire
        self._event(f"{iid}: {desire}")
        if assignment is not None:
            self._deployment_of[iid] = assignment["deployment_id"]
        if desire != "running":
            self._record(iid, "stop")
        if desire == "running":
            assert assignment is not None
            self._stopped_reported.discard(iid)
            self._act(iid, lambda: self._start(assignment))
        else:
            self._act(iid, lambda: self._stop(iid, told=desire == "stopped"))

    def _act(self, iid: str, action: Callable[[], Awaitable[None]]) -> None:
        """Run ``action`` for the instance after the one before it (an instance's actions
        never overlap)."""
        previous = self._actions.get(iid)

        async def run() -> None:
            if previous is not None:
                # Its own failure is recorded by its own guard.
                await asyncio.gather(previous, return_exceptions=True)
            await self._guard(f"instance {iid}", action())

        self._actions[iid] = asyncio.create_task(run(), name=f"{self.hostname}-{iid}")

    async def _start(self, assignment: dict[str, Any]) -> None:
        iid = assignment["instance_id"]
        if iid in self.servers:
            return
        env = assignment["env"]
        path = assignment["health_check_path"]
        started = time.monotonic()
        await self._report(iid, {"state": "starting"})
        server = InstanceServer(iid, env.get("VERSION", ""), path, env.get("FAIL_HEALTH") == "1")
        port = await server.start()
        self.servers[iid] = server
        boot_ms = round((time.monotonic() - started) * 1000)
        healthy, detail = await self._check_health(port, path)
        self._record(iid, "healthy" if healthy else "unhealthy")
        self._event(f"{iid}: up on :{port} ({env.get('VERSION')}), healthy={healthy}")
        report: dict[str, Any] = {
            "state": "running",
            "address": HOST,
            "port": port,
            "boot_time_ms": boot_ms,
            "healthy": healthy,
        }
        if not healthy:
            report["message"] = detail
        await self._report(iid, report)

    async def _check_health(self, port: int, path: str) -> tuple[bool, str]:
        response = await request(port, get(f"{HOST}:{port}", path), timeout=HEALTH_TIMEOUT)
        return response.status == 200, f"health check GET {path}: {response.status}"

    async def _stop(self, iid: str, *, told: bool) -> None:
        """Stop the instance's server; report it stopped when the platform told us to stop
        it, or when it ran and the platform no longer assigns it."""
        server = self.servers.get(iid)
        if server is not None:
            await server.stop()
            # Only now: cancelled mid-stop, close() still finds it to stop.
            self.servers.pop(iid, None)
            self._event(f"{iid}: stopped after {server.requests} requests")
            self.errors += server.errors
            if server.forced_close:
                self.errors.append(f"{self.hostname}: {iid}: requests outlived {STOP_GRACE} s")
        if (told or server is not None) and iid not in self._stopped_reported:
            self._stopped_reported.add(iid)
            await self._report(iid, {"state": "stopped"})

    async def _report(self, iid: str, report: dict[str, Any]) -> None:
        status, answer = await self.node.call(
            "POST", f"/api/v1/nodes/{self.node_id}/instances/{iid}/report", report
        )
        if status == 200:
            return
        if status in (404, 409):
            # The platform stopped or removed the instance meanwhile: a race, not a fault.
            self.notes.append(f"{iid}: report {report['state']} refused: {status} {answer}")
            return
        raise ApiFailure(f"report {report} of {iid}: {status} {answer}")


# -- the platform, as the tests drive it --------------------------------------------------

ORG = "acme"
PROJECT = "web"
REGION = "local"
HEALTH_PATH = "/healthz"


async def seed_platform(api: Api) -> None:
    """A region and the project (production and staging) whose deployments the tests roll."""
    await api.ok(
        "POST", "/api/v1/regions", {"code": REGION, "name": "Loopback", "country": "DE"}, status=201
    )
    await api.ok(
        "POST",
        "/api/v1/projects",
        {
            "org": ORG,
            "name": PROJECT,
            "health_check_path": HEALTH_PATH,
            "resources": {"vcpu": 0.5, "memory": 256},
        },
        status=201,
    )


async def start_agents(api: Api, *hostnames: str) -> list[StandInAgent]:
    agents = [StandInAgent(api, hostname, REGION) for hostname in hostnames]
    for agent in agents:
        await agent.start()
    return agents


async def deploy(
    api: Api,
    version: str,
    *,
    environment: str = "production",
    per_region: int = 2,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Create a deployment whose instances answer with ``version``."""
    return await api.ok(  # type: ignore[no-any-return]
        "POST",
        "/api/v1/deployments",
        {
            "org": ORG,
            "project": PROJECT,
            "environment": environment,
            "image": f"ghcr.io/{ORG}/{PROJECT}:{version}",
            "instances_per_region": per_region,
            "env": {"VERSION": version, **(env or {})},
        },
        status=201,
    )


async def wait_for_status(
    api: Api, deployment: dict[str, Any], wanted: str, timeout: float
) -> dict[str, Any]:
    """Poll the deployment until its status is ``wanted``; a failure it was not meant to
    end in, or the timeout, is an assertion with what the API last said."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, Any] = await api.ok("GET", f"/api/v1/deployments/{deployment['id']}")
        if found["status"] == wanted:
            return found
        if found["status"] == "failed":
            raise AssertionError(
                f"{found['env'].get('VERSION')} ({found['name']}) failed instead of becoming "
                f"{wanted}: {found['failure_reason']}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{found['env'].get('VERSION')} ({found['name']}) is {found['status']}, not "
                f"{wanted}, after {timeout} s: {found}"
            )
        await asyncio.sleep(0.1)


async def instances_of(api: Api, deployment_id: str) -> list[dict[str, Any]]:
    return await api.ok(  # type: ignore[no-any-return]
        "GET", f"/api/v1/deployments/{deployment_id}/instances?per_page=1000"
    )


async def current_deployment(api: Api, environment: str = "production") -> dict[str, Any] | None:
    status, answer = await api.call(
        "GET", f"/api/v1/projects/{ORG}/{PROJECT}/deployments/current?environment={environment}"
    )
    if status == 404:
        return None
    if status != 200:
        raise ApiFailure(f"current deployment of {environment}: {status} {answer}")
    return answer  # type: ignore[no-any-return]
