"""Each aggregate's operations and the schema's constraints, as the store reports them."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from uuid import uuid4

import pytest

from edge.store import (
    Conflict,
    DatabaseUnavailable,
    Invalid,
    NotFound,
    acme,
    audit,
    certificates,
    deployments,
    domains,
    environments,
    github,
    instances,
    logs,
    nodes,
    projects,
    query,
    regions,
)
from edge.store.db import create_pool

TABLE_OF = {
    regions.Region: "regions",
    nodes.Node: "nodes",
    projects.Project: "projects",
    environments.Environment: "environments",
    deployments.Deployment: "deployments",
    instances.Instance: "instances",
    domains.Domain: "domains",
    certificates.Certificate: "certificates",
    acme.Challenge: "acme_challenges",
    acme.Account: "acme_accounts",
    acme.CertificateOrder: "certificate_orders",
    github.Webhook: "github_webhooks",
    github.Delivery: "github_deliveries",
    logs.LogLine: "instance_logs",
    audit.AuditEntry: "audit_log",
}


@pytest.mark.asyncio
async def test_dataclasses_match_their_tables(pool: Any) -> None:
    """``SELECT *`` maps onto the dataclass: the columns must be exactly its fields."""
    for cls, table in TABLE_OF.items():
        columns = await pool.fetch(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
            table,
        )
        assert [c["column_name"] for c in columns] == [f.name for f in dataclasses.fields(cls)], (
            table
        )


async def _project(pool: Any, org: str = "acme", name: str = "web") -> projects.Project:
    return await projects.create(pool, org, name)


async def _deployment(pool: Any) -> tuple[projects.Project, environments.Environment, Any]:
    project = await _project(pool)
    env = await environments.create(pool, project.id, "production")
    deployment = await deployments.create(
        pool, project_id=project.id, environment_id=env.id, image="ghcr.io/acme/web:1"
    )
    return project, env, deployment


@pytest.mark.asyncio
async def test_regions(pool: Any) -> None:
    region = await regions.create(pool, "eu-central", "Frankfurt", "DE")
    assert await regions.get(pool, "eu-central") == region
    assert [r.code for r in await regions.list_all(pool)] == ["eu-central"]
    assert region.id is not None
    with pytest.raises(Conflict, match="code 'eu-central' already exists") as exc:
        await regions.create(pool, "eu-central", "Again", "DE")
    assert exc.value.field == "code"
    with pytest.raises(Invalid, match="country") as invalid:
        await regions.create(pool, "us-east", "Virginia", "")
    assert invalid.value.field == "country"
    # As the operations guide adds a region with psql.
    await pool.execute(
        "INSERT INTO regions (id, name, code, country)"
        " VALUES (gen_random_uuid(), 'US West', 'us-west', 'United States')"
    )
    assert (await regions.get(pool, "us-west")).country == "United States"
    await regions.delete(pool, "eu-central")
    with pytest.raises(NotFound, match="region 'eu-central'"):
        await regions.get(pool, "eu-central")


@pytest.mark.asyncio
async def test_nodes(pool: Any) -> None:
    await regions.create(pool, "eu", "Europe", "DE")
    node = await nodes.create(
        pool, region="eu", hostname="n1", address="10.0.0.1", vcpu=4, memory_mb=8192
    )
    assert node.state == "ready" and node.last_heartbeat is None
    with pytest.raises(Conflict, match="nodes: hostname 'n1' already exists") as exc:
        await nodes.create(
            pool, region="eu", hostname="n1", address="10.0.0.2", vcpu=4, memory_mb=8192
        )
    assert exc.value.field == "hostname"
    with pytest.raises(NotFound, match=r"region 'nowhere' does not exist in regions") as nf:
        await nodes.create(
            pool, region="nowhere", hostname="n2", address="10.0.0.2", vcpu=4, memory_mb=1
        )
    assert nf.value.field == "region"
    with pytest.raises(Invalid, match="vcpu"):
        await nodes.create(pool, region="eu", hostname="n3", address="x", vcpu=0, memory_mb=1)

    beat = await nodes.heartbeat(pool, node.id)
    assert beat.last_heartbeat is not None
    assert (await nodes.set_state(pool, node.id, "draining")).state == "draining"
    assert await nodes.list_all(pool, state="ready") == []
    assert [n.hostname for n in await nodes.list_all(pool, region="eu")] == ["n1"]
    assert (await nodes.get_by_hostname(pool, "n1")).id == node.id
    with pytest.raises(Invalid, match="node state"):
        await nodes.set_state(pool, node.id, "sleeping")  # type: ignore[arg-type]
    # A region with nodes cannot go.
    with pytest.raises(Conflict, match="still referenced by nodes"):
        await regions.delete(pool, "eu")

    await pool.execute(
        "UPDATE nodes SET last_heartbeat = now() - interval '1 minute' WHERE id = $1", node.id
    )
    assert [n.id for n in await nodes.mark_silent_down(pool, 30)] == [node.id]
    assert (await nodes.get(pool, node.id)).state == "down"
    await nodes.delete(pool, node.id)
    with pytest.raises(NotFound):
        await nodes.get(pool, node.id)


@pytest.mark.asyncio
async def test_projects(pool: Any) -> None:
    project = await projects.create(
        pool, "acme", "web", github_repo="acme/web", vcpu=Decimal("0.5"), app_port=8080
    )
    assert (project.branch, project.app_port, project.vcpu) == ("main", 8080, Decimal("0.5"))
    with pytest.raises(Conflict, match=r"org, name 'acme, web' already exists") as exc:
        await projects.create(pool, "acme", "web")
    assert exc.value.field == "org, name"
    await projects.create(pool, "other", "web")  # the same name in another org is fine
    with pytest.raises(Invalid, match="unknown project setting"):
        await projects.create(pool, "acme", "api", colour="blue")
    with pytest.raises(Invalid, match="name"):
        await projects.create(pool, "acme", "Not A Label")

    updated = await projects.update(pool, project.id, rate_limit_rps=50, github_repo=None)
    assert (updated.rate_limit_rps, updated.github_repo, updated.app_port) == (50, None, 8080)
    assert updated.updated_at >= project.updated_at
    with pytest.raises(Invalid, match="app_port"):
        await projects.update(pool, project.id, app_port=70000)
    assert (await projects.get_by_name(pool, "acme", "web")).id == project.id
    assert [p.org for p in await projects.list_all(pool)] == ["acme", "other"]
    assert [p.org for p in await projects.list_all(pool, org="other")] == ["other"]
    await projects.delete(pool, project.id)
    with pytest.raises(NotFound, match="acme/web"):
        await projects.get_by_name(pool, "acme", "web")
    with pytest.raises(NotFound):
        await projects.update(pool, uuid4(), branch="dev")


@pytest.mark.asyncio
async def test_environments_and_current_deployment(pool: Any) -> None:
    project, env, first = await _deployment(pool)
    with pytest.raises(Conflict, match="project_id, name"):
        await environments.create(pool, project.id, "production")
    with pytest.raises(NotFound, match="project_id"):
        await environments.create(pool, uuid4(), "production")

    env = await environments.set_current(pool, env.id, first.id)
    assert (env.current_deployment_id, env.previous_deployment_id) == (first.id, None)
    second = await deployments.create(
        pool, project_id=project.id, environment_id=env.id, image="img:2"
    )
    env = await environments.set_current(pool, env.id, second.id)
    assert (env.current_deployment_id, env.previous_deployment_id) == (second.id, first.id)
    # Setting the current one again changes nothing (previous stays the rollback target).
    env = await environments.set_current(pool, env.id, second.id)
    assert env.previous_deployment_id == first.id

    staging = await environments.create(pool, project.id, "staging")
    with pytest.raises(Invalid, match="another environment"):
        await environments.set_current(pool, staging.id, second.id)
    with pytest.raises(NotFound, match="deployment"):
        await environments.set_current(pool, staging.id, uuid4())
    with pytest.raises(NotFound, match="environment"):
        await environments.set_current(pool, uuid4(), second.id)
    names = [e.name for e in await environments.list_for_project(pool, project.id)]
    assert names == ["production", "staging"]
    assert (await environments.get_by_name(pool, project.id, "staging")).id == staging.id

    # Deleting the current deployment unsets the pointer instead of failing.
    await deployments.delete(pool, second.id)
    env = await environments.get(pool, env.id)
    assert env.current_deployment_id is None


@pytest.mark.asyncio
async def test_deployments(pool: Any) -> None:
    project, env, deployment = await _deployment(pool)
    assert deployment.status == "pending"
    assert len(deployment.nanoid) == 7
    assert set(deployment.nanoid) <= set(deployments.NANOID_ALPHABET)
    assert (await deployments.get_by_nanoid(pool, deployment.nanoid)).id == deployment.id

    placing = await deployments.transition(pool, deployment.id, "pending", "placing")
    assert placing.status == "placing" and placing.placing_at is not None
    assert placing.starting_at is None
    with pytest.raises(Conflict, match="is placing, not pending"):
        await deployments.transition(pool, deployment.id, "pending", "placing")
    # Not in the lifecycle's table: refused, and nothing changes.
    with pytest.raises(Invalid, match="cannot go from placing to active"):
        await deployments.transition(pool, deployment.id, "placing", "active")
    assert (await deployments.get(pool, deployment.id)).status == "placing"
    starting = await deployments.transition(
        pool, deployment.id, "placing", "starting", regions=["eu-west", "us-east"]
    )
    assert starting.regions == ["eu-west", "us-east"] and starting.starting_at is not None
    with pytest.raises(Invalid, match="needs a reason"):
        await deployments.transition(pool, deployment.id, "starting", "failed")
    failed = await deployments.transition(
        pool, deployment.id, "starting", "failed", reason="no nodes"
    )
    assert (failed.failure_reason, failed.failed_at is not None) == ("no nodes", True)
    with pytest.raises(Invalid, match="failed is final"):
        await deployments.transition(pool, deployment.id, "failed", "placing")
    with pytest.raises(Invalid, match="'paused' is not a deployment status"):
        await deployments.transition(pool, deployment.id, "paused", "pending")  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        await deployments.transition(pool, uuid4(), "pending", "placing")

    other = await projects.create(pool, "acme", "api")
    with pytest.raises(NotFound, match="environment"):
        # The environment belongs to another project.
        await deployments.create(pool, project_id=other.id, environment_id=env.id, image="i")
    with pytest.raises(Invalid, match="image or a command"):
        await deployments.create(pool, project_id=project.id, environment_id=env.id)

    newer = await deployments.create(
        pool, project_id=project.id, environment_id=env.id, command="python -m app"
    )
    listed = await deployments.list_for_project(pool, project.id)
    assert [d.id for d in listed] == [newer.id, deployment.id]
    assert [d.id for d in await deployments.list_by_status(pool, "pending")] == [newer.id]


@pytest.mark.asyncio
async def test_nanoid_is_unique_and_collisions_retry(
    pool: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    project, env, first = await _deployment(pool)
    with pytest.raises(Conflict, match="nanoid") as exc:
        await query.execute(
            pool,
            "INSERT INTO deployments (project_id, environment_id, nanoid, image)"
            " VALUES ($1, $2, $3, 'i')",
            project.id,
            env.id,
            first.nanoid,
        )
    assert exc.value.field == "nanoid"

    ids = iter([first.nanoid, first.nanoid, "zzzzzzz"])
    monkeypatch.setattr(deployments, "new_nanoid", lambda: next(ids))
    second = await deployments.create(pool, project_id=project.id, environment_id=env.id, image="i")
    assert second.nanoid == "zzzzzzz"

    monkeypatch.setattr(deployments, "new_nanoid", lambda: first.nanoid)
    with pytest.raises(Conflict, match="no free nanoid"):
        await deployments.create(pool, project_id=project.id, environment_id=env.id, image="i")


@pytest.mark.asyncio
async def test_instances(pool: Any) -> None:
    _, _, deployment = await _deployment(pool)
    await regions.create(pool, "eu", "Europe", "DE")
    node = await nodes.create(
        pool, region="eu", hostname="n1", address="10.0.0.1", vcpu=4, memory_mb=8192
    )
    instance = await instances.create(
        pool, deployment_id=deployment.id, region="eu", node_id=node.id
    )
    assert (instance.state, instance.healthy) == ("pending", False)
    with pytest.raises(NotFound, match="deployment_id"):
        await instances.create(pool, deployment_id=uuid4(), region="eu")
    with pytest.raises(NotFound, match="region"):
        await instances.create(pool, deployment_id=deployment.id, region="mars")

    running = await instances.report(
        pool, instance.id, "running", address="10.1.0.5", port=3000, boot_time_ms=120
    )
    assert (running.address, running.port, running.boot_time_ms) == ("10.1.0.5", 3000, 120)
    healthy = await instances.set_health(pool, instance.id, True)
    assert healthy.healthy and healthy.last_health_at is not None
    assert (await instances.set_health(pool, instance.id, True)).healthy
    with pytest.raises(Invalid, match="port"):
        await instances.report(pool, instance.id, "running", port=0)
    # Leaving `running` drops health; address and port stay.
    stopping = await instances.report(pool, instance.id, "stopping")
    assert (stopping.healthy, stopping.address) == (False, "10.1.0.5")
    assert [i.id for i in await instances.list_for_node(pool, node.id)] == [instance.id]
    await instances.report(pool, instance.id, "stopped")
    assert await instances.list_for_node(pool, node.id) == []
    assert len(await instances.list_for_deployment(pool, deployment.id)) == 1
    # A deleted node leaves its instances without one, to be replaced.
    await nodes.delete(pool, node.id)
    assert (await instances.get(pool, instance.id)).node_id is None
    await instances.delete(pool, instance.id)
    with pytest.raises(NotFound):
        await instances.get(pool, instance.id)


@pytest.mark.asyncio
async def test_domains(pool: Any) -> None:
    project, env, _ = await _deployment(pool)
    domain = await domains.create(
        pool, "App.Customer.org.", project_id=project.id, environment_id=env.id
    )
    assert domain.name == "app.customer.org" and domain.verified_at is None
    assert len(domain.verification_token) >= 24
    with pytest.raises(Conflict, match=r"name 'app\.customer\.org' already exists"):
        await domains.create(pool, "app.customer.org", project_id=project.id, environment_id=env.id)
    other = await projects.create(pool, "acme", "api")
    with pytest.raises(NotFound, match="environment"):
        await domains.create(pool, "x.customer.org", project_id=other.id, environment_id=env.id)

    checked = await domains.record_check(pool, domain.id, verified=False, pointing=False)
    assert checked.verified_at is None and checked.last_checked_at is not None
    verified = await domains.record_check(pool, domain.id, verified=True, pointing=True)
    assert verified.verified_at is not None
    again = await domains.record_check(pool, domain.id, verified=True, pointing=True)
    assert again.verified_at == verified.verified_at
    assert (await domains.get_by_name(pool, "APP.customer.org")).id == domain.id
    assert [d.name for d in await domains.list_for_project(pool, project.id)] == [domain.name]
    await domains.delete(pool, domain.id)
    with pytest.raises(NotFound):
        await domains.get_by_name(pool, "app.customer.org")


@pytest.mark.asyncio
async def test_certificates_and_acme(pool: Any) -> None:
    now = datetime.now(UTC)
    cert = await certificates.store(
        pool,
        "App.customer.org",
        cert_pem="PEM1",
        key_encrypted=b"k1",
        not_before=now,
        not_after=now + timedelta(days=90),
    )
    assert "PEM1" not in repr(cert)  # secrets stay out of logs
    renewed = await certificates.store(
        pool,
        "app.customer.org",
        cert_pem="PEM2",
        key_encrypted=b"k2",
        not_before=now,
        not_after=now + timedelta(days=90),
        issuer="Let's Encrypt",
    )
    assert renewed.id == cert.id and (await certificates.get(pool, "app.customer.org")) == renewed
    assert await certificates.list_expiring(pool, now + timedelta(days=30)) == []
    assert len(await certificates.list_expiring(pool, now + timedelta(days=91))) == 1
    with pytest.raises(Invalid, match="certificates"):
        await certificates.store(
            pool, "b.org", cert_pem="P", key_encrypted=b"k", not_before=now, not_after=now
        )
    await certificates.delete(pool, "app.customer.org")
    with pytest.raises(NotFound, match="no certificate"):
        await certificates.get(pool, "app.customer.org")

    await acme.put(
        pool, "tok", key_authorization="tok.abc", domain="a.org", expires_at=now + timedelta(1)
    )
    challenge = await acme.get(pool, "tok")
    assert challenge is not None and challenge.key_authorization == "tok.abc"
    await acme.put(pool, "old", key_authorization="x", domain="a.org", expires_at=now)
    assert await acme.get(pool, "old") is None  # expired: never served
    assert await acme.delete_expired(pool) == 1
    await acme.delete(pool, "tok")
    assert await acme.get(pool, "tok") is None


@pytest.mark.asyncio
async def test_acme_accounts(pool: Any) -> None:
    url = "https://ca.test/dir"
    assert await acme.get_account(pool, url) is None
    account = await acme.add_account(pool, url, key_encrypted=b"first")
    assert account.uri is None and "first" not in repr(account)
    # A second leader racing to create it gets the first one's.
    assert (await acme.add_account(pool, url, key_encrypted=b"second")).key_encrypted == b"first"
    await acme.set_registration(pool, url, uri="https://ca.test/acct/1", contact="ops@x.org")
    stored = await acme.get_account(pool, url)
    assert stored is not None and (stored.uri, stored.contact) == (
        "https://ca.test/acct/1",
        "ops@x.org",
    )
    assert await acme.get_account(pool, "https://other.test/dir") is None


async def _cert(pool: Any, name: str, *, lifetime: float, left: float) -> None:
    """A certificate of ``lifetime`` days of which ``left`` days remain."""
    now = datetime.now(UTC)
    await certificates.store(
        pool,
        name,
        cert_pem="PEM",
        key_encrypted=b"k",
        not_before=now - timedelta(days=lifetime - left),
        not_after=now + timedelta(days=left),
        issuer="CN=Test CA",
    )


@pytest.mark.asyncio
async def test_certificate_orders(pool: Any) -> None:
    project, env, _ = await _deployment(pool)
    made = {}
    for name in ("new.customer.org", "fresh.customer.org", "old.customer.org", "wait.customer.org"):
        domain = await domains.create(pool, name, project_id=project.id, environment_id=env.id)
        made[name] = await domains.record_check(pool, domain.id, verified=True, pointing=True)
    await domains.create(
        pool, "unverified.customer.org", project_id=project.id, environment_id=env.id
    )
    await _cert(pool, "fresh.customer.org", lifetime=90, left=31)  # more than a third left
    await _cert(pool, "old.customer.org", lifetime=90, left=29)  # less than a third left
    due = await acme.due(pool, renew_fraction=1 / 3)
    # Without a certificate first, then the soonest expiry; never an unverified domain.
    assert [d.name for d in due] == ["new.customer.org", "wait.customer.org", "old.customer.org"]
    assert due[2].not_after is not None and due[0].not_after is None
    assert [d.name for d in await acme.due(pool, renew_fraction=1 / 3, limit=1)] == [
        "new.customer.org"
    ]

    wait = made["wait.customer.org"].id
    started = await acme.record_attempt(pool, wait)
    assert started is not None and started.failures == 0 and started.last_attempt_at is not None
    await acme.record_order_url(pool, wait, "https://ca.test/order/1")
    failed = await acme.record_failure(pool, wait, "boom", backoff=60, max_backoff=300)
    assert failed is not None and (failed.failures, failed.last_error) == (1, "boom")
    assert failed.order_url == "https://ca.test/order/1"
    assert failed.next_attempt_at is not None and failed.last_attempt_at is not None
    backoff = (failed.next_attempt_at - failed.last_attempt_at).total_seconds()
    assert 59 < backoff < 61
    # In its backoff: not due.
    assert "wait.customer.org" not in [d.name for d in await acme.due(pool, renew_fraction=1 / 3)]
    delays = []
    for _ in range(4):
        again = await acme.record_failure(pool, wait, "boom", backoff=60, max_backoff=300)
        assert again is not None and again.next_attempt_at is not None
        delays.append(round((again.next_attempt_at - datetime.now(UTC)).total_seconds() / 10) * 10)
    assert delays == [120, 240, 300, 300]  # doubling, capped
    assert (await acme.get_order(pool, wait)).failures == 5  # type: ignore[union-attr]
    await pool.execute(
        "UPDATE certificate_orders SET next_attempt_at = now() - interval '1 s'"
        " WHERE domain_id = $1",
        wait,
    )
    assert "wait.customer.org" in [d.name for d in await acme.due(pool, renew_fraction=1 / 3)]

    # What the API and the metrics see.
    views = {v.domain.name: v.certificate for v in (await domains.list_views(pool, project.id))[0]}
    assert views["unverified.customer.org"] == domains.CertificateState()
    assert views["new.customer.org"].status == "pending"
    assert views["wait.customer.org"].status == "failed"
    assert views["wait.customer.org"].last_error == "boom"
    assert views["wait.customer.org"].failures == 5
    fresh = views["fresh.customer.org"]
    assert (fresh.status, fresh.issuer, fresh.failures) == ("issued", "CN=Test CA", 0)
    assert fresh.not_after is not None and fresh.not_before is not None
    overview = await acme.overview(pool)
    assert (overview.issued, overview.pending, overview.failed) == (2, 1, 1)
    assert overview.soonest_expiry is not None
    left = (overview.soonest_expiry - datetime.now(UTC)).total_seconds()
    assert 28.9 * 86400 < left < 29 * 86400  # old.customer.org's

    # Success resets the row; the next attempt is the renewal.
    renew_at = datetime.now(UTC) + timedelta(days=60)
    done = await acme.record_success(pool, wait, renew_at=renew_at)
    assert done is not None and (done.failures, done.last_error) == (0, None)
    assert done.next_attempt_at == renew_at and done.issued_at is not None

    # Removing a domain removes its certificate and its order.
    await domains.delete(pool, made["fresh.customer.org"].id)
    with pytest.raises(NotFound):
        await certificates.get(pool, "fresh.customer.org")
    await domains.delete(pool, wait)
    assert await acme.get_order(pool, wait) is None
    assert await acme.record_attempt(pool, wait) is None  # removed meanwhile
    with pytest.raises(NotFound):
        await domains.delete(pool, wait)


@pytest.mark.asyncio
async def test_github_webhooks_and_deliveries(pool: Any) -> None:
    webhook = await github.create_webhook(pool, "Acme/Web", secret="s3cret")
    assert webhook.repository == "acme/web"
    assert webhook.events == ["push"] and "s3cret" not in repr(webhook)
    assert await github.get_webhook(pool, webhook.id) == webhook
    assert await github.get_webhook_for(pool, "ACME/web") == webhook
    with pytest.raises(Conflict, match="repository 'acme/web' already exists"):
        await github.create_webhook(pool, "acme/web", secret="other")
    with pytest.raises(Invalid, match="repository"):
        await github.create_webhook(pool, "not a repository", secret="x")
    payload = {"ref": "refs/heads/main", "after": "abc123"}
    delivery = await github.record_delivery(
        pool, webhook.id, delivery_id="d-1", event="push", payload=payload
    )
    assert (delivery.payload, delivery.status) == (payload, "received")
    with pytest.raises(Conflict, match="delivery_id 'd-1' already exists"):
        await github.record_delivery(pool, webhook.id, delivery_id="d-1", event="push", payload={})
    done = await github.set_delivery_status(pool, "d-1", "processed")
    assert done.status == "processed"
    with pytest.raises(Invalid, match="status"):
        await github.set_delivery_status(pool, "d-1", "lost")  # type: ignore[arg-type]
    assert [d.delivery_id for d in await github.list_deliveries(pool, webhook.id)] == ["d-1"]
    with pytest.raises(NotFound, match="webhook_id"):
        await github.record_delivery(pool, uuid4(), delivery_id="d-2", event="push", payload={})
    assert [w.id for w in await github.list_webhooks(pool)] == [webhook.id]
    await github.delete_webhook(pool, webhook.id)
    with pytest.raises(NotFound):
        await github.get_webhook(pool, webhook.id)


@pytest.mark.asyncio
async def test_logs(pool: Any) -> None:
    _, _, deployment = await _deployment(pool)
    await regions.create(pool, "eu", "Europe", "DE")
    instance = await instances.create(pool, deployment_id=deployment.id, region="eu")
    await logs.append(
        pool, instance.id, deployment.id, [("stdout", "listening"), ("stderr", "warn")]
    )
    lines = await logs.read(pool, deployment.id)
    assert [(ln.stream, ln.line) for ln in lines] == [("stdout", "listening"), ("stderr", "warn")]
    assert [ln.line for ln in await logs.read(pool, deployment.id, after=lines[0].id)] == ["warn"]
    with pytest.raises(Invalid, match="stream"):
        await logs.append(pool, instance.id, deployment.id, [("stdin", "x")])  # type: ignore[list-item]
    assert await logs.prune(pool, datetime.now(UTC) + timedelta(seconds=1)) == 2


@pytest.mark.asyncio
async def test_audit(pool: Any) -> None:
    await audit.record(pool, "alice", "project.create", "acme/web", {"vcpu": 1})
    await audit.record(pool, "bob", "node.drain", "n1")
    entries = await audit.recent(pool)
    assert [(e.actor, e.details) for e in entries] == [("bob", {}), ("alice", {"vcpu": 1})]
    assert [e.action for e in await audit.recent(pool, actor="alice")] == ["project.create"]
    assert [e.actor for e in await audit.recent(pool, target="n1")] == ["bob"]


@pytest.mark.asyncio
async def test_a_closed_pool_is_unavailable(migrated_url: str) -> None:
    closed = await create_pool(migrated_url)
    await closed.close()
    with pytest.raises(DatabaseUnavailable, match="database unavailable"):
        await regions.list_all(closed)
