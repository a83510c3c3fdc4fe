"""Smoke tests of the PostgreSQL benchmarks (bench/propagation.py, bench/routes_load.py): each
runs for real but tiny against the test session's server ($DATABASE_URL, else an embedded one)
and must give sane figures and leave no database behind."""

from __future__ import annotations

import asyncio
import io

import uvloop

from bench import propagation, routes_load
from edge.store.db import connect


def _bench_databases(server: str) -> list[str]:
    async def names() -> list[str]:
        conn = await connect(server)
        try:
            rows = await conn.fetch(
                "SELECT datname FROM pg_database WHERE datname LIKE 'zeitwork_bench_%'"
            )
        finally:
            await conn.close()
        return [row["datname"] for row in rows]

    return asyncio.run(names())


def test_propagation_smoke(postgres_server: str) -> None:
    before = _bench_databases(postgres_server)

    result = uvloop.run(propagation.run(5, database_url=postgres_server, debounce=0.02))

    assert len(result.table_s) == len(result.request_s) == 5
    assert all(0 < t < propagation.CHANGE_TIMEOUT_S for t in result.table_s + result.request_s)
    assert result.debounce_s == 0.02
    # A flip cannot reach the edge before its debounce window closed.
    assert min(result.table_s) >= 0.02
    assert result.reloads >= 6 and result.notifications > 0 and result.requests >= 6
    report = propagation.format_result(result)
    assert "commit -> first routed request" in report and "p99" in report
    assert _bench_databases(postgres_server) == before


def test_routes_load_smoke(postgres_server: str) -> None:
    before = _bench_databases(postgres_server)
    out = io.StringIO()

    result = uvloop.run(routes_load.run(500, database_url=postgres_server, repeats=2, out=out))

    assert result.hosts == 500
    assert result.rows == 1000  # one instance in each of 2 regions per host
    assert len(result.load_s) == len(result.fetch_s) == 2
    assert all(0 < t < 5 for t in result.load_s + result.fetch_s)
    assert 0 < result.install_first_s < 5 and 0 < result.install_again_s < 5
    assert 0 < result.table_bytes <= result.load_peak_bytes
    assert result.worker_bytes > 0
    assert "500 hosts" in routes_load.format_result(result)
    assert _bench_databases(postgres_server) == before


def test_arguments() -> None:
    args = propagation.parse_args(["--changes", "7", "--embedded"])
    assert (args.changes, args.embedded, args.database_url) == (7, True, None)
    args = routes_load.parse_args(["--hosts", "10", "--database-url", "postgresql://x/y"])
    assert (args.hosts, args.database_url) == (10, "postgresql://x/y")
    assert propagation.database_in("postgresql://u@h:5/postgres?sslmode=disable", "db") == (
        "postgresql://u@h:5/db?sslmode=disable"
    )
    assert propagation.percentile([float(i) for i in range(1, 201)], 99) == 198.0
