"""Certificates, ACME challenges and HSTS from PostgreSQL: what a reload reads, what it loads
again, what it keeps when a row is broken, and the notifications that trigger it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import pytest
import pytest_asyncio

import edge.tls
from edge.live_routes import LiveRoutes, PostgresRouteProvider
from edge.routing import RoutingTable
from edge.store.routes import load_routes
from edge.tls import CertificateStore, DatabaseCertificates
from tests.harness import eventually
from tests.live_routes.seed import Seed
from tests.tls.certs import CA, Leaf, handshake_serial

pytestmark = pytest.mark.asyncio

APPS = "zeitwork.app"


@pytest_asyncio.fixture
async def db(migrated_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(migrated_url)
    await conn.execute("TRUNCATE regions, projects, certificates, acme_challenges CASCADE")
    try:
        yield conn
    finally:
        await conn.close()


async def put(db: Any, domain: str, leaf: Leaf | None, *, cert_pem: bytes | None = None) -> None:
    """Insert or replace ``domain``'s row (as the ACME loop stores them, keys as plain PEM
    without a certificate secret)."""
    cert = cert_pem if cert_pem is not None else leaf.cert_pem if leaf else b""
    key = leaf.key_pem if leaf else b""
    await db.execute(
        "INSERT INTO certificates (domain, cert_pem, key_encrypted, not_before, not_after)"
        " VALUES ($1, $2, $3, now() - interval '1 hour', now() + interval '30 days')"
        " ON CONFLICT (domain) DO UPDATE SET cert_pem = excluded.cert_pem,"
        " key_encrypted = excluded.key_encrypted",
        domain,
        cert.decode(),
        key,
    )


def serial_of(store: CertificateStore, name: str) -> int | None:
    """The serial of the certificate a handshake naming ``name`` gets (None: refused)."""
    if store.lookup(name) is None:
        return None
    return handshake_serial(store.context, name)


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The sources of every certificate loaded from PEM during the test."""
    seen: list[str] = []
    real = edge.tls.load_pem

    def counting(cert_pem: bytes, key_pem: bytes, source: str) -> edge.tls.Certificate:
        seen.append(source)
        return real(cert_pem, key_pem, source)

    monkeypatch.setattr(edge.tls, "load_pem", counting)
    return seen


async def test_reload_loads_what_changed_only(
    db: Any, ca: CA, loads: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    store = CertificateStore(APPS)
    certificates = DatabaseCertificates(store, None)
    shop, apps = ca.issue("shop.example"), ca.issue(f"*.{APPS}")
    await put(db, "shop.example", shop)
    await put(db, f"*.{APPS}", apps)
    await certificates.reload(db)
    assert sorted(loads) == ["the database (*.zeitwork.app)", "the database (shop.example)"]
    assert serial_of(store, "shop.example") == shop.serial
    assert serial_of(store, f"x.{APPS}") == apps.serial
    assert serial_of(store, "unknown.example") == apps.serial  # the default without files

    loads.clear()
    await certificates.reload(db)
    assert loads == []
    renewed = ca.issue("shop.example")
    await put(db, "shop.example", renewed)
    await certificates.reload(db)
    assert loads == ["the database (shop.example)"]
    assert serial_of(store, "shop.example") == renewed.serial

    # A broken renewal: logged once, the current certificate stays.
    loads.clear()
    caplog.set_level(logging.ERROR, "edge.tls")
    await put(db, "shop.example", renewed, cert_pem=b"-----BEGIN CERTIFICATE-----\nx\n")
    await certificates.reload(db)
    await certificates.reload(db)
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith(
        "TLS: certificate of shop.example not loaded, keeping the current: the database "
        "(shop.example): not a PEM certificate"
    ), errors
    assert loads == ["the database (shop.example)"]
    assert serial_of(store, "shop.example") == renewed.serial

    # Gone from the table: gone from the store.
    await db.execute("DELETE FROM certificates WHERE domain = 'shop.example'")
    await certificates.reload(db)
    assert set(store.database) == {f"*.{APPS}"}
    assert serial_of(store, "shop.example") == apps.serial


async def test_routes_carry_hsts_and_live_challenges(db: Any) -> None:
    seed = await Seed.create(db)
    project, env, _, nano = await seed.app()
    await seed.domain("app.customer.org", project, env)
    await db.execute("UPDATE projects SET hsts_max_age = 31536000 WHERE id = $1", project)
    other, _, _, other_nano = await seed.app("acme", "other")
    await db.execute(
        "INSERT INTO acme_challenges (token, key_authorization, domain, expires_at) VALUES"
        " ('live', 'live.key', 'app.customer.org', now() + interval '1 minute'),"
        " ('gone', 'gone.key', 'app.customer.org', now() - interval '1 second')"
    )
    table = await load_routes(db, APPS)
    assert table.hsts == {f"web-{nano}-acme.{APPS}": 31536000, "app.customer.org": 31536000}
    assert f"other-{other_nano}-acme.{APPS}" in table.routes
    assert table.challenges is not None and set(table.challenges) == {"live"}
    key, expires = table.challenges["live"]
    assert key == "live.key" and expires > 0
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE projects SET hsts_max_age = -1 WHERE id = $1", other)


class _Target:
    def __init__(self) -> None:
        self.tables: list[RoutingTable] = []

    def install(self, table: RoutingTable) -> None:
        self.tables.append(table)


async def test_notifications_reload_certificates_or_routes(
    db: Any, migrated_url: str, ca: CA, loads: list[str]
) -> None:
    store = CertificateStore(APPS)
    target = _Target()
    live = LiveRoutes(
        target,
        PostgresRouteProvider(migrated_url, APPS),
        debounce=0.01,
        certificates=DatabaseCertificates(store, None),
    )
    live.start()
    try:
        async with asyncio.timeout(5):
            await live.loaded.wait()
        assert len(target.tables) == 1 and store.lookup("shop.example") is None
        leaf = ca.issue("shop.example")
        await put(db, "shop.example", leaf)
        assert await eventually(lambda: store.lookup("shop.example") is not None, 5)
        assert serial_of(store, "shop.example") == leaf.serial
        await asyncio.sleep(0.1)
        assert len(target.tables) == 1  # a certificate changed: the routes were not read
        await db.execute(
            "INSERT INTO acme_challenges (token, key_authorization, domain, expires_at)"
            " VALUES ('t', 't.key', 'shop.example', now() + interval '1 minute')"
        )
        assert await eventually(lambda: len(target.tables) == 2, 5)
        challenges = target.tables[-1].challenges
        assert challenges is not None and challenges["t"][0] == "t.key"
        assert challenges["t"][1] > time.time()
        assert loads == ["the database (shop.example)"]  # and the certificates were not
    finally:
        await live.stop()
