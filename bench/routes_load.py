"""Loading the routing table from PostgreSQL at platform scale: time and memory.

What it measures, for a database whose routing table has N hosts (default 100,000):

- ``load_routes()``: the one routing query plus compiling its rows into a
  :class:`~edge.routing.RoutingTable` (what every reload of every edge worker costs), and of
  that the query alone (fetch);
- ``ProxyWorker.install()`` of the result: the first time (every pool new) and again (pools
  kept, as on a reload);
- memory, with tracemalloc: the compiled table, the peak while loading (rows and table), and
  what the worker's routes and pools add.

The goal for 100,000 hosts: load and install under 1 s, under 300 MB.

The data: N/2 apps, each a project with a production environment whose one deployment
(``active``, current) has one running, healthy instance in each of 2 regions
(``--instances-per-region`` for more), each instance with an address of its own; and one
verified custom domain per app on its environment. Hosts: N/2 deployment hosts plus N/2
custom domains; rows of the query: 2 per host with one instance per region.

How: a fresh database (``zeitwork_bench_<random>``) on the server of ``--database-url`` (else
``$DATABASE_URL``, else ``postgresql://postgres@127.0.0.1:5432/postgres``; ``--embedded``: an
embedded PostgreSQL in a temporary directory), migrated. The rows are bulk-loaded with COPY
(asyncpg's ``copy_records_to_table``: no SQL of the benchmark's own; ids are made here), the
environments' current deployments set with ``edge.store.environments.set_current``, then
``ANALYZE``. The database is dropped at the end, whatever happened.

Run from the repository root: ``.venv/bin/python -m bench.routes_load [--hosts 100000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TextIO
from uuid import UUID, uuid4

import uvloop

from bench.propagation import (
    BenchError,
    add_database_options,
    admin_url,
    embedded_server,
    scratch_database,
)
from edge.config import EdgeConfig
from edge.live_routes import PostgresRouteProvider
from edge.proxy.worker import ProxyWorker
from edge.store import environments, regions
from edge.store.db import connect, create_pool
from edge.store.errors import StoreError
from edge.store.routes import ROUTES_QUERY, load_routes

APPS_DOMAIN = "zeitwork.app"
REGIONS = ("eu-1", "us-1")
# Concurrent set_current calls while seeding.
SEED_CONNECTIONS = 8


@dataclass
class Result:
    hosts: int
    rows: int = 0
    seed_s: float = 0.0
    load_s: list[float] = field(default_factory=list)
    fetch_s: list[float] = field(default_factory=list)
    install_first_s: float = 0.0
    install_again_s: float = 0.0
    table_bytes: int = 0  # the compiled RoutingTable, as tracemalloc sees it
    load_peak_bytes: int = 0  # peak while loading: rows and the table
    worker_bytes: int = 0  # what install adds: the worker's routes and pools

    @property
    def load_and_install_s(self) -> float:
        return min(self.load_s) + self.install_first_s

    @property
    def memory_bytes(self) -> int:
        return self.table_bytes + self.worker_bytes


def format_result(result: Result) -> str:
    mb = 1e6
    ms = 1e3
    lines = [
        f"routing table from PostgreSQL: {result.hosts} hosts, {result.rows} rows"
        f" (seeded in {result.seed_s:.1f} s)",
        f"  load_routes (query + compile)  min {min(result.load_s) * ms:6.0f} ms"
        f"  median {statistics.median(result.load_s) * ms:6.0f} ms"
        f"  ({len(result.load_s)} runs)",
        f"    of which the query (fetch)   min {min(result.fetch_s) * ms:6.0f} ms"
        f"  median {statistics.median(result.fetch_s) * ms:6.0f} ms",
        f"  worker.install                 first {result.install_first_s * ms:5.0f} ms"
        f"  again (pools kept) {result.install_again_s * ms:5.0f} ms",
        f"  memory: table {result.table_bytes / mb:.0f} MB (peak while loading"
        f" {result.load_peak_bytes / mb:.0f} MB), worker routes and pools"
        f" {result.worker_bytes / mb:.0f} MB",
    ]
    time_ok = result.load_and_install_s < 1.0
    memory_ok = max(result.load_peak_bytes, result.table_bytes) + result.worker_bytes < 300 * mb
    lines.append(
        f"  goal < 1 s (load + first install: {result.load_and_install_s * ms:.0f} ms):"
        f" {'met' if time_ok else 'NOT met'}; goal < 300 MB (peak load + worker:"
        f" {(max(result.load_peak_bytes, result.table_bytes) + result.worker_bytes) / mb:.0f}"
        f" MB): {'met' if memory_ok else 'NOT met'}"
    )
    return "\n".join(lines)


# --- seeding -------------------------------------------------------------------------------


async def seed(dsn: str, apps: int, instances_per_region: int) -> None:
    """``apps`` apps with a deployment, its instances and a verified domain each."""
    conn = await connect(dsn)
    try:
        for code in REGIONS:
            await regions.create(conn, code, code, "DE")
        projects: list[tuple[UUID, str, str]] = []
        envs: list[tuple[UUID, UUID, str]] = []
        deployments: list[tuple[UUID, UUID, UUID, str, str, str]] = []
        instances: list[tuple[UUID, UUID, str, str, str, int, bool]] = []
        domains: list[tuple[UUID, str, UUID, UUID, str, datetime]] = []
        current: list[tuple[UUID, UUID]] = []
        verified_at = datetime.now(UTC)
        for i in range(apps):
            project, env, deployment = uuid4(), uuid4(), uuid4()
            projects.append((project, f"org{i % 1000}", f"app{i}"))
            envs.append((env, project, "production"))
            deployments.append((deployment, project, env, f"{i:07x}", "active", "bench"))
            address = f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}"
            slot = 0
            for region in REGIONS:
                for _ in range(instances_per_region):
                    instances.append(
                        (uuid4(), deployment, region, "running", address, 3000 + slot, True)
                    )
                    slot += 1
            domains.append((uuid4(), f"app{i}.bench.example", project, env, "t", verified_at))
            current.append((env, deployment))
        await conn.copy_records_to_table(
            "projects", records=projects, columns=("id", "org", "name")
        )
        await conn.copy_records_to_table(
            "environments", records=envs, columns=("id", "project_id", "name")
        )
        await conn.copy_records_to_table(
            "deployments",
            records=deployments,
            columns=("id", "project_id", "environment_id", "nanoid", "status", "image"),
        )
        await conn.copy_records_to_table(
            "instances",
            records=instances,
            columns=("id", "deployment_id", "region", "state", "address", "port", "healthy"),
        )
        await conn.copy_records_to_table(
            "domains",
            records=domains,
            columns=(
                "id",
                "name",
                "project_id",
                "environment_id",
                "verification_token",
                "verified_at",
            ),
        )
    finally:
        await conn.close()
    # Each environment points at its deployment, through the store (one UPDATE each).
    pool = await create_pool(dsn, min_size=SEED_CONNECTIONS, max_size=SEED_CONNECTIONS)
    try:
        queue = iter(current)

        async def set_all() -> None:
            for env, deployment in queue:
                await environments.set_current(pool, env, deployment)

        await asyncio.gather(*(set_all() for _ in range(SEED_CONNECTIONS)))
        # Fresh statistics, as autovacuum would have them on a long-lived database.
        await pool.execute("ANALYZE")
    finally:
        await pool.close()


# --- the measurement -----------------------------------------------------------------------


async def measure(
    dsn: str, hosts: int, *, repeats: int = 3, instances_per_region: int = 1
) -> Result:
    """Seed the migrated, empty database ``dsn`` with ``hosts`` hosts and measure."""
    apps = max(1, hosts // 2)
    result = Result(hosts=2 * apps)
    started = time.perf_counter()
    await seed(dsn, apps, instances_per_region)
    result.seed_s = time.perf_counter() - started

    conn = await connect(dsn)
    try:
        rows = await conn.fetch(ROUTES_QUERY, APPS_DOMAIN)  # warms the caches up
        result.rows = len(rows)
        del rows
        for _ in range(repeats):
            gc.collect()
            started = time.perf_counter()
            rows = await conn.fetch(ROUTES_QUERY, APPS_DOMAIN)
            result.fetch_s.append(time.perf_counter() - started)
            del rows
            gc.collect()
            started = time.perf_counter()
            table = await load_routes(conn, APPS_DOMAIN)
            result.load_s.append(time.perf_counter() - started)
        if len(table) != result.hosts:
            raise BenchError(f"the table has {len(table)} hosts, {result.hosts} expected")

        config = EdgeConfig(database_url=dsn, workers=1, region=REGIONS[0])
        worker = ProxyWorker(config, PostgresRouteProvider(dsn, APPS_DOMAIN))
        started = time.perf_counter()
        worker.install(table)
        result.install_first_s = time.perf_counter() - started
        started = time.perf_counter()
        worker.install(table)
        result.install_again_s = time.perf_counter() - started

        # Memory, separately (tracemalloc slows allocation down several times).
        del table, worker
        gc.collect()
        tracemalloc.start()
        try:
            table = await load_routes(conn, APPS_DOMAIN)
            gc.collect()
            result.table_bytes, result.load_peak_bytes = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            worker = ProxyWorker(config, PostgresRouteProvider(dsn, APPS_DOMAIN))
            worker.install(table)
            gc.collect()
            result.worker_bytes = tracemalloc.get_traced_memory()[0] - result.table_bytes
        finally:
            tracemalloc.stop()
        for pool in worker.pools.values():
            pool.close()
    finally:
        await conn.close()
    return result


async def run(
    hosts: int,
    *,
    database_url: str | None = None,
    embedded: bool = False,
    repeats: int = 3,
    instances_per_region: int = 1,
    out: TextIO | None = None,
) -> Result:
    """The whole benchmark: a scratch database, the measurement, the database dropped."""
    with contextlib.ExitStack() as stack:
        if embedded:
            server = await asyncio.to_thread(stack.enter_context, embedded_server())
        else:
            server = admin_url(database_url)
        async with scratch_database(server) as dsn:
            if out is not None:
                print(f"seeding {hosts} hosts ...", file=out, flush=True)
            return await measure(
                dsn, hosts, repeats=repeats, instances_per_region=instances_per_region
            )
    raise AssertionError("unreachable")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100_000, help="hosts in the table")
    parser.add_argument("--repeats", type=int, default=3, help="timed loads (3)")
    parser.add_argument(
        "--instances-per-region", type=int, default=1, help="per deployment and region (1)"
    )
    add_database_options(parser)
    args = parser.parse_args(argv)
    if args.hosts < 2 or args.repeats < 1 or args.instances_per_region < 1:
        parser.error("--hosts must be at least 2, --repeats and --instances-per-region 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = uvloop.run(
            run(
                args.hosts,
                database_url=args.database_url,
                embedded=args.embedded,
                repeats=args.repeats,
                instances_per_region=args.instances_per_region,
                out=sys.stdout,
            )
        )
    except (BenchError, StoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
