"""Custom domains: adding, listing and removing them, and verification against a real DNS
server on loopback (dnslib, run by the test) through c-ares."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

# dnslib has no type information.
from dnslib import CNAME, QTYPE, RCODE, RR, TXT, A  # type: ignore[import-untyped, unused-ignore]
from dnslib.server import (  # type: ignore[import-untyped, unused-ignore]
    BaseResolver,
    DNSLogger,
    DNSServer,
)

from edge import dns
from edge.store import environments, projects
from tests.admin.conftest import NO_TOKEN, AdminClient, error_of

EDGE = "edge.zeitwork.com"


class Zone(BaseResolver):  # type: ignore[misc, unused-ignore]
    """Answers from the records a test sets; a name without any is NXDOMAIN."""

    def __init__(self) -> None:
        self.cnames: dict[str, str] = {}
        self.txts: dict[str, list[str]] = {}
        self.addresses: dict[str, str] = {}

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        qtype = request.q.qtype
        if name in self.cnames:
            reply.add_answer(RR(request.q.qname, QTYPE.CNAME, rdata=CNAME(self.cnames[name])))
        elif name in self.txts or name in self.addresses:
            if qtype == QTYPE.TXT and name in self.txts:
                for text in self.txts[name]:
                    reply.add_answer(RR(request.q.qname, QTYPE.TXT, rdata=TXT(text)))
            if qtype == QTYPE.A and name in self.addresses:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(self.addresses[name])))
        else:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply


@contextlib.contextmanager
def dns_zone() -> Iterator[tuple[Zone, int]]:
    """A DNS server on loopback (UDP and TCP on one free port) answering from a Zone."""
    resolver = Zone()
    server = DNSServer(resolver, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda _: None))
    server.start_thread()
    try:
        yield resolver, int(server.server.server_address[1])
    finally:
        server.stop()
        server.server.server_close()
        server.thread.join()


@pytest.fixture
def zone() -> Iterator[tuple[Zone, int]]:
    with dns_zone() as found:
        yield found


@pytest.fixture
def dns_admin(admin: AdminClient, zone: tuple[Zone, int]) -> AdminClient:
    """The admin API verifying domains with the test's DNS server."""
    admin.server.ctx.settings = dataclasses.replace(
        admin.ctx.settings, nameservers=(f"127.0.0.1:{zone[1]}",)
    )
    return admin


async def make_project(pool: Any, org: str = "acme", name: str = "web") -> projects.Project:
    project = await projects.create(pool, org, name)
    for env in ("production", "staging"):
        await environments.create(pool, project.id, env)
    return project


BASE = "/api/v1/projects/acme/web/domains"


@pytest.mark.asyncio
async def test_add_list_and_delete_domains(admin: AdminClient) -> None:
    await make_project(admin.pool)
    await make_project(admin.pool, "other", "site")

    added = await admin.ok("POST", BASE, {"domain": "App.Customer.ORG."}, 201)
    assert added["domain"] == "app.customer.org"
    assert (added["org"], added["project"], added["environment"]) == ("acme", "web", "production")
    assert added["state"] == "pending"
    assert added["verified_at"] is None and added["last_checked_at"] is None
    assert added["pointing_at_edge"] is None
    # Not verified: no certificate is ordered.
    assert added["certificate"] == {
        "status": "none",
        "not_before": None,
        "not_after": None,
        "issuer": None,
        "failures": 0,
        "last_error": None,
        "last_attempt_at": None,
        "next_attempt_at": None,
    }
    token = added["verification_token"]
    assert len(token) >= 24
    assert added["verification"] == {
        "cname": {"type": "CNAME", "name": "app.customer.org", "value": EDGE},
        "txt": {"type": "TXT", "name": "_zeitwork.app.customer.org", "value": token},
    }
    staging = await admin.ok(
        "POST", BASE, {"domain": "beta.customer.org", "environment": "staging"}, 201
    )
    assert staging["environment"] == "staging"

    listed = await admin.call("GET", BASE)
    assert listed.status == 200 and listed.header("x-total-count") == "2"
    assert [d["domain"] for d in listed.json()] == ["app.customer.org", "beta.customer.org"]
    page = await admin.call("GET", BASE + "?per_page=1&page=2")
    assert [d["domain"] for d in page.json()] == ["beta.customer.org"]
    assert page.header("x-total-count") == "2"
    assert await admin.ok("GET", "/api/v1/projects/other/site/domains") == []

    # Any project having it already is a conflict, whatever the case.
    taken = await admin.call(
        "POST", "/api/v1/projects/other/site/domains", {"domain": "APP.customer.org"}
    )
    assert taken.status == 409 and error_of(taken)["field"] == "domain"

    # Another project's domain is not this one's to remove.
    foreign = await admin.call("DELETE", "/api/v1/projects/other/site/domains/app.customer.org")
    assert foreign.status == 404
    gone = await admin.call("DELETE", BASE + "/APP.customer.org")
    assert gone.status == 204
    assert (await admin.call("DELETE", BASE + "/app.customer.org")).status == 404
    assert [d["domain"] for d in await admin.ok("GET", BASE)] == ["beta.customer.org"]
    # Removed, the name is free for another project.
    await admin.ok(
        "POST", "/api/v1/projects/other/site/domains", {"domain": "app.customer.org"}, 201
    )


