"""Regions: where nodes run (``eu-central``), with a display name and a country."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from edge.store.errors import NotFound
from edge.store.query import Executor, execute, fetch_all, fetch_one


@dataclass(frozen=True, slots=True)
class Region:
    code: str
    name: str
    country: str
    created_at: datetime
    id: UUID


async def create(db: Executor, code: str, name: str, country: str) -> Region:
    region = await fetch_one(
        db,
        Region,
        "INSERT INTO regions (code, name, country) VALUES ($1, $2, $3) RETURNING *",
        code,
        name,
        country,
    )
    assert region is not None
    return region


async def get(db: Executor, code: str) -> Region:
    region = await fetch_one(db, Region, "SELECT * FROM regions WHERE code = $1", code)
    if region is None:
        raise NotFound(f"region {code!r} does not exist", field="code")
    return region


async def list_all(db: Executor) -> list[Region]:
    return await fetch_all(db, Region, "SELECT * FROM regions ORDER BY code")


async def delete(db: Executor, code: str) -> None:
    """Raises :class:`Conflict` while nodes or instances are in the region."""
    if not await execute(db, "DELETE FROM regions WHERE code = $1", code):
        raise NotFound(f"region {code!r} does not exist", field="code")
