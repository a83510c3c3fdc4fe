"""Test seeding that goes around the platform's rules on purpose.

``force_status`` puts a deployment straight into any status, as the tests of the admin API's
read models need (a failed or draining deployment without walking it through the scheduler).
The real code changes a status only through ``edge.store.deployments.transition``.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from edge.store.deployments import STATUSES, Deployment, Status
from edge.store.query import fetch_one


async def force_status(
    db: Any, deployment_id: UUID, status: Status, *, reason: str | None = None
) -> Deployment:
    assert status in STATUSES
    timestamp = "created" if status == "pending" else status
    deployment = await fetch_one(
        db,
        Deployment,
        f"UPDATE deployments SET status = $2, {timestamp}_at = now(),"
        " failure_reason = $3 WHERE id = $1 RETURNING *",
        deployment_id,
        status,
        reason,
    )
    assert deployment is not None
    return deployment
