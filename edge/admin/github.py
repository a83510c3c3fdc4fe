"""``/api/v1/github``: repository webhooks, the receiver of GitHub's deliveries, and a
manual trigger.

A webhook belongs to a repository (``org/repo``) and holds the secret GitHub signs its
deliveries with. ``POST /api/v1/github/events`` takes no bearer token (GitHub has none): it
finds the webhook by the payload's ``repository.full_name`` and checks
``X-Hub-Signature-256`` (HMAC-SHA256 of the raw body) in constant time; a missing or wrong
signature and an unknown repository are the same 401, logged with the client's address.

Every verified delivery is recorded once under its ``X-GitHub-Delivery`` id (a redelivery
is answered ``duplicate`` and does nothing). A push to ``refs/heads/<branch>`` creates a
pending production deployment for every project built from the repository and branch that
has ``auto_deploy``, with the image from the project's template or the platform's
(``ghcr.io/{org}/{repo}:sha-{sha}``: the repository's owner and name in lower case and the
pushed commit; any other placeholder fails the delivery). The delivery and its deployments
are written in one transaction, so either both are there or the delivery is recorded as
failed with the reason. A new deployment keeps the instance count and environment variables
of the environment's current deployment (else of its newest one).

Limits: only ``push`` deploys (and ``ping`` is acknowledged); other subscribed events are
recorded and ignored. Payloads must be JSON (``application/json`` in GitHub's settings).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, NoReturn, get_args
from uuid import UUID

from pydantic import Field, RootModel, field_validator

from edge.admin.api import Api, ApiError, Call, Out, Page, Reply, Strict, not_found
from edge.admin.http import Request
from edge.admin.views import DeploymentOut, deployment_out
from edge.store import deployments, github
from edge.store.errors import Conflict, Invalid, NotFound
from edge.store.query import Executor

if TYPE_CHECKING:
    from edge.admin.app import AdminSettings

api = Api()
log = logging.getLogger("edge.admin")

EVENTS_URL = "/api/v1/github/events"

# The events a webhook may subscribe to (GitHub's names). Only push deploys.
Event = Literal[
    "push",
    "pull_request",
    "ping",
    "release",
    "create",
    "delete",
    "workflow_run",
    "check_run",
    "check_suite",
    "deployment",
    "deployment_status",
    "status",
]
EVENTS: tuple[str, ...] = get_args(Event)

# As the projects' github_repo: GitHub's characters, at least one of them not a dot (no
# "." or "..").
OWNER = r"^[A-Za-z0-9_.-]*[A-Za-z0-9_-][A-Za-z0-9_.-]*$"
REPO = OWNER
# A branch as projects name theirs, refs/heads/<branch>, or a commit sha.
REF = r"^[A-Za-z0-9._/+-]+$"
_REPOSITORY = re.compile(r"^[a-z0-9_.-]+/[a-z0-9_.-]+$")
_SHA = re.compile(r"^[0-9a-f]{40}(?:[0-9a-f]{24})?$")
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_EVENT_NAME = re.compile(r"^[a-z_]{1,64}$")
_DELIVERY_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
BRANCH_PREFIX = "refs/heads/"
COMMIT_MESSAGE_MAX = 200

# HMAC over something when the repository is unknown, so the answer takes as long as for a
# wrong signature and does not tell which repositories have webhooks.
_DECOY_SECRET = b"zeitwork-unknown-repository"


def _default_events() -> list[Event]:
    return ["push"]


class WebhookIn(Strict):
    org: str = Field(
        min_length=1, max_length=39, pattern=OWNER, description="the owner (user or org)"
    )
    repo: str = Field(min_length=1, max_length=100, pattern=REPO)
    events: list[Event] = Field(default_factory=_default_events, min_length=1, max_length=64)
    secret: str = Field(
        min_length=8,
        max_length=256,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="the secret set on GitHub's side (no control characters)",
    )

    @field_validator("events")
    @classmethod
    def _unique(cls, value: list[Event]) -> list[Event]:
        return list(dict.fromkeys(value))


class WebhookOut(Out):
    id: UUID
    repository: str
    events: list[str]
    created_at: datetime
    url: str = Field(description="where GitHub delivers: the payload URL's path on this API")


class DeliveryOut(Out):
    id: UUID
    delivery_id: str = Field(description="GitHub's X-GitHub-Delivery")
    event: str
    status: github.DeliveryStatus
    reason: str | None = Field(description="why it was ignored or failed")
    ref: str | None
    commit_sha: str | None
    deployments: list[str] = Field(description="names of the deployments it created")
    received_at: datetime


class EventAnswer(Out):
    status: Literal["processed", "ignored", "failed", "duplicate"]
    deployments: list[str] = Field(default_factory=list)
    reason: str | None = None


class TriggerIn(Strict):
    org: str = Field(min_length=1, max_length=39, pattern=OWNER)
    repo: str = Field(min_length=1, max_length=100, pattern=REPO)
    ref: str = Field(
        min_length=1,
        max_length=300,
        pattern=REF,
        description="refs/heads/<branch>, a branch name, or a commit sha (which every project"
        " of the repository gets)",
    )
    sha: str | None = Field(
        default=None, pattern=r"^[0-9a-fA-F]{7,64}$", description="the commit to deploy"
    )


class DeploymentList(RootModel[list[DeploymentOut]]):
    pass


def webhook_out(webhook: github.Webhook) -> WebhookOut:
    return WebhookOut(
        id=webhook.id,
        repository=webhook.repository,
        events=webhook.events,
        created_at=webhook.created_at,
        url=EVENTS_URL,
    )


async def _webhook_of(call: Call) -> github.Webhook:
    repository = f"{call.params['org']}/{call.params['repo']}".lower()
    if _REPOSITORY.fullmatch(repository):
        try:
            return await github.get_webhook_for(call.ctx.pool, repository)
        except NotFound:
            pass
    raise not_found(f"a webhook of repository {repository}")


# -- webhooks -----------------------------------------------------------------------------


@api.route(
    "GET",
    "/api/v1/github/webhooks",
    auth="admin",
    summary="List repository webhooks",
    tag="github",
    response=WebhookOut,
    many=True,
)
async def list_webhooks(call: Call) -> Page:
    found, total = await github.list_webhooks_page(
        call.ctx.pool, limit=call.page.limit, offset=call.page.offset
    )
    return Page([webhook_out(w) for w in found], total)


@api.route(
    "POST",
    "/api/v1/github/webhooks",
    auth="admin",
    summary="Add a repository's webhook (set the same secret on GitHub's side)",
    tag="github",
    body=WebhookIn,
    response=WebhookOut,
    status=201,
    errors=(409,),
)
async def create_webhook(call: Call) -> WebhookOut:
    body: WebhookIn = call.body
    repository = f"{body.org}/{body.repo}".lower()
    try:
        webhook = await github.create_webhook(
            call.ctx.pool, repository, secret=body.secret, events=list(body.events)
        )
    except Conflict:
        raise ApiError(
            409, "conflict", f"repository {repository} already has a webhook", field="repo"
        ) from None
    return webhook_out(webhook)


@api.route(
    "DELETE",
    "/api/v1/github/webhooks/{org}/{repo}",
    auth="admin",
    summary="Remove a repository's webhook and its deliveries",
    tag="github",
    errors=(404,),
)
async def delete_webhook(call: Call) -> None:
    webhook = await _webhook_of(call)
    try:
        await github.delete_webhook(call.ctx.pool, webhook.id)
    except NotFound:
        raise not_found(f"a webhook of repository {webhook.repository}") from None


@api.route(
    "GET",
    "/api/v1/github/webhooks/{org}/{repo}/deliveries",
    auth="admin",
    summary="A repository's webhook deliveries, newest first",
    tag="github",
    response=DeliveryOut,
    many=True,
    errors=(404,),
)
async def list_deliveries(call: Call) -> Page:
    webhook = await _webhook_of(call)
    found, total = await github.list_delivery_views(
        call.ctx.pool, webhook.id, limit=call.page.limit, offset=call.page.offset
    )
    return Page(
        [
            DeliveryOut(
                id=v.delivery.id,
                delivery_id=v.delivery.delivery_id,
                event=v.delivery.event,
                status=v.delivery.status,
                reason=v.delivery.error,
                ref=v.ref,
                commit_sha=v.after,
                deployments=v.deployments,
                received_at=v.delivery.received_at,
            )
            for v in found
        ],
        total,
    )


# -- deploying ----------------------------------------------------------------------------


class _CannotDeploy(Exception):
    """A project cannot get the deployment (no production environment, a bad template)."""


def render_image(template: str, values: dict[str, str]) -> str:
    """``template`` with its ``{name}`` placeholders filled; an unknown one is an error."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            known = ", ".join("{" + k + "}" for k in values)
            raise _CannotDeploy(
                f"image template {template!r} has an unknown placeholder {{{name}}}"
                f" (known: {known})"
            )
        return values[name]

    return _PLACEHOLDER.sub(fill, template)


