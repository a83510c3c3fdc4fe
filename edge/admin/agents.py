"""``/api/v1/nodes/{id}/...``: the endpoints a node's agent calls with its node token.

Heartbeat (capacity, liveness, instances to stop), assignments (what the node must run,
long-polled), instance reports (one, or a batch in one transaction) and log lines. A node
token works on its own node's paths only (the framework answers 403 otherwise); here, an
instance or a log line of another node's instance is refused as if it did not exist.

Limits: the long poll re-reads the database every half second (no LISTEN connection per
waiting agent); a stale report can never revive an instance the platform is stopping.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import AwareDatetime, Field, field_validator

from edge.admin.api import Api, ApiError, Call, Out, QueryModel, Strict, not_found
from edge.admin.nodes import HOSTNAME, Capacity, node_id
from edge.store import instances, logs, nodes
from edge.store.instances import Instance, InstanceState

api = Api()

# Seconds between an agent's heartbeats; the down timeout must span several of them.
HEARTBEAT_INTERVAL = 5.0
MAX_WAIT = 30
POLL_INTERVAL = 0.5
MAX_REPORTS = 500
MAX_LOG_LINES = 5000
MAX_LINE_BYTES = 16 * 1024
MAX_MESSAGE = 2000
INT4_MAX = 2**31 - 1

# Once the platform stops an instance, an agent's report may only finish the stop: a late
# "running" must not put it back among the node's assignments or the routes.
_ALLOWED_AFTER: dict[str, frozenset[str]] = {
    "stopping": frozenset({"stopping", "stopped", "failed"}),
    "stopped": frozenset({"stopped", "failed"}),
    "failed": frozenset({"stopped", "failed"}),
}

# A host name or IPv4 address, or an IPv6 address: the same rule in the OpenAPI document as
# in the validation, so that what the document allows is accepted.
_HEX = "[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join(
    [
        f"({_HEX}:){{7}}{_HEX}",
        f"({_HEX}:){{1,7}}:",
        *(f"({_HEX}:){{1,{7 - n}}}(:{_HEX}){{1,{n}}}" for n in range(1, 7)),
        f":((:{_HEX}){{1,7}}|:)",
    ]
)
ADDRESS = f"^({HOSTNAME.removeprefix('^').removesuffix('$')}|{_IPV6})$"


def _text(value: str) -> str:
    # PostgreSQL text cannot hold NUL; process output can.
    return value.replace("\x00", "\ufffd")


# -- models -------------------------------------------------------------------------------


class HeartbeatIn(Strict):
    vcpu: int | None = Field(None, gt=0, le=4096, description="current capacity, when changed")
    memory: int | None = Field(None, gt=0, le=1 << 30, description="MiB")
    instances: list[UUID] = Field(
        default_factory=list, max_length=10_000, description="ids of the instances it runs"
    )


class HeartbeatOut(Out):
    node_id: UUID
    state: nodes.NodeState
    capacity: Capacity
    heartbeat_interval: float = Field(description="seconds until the next heartbeat")
    server_time: datetime = Field(description="the database's clock at this heartbeat")
    unknown_instances: list[UUID] = Field(
        description="reported instances the platform does not assign to the node: stop them"
    )


class AssignmentQuery(QueryModel):
    wait: int | None = Field(
        None, ge=0, le=MAX_WAIT, description="seconds to wait for a change from `version`"
    )
    version: str | None = Field(
        None, max_length=128, description="`version` of the answer the agent has"
    )


class Resources(Out):
    vcpu: float
    memory: int = Field(description="MiB")


class AssignmentOut(Out):
    instance_id: UUID
    deployment_id: UUID
    deployment_name: str = Field(description="<project>-<nanoid>-<org>")
    desired: Literal["running", "stopped"]
    image: str | None
    command: str | None
    env: dict[str, str] = Field(description="the deployment's variables; the agent adds PORT")
    app_port: int
    health_check_path: str
    resources: Resources


class AssignmentsOut(Out):
    version: str = Field(description="changes when the assignments change")
    instances: list[AssignmentOut]


class InstanceReport(Strict):
    state: InstanceState
    healthy: bool | None = Field(None, description="counts only while running")
    address: str | None = Field(
        None,
        max_length=253,
        pattern=ADDRESS,
        description="IP address or host name the edge connects to",
    )
    port: int | None = Field(None, ge=1, le=65535)
    boot_time_ms: int | None = Field(None, ge=0, le=INT4_MAX)
    message: str | None = Field(None, max_length=MAX_MESSAGE)

    @field_validator("message")
    @classmethod
    def _message(cls, value: str | None) -> str | None:
        return None if value is None else _text(value)


class BatchReport(InstanceReport):
    instance_id: UUID


class ReportBatch(Strict):
    reports: list[BatchReport] = Field(max_length=MAX_REPORTS)


class AgentInstanceOut(Out):
    id: UUID
    deployment_id: UUID
    node_id: UUID | None
    region: str
    state: InstanceState
    healthy: bool
    address: str | None
    port: int | None
    boot_time_ms: int | None
    message: str | None
    last_health_at: datetime | None
    created_at: datetime
    updated_at: datetime


class Rejected(Out):
    instance_id: UUID
    reason: str


class BatchOut(Out):
    applied: int
    rejected: list[Rejected]


class LogLineIn(Strict):
    instance_id: UUID
    stream: logs.Stream
    line: str = Field(max_length=MAX_LINE_BYTES, description="at most 16 KiB of UTF-8")
    at: AwareDatetime | None = Field(None, description="when it was written; default: now")

    @field_validator("line")
    @classmethod
    def _line(cls, value: str) -> str:
        if len(value.encode()) > MAX_LINE_BYTES:
            raise ValueError(f"a line must be at most {MAX_LINE_BYTES} bytes of UTF-8")
        return _text(value)

    @field_validator("at")
    @classmethod
    def _at(cls, value: datetime | None) -> datetime | None:
        # An offset can push year 1 or 9999 out of Python's range, where the database
        # driver would fail on it.
        try:
            return None if value is None else value.astimezone(UTC)
        except OverflowError:
            raise ValueError("the time is out of range") from None


class LogBatch(Strict):
    lines: list[LogLineIn] = Field(max_length=MAX_LOG_LINES)


class LogsOut(Out):
    accepted: int
    rejected: int = Field(description="lines of instances that are not on the node")


# -- heartbeat ----------------------------------------------------------------------------


@api.route(
    "POST",
    "/api/v1/nodes/{id}/heartbeat",
    auth="node",
    summary="Heartbeat of a node's agent: capacity, and which of its instances to stop",
    tag="agents",
    body=HeartbeatIn,
    body_required=False,
    response=HeartbeatOut,
    errors=(404,),
)
async def heartbeat(call: Call) -> HeartbeatOut:
    body: HeartbeatIn = call.body or HeartbeatIn()
    async with call.ctx.pool.acquire() as conn, conn.transaction():
        node = await nodes.check_in(conn, node_id(call), vcpu=body.vcpu, memory_mb=body.memory)
        unknown = await instances.unassigned(conn, node.id, list(dict.fromkeys(body.instances)))
    assert node.last_heartbeat is not None
    return HeartbeatOut(
        node_id=node.id,
        state=node.state,
        capacity=Capacity(vcpu=node.vcpu, memory=node.memory_mb),
        heartbeat_interval=HEARTBEAT_INTERVAL,
        server_time=node.last_heartbeat,
        unknown_instances=unknown,
    )


# -- assignments --------------------------------------------------------------------------


def _assignment(a: instances.Assignment) -> AssignmentOut:
    return AssignmentOut(
        instance_id=a.instance_id,
        deployment_id=a.deployment_id,
        deployment_name=a.deployment_name,
        desired="stopped" if a.state == "stopping" else "running",
        image=a.image,
        command=a.command,
        # Environment variables are strings; the store keeps whatever JSON it was given.
        env={k: v if isinstance(v, str) else json.dumps(v) for k, v in a.env.items()},
        app_port=a.app_port,
        health_check_path=a.health_check_path,
        resources=Resources(vcpu=float(a.vcpu), memory=a.memory_mb),
    )


async def _assignments(pool: Any, nid: UUID) -> AssignmentsOut:
    found = [_assignment(a) for a in await instances.list_assignments(pool, nid)]
    canonical = json.dumps(
        [a.model_dump(mode="json") for a in found], sort_keys=True, separators=(",", ":")
    )
    return AssignmentsOut(
        version=hashlib.sha256(canonical.encode()).hexdigest()[:32], instances=found
    )


@api.route(
    "GET",
    "/api/v1/nodes/{id}/assignments",
    auth="node",
    summary="The instances a node must run or stop (long poll with wait and version)",
    tag="agents",
    query=AssignmentQuery,
    response=AssignmentsOut,
    errors=(404,),
)
async def assignments(call: Call) -> AssignmentsOut:
    query: AssignmentQuery = call.query
    pool = call.ctx.pool
    node = await nodes.get(pool, node_id(call))
    current = await _assignments(pool, node.id)
    if not query.wait or query.version is None or query.version != current.version:
        return current
    loop = asyncio.get_running_loop()
    deadline = loop.time() + query.wait
    while (left := deadline - loop.time()) > 0:
        await asyncio.sleep(min(POLL_INTERVAL, left))
        current = await _assignments(pool, node.id)
        if current.version != query.version:
            break
    return current


# -- reports ------------------------------------------------------------------------------


def _refusal(instance: Instance, state: str) -> str | None:
    allowed = _ALLOWED_AFTER.get(instance.state)
    if allowed is None or state in allowed:
        return None
    return (
        f"instance {instance.id} is {instance.state}: the platform stopped it, so it may only "
        f"be reported {' or '.join(sorted(allowed))}, not {state}"
    )


async def _apply(conn: Any, instance_id: UUID, report: InstanceReport) -> Instance:
    instance = await instances.report(
        conn,
        instance_id,
        report.state,
        address=report.address,
        port=report.port,
        boot_time_ms=report.boot_time_ms,
        message=report.message,
    )
    # report() already clears health outside running; a health result counts only inside.
    if report.state == "running" and report.healthy is not None:
        instance = await instances.set_health(conn, instance_id, report.healthy)
    return instance


def _instance_id(call: Call) -> UUID:
    try:
        return UUID(call.params["instance_id"])
    except ValueError:
        raise not_found(f"instance {call.params['instance_id']!r}") from None


@api.route(
    "POST",
    "/api/v1/nodes/{id}/instances/{instance_id}/report",
    auth="node",
    summary="Report an instance's state, address, boot time and health",
    tag="agents",
    body=InstanceReport,
    response=AgentInstanceOut,
    errors=(404, 409),
)
async def report_instance(call: Call) -> Instance:
    body: InstanceReport = call.body
    nid, iid = node_id(call), _instance_id(call)
    async with call.ctx.pool.acquire() as conn, conn.transaction():
        await nodes.get(conn, nid)
        instance = (await instances.lock_on_node(conn, nid, [iid])).get(iid)
        if instance is None:
            raise not_found(f"instance {iid} on node {nid}")
        refusal = _refusal(instance, body.state)
        if refusal is not None:
            raise ApiError(409, "conflict", refusal, field="state")
        return await _apply(conn, iid, body)


@api.route(
    "POST",
    "/api/v1/nodes/{id}/reports",
    auth="node",
    summary="Report several instances at once, in one transaction",
    tag="agents",
    body=ReportBatch,
    response=BatchOut,
    errors=(404,),
)
async def report_batch(call: Call) -> BatchOut:
    body: ReportBatch = call.body
    nid = node_id(call)
    applied = 0
    rejected: list[Rejected] = []
    async with call.ctx.pool.acquire() as conn, conn.transaction():
        await nodes.get(conn, nid)
        mine = await instances.lock_on_node(
            conn, nid, list(dict.fromkeys(r.instance_id for r in body.reports))
        )
        for report in body.reports:
            instance = mine.get(report.instance_id)
            reason = (
                f"instance {report.instance_id} is not on node {nid}"
                if instance is None
                else _refusal(instance, report.state)
            )
            if reason is not None:
                rejected.append(Rejected(instance_id=report.instance_id, reason=reason))
                continue
            # A later report of the same instance in the batch follows from this one.
            mine[report.instance_id] = await _apply(conn, report.instance_id, report)
            applied += 1
    return BatchOut(applied=applied, rejected=rejected)


# -- logs ---------------------------------------------------------------------------------


@api.route(
    "POST",
    "/api/v1/nodes/{id}/logs",
    auth="node",
    summary="Store instances' log lines",
    tag="agents",
    body=LogBatch,
    response=LogsOut,
    status=202,
    errors=(404,),
)
async def append_logs(call: Call) -> LogsOut:
    body: LogBatch = call.body
    pool = call.ctx.pool
    node = await nodes.get(pool, node_id(call))
    accepted = await logs.append_for_node(
        pool, node.id, [(ln.instance_id, ln.stream, ln.line, ln.at) for ln in body.lines]
    )
    return LogsOut(accepted=accepted, rejected=len(body.lines) - accepted)
