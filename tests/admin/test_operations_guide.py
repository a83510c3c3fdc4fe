"""The operations guide's curl examples, run as written against a real edge.

Each command below is copied from the operations guide (``shared/operations-guide.md``) and
run unchanged by bash with the real curl and jq. Two things an operator sets up once are set
up the same way here: the admin token goes into curl's configuration file (a ``header``
line in ``$CURL_HOME/.curlrc``), and the guide's host names (``localhost:8080``,
``operator:8080``, ``us-east-op-1:8080``) reach the edge under test through curl's
``connect-to`` lines in that same file. Variables the guide's scripts use (``$NODE_ID``,
``$NEW_NODE``) are set in the environment, as the guide's own scripts set them.

Not run: ``curl -s https://$region.zeitwork.com/health`` needs TLS on public names (the TLS
issue); ``/health`` itself is checked here on the admin port.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from edge.store import deployments, environments, instances, logs, nodes, projects
from edge.store.db import create_pool
from tests.admin.process import EdgeProcess, running_edge
from tests.conftest import require_tool
from tests.seeding import force_status

TOKEN = "operations-guide-admin-token"
SECRET = "webhook-secret-key"
GUIDE_HOSTS = ("localhost", "operator", "us-east-op-1")
IMAGE = "ghcr.io/dokedu/app:v1"

Check = Callable[[str], None]


def _json(out: str) -> Any:
    assert out.strip(), "empty answer"
    value = json.loads(out)
    assert not (isinstance(value, dict) and "error" in value), value
    return value


def has(**expected: Any) -> Check:
    def check(out: str) -> None:
        value = _json(out)
        for key, want in expected.items():
            assert value[key] == want, (key, value)

    return check


def array(min_length: int = 0) -> Check:
    def check(out: str) -> None:
        value = _json(out)
        assert isinstance(value, list) and len(value) >= min_length, value

    return check


def number(want: int) -> Check:
    def check(out: str) -> None:
        assert int(out.strip()) == want, out

    return check


def ok_json(out: str) -> None:
    _json(out)


def empty(out: str) -> None:
    assert out == "", out


# (command as written in the guide, check of its standard output)
NODES: list[tuple[str, Check]] = [
    (
        """curl http://us-east-op-1:8080/api/v1/nodes | jq '.[] | select(.hostname=="'$NEW_NODE'")'""",
        has(hostname="us-east-worker-7", region="us-east", state="ready"),
    ),
    ("curl -X POST http://operator:8080/api/v1/nodes/$NODE_ID/drain", has(state="draining")),
    (
        """while [ $(curl -s http://operator:8080/api/v1/nodes/$NODE_ID | jq '.instances') -gt 0 ]; do
    echo "Waiting for VMs to migrate..."
    sleep 10
done""",
        empty,
    ),
    ("curl -X DELETE http://operator:8080/api/v1/nodes/$NODE_ID", empty),
]

PROJECTS: list[tuple[str, Check]] = [
    (
        """curl -X POST http://localhost:8080/api/v1/projects \\
  -H "Content-Type: application/json" \\
  -d '{
    "name": "webapp",
    "org": "acme",
    "github_repo": "acme-corp/webapp",
    "branch": "main",
    "auto_deploy": true,
    "resources": {
      "vcpu": 2,
      "memory": 1024
    }
  }'""",
        has(name="webapp", org="acme", auto_deploy=True),
    ),
    ("curl http://localhost:8080/api/v1/projects", array(2)),
    ("curl http://localhost:8080/api/v1/projects/acme/webapp", has(name="webapp", org="acme")),
    (
        """curl -X PATCH http://localhost:8080/api/v1/projects/acme/webapp \\
  -H "Content-Type: application/json" \\
  -d '{
    "auto_deploy": false,
    "resources": {
      "vcpu": 4,
      "memory": 2048
    }
  }'""",
        has(auto_deploy=False),
    ),
]