def _first_line(message: object) -> str | None:
    if not isinstance(message, str) or not message.strip():
        return None
    return message.strip().splitlines()[0][:COMMIT_MESSAGE_MAX]


@dataclass(frozen=True, slots=True)
class _Created:
    id: UUID
    name: str


async def _deploy(
    db: Executor,
    *,
    settings: AdminSettings,
    repository: str,
    targets: list[github.DeployTarget],
    sha: str,
    message: str | None,
) -> list[_Created]:
    """A pending production deployment of ``sha`` for each target; all or none (the caller
    holds a transaction)."""
    org, _, repo = repository.lower().partition("/")
    planned = []
    for target in targets:
        if target.environment_id is None:
            raise _CannotDeploy(f"project {target.org}/{target.name} has no production environment")
        image = render_image(
            target.image_template or settings.image_template,
            {"org": org, "repo": repo, "sha": sha},
        )
        if not image.strip():
            raise _CannotDeploy(f"the image template of {target.org}/{target.name} is empty")
        planned.append((target, target.environment_id, image))
    created = []
    for target, environment_id, image in planned:
        deployment = await deployments.create(
            db,
            project_id=target.project_id,
            environment_id=environment_id,
            image=image,
            commit_sha=sha,
            commit_message=message,
            instances_per_region=target.instances_per_region or 1,
            env={str(k): str(v) for k, v in (target.env or {}).items()},
        )
        created.append(_Created(deployment.id, f"{target.name}-{deployment.nanoid}-{target.org}"))
    return created


