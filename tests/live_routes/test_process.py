"""``zeitwork edge --database-url``: the master migrates an empty database once, and every
worker process routes from it live."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from pathlib import Path

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import pytest

from tests.harness import HOST, Upstream, free_port, get, request
from tests.integration.test_process import zeitwork_command
from tests.live_routes.seed import Seed

pytestmark = pytest.mark.asyncio

STARTUP_TIMEOUT = 20.0


def spawn_edge(url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``zeitwork edge`` with two workers, in its own session (so its group can be killed)."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                *zeitwork_command(),
                "edge",
                "--database-url",
                url,
                "--host",
                HOST,
                "--http-port",
                str(port),
                "--workers",
                "2",
                "--admin-host",
                HOST,
                "--admin-port",
                str(free_port()),
                "--data-dir",
                str(log.parent / "data"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        )


def read(log: Path) -> str:
    return log.read_text(errors="replace")  # a small file: reading it inline is fine


async def wait_log(log: Path, proc: subprocess.Popen[bytes], text: str, count: int) -> None:
    async with asyncio.timeout(STARTUP_TIMEOUT):
        while read(log).count(text) < count:
            assert proc.poll() is None, read(log)
            await asyncio.sleep(0.05)


async def test_edge_routes_live_from_the_database(empty_database_url: str, tmp_path: Path) -> None:
    up = await Upstream().start()
    port = free_port()
    log = tmp_path / "edge.log"
    url = empty_database_url
    proc = spawn_edge(url, port, log)
    try:
        await wait_log(log, proc, " serving http://", 2)
        assert "database migrated: 0001_platform, 0002_admin_api" in read(log)
        conn = await asyncpg.connect(url)
        try:
            seed = await Seed.create(conn)
            _, _, deployment, nano = await seed.app()
            host = f"web-{nano}-acme.zeitwork.app"
            await seed.instance(deployment, port=up.port)
            # Every worker follows: new connections land on either of them.
            async with asyncio.timeout(5):
                ok = 0
                while ok < 20:
                    response = await request(port, get(host))
                    ok = ok + 1 if response.status == 200 else 0
                    await asyncio.sleep(0.005)
        finally:
            await conn.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            while proc.poll() is None:
                await asyncio.sleep(0.05)
        assert proc.returncode == 0, read(log)
        assert "Traceback" not in read(log)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        await up.stop()
