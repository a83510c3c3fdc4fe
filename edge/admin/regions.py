"""``/api/v1/regions``: where nodes run."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

from pydantic import Field

from edge.admin.api import Api, Call, Out, Page, Strict
from edge.store import regions

api = Api()

REGION_CODE = r"^[a-z0-9][a-z0-9-]{0,31}$"


class RegionIn(Strict):
    code: str = Field(pattern=REGION_CODE, description="e.g. us-east")
    name: str = Field(min_length=1, max_length=100)
    country: str = Field(min_length=1, max_length=64)


class RegionOut(Out):
    id: UUID
    code: str
    name: str
    country: str
    created_at: datetime


@api.route(
    "GET",
    "/api/v1/regions",
    auth="admin",
    summary="List regions",
    tag="regions",
    response=RegionOut,
    many=True,
)
async def list_regions(call: Call) -> Page:
    found = await regions.list_all(call.ctx.pool)
    return Page(found[call.page.offset : call.page.offset + call.page.limit], len(found))


@api.route(
    "POST",
    "/api/v1/regions",
    auth="admin",
    summary="Add a region",
    tag="regions",
    body=RegionIn,
    response=RegionOut,
    status=201,
    errors=(409,),
)
async def create_region(call: Call) -> regions.Region:
    body: RegionIn = call.body
    return await regions.create(call.ctx.pool, body.code, body.name, body.country)
