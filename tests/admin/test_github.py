"""GitHub: repository webhooks, signed deliveries (valid, wrong, missing, replayed), pushes
that deploy, and the manual trigger."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import uuid
from typing import Any

import pytest

from edge.store import deployments, environments, projects
from tests.admin.conftest import NO_TOKEN, AdminClient, error_of
from tests.harness import Response

SECRET = "webhook-secret-key"
WEBHOOKS = "/api/v1/github/webhooks"
EVENTS = "/api/v1/github/events"
TRIGGER = "/api/v1/github/trigger"
SHA1 = "a" * 39 + "1"
SHA2 = "b" * 39 + "2"


async def make_project(pool: Any, org: str, name: str, **settings: Any) -> projects.Project:
    project = await projects.create(pool, org, name, **settings)
    for env in ("production", "staging"):
        await environments.create(pool, project.id, env)
    return project


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def deliver(
    admin: AdminClient,
    payload: Any,
    *,
    event: str = "push",
    delivery: str | None = None,
    secret: str | None = SECRET,
    signature: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """A delivery as GitHub sends it: no bearer token, signed with the secret."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    sent = {"X-GitHub-Event": event, "X-GitHub-Delivery": delivery or str(uuid.uuid4())}
    if signature is not None:
        sent["X-Hub-Signature-256"] = signature
    elif secret is not None:
        sent["X-Hub-Signature-256"] = sign(secret, body)
    sent.update(headers or {})
    return await admin.call("POST", EVENTS, raw_body=body, token=NO_TOKEN, headers=sent)


def push(
    repository: str = "Acme/Web",
    branch: str = "main",
    after: str = SHA1,
    message: str = "Fix: the API endpoints\n\nLonger description.",
) -> dict[str, Any]:
    return {
        "ref": f"refs/heads/{branch}",
        "before": "0" * 40,
        "after": after,
        "deleted": after == "0" * 40,
        "repository": {"full_name": repository, "name": repository.split("/")[1]},
        "head_commit": {"id": after, "message": message} if after != "0" * 40 else None,
    }