@pytest.mark.asyncio
async def test_domain_errors(admin: AdminClient) -> None:
    await make_project(admin.pool)
    missing = await admin.call("POST", "/api/v1/projects/acme/nope/domains", {"domain": "a.b.org"})
    assert missing.status == 404
    assert (await admin.call("GET", "/api/v1/projects/acme/nope/domains")).status == 404
    no_env = await admin.call("POST", BASE, {"domain": "a.b.org", "environment": "preview"})
    assert no_env.status == 404 and "preview" in error_of(no_env)["message"]
    for bad in (
        "localhost",
        "x.zeitwork.test",  # the apps domain of the test settings
        "zeitwork.test",
        "edge.zeitwork.com",
        "a_b.example.org",
        "-a.example.org",
        "a-.example.org",
        "a..example.org",
        "1.2.3.4",
        ("a" * 64) + ".example.org",
        ".".join(["abcdefghi"] * 26) + ".org",  # over 253
        "",
        "app.exa mple.org",
        "app.example.org\n",
        " app.example.org",
        "app.example.123",
    ):
        response = await admin.call("POST", BASE, {"domain": bad})
        assert response.status == 400, bad
        assert error_of(response)["field"] == "domain", bad
    assert (await admin.call("POST", BASE, {"domain": 5})).status == 400
    bad_env = await admin.call("POST", BASE, {"domain": "a.b.org", "environment": "Prod"})
    assert bad_env.status == 400 and error_of(bad_env)["field"] == "environment"
    extra = await admin.call("POST", BASE, {"domain": "a.b.org", "zone": "x"})
    assert extra.status == 400 and error_of(extra)["field"] == "zone"
    missing_field = await admin.call("POST", BASE, {})
    assert missing_field.status == 400 and error_of(missing_field)["field"] == "domain"
    for method, path in (
        ("GET", BASE),
        ("POST", BASE),
        ("DELETE", BASE + "/a.b.org"),
        ("POST", BASE + "/a.b.org/verify"),
    ):
        assert (await admin.call(method, path, token=NO_TOKEN)).status == 401
    assert (await admin.call("POST", BASE + "/a.b.org/verify")).status == 404
    assert (await admin.call("POST", BASE + "/not%20a%20host/verify")).status == 404
    assert (await admin.call("DELETE", BASE + "/x")).status == 404
    assert await admin.ok("GET", BASE) == []


@pytest.mark.asyncio
async def test_verify_by_cname(dns_admin: AdminClient, zone: tuple[Zone, int]) -> None:
    admin, records = dns_admin, zone[0]
    await make_project(admin.pool)
    await admin.ok("POST", BASE, {"domain": "app.customer.org"}, 201)
    # Trailing dot and case do not matter.
    records.cnames["app.customer.org"] = "EDGE.Zeitwork.com."
    checked = await admin.ok("POST", BASE + "/app.customer.org/verify")
    assert checked["state"] == "verified" and checked["pointing_at_edge"] is True
    assert checked["verified_at"] is not None and checked["last_checked_at"] is not None
    # Verified: waiting for the leader's ACME loop to order its certificate.
    assert checked["certificate"]["status"] == "pending"
    assert checked["dns"]["cname"] == EDGE and checked["dns"]["cname_error"] is None
    assert checked["dns"]["verified"] is True and checked["dns"]["verified_by"] == "cname"
    assert checked["dns"]["txt_name"] == "_zeitwork.app.customer.org"
    assert checked["dns"]["txt_found"] is False
    row = await admin.pool.fetchrow(
        "SELECT verified_at, pointing_at_edge FROM domains WHERE name = 'app.customer.org'"
    )
    assert row["verified_at"] is not None and row["pointing_at_edge"] is True
    [listed] = await admin.ok("GET", BASE)
    assert listed["state"] == "verified" and listed["certificate"]["status"] == "pending"

    # Moved away: still verified (verification is not revoked), no longer pointing.
    records.cnames["app.customer.org"] = "elsewhere.example.net"
    again = await admin.ok("POST", BASE + "/app.customer.org/verify")
    assert again["state"] == "verified" and again["verified_at"] == checked["verified_at"]
    assert again["pointing_at_edge"] is False
    assert again["dns"]["cname"] == "elsewhere.example.net"
    assert again["dns"]["verified"] is False and again["dns"]["verified_by"] is None