DEPLOYMENTS: list[tuple[str, Check]] = [
    ("curl http://localhost:8080/api/v1/projects/dokedu/dokedu/deployments", array(3)),
    (
        "curl http://localhost:8080/api/v1/projects/dokedu/dokedu/deployments/current",
        has(name="dokedu-a7x9k2m-dokedu", current=True),
    ),
    (
        """curl -X POST http://localhost:8080/api/v1/deployments \\
  -H "Content-Type: application/json" \\
  -d '{
    "project": "dokedu",
    "org": "dokedu",
    "image": "ghcr.io/dokedu/app:sha-abc123",
    "commit_sha": "abc123def456",
    "commit_message": "Fix: Updated API endpoints",
    "instances_per_region": 3
  }'""",
        has(status="pending", image="ghcr.io/dokedu/app:sha-abc123", instances_per_region=3),
    ),
    ("curl http://localhost:8080/api/v1/projects/dokedu/dokedu/routing", ok_json),
    (
        "curl http://localhost:8080/api/v1/projects/dokedu/dokedu/health",
        ok_json,
    ),
    ("curl http://localhost:8080/api/v1/deployments/dokedu-a7x9k2m-dokedu/metrics", ok_json),
    ("curl http://localhost:8080/api/v1/deployments/dokedu-a7x9k2m-dokedu/logs", ok_json),
    ("curl http://localhost:8080/api/v1/deployments/dokedu-a7x9k2m-dokedu/instances", array(1)),
    ("curl -X POST http://localhost:8080/api/v1/projects/dokedu/dokedu/rollback", ok_json),
    (
        """curl -X POST http://localhost:8080/api/v1/projects/dokedu/dokedu/promote \\
  -H "Content-Type: application/json" \\
  -d '{"from": "staging", "to": "production"}'""",
        has(status="pending", environment="production"),
    ),
]

GITHUB: list[tuple[str, Check]] = [
    (
        """curl -X POST http://localhost:8080/api/v1/github/webhooks \\
  -H "Content-Type: application/json" \\
  -d '{
    "org": "dokedu",
    "repo": "app",
    "events": ["push", "pull_request"],
    "secret": "webhook-secret-key"
  }'""",
        has(repository="dokedu/app"),
    ),
    # (a signed push arrives from GitHub between these two: see the test)
    ("curl http://localhost:8080/api/v1/github/webhooks/dokedu/app/deliveries", array(1)),
    (
        """curl -X POST http://localhost:8080/api/v1/github/trigger \\
  -H "Content-Type: application/json" \\
  -d '{
    "org": "dokedu",
    "repo": "app",
    "ref": "refs/heads/main"
  }'""",
        array(1),
    ),
]

ANALYTICS: list[tuple[str, Check]] = [
    ("curl http://localhost:8080/api/v1/analytics/deployments/frequency", ok_json),
    ("curl http://localhost:8080/api/v1/analytics/deployments/duration", ok_json),
    ("curl http://localhost:8080/api/v1/analytics/deployments/success-rate", ok_json),
    ("curl http://localhost:8080/api/v1/analytics/resources/by-org", ok_json),
]

# The monthly report's counts.
REPORT: list[tuple[str, Check]] = [
    ("curl -s http://localhost:8080/api/v1/nodes | jq '. | length'", number(1)),
    ("curl -s http://localhost:8080/api/v1/projects | jq '. | length'", number(2)),
    ("curl -s http://localhost:8080/api/v1/deployments | jq '. | length'", number(6)),
    (
        "curl -s http://localhost:8080/api/v1/deployments"
        " | jq 'group_by(.org) | map({org: .[0].org, count: length})'",
        lambda out: _check_equal(_json(out), [{"org": "dokedu", "count": 6}]),
    ),
]


def _check_equal(got: Any, want: Any) -> None:
    assert got == want, got


