"""The routes file provider, its validation messages, and a route's choice of instance."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from edge.config import EdgeConfig, ProxyLimits
from edge.proxy.upstream import UpstreamPool
from edge.proxy.worker import ProxyWorker, Route
from edge.routing import (
    Address,
    FileRouteProvider,
    RoutesError,
    normalize_host,
    parse_address,
    parse_routes_document,
)

# -- documents -------------------------------------------------------------------------


def test_minimal_document() -> None:
    table = parse_routes_document(
        {"routes": {"app.example.com": ["127.0.0.1:9001", "127.0.0.1:9002"]}}, "f.json"
    )
    assert dict(table.routes) == {
        "app.example.com": (Address("127.0.0.1", 9001), Address("127.0.0.1", 9002))
    }
    assert len(table) == 1
    assert table.source == "f.json"


def test_object_form_with_instances() -> None:
    table = parse_routes_document(
        {"routes": {"a.example.com": {"instances": ["10.0.0.1:80"]}, "b.example.com": {}}}, "f"
    )
    assert table.routes["a.example.com"] == (Address("10.0.0.1", 80),)
    assert table.routes["b.example.com"] == ()


def test_hosts_are_normalised_and_addresses_deduplicated() -> None:
    table = parse_routes_document(
        {"routes": {"App.Example.COM.": ["10.0.0.1:80", "10.0.0.1:80", "[::1]:8080"]}}, "f"
    )
    assert table.routes["app.example.com"] == (Address("10.0.0.1", 80), Address("::1", 8080))


def test_empty_instance_list_is_a_route_without_instances() -> None:
    assert parse_routes_document({"routes": {"a.example.com": []}}, "f").routes == {
        "a.example.com": ()
    }


@pytest.mark.parametrize(
    ("document", "words"),
    [
        pytest.param([], ["top level"], id="not-an-object"),
        pytest.param({}, ["'routes'"], id="no-routes"),
        pytest.param({"routes": [], "x": 1}, ["unknown", "'x'"], id="unknown-top-level-key"),
        pytest.param({"route": {}}, ["unknown", "'route'"], id="misspelled-routes"),
        pytest.param({"routes": ["a"]}, ["'routes' must be an object"], id="routes-not-object"),
        pytest.param(
            {"routes": {"a.example.com": {"instance": ["10.0.0.1:80"]}}},
            ["a.example.com", "unknown", "'instance'"],
            id="unknown-route-key",
        ),
        pytest.param(
            {"routes": {"a.example.com": "10.0.0.1:80"}},
            ["a.example.com", "list"],
            id="instances-not-a-list",
        ),
        pytest.param(
            {"routes": {"a.example.com": ["10.0.0.1"]}},
            ["a.example.com", "'10.0.0.1'", "host:port"],
            id="address-without-port",
        ),
        pytest.param({"routes": {"a.example.com": ["10.0.0.1:0"]}}, ["1-65535"], id="port-zero"),
        pytest.param(
            {"routes": {"a.example.com": ["10.0.0.1:65536"]}}, ["1-65535"], id="port-too-big"
        ),
        pytest.param(
            {"routes": {"a.example.com": ["10.0.0.1:http"]}}, ["host:port"], id="port-not-number"
        ),
        pytest.param(
            {"routes": {"a.example.com": [9001]}}, ["string", "9001"], id="address-not-string"
        ),
        pytest.param(
            {"routes": {"a.example.com": ["bad host!:80"]}}, ["invalid host"], id="bad-host"
        ),
        pytest.param(
            {"routes": {"a.example.com": [], "A.EXAMPLE.COM": []}},
            ["appears twice"],
            id="duplicate-host",
        ),
        pytest.param({"routes": {"": []}}, ["invalid host"], id="empty-host"),
        pytest.param({"routes": {"a..b": []}}, ["invalid host"], id="empty-label"),
        pytest.param({"routes": {"-a.example.com": []}}, ["invalid host"], id="leading-dash"),
        pytest.param({"routes": {"a_b.example.com": []}}, ["invalid host"], id="underscore"),
    ],
)
def test_invalid_documents_name_the_problem(document: Any, words: list[str]) -> None:
    with pytest.raises(RoutesError) as info:
        parse_routes_document(document, "routes.json")
    message = str(info.value)
    assert message.startswith("routes.json") or "invalid host" in message
    for word in words:
        assert word in message, message


# -- hosts and addresses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("app.example.com", "app.example.com"),
        ("APP.Example.Com", "app.example.com"),
        ("app.example.com.", "app.example.com"),
        (" app.example.com ", "app.example.com"),
        ("localhost", "localhost"),
        ("a-b.c1.example", "a-b.c1.example"),
        ("x" * 63 + ".com", "x" * 63 + ".com"),
    ],
)
def test_normalize_host(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", ".", "a..b", "-a.com", "a-.com", "a b.com", "ä.com", "x" * 64 + ".com", "a." * 127 + "a"],
)
def test_normalize_host_rejects(raw: str) -> None:
    with pytest.raises(RoutesError, match="invalid host"):
        normalize_host(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("10.0.0.5:3000", Address("10.0.0.5", 3000)),
        ("[::1]:80", Address("::1", 80)),
        ("[2001:DB8::1]:443", Address("2001:db8::1", 443)),
        ("App.Internal:8080", Address("app.internal", 8080)),
        ("10.0.0.5:65535", Address("10.0.0.5", 65535)),
    ],
)
def test_parse_address(raw: str, expected: Address) -> None:
    assert parse_address(raw) == expected


def test_address_str_round_trips() -> None:
    for text in ("10.0.0.5:3000", "[::1]:80"):
        assert str(parse_address(text)) == text


@pytest.mark.parametrize(
    "raw", ["10.0.0.5", ":80", "10.0.0.5:", "[::1]", "::1:80x", "10.0.0.5:-1", "10.0.0.5:1e3"]
)
def test_parse_address_rejects(raw: str) -> None:
    with pytest.raises(RoutesError):
        parse_address(raw)


# -- the routes file -----------------------------------------------------------------------


def test_file_provider_loads(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": {"a.example.com": ["127.0.0.1:9001"]}}))
    provider = FileRouteProvider(path)
    assert str(path) in provider.describe()
    table = provider.load_sync()
    assert table.routes == {"a.example.com": (Address("127.0.0.1", 9001),)}
    assert table.source == str(path)


@pytest.mark.asyncio
async def test_file_provider_reads_again_on_every_load(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": {"a.example.com": ["127.0.0.1:9001"]}}))
    provider = FileRouteProvider(path)
    assert set((await provider.load()).routes) == {"a.example.com"}
    path.write_text(json.dumps({"routes": {"b.example.com": ["127.0.0.1:9001"]}}))
    assert set((await provider.load()).routes) == {"b.example.com"}


def test_invalid_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text('{\n  "routes": {\n    "a.example.com": ["127.0.0.1:9001",]\n  }\n}\n')
    with pytest.raises(RoutesError) as info:
        FileRouteProvider(path).load_sync()
    message = str(info.value)
    assert str(path) in message
    assert "line 3" in message
    assert "column" in message


def test_missing_file_is_a_routes_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(RoutesError, match=r"nope\.json"):
        FileRouteProvider(path).load_sync()


def test_validation_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"routes": {"a.example.com": ["127.0.0.1:99999"]}}))
    with pytest.raises(RoutesError) as info:
        FileRouteProvider(path).load_sync()
    assert str(path) in str(info.value)
    assert "a.example.com" in str(info.value)


# -- Route.pick ------------------------------------------------------------------------------


def _worker() -> ProxyWorker:
    # Pools are only asked for busy, down_until and region (and eject() for the worker's
    # limits); the worker is real (the compiled pool accepts nothing else), its loop unused.
    config = EdgeConfig(limits=ProxyLimits(ejection_time=1.0, max_ejection_time=8.0))

    async def make() -> ProxyWorker:
        return ProxyWorker(config, FileRouteProvider(Path("unused-routes.json")))

    return asyncio.run(make())


def pools(n: int, region: str = "", first: int = 1) -> list[UpstreamPool]:
    worker = _worker()
    made = [UpstreamPool(worker, Address(f"10.0.0.{i + first}", 80)) for i in range(n)]
    for pool in made:
        pool.region = region
    return made


def test_pick_spreads_over_equally_loaded_instances() -> None:
    ps = pools(3)
    route = Route("x", ps)
    counts = Counter(route.pick(0.0, None) for _ in range(3000))
    assert set(counts) == set(ps)
    assert all(800 < n < 1200 for n in counts.values()), counts


def test_pick_prefers_the_instance_with_fewer_requests_in_flight() -> None:
    a, b, c = ps = pools(3)
    a.busy, b.busy, c.busy = 10, 0, 1
    route = Route("x", ps)
    picked = Counter(route.pick(0.0, None) for _ in range(600))
    assert picked[a] == 0  # the busiest loses every pair it is drawn in
    assert picked[b] > picked[c] > 0  # c wins only when drawn with a


def test_pick_skips_avoided_pool() -> None:
    a, b, c = ps = pools(3)
    route = Route("x", ps)
    assert {route.pick(0.0, b) for _ in range(200)} == {a, c}


def test_pick_skips_ejected_instances_until_their_ejection_ends() -> None:
    a, b, c = ps = pools(3)
    b.down_until = 100.0
    route = Route("x", ps)
    assert {route.pick(50.0, None) for _ in range(200)} == {a, c}
    assert b in {route.pick(100.0, None) for _ in range(200)}  # back on its own


def test_pick_when_every_pool_is_ejected_takes_the_one_back_soonest() -> None:
    a, b = ps = pools(2)
    a.down_until, b.down_until = 100.0, 50.0
    route = Route("x", ps)
    assert route.pick(0.0, None) is b  # never refused
    assert route.pick(0.0, b) is a  # but not the one that just failed


def test_pick_single_pool_even_if_avoided() -> None:
    [a] = ps = pools(1)
    route = Route("x", ps)
    assert route.pick(0.0, a) is a
    a.down_until = 100.0
    assert route.pick(0.0, a) is a


def test_pick_prefers_the_edges_own_region_and_fails_over() -> None:
    local = pools(2, region="eu-west")
    remote = pools(2, region="us-east", first=10)
    route = Route("x", local + remote, region="eu-west")
    assert {route.pick(0.0, None) for _ in range(200)} == set(local)
    for pool in local:
        pool.down_until = 100.0
    assert {route.pick(0.0, None) for _ in range(200)} == set(remote)  # failover
    assert {route.pick(100.0, None) for _ in range(200)} == set(local)  # and back


def test_pick_without_instances_in_its_region_uses_all() -> None:
    remote = pools(2, region="us-east")
    route = Route("x", remote, region="eu-west")
    assert {route.pick(0.0, None) for _ in range(200)} == set(remote)


def test_ejection_grows_with_failures_in_a_row_and_is_capped() -> None:
    [a] = pools(1)
    ends = []
    for _ in range(6):
        a.eject(0.0)
        ends.append(a.down_until)
    assert ends == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
