"""``/api/v1/projects``: register, list, get, change and delete projects, as the operations
guide's curl examples do and with the errors around them."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from edge.store import audit, deployments, environments, instances, nodes, projects, regions
from tests.admin.conftest import NO_TOKEN, AdminClient, error_of

# The operations guide's bodies, verbatim.
GUIDE_CREATE = {
    "name": "webapp",
    "org": "acme",
    "github_repo": "acme-corp/webapp",
    "branch": "main",
    "auto_deploy": True,
    "resources": {"vcpu": 2, "memory": 1024},
}
GUIDE_PATCH = {"auto_deploy": False, "resources": {"vcpu": 4, "memory": 2048}}

PROJECT = "/api/v1/projects/acme/webapp"
# A field left out of a body.
MISSING = object()


async def _create(admin: AdminClient, **fields: Any) -> dict[str, Any]:
    body = {"name": "webapp", "org": "acme", **fields}
    created: dict[str, Any] = await admin.ok("POST", "/api/v1/projects", body, 201)
    return created


@pytest.mark.asyncio
async def test_guide_create_list_get_patch(admin: AdminClient) -> None:
    created = await admin.ok("POST", "/api/v1/projects", GUIDE_CREATE, 201)
    assert created["org"] == "acme" and created["name"] == "webapp"
    assert created["github_repo"] == "acme-corp/webapp"
    assert created["branch"] == "main" and created["auto_deploy"] is True
    assert created["resources"] == {"vcpu": 2, "memory": 1024}
    assert created["app_port"] == 3000 and created["health_check_path"] == "/"
    assert created["rate_limit"] is None and created["image_template"] is None
    assert created["hsts_max_age"] is None
    assert created["environments"] == [
        {
            "name": "production",
            "current_deployment": None,
            "previous_deployment": None,
            "domains": 0,
        },
        {"name": "staging", "current_deployment": None, "previous_deployment": None, "domains": 0},
    ]
    assert (created["domains"], created["deployments"], created["instances"]) == (0, 0, 0)

    listed = await admin.call("GET", "/api/v1/projects")
    assert listed.status == 200 and listed.header("x-total-count") == "1"
    body: Any = json.loads(listed.body)
    assert isinstance(body, list) and len(body) == 1  # the guide's `jq '. | length'`
    assert body[0]["id"] == created["id"] and "environments" not in body[0]

    detail = await admin.ok("GET", PROJECT)
    assert detail == created

    patched = await admin.ok("PATCH", PROJECT, GUIDE_PATCH)
    assert patched["auto_deploy"] is False
    assert patched["resources"] == {"vcpu": 4, "memory": 2048}
    assert patched["github_repo"] == "acme-corp/webapp" and patched["branch"] == "main"
    assert patched["updated_at"] > created["updated_at"]
    assert await admin.ok("GET", PROJECT) == patched

    stored = await projects.get_by_name(admin.pool, "acme", "webapp")
    assert (stored.vcpu, stored.memory_mb, stored.auto_deploy) == (Decimal(4), 2048, False)


@pytest.mark.asyncio
async def test_create_defaults_and_every_setting(admin: AdminClient) -> None:
    minimal = await admin.ok("POST", "/api/v1/projects", {"name": "api", "org": "acme"}, 201)
    assert minimal["branch"] == "main" and minimal["auto_deploy"] is False
    assert minimal["resources"] == {"vcpu": 1.0, "memory": 512}
    assert minimal["github_repo"] is None
    stored = await projects.get_by_name(admin.pool, "acme", "api")
    envs = await environments.list_for_project(admin.pool, stored.id)
    assert [e.name for e in envs] == ["production", "staging"]

    full = await admin.ok(
        "POST",
        "/api/v1/projects",
        {
            "name": "shop",
            "org": "acme",
            "github_repo": "Acme/Shop.js",
            "branch": "release/1.x",
            "resources": {"vcpu": 0.5},
            "app_port": 8080,
            "health_check_path": "/healthz?full=1",
            "rate_limit": {"rps": 50, "burst": 100},
            "image_template": "registry.acme.io/{repo}:{sha}",
        },
        201,
    )
    assert full["resources"] == {"vcpu": 0.5, "memory": 512}
    assert full["app_port"] == 8080 and full["health_check_path"] == "/healthz?full=1"
    assert full["rate_limit"] == {"rps": 50, "burst": 100}
    assert full["image_template"] == "registry.acme.io/{repo}:{sha}"
    assert full["branch"] == "release/1.x" and full["github_repo"] == "Acme/Shop.js"
    # A finer vCPU share than the column keeps is rounded, and the answer says so.
    fine = await admin.ok(
        "POST",
        "/api/v1/projects",
        {"name": "tiny", "org": "acme", "resources": {"vcpu": 0.125}},
        201,
    )
    assert fine["resources"]["vcpu"] == 0.13


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"org": MISSING}, "org"),
        ({"name": "WebApp"}, "name"),
        ({"name": "web_app"}, "name"),
        ({"org": "acme-"}, "org"),
        ({"org": "a" * 40}, "org"),
        ({"resources": {"vcpu": 0}}, "resources.vcpu"),
        ({"resources": {"vcpu": -1}}, "resources.vcpu"),
        ({"resources": {"vcpu": "2"}}, "resources.vcpu"),
        ({"resources": {"vcpu": 5000}}, "resources.vcpu"),
        ({"resources": {"memory": 0}}, "resources.memory"),
        ({"resources": {"memory": 1.5}}, "resources.memory"),
        ({"resources": {"memory": 2**31}}, "resources.memory"),
        ({"resources": {"cpu": 2}}, "resources.cpu"),
        ({"resources": None}, "resources"),
        ({"resources": [2, 1024]}, "resources"),
        ({"github_repo": "webapp"}, "github_repo"),
        ({"branch": "has space"}, "branch"),
        ({"branch": ""}, "branch"),
        ({"auto_deploy": "yes"}, "auto_deploy"),
        ({"app_port": 0}, "app_port"),
        ({"app_port": 65536}, "app_port"),
        ({"health_check_path": "healthz"}, "health_check_path"),
        ({"rate_limit": {"burst": 5}}, "rate_limit.rps"),
        ({"rate_limit": {"rps": 0}}, "rate_limit.rps"),
        ({"rate_limit": {"rps": 10, "burst": 2**40}}, "rate_limit.burst"),
        ({"rate_limit": 10}, "rate_limit"),
        ({"image_template": "ghcr.io/{owner}/x"}, "image_template"),
        ({"image_template": "ghcr.io/{org"}, "image_template"),
        ({"hsts_max_age": -1}, "hsts_max_age"),
        ({"hsts_max_age": 63072001}, "hsts_max_age"),
        ({"hsts_max_age": "1y"}, "hsts_max_age"),
        ({"colour": "blue"}, "colour"),
        # Deployment hosts are <name>-<nanoid>-<org>: one DNS label of at most 63.
        ({"name": "n" * 30, "org": "o" * 30}, "name"),
    ],
)
@pytest.mark.asyncio
async def test_create_rejects_bad_fields(
    admin: AdminClient, change: dict[str, Any], field: str
) -> None:
    body = {k: v for k, v in {**GUIDE_CREATE, **change}.items() if v is not MISSING}
    response = await admin.call("POST", "/api/v1/projects", body)
    assert response.status == 400, response.body
    error = error_of(response)
    assert error["field"] == field, error
    assert field.rpartition(".")[2] in error["message"], error
    assert await projects.list_all(admin.pool) == []


@pytest.mark.asyncio
async def test_create_duplicate_is_409(admin: AdminClient) -> None:
    await _create(admin)
    again = await admin.call("POST", "/api/v1/projects", {"name": "webapp", "org": "acme"})
    assert again.status == 409
    assert "acme/webapp already exists" in error_of(again)["message"]
    # The same name in another org is another project.
    await admin.ok("POST", "/api/v1/projects", {"name": "webapp", "org": "globex"}, 201)
    assert len(await projects.list_all(admin.pool)) == 2


@pytest.mark.asyncio
async def test_list_pages_and_org_filter(admin: AdminClient) -> None:
    for org, name in [("globex", "api"), ("acme", "web"), ("acme", "api")]:
        await admin.ok("POST", "/api/v1/projects", {"name": name, "org": org}, 201)
    everything = await admin.ok("GET", "/api/v1/projects")
    assert [(p["org"], p["name"]) for p in everything] == [
        ("acme", "api"),
        ("acme", "web"),
        ("globex", "api"),
    ]
    acme = await admin.call("GET", "/api/v1/projects?org=acme")
    assert acme.header("x-total-count") == "2"
    assert [p["name"] for p in acme.json()] == ["api", "web"]
    page = await admin.call("GET", "/api/v1/projects?per_page=1&page=2")
    assert page.header("x-total-count") == "3"
    assert [p["name"] for p in page.json()] == ["web"]
    assert 'rel="next"' in (page.header("link") or "")
    assert await admin.ok("GET", "/api/v1/projects?org=initech") == []
    bad = await admin.call("GET", "/api/v1/projects?org=Not%20An%20Org")
    assert bad.status == 400 and error_of(bad)["field"] == "org"
    unknown = await admin.call("GET", "/api/v1/projects?owner=acme")
    assert unknown.status == 400 and error_of(unknown)["field"] == "owner"


@pytest.mark.asyncio
async def test_patch_is_partial(admin: AdminClient) -> None:
    created = await _create(
        admin,
        github_repo="acme/webapp",
        resources={"vcpu": 2, "memory": 1024},
        rate_limit={"rps": 10, "burst": 20},
        image_template="ghcr.io/{org}/{repo}:{sha}",
    )
    unchanged = await admin.ok("PATCH", PROJECT, {})
    assert unchanged == created

    memory = await admin.ok("PATCH", PROJECT, {"resources": {"memory": 256}})
    assert memory["resources"] == {"vcpu": 2, "memory": 256}
    vcpu = await admin.ok("PATCH", PROJECT, {"resources": {"vcpu": 0.5}})
    assert vcpu["resources"] == {"vcpu": 0.5, "memory": 256}

    changed = await admin.ok(
        "PATCH",
        PROJECT,
        {
            "branch": "develop",
            "app_port": 8000,
            "health_check_path": "/up",
            "rate_limit": {"rps": 5},
        },
    )
    assert (changed["branch"], changed["app_port"], changed["health_check_path"]) == (
        "develop",
        8000,
        "/up",
    )
    # rate_limit is replaced whole: the burst left out is the default again.
    assert changed["rate_limit"] == {"rps": 5, "burst": None}
    assert changed["github_repo"] == "acme/webapp" and changed["auto_deploy"] is False

    cleared = await admin.ok(
        "PATCH", PROJECT, {"github_repo": None, "rate_limit": None, "image_template": None}
    )
    assert cleared["github_repo"] is None and cleared["rate_limit"] is None
    assert cleared["image_template"] is None
    stored = await projects.get_by_name(admin.pool, "acme", "webapp")
    assert (stored.rate_limit_rps, stored.rate_limit_burst, stored.github_repo) == (
        None,
        None,
        None,
    )
    assert stored.branch == "develop"


@pytest.mark.asyncio
async def test_hsts_max_age_is_set_changed_and_cleared(admin: AdminClient) -> None:
    created = await _create(admin, hsts_max_age=31536000)
    assert created["hsts_max_age"] == 31536000
    assert (await admin.ok("PATCH", PROJECT, {"hsts_max_age": 0}))["hsts_max_age"] == 0
    kept = await admin.ok("PATCH", PROJECT, {"branch": "develop"})
    assert kept["hsts_max_age"] == 0
    cleared = await admin.ok("PATCH", PROJECT, {"hsts_max_age": None})
    assert cleared["hsts_max_age"] is None
    assert (await projects.get_by_name(admin.pool, "acme", "webapp")).hsts_max_age is None
    listed = await admin.ok("GET", "/api/v1/projects")
    assert listed[0]["hsts_max_age"] is None


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"branch": None}, "branch"),
        ({"auto_deploy": None}, "auto_deploy"),
        ({"resources": None}, "resources"),
        ({"resources": {"vcpu": None}}, "resources.vcpu"),
        ({"resources": {"vcpu": 0}}, "resources.vcpu"),
        ({"resources": {"memory": "1G"}}, "resources.memory"),
        ({"app_port": None}, "app_port"),
        ({"app_port": 99999}, "app_port"),
        ({"hsts_max_age": 1.5}, "hsts_max_age"),
        ({"name": "renamed"}, "name"),
        ({"org": "other"}, "org"),
        ({"color": "red"}, "color"),
    ],
)
@pytest.mark.asyncio
async def test_patch_rejects_bad_fields(
    admin: AdminClient, body: dict[str, Any], field: str
) -> None:
    await _create(admin)
    response = await admin.call("PATCH", PROJECT, body)
    assert response.status == 400, response.body
    assert error_of(response)["field"] == field
    stored = await projects.get_by_name(admin.pool, "acme", "webapp")
    assert (stored.branch, stored.app_port, stored.memory_mb) == ("main", 3000, 512)


@pytest.mark.asyncio
async def test_patch_needs_a_body(admin: AdminClient) -> None:
    await _create(admin)
    response = await admin.call("PATCH", PROJECT)
    assert response.status == 400 and error_of(response)["code"] == "missing_body"


@pytest.mark.asyncio
async def test_delete_cascades(admin: AdminClient) -> None:
    created = await _create(admin)
    pool = admin.pool
    await regions.create(pool, "us-east", "US East", "United States")
    node = await nodes.create(
        pool, region="us-east", hostname="w1", address="10.0.0.1", vcpu=4, memory_mb=4096
    )
    project = await projects.get_by_name(pool, "acme", "webapp")
    env = await environments.get_by_name(pool, project.id, "production")
    deployment = await deployments.create(
        pool, project_id=project.id, environment_id=env.id, image="ghcr.io/acme/webapp:1"
    )
    await instances.create(pool, deployment_id=deployment.id, region="us-east", node_id=node.id)
    assert len(await instances.list_for_node(pool, node.id)) == 1

    gone = await admin.call("DELETE", PROJECT)
    assert gone.status == 204 and gone.body == b""
    assert (await admin.call("GET", PROJECT)).status == 404
    # The node's agent is no longer assigned the instance, so it stops it.
    assert await instances.list_for_node(pool, node.id) == []
    assert await environments.list_for_project(pool, project.id) == []
    again = await admin.call("DELETE", PROJECT)
    assert again.status == 404
    # Deleting frees the name.
    recreated = await _create(admin)
    assert recreated["id"] != created["id"]


@pytest.mark.asyncio
async def test_changes_are_audited(admin: AdminClient) -> None:
    await _create(admin)
    await admin.ok("PATCH", PROJECT, {"auto_deploy": True})
    await admin.ok("GET", PROJECT)
    assert (await admin.call("DELETE", PROJECT)).status == 204
    actions = [e.action for e in await audit.recent(admin.pool)]
    assert actions == [
        "DELETE /api/v1/projects/{org}/{name}",
        "PATCH /api/v1/projects/{org}/{name}",
        "POST /api/v1/projects",
    ]


ROUTES = [
    ("POST", "/api/v1/projects"),
    ("GET", "/api/v1/projects"),
    ("GET", PROJECT),
    ("PATCH", PROJECT),
    ("DELETE", PROJECT),
    ("POST", PROJECT + "/rollback"),
    ("POST", PROJECT + "/promote"),
    ("GET", PROJECT + "/routing"),
    ("GET", PROJECT + "/health"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.asyncio
async def test_every_route_needs_the_admin_token(
    admin: AdminClient, method: str, path: str
) -> None:
    await _create(admin)
    body = GUIDE_CREATE if path == "/api/v1/projects" and method == "POST" else {}
    response = await admin.call(method, path, body, token=NO_TOKEN)
    assert response.status == 401, response.body
    wrong = await admin.call(method, path, body, token="not-the-token")
    assert wrong.status == 401, wrong.body
    # Nothing happened.
    assert len(await projects.list_all(admin.pool)) == 1


@pytest.mark.parametrize(("method", "path"), [r for r in ROUTES if r[1] != "/api/v1/projects"])
@pytest.mark.asyncio
async def test_unknown_project_is_404(admin: AdminClient, method: str, path: str) -> None:
    await _create(admin, org="globex")  # another org's project of that name
    body: dict[str, Any] | None = {} if method in ("POST", "PATCH") else None
    response = await admin.call(method, path, body)
    assert response.status == 404, response.body
    assert "project acme/webapp does not exist" in error_of(response)["message"]


@pytest.mark.asyncio
async def test_openapi_documents_the_routes(admin: AdminClient) -> None:
    doc = await admin.ok("GET", "/api/v1/openapi.json")
    item = doc["paths"]["/api/v1/projects/{org}/{name}"]
    assert set(item) == {"get", "patch", "delete"}
    assert "404" in item["patch"]["responses"]
    assert "409" in doc["paths"]["/api/v1/projects"]["post"]["responses"]
    for op in ("rollback", "promote"):
        responses = doc["paths"][f"/api/v1/projects/{{org}}/{{name}}/{op}"]["post"]["responses"]
        assert {"404", "409"} <= set(responses)
