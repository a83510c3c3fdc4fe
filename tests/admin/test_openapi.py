"""The OpenAPI document of the admin API, and the API checked against it.

- the document served at ``/api/v1/openapi.json`` is valid OpenAPI 3.1 (the official schema
  of the format, as bundled with schemathesis; each model a valid JSON Schema 2020-12),
  every $ref resolves, and it holds every declared route;
- every operation under ``/api/`` refuses a request without a token (401), except the ones
  declared ``auth="none"``;
- schemathesis (its CLI, in a subprocess, against the live API served in the test's loop)
  generates requests from the document and checks every answer against it: no server
  error, declared status codes, content types, headers and bodies, invalid input refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import jsonschema_rs
import pytest
import schemathesis

from edge import __version__
from edge.admin.api import openapi
from edge.admin.app import build_api
from tests.admin.conftest import ADMIN_TOKEN, NO_TOKEN, AdminClient, error_of

DOCUMENT = "/api/v1/openapi.json"
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
DIALECT = "https://json-schema.org/draft/2020-12/schema"


async def document(admin: AdminClient) -> dict[str, Any]:
    doc: dict[str, Any] = await admin.ok("GET", DOCUMENT)
    return doc


def operations(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method.upper(), path, operation


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def resolve(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref}: only local references are expected"
    target: Any = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(target, dict) and part in target, f"{ref} does not resolve"
        target = target[part]
    return target


# -- the document --------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_document_is_valid_openapi_3_1(admin: AdminClient) -> None:
    doc = await document(admin)
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["version"] == __version__
    # The format's official schema (OAS 3.1, bundled with schemathesis) ...
    schemathesis.openapi.from_dict(doc).validate()
    # ... which leaves the models to JSON Schema: each must be valid 2020-12.
    for name, schema in doc["components"]["schemas"].items():
        try:
            jsonschema_rs.meta.validate({"$schema": DIALECT, **schema})
        except jsonschema_rs.ValidationError as exc:
            raise AssertionError(f"components.schemas.{name}: {exc}") from None
    for ref in set(refs(doc)):
        resolve(doc, ref)
    # The served document is the one the declarations make.
    assert doc == json.loads(json.dumps(openapi(build_api(), version=__version__)))


@pytest.mark.asyncio
async def test_document_holds_every_route_as_declared(admin: AdminClient) -> None:
    doc = await document(admin)
    declared = {(r.method, r.path): r for r in build_api().routes}
    documented = {(m, p): op for m, p, op in operations(doc)}
    assert set(documented) == set(declared)
    ids = [op["operationId"] for op in documented.values()]
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    for (method, path), operation in documented.items():
        route = declared[(method, path)]
        where = f"{method} {path}"
        assert operation["summary"] and operation["tags"] == [route.tag], where
        in_path = set(re.findall(r"{(\w+)}", path))
        params = operation.get("parameters", [])
        assert {p["name"] for p in params if p["in"] == "path"} == in_path, where
        assert all(p["required"] for p in params if p["in"] == "path"), where
        responses = operation["responses"]
        own = {str(code): model for code, model in route.answers}
        success = [int(c) for c in responses if c.startswith("2") and c not in own]
        empty = route.response is None and route.content_type == "application/json"
        assert success == [204 if empty and route.status == 200 else route.status], where
        assert "400" in responses, where
        for code in (*route.errors, *((401, 403) if route.auth != "none" else ())):
            assert str(code) in responses, f"{where}: {code} is not documented"
        for code, answer in responses.items():
            body = answer.get("content", {}).get("application/json", {}).get("schema")
            if code in own:
                # A status answered with a body of the route's own (health's 503 ...).
                assert body["$ref"].endswith(f"/{own[code].__name__}"), where
            elif int(code) >= 400:
                assert resolve(doc, body["$ref"])["required"] == ["error"], where
        if route.body is not None:
            assert "application/json" in operation["requestBody"]["content"], where
            assert {"413", "415"} <= set(responses), where
        if route.many:
            assert {"page", "per_page"} <= {p["name"] for p in params if p["in"] == "query"}
            assert (
                responses[str(route.status)]["content"]["application/json"]["schema"]["type"]
                == "array"
            )
            assert set(responses[str(route.status)]["headers"]) == {"X-Total-Count", "Link"}
        # Open routes say so; all others need the bearer token.
        assert ("security" in operation and operation["security"] == []) == (
            route.auth == "none"
        ), where
    assert doc["security"] == [{"bearer": []}]
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}


@pytest.mark.asyncio
async def test_document_needs_the_admin_token(admin: AdminClient) -> None:
    assert (await admin.call("GET", DOCUMENT, token=NO_TOKEN)).status == 401


# -- every operation refuses a request without a token -----------------------------------------


def placeholder_path(path: str) -> str:
    def fill(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(uuid4()) if name == "id" or name.endswith("_id") else f"placeholder-{name}"

    return re.sub(r"{(\w+)}", fill, path)


@pytest.mark.asyncio
async def test_every_operation_refuses_a_request_without_a_token(admin: AdminClient) -> None:
    doc = await document(admin)
    checked = open_routes = 0
    for method, path, operation in operations(doc):
        if not path.startswith("/api/"):
            continue
        target = placeholder_path(path)
        body: dict[str, Any] | None = {} if "requestBody" in operation else None
        for token in (NO_TOKEN, "not-the-token"):
            response = await admin.call(method, target, body, token=token)
            where = f"{method} {path} (token {token!r})"
            if operation.get("security") == []:
                # An open route (the GitHub receiver checks a signature of its own): never
                # the bearer token's refusal.
                assert response.header("www-authenticate") is None, where
                if response.status == 401:
                    assert "bearer" not in error_of(response)["message"].lower(), where
                continue
            assert response.status == 401, (where, response.status, response.body)
            assert response.header("www-authenticate") == 'Bearer realm="zeitwork"', where
            assert error_of(response)["code"] == "unauthorized", where
        checked += 1
        open_routes += operation.get("security") == []
    declared_open = [
        r for r in build_api().routes if r.auth == "none" and r.path.startswith("/api/")
    ]
    assert open_routes == len(declared_open)
    assert checked == sum(1 for _, p, _ in operations(doc) if p.startswith("/api/"))


# -- schemathesis ------------------------------------------------------------------------------

# The checks of every answer. Left out: positive_data_acceptance (valid input may still be
# refused, e.g. a node in a region that does not exist) and object_level_authorization
# (there is one operator identity).
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "response_headers_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "ignored_auth",
    "unsupported_method",
    "allow_header_conformance",
    "use_after_free",
    "ensure_resource_availability",
)
MAX_EXAMPLES = int(os.environ.get("ZEITWORK_SCHEMATHESIS_EXAMPLES", "25"))
RUN_TIMEOUT = 150.0


def config(ids: list[str]) -> str:
    """schemathesis.toml: 413 counts as refusing invalid input (a body the schema caps by
    item count can pass the byte limit first); the seeded names and ids are used for half
    of the path parameters, so that some requests reach existing things; and the agents'
    long poll waits a second at most (schemathesis learns the current version from earlier
    answers, and a full wait per request would take the run past its time)."""
    quoted = ", ".join(json.dumps(i) for i in ids)
    return f"""
