"""Rows for the routing tests, written straight into the platform schema.

Each helper is one statement in autocommit, so each commits (and notifies the edges) on its
own, like the scheduler's and the agents' updates would.
"""

from __future__ import annotations

import itertools
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

_NANO = string.ascii_lowercase + string.digits


def nanoid() -> str:
    return "".join(secrets.choice(_NANO) for _ in range(7))


@dataclass
class Seed:
    conn: Any
    _ports: itertools.count[int] = field(default_factory=lambda: itertools.count(20000))

    @classmethod
    async def create(cls, conn: Any) -> Seed:
        seed = cls(conn)
        for code in ("eu-1", "us-1"):
            await conn.execute(
                "INSERT INTO regions (code, name, country) VALUES ($1, $1, 'DE')", code
            )
        return seed

    async def project(self, org: str = "acme", name: str = "web") -> Any:
        return await self.conn.fetchval(
            "INSERT INTO projects (org, name) VALUES ($1, $2) RETURNING id", org, name
        )

    async def environment(self, project: Any, name: str = "production") -> Any:
        return await self.conn.fetchval(
            "INSERT INTO environments (project_id, name) VALUES ($1, $2) RETURNING id",
            project,
            name,
        )

    async def deployment(
        self, project: Any, environment: Any, *, status: str = "active", nano: str | None = None
    ) -> tuple[Any, str]:
        """A deployment; its id and nanoid."""
        nano = nano or nanoid()
        deployment = await self.conn.fetchval(
            "INSERT INTO deployments (project_id, environment_id, nanoid, status, image)"
            " VALUES ($1, $2, $3, $4, 'img') RETURNING id",
            project,
            environment,
            nano,
            status,
        )
        return deployment, nano

    async def app(
        self, org: str = "acme", name: str = "web", *, status: str = "active"
    ) -> tuple[Any, Any, Any, str]:
        """A project with a production environment and one deployment, current there: the
        project, environment and deployment ids and the deployment's nanoid."""
        project = await self.project(org, name)
        environment = await self.environment(project)
        deployment, nano = await self.deployment(project, environment, status=status)
        await self.set_current(environment, deployment)
        return project, environment, deployment, nano

    async def instance(
        self,
        deployment: Any,
        *,
        region: str = "eu-1",
        address: str | None = "127.0.0.1",
        port: int | None = None,
        state: str = "running",
        healthy: bool = True,
    ) -> tuple[Any, str]:
        """An instance; its id and its ``address:port`` (unique ports unless given)."""
        if port is None and address is not None:
            port = next(self._ports)
        instance = await self.conn.fetchval(
            "INSERT INTO instances (deployment_id, region, state, address, port, healthy)"
            " VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
            deployment,
            region,
            state,
            address,
            port,
            healthy,
        )
        return instance, f"{address}:{port}"

    async def set_instance(self, instance: Any, **values: Any) -> None:
        columns = ", ".join(f"{name} = ${i}" for i, name in enumerate(values, start=2))
        await self.conn.execute(
            f"UPDATE instances SET {columns} WHERE id = $1", instance, *values.values()
        )

    async def set_current(self, environment: Any, deployment: Any) -> None:
        await self.conn.execute(
            "UPDATE environments SET current_deployment_id = $2 WHERE id = $1",
            environment,
            deployment,
        )

    async def domain(
        self, name: str, project: Any, environment: Any, *, verified: bool = True
    ) -> Any:
        return await self.conn.fetchval(
            "INSERT INTO domains (name, project_id, environment_id, verification_token,"
            " verified_at) VALUES ($1, $2, $3, 'token', CASE WHEN $4 THEN now() END)"
            " RETURNING id",
            name,
            project,
            environment,
            verified,
        )
