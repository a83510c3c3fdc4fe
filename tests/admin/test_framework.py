"""The admin API's framework through real requests: dispatch, validation, pagination, error
mapping, answers through their models, the audit log.

Most tests go through the regions and nodes routes (the first ones that exist); the
behaviours no real route shows on demand (a nested body, a handler that fails, a raw
database error) are served by a small API of the test's own on the same context.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote
from uuid import uuid4

import pytest
import pytest_asyncio
from pydantic import Field

from edge.admin.api import Api, ApiError, Call, Out, Page, QueryModel, Reply, Strict
from edge.admin.app import AdminContext, AdminServer, AdminSettings
from edge.admin.auth import Authenticator
from edge.store import audit
from edge.store.db import create_pool
from tests.admin.conftest import ADMIN_TOKEN, BOOTSTRAP_TOKEN, AdminClient, error_of
from tests.harness import HOST, Response, connected, free_port

REGIONS = "/api/v1/regions"
NODES = "/api/v1/nodes"


def region(code: Any = "us-east", **changes: Any) -> dict[str, Any]:
    return {"code": code, "name": f"Region {code}", "country": "Testland", **changes}


def node(hostname: str = "w1", **changes: Any) -> dict[str, Any]:
    base = {"hostname": hostname, "region": "us-east", "address": "10.0.0.1"}
    return {**base, "vcpu": 4, "memory": 8192, **changes}


async def rejected(
    admin: AdminClient, method: str, path: str, body: Any = None, **kwargs: Any
) -> dict[str, Any]:
    """The error of a request that must be refused with 400."""
    response = await admin.call(method, path, body, **kwargs)
    assert response.status == 400, (response.status, response.body)
    return error_of(response)


def parsed(response: Response) -> Any:
    return json.loads(response.body)


async def head(port: int, path: str) -> Response:
    async with connected(port) as client:
        raw = f"HEAD {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\r\n"
        await client.send(raw.encode())
        return await client.read_response(head_request=True)


# -- dispatch ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_unknown_path_is_404(admin: AdminClient) -> None:
    for path in ("/api/v1/nothing", "/api/v1/regions/", "/api/v2/regions", "/"):
        response = await admin.call("GET", path)
        assert response.status == 404, path
        assert error_of(response)["code"] == "not_found"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", REGIONS, "GET, HEAD, POST"),
        ("DELETE", REGIONS, "GET, HEAD, POST"),
        ("PATCH", f"{NODES}/{uuid4()}", "DELETE, GET, HEAD"),
        ("GET", f"{NODES}/{uuid4()}/drain", "POST"),
        ("HEAD", f"{NODES}/{uuid4()}/drain", "POST"),
        ("OPTIONS", REGIONS, "GET, HEAD, POST"),
    ],
)
async def test_wrong_method_is_405_with_allow(
    admin: AdminClient, method: str, path: str, allow: str
) -> None:
    if method == "HEAD":
        response = await head(admin.port, path)
        assert response.body == b""
    else:
        response = await admin.call(method, path)
        assert error_of(response)["code"] == "method_not_allowed"
    assert response.status == 405
    assert response.header("allow") == allow


@pytest.mark.asyncio
async def test_head_runs_the_get_route_without_a_body(admin: AdminClient) -> None:
    await admin.ok("POST", REGIONS, region(), 201)
    got = await admin.call("GET", REGIONS)
    answer = await head(admin.port, REGIONS)
    assert answer.status == 200 and answer.body == b""
    assert answer.header("content-length") == str(len(got.body))
    assert answer.header("x-total-count") == "1"


# -- validation ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_unknown_field_is_named(admin: AdminClient) -> None:
    error = await rejected(admin, "POST", REGIONS, region(colour="blue"))
    assert (error["code"], error["field"]) == ("unknown_field", "colour")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        (REGIONS, region(code=7), "code"),
        (REGIONS, region(name=["x"]), "name"),
        (NODES, node(vcpu="4"), "vcpu"),  # no coercion from text
        (NODES, node(memory=8192.5), "memory"),
        (NODES, node(vcpu=True), "vcpu"),
    ],
)
async def test_wrong_type_is_named(
    admin: AdminClient, path: str, body: dict[str, Any], field: str
) -> None:
    error = await rejected(admin, "POST", path, body)
    assert (error["code"], error["field"]) == ("wrong_type", field)
    assert field in error["message"]


@pytest.mark.asyncio
async def test_missing_field_is_named(admin: AdminClient) -> None:
    body = region()
    del body["country"]
    error = await rejected(admin, "POST", REGIONS, body)
    assert (error["code"], error["field"]) == ("missing_field", "country")
    error = await rejected(admin, "POST", NODES, {k: v for k, v in node().items() if k != "vcpu"})
    assert (error["code"], error["field"]) == ("missing_field", "vcpu")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "field"),
    [
        (node(vcpu=0), "vcpu"),
        (node(vcpu=5000), "vcpu"),
        (node(hostname="-bad-"), "hostname"),
        (node(region=""), "region"),
    ],
)
async def test_value_out_of_range_is_named(
    admin: AdminClient, body: dict[str, Any], field: str
) -> None:
    error = await rejected(admin, "POST", NODES, body)
    assert (error["code"], error["field"]) == ("invalid_value", field)


@pytest.mark.asyncio
@pytest.mark.parametrize("raw", [b"{", b"{'code': 1}", b"\xff\xfe", b'{"code": "a",}'], ids=str)
async def test_invalid_json_is_400(admin: AdminClient, raw: bytes) -> None:
    error = await rejected(admin, "POST", REGIONS, raw_body=raw)
    assert error["code"] == "invalid_json"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "number", ["NaN", "Infinity", "-Infinity", "1e400"], ids=["nan", "inf", "-inf", "overflow"]
)
async def test_numbers_json_does_not_have_are_invalid_json(admin: AdminClient, number: str) -> None:
    raw = json.dumps(node()).replace('"vcpu": 4', f'"vcpu": {number}').encode()
    error = await rejected(admin, "POST", NODES, raw_body=raw)
    assert error["code"] == "invalid_json"


@pytest.mark.asyncio
async def test_whole_number_written_with_a_fraction_is_an_integer(admin: AdminClient) -> None:
    # To JSON (and to the document's "type: integer") 8192.0 is 8192.
    await admin.ok("POST", REGIONS, region(), 201)
    created = await admin.ok("POST", NODES, node(vcpu=4.0, memory=8192.0), 201)
    assert created["capacity"] == {"vcpu": 4.0, "memory": 8192}
    # A float field still takes a whole number, written either way.
    for name, vcpu in (("web", 2), ("api", 2.0)):
        project = {"org": "acme", "name": name, "resources": {"vcpu": vcpu, "memory": 512.0}}
        answer = await admin.ok("POST", "/api/v1/projects", project, 201)
        assert answer["resources"] == {"vcpu": 2.0, "memory": 512}


@pytest.mark.asyncio
@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"42", b"null", b"true"])
async def test_body_that_is_not_an_object_is_400(admin: AdminClient, raw: bytes) -> None:
    error = await rejected(admin, "POST", REGIONS, raw_body=raw)
    assert error["code"] == "invalid_body"


@pytest.mark.asyncio
async def test_missing_body_is_400(admin: AdminClient) -> None:
    error = await rejected(admin, "POST", REGIONS)
    assert error["code"] == "missing_body"


@pytest.mark.asyncio
@pytest.mark.parametrize("media", ["text/plain", "application/x-www-form-urlencoded"])
async def test_body_of_another_content_type_is_415(admin: AdminClient, media: str) -> None:
    response = await admin.call(
        "POST", REGIONS, raw_body=json.dumps(region()).encode(), headers={"Content-Type": media}
    )
    assert response.status == 415
    assert error_of(response)["code"] == "unsupported_media_type"
    # curl -d without a Content-Type is the usual cause: the message says the fix.
    assert "-H 'Content-Type: application/json'" in error_of(response)["message"]


@pytest.mark.asyncio
async def test_json_content_type_with_parameters_is_accepted(admin: AdminClient) -> None:
    response = await admin.call(
        "POST",
        REGIONS,
        raw_body=json.dumps(region()).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert response.status == 201


@pytest.mark.asyncio
async def test_unknown_or_repeated_query_parameter_is_400(admin: AdminClient) -> None:
    error = await rejected(admin, "GET", f"{REGIONS}?colour=blue")
    assert (error["code"], error["field"]) == ("invalid_query", "colour")
    error = await rejected(admin, "GET", f"{NODES}?zone=a")  # a route with a query model
    assert (error["code"], error["field"]) == ("unknown_field", "zone")
    error = await rejected(admin, "GET", f"{NODES}?region=a&region=b")
    assert (error["code"], error["field"]) == ("invalid_query", "region")
    error = await rejected(admin, "GET", f"{NODES}?state=sleeping")
    assert (error["code"], error["field"]) == ("invalid_value", "state")
    # page/per_page belong to lists only.
    error = await rejected(admin, "GET", f"{NODES}/{uuid4()}?page=1")
    assert error["field"] == "page"


# -- pagination ------------------------------------------------------------------------------


def links(response: Any) -> dict[str, str]:
    """rel -> URL of a Link header."""
    header = response.header("link") or ""
    return {rel: url for url, rel in re.findall(r'<([^>]*)>; rel="(\w+)"', header)}


@pytest.mark.asyncio
async def test_pages_of_a_list(admin: AdminClient) -> None:
    codes = [f"r{i}" for i in range(5)]
    for code in codes:
        await admin.ok("POST", REGIONS, region(code), 201)

    first = await admin.call("GET", f"{REGIONS}?per_page=2")
    assert first.status == 200 and first.header("x-total-count") == "5"
    assert [r["code"] for r in parsed(first)] == ["r0", "r1"]
    assert links(first) == {
        "next": f"{REGIONS}?page=2&per_page=2",
        "first": f"{REGIONS}?page=1&per_page=2",
        "last": f"{REGIONS}?page=3&per_page=2",
    }
    middle = await admin.call("GET", f"{REGIONS}?per_page=2&page=2")
    assert [r["code"] for r in parsed(middle)] == ["r2", "r3"]
    assert links(middle)["prev"] == f"{REGIONS}?page=1&per_page=2"
    assert links(middle)["next"] == f"{REGIONS}?page=3&per_page=2"
    last = await admin.call("GET", links(middle)["next"])
    assert [r["code"] for r in parsed(last)] == ["r4"]
    assert "next" not in links(last) and links(last)["prev"].startswith(f"{REGIONS}?page=2")
    beyond = await admin.call("GET", f"{REGIONS}?per_page=2&page=9")
    assert beyond.status == 200 and parsed(beyond) == []
    assert beyond.header("x-total-count") == "5"
    assert links(beyond)["prev"] == f"{REGIONS}?page=3&per_page=2"
    # The default page holds them all.
    everything = await admin.call("GET", REGIONS)
    assert len(parsed(everything)) == 5 and "next" not in links(everything)


@pytest.mark.asyncio
async def test_page_links_keep_the_other_query_parameters(admin: AdminClient) -> None:
    await admin.ok("POST", REGIONS, region("us-east"), 201)
    await admin.ok("POST", REGIONS, region("eu-west"), 201)
    for name in ("a", "b", "c"):
        await admin.ok("POST", NODES, node(name), 201)
    await admin.ok("POST", NODES, node("z", region="eu-west"), 201)

    response = await admin.call("GET", f"{NODES}?region=us-east&per_page=1&page=2")
    assert response.header("x-total-count") == "3"
    assert [n["hostname"] for n in parsed(response)] == ["b"]
    assert links(response) == {
        "next": f"{NODES}?region=us-east&page=3&per_page=1",
        "prev": f"{NODES}?region=us-east&page=1&per_page=1",
        "first": f"{NODES}?region=us-east&page=1&per_page=1",
        "last": f"{NODES}?region=us-east&page=3&per_page=1",
    }
    # A listed node is a whole answer of its model (ids and times as JSON text).
    listed = parsed(response)[0]
    assert set(listed) >= {"id", "capacity", "used", "created_at", "last_heartbeat"}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "query",
    [
        "page=0",
        "page=-1",
        "page=abc",
        "page=1.5",
        "page=%C2%B2",  # a digit to str.isdigit(), not to int()
        "page=" + "9" * 5000,
        "page=1000001",
        "per_page=0",
        "per_page=1001",
        "per_page=",
    ],
)
async def test_bad_page_is_400(admin: AdminClient, query: str) -> None:
    error = await rejected(admin, "GET", f"{REGIONS}?{query}")
    assert error["code"] == "invalid_query"
    assert error["field"] == query.partition("=")[0]


# -- errors of the store ----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_conflict_in_the_store_is_409(admin: AdminClient) -> None:
    await admin.ok("POST", REGIONS, region(), 201)
    response = await admin.call("POST", REGIONS, region(name="Another"))
    assert response.status == 409
    error = error_of(response)
    assert error["code"] == "conflict" and "us-east" in error["message"]


@pytest.mark.asyncio
async def test_not_found_is_404(admin: AdminClient) -> None:
    for path in (f"{NODES}/{uuid4()}", f"{NODES}/not-a-uuid"):
        response = await admin.call("GET", path)
        assert response.status == 404 and error_of(response)["code"] == "not_found"


@pytest_asyncio.fixture
async def unavailable_pool(request: pytest.FixtureRequest, migrated_url: str) -> AsyncIterator[Any]:
    """A pool whose database cannot be had: nothing listens at its port, or it is closed."""
    if request.param == "nothing-listening":
        # min_size=0: the pool connects on first use, so it can be made while nothing listens.
        pool = await create_pool(f"postgresql://postgres@{HOST}:{free_port()}/none", min_size=0)
        yield pool
        await pool.close()
    else:
        pool = await create_pool(migrated_url, min_size=1, max_size=2)
        await pool.close()
        yield pool


@pytest.mark.asyncio
@pytest.mark.parametrize("unavailable_pool", ["nothing-listening", "pool-closed"], indirect=True)
async def test_database_unavailable_is_503_with_retry_after(
    unavailable_pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(unavailable_pool) as client:
        with caplog.at_level(logging.ERROR, logger="edge.admin"):
            for method, path, body in (
                ("GET", REGIONS, None),
                ("POST", REGIONS, region()),
                ("GET", f"{NODES}/{uuid4()}", None),
                # A route that takes a connection from the pool itself, outside the store.
                ("POST", f"{NODES}/{uuid4()}/heartbeat", {}),
            ):
                response = await client.call(method, path, body)
                assert response.status == 503, (path, response.body)
                assert response.header("retry-after") == "5"
                assert error_of(response)["code"] == "database_unavailable"
            # A node token is looked up in the database: unavailable, not unauthorised.
            token = f"zwn_{uuid4().hex}_secret"
            assert (await client.call("GET", REGIONS, token=token)).status == 503
        assert "database unavailable" in caplog.text
        # Health still answers: without the database the edge is degraded, not down.
        health = await client.call("GET", "/health")
        assert health.status == 200 and parsed(health)["database"]["status"] == "down"


@contextlib.asynccontextmanager
async def serving(pool: Any, api: Api | None = None) -> AsyncIterator[AdminClient]:
    """The admin API (or ``api``) on its own port over ``pool``."""
    ctx = AdminContext(
        pool=pool,
        auth=Authenticator(pool, ADMIN_TOKEN, BOOTSTRAP_TOKEN),
        settings=AdminSettings(apps_domain="zeitwork.test"),
        routing_age=lambda: 0.5,
    )
    server = AdminServer(ctx, api=api)
    await server.start(HOST, 0)
    try:
        yield AdminClient(server.port, server, pool)
    finally:
        await server.close()


# -- the audit log ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_changes_are_audited_and_reads_are_not(admin: AdminClient) -> None:
    await admin.ok("POST", REGIONS, region(), 201)
    registered = await admin.call("POST", NODES, node(), token=BOOTSTRAP_TOKEN)
    assert registered.status == 201
    node_id = parsed(registered)["id"]
    await admin.ok("POST", f"{NODES}/{node_id}/drain")
    entries = await audit.recent(admin.pool)
    assert [(e.actor, e.action, e.target) for e in reversed(entries)] == [
        ("admin", "POST /api/v1/regions", REGIONS),
        ("bootstrap", "POST /api/v1/nodes", NODES),
        ("admin", "POST /api/v1/nodes/{id}/drain", f"{NODES}/{node_id}/drain"),
    ]
    assert entries[0].details == {"client": "127.0.0.1"}

    # Reads, refusals and failures change nothing and are not recorded.
    await admin.ok("GET", REGIONS)
    await admin.ok("GET", f"{NODES}/{node_id}")
    assert (await head(admin.port, NODES)).status == 200
    assert (await admin.call("POST", REGIONS, region())).status == 409
    assert (await admin.call("POST", REGIONS, {"code": 1})).status == 400
    assert (await admin.call("POST", REGIONS, region("x"), token="wrong")).status == 401
    assert (await admin.call("DELETE", f"{NODES}/{uuid4()}")).status == 404
    assert len(await audit.recent(admin.pool)) == 3

    assert (await admin.call("DELETE", f"{NODES}/{node_id}")).status == 204
    newest = (await audit.recent(admin.pool, limit=1))[0]
    assert (newest.actor, newest.action) == ("admin", "DELETE /api/v1/nodes/{id}")


# -- what only a route of the test's own shows ------------------------------------------------


class Limits(Strict):
    vcpu: int = Field(gt=0, le=64)
    memory: int = Field(gt=0)


class Service(Strict):
    name: str
    limits: Limits
    ports: list[int] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)


class Echo(Out):
    id: Any
    name: str


class Flags(QueryModel):
    verbose: bool = False
    count: int = Field(default=1, ge=1, le=10)


test_api = Api()


@test_api.route(
    "POST", "/t/services", auth="admin", summary="s", tag="t", body=Service, response=Echo
)
async def create_service(call: Call) -> dict[str, Any]:
    body: Service = call.body
    # A dict with a UUID and a field the model does not have: the model serialises the
    # one and drops the other.
    return {"id": uuid4(), "name": body.name, "secret": "not for the client"}


@test_api.route("GET", "/t/fail", auth="admin", summary="s", tag="t")
async def fail(call: Call) -> None:
    raise RuntimeError("internal detail that must stay inside")


@test_api.route("GET", "/t/error", auth="none", summary="s", tag="t", errors=(418,))
async def teapot(call: Call) -> None:
    raise ApiError(418, "teapot", "short and stout", field="spout", headers=[("x-why", "tea")])


@test_api.route("POST", "/t/raw-duplicate", auth="admin", summary="s", tag="t", errors=(409,))
async def raw_duplicate(call: Call) -> None:
    # The pool used directly, bypassing the store's translation of database errors.
    insert = "INSERT INTO regions (code, name, country) VALUES ('dup', 'D', 'X')"
    await call.ctx.pool.execute(insert)
    await call.ctx.pool.execute(insert)


@test_api.route(
    "GET", "/t/things", auth="admin", summary="s", tag="t", response=Echo, many=True, query=Flags
)
async def things(call: Call) -> Page:
    flags: Flags = call.query
    items = [{"id": i, "name": f"{flags.verbose}"} for i in range(flags.count)]
    return Page(items[call.page.offset : call.page.offset + call.page.limit], len(items))


@test_api.route("GET", "/t/{group}/things", auth="admin", summary="s", tag="t", many=True)
async def grouped_things(call: Call) -> Page:
    return Page([call.params["group"]] * 3, 30)


@test_api.route("POST", "/t/accepted", auth="admin", summary="s", tag="t", status=202)
async def accepted(call: Call) -> Reply:
    return Reply(None, headers=[("location", "/t/things")])


@pytest_asyncio.fixture
async def own(admin: AdminClient) -> AsyncIterator[AdminClient]:
    async with serving(admin.pool, test_api) as client:
        yield client


def service(**changes: Any) -> dict[str, Any]:
    return {"name": "web", "limits": {"vcpu": 2, "memory": 512}, **changes}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        (service(limits={"vcpu": 2}), "missing_field", "limits.memory"),
        (service(limits={"vcpu": "2", "memory": 1}), "wrong_type", "limits.vcpu"),
        (service(limits={"vcpu": 99, "memory": 1}), "invalid_value", "limits.vcpu"),
        (service(limits={"vcpu": 1, "memory": 1, "gpu": 1}), "unknown_field", "limits.gpu"),
        (service(limits=[1]), "wrong_type", "limits"),
        (service(ports=[80, "443"]), "wrong_type", "ports[1]"),
        (service(env={"A": 1}), "wrong_type", "env.A"),
    ],
)
async def test_nested_field_is_named(
    own: AdminClient, body: dict[str, Any], code: str, field: str
) -> None:
    error = await rejected(own, "POST", "/t/services", body)
    assert (error["code"], error["field"]) == (code, field), error


@pytest.mark.asyncio
async def test_answer_goes_through_its_model(own: AdminClient) -> None:
    answer = await own.ok("POST", "/t/services", service())
    assert set(answer) == {"id", "name"} and answer["name"] == "web"


@pytest.mark.asyncio
async def test_query_model_converts_and_validates(own: AdminClient) -> None:
    listed = await own.call("GET", "/t/things?verbose=true&count=3&per_page=2")
    assert listed.status == 200 and listed.header("x-total-count") == "3"
    assert parsed(listed) == [{"id": 0, "name": "True"}, {"id": 1, "name": "True"}]
    error = await rejected(own, "GET", "/t/things?count=11")
    assert (error["code"], error["field"]) == ("invalid_value", "count")
    error = await rejected(own, "GET", "/t/things?count=many")
    assert (error["code"], error["field"]) == ("wrong_type", "count")


@pytest.mark.asyncio
async def test_handler_failure_is_500_and_logged(
    own: AdminClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="edge.admin"):
        response = await own.call("GET", "/t/fail")
    assert response.status == 500 and error_of(response)["code"] == "internal"
    assert b"internal detail" not in response.body
    assert "GET /t/fail failed" in caplog.text and "internal detail" in caplog.text


@pytest.mark.asyncio
async def test_api_error_carries_status_field_and_headers(own: AdminClient) -> None:
    response = await own.call("GET", "/t/error")
    assert response.status == 418 and response.header("x-why") == "tea"
    assert error_of(response) == {"code": "teapot", "message": "short and stout", "field": "spout"}


@pytest.mark.asyncio
async def test_untranslated_database_error_is_mapped_like_the_store(
    own: AdminClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="edge.admin"):
        response = await own.call("POST", "/t/raw-duplicate")
    assert response.status == 409 and error_of(response)["code"] == "conflict"
    assert "untranslated UniqueViolationError" in caplog.text


@pytest.mark.asyncio
async def test_reply_sets_status_and_headers(own: AdminClient) -> None:
    response = await own.call("POST", "/t/accepted")
    assert response.status == 202 and response.header("location") == "/t/things"
    assert response.body == b""


@pytest.mark.asyncio
async def test_requests_are_counted_by_route_and_known_method(own: AdminClient) -> None:
    await own.call("GET", "/t/things")
    await own.call("BREW", "/t/things")
    registry = own.ctx.metrics.registry

    def count(route: str, method: str, status: str) -> float | None:
        labels = {"route": route, "method": method, "status": status}
        return registry.get_sample_value("zeitwork_admin_requests_total", labels)

    assert count("/t/things", "GET", "200") == 1
    # Any token is a method to HTTP: an unknown one must not become a label value.
    assert count("unmatched", "other", "405") == 1
    assert count("unmatched", "BREW", "405") is None


@pytest.mark.asyncio
async def test_page_links_keep_the_path_as_sent(own: AdminClient) -> None:
    # Percent-encoding stays as it was (not encoded twice); a ">" that h11 lets through
    # in a target must not end the link early.
    for sent, linked in (("a%20b", "a%20b"), ("a%2Fb", "a%2Fb"), ("a>b", "a%3Eb")):
        response = await own.call("GET", f"/t/{sent}/things?per_page=3")
        assert response.status == 200
        assert parsed(response) == [unquote(sent)] * 3
        assert links(response)["next"] == f"/t/{linked}/things?page=2&per_page=3"
