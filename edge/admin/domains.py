"""``/api/v1/projects/{org}/{name}/domains``: customers' own domains and their verification.

A domain is added to one environment of a project (production unless said otherwise) and
routes to that environment's current deployment once verified. Verification is proved in
DNS, either by a CNAME to the edge host or by the domain's token in the TXT record
``_zeitwork.<domain>``; ``POST .../verify`` looks both up now and records the result. A
failed look-up is an answer (``verified: false`` with the reason), not an error of the API.
Once verified, a domain stays verified: a later failed check (this endpoint, or the
leader's periodic one in :mod:`edge.domain_checks`) only updates ``pointing_at_edge``,
``dns_ok`` and ``last_checked_at``; ``dns_ok: false`` flags a domain whose DNS moved away.
A verified domain gets its certificate from the leader's ACME loop (:mod:`edge.acme`);
``certificate`` in the answer says where that stands, failures and their backoff included.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import Field, field_validator

from edge import dns
from edge.admin.api import Api, ApiError, Call, Out, Page, Strict, not_found
from edge.admin.views import project_of
from edge.store import domains, environments, projects
from edge.store.errors import Conflict, NotFound

api = Api()

ENVIRONMENT = r"^[a-z0-9][a-z0-9-]{0,31}$"
_LABEL = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def host_name_error(name: str) -> str | None:
    """Why ``name`` (normalized) is not a host name a customer can point at us, or None."""
    if not name or len(name) > 253:
        return "must be a host name of 1 to 253 characters"
    labels = name.split(".")
    if len(labels) < 2:
        return "must have at least two labels (app.example.com)"
    for label in labels:
        if not _LABEL.fullmatch(label):
            return (
                f"label {label!r} must be 1 to 63 letters, digits or hyphens, not starting or"
                " ending with a hyphen"
            )
    if not labels[-1][0].isalpha():
        return "must end in a top-level domain that starts with a letter (not an IP address)"
    return None


def _under(name: str, parent: str) -> bool:
    parent = dns.normalize(parent)
    return bool(parent) and (name == parent or name.endswith("." + parent))


# Labels of letters, digits and hyphens (not at either end), at least two, the last
# starting with a letter (so not an IP address); an optional trailing dot.
HOST_NAME = (
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$"
)


class DomainIn(Strict):
    domain: str = Field(
        min_length=3,
        max_length=253,
        description="e.g. app.customer.org; stored in lower case without a trailing dot",
        # In the schema only: the validator's messages say what is wrong.
        json_schema_extra={"pattern": HOST_NAME},
    )
    environment: str = Field(default="production", pattern=ENVIRONMENT)

    @field_validator("domain")
    @classmethod
    def _host_name(cls, value: str) -> str:
        name = dns.normalize(value)
        if not re.fullmatch(HOST_NAME, value):
            raise ValueError(host_name_error(name) or "must be a host name (app.example.com)")
        return name


class DnsRecord(Out):
    type: Literal["CNAME", "TXT"]
    name: str
    value: str


class Verification(Out):
    """The DNS records that verify the domain: either one is enough."""

    cname: DnsRecord = Field(description="the domain as a CNAME of the edge host")
    txt: DnsRecord = Field(description="for an apex domain, or one behind another proxy")


class CertificateOut(Out):
    """The domain's TLS certificate, ordered with ACME by the leader once it is verified."""

    status: Literal["none", "pending", "issued", "failed"] = Field(
        description="issued: a valid certificate is served; pending: verified, waiting for"
        " its first certificate; failed: the last order failed and no valid certificate is"
        " left; none: not verified, so no certificate is ordered"
    )
    not_before: datetime | None
    not_after: datetime | None
    issuer: str | None
    failures: int = Field(description="failed orders in a row (0 after a success)")
    last_error: str | None = Field(description="why the last order failed, while failing")
    last_attempt_at: datetime | None
    next_attempt_at: datetime | None = Field(
        description="after a failure, the end of its backoff; after a success, when the"
        " renewal is due"
    )


class DomainOut(Out):
    id: UUID
    domain: str
    org: str
    project: str
    environment: str
    state: Literal["pending", "verified"]
    verification_token: str
    verification: Verification
    verified_at: datetime | None
    last_checked_at: datetime | None
    pointing_at_edge: bool | None = Field(
        description="whether the last check found the CNAME to the edge host (null: never checked)"
    )
    dns_ok: bool | None = Field(
        description="whether the last check still found the CNAME or the TXT token; false: the "
        "domain's DNS no longer leads to the edge (the leader checks verified domains again "
        "every hour; null: not checked yet)"
    )
    certificate: CertificateOut
    created_at: datetime


class DnsFound(Out):
    """What the look-ups of a check found."""

    cname: str | None = Field(description="the domain's CNAME target, if it has one")
    cname_error: str | None = Field(description="why no CNAME was found (NXDOMAIN, NODATA ...)")
    txt_name: str
    txt_found: bool = Field(description="whether the TXT record holds the verification token")
    txt_error: str | None
    verified: bool = Field(description="whether this check verified the domain")
    verified_by: Literal["cname", "txt"] | None


class DomainCheckOut(DomainOut):
    dns: DnsFound


