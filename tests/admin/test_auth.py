"""Bearer tokens of the admin API: who may call what, what a refusal logs, and where the
admin token comes from.

The tokens go through real requests (the ``admin`` fixture); every refusal must be logged on
``edge.admin`` with the client's address, and no log line may contain a token.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from edge.admin.auth import (
    ADMIN_TOKEN_PREFIX,
    NODE_TOKEN_PREFIX,
    Authenticator,
    hash_token,
    load_admin_token,
    new_node_token,
)
from tests.admin.conftest import ADMIN_TOKEN, BOOTSTRAP_TOKEN, NO_TOKEN, AdminClient, error_of

NODES = "/api/v1/nodes"
REGION = {"code": "us-east", "name": "US East", "country": "United States"}
NODE = {"hostname": "w1", "region": "us-east", "address": "10.0.0.1", "vcpu": 4, "memory": 4096}


async def register(admin: AdminClient, hostname: str = "w1") -> dict[str, Any]:
    """A node registered with the bootstrap token (its region created first if need be)."""
    if (await admin.call("GET", "/api/v1/regions")).body == b"[]":
        await admin.ok("POST", "/api/v1/regions", REGION, 201)
    response = await admin.call(
        "POST", NODES, {**NODE, "hostname": hostname}, token=BOOTSTRAP_TOKEN
    )
    assert response.status == 201, response.body
    node: dict[str, Any] = response.json()
    return node


def refusals(caplog: pytest.LogCaptureFixture, status: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "edge.admin" and f" {status} " in r.getMessage()
    ]


def assert_no_token_logged(caplog: pytest.LogCaptureFixture, *tokens: str) -> None:
    for token in (ADMIN_TOKEN, BOOTSTRAP_TOKEN, *tokens):
        assert token not in caplog.text, f"a token is in the log: {token[:8]}..."
        # Nor the secret part of a node token on its own (zwn_<node>_<secret>).
        if token.startswith(NODE_TOKEN_PREFIX):
            secret = token[len(NODE_TOKEN_PREFIX) :].partition("_")[2]
            assert not secret or secret not in caplog.text


# -- 401 -------------------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing bearer token"),
        ("Basic dXNlcjpwYXNz", "must be 'Bearer <token>'"),
        ("Bearer", "must be 'Bearer <token>'"),
        ("Bearer    ", "must be 'Bearer <token>'"),
        ("Token " + ADMIN_TOKEN, "must be 'Bearer <token>'"),
        ("Bearer wrong-token", "invalid token"),
        (f"Bearer {ADMIN_TOKEN}x", "invalid token"),
        (f"Bearer {NODE_TOKEN_PREFIX}{uuid4().hex}_guessed", "invalid token"),
        (f"Bearer {NODE_TOKEN_PREFIX}not-hex_guessed", "invalid token"),
        (f"Bearer {NODE_TOKEN_PREFIX}{uuid4().hex}", "invalid token"),
    ],
    ids=[
        "none",
        "basic",
        "bearer-alone",
        "bearer-blank",
        "other-scheme",
        "wrong",
        "admin-plus-one",
        "unknown-node",
        "malformed-node",
        "node-without-secret",
    ],
)
async def test_missing_or_wrong_token_is_401_and_logged(
    admin: AdminClient, caplog: pytest.LogCaptureFixture, header: str | None, reason: str
) -> None:
    headers = {"Authorization": header} if header is not None else None
    with caplog.at_level(logging.WARNING, logger="edge.admin"):
        response = await admin.call("GET", NODES, token=NO_TOKEN, headers=headers)
    assert response.status == 401
    assert response.header("www-authenticate") == 'Bearer realm="zeitwork"'
    error = error_of(response)
    assert error["code"] == "unauthorized" and reason in error["message"]
    [line] = refusals(caplog, 401)
    assert "GET /api/v1/nodes from 127.0.0.1" in line and reason in line
    assert_no_token_logged(caplog, *(header.split()[1:] if header else ()))


@pytest.mark.asyncio
async def test_scheme_is_case_insensitive(admin: AdminClient) -> None:
    response = await admin.call(
        "GET", NODES, token=NO_TOKEN, headers={"Authorization": f"bearer {ADMIN_TOKEN}"}
    )
    assert response.status == 200


@pytest.mark.asyncio
async def test_every_route_but_the_open_ones_needs_a_token(admin: AdminClient) -> None:
    for path in ("/api/v1/regions", "/api/v1/openapi.json", f"{NODES}/{uuid4()}/assignments"):
        assert (await admin.call("GET", path, token=NO_TOKEN)).status == 401, path
    for path in ("/health", "/metrics"):
        assert (await admin.call("GET", path, token=NO_TOKEN)).status == 200, path


# -- 403 and what each kind of token may do ----------------------------------------------------


@pytest.mark.asyncio
async def test_node_token_on_an_admin_route_is_403_and_logged(
    admin: AdminClient, caplog: pytest.LogCaptureFixture
) -> None:
    node = await register(admin)
    with caplog.at_level(logging.WARNING, logger="edge.admin"):
        for method, path in (
            ("GET", NODES),
            ("GET", f"{NODES}/{node['id']}"),
            ("DELETE", f"{NODES}/{node['id']}"),
            ("POST", NODES),
            ("GET", "/api/v1/openapi.json"),
        ):
            body = NODE if method == "POST" else None
            response = await admin.call(method, path, body, token=node["token"])
            assert response.status == 403, (method, path)
            assert response.header("www-authenticate") is None
            assert error_of(response)["code"] == "forbidden"
    lines = refusals(caplog, 403)
    assert len(lines) == 5
    assert all("from 127.0.0.1" in line and "a node token" in line for line in lines)
    assert f"DELETE /api/v1/nodes/{node['id']} from 127.0.0.1" in lines[2]
    assert_no_token_logged(caplog, node["token"])
    # Refused means not done.
    assert (await admin.call("GET", f"{NODES}/{node['id']}")).status == 200


@pytest.mark.asyncio
async def test_bootstrap_token_registers_nodes_and_nothing_else(
    admin: AdminClient, caplog: pytest.LogCaptureFixture
) -> None:
    node = await register(admin)
    assert node["token"].startswith(NODE_TOKEN_PREFIX)
    with caplog.at_level(logging.WARNING, logger="edge.admin"):
        for method, path, body in (
            ("GET", NODES, None),
            ("GET", f"{NODES}/{node['id']}", None),
            ("POST", f"{NODES}/{node['id']}/drain", None),
            ("GET", f"{NODES}/{node['id']}/assignments", None),
            ("POST", "/api/v1/regions", {**REGION, "code": "eu-west"}),
            ("GET", "/api/v1/regions", None),
        ):
            response = await admin.call(method, path, body, token=BOOTSTRAP_TOKEN)
            assert response.status == 403, (method, path, response.body)
    assert len(refusals(caplog, 403)) == 6
    assert all("a bootstrap token may not" in line for line in refusals(caplog, 403))
    assert_no_token_logged(caplog)


@pytest.mark.asyncio
async def test_node_token_works_for_its_own_node_only(admin: AdminClient) -> None:
    mine = await register(admin, "w1")
    other = await register(admin, "w2")
    own = await admin.call("GET", f"{NODES}/{mine['id']}/assignments", token=mine["token"])
    assert own.status == 200, own.body
    assert (
        await admin.call("GET", f"{NODES}/{other['id']}/assignments", token=mine["token"])
    ).status == 403
    # The same node id written differently is the same node.
    upper = str(mine["id"]).upper()
    assert (
        await admin.call("GET", f"{NODES}/{upper}/assignments", token=mine["token"])
    ).status == 200
    # The admin token may act for any node.
    assert (await admin.call("GET", f"{NODES}/{other['id']}/assignments")).status == 200
    # Only the hash of the token is kept.
    stored = await admin.pool.fetchval(
        "SELECT token_hash FROM nodes WHERE id = $1", UUID(mine["id"])
    )
    assert stored == hash_token(mine["token"]) and mine["token"] not in stored


@pytest.mark.asyncio
async def test_forged_secret_for_a_real_node_is_401(admin: AdminClient) -> None:
    node = await register(admin)
    forged = node["token"][:-4] + ("AAAA" if not node["token"].endswith("AAAA") else "BBBB")
    response = await admin.call("GET", f"{NODES}/{node['id']}/assignments", token=forged)
    assert response.status == 401


@pytest.mark.asyncio
async def test_deleted_node_token_stops_working(
    admin: AdminClient, caplog: pytest.LogCaptureFixture
) -> None:
    node = await register(admin)
    path = f"{NODES}/{node['id']}/assignments"
    assert (await admin.call("GET", path, token=node["token"])).status == 200
    assert (await admin.call("DELETE", f"{NODES}/{node['id']}")).status == 204
    with caplog.at_level(logging.WARNING, logger="edge.admin"):
        response = await admin.call("GET", path, token=node["token"])
    assert response.status == 401 and error_of(response)["code"] == "unauthorized"
    assert refusals(caplog, 401)
    assert_no_token_logged(caplog, node["token"])


@pytest.mark.asyncio
async def test_node_token_is_refused_without_a_database() -> None:
    # An edge on a routes file has an admin API without a database: a node token is then
    # simply unknown (401), not an error.
    from edge.admin.api import ApiError  # noqa: PLC0415
    from edge.admin.http import Request  # noqa: PLC0415

    auth = Authenticator(None, ADMIN_TOKEN)
    token = new_node_token(uuid4())
    req = Request("GET", ["x"], "/x", [], {"authorization": f"Bearer {token}"}, b"", "127.0.0.1")
    with pytest.raises(ApiError) as refused:
        await auth.authenticate(req, "admin", {})
    assert refused.value.status == 401


def test_empty_admin_token_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        Authenticator(None, "")


def test_node_token_names_its_node() -> None:
    node_id = uuid4()
    token = new_node_token(node_id)
    assert token.startswith(f"{NODE_TOKEN_PREFIX}{node_id.hex}_")
    assert len(token) - len(f"{NODE_TOKEN_PREFIX}{node_id.hex}_") >= 40
    assert token != new_node_token(node_id)
    assert hash_token(token) == hash_token(token) and len(hash_token(token)) == 64


# -- where the admin token comes from ------------------------------------------------------------


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_configured_token_wins(tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("from-the-file\n")
    assert load_admin_token("configured", token_file) == ("configured", "configuration")
    # Surrounding blanks (a token read from an env file) are no part of it.
    assert load_admin_token(" configured\n", token_file)[0] == "configured"
    assert token_file.read_text() == "from-the-file\n"


def test_configured_token_does_not_create_a_file(tmp_path: Path) -> None:
    token_file = tmp_path / "data" / "admin-token"
    load_admin_token("configured", token_file)
    assert not token_file.exists()


@pytest.mark.parametrize("configured", [None, "", "   "])
def test_token_is_generated_once_with_mode_0600_and_reused(
    tmp_path: Path, configured: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "data" / "admin-token"
    with caplog.at_level(logging.WARNING, logger="edge.admin"):
        token, source = load_admin_token(configured, token_file)
    assert token.startswith(ADMIN_TOKEN_PREFIX) and len(token) > 40
    assert source == f"{token_file} (generated)"
    assert mode_of(token_file) == 0o600
    assert token_file.read_text() == token + "\n"
    assert str(token_file) in caplog.text and token not in caplog.text
    # The next start finds it and keeps it.
    assert load_admin_token(configured, token_file) == (token, str(token_file))


def test_token_file_is_read_as_written_by_an_operator(tmp_path: Path) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("  operator-chosen-token \n\n")
    token_file.chmod(0o600)
    assert load_admin_token(None, token_file) == ("operator-chosen-token", str(token_file))


@pytest.mark.parametrize("content", ["", "\n", "  \n\t"])
def test_empty_token_file_is_regenerated_with_mode_0600(tmp_path: Path, content: str) -> None:
    # An empty file holds no token (and an empty token would let no one in): a new one is
    # generated into it, and the loose mode an empty file may have had is tightened.
    token_file = tmp_path / "admin-token"
    token_file.write_text(content)
    token_file.chmod(0o644)
    token, source = load_admin_token(None, token_file)
    assert token.startswith(ADMIN_TOKEN_PREFIX) and source.endswith("(generated)")
    assert token_file.read_text() == token + "\n"
    assert mode_of(token_file) == 0o600
    assert load_admin_token(None, token_file)[0] == token


def test_token_file_readable_by_others_is_used_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("shared-token\n")
    token_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="edge.admin"):
        assert load_admin_token(None, token_file)[0] == "shared-token"
    assert "readable by others" in caplog.text and "shared-token" not in caplog.text


def test_unreadable_token_file_is_an_error(tmp_path: Path) -> None:
    # A directory where the file should be: the caller reports it (OSError), never a token.
    token_file = tmp_path / "admin-token"
    token_file.mkdir()
    with pytest.raises(OSError):
        load_admin_token(None, token_file)