# -- the receiver -------------------------------------------------------------------------


@dataclass(slots=True)
class _Outcome:
    status: github.DeliveryStatus
    reason: str | None = None
    deployments: list[str] = field(default_factory=list)


class _Duplicate(Exception):
    """The delivery id was recorded before."""


def _deny(request: Request, reason: str) -> NoReturn:
    log.warning(
        "github: 401 unauthorized: %s %s from %s: %s",
        request.method,
        request.raw_path,
        request.client,
        reason,
    )
    raise ApiError(401, "unauthorized", "the delivery's signature does not verify")


def _signature(secret: bytes, body: bytes) -> bytes:
    return b"sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest().encode()


def _header(request: Request, name: str, pattern: re.Pattern[str]) -> str:
    value = request.headers.get(name.lower(), "").strip()
    if not value:
        raise ApiError(400, "missing_header", f"the {name} header is required", field=name)
    if not pattern.fullmatch(value):
        raise ApiError(400, "invalid_header", f"the {name} header is malformed", field=name)
    return value


def _payload(request: Request) -> tuple[dict[str, Any], str]:
    """The JSON payload and its repository's full name (lower case)."""
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media not in ("application/json", ""):
        raise ApiError(
            400,
            "invalid_body",
            f"the payload must be application/json, not {media} (the webhook's content type"
            " on GitHub)",
        )
    try:
        payload = json.loads(request.body)
    except (ValueError, RecursionError):
        raise ApiError(400, "invalid_json", "the payload is not valid JSON") from None
    repository = payload.get("repository") if isinstance(payload, dict) else None
    full_name = repository.get("full_name") if isinstance(repository, dict) else None
    if not isinstance(full_name, str) or not _REPOSITORY.fullmatch(full_name.lower()):
        raise ApiError(
            400, "invalid_body", "the payload has no repository.full_name", field="repository"
        )
    assert isinstance(payload, dict)
    return payload, full_name.lower()


