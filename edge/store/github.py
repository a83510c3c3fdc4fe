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

from edge.store.errors import NotFound, translated
from edge.store.query import Executor, execute, fetch_all, fetch_one, fetch_value

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


async def list_webhooks_page(
    db: Executor, *, limit: int = 100, offset: int = 0
) -> tuple[list[Webhook], int]:
    """One page of the webhooks by repository, and how many there are."""
    found = await fetch_all(
        db,
        Webhook,
        "SELECT * FROM github_webhooks ORDER BY repository LIMIT $1 OFFSET $2",
        limit,
        offset,
    )
    return found, int(await fetch_value(db, "SELECT count(*) FROM github_webhooks"))


@dataclass(frozen=True, slots=True)
class DeliveryView:
    """A delivery as operators see it: the pushed ref and commit (push events), and the
    deployments it created."""

    delivery: Delivery
    ref: str | None
    after: str | None
    deployments: list[str]


# The deployments a delivery created are found without a link column: they were inserted in
# the delivery's own transaction, so their created_at is its received_at (now() is the
# transaction's start), and they carry the pushed commit.
_DELIVERY_VIEW = (
    "SELECT d.*, d.payload ->> 'ref' AS view_ref, d.payload ->> 'after' AS view_after,"
    " ARRAY(SELECT p.name || '-' || x.nanoid || '-' || p.org"
    "       FROM deployments x JOIN projects p ON p.id = x.project_id"
    "       WHERE x.created_at = d.received_at AND x.commit_sha = d.payload ->> 'after'"
    "       AND lower(p.github_repo) = w.repository ORDER BY p.org, p.name, x.nanoid"
    " ) AS view_deployments"
    " FROM github_deliveries d JOIN github_webhooks w ON w.id = d.webhook_id"
    " WHERE d.webhook_id = $1 ORDER BY d.received_at DESC, d.id LIMIT $2 OFFSET $3"
)


async def list_delivery_views(
    db: Executor, webhook_id: UUID, *, limit: int = 100, offset: int = 0
) -> tuple[list[DeliveryView], int]:
    """One page of the webhook's deliveries, newest first, and how many it has."""
    with translated():
        rows = await db.fetch(_DELIVERY_VIEW, webhook_id, limit, offset)
        total = await db.fetchval(
            "SELECT count(*) FROM github_deliveries WHERE webhook_id = $1", webhook_id
        )
    views = []
    for row in rows:
        values = dict(row)
        ref, after = values.pop("view_ref"), values.pop("view_after")
        names = values.pop("view_deployments")
        views.append(DeliveryView(Delivery(**values), ref, after, list(names)))
    return views, int(total)


@dataclass(frozen=True, slots=True)
class DeployTarget:
    """A project built from a repository, with what a new production deployment of it
    needs: the production environment (None: it has none), the image template, and the
    instance count and environment variables of the environment's current deployment (else
    its newest one; None: it has none)."""

    project_id: UUID
    org: str
    name: str
    branch: str
    auto_deploy: bool
    image_template: str | None
    environment_id: UUID | None
    instances_per_region: int | None
    env: dict[str, Any] | None


async def deploy_targets(db: Executor, repository: str) -> list[DeployTarget]:
    """Every project whose GitHub repository is ``repository`` (case-insensitive)."""
    return await fetch_all(
        db,
        DeployTarget,
        "SELECT p.id AS project_id, p.org, p.name, p.branch, p.auto_deploy, p.image_template,"
        " e.id AS environment_id, src.instances_per_region, src.env"
        " FROM projects p"
        " LEFT JOIN environments e ON e.project_id = p.id AND e.name = 'production'"
        " LEFT JOIN LATERAL (SELECT x.instances_per_region, x.env FROM deployments x"
        "   WHERE x.environment_id = e.id"
        "   ORDER BY x.id IS NOT DISTINCT FROM e.current_deployment_id DESC,"
        "   x.created_at DESC LIMIT 1) src ON true"
        " WHERE lower(p.github_repo) = lower($1) ORDER BY p.org, p.name",
        repository,
    )


@dataclass(frozen=True, slots=True)
class PushedCommit:
    sha: str
    message: str | None


async def last_pushed_commit(db: Executor, repository: str, ref: str) -> PushedCommit | None:
    """The commit of the newest push of ``ref`` recorded for the repository (a branch
    deletion is no commit)."""
    return await fetch_one(
        db,
        PushedCommit,
        "SELECT d.payload ->> 'after' AS sha,"
        " d.payload -> 'head_commit' ->> 'message' AS message"
        " FROM github_deliveries d JOIN github_webhooks w ON w.id = d.webhook_id"
        " WHERE w.repository = lower($1) AND d.event = 'push' AND d.payload ->> 'ref' = $2"
        " AND d.payload ->> 'after' ~ '^[0-9a-f]{40}([0-9a-f]{24})?$'"
        " AND d.payload ->> 'after' !~ '^0+$'"
        " ORDER BY d.received_at DESC, d.id LIMIT 1",
        repository,
        ref,
    )
