"""The admin API's own rate limit, per token."""

from __future__ import annotations

import logging

import pytest

from edge.ratelimit import Limiter, RateLimit
from tests.admin.conftest import BOOTSTRAP_TOKEN, NO_TOKEN, AdminClient, error_of


@pytest.mark.asyncio
async def test_each_token_has_its_own_limit(
    admin: AdminClient, caplog: pytest.LogCaptureFixture
) -> None:
    admin.ctx.limiter = Limiter(RateLimit(0.1, 3), name="admin")
    for _ in range(3):
        assert (await admin.call("GET", "/api/v1/regions")).status == 200
    with caplog.at_level(logging.WARNING, logger="edge.admin"):
        refused = await admin.call("GET", "/api/v1/regions")
    assert refused.status == 429
    assert error_of(refused)["code"] == "rate_limited"
    assert 1 <= int(refused.header("retry-after") or "0") <= 10
    assert refused.header("ratelimit-policy") == '"admin";q=3;w=30'
    assert any("rate limit: admin over 0.1/s burst 3" in r.getMessage() for r in caplog.records)
    # Another token is counted apart; health and metrics need no token and are not limited.
    node = {"hostname": "w1", "region": "eu", "address": "10.0.0.1", "vcpu": 1, "memory": 512}
    registered = await admin.call("POST", "/api/v1/nodes", node, token=BOOTSTRAP_TOKEN)
    assert registered.status == 400  # the region does not exist: past the limiter, answered
    for _ in range(5):
        assert (await admin.call("GET", "/health", token=NO_TOKEN)).status == 200
    # The document says so.
    admin.ctx.limiter = None
    doc = (await admin.call("GET", "/api/v1/openapi.json")).json()
    assert "429" in doc["paths"]["/api/v1/regions"]["get"]["responses"]