def run(command: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        ["bash", "-c", "set -o pipefail\n" + command],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0, (command, done.stdout, done.stderr)
    return done.stdout


def curl_env(tmp_path: Path, edge: EdgeProcess, **variables: str) -> dict[str, str]:
    home = tmp_path / "curl"
    home.mkdir(exist_ok=True)
    lines = [f'header = "Authorization: Bearer {TOKEN}"', "silent", "show-error"]
    lines += [f'connect-to = "{h}:8080:127.0.0.1:{edge.admin_port}"' for h in GUIDE_HOSTS]
    (home / ".curlrc").write_text("\n".join(lines) + "\n")
    return {"PATH": os.environ["PATH"], "CURL_HOME": str(home), "HOME": str(home), **variables}


def api(edge: EdgeProcess, method: str, path: str, body: Any) -> Any:
    req = urllib.request.Request(
        edge.admin_url + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as answer:
        return json.loads(answer.read())


async def seed_dokedu(dsn: str) -> None:
    """The guide's dokedu project: production runs dokedu-a7x9k2m-dokedu (with an older
    deployment before it, for rollback) and staging has a current deployment to promote."""
    pool = await create_pool(dsn, min_size=1, max_size=2)
    try:
        project = await projects.get_by_name(pool, "dokedu", "dokedu")
        production = await environments.get_by_name(pool, project.id, "production")
        staging = await environments.get_by_name(pool, project.id, "staging")
        node = await nodes.get_by_hostname(pool, "us-east-worker-7")
        made = []
        for env in (production, production, staging):
            made.append(
                await deployments.create(
                    pool,
                    project_id=project.id,
                    environment_id=env.id,
                    image="ghcr.io/dokedu/app:v1",
                )
            )
        old, current, staged = made
        await pool.execute("UPDATE deployments SET nanoid = 'a7x9k2m' WHERE id = $1", current.id)
        await environments.set_current(pool, production.id, old.id)
        await environments.set_current(pool, production.id, current.id)
        await environments.set_current(pool, staging.id, staged.id)
        # As the scheduler leaves them: the old one in its rollback window.
        statuses: list[tuple[deployments.Deployment, deployments.Status]] = [
            (old, "draining"),
            (current, "active"),
            (staged, "active"),
        ]
        for deployment, status in statuses:
            await force_status(pool, deployment.id, status)
        instance = await instances.create(
            pool, deployment_id=current.id, region="us-east", node_id=node.id
        )
        await instances.report(pool, instance.id, "running", address="127.0.0.1", port=9)
        await instances.set_health(pool, instance.id, True)
        await logs.append(pool, instance.id, current.id, [("stdout", "listening on :3000")])
    finally:
        await pool.close()


def push_event(edge: EdgeProcess) -> None:
    """GitHub delivers a push to dokedu/app (signed with the webhook's secret)."""
    payload = json.dumps(
        {
            "ref": "refs/heads/main",
            "after": "abc123def456abc123def456abc123def456abcd",
            "repository": {"full_name": "dokedu/app"},
            "head_commit": {"message": "Fix: Updated API endpoints"},
        }
    ).encode()
    signature = "sha256=" + hmac.new(SECRET.encode(), payload, hashlib.sha256).hexdigest()
    req = urllib.request.Request(
        edge.admin_url + "/api/v1/github/events",
        data=payload,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "X-GitHub-Event": "push",
            "X-GitHub-Delivery": "guide-delivery-1",
            "X-Hub-Signature-256": signature,
        },
    )
    with urllib.request.urlopen(req, timeout=10) as answer:
        assert answer.status == 202


@pytest.mark.needs_tool("curl")
def test_operations_guide_curl_examples(empty_database_url: str, tmp_path: Path) -> None:
    require_tool("curl")
    require_tool("jq")
    with running_edge(empty_database_url, tmp_path, env={"ZEITWORK_ADMIN_TOKEN": TOKEN}) as edge:
        api(
            edge,
            "POST",
            "/api/v1/regions",
            {"code": "us-east", "name": "US East", "country": "United States"},
        )
        node = {"region": "us-east", "address": "10.1.0.7", "vcpu": 8, "memory": 16384}
        api(edge, "POST", "/api/v1/nodes", {"hostname": "us-east-worker-7", **node})
        leaving = api(edge, "POST", "/api/v1/nodes", {"hostname": "us-east-worker-6", **node})
        api(
            edge,
            "POST",
            "/api/v1/projects",
            {"name": "dokedu", "org": "dokedu", "github_repo": "dokedu/app", "branch": "main"},
        )
        asyncio.run(seed_dokedu(empty_database_url))
        env = curl_env(tmp_path, edge, NEW_NODE="us-east-worker-7", NODE_ID=leaving["id"])

        for command, check in NODES + PROJECTS + DEPLOYMENTS + GITHUB[:1]:
            check(run(command, env))
        push_event(edge)
        for command, check in GITHUB[1:] + ANALYTICS + REPORT:
            check(run(command, env))
        status, health = edge.get("/health")
        assert status == 200 and health["status"] == "ok", health
