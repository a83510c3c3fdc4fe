"""The live table of a real proxy worker following a real PostgreSQL (edge.live_routes):
notifications, the debounce, the timer reload, and losing the database under traffic."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from edge import live_routes
from edge.config import EdgeConfig
from edge.live_routes import LiveRoutes, PostgresRouteProvider
from edge.proxy.worker import ProxyWorker, listen_socket
from edge.store.routes import load_routes
from tests.harness import HOST, Upstream, eventually, free_port, get, request
from tests.live_routes.seed import Seed

pytestmark = pytest.mark.asyncio

APPS = "zeitwork.app"


@dataclass
class Following:
    worker: ProxyWorker
    live: LiveRoutes
    provider: PostgresRouteProvider
    port: int

    def addresses(self, host: str) -> list[str] | None:
        """The instances ``worker.routes`` (what requests read) has for ``host``."""
        route = self.worker.routes.get(host.encode())
        return None if route is None else sorted(str(p.address) for p in route.pools)

    def routes_to(self, host: str, *addresses: str) -> Callable[[], bool]:
        """A check: does ``host`` route to exactly ``addresses`` now?"""
        want = sorted(addresses)
        return lambda: self.addresses(host) == want


@contextlib.asynccontextmanager
async def following(database_url: str, **options: Any) -> AsyncIterator[Following]:
    """A proxy worker on a free loopback port whose table follows ``database_url``."""
    config = EdgeConfig(database_url=database_url, http_host=HOST, http_port=1, workers=1)
    provider = PostgresRouteProvider(database_url, APPS)
    worker = ProxyWorker(config, provider)
    live = LiveRoutes(worker, provider, **options)
    loop = asyncio.get_running_loop()
    escaped: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: escaped.append(context))
    live.start()
    try:
        async with asyncio.timeout(5):
            await live.loaded.wait()
        sock = listen_socket(HOST, 0, 128)
        await worker.start(sock)
        yield Following(worker, live, provider, sock.getsockname()[1])
    finally:
        await live.stop()
        await worker.shutdown(grace=1.0)
        loop.set_exception_handler(previous)
    assert not escaped, f"exceptions escaped to the event loop: {escaped}"


async def time_until(predicate: Callable[[], bool], timeout: float = 2.0) -> float:
    """Seconds until ``predicate`` holds (polled every millisecond); fails past ``timeout``."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        assert loop.time() - start < timeout, "not routed in time"
        await asyncio.sleep(0.001)
    return loop.time() - start


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def test_changes_are_routed_within_the_debounce(migrated_url: str, seed: Seed) -> None:
    """Commit -> worker.routes: a new instance, then a flipped current deployment, 40 times."""
    project, environment, deployment, nano = await seed.app()
    await seed.domain("shop.example.com", project, environment)
    host = f"web-{nano}-acme.zeitwork.app"
    delays: list[float] = []
    async with following(migrated_url, debounce=0.05) as edge:
        expected: list[str] = []
        for _ in range(20):
            _, address = await seed.instance(deployment)
            expected = sorted([*expected, address])
            delays.append(await time_until(edge.routes_to(host, *expected)))
        for _ in range(20):
            new, new_nano = await seed.deployment(project, environment)
            _, address = await seed.instance(new)
            # The new instance is routed on its own host first; the flip is what is timed.
            await time_until(edge.routes_to(f"web-{new_nano}-acme.zeitwork.app", address))
            await seed.set_current(environment, new)
            delays.append(await time_until(edge.routes_to("shop.example.com", address)))
    p50, p99 = statistics.median(delays), percentile(delays, 99)
    print(f"propagation, {len(delays)} changes: p50 {p50 * 1e3:.1f} ms, p99 {p99 * 1e3:.1f} ms")
    assert min(delays) < 0.2
    # The debounce window plus one reload, with room for a slow CI machine.
    assert p99 < 0.05 + 0.25


async def test_a_burst_of_changes_costs_one_reload(migrated_url: str, seed: Seed) -> None:
    _, _, deployment, nano = await seed.app()
    host = f"web-{nano}-acme.zeitwork.app"
    async with following(migrated_url, debounce=0.3) as edge:
        loop = asyncio.get_running_loop()
        before = edge.live.reloads
        started = loop.time()
        addresses = sorted([(await seed.instance(deployment))[1] for _ in range(10)])
        burst = loop.time() - started
        routed = await time_until(lambda: edge.addresses(host) == addresses)
        await asyncio.sleep(0.4)  # a second reload, if one were coming, would be done
        assert burst < 0.3, "the burst itself was too slow to test the debounce"
        assert edge.live.reloads - before == 1
        assert edge.live.notifications >= 10
        # One reload at the end of the window that the first change opened.
        assert 0.3 - burst - 0.01 <= routed < 0.3 + 0.25


