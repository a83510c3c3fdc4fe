"""Fixtures of the ACME tests: one pebble and one DNS server per module, the admin API over
the session's database (emptied before each test) for the API's view of certificates."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from uuid import UUID

import pytest

from edge.store import domains
from tests.acme.pebble import Pebble, free_port, running_pebble

# The admin API fixture, re-exported for these tests.
from tests.admin.conftest import AdminClient, admin  # noqa: F401
from tests.admin.test_domains import Zone, dns_zone, make_project

SECRET = "test certificate secret, 32 chars"


@dataclass
class AcmeWorld:
    """Pebble, validating HTTP-01 on ``http_port`` of 127.0.0.1, and the DNS zone it asks."""

    pebble: Pebble
    zone: Zone
    dns_port: int
    http_port: int


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AcmeWorld]:
    with dns_zone() as (zone, dns_port):
        http_port = free_port()
        with running_pebble(
            tmp_path_factory.mktemp("pebble"), dns_port=dns_port, http_port=http_port
        ) as pebble:
            yield AcmeWorld(pebble, zone, dns_port, http_port)


async def verified_domain(client: AdminClient, name: str, *, verified: bool = True) -> UUID:
    """A domain of project acme/web (created if need be), verified unless told otherwise."""
    pool = client.pool
    project = await pool.fetchrow("SELECT id FROM projects WHERE org = 'acme' AND name = 'web'")
    project_id = project["id"] if project else (await make_project(pool)).id
    env = await pool.fetchval(
        "SELECT id FROM environments WHERE project_id = $1 AND name = 'production'", project_id
    )
    domain = await domains.create(pool, name, project_id=project_id, environment_id=env)
    if verified:
        await domains.record_check(pool, domain.id, verified=True, pointing=True)
    return domain.id
