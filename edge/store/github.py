"""GitHub webhooks of repositories and the deliveries received on them.

A webhook belongs to a repository (``owner/repo``, lower case, as GitHub's ``full_name``
compares); a push to it concerns every project built from that repository. A delivery is
recorded under GitHub's delivery id, which is unique: a redelivered event raises
:class:`Conflict` instead of deploying twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from edge.store.errors import NotFound
from edge.store.query import Executor, execute, fetch_all, fetch_one

DeliveryStatus = Literal["received", "processed", "ignored", "failed"]


@dataclass(frozen=True, slots=True)
class Webhook:
    id: UUID
    secret: str = field(repr=False)
    events: list[str]
    created_at: datetime
    repository: str


@dataclass(frozen=True, slots=True)
class Delivery:
    id: UUID
    webhook_id: UUID
    delivery_id: str
    event: str
    payload: Any = field(repr=False)
    status: DeliveryStatus
    error: str | None
    received_at: datetime


async def create_webhook(
    db: Executor, repository: str, *, secret: str, events: list[str] | None = None
) -> Webhook:
    """The repository's webhook; :class:`Conflict` if it has one already."""
    webhook = await fetch_one(
        db,
        Webhook,
        "INSERT INTO github_webhooks (repository, secret, events)"
        " VALUES (lower($1), $2, coalesce($3::text[], ARRAY['push'])) RETURNING *",
        repository,
        secret,
        events,
    )
    assert webhook is not None
    return webhook


async def get_webhook_for(db: Executor, repository: str) -> Webhook:
    webhook = await fetch_one(
        db, Webhook, "SELECT * FROM github_webhooks WHERE repository = lower($1)", repository
    )
    if webhook is None:
        raise NotFound(f"repository {repository!r} has no webhook", field="repository")
    return webhook


async def get_webhook(db: Executor, webhook_id: UUID) -> Webhook:
    webhook = await fetch_one(
        db, Webhook, "SELECT * FROM github_webhooks WHERE id = $1", webhook_id
    )
    if webhook is None:
        raise NotFound(f"webhook {webhook_id} does not exist", field="id")
    return webhook


async def list_webhooks(db: Executor) -> list[Webhook]:
    return await fetch_all(db, Webhook, "SELECT * FROM github_webhooks ORDER BY repository")


async def delete_webhook(db: Executor, webhook_id: UUID) -> None:
    if not await execute(db, "DELETE FROM github_webhooks WHERE id = $1", webhook_id):
        raise NotFound(f"webhook {webhook_id} does not exist", field="id")


async def record_delivery(
    db: Executor, webhook_id: UUID, *, delivery_id: str, event: str, payload: Any
) -> Delivery:
    """Record a delivery (status ``received``); :class:`Conflict` if seen before."""
    delivery = await fetch_one(
        db,
        Delivery,
        "INSERT INTO github_deliveries (webhook_id, delivery_id, event, payload)"
        " VALUES ($1, $2, $3, $4) RETURNING *",
        webhook_id,
        delivery_id,
        event,
        payload,
    )
    assert delivery is not None
    return delivery


async def set_delivery_status(
    db: Executor, delivery_id: str, status: DeliveryStatus, *, error: str | None = None
) -> Delivery:
    delivery = await fetch_one(
        db,
        Delivery,
        "UPDATE github_deliveries SET status = $2, error = $3 WHERE delivery_id = $1 RETURNING *",
        delivery_id,
        status,
        error,
    )
    if delivery is None:
        raise NotFound(f"delivery {delivery_id!r} does not exist", field="delivery_id")
    return delivery


async def list_deliveries(db: Executor, webhook_id: UUID, *, limit: int = 50) -> list[Delivery]:
    """Newest first."""
    return await fetch_all(
        db,
        Delivery,
        "SELECT * FROM github_deliveries WHERE webhook_id = $1"
        " ORDER BY received_at DESC, id LIMIT $2",
        webhook_id,
        limit,
    )