async def test_concurrent_writers_end_in_the_right_table_with_coalesced_reloads(
    migrated_url: str, db: Any, seed: Seed
) -> None:
    writers, changes_each = 8, 25
    apps = [await seed.app("acme", f"app{i}") for i in range(writers)]
    async with following(migrated_url, debounce=0.05) as edge:
        before_reloads = edge.live.reloads

        async def write(deployment: Any, i: int) -> None:
            conn = await asyncpg_connect(migrated_url)
            try:
                writer = Seed(conn)
                for j in range(changes_each):
                    instance, _ = await writer.instance(deployment, port=30000 + i * 100 + j)
                    if j % 3 == 0:  # some come and go again
                        await writer.set_instance(instance, healthy=False)
            finally:
                await conn.close()

        await asyncio.gather(*(write(app[2], i) for i, app in enumerate(apps)))
        expected = await load_routes(db, APPS)

        def settled() -> bool:
            table = edge.worker.table
            return table is not None and table.routes == expected.routes

        await time_until(settled, timeout=3.0)
        changes = writers * (changes_each + len(range(0, changes_each, 3)))
        reloads = edge.live.reloads - before_reloads
        print(f"{changes} changes by {writers} writers: {reloads} reloads")
        assert reloads < changes / 4
        for app in apps:
            host = f"app{apps.index(app)}-{app[3]}-acme.zeitwork.app"
            assert len(edge.addresses(host) or []) == changes_each - len(range(0, changes_each, 3))


async def asyncpg_connect(url: str) -> Any:
    import asyncpg  # type: ignore[import-untyped, unused-ignore]  # noqa: PLC0415

    return await asyncpg.connect(url)


@contextlib.asynccontextmanager
async def trigger_disabled(db: Any, table: str) -> AsyncIterator[None]:
    """Changes to ``table`` notify nobody (a lost notification) inside the block."""
    await db.execute(f"ALTER TABLE {table} DISABLE TRIGGER routes_changed")
    try:
        yield
    finally:
        await db.execute(f"ALTER TABLE {table} ENABLE TRIGGER routes_changed")


async def test_the_timer_reload_catches_a_change_whose_notification_was_lost(
    migrated_url: str, db: Any, seed: Seed
) -> None:
    _, _, deployment, nano = await seed.app()
    host = f"web-{nano}-acme.zeitwork.app"
    async with following(migrated_url, reload_interval=0.6) as edge:
        notified = edge.live.notifications
        async with trigger_disabled(db, "instances"):
            _, address = await seed.instance(deployment)
            routed = await time_until(lambda: edge.addresses(host) == [address], timeout=2.0)
        assert edge.live.notifications == notified  # the timer did it
        assert routed <= 0.6 + 0.3


async def test_a_requested_reload_catches_a_change_whose_notification_was_lost(
    migrated_url: str, db: Any, seed: Seed
) -> None:
    """SIGHUP in a worker following the database asks for a reload."""
    _, _, deployment, nano = await seed.app()
    host = f"web-{nano}-acme.zeitwork.app"
    async with following(migrated_url) as edge:
        async with trigger_disabled(db, "instances"):
            _, address = await seed.instance(deployment)
            await asyncio.sleep(0.1)
            assert edge.addresses(host) == []
            edge.live.request_reload()
            assert await time_until(lambda: edge.addresses(host) == [address]) < 0.3


@dataclass
class Traffic:
    """Requests to the edge, one after the other, until stopped: their statuses."""

    port: int
    host: str
    statuses: list[int | str] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                response = await request(self.port, get(self.host), timeout=2.0)
                self.statuses.append(response.status)
            except (OSError, TimeoutError) as exc:
                self.statuses.append(type(exc).__name__)
            await asyncio.sleep(0.005)

    async def stop(self) -> list[int | str]:
        self._stop.set()
        assert self._task is not None
        await self._task
        return self.statuses


async def terminate_backend(db: Any, pid: int | None) -> None:
    assert pid is not None
    assert await db.fetchval("SELECT pg_terminate_backend($1)", pid)


async def test_a_cut_connection_is_reopened_and_the_change_made_meanwhile_routed(
    migrated_url: str, db: Any, seed: Seed
) -> None:
    _, _, deployment, nano = await seed.app()
    host = f"web-{nano}-acme.zeitwork.app"
    async with following(migrated_url, backoff_min=0.05) as edge:
        pid = edge.live.backend_pid
        await terminate_backend(db, pid)
        _, address = await seed.instance(deployment)  # nobody listens right now
        await time_until(lambda: edge.addresses(host) == [address], timeout=2.0)
        assert edge.live.backend_pid not in (None, pid)
        assert edge.live.healthy
        assert edge.live.failures == 1