@pytest.mark.asyncio
async def test_verify_by_txt(dns_admin: AdminClient, zone: tuple[Zone, int]) -> None:
    admin, records = dns_admin, zone[0]
    await make_project(admin.pool)
    added = await admin.ok("POST", BASE, {"domain": "customer.org"}, 201)
    records.addresses["customer.org"] = "203.0.113.7"
    records.txts["_zeitwork.customer.org"] = ["someone-else's-token"]
    wrong = await admin.ok("POST", BASE + "/customer.org/verify")
    assert wrong["state"] == "pending" and wrong["dns"]["verified"] is False
    assert wrong["dns"]["txt_found"] is False and wrong["dns"]["txt_error"] is None
    assert wrong["dns"]["cname"] is None and wrong["dns"]["cname_error"] == "NODATA"
    assert wrong["last_checked_at"] is not None and wrong["pointing_at_edge"] is False

    records.txts["_zeitwork.customer.org"] = ["v=spf1 -all", added["verification_token"]]
    right = await admin.ok("POST", BASE + "/customer.org/verify")
    assert right["state"] == "verified" and right["verified_at"] is not None
    assert right["dns"]["txt_found"] is True and right["dns"]["verified_by"] == "txt"
    # Verified through TXT only: the domain does not point at the edge.
    assert right["pointing_at_edge"] is False


@pytest.mark.asyncio
async def test_verify_nxdomain_is_an_answer(dns_admin: AdminClient) -> None:
    admin = dns_admin
    await make_project(admin.pool)
    await admin.ok("POST", BASE, {"domain": "typo.customer.org"}, 201)
    checked = await admin.ok("POST", BASE + "/typo.customer.org/verify")
    assert checked["state"] == "pending" and checked["verified_at"] is None
    assert checked["last_checked_at"] is not None and checked["pointing_at_edge"] is False
    assert checked["dns"] == {
        "cname": None,
        "cname_error": "NXDOMAIN",
        "txt_name": "_zeitwork.typo.customer.org",
        "txt_found": False,
        "txt_error": "NXDOMAIN",
        "verified": False,
        "verified_by": None,
    }


@pytest.mark.asyncio
async def test_verify_with_a_dead_nameserver_is_an_answer(admin: AdminClient) -> None:
    # A UDP port nobody listens on: the nameserver refuses (ICMP), no 5xx.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    admin.server.ctx.settings = dataclasses.replace(
        admin.ctx.settings, nameservers=(f"127.0.0.1:{port}",)
    )
    await make_project(admin.pool)
    await admin.ok("POST", BASE, {"domain": "app.customer.org"}, 201)
    checked = await admin.ok("POST", BASE + "/app.customer.org/verify")
    assert checked["dns"]["verified"] is False and checked["state"] == "pending"
    assert checked["dns"]["cname_error"] and checked["dns"]["txt_error"]


@pytest.mark.asyncio
async def test_lookups_are_bounded_by_a_timeout() -> None:
    # A nameserver that reads queries and never answers.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        started = time.monotonic()
        cname, txt = await dns.lookup(
            [("app.customer.org", "CNAME"), ("_zeitwork.app.customer.org", "TXT")],
            nameservers=[f"127.0.0.1:{port}"],
            seconds=0.4,
        )
        elapsed = time.monotonic() - started
    assert cname.error == "timeout" and txt.error == "timeout"
    assert cname.values == () and txt.values == ()
    assert elapsed < 2.0


@pytest.mark.asyncio
async def test_unusable_nameserver_setting_is_an_answer() -> None:
    [found] = await dns.lookup([("a.example.org", "CNAME")], nameservers=["not an address"])
    assert found.error is not None and "unusable" in found.error
