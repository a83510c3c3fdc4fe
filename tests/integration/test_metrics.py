"""What the proxy counts, through real sockets: responses by status, latencies, instance
failures by kind and retries."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge import metrics
from tests.harness import free_port, get, request, responder, running_edge
from tests.integration.conftest import StartUpstream

APP = "app.example.com"


@pytest.mark.asyncio
async def test_responses_are_counted_by_status_with_latencies(
    upstream: StartUpstream, tmp_path: Path
) -> None:
    up = await upstream(responder(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    async with running_edge({APP: [up.address]}, tmp_path) as edge:
        counts = edge.worker.metrics
        for _ in range(3):
            assert (await request(edge.port, get(APP))).status == 200
        assert (await request(edge.port, get("unknown.example.com"))).status == 404
        assert counts.statuses[200] == 3 and counts.statuses[404] == 1
        assert sum(counts.request_buckets) == 4 and counts.request_sum > 0
        # Only the requests that reached an instance have an upstream latency.
        assert sum(counts.upstream_buckets) == 3
        block = [0.0] * metrics.SIZE
        edge.worker.metrics_block = block
        edge.worker.publish_metrics()
        assert block[200] == 3 and block[404] == 1


@pytest.mark.asyncio
async def test_instance_failures_are_counted_by_kind(tmp_path: Path) -> None:
    refused = f"127.0.0.1:{free_port()}"
    async with running_edge({APP: [refused]}, tmp_path, retries=1) as edge:
        assert (await request(edge.port, get(APP))).status == 502
        counts = edge.worker.metrics
        # Refused, tried again (the only instance there is), refused again.
        assert counts.errors[metrics.CONNECT] == 2 and counts.retries == 1
        assert counts.statuses[502] == 1
    async with running_edge({APP: [refused]}, tmp_path, retries=0) as edge:
        assert (await request(edge.port, get(APP))).status == 502
        assert edge.worker.metrics.errors[metrics.CONNECT] == 1
        assert edge.worker.metrics.retries == 0