def domain_out(
    view: domains.DomainView, project: projects.Project, edge_host: str
) -> dict[str, object]:
    d = view.domain
    c = view.certificate
    return {
        "id": d.id,
        "domain": d.name,
        "org": project.org,
        "project": project.name,
        "environment": view.environment,
        "state": "verified" if d.verified_at is not None else "pending",
        "verification_token": d.verification_token,
        "verification": {
            "cname": {"type": "CNAME", "name": d.name, "value": dns.normalize(edge_host)},
            "txt": {"type": "TXT", "name": dns.txt_name(d.name), "value": d.verification_token},
        },
        "verified_at": d.verified_at,
        "last_checked_at": d.last_checked_at,
        "pointing_at_edge": d.pointing_at_edge,
        "dns_ok": d.last_check_ok,
        "certificate": {
            "status": c.status,
            "not_before": c.not_before,
            "not_after": c.not_after,
            "issuer": c.issuer,
            "failures": c.failures,
            "last_error": c.last_error,
            "last_attempt_at": c.last_attempt_at,
            "next_attempt_at": c.next_attempt_at,
        },
        "created_at": d.created_at,
    }


async def _domain_of(call: Call, project: projects.Project) -> domains.DomainView:
    """The path's ``{domain}`` of the project, or 404."""
    name = dns.normalize(call.params["domain"])
    if host_name_error(name) is None:
        try:
            return await domains.get_view(call.ctx.pool, project.id, name)
        except NotFound:
            pass
    raise not_found(f"domain {call.params['domain']!r} of project {project.org}/{project.name}")


@api.route(
    "GET",
    "/api/v1/projects/{org}/{name}/domains",
    auth="admin",
    summary="List a project's custom domains",
    tag="domains",
    response=DomainOut,
    many=True,
    errors=(404,),
)
async def list_domains(call: Call) -> Page:
    project = await project_of(call)
    found, total = await domains.list_views(
        call.ctx.pool, project.id, limit=call.page.limit, offset=call.page.offset
    )
    edge_host = call.ctx.settings.edge_host
    return Page([domain_out(view, project, edge_host) for view in found], total)


@api.route(
    "POST",
    "/api/v1/projects/{org}/{name}/domains",
    auth="admin",
    summary="Add a custom domain; the answer says which DNS records verify it",
    tag="domains",
    body=DomainIn,
    response=DomainOut,
    status=201,
    errors=(404, 409),
)
async def add_domain(call: Call) -> dict[str, object]:
    body: DomainIn = call.body
    settings = call.ctx.settings
    for parent, what in ((settings.apps_domain, "apps domain"), (settings.edge_host, "edge host")):
        if _under(body.domain, parent):
            raise ApiError(
                400,
                "invalid_value",
                f"domain: {body.domain} is under the platform's {what} {parent}",
                field="domain",
            )
    project = await project_of(call)
    pool = call.ctx.pool
    try:
        environment = await environments.get_by_name(pool, project.id, body.environment)
    except NotFound:
        raise not_found(
            f"environment {body.environment!r} of project {project.org}/{project.name}"
        ) from None
    try:
        domain = await domains.create(
            pool, body.domain, project_id=project.id, environment_id=environment.id
        )
    except Conflict:
        raise ApiError(
            409, "conflict", f"domain {body.domain} is already in use by a project", field="domain"
        ) from None
    except NotFound:
        # The environment went away meanwhile.
        raise not_found(
            f"environment {body.environment!r} of project {project.org}/{project.name}"
        ) from None
    return domain_out(domains.DomainView(domain, environment.name), project, settings.edge_host)


@api.route(
    "DELETE",
    "/api/v1/projects/{org}/{name}/domains/{domain}",
    auth="admin",
    summary="Remove a custom domain",
    tag="domains",
    errors=(404,),
)
async def delete_domain(call: Call) -> None:
    project = await project_of(call)
    view = await _domain_of(call, project)
    try:
        await domains.delete(call.ctx.pool, view.domain.id)
    except NotFound:
        raise not_found(f"domain {view.domain.name!r}") from None


@api.route(
    "POST",
    "/api/v1/projects/{org}/{name}/domains/{domain}/verify",
    auth="admin",
    summary="Check the domain's DNS now (CNAME to the edge host, or the TXT token)",
    tag="domains",
    response=DomainCheckOut,
    errors=(404,),
)
async def verify_domain(call: Call) -> DomainCheckOut:
    project = await project_of(call)
    view = await _domain_of(call, project)
    settings = call.ctx.settings
    name = view.domain.name
    check = await dns.check_domain(
        name,
        view.domain.verification_token,
        settings.edge_host,
        nameservers=settings.nameservers,
    )
    try:
        await domains.record_check(
            call.ctx.pool, view.domain.id, verified=check.verified, pointing=check.pointing
        )
        # Read again: verification changes the certificate's status too.
        recorded = await domains.get_view(call.ctx.pool, project.id, name)
    except NotFound:
        # Deleted while DNS was being asked.
        raise not_found(f"domain {name!r}") from None
    found = DnsFound(
        cname=check.cname,
        cname_error=check.cname_error,
        txt_name=dns.txt_name(name),
        txt_found=check.txt_found,
        txt_error=check.txt_error,
        verified=check.verified,
        verified_by=check.verified_by,
    )
    values = domain_out(recorded, project, settings.edge_host)
    return DomainCheckOut.model_validate({**values, "dns": found})
