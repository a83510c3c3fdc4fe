"""Smoke test of the scheduler benchmark (bench/scheduler.py): it runs for real but small
against the test session's server ($DATABASE_URL, else an embedded one), checks what each pass
did in the database, prints its figures and leaves no database behind."""

from __future__ import annotations

import asyncio
import io
import re

import pytest
import uvloop

from bench import scheduler
from bench.propagation import BenchError
from edge.store.db import connect
from scheduler.reconciler import Settings

# 40 nodes in 4 regions (10 each), 50 deployments x 1 per region = 200 instances, 5 per node.
SMALL = (40, 4, 50)
ARGV = ["--nodes", "40", "--regions", "4", "--deployments", "50", "--rollout", "10"]


def _database_exists(server: str, name: str) -> bool:
    async def exists() -> bool:
        conn = await connect(server)
        try:
            return bool(
                await conn.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)", name
                )
            )
        finally:
            await conn.close()

    return asyncio.run(exists())


def test_scheduler_bench_smoke(postgres_server: str) -> None:
    result = uvloop.run(scheduler.run(*SMALL, rollout=10, repeat=2, database_url=postgres_server))

    assert (result.nodes, result.regions, result.deployments, result.instances) == (40, 4, 50, 200)
    assert result.seed_s > 0
    assert len(result.steady) == len(result.rollouts) == len(result.node_downs) == 2

    for steady in result.steady:
        rows = {"nodes": 40, "deployments": 50, "instances": 200, "environments": 50}
        assert steady.rows == rows
        # The seed is the steady state: nothing to do, nothing written.
        assert steady.actions == {} and steady.waiting == 0 and steady.changed == {}
        assert steady.apply_s == 0 and steady.writes == ()
        assert steady.load_s > 0 and steady.plan_s > 0
        assert sorted(kind for kind, _ in steady.queries) == [
            "SELECT deployments",
            "SELECT environments",
            "SELECT instances",
            "SELECT nodes",
        ]

    for rollout in result.rollouts:
        # 10 new deployments, pending -> placing -> starting, one instance in each region.
        assert rollout.rows["deployments"] == 60
        assert rollout.actions == {"Transition": 20, "PlaceInstance": 40}
        assert rollout.changed == {"pending": 40}  # rows inserted, as the database counts
        kinds = [kind for kind, _ in rollout.writes]
        assert kinds.count("UPDATE deployments") == 20
        assert kinds.count("INSERT instances") == 1 and kinds.count("SELECT pg_locks") == 1
        assert rollout.apply_s > 0 and rollout.seconds > rollout.load_s + rollout.plan_s

    for down in result.node_downs:
        # Every repetition starts from the seed: the node holds 5 running instances.
        assert down.actions == {"MarkNodeDown": 1, "StopInstance": 5, "PlaceInstance": 5}
        assert down.changed == {"pending": 5, "running": -5, "stopped": 5}
        assert {kind for kind, _ in down.writes} == {
            "SELECT pg_locks",
            "UPDATE nodes",
            "UPDATE instances",
            "INSERT instances",
        }

    lines = scheduler.format_result(result)
    assert lines[1].startswith("snapshot: 200 instances, 40 nodes, 50 deployments,")
    assert lines[3].startswith("plan, steady state (0 actions): median ")
    assert lines[5].startswith("rollout pass: 10 deployments, 40 instances placed, 60 actions:")
    assert lines[7].startswith("node-down pass: 1 node, 5 instances stopped and replaced,")
    assert not _database_exists(postgres_server, result.database)


def test_scheduler_bench_main_prints_figures_and_checks(postgres_server: str) -> None:
    out = io.StringIO()
    argv = [*ARGV, "--repeat", "1", "--database-url", postgres_server]
    assert scheduler.main([*argv, "--check"], out=out) == 0

    figure = r"median [\d,]+\.\d ms, max [\d,]+\.\d ms"
    patterns = [
        r"scheduler at scale: 40 nodes in 4 regions, 50 deployments x 1 per region"
        r" = 200 instances \(seeded in \d+\.\d s\), 1 runs of each figure",
        rf"snapshot: 200 instances, 40 nodes, 50 deployments, 50 environments: {figure}",
        r"snapshot queries \(median\): (SELECT \w+ [\d,]+\.\d ms(, |$)){4}",
        rf"plan, steady state \(0 actions\): {figure}",
        rf"steady-state pass \(load \+ plan\): {figure}, budget 1 s",
        rf"rollout pass: 10 deployments, 40 instances placed, 60 actions: {figure}",
        r"rollout pass by phase \(median\): load [\d,.]+ ms, plan [\d,.]+ ms, apply [\d,.]+ ms"
        r" \(22 statements: .*20 UPDATE deployments [\d,.]+ ms.*\)",
        rf"node-down pass: 1 node, 5 instances stopped and replaced, 11 actions: {figure}",
        r"node-down pass by phase \(median\): load [\d,.]+ ms, plan [\d,.]+ ms,"
        r" apply [\d,.]+ ms \(4 statements: .*\)",
    ]
    lines = out.getvalue().splitlines()
    assert len(lines) == len(patterns)
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line), line

    # --check fails a steady-state pass over budget; without it the run only reports.
    slow = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scheduler, "BUDGET_S", 0.0)
        assert scheduler.main([*argv, "--check"], out=slow) == 1
        assert scheduler.main(argv, out=io.StringIO()) == 0
    assert re.search(r"over the 0 s budget: a steady-state pass took [\d,.]+ ms", slow.getvalue())


def test_scheduler_bench_refuses_an_inconsistent_steady_state(postgres_server: str) -> None:
    # With no heartbeat timeout every node is "down": the seed is no steady state any more.
    with pytest.raises(BenchError, match=r"the steady state .*MarkNodeDown': 40"):
        uvloop.run(
            scheduler.run(
                *SMALL,
                rollout=10,
                repeat=1,
                settings=Settings(heartbeat_timeout=0),
                database_url=postgres_server,
            )
        )


def test_arguments() -> None:
    args = scheduler.parse_args([*ARGV, "--repeat", "3", "--check", "--embedded"])
    assert (args.nodes, args.regions, args.deployments, args.rollout) == (40, 4, 50, 10)
    assert (args.repeat, args.check, args.embedded, args.database_url) == (3, True, True, None)
    defaults = scheduler.parse_args([])
    assert (defaults.nodes, defaults.regions, defaults.deployments) == (1_000, 10, 1_000)
    assert (defaults.rollout, defaults.repeat, defaults.check) == (100, 5, False)
    for wrong in (
        ["--nodes", "7", "--regions", "4"],  # a region with a single node
        ["--deployments", "50", "--rollout", "51"],
        ["--repeat", "0"],
    ):
        with pytest.raises(SystemExit):
            scheduler.parse_args(wrong)
    with pytest.raises(ValueError, match="rollout"):
        asyncio.run(scheduler.run(*SMALL, rollout=51))


def test_statement_kind() -> None:
    # Functions (now(), unnest()) are no tables; a column list after INTO is no call.
    for statement, kind in (
        ("SELECT id, extract(epoch FROM now() - x)::float8 AS s FROM nodes", "SELECT nodes"),
        (
            "WITH a AS (INSERT INTO instances (id) SELECT 1 RETURNING 1) SELECT count(*) FROM a",
            "INSERT instances",
        ),
        (
            "UPDATE instances i SET state = s.state FROM unnest($1::uuid[]) AS s (id)",
            "UPDATE instances",
        ),
        ("SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1)", "SELECT pg_locks"),
    ):
        assert scheduler.statement_kind(statement) == kind, statement
