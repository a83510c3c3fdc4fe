"""Instance choice with real upstreams: the edge's own region first, failover to other
regions, passive ejection of an instance that refuses, and its return on its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from edge.routing import RoutingTable, parse_address
from tests.harness import Upstream, get, request, running_edge
from tests.integration.conftest import StartUpstream

APP = "app.example.com"


def table_with_regions(regions: dict[str, str]) -> RoutingTable:
    """One route for APP over the given addresses, each with its region."""
    addresses = {parse_address(a): r for a, r in regions.items()}
    return RoutingTable({APP: tuple(addresses)}, source="test", regions=addresses)


@pytest.mark.asyncio
async def test_own_region_is_preferred_then_failed_over_and_returned_to(
    tmp_path: Path, upstream: StartUpstream
) -> None:
    local = await upstream()
    remote = await upstream()
    async with running_edge({}, tmp_path, region="eu-west", ejection_time=0.3) as edge:
        edge.worker.install(
            table_with_regions({local.address: "eu-west", remote.address: "us-east"})
        )
        for _ in range(10):
            assert (await request(edge.port, get(APP))).status == 200
        assert (len(local.requests), len(remote.requests)) == (10, 0)

        # The local instance goes away: the request that finds it gone is retried on the
        # other region, and the refusing instance is then left alone while ejected.
        port = local.port
        await local.stop()
        for _ in range(10):
            assert (await request(edge.port, get(APP))).status == 200
        assert len(remote.requests) == 10

        # It comes back on the same address: once its ejection ends (it grew while the
        # instance kept refusing, so allow a few periods), traffic returns on its own.
        back = await Upstream(port=port).start()
        try:
            async with asyncio.timeout(5):
                while not back.requests:
                    assert (await request(edge.port, get(APP))).status == 200
                    await asyncio.sleep(0.05)
            served_remotely = len(remote.requests)
            for _ in range(10):
                assert (await request(edge.port, get(APP))).status == 200
            assert len(back.requests) == 11
            assert len(remote.requests) == served_remotely
        finally:
            await back.stop()