async def _push(
    db: Executor, settings: AdminSettings, repository: str, payload: dict[str, Any]
) -> _Outcome:
    ref = payload.get("ref")
    if not isinstance(ref, str) or not ref.startswith(BRANCH_PREFIX):
        return _Outcome("ignored", f"ref {ref!r} is not a branch")
    branch = ref.removeprefix(BRANCH_PREFIX)
    after = payload.get("after")
    if payload.get("deleted") is True or (isinstance(after, str) and after.strip("0") == ""):
        return _Outcome("ignored", f"branch {branch} was deleted")
    if not isinstance(after, str) or not _SHA.fullmatch(after):
        return _Outcome("ignored", f"the push of {branch} names no commit")
    targets = [
        t
        for t in await github.deploy_targets(db, repository)
        if t.branch == branch and t.auto_deploy
    ]
    if not targets:
        return _Outcome("ignored", f"no project deploys {repository} branch {branch} automatically")
    head = payload.get("head_commit")
    message = _first_line(head.get("message") if isinstance(head, dict) else None)
    created = await _deploy(
        db, settings=settings, repository=repository, targets=targets, sha=after, message=message
    )
    return _Outcome("processed", deployments=[c.name for c in created])


async def _handle(
    db: Executor,
    settings: AdminSettings,
    webhook: github.Webhook,
    event: str,
    payload: dict[str, Any],
) -> _Outcome:
    # GitHub pings every new webhook, whatever its events.
    if event == "ping":
        return _Outcome("processed")
    if event not in webhook.events:
        return _Outcome("ignored", f"the webhook is not subscribed to {event} events")
    if event != "push":
        return _Outcome("ignored", f"{event} events do not deploy")
    return await _push(db, settings, webhook.repository, payload)


