"""Micro-benchmarks of the hot paths, on the real code with small inputs built outside the timing.

Each runs once in the normal suite (``--benchmark-disable`` in ``pyproject.toml``) and asserts
what it computed, so a behaviour change fails here too. For figures:
``.venv/bin/pytest tests/bench/test_micro.py --benchmark-enable --benchmark-only``.

What each measures:

- the request side of the proxy: one ``GET`` head through a real :class:`ClientConnection`
  on a fake transport (tests/unit/fakes.py), parsed, routed and written to an idle pooled
  upstream connection; the response that frees the connection again is untimed set-up. The
  loop is pytest-asyncio's (asyncio, not uvloop), which the request side does not touch;
- route lookup among 100,000 hosts: the :class:`RoutingTable`'s mapping, and the worker's
  compiled ``dict`` plus the instance choice, as ``ClientConnection`` does it per request;
- the rate limiter's check: a hot key allowed, a hot key refused, a new key at the cap;
- placement of a small demand on 1,000 nodes;
- the routing table compile of 10,000 database rows (no database: the rows are tuples).
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from edge.config import EdgeConfig, ProxyLimits
from edge.proxy.worker import ProxyWorker
from edge.ratelimit import Limiter, RateLimit
from edge.routing import Address, FileRouteProvider, RoutingTable
from edge.store.routes import _compile
from scheduler.placement import Demand, Node, place
from tests.unit.fakes import ProtocolRig, response

APP = "app.example.com"
A = "10.0.0.1:8080"
GET = (
    b"GET /api/items?page=2 HTTP/1.1\r\n"
    b"Host: app.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) bench/1\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"Connection: keep-alive\r\n"
    b"\r\n"
)
FORWARDED_HEAD = (
    b"GET /api/items?page=2 HTTP/1.1\r\n"
    b"Host: app.example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) bench/1\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Accept-Language: en-US,en;q=0.9\r\n"
    b"X-Forwarded-For: 203.0.113.7\r\n"
    b"X-Forwarded-Proto: http\r\n"
    b"X-Forwarded-Host: app.example.com\r\n"
    b"X-Request-Id: "
)
ROUNDS = 2_000

T = TypeVar("T")


def pedantic(
    benchmark: BenchmarkFixture,
    target: Callable[[], T],
    *,
    rounds: int,
    iterations: int = 1,
    warmup_rounds: int = 0,
    setup: Callable[[], None] | None = None,
) -> T:
    """``benchmark.pedantic`` with a type (pytest-benchmark has no annotations)."""
    result: T = benchmark.pedantic(  # type: ignore[no-untyped-call]
        target, setup=setup, rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds
    )
    return result


# -- the request side of the proxy -----------------------------------------------------


@pytest.mark.asyncio
async def test_request_head_to_upstream_write(benchmark: BenchmarkFixture) -> None:
    rig = ProtocolRig.create({APP: [A]})
    up = rig.add_idle_upstream(A)
    client = rig.client()
    protocol, upstream = client.protocol, up.conn
    answer = response(b"hello")
    writes: list[int] = []  # upstream writes of each request but the last
    sent = 0

    def free_the_connection() -> None:
        # Untimed: the previous request's response, which puts the upstream connection back
        # in the pool idle, and the recorded bytes dropped so they do not pile up.
        if up.transport.chunks:
            writes.append(len(up.transport.chunks))
            upstream.data_received(answer)
            up.transport.chunks.clear()
            client.transport.chunks.clear()

    def request() -> None:
        nonlocal sent
        sent += 1
        protocol.data_received(GET)

    pedantic(benchmark, request, setup=free_the_connection, rounds=ROUNDS, warmup_rounds=50)

    # The last request went out, rewritten, in one write on the pooled connection, and every
    # earlier one took exactly one write and got its response back.
    [head] = up.transport.chunks
    assert head.startswith(FORWARDED_HEAD), head
    assert head.endswith(b"\r\nVia: 1.1 zeitwork\r\n\r\n"), head
    assert len(writes) == sent - 1 and set(writes) <= {1}
    assert client.transport.data == b""  # the last response has not come yet
    assert rig.connects == []  # no new connection: the idle one served every request
    upstream.data_received(answer)
    assert client.transport.data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert client.transport.data.endswith(b"\r\n\r\nhello")
    await rig.settle()
    rig.check_loop_errors()


# -- route lookup ----------------------------------------------------------------------

HOSTS = 100_000


def _host(i: int) -> str:
    return f"app{i}-k3j9x2-org{i % 977}.zeitwork.app"


def _addresses(i: int) -> tuple[Address, ...]:
    # Two instances per host on 5,000 distinct addresses, as many hosts share none.
    n = i % 5_000
    return (Address(f"10.{n >> 8}.{n & 255}.1", 3000), Address(f"10.{n >> 8}.{n & 255}.2", 3000))


@pytest.fixture(scope="module")
def big_table() -> RoutingTable:
    return RoutingTable({_host(i): _addresses(i) for i in range(HOSTS)}, source="bench")


def test_route_lookup_in_table(benchmark: BenchmarkFixture, big_table: RoutingTable) -> None:
    routes = big_table.routes
    host = _host(54_321)

    found = benchmark(routes.get, host)

    assert len(big_table) == HOSTS
    assert found == (Address("10.16.225.1", 3000), Address("10.16.225.2", 3000))
    assert routes.get("app54321-k3j9x2-org0.zeitwork.app") is None


@pytest.mark.asyncio
async def test_route_lookup_and_pick_in_worker(
    benchmark: BenchmarkFixture, big_table: RoutingTable
) -> None:
    routes_path = Path("/nonexistent/routes.json")
    config = EdgeConfig(
        routes_path=routes_path,
        http_host="127.0.0.1",
        http_port=8000,
        workers=1,
        limits=ProxyLimits(),
    )
    worker = ProxyWorker(config, FileRouteProvider(routes_path))
    worker.install(big_table)
    now = worker.now
    # As the request arrives: the Host field's bytes, with a port to strip.
    host_field = _host(54_321).upper().encode() + b":80"

    def lookup() -> Address:
        name = host_field.lower()
        if b":" in name and name[-1:].isdigit():
            name = name.rpartition(b":")[0]
        route = worker.routes[name]
        return route.pick(now, None).address

    picked = benchmark(lookup)

    assert len(worker.routes) == HOSTS
    assert picked in {Address("10.16.225.1", 3000), Address("10.16.225.2", 3000)}
    assert len(worker.pools) == 10_000  # pools are shared across the hosts of an address
    # Both instances get picked: the choice is not stuck on one.
    assert {lookup() for _ in range(200)} == set(_addresses(54_321))
    for pool in worker.pools.values():
        pool.close()
    await asyncio.sleep(0)


# -- the rate limiter ------------------------------------------------------------------

NOW = 1_000_000.0


def test_ratelimit_hot_key_allowed(benchmark: BenchmarkFixture) -> None:
    # A burst no run gets through, so the clock can stand still and every check passes.
    limiter = Limiter(RateLimit(100, 1_000_000_000), name="client")
    limiter.check("203.0.113.7", NOW)

    wait = benchmark(limiter.check, "203.0.113.7", NOW)

    assert wait == 0.0
    assert limiter.size == 1
    assert limiter.remaining("203.0.113.7", NOW) < 1_000_000_000 - 1


def test_ratelimit_hot_key_refused(benchmark: BenchmarkFixture) -> None:
    limiter = Limiter(RateLimit(10, 5), name="client")
    for _ in range(5):
        assert limiter.check("203.0.113.7", NOW) == 0.0

    wait = benchmark(limiter.check, "203.0.113.7", NOW)

    # Refusals cost no quota: the wait stays one interval, however many were refused.
    assert wait == pytest.approx(0.1, abs=1e-3)
    assert limiter.remaining("203.0.113.7", NOW) == 0


def test_ratelimit_new_key_at_cap(benchmark: BenchmarkFixture) -> None:
    cap, rounds, iterations = 10_000, 200, 50
    limiter = Limiter(RateLimit(10, 20), max_keys=cap, name="client")
    for i in range(cap):
        limiter.check(f"10.0.{i >> 8}.{i & 255}", NOW)
    assert limiter.size == cap
    # Distinct new keys, made outside the timing; one per call (the warm-up round and one
    # call for the result come on top of the timed ones).
    fresh = iter([f"fd00::{i:x}" for i in range((rounds + 1) * iterations + 1)])

    def check_new_key() -> float:
        return limiter.check(next(fresh), NOW)

    wait = pedantic(benchmark, check_new_key, rounds=rounds, iterations=iterations, warmup_rounds=1)

    assert wait == 0.0  # a new key is allowed, cap or not
    assert limiter.size <= cap
    # The cap evicted the oldest keys, still within their burst window: counted as evicted.
    assert limiter.evicted > 0
    assert limiter.remaining("10.0.0.0", NOW) == 20  # gone: a fresh burst
    # A new key is counted and kept, at the cap as below it.
    assert limiter.check("192.0.2.1", NOW) == 0.0
    assert limiter.remaining("192.0.2.1", NOW) == 19
    assert limiter.size <= cap


# -- placement -------------------------------------------------------------------------

REGIONS = ("eu-central", "eu-west", "us-east", "us-west", "ap-south")


@pytest.fixture(scope="module")
def fleet() -> list[Node]:
    # 1,000 nodes in 5 regions, loaded unevenly, a few not ready; deployment "d-7" already
    # has an instance on the first node of each region.
    return [
        Node(
            id=f"node-{i:04d}",
            region=REGIONS[i % 5],
            ready=i % 97 != 0,
            vcpu=8,
            memory=32_768,
            used_vcpu=(i * 37) % 8,
            used_memory=(i * 4_099) % 32_768,
            instances_of={"d-7": 1} if i < 5 else {},
        )
        for i in range(1_000)
    ]


def test_placement_small_demand_on_1000_nodes(
    benchmark: BenchmarkFixture, fleet: list[Node]
) -> None:
    demand = Demand(deployment="d-7", per_region=3, vcpu=0.5, memory=512)

    placement = benchmark(place, fleet, demand)

    assert placement.complete, placement.reason
    assert len(placement.assignments) == 15
    assert [a.region for a in placement.assignments] == [r for r in sorted(REGIONS) for _ in "123"]
    chosen = {a.node_id for a in placement.assignments}
    assert len(chosen) == 15  # spread: never two on one node while others have room
    assert chosen.isdisjoint(f"node-{i:04d}" for i in range(5))  # they already run one
    by_id = {node.id: node for node in fleet}
    assert all(by_id[n].ready for n in chosen)


# -- the routing table compile ---------------------------------------------------------

ROWS = 10_000
APPS = "zeitwork.app"


def _rows() -> list[tuple[object, ...]]:
    """Rows as ``ROUTES_QUERY`` returns them: 4,500 deployment hosts with two running
    instances each, but every tenth down (one row, no address), every fifth project
    rate-limited; and 725 custom domains served by the deployments' instances."""
    rows: list[tuple[object, ...]] = []
    for i in range(4_500):
        host = f"app{i}-k3j9x2-org.{APPS}"
        project = f"p{i}"
        rps, burst = (100, 200) if i % 5 == 0 else (None, None)
        if i % 10 == 9:
            rows.append((0, host, None, None, None, project, rps, burst, None))
        else:
            n = i % 3_000
            for k in (1, 2):
                address = f"10.{n >> 8}.{n & 255}.{k}"
                rows.append((0, host, address, 3000, "eu-central", project, rps, burst, None))
    for d in range(725):
        n = d % 3_000
        for k in (1, 2):
            address = f"10.{n >> 8}.{n & 255}.{k}"
            rows.append(
                (1, f"www.shop{d}.example", address, 3000, "eu-central", f"p{d}", None, None, 300)
            )
    return rows


