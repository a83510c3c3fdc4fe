"""Custom domains of a project environment, their DNS verification and certificate state.

A domain routes to its environment's current deployment once verified, and the leader's
ACME loop then orders its certificate. The verification token is generated here; checking
DNS for it is the caller's job. Removing a domain removes its certificate and orders too.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from edge.store.acme import STATUS_SQL
from edge.store.errors import NotFound, translated
from edge.store.query import Executor, fetch_all, fetch_one, fetch_value


@dataclass(frozen=True, slots=True)
class Domain:
    id: UUID
    name: str
    project_id: UUID
    environment_id: UUID
    verification_token: str
    verified_at: datetime | None
    last_checked_at: datetime | None
    pointing_at_edge: bool | None
    created_at: datetime
    # Whether the last check found the CNAME or the TXT token (None: not checked yet).
    last_check_ok: bool | None


async def create(db: Executor, name: str, *, project_id: UUID, environment_id: UUID) -> Domain:
    """Add an unverified domain (name lower-cased, trailing dot dropped); :class:`Conflict`
    if any project has it already."""
    domain = await fetch_one(
        db,
        Domain,
        "INSERT INTO domains (name, project_id, environment_id, verification_token)"
        " SELECT $1, $2, $3, $4"
        # The environment must be the project's own.
        " WHERE EXISTS (SELECT 1 FROM environments WHERE id = $3 AND project_id = $2)"
        " RETURNING *",
        name.strip().rstrip(".").lower(),
        project_id,
        environment_id,
        secrets.token_urlsafe(24),
    )
    if domain is None:
        raise NotFound(
            f"environment {environment_id} of project {project_id} does not exist",
            field="environment_id",
        )
    return domain


async def get_by_name(db: Executor, name: str) -> Domain:
    domain = await fetch_one(
        db, Domain, "SELECT * FROM domains WHERE name = $1", name.rstrip(".").lower()
    )
    if domain is None:
        raise NotFound(f"domain {name!r} does not exist", field="name")
    return domain


async def list_for_project(db: Executor, project_id: UUID) -> list[Domain]:
    return await fetch_all(
        db, Domain, "SELECT * FROM domains WHERE project_id = $1 ORDER BY name", project_id
    )


async def record_check(db: Executor, domain_id: UUID, *, verified: bool, pointing: bool) -> Domain:
    """Record a DNS check: ``verified`` (the CNAME or the TXT token was found) sets
    ``verified_at`` the first time, never clears it, and is ``last_check_ok``; ``pointing``
    (the CNAME) is ``pointing_at_edge``."""
    domain = await fetch_one(
        db,
        Domain,
        "UPDATE domains SET last_checked_at = now(), pointing_at_edge = $3, last_check_ok = $2,"
        " verified_at = CASE WHEN $2 THEN coalesce(verified_at, now()) ELSE verified_at END"
        " WHERE id = $1 RETURNING *",
        domain_id,
        verified,
        pointing,
    )
    if domain is None:
        raise NotFound(f"domain {domain_id} does not exist", field="id")
    return domain


async def delete(db: Executor, domain_id: UUID) -> None:
    """Remove the domain, with its certificate (keys of a name no longer ours are not kept)
    and its orders."""
    removed = await fetch_value(
        db,
        "WITH gone AS (DELETE FROM domains WHERE id = $1 RETURNING name),"
        " certificate AS (DELETE FROM certificates WHERE domain IN (SELECT name FROM gone))"
        " SELECT count(*) FROM gone",
        domain_id,
    )
    if not removed:
        raise NotFound(f"domain {domain_id} does not exist", field="id")


@dataclass(frozen=True, slots=True)
class CertificateState:
    """A domain's certificate as the API shows it: ``status`` is ``issued`` while a
    certificate is valid, ``failed`` after a failed order without one, ``pending`` while a
    verified domain waits for its first, ``none`` for a domain not verified."""

    status: str = "none"
    not_before: datetime | None = None
    not_after: datetime | None = None
    issuer: str | None = None
    failures: int = 0
    last_error: str | None = None
    last_attempt_at: datetime | None = None
    next_attempt_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class DomainView:
    """A domain with the name of the environment it routes to, and its certificate."""

    domain: Domain
    environment: str
    certificate: CertificateState = CertificateState()


_VIEW = (
    "SELECT d.*, e.name AS view_environment,"  # noqa: S608 - a constant of edge.store.acme
    f" {STATUS_SQL} AS cert_status, c.not_before AS cert_not_before,"
    " c.not_after AS cert_not_after, c.issuer AS cert_issuer,"
    " coalesce(o.failures, 0) AS cert_failures, o.last_error AS cert_last_error,"
    " o.last_attempt_at AS cert_last_attempt_at, o.next_attempt_at AS cert_next_attempt_at"
    " FROM domains d JOIN environments e ON e.id = d.environment_id"
    " LEFT JOIN certificates c ON c.domain = d.name"
    " LEFT JOIN certificate_orders o ON o.domain_id = d.id"
)


def _view(row: Mapping[str, Any]) -> DomainView:
    values = dict(row)
    environment = values.pop("view_environment")
    certificate = CertificateState(
        **{
            name.removeprefix("cert_"): values.pop(name)
            for name in list(values)
            if name.startswith("cert_")
        }
    )
    return DomainView(Domain(**values), environment, certificate)


async def list_views(
    db: Executor, project_id: UUID, *, limit: int = 100, offset: int = 0
) -> tuple[list[DomainView], int]:
    """One page of the project's domains by name, and how many it has."""
    with translated():
        rows = await db.fetch(
            _VIEW + " WHERE d.project_id = $1 ORDER BY d.name LIMIT $2 OFFSET $3",
            project_id,
            limit,
            offset,
        )
        total = await db.fetchval("SELECT count(*) FROM domains WHERE project_id = $1", project_id)
    return [_view(row) for row in rows], int(total)


async def get_view(db: Executor, project_id: UUID, name: str) -> DomainView:
    """The project's domain ``name``; :class:`NotFound` if the project has no such domain."""
    with translated():
        row = await db.fetchrow(
            _VIEW + " WHERE d.project_id = $1 AND d.name = $2",
            project_id,
            name.rstrip(".").lower(),
        )
    if row is None:
        raise NotFound(f"domain {name!r} does not exist", field="name")
    return _view(row)
