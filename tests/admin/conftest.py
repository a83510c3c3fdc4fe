"""Fixtures of the admin API tests: the API on a real socket over the session's database.

``admin`` serves the API in the test's own loop (127.0.0.1, a free port) with a pool on the
migrated database, every table emptied first. :class:`AdminClient` sends real HTTP/1.1
requests on new connections and parses the answers strictly (h11).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest_asyncio

from edge.admin.app import AdminContext, AdminServer, AdminSettings
from edge.admin.auth import Authenticator
from edge.store.db import create_pool
from tests.harness import Response, request
from tests.store.conftest import TABLES

ADMIN_TOKEN = "test-admin-token"
BOOTSTRAP_TOKEN = "test-bootstrap-token"
# Sentinel: send the request without an Authorization header.
NO_TOKEN = ""


@dataclass
class AdminClient:
    port: int
    server: AdminServer
    pool: Any

    @property
    def ctx(self) -> AdminContext:
        return self.server.ctx

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = ADMIN_TOKEN,
        raw_body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """One request on a new connection; ``token=NO_TOKEN`` sends none."""
        payload = (
            raw_body
            if raw_body is not None
            else (b"" if body is None else json.dumps(body).encode())
        )
        head = [f"{method} {path} HTTP/1.1", "Host: admin"]
        if token:
            head.append(f"Authorization: Bearer {token}")
        if payload or method in ("POST", "PUT", "PATCH"):
            head.append(f"Content-Length: {len(payload)}")
        if payload and not (headers and "Content-Type" in headers):
            head.append("Content-Type: application/json")
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + payload
        return await request(self.port, raw, timeout=10.0)

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        """The JSON answer of a request that must succeed with ``status``."""
        response = await self.call(method, path, body)
        assert response.status == status, (method, path, response.status, response.body)
        return json.loads(response.body) if response.body else None


def error_of(response: Response) -> dict[str, Any]:
    """The ``error`` object of an error answer (checks its shape)."""
    body = json.loads(response.body)
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["code"], str) and body["error"]["message"], body
    return body["error"]  # type: ignore[no-any-return]


@pytest_asyncio.fixture
async def admin(migrated_url: str) -> AsyncIterator[AdminClient]:
    pool = await create_pool(migrated_url, min_size=1, max_size=4)
    await pool.execute(f"TRUNCATE {TABLES} CASCADE")
    ctx = AdminContext(
        pool=pool,
        auth=Authenticator(pool, ADMIN_TOKEN, BOOTSTRAP_TOKEN),
        settings=AdminSettings(apps_domain="zeitwork.test", region="local"),
        routing_age=lambda: 0.5,
    )
    server = AdminServer(ctx)
    await server.start("127.0.0.1", 0)
    try:
        yield AdminClient(server.port, server, pool)
    finally:
        await server.close()
        await pool.close()
