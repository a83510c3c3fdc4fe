from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness import Client, Upstream, get, running_edge


@pytest.mark.asyncio
async def test_get_is_proxied_with_forwarded_headers(tmp_path: Path) -> None:
    up = await Upstream().start()
    try:
        async with running_edge({"app.example.com": [up.address]}, tmp_path) as edge:
            client = await Client.connect(edge.port)
            await client.send(get("app.example.com", "/hello?x=1"))
            resp = await client.read_response()
            assert resp.status == 200
            seen = up.requests[0]
            assert seen.target == "/hello?x=1"
            assert seen.header("x-forwarded-for") == "127.0.0.1"
            assert seen.header("via") == "1.1 zeitwork"
            await client.close()
    finally:
        await up.stop()