@api.route(
    "POST",
    EVENTS_URL,
    auth="none",
    summary="GitHub's deliveries (signed with the webhook's secret: X-Hub-Signature-256)",
    tag="github",
    response=EventAnswer,
    status=202,
    errors=(401,),
    # A repeated delivery: answered, nothing done.
    answers=((200, EventAnswer),),
    headers=(
        ("X-Hub-Signature-256", True, "sha256=<HMAC-SHA256 of the body with the secret>"),
        ("X-GitHub-Event", True, "the event's name (push, ping ...)"),
        ("X-GitHub-Delivery", True, "the delivery's id; a repeated one is ignored"),
    ),
    # Read raw: the signature covers the bytes as sent.
    raw_body={
        "type": "object",
        "required": ["repository"],
        "properties": {
            "repository": {
                "type": "object",
                "required": ["full_name"],
                "properties": {"full_name": {"type": "string"}},
            },
            "ref": {"type": "string"},
            "after": {"type": "string"},
        },
    },
)
async def receive_event(call: Call) -> Reply | EventAnswer:
    request = call.request
    # An unsigned request is refused before anything else is looked at.
    signature = request.headers.get("x-hub-signature-256", "").strip().lower()
    if not signature:
        _deny(request, "no X-Hub-Signature-256 header")
    event = _header(request, "X-GitHub-Event", _EVENT_NAME)
    delivery_id = _header(request, "X-GitHub-Delivery", _DELIVERY_ID)
    payload, repository = _payload(request)
    pool = call.ctx.pool
    try:
        webhook = await github.get_webhook_for(pool, repository)
    except NotFound:
        hmac.compare_digest(_signature(_DECOY_SECRET, request.body), signature.encode())
        _deny(request, f"repository {repository} has no webhook")
    if not hmac.compare_digest(
        _signature(webhook.secret.encode(), request.body), signature.encode()
    ):
        _deny(request, f"wrong signature for repository {repository}")

    try:
        async with pool.acquire() as conn, conn.transaction():
            try:
                await github.record_delivery(
                    conn, webhook.id, delivery_id=delivery_id, event=event, payload=payload
                )
            except Conflict:
                raise _Duplicate from None
            outcome = await _handle(conn, call.ctx.settings, webhook, event, payload)
            await github.set_delivery_status(
                conn, delivery_id, outcome.status, error=outcome.reason
            )
    except _Duplicate:
        return Reply(EventAnswer(status="duplicate"), status=200)
    except (_CannotDeploy, Conflict, Invalid, NotFound) as exc:
        outcome = _Outcome("failed", str(exc))
        log.warning("github: delivery %s of %s failed: %s", delivery_id, repository, exc)
        try:
            async with pool.acquire() as conn, conn.transaction():
                await github.record_delivery(
                    conn, webhook.id, delivery_id=delivery_id, event=event, payload=payload
                )
                await github.set_delivery_status(conn, delivery_id, "failed", error=outcome.reason)
        except Conflict:
            return Reply(EventAnswer(status="duplicate"), status=200)
        except NotFound:
            _deny(request, f"the webhook of {repository} was removed meanwhile")
    return EventAnswer(
        status=outcome.status, deployments=outcome.deployments, reason=outcome.reason
    )


# -- manual trigger -----------------------------------------------------------------------


@api.route(
    "POST",
    "/api/v1/github/trigger",
    auth="admin",
    summary="Deploy now what a push of the ref would deploy (regardless of auto_deploy)",
    tag="github",
    body=TriggerIn,
    response=DeploymentList,
    status=201,
    errors=(404, 409),
)
async def trigger(call: Call) -> list[DeploymentOut]:
    body: TriggerIn = call.body
    pool = call.ctx.pool
    repository = f"{body.org}/{body.repo}".lower()
    targets = await github.deploy_targets(pool, repository)
    if not targets:
        raise not_found(f"a project built from repository {repository}")
    ref = body.ref
    sha = body.sha.lower() if body.sha else None
    if _SHA.fullmatch(ref.lower()):
        # A commit is on no particular branch: every project of the repository gets it.
        sha = sha or ref.lower()
    else:
        if ref.startswith("refs/") and not ref.startswith(BRANCH_PREFIX):
            # A tag or another ref: no project deploys one.
            raise ApiError(
                409,
                "conflict",
                f"{ref} is not a branch (refs/heads/<name>) or a commit sha",
                field="ref",
            )
        branch = ref.removeprefix(BRANCH_PREFIX)
        ref = BRANCH_PREFIX + branch
        branches = sorted({t.branch for t in targets})
        targets = [t for t in targets if t.branch == branch]
        if not targets:
            raise ApiError(
                409,
                "conflict",
                f"no project of {repository} deploys branch {branch} (their branches:"
                f" {', '.join(branches)})",
                field="ref",
            )
    message = None
    if sha is None:
        pushed = await github.last_pushed_commit(pool, repository, ref)
        if pushed is None:
            raise ApiError(409, "conflict", f"no known commit for {ref}; give sha", field="sha")
        sha, message = pushed.sha, _first_line(pushed.message)
    try:
        async with pool.acquire() as conn, conn.transaction():
            created = await _deploy(
                conn,
                settings=call.ctx.settings,
                repository=repository,
                targets=targets,
                sha=sha,
                message=message,
            )
    except _CannotDeploy as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    apps_domain = call.ctx.settings.apps_domain
    return [deployment_out(await deployments.get_view(pool, c.id), apps_domain) for c in created]