async def add_webhook(admin: AdminClient, events: list[str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"org": "Acme", "repo": "Web", "secret": SECRET}
    if events is not None:
        body["events"] = events
    created: dict[str, Any] = await admin.ok("POST", WEBHOOKS, body, 201)
    return created


async def deployment_count(admin: AdminClient) -> int:
    return int(await admin.pool.fetchval("SELECT count(*) FROM deployments"))


# -- webhooks -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_webhooks_add_list_and_remove(admin: AdminClient) -> None:
    created = await admin.ok(
        "POST",
        WEBHOOKS,
        {"org": "dokedu", "repo": "app", "events": ["push", "pull_request"], "secret": SECRET},
        201,
    )
    assert set(created) == {"id", "repository", "events", "created_at", "url"}
    assert created["repository"] == "dokedu/app"
    assert created["events"] == ["push", "pull_request"]
    assert created["url"] == EVENTS
    other = await admin.ok(
        "POST", WEBHOOKS, {"org": "Acme-Corp", "repo": "Web.App", "secret": "12345678"}, 201
    )
    assert other["repository"] == "acme-corp/web.app" and other["events"] == ["push"]
    stored = await admin.pool.fetchval(
        "SELECT secret FROM github_webhooks WHERE repository = 'dokedu/app'"
    )
    assert stored == SECRET

    again = await admin.call(
        "POST", WEBHOOKS, {"org": "DOKEDU", "repo": "App", "secret": "another-secret"}
    )
    assert again.status == 409

    listed = await admin.call("GET", WEBHOOKS + "?per_page=1")
    assert listed.status == 200 and listed.header("x-total-count") == "2"
    assert [w["repository"] for w in listed.json()] == ["acme-corp/web.app"]
    assert SECRET not in listed.body.decode()

    assert await admin.ok("GET", WEBHOOKS + "/dokedu/app/deliveries") == []
    assert (await admin.call("GET", WEBHOOKS + "/dokedu/nope/deliveries")).status == 404
    assert (await admin.call("DELETE", WEBHOOKS + "/Dokedu/App")).status == 204
    assert (await admin.call("DELETE", WEBHOOKS + "/dokedu/app")).status == 404
    assert (await admin.call("GET", WEBHOOKS + "/dokedu/app/deliveries")).status == 404
    assert [w["repository"] for w in await admin.ok("GET", WEBHOOKS)] == ["acme-corp/web.app"]


@pytest.mark.asyncio
async def test_webhook_input_errors(admin: AdminClient) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"org": "acme", "repo": "web", "secret": "short"}, "secret"),
        ({"org": "acme", "repo": "web", "secret": SECRET, "events": ["pushed"]}, "events[0]"),
        ({"org": "acme", "repo": "web", "secret": SECRET, "events": []}, "events"),
        ({"org": "ac me", "repo": "web", "secret": SECRET}, "org"),
        ({"org": "acme", "repo": "..", "secret": SECRET}, "repo"),
        ({"org": "acme", "repo": "a/b", "secret": SECRET}, "repo"),
        ({"org": "acme", "secret": SECRET}, "repo"),
        ({"org": "acme", "repo": "web", "secret": SECRET, "url": "x"}, "url"),
        ({"org": "acme", "repo": "web", "secret": 12345678}, "secret"),
        ({"org": "acme", "repo": "web", "secret": "webhook\u0000secret"}, "secret"),
        ({"org": "a" * 40, "repo": "web", "secret": SECRET}, "org"),
    ]
    for body, field in cases:
        response = await admin.call("POST", WEBHOOKS, body)
        assert response.status == 400, body
        assert error_of(response)["field"] == field, body
    for method, path in (
        ("GET", WEBHOOKS),
        ("POST", WEBHOOKS),
        ("DELETE", WEBHOOKS + "/acme/web"),
        ("GET", WEBHOOKS + "/acme/web/deliveries"),
        ("POST", TRIGGER),
    ):
        assert (await admin.call(method, path, token=NO_TOKEN)).status == 401
    assert await admin.ok("GET", WEBHOOKS) == []


