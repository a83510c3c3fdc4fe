"""The access log: off by default, one JSON line per request when on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from edge.accesslog import AccessLog
from tests.harness import get, request, running_edge
from tests.integration.conftest import StartUpstream

APP = "app.example.com"


@pytest.mark.asyncio
async def test_off_by_default(upstream: StartUpstream, tmp_path: Path) -> None:
    up = await upstream()
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        assert edge.worker.access_log is None
        assert (await request(edge.port, get(APP))).status == 200


@pytest.mark.asyncio
async def test_one_json_line_per_request(upstream: StartUpstream, tmp_path: Path) -> None:
    up = await upstream()
    path = tmp_path / "access.log"
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        # The worker of the harness is built from a config without a log: switch it on.
        edge.worker.config = dataclasses.replace(edge.worker.config, access_log=str(path))
        edge.worker.access_log = AccessLog(str(path))
        ok = await request(edge.port, get(APP, "/hello?x=1"))
        post = f"POST /form HTTP/1.1\r\nHost: {APP}\r\nContent-Length: 5\r\n\r\nhello".encode()
        await request(edge.port, post)
        missing = await request(edge.port, get("nowhere.example.com", "/x"))
        edge.worker.access_log.flush()
        lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["status"] for line in lines] == [200, 200, 404]
    first, second, third = lines
    assert first["host"] == APP and first["method"] == "GET" and first["path"] == "/hello?x=1"
    assert first["client"] == "127.0.0.1"
    # The id the instance was given (the echo upstream shows its request's fields).
    sent = {name.lower(): value for name, value in ok.json()["headers"]}
    assert first["request_id"] == sent["x-request-id"]
    assert first["upstream"] == up.address and first["bytes_in"] == 0
    # The whole response: its head and its body.
    assert len(ok.body) + 50 < first["bytes_out"] < len(ok.body) + 2000
    assert first["duration_ms"] >= 0 and first["time"].endswith("Z")
    assert second["method"] == "POST" and second["bytes_in"] == 5
    assert third["upstream"] is None and third["host"] == "nowhere.example.com"
    assert missing.status == 404


@pytest.mark.asyncio
async def test_reopened_after_rotation(upstream: StartUpstream, tmp_path: Path) -> None:
    up = await upstream()
    path = tmp_path / "access.log"
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        edge.worker.access_log = AccessLog(str(path))
        await request(edge.port, get(APP))
        edge.worker.access_log.flush()
        path.rename(tmp_path / "access.log.1")
        assert await edge.reload()  # SIGHUP
        await request(edge.port, get(APP))
        edge.worker.access_log.flush()
        assert len((tmp_path / "access.log.1").read_text().splitlines()) == 1
        assert len(path.read_text().splitlines()) == 1
