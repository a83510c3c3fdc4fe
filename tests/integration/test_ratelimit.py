"""Rate limiting per client address, through real sockets."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from edge.ratelimit import RateLimit
from edge.routing import ProjectLimit, RoutingTable, parse_address
from tests.harness import get, request, running_edge
from tests.integration.conftest import StartUpstream

APP = "app.example.com"


@pytest.mark.asyncio
async def test_over_the_limit_is_429_never_forwarded_and_logged(
    upstream: StartUpstream, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    up = await upstream()
    limit = RateLimit(0.5, 2)  # a burst of 2, then one every 2 s
    async with running_edge({APP: [up.address]}, tmp_path, client_rate_limit=limit) as edge:
        with caplog.at_level(logging.WARNING, logger="edge.worker"):
            assert [(await request(edge.port, get(APP))).status for _ in range(2)] == [200, 200]
            refused = await request(edge.port, get(APP))
            for _ in range(20):
                assert (await request(edge.port, get(APP))).status == 429
        assert refused.status == 429
        retry_after = int(refused.header("retry-after") or "0")
        assert 1 <= retry_after <= 2
        assert refused.header("ratelimit-policy") == '"client";q=2;w=4'
        assert (refused.header("ratelimit") or "").startswith('"client";r=0;t=')
        assert len(up.requests) == 2  # the refused ones never reached the instance
        assert edge.worker.metrics.limited[0] == 21
        assert edge.worker.metrics.statuses[429] == 21
        lines = [r.getMessage() for r in caplog.records if "rate limit" in r.getMessage()]
        # 21 refusals within a second: one line, naming the client, the host and the limit.
        assert len(lines) == 1, lines
        assert "127.0.0.1" in lines[0] and APP in lines[0] and "0.5/s burst 2" in lines[0]


@pytest.mark.asyncio
async def test_acme_challenges_are_never_limited(upstream: StartUpstream, tmp_path: Path) -> None:
    up = await upstream()
    limit = RateLimit(0.1, 1)
    async with running_edge({APP: [up.address]}, tmp_path, client_rate_limit=limit) as edge:
        assert (await request(edge.port, get(APP))).status == 200
        assert (await request(edge.port, get(APP))).status == 429
        for _ in range(5):
            answer = await request(edge.port, get(APP, "/.well-known/acme-challenge/token"))
            assert answer.status == 200


@pytest.mark.asyncio
async def test_clients_behind_a_trusted_proxy_are_limited_one_by_one(
    upstream: StartUpstream, tmp_path: Path
) -> None:
    up = await upstream()
    limit = RateLimit(0.1, 1)
    async with running_edge(
        {APP: [up.address]}, tmp_path, client_rate_limit=limit, trusted_proxies=("127.0.0.1",)
    ) as edge:

        def as_client(address: str) -> bytes:
            return get(APP, extra=f"X-Forwarded-For: 198.51.100.7, {address}\r\n")

        assert (await request(edge.port, as_client("203.0.113.1"))).status == 200
        assert (await request(edge.port, as_client("203.0.113.1"))).status == 429
        # Another client behind the same proxy has its own quota.
        assert (await request(edge.port, as_client("203.0.113.2"))).status == 200


@pytest.mark.asyncio
async def test_a_refused_request_with_a_body_closes_the_connection(
    upstream: StartUpstream, tmp_path: Path
) -> None:
    up = await upstream()
    async with running_edge(
        {APP: [up.address]}, tmp_path, client_rate_limit=RateLimit(0.1, 1)
    ) as edge:
        assert (await request(edge.port, get(APP))).status == 200
        post = (f"POST / HTTP/1.1\r\nHost: {APP}\r\nContent-Length: 5\r\n\r\nhello").encode()
        refused = await request(edge.port, post)
        assert refused.status == 429
        assert (refused.header("connection") or "").lower() == "close"


@pytest.mark.asyncio
async def test_a_projects_hosts_share_its_limit_across_reloads(
    upstream: StartUpstream, tmp_path: Path
) -> None:
    up = await upstream()
    address = parse_address(up.address)
    shop, shop_domain, blog = "shop.example.org", "www.shop.example.org", "blog.example.org"
    routes = {shop: (address,), shop_domain: (address,), blog: (address,)}

    def with_limit(burst: int) -> RoutingTable:
        limit = ProjectLimit("project-shop", 1, burst)
        return RoutingTable(routes, limits={shop: limit, shop_domain: limit})

    async with running_edge({}, tmp_path) as edge:
        edge.worker.install(with_limit(2))
        statuses = [(await request(edge.port, get(host))).status for host in (shop, shop_domain)]
        assert statuses == [200, 200]
        refused = await request(edge.port, get(shop_domain))
        assert refused.status == 429
        assert refused.header("ratelimit-policy") == '"project";q=2;w=2'
        # Another project is not affected.
        assert (await request(edge.port, get(blog))).status == 200
        assert edge.worker.metrics.limited == [0, 1]
        # A reload with a larger burst keeps what the project has used: one more request
        # passes, not a fresh burst of three.
        edge.worker.install(with_limit(3))
        assert (await request(edge.port, get(shop))).status == 200
        assert (await request(edge.port, get(shop))).status == 429
        # The limit gone, the project is served again.
        edge.worker.install(RoutingTable(routes))
        assert (await request(edge.port, get(shop))).status == 200
        assert edge.worker.project_limiters == {}