# -- deliveries ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_signatures(admin: AdminClient) -> None:
    await add_webhook(admin)
    await make_project(admin.pool, "acme", "web", github_repo="acme/web", auto_deploy=True)
    payload = push()

    unsigned = await deliver(admin, payload, secret=None)
    wrong = await deliver(admin, payload, secret="not-the-secret")
    mangled = await deliver(admin, payload, signature="sha256=zz")
    sha1_only = await deliver(admin, payload, signature="sha1=" + "0" * 40)
    unknown = await deliver(admin, push(repository="someone/else"))
    for response in (unsigned, wrong, mangled, sha1_only, unknown):
        assert response.status == 401, response.body
    # An unknown repository answers as a wrong signature does.
    assert error_of(unknown) == error_of(wrong)
    # A body changed after signing does not verify.
    body = json.dumps(payload).encode()
    tampered = await deliver(admin, body.replace(b"main", b"prod"), signature=sign(SECRET, body))
    assert tampered.status == 401
    assert await deployment_count(admin) == 0
    assert await admin.pool.fetchval("SELECT count(*) FROM github_deliveries") == 0

    missing_event = await admin.call(
        "POST",
        EVENTS,
        raw_body=body,
        token=NO_TOKEN,
        headers={"X-GitHub-Delivery": "d-1", "X-Hub-Signature-256": sign(SECRET, body)},
    )
    assert missing_event.status == 400 and error_of(missing_event)["field"] == "X-GitHub-Event"
    missing_id = await admin.call(
        "POST",
        EVENTS,
        raw_body=body,
        token=NO_TOKEN,
        headers={"X-GitHub-Event": "push", "X-Hub-Signature-256": sign(SECRET, body)},
    )
    assert missing_id.status == 400 and error_of(missing_id)["field"] == "X-GitHub-Delivery"
    not_json = await deliver(admin, b"payload=%7B%7D")
    assert not_json.status == 400
    form = await deliver(admin, body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status == 400
    no_repo = await deliver(admin, {"zen": "Keep it simple."}, event="ping")
    assert no_repo.status == 400

    ping = await deliver(
        admin,
        {"zen": "Design for failure.", "repository": {"full_name": "acme/web"}},
        event="ping",
        delivery="ping-1",
    )
    assert ping.status == 202 and ping.json() == {
        "status": "processed",
        "deployments": [],
        "reason": None,
    }

    signed = await deliver(admin, payload, delivery="push-1")
    assert signed.status == 202 and signed.json()["status"] == "processed"
    assert len(signed.json()["deployments"]) == 1
    # Replayed: answered, nothing done twice.
    replay = await deliver(admin, payload, delivery="push-1")
    assert replay.status == 200 and replay.json()["status"] == "duplicate"
    assert replay.json()["deployments"] == []
    assert await deployment_count(admin) == 1
    assert await admin.pool.fetchval("SELECT count(*) FROM github_deliveries") == 2


@pytest.mark.asyncio
async def test_push_deploys_projects_with_auto_deploy(admin: AdminClient) -> None:
    pool = admin.pool
    await add_webhook(admin)
    web = await make_project(pool, "acme", "web", github_repo="Acme/Web", auto_deploy=True)
    custom = await make_project(
        pool,
        "acme",
        "docs",
        github_repo="acme/web",
        auto_deploy=True,
        image_template="registry.test/{org}/{repo}-docs:{sha}",
    )
    await make_project(pool, "acme", "manual", github_repo="acme/web", auto_deploy=False)
    await make_project(
        pool, "acme", "preview", github_repo="acme/web", branch="staging", auto_deploy=True
    )
    await make_project(pool, "acme", "unrelated", github_repo="acme/other", auto_deploy=True)
    # The current production deployment's instance count and variables carry over.
    production = await environments.get_by_name(pool, web.id, "production")
    current = await deployments.create(
        pool,
        project_id=web.id,
        environment_id=production.id,
        image="ghcr.io/acme/web:old",
        instances_per_region=3,
        env={"DATABASE": "postgres://db"},
    )
    await environments.set_current(pool, production.id, current.id)

    long_line = "x" * 500
    answer = await deliver(admin, push(message=long_line + "\nbody"), delivery="d-push")
    assert answer.status == 202, answer.body
    result = answer.json()
    assert result["status"] == "processed" and result["reason"] is None
    names = result["deployments"]
    assert len(names) == 2
    assert names[0].startswith("docs-") and names[0].endswith("-acme")
    assert names[1].startswith("web-") and names[1].endswith("-acme")

    rows = {
        r["name"]: r
        for r in await pool.fetch(
            "SELECT p.name, d.*, e.name AS environment FROM deployments d"
            " JOIN projects p ON p.id = d.project_id JOIN environments e ON e.id = d.environment_id"
            " WHERE d.commit_sha = $1",
            SHA1,
        )
    }
    assert set(rows) == {"web", "docs"}
    made = rows["web"]
    assert made["image"] == f"ghcr.io/acme/web:sha-{SHA1}"
    assert made["status"] == "pending" and made["environment"] == "production"
    assert made["commit_message"] == "x" * 200
    assert made["instances_per_region"] == 3 and made["env"] == {"DATABASE": "postgres://db"}
    assert rows["docs"]["image"] == f"registry.test/acme/web-docs:{SHA1}"
    assert rows["docs"]["instances_per_region"] == 1 and rows["docs"]["env"] == {}
    assert rows["docs"]["project_id"] == custom.id

    other = await deliver(admin, push(after=SHA2, branch="feature"), delivery="d-feature")
    assert other.status == 202 and other.json()["status"] == "ignored"
    assert "feature" in other.json()["reason"] and other.json()["deployments"] == []
    deleted = await deliver(admin, push(after="0" * 40), delivery="d-delete")
    assert deleted.json()["status"] == "ignored" and "deleted" in deleted.json()["reason"]
    tag = await deliver(admin, {**push(), "ref": "refs/tags/v1"}, delivery="d-tag")
    assert tag.json()["status"] == "ignored"
    pr = await deliver(admin, {**push(), "action": "opened"}, event="pull_request", delivery="d-pr")
    assert pr.json()["status"] == "ignored" and "not subscribed" in pr.json()["reason"]
    assert await deployment_count(admin) == 3

    deliveries = await admin.call("GET", WEBHOOKS + "/acme/web/deliveries")
    assert deliveries.header("x-total-count") == "5"
    listed = deliveries.json()
    # Newest first.
    assert [d["delivery_id"] for d in listed] == [
        "d-pr",
        "d-tag",
        "d-delete",
        "d-feature",
        "d-push",
    ]
    first = listed[-1]
    assert first["status"] == "processed" and first["event"] == "push"
    assert first["ref"] == "refs/heads/main" and first["commit_sha"] == SHA1
    assert first["deployments"] == sorted(names)
    assert listed[3]["status"] == "ignored" and listed[3]["deployments"] == []
    assert listed[3]["reason"] == other.json()["reason"]
    page = await admin.ok("GET", WEBHOOKS + "/acme/web/deliveries?per_page=2&page=3")
    assert [d["delivery_id"] for d in page] == ["d-push"]

    # A manual deployment of the same commit later is not the delivery's.
    await admin.ok("POST", TRIGGER, {"org": "acme", "repo": "web", "ref": "main", "sha": SHA1}, 201)
    [still] = await admin.ok("GET", WEBHOOKS + "/acme/web/deliveries?per_page=1&page=5")
    assert still["deployments"] == sorted(names)


@pytest.mark.asyncio
async def test_push_events_and_subscriptions(admin: AdminClient) -> None:
    await add_webhook(admin, events=["push", "pull_request"])
    await make_project(admin.pool, "acme", "web", github_repo="acme/web", auto_deploy=True)
    pr = await deliver(admin, {**push(), "action": "opened"}, event="pull_request")
    assert pr.json()["status"] == "ignored" and "do not deploy" in pr.json()["reason"]
    none = await deliver(admin, push(repository="acme/web", branch="main"), event="release")
    assert none.json()["status"] == "ignored" and "not subscribed" in none.json()["reason"]
    assert await deployment_count(admin) == 0


@pytest.mark.asyncio
async def test_push_without_matching_project_and_failed_push(admin: AdminClient) -> None:
    await add_webhook(admin)
    nothing = await deliver(admin, push())
    assert nothing.status == 202 and nothing.json()["status"] == "ignored"
    assert "no project" in nothing.json()["reason"]

    await make_project(admin.pool, "acme", "web", github_repo="acme/web", auto_deploy=True)
    await make_project(
        admin.pool,
        "acme",
        "broken",
        github_repo="acme/web",
        auto_deploy=True,
        image_template="ghcr.io/{org}/{nope}:{sha}",
    )
    failed = await deliver(admin, push(), delivery="d-failed")
    assert failed.status == 202
    assert failed.json()["status"] == "failed" and "{nope}" in failed.json()["reason"]
    # All or nothing: the good project got no deployment either.
    assert await deployment_count(admin) == 0
    [recorded, _] = await admin.ok("GET", WEBHOOKS + "/acme/web/deliveries")
    assert recorded["delivery_id"] == "d-failed" and recorded["status"] == "failed"
    assert recorded["reason"] == failed.json()["reason"] and recorded["deployments"] == []
    again = await deliver(admin, push(), delivery="d-failed")
    assert again.status == 200 and again.json()["status"] == "duplicate"


@pytest.mark.asyncio
async def test_platform_image_template(admin: AdminClient) -> None:
    admin.server.ctx.settings = dataclasses.replace(
        admin.ctx.settings, image_template="registry.internal/{org}-{repo}@{sha}"
    )
    await add_webhook(admin)
    await make_project(admin.pool, "acme", "web", github_repo="acme/web", auto_deploy=True)
    answer = await deliver(admin, push())
    assert answer.json()["status"] == "processed"
    image = await admin.pool.fetchval("SELECT image FROM deployments")
    assert image == f"registry.internal/acme-web@{SHA1}"


# -- trigger ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_trigger(admin: AdminClient) -> None:
    pool = admin.pool
    await add_webhook(admin)
    await make_project(pool, "acme", "web", github_repo="acme/web", auto_deploy=False)
    await make_project(pool, "acme", "preview", github_repo="acme/web", branch="staging")

    with_sha = await admin.ok(
        "POST", TRIGGER, {"org": "Acme", "repo": "Web", "ref": "refs/heads/main", "sha": SHA2}, 201
    )
    assert len(with_sha) == 1
    [made] = with_sha
    assert (made["org"], made["project"], made["environment"]) == ("acme", "web", "production")
    assert made["status"] == "pending" and made["commit_sha"] == SHA2
    assert made["image"] == f"ghcr.io/acme/web:sha-{SHA2}"
    assert made["url"] == f"https://{made['name']}.zeitwork.test"
    assert made["commit_message"] is None

    unknown = await admin.call("POST", TRIGGER, {"org": "acme", "repo": "web", "ref": "main"})
    assert unknown.status == 409
    assert error_of(unknown)["message"] == "no known commit for refs/heads/main; give sha"

    # A push that deployed nothing (auto_deploy is off) still names the branch's commit.
    ignored = await deliver(admin, push(after=SHA1, message="Add feature\n\nDetails"))
    assert ignored.json()["status"] == "ignored"
    await deliver(admin, push(after="0" * 40, branch="main"))  # a deletion is no commit
    await deliver(admin, push(after=SHA2, branch="staging"))
    known = await admin.ok("POST", TRIGGER, {"org": "acme", "repo": "web", "ref": "main"}, 201)
    assert [(d["project"], d["commit_sha"], d["commit_message"]) for d in known] == [
        ("web", SHA1, "Add feature")
    ]
    staging = await admin.ok(
        "POST", TRIGGER, {"org": "acme", "repo": "web", "ref": "refs/heads/staging"}, 201
    )
    assert [(d["project"], d["commit_sha"]) for d in staging] == [("preview", SHA2)]

    # A commit as the ref deploys every project of the repository.
    by_sha = await admin.ok("POST", TRIGGER, {"org": "acme", "repo": "web", "ref": SHA1}, 201)
    assert sorted(d["project"] for d in by_sha) == ["preview", "web"]
    assert {d["commit_sha"] for d in by_sha} == {SHA1}
    assert await deployment_count(admin) == 5

    no_project = await admin.call("POST", TRIGGER, {"org": "acme", "repo": "none", "ref": "main"})
    assert no_project.status == 404
    no_branch = await admin.call(
        "POST", TRIGGER, {"org": "acme", "repo": "web", "ref": "refs/heads/dev", "sha": SHA1}
    )
    assert no_branch.status == 409 and "dev" in error_of(no_branch)["message"]
    tag = await admin.call("POST", TRIGGER, {"org": "acme", "repo": "web", "ref": "refs/tags/v1"})
    assert tag.status == 409 and error_of(tag)["field"] == "ref"
    for body, field in (
        ({"org": "acme", "repo": "web"}, "ref"),
        ({"org": "acme", "repo": "web", "ref": "main", "sha": "xyz"}, "sha"),
        ({"org": "acme", "repo": "web", "ref": "main branch"}, "ref"),
        ({"org": "acme", "repo": "web", "ref": ""}, "ref"),
        ({"org": "acme", "repo": "web", "ref": "main", "force": True}, "force"),
    ):
        response = await admin.call("POST", TRIGGER, body)
        assert response.status == 400, body
        assert error_of(response)["field"] == field, body
    assert await deployment_count(admin) == 5


@pytest.mark.asyncio
async def test_trigger_project_without_production(admin: AdminClient) -> None:
    await projects.create(admin.pool, "acme", "bare", github_repo="acme/web")
    response = await admin.call(
        "POST", TRIGGER, {"org": "acme", "repo": "web", "ref": "main", "sha": SHA1}
    )
    assert response.status == 409 and "production" in error_of(response)["message"]
    assert await deployment_count(admin) == 0