def test_routing_table_compile_10000_rows(benchmark: BenchmarkFixture) -> None:
    rows = _rows()
    assert len(rows) == ROWS

    def compile_rows() -> RoutingTable:
        # As load_routes runs it: with the cyclic collector paused (see there why).
        gc.disable()
        try:
            return _compile(rows, "postgresql")
        finally:
            gc.enable()

    table = pedantic(benchmark, compile_rows, rounds=20, warmup_rounds=2)

    hosts = {row[1] for row in rows}
    assert len(table) == len(hosts) == 5_225
    assert table.routes[f"app0-k3j9x2-org.{APPS}"] == (
        Address("10.0.0.1", 3000),
        Address("10.0.0.2", 3000),
    )
    assert table.routes[f"app9-k3j9x2-org.{APPS}"] == ()  # down: routed, answers 503
    assert table.routes["www.shop7.example"] == (
        Address("10.0.7.1", 3000),
        Address("10.0.7.2", 3000),
    )
    # Equal addresses are one object, whichever hosts they serve.
    assert table.routes["www.shop7.example"][0] is table.routes[f"app7-k3j9x2-org.{APPS}"][0]
    assert table.limits[f"app5-k3j9x2-org.{APPS}"] == ("p5", 100, 200)
    assert f"app6-k3j9x2-org.{APPS}" not in table.limits
    assert table.hsts == {f"www.shop{d}.example": 300 for d in range(725)}
    assert set(table.regions.values()) == {"eu-central"}
    assert len(table.regions) == len({(r[2], r[3]) for r in rows if r[2] is not None})
