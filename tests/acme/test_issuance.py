"""Certificates from a real ACME server: Debian's pebble, resolving the test's domains with
a DNS server on loopback (127.0.0.1), validating HTTP-01 against the stand-in that answers
from the database like any edge (``tests/acme/pebble.py``), against real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store
from prometheus_client import CollectorRegistry

from edge.acme import AcmeSettings, CertificateManager
from edge.secrets import decrypt, encrypt
from edge.store import NotFound, certificates, domains
from edge.store import acme as acme_store
from tests.acme.conftest import SECRET, AcmeWorld, verified_domain
from tests.acme.pebble import Pebble, challenge_stand_in, free_port
from tests.admin.conftest import AdminClient

pytestmark = pytest.mark.needs_tool("pebble")

DOMAINS = "/api/v1/projects/acme/web/domains"


def settings_for(pebble: Pebble, **changes: Any) -> AcmeSettings:
    settings = AcmeSettings(
        secret=SECRET,
        directory_url=pebble.directory_url,
        email="ops@zeitwork.test",
        ca_bundle=str(pebble.ca.ca_pem),
        # The stand-in reads the database: nothing to wait for.
        challenge_delay=0.0,
        order_timeout=20.0,
    )
    return dataclasses.replace(settings, **changes)


def check_stored(pebble: Pebble, cert: certificates.Certificate) -> x509.Certificate:
    """The stored chain verifies up to pebble's root for the domain, and the stored key
    decrypts with the secret and is the certificate's; the leaf."""
    chain = x509.load_pem_x509_certificates(cert.cert_pem.encode())
    leaf, intermediates = chain[0], chain[1:]
    verifier = (
        PolicyBuilder()
        .store(Store([pebble.root()]))
        .build_server_verifier(x509.DNSName(cert.domain))
    )
    verified = verifier.verify(leaf, intermediates)
    assert verified[-1] == pebble.root()
    key = serialization.load_pem_private_key(decrypt(SECRET, cert.key_encrypted), None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == leaf.public_key().public_bytes(der, spki)
    assert (cert.not_before, cert.not_after) == (
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
    )
    assert cert.issuer == leaf.issuer.rfc4514_string()
    assert b"PRIVATE KEY" not in cert.key_encrypted  # encrypted at rest
    return leaf


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.mark.asyncio
async def test_issues_a_certificate_for_a_verified_domain(
    world: AcmeWorld, admin: AdminClient
) -> None:
    world.zone.addresses["shop.customer.test"] = "127.0.0.1"
    world.zone.addresses["later.customer.test"] = "127.0.0.1"
    await verified_domain(admin, "shop.customer.test")
    await verified_domain(admin, "later.customer.test", verified=False)
    registry = CollectorRegistry()
    manager = CertificateManager(admin.pool, settings_for(world.pebble), registry=registry)

    async with challenge_stand_in(admin.pool, world.http_port) as asked:
        [result] = await manager.run_once()
    assert result.ok and result.domain == "shop.customer.test", result
    # Pebble asked the stand-in for the token, which came from the database.
    assert [p.startswith("/.well-known/acme-challenge/") for p in asked] == [True] * len(asked)
    assert asked

    cert = await certificates.get(admin.pool, "shop.customer.test")
    leaf = check_stored(world.pebble, cert)
    assert result.not_after == leaf.not_valid_after_utc
    # The challenge is gone once used; the account is stored, its key encrypted.
    assert await admin.pool.fetchval("SELECT count(*) FROM acme_challenges") == 0
    account = await acme_store.get_account(admin.pool, world.pebble.directory_url)
    assert account is not None and account.uri and account.contact == "ops@zeitwork.test"
    assert b"PRIVATE KEY" in decrypt(SECRET, account.key_encrypted)
    # The unverified domain gets nothing.
    with pytest.raises(NotFound):
        await certificates.get(admin.pool, "later.customer.test")

    listed = {d["domain"]: d for d in await admin.ok("GET", DOMAINS)}
    shown = listed["shop.customer.test"]["certificate"]
    assert shown["status"] == "issued" and shown["failures"] == 0
    assert shown["last_error"] is None and shown["issuer"] == cert.issuer
    assert shown["not_after"] == cert.not_after.isoformat().replace("+00:00", "Z")
    renew_at = dt.datetime.fromisoformat(shown["next_attempt_at"])
    lifetime = cert.not_after - cert.not_before
    assert abs(renew_at - (cert.not_after - lifetime / 3)) < dt.timedelta(seconds=1)
    assert listed["later.customer.test"]["certificate"]["status"] == "none"

    assert sample(registry, "zeitwork_acme_orders_total", result="ok") == 1
    assert sample(registry, "zeitwork_certificates", status="issued") == 1
    expiry = sample(registry, "zeitwork_certificate_expiry_seconds")
    assert expiry is not None and 0 < expiry <= lifetime.total_seconds()

    # Nothing is due now: no order, no request to the CA.
    assert await manager.run_once() == []


@pytest.mark.asyncio
async def test_renews_when_a_third_of_the_lifetime_is_left(
    world: AcmeWorld, admin: AdminClient
) -> None:
    world.zone.addresses["renew.customer.test"] = "127.0.0.1"
    world.zone.addresses["keep.customer.test"] = "127.0.0.1"
    await verified_domain(admin, "renew.customer.test")
    await verified_domain(admin, "keep.customer.test")
    manager = CertificateManager(admin.pool, settings_for(world.pebble))
    async with challenge_stand_in(admin.pool, world.http_port):
        assert all(r.ok for r in await manager.run_once())
        first = await certificates.get(admin.pool, "renew.customer.test")
        kept = await certificates.get(admin.pool, "keep.customer.test")

        # Make both 90-day certificates: one with 29 days left (renewed), one with 31 (kept).
        now = dt.datetime.now(dt.UTC)
        for name, left in (("renew.customer.test", 29), ("keep.customer.test", 31)):
            await admin.pool.execute(
                "UPDATE certificates SET not_before = $2, not_after = $3 WHERE domain = $1",
                name,
                now - dt.timedelta(days=90 - left),
                now + dt.timedelta(days=left),
            )
        [renewed] = await manager.run_once()
    assert renewed.ok and renewed.domain == "renew.customer.test"
    second = await certificates.get(admin.pool, "renew.customer.test")
    assert second.cert_pem != first.cert_pem and second.key_encrypted != first.key_encrypted
    assert second.id == first.id  # replaced in place
    check_stored(world.pebble, second)
    assert (await certificates.get(admin.pool, "keep.customer.test")).cert_pem == kept.cert_pem
    # One account for all orders.
    assert await admin.pool.fetchval("SELECT count(*) FROM acme_accounts") == 1


@pytest.mark.asyncio
async def test_a_failed_order_backs_off_and_shows(world: AcmeWorld, admin: AdminClient) -> None:
    world.zone.addresses["broken.customer.test"] = "127.0.0.1"
    domain_id = await verified_domain(admin, "broken.customer.test")
    registry = CollectorRegistry()
    manager = CertificateManager(admin.pool, settings_for(world.pebble), registry=registry)

    # Nobody answers the challenge: pebble's validation fails, and so does the order.
    [failed] = await manager.run_once()
    assert not failed.ok and failed.error
    assert "broken.customer.test: http-01 validation failed: connection" in failed.error
    order = await acme_store.get_order(admin.pool, domain_id)
    assert order is not None and order.failures == 1 and order.last_error == failed.error
    assert order.last_attempt_at is not None and order.next_attempt_at is not None
    assert order.order_url and order.order_url.startswith(
        f"https://127.0.0.1:{world.pebble.acme_port}/"
    )
    backoff = order.next_attempt_at - order.last_attempt_at
    assert dt.timedelta(seconds=55) < backoff < dt.timedelta(seconds=65)
    assert await admin.pool.fetchval("SELECT count(*) FROM acme_challenges") == 0
    with pytest.raises(NotFound, match="no certificate"):
        await certificates.get(admin.pool, "broken.customer.test")

    [shown] = await admin.ok("GET", DOMAINS)
    cert = shown["certificate"]
    assert cert["status"] == "failed" and cert["failures"] == 1
    assert cert["last_error"] == failed.error and cert["not_after"] is None
    assert dt.datetime.fromisoformat(cert["next_attempt_at"]) == order.next_attempt_at
    assert sample(registry, "zeitwork_acme_orders_total", result="failed") == 1
    assert sample(registry, "zeitwork_certificates", status="failed") == 1

    # In its backoff: not tried again.
    assert await manager.run_once() == []
    # Once the backoff is over, and the challenge answered, it succeeds and resets.
    await admin.pool.execute(
        "UPDATE certificate_orders SET next_attempt_at = now() WHERE domain_id = $1", domain_id
    )
    async with challenge_stand_in(admin.pool, world.http_port):
        [ok] = await manager.run_once()
    assert ok.ok
    order = await acme_store.get_order(admin.pool, domain_id)
    assert order is not None and (order.failures, order.last_error) == (0, None)
    [shown] = await admin.ok("GET", DOMAINS)
    assert shown["certificate"]["status"] == "issued"
    assert sample(registry, "zeitwork_certificates", status="failed") == 0


@pytest.mark.asyncio
async def test_a_domain_removed_during_its_order_keeps_no_certificate(
    world: AcmeWorld, admin: AdminClient
) -> None:
    world.zone.addresses["gone.customer.test"] = "127.0.0.1"
    domain_id = await verified_domain(admin, "gone.customer.test")
    manager = CertificateManager(admin.pool, settings_for(world.pebble))

    async def remove() -> None:
        with contextlib.suppress(NotFound):  # pebble may ask more than once
            await domains.delete(admin.pool, domain_id)

    async with challenge_stand_in(admin.pool, world.http_port, on_answer=remove):
        [result] = await manager.run_once()
    assert (result.ok, result.error) == (False, "the domain was removed")
    assert await admin.pool.fetchval("SELECT count(*) FROM certificates") == 0
    assert await admin.pool.fetchval("SELECT count(*) FROM certificate_orders") == 0


@pytest.mark.asyncio
async def test_an_unreachable_ca_or_a_wrong_secret_is_a_failure(
    world: AcmeWorld, admin: AdminClient
) -> None:
    domain_id = await verified_domain(admin, "early.customer.test")
    closed = f"https://127.0.0.1:{free_port()}/dir"
    manager = CertificateManager(admin.pool, settings_for(world.pebble, directory_url=closed))
    [failed] = await manager.run_once()
    assert not failed.ok and failed.error
    assert failed.error.startswith("cannot reach the ACME server:"), failed.error
    order = await acme_store.get_order(admin.pool, domain_id)
    assert order is not None and order.failures == 1

    # The account key was stored under another secret: nothing is ordered, and it says why.
    await admin.pool.execute("UPDATE certificate_orders SET next_attempt_at = now()")
    other = CertificateManager(
        admin.pool, settings_for(world.pebble, secret="another secret, 32 chars!")
    )
    await acme_store.add_account(
        admin.pool, world.pebble.directory_url, key_encrypted=encrypt(SECRET, b"key")
    )
    [refused] = await other.run_once()
    assert not refused.ok and refused.error
    assert "cannot use the ACME account key" in refused.error
    assert "certificate secret differs" in refused.error
    order = await acme_store.get_order(admin.pool, domain_id)
    assert order is not None and order.failures == 2


class Leadership:
    def __init__(self) -> None:
        self.is_leader = False

    @property
    def fence(self) -> tuple[int, int] | None:
        return None


@pytest.mark.asyncio
async def test_the_loop_works_only_while_leader_and_wakes_on_verification(
    world: AcmeWorld, admin: AdminClient, migrated_url: str
) -> None:
    world.zone.addresses["woken.customer.test"] = "127.0.0.1"
    leader = Leadership()
    registry = CollectorRegistry()
    manager = CertificateManager(
        admin.pool,
        # A tick far away: only the notification can start the order in time.
        settings_for(world.pebble, interval=3600.0),
        leader=leader,
        dsn=migrated_url,
        registry=registry,
    )
    async with challenge_stand_in(admin.pool, world.http_port):
        domain_id = await verified_domain(admin, "woken.customer.test", verified=False)
        manager.start()
        try:
            await admin.pool.execute(
                "UPDATE domains SET verified_at = now() WHERE id = $1", domain_id
            )
            await asyncio.sleep(0.5)
            assert await acme_store.get_order(admin.pool, domain_id) is None  # not leader
            leader.is_leader = True
            manager.wake()
            await asyncio.sleep(0.3)  # the loop listens now
            for _ in range(200):
                if await admin.pool.fetchval("SELECT count(*) FROM certificates") == 1:
                    break
                await asyncio.sleep(0.05)
            cert = await certificates.get(admin.pool, "woken.customer.test")
            check_stored(world.pebble, cert)

            # A domain verified while the loop waits is ordered at once (LISTEN).
            world.zone.addresses["second.customer.test"] = "127.0.0.1"
            await verified_domain(admin, "second.customer.test")
            for _ in range(200):
                if await admin.pool.fetchval("SELECT count(*) FROM certificates") == 2:
                    break
                await asyncio.sleep(0.05)
            check_stored(world.pebble, await certificates.get(admin.pool, "second.customer.test"))
            for _ in range(100):
                if sample(registry, "zeitwork_certificates", status="issued") == 2:
                    break
                await asyncio.sleep(0.05)
            assert sample(registry, "zeitwork_acme_orders_total", result="ok") == 2

            # No longer the leader: its gauges go (an alert fires from the leader only).
            leader.is_leader = False
            manager.wake()
            for _ in range(100):
                if sample(registry, "zeitwork_certificates", status="issued") is None:
                    break
                await asyncio.sleep(0.05)
            assert sample(registry, "zeitwork_certificate_expiry_seconds") == float("inf")
        finally:
            await manager.stop()


@pytest.mark.asyncio
async def test_a_lost_account_is_registered_again(world: AcmeWorld, admin: AdminClient) -> None:
    world.zone.addresses["again.customer.test"] = "127.0.0.1"
    domain_id = await verified_domain(admin, "again.customer.test")
    manager = CertificateManager(admin.pool, settings_for(world.pebble, email=None))
    async with challenge_stand_in(admin.pool, world.http_port):
        # Registered, then its URI lost (a leader died before storing it): registering the
        # stored key again finds its account, and the contact configured now is set on it.
        (await manager._session()).close()
        account = await acme_store.get_account(admin.pool, world.pebble.directory_url)
        assert account is not None and account.uri and account.contact is None
        await admin.pool.execute("UPDATE acme_accounts SET uri = NULL")
        manager.settings = settings_for(world.pebble, email="new@zeitwork.test")
        [ok] = await manager.run_once()
        assert ok.ok
        again = await acme_store.get_account(admin.pool, world.pebble.directory_url)
        assert again is not None and again.uri == account.uri
        assert again.contact == "new@zeitwork.test"

        # The CA does not know the account (a test CA restarted): the order fails, and the
        # next one registers the key again.
        await admin.pool.execute(
            "UPDATE acme_accounts SET uri = $1",
            f"https://127.0.0.1:{world.pebble.acme_port}/my-account/1234567890",
        )
        await admin.pool.execute("DELETE FROM certificates")
        [lost] = await manager.run_once()
        assert not lost.ok and lost.error and "accountDoesNotExist" in lost.error, lost.error
        await admin.pool.execute(
            "UPDATE certificate_orders SET next_attempt_at = now() WHERE domain_id = $1",
            domain_id,
        )
        [ok] = await manager.run_once()
    assert ok.ok
    found = await acme_store.get_account(admin.pool, world.pebble.directory_url)
    assert found is not None and found.uri == account.uri
