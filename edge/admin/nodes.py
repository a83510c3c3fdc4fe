"""``/api/v1/nodes``: the operator's view of worker nodes, registration, drain and removal.

The agent's own endpoints (heartbeat, assignments, reports, logs) are in
:mod:`edge.admin.agents`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import Field

from edge.admin.api import Api, ApiError, Call, Out, Page, QueryModel, Strict, not_found
from edge.admin.auth import hash_token, new_node_token
from edge.admin.regions import REGION_CODE
from edge.store import instances, nodes, regions
from edge.store.errors import NotFound

api = Api()

HOSTNAME = r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$"


def node_id(call: Call) -> UUID:
    """The ``{id}`` of the path as a node id (a malformed one is a node that does not exist)."""
    try:
        return UUID(call.params["id"])
    except ValueError:
        raise not_found(f"node {call.params['id']!r}") from None


class Capacity(Out):
    vcpu: float
    memory: int = Field(description="MiB")


class NodeOut(Out):
    id: UUID
    hostname: str
    region: str
    address: str
    state: nodes.NodeState
    capacity: Capacity
    used: Capacity
    instances: int = Field(description="instances on the node that are not stopped or failed")
    last_heartbeat: datetime | None
    created_at: datetime


class NodeInstance(Out):
    id: UUID
    deployment_id: UUID
    region: str
    state: instances.InstanceState
    healthy: bool
    address: str | None
    port: int | None


class NodeDetail(NodeOut):
    instance_list: list[NodeInstance]


class NodeRegistration(Strict):
    hostname: str = Field(pattern=HOSTNAME, max_length=253)
    region: str = Field(pattern=REGION_CODE, description="the code of an existing region")
    address: str = Field(
        min_length=1, max_length=255, description="where the edge reaches the node's instances"
    )
    vcpu: int = Field(gt=0, le=4096)
    memory: int = Field(gt=0, le=1 << 30, description="MiB")


class RegisteredNode(NodeOut):
    token: str = Field(description="the node token; shown only once")


class NodeFilter(QueryModel):
    region: str | None = None
    state: Literal["ready", "draining", "drained", "down"] | None = None


def node_out(usage: nodes.NodeUsage) -> dict[str, object]:
    node = usage.node
    return {
        "id": node.id,
        "hostname": node.hostname,
        "region": node.region,
        "address": node.address,
        "state": node.state,
        "capacity": {"vcpu": node.vcpu, "memory": node.memory_mb},
        "used": {"vcpu": float(usage.used_vcpu), "memory": usage.used_memory_mb},
        "instances": usage.instances,
        "last_heartbeat": node.last_heartbeat,
        "created_at": node.created_at,
    }


@api.route(
    "GET",
    "/api/v1/nodes",
    auth="admin",
    summary="List nodes",
    tag="nodes",
    query=NodeFilter,
    response=NodeOut,
    many=True,
)
async def list_nodes(call: Call) -> Page:
    query: NodeFilter = call.query
    found, total = await nodes.list_usage(
        call.ctx.pool,
        region=query.region,
        state=query.state,
        limit=call.page.limit,
        offset=call.page.offset,
    )
    return Page([node_out(u) for u in found], total)


@api.route(
    "POST",
    "/api/v1/nodes",
    auth="register",
    summary="Register a node (agents)",
    tag="nodes",
    body=NodeRegistration,
    response=RegisteredNode,
    status=201,
    errors=(409,),
    audit=True,
)
async def register_node(call: Call) -> RegisteredNode:
    body: NodeRegistration = call.body
    pool = call.ctx.pool
    try:
        await regions.get(pool, body.region)
    except NotFound:
        raise ApiError(
            400,
            "invalid_value",
            f"region {body.region!r} does not exist; add it with POST /api/v1/regions",
            field="region",
        ) from None
    async with pool.acquire() as conn, conn.transaction():
        node = await nodes.create(
            conn,
            region=body.region,
            hostname=body.hostname,
            address=body.address,
            vcpu=body.vcpu,
            memory_mb=body.memory,
        )
        token = new_node_token(node.id)
        await nodes.set_token_hash(conn, node.id, hash_token(token))
        # In the same transaction: a node removed right after it commits must not turn its
        # own registration into a 404.
        usage = await nodes.get_usage(conn, node.id)
    return RegisteredNode.model_validate({**node_out(usage), "token": token})


@api.route(
    "GET",
    "/api/v1/nodes/{id}",
    auth="admin",
    summary="A node with its instances",
    tag="nodes",
    response=NodeDetail,
    errors=(404,),
)
async def get_node(call: Call) -> NodeDetail:
    usage = await nodes.get_usage(call.ctx.pool, node_id(call))
    live = await instances.list_for_node(call.ctx.pool, usage.node.id)
    return NodeDetail.model_validate({**node_out(usage), "instance_list": live})


@api.route(
    "POST",
    "/api/v1/nodes/{id}/drain",
    auth="admin",
    tag="nodes",
    response=NodeOut,
    summary="Drain a node: its instances move to other nodes, then it takes no more",
    errors=(404,),
)
async def drain_node(call: Call) -> dict[str, object]:
    pool = call.ctx.pool
    node = await nodes.get(pool, node_id(call))
    if node.state not in ("draining", "drained"):
        await nodes.set_state(pool, node.id, "draining")
    return node_out(await nodes.get_usage(pool, node.id))


@api.route(
    "DELETE",
    "/api/v1/nodes/{id}",
    auth="admin",
    tag="nodes",
    errors=(404, 409),
    summary="Remove a node that runs no instances",
)
async def delete_node(call: Call) -> None:
    pool = call.ctx.pool
    usage = await nodes.get_usage(pool, node_id(call))
    if usage.instances or not await nodes.delete_idle(pool, usage.node.id):
        # Checked again in the delete itself: an instance may have been placed meanwhile.
        count = usage.instances or (await nodes.get_usage(pool, usage.node.id)).instances
        raise ApiError(
            409,
            "conflict",
            f"node {usage.node.hostname} still runs {count} instance(s); drain it "
            "first (POST /api/v1/nodes/{id}/drain) and wait until it runs none",
        )
