"""The admin API in the real ``zeitwork edge`` process: token, health, metrics, leadership."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from tests.admin.process import running_edge


def test_generated_token_health_and_metrics(empty_database_url: str, tmp_path: Path) -> None:
    with running_edge(empty_database_url, tmp_path) as edge:
        token_file = edge.data_dir / "admin-token"
        # Generated on first start, readable by its owner only, and its place is logged.
        assert stat.S_IMODE(os.stat(token_file).st_mode) == 0o600
        assert f"admin token from {token_file} (generated)" in edge.log()
        token = token_file.read_text().strip()
        assert token not in edge.log()

        status, health = edge.get("/health")
        assert status == 200, health
        assert health["status"] == "ok" and health["database"]["status"] == "up"
        # The worker installed a table moments ago; a single edge takes the leader lock.
        assert 0 <= health["routing"]["table_age_seconds"] < 30
        deadline = time.monotonic() + 10
        while not health["leader"] and time.monotonic() < deadline:
            time.sleep(0.2)
            health = edge.get("/health")[1]
        assert health["leader"] is True

        status, metrics = edge.get("/metrics")
        assert status == 200
        assert "postgres_up 1.0" in metrics and "zeitwork_leader 1.0" in metrics
        assert "zeitwork_routing_table_age_seconds" in metrics

        assert edge.get("/api/v1/regions")[0] == 401
        assert edge.get("/api/v1/regions", token)[0] == 200
        assert "401 unauthorized: GET /api/v1/regions from 127.0.0.1" in edge.log()
        assert edge.stop() == 0
    # The same data directory keeps the same token.
    with running_edge(empty_database_url, tmp_path) as again:
        assert f"admin token from {token_file}" in again.log()
        assert again.get("/api/v1/regions", token)[0] == 200


def test_configured_token_from_environment(empty_database_url: str, tmp_path: Path) -> None:
    token = "configured-token-0123456789"
    with running_edge(empty_database_url, tmp_path, env={"ZEITWORK_ADMIN_TOKEN": token}) as edge:
        assert "admin token from configuration" in edge.log()
        assert not (edge.data_dir / "admin-token").exists()
        assert edge.get("/api/v1/regions", token)[0] == 200
        assert edge.get("/api/v1/regions", "something-else")[0] == 401


def test_one_leader_among_two_edges(empty_database_url: str, tmp_path: Path) -> None:
    with (
        running_edge(empty_database_url, tmp_path, name="a") as a,
        running_edge(empty_database_url, tmp_path, name="b") as b,
    ):
        deadline = time.monotonic() + 10
        leaders: list[bool] = []
        while time.monotonic() < deadline:
            leaders = [a.get("/health")[1]["leader"], b.get("/health")[1]["leader"]]
            if any(leaders):
                break
            time.sleep(0.2)
        assert sorted(leaders) == [False, True]
        # The leader goes; the other edge takes the lock within a few seconds.
        leader, other = (a, b) if leaders[0] else (b, a)
        assert leader.stop() == 0
        deadline = time.monotonic() + 10
        while not other.get("/health")[1]["leader"]:
            assert time.monotonic() < deadline, other.log()
            time.sleep(0.2)


def test_admin_port_taken_is_a_clear_error(empty_database_url: str, tmp_path: Path) -> None:
    with running_edge(empty_database_url, tmp_path, name="first") as first:
        with running_edge(
            empty_database_url,
            tmp_path,
            "--admin-port",
            str(first.admin_port),
            name="second",
            wait=False,
        ) as second:
            assert second.proc.wait(30) == 1
            assert f"cannot listen on the admin port 127.0.0.1:{first.admin_port}" in second.log()
            assert "Traceback" not in second.log()