async def test_losing_the_database_under_traffic_keeps_serving_the_last_table(
    migrated_url: str, db: Any, seed: Seed
) -> None:
    up = await Upstream().start()
    try:
        project, environment, deployment, nano = await seed.app()
        await seed.instance(deployment, port=up.port)
        host = f"web-{nano}-acme.zeitwork.app"
        async with following(migrated_url, backoff_min=0.05, backoff_max=0.4) as edge:
            traffic = Traffic(edge.port, host)
            traffic.start()
            assert await eventually(lambda: len(traffic.statuses) >= 5)
            # The database goes away: the connection is cut and no new one gets through.
            edge.provider.dsn = f"postgresql://postgres@{HOST}:{free_port()}/postgres"
            await terminate_backend(db, edge.live.backend_pid)
            assert await eventually(lambda: edge.live.status()["healthy"] is False, timeout=2.0)
            # Meanwhile the platform changes: a new deployment the edge cannot know about.
            new, new_nano = await seed.deployment(project, environment)
            await seed.instance(new, port=up.port)
            new_host = f"web-{new_nano}-acme.zeitwork.app"
            age = edge.live.table_age()
            assert age is not None
            served = len(traffic.statuses)
            await asyncio.sleep(1.0)
            older = edge.live.table_age()
            assert older is not None and older >= age + 0.9  # reported, for /health
            assert edge.live.status()["healthy"] is False
            assert edge.live.failures >= 3  # it kept trying, with backoff
            assert edge.live.failures <= 8
            assert len(traffic.statuses) > served + 20  # still serving, from the last table
            assert edge.addresses(new_host) is None
            assert (await request(edge.port, get(new_host))).status == 404
            # The database is back: the edge catches up at its next attempt.
            edge.provider.dsn = migrated_url
            back = await time_until(lambda: edge.addresses(new_host) is not None, timeout=2.0)
            assert back < 0.4 * 1.2 + 0.3
            assert edge.live.healthy
            fresh = edge.live.table_age()
            assert fresh is not None and fresh < 0.5
            assert (await request(edge.port, get(new_host))).status == 200
            statuses = await traffic.stop()
        assert statuses and set(statuses) == {200}, statuses
    finally:
        await up.stop()


async def test_a_worker_started_without_its_database_waits_for_the_first_table(
    migrated_url: str, seed: Seed
) -> None:
    await seed.app()
    provider = PostgresRouteProvider(f"postgresql://postgres@{HOST}:{free_port()}/x", APPS)
    installed: list[int] = []

    class Target:
        def install(self, table: Any) -> None:
            installed.append(len(table))

    live = LiveRoutes(Target(), provider, backoff_min=0.05, backoff_max=0.2)
    live.start()
    try:
        await asyncio.sleep(0.5)
        assert not live.loaded.is_set()
        assert live.status()["healthy"] is False
        assert live.table_age() is None
        # Backoff: 0.05, 0.1, 0.2, 0.2 ... not a tight loop.
        assert 2 <= live.failures <= 6
        assert "cannot connect" in live.last_error
        provider.dsn = migrated_url
        async with asyncio.timeout(1.0):
            await live.loaded.wait()
        assert installed == [1]
        assert live.status()["healthy"] is True
    finally:
        await live.stop()


async def test_stop_closes_the_listening_connection(migrated_url: str, db: Any) -> None:
    async with following(migrated_url) as edge:
        pid = edge.live.backend_pid
        assert pid is not None
        assert await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
        await edge.live.stop()
        assert not edge.live.healthy
        assert edge.live.backend_pid is None

        async def gone() -> bool:
            n = await db.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid)
            return bool(n == 0)

        assert await poll(gone)


async def poll(check: Callable[[], Awaitable[bool]], timeout: float = 2.0) -> bool:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)
    return True


async def test_an_outage_is_logged_once_then_reminded_not_per_retry(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A database that stays down: one warning when it goes, then a reminder per interval
    (shortened here), never one warning per reconnect attempt."""
    monkeypatch.setattr(live_routes, "REMINDER_INTERVAL", 0.3)
    provider = PostgresRouteProvider(f"postgresql://postgres@{HOST}:{free_port()}/x", APPS)

    class Target:
        def install(self, table: Any) -> None:
            raise AssertionError("no table can come from a database that is down")

    caplog.set_level(logging.WARNING, logger="edge.live_routes")
    live = LiveRoutes(Target(), provider, backoff_min=0.02, backoff_max=0.05)
    live.start()
    try:
        await asyncio.sleep(0.75)
    finally:
        await live.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert live.failures >= 10
    assert 2 <= len(warnings) <= 4, warnings  # the first, then one per 0.3 s
    assert "unavailable" in warnings[0]
    assert all("still unavailable" in w for w in warnings[1:])