[checks.negative_data_rejection]
expected-statuses = [400, 401, 403, 404, 405, 406, 409, 413, 415, 422, 428, 429]

[dictionaries]
orgs = {{ values = ["acme"] }}
names = {{ values = ["web"] }}
ids = {{ values = [{quoted}] }}
waits = {{ values = [0, 1] }}

[parameters]
"path.org" = {{ dictionary = "orgs", probability = 0.5 }}
"path.name" = {{ dictionary = "names", probability = 0.5 }}
"path.repo" = {{ dictionary = "names", probability = 0.5 }}
"path.id" = {{ dictionary = "ids", probability = 0.5 }}
"query.wait" = {{ dictionary = "waits", probability = 1.0 }}
"""


async def seed(admin: AdminClient) -> list[str]:
    """A region, a node, a project and a deployment; the ids to use in paths."""
    region = {"code": "us-east", "name": "US East", "country": "United States"}
    await admin.ok("POST", "/api/v1/regions", region, 201)
    node = await admin.ok(
        "POST",
        "/api/v1/nodes",
        {"hostname": "w1", "region": "us-east", "address": "10.0.0.1", "vcpu": 8, "memory": 16384},
        201,
    )
    project = {"org": "acme", "name": "web", "github_repo": "acme/web"}
    await admin.ok("POST", "/api/v1/projects", project, 201)
    deployment = await admin.ok(
        "POST",
        "/api/v1/deployments",
        {"org": "acme", "project": "web", "image": "ghcr.io/acme/web:1"},
        201,
    )
    return [node["id"], deployment["id"]]


def findings(output: str, limit: int = 30_000) -> str:
    """The failures part of schemathesis' report, long lines (bodies) cut short."""
    start = output.find("=== FAILURES ===")
    start = output.rfind("\n", 0, start) + 1 if start >= 0 else 0
    lines = [
        line if len(line) <= 600 else line[:600] + " ...[cut]"
        for line in output[start:].splitlines()
    ]
    text = "\n".join(lines)
    return text if len(text) <= limit else text[:limit] + "\n...[cut]"


@pytest.mark.asyncio
@pytest.mark.timeout(RUN_TIMEOUT + 30)
async def test_schemathesis_finds_nothing(admin: AdminClient, tmp_path: Path) -> None:
    ids = await seed(admin)
    config_file = tmp_path / "schemathesis.toml"
    config_file.write_text(config(ids))
    # schemathesis leaves out the operation that serves the document itself.
    tested = sum(1 for m, p, _ in operations(await document(admin)) if (m, p) != ("GET", DOCUMENT))
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(config_file),
        "--no-color",
        "run",
        f"http://127.0.0.1:{admin.port}{DOCUMENT}",
        "--header",
        f"Authorization: Bearer {ADMIN_TOKEN}",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--phases",
        "examples,coverage,fuzzing,stateful",
        # One worker: more trip over a thread-safety bug of schemathesis' coverage phase.
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
    ]
    started = time.monotonic()
    # The API is served by this test's loop: the run must not block it.
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert process.stdout is not None
    stdout = process.stdout
    chunks: list[bytes] = []

    async def collect() -> None:
        while data := await stdout.read(65536):
            chunks.append(data)

    collecting = asyncio.create_task(collect())
    try:
        await asyncio.wait_for(process.wait(), RUN_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
    await collecting
    output = b"".join(chunks).decode(errors="replace")
    elapsed = time.monotonic() - started
    assert process.returncode is not None and process.returncode >= 0, (
        f"schemathesis ran for more than {RUN_TIMEOUT:g} s; its output so far:\n"
        + findings(output[-20_000:])
    )
    summary = output[output.rfind("=== SUMMARY ===") :] if "=== SUMMARY ===" in output else ""
    print(f"schemathesis: {elapsed:.1f} s\n{summary}")
    assert process.returncode == 0, (
        f"schemathesis found problems (exit {process.returncode}, {elapsed:.0f} s):\n"
        + findings(output)
    )
    # Every operation was run, none skipped for want of a schema it could use.
    assert f"Selected: {tested}/{tested}" in output, summary
    assert f"Tested: {tested}" in output, summary
