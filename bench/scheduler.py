"""Cost of one scheduler pass at platform scale: snapshot, plan, apply.

The data (default): 1,000 nodes in 10 regions, ready, with fresh heartbeats and room to spare
(32 vCPU, 128 GiB each); 1,000 projects, each with a production environment whose current
deployment is ``active`` with one running, healthy instance in every region: 10,000
instances, 10 on each node. That is the steady state: a pass must change nothing.

What it measures, each ``--repeat`` times (median and max):

- *snapshot*: :func:`edge.store.scheduling.load_snapshot` (its rows, and each of its queries);
- *plan*: :func:`scheduler.reconciler.plan` on it; the bench fails unless the plan is empty
  (the proof that the seed is consistent); the *steady-state pass* is the two together, what
  every tick of the leader costs (the scheduler ticks every second: ``--check`` exits 1 when
  one takes more than :data:`BUDGET_S`);
- *rollout pass*: ``--rollout`` new ``pending`` deployments (default 100, of as many projects)
  and the pass that places them: load, plan and apply (``pending -> placing -> starting`` and
  one instance in every region: 1,000 instances inserted);
- *node-down pass*: the busiest node's heartbeat aged past the timeout, and the pass that marks
  it down, stops its instances and places their replacements in its region.

A pass is what :meth:`edge.scheduling.SchedulerLoop.run_pass` does, less its logging and
metrics: one connection, :func:`~edge.store.scheduling.load_snapshot`, ``plan``, and
:func:`~edge.store.scheduling.apply_plan` fenced by a leader lock this process holds on
another connection. Each statement's time is recorded (a few microseconds per statement).
Before each pass the nodes' heartbeats are refreshed, as their agents would; after each, what
it changed is undone (the new deployments deleted; the down node back with its instances), so
every repetition starts from the same state, and at the end a last plan must be empty again.

How: a fresh database (``zeitwork_bench_<random>``) on the server of ``--database-url`` (else
``$DATABASE_URL``, else ``postgresql://postgres@127.0.0.1:5432/postgres``; ``--embedded``: an
embedded PostgreSQL in a temporary directory), migrated, seeded with a few bulk
``INSERT ... SELECT generate_series`` statements, then ``VACUUM ANALYZE``; dropped at the end,
whatever happened.

Run from the repository root: ``.venv/bin/python -m bench.scheduler [--check]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import re
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit
from uuid import UUID

import uvloop

from bench.propagation import (
    BenchError,
    add_database_options,
    admin_url,
    embedded_server,
    scratch_database,
)
from edge.leader import KEY
from edge.store.db import connect
from edge.store.errors import StoreError
from edge.store.scheduling import apply_plan, load_snapshot
from scheduler.reconciler import Settings, describe, plan

BUDGET_S = 1.0
NODE_VCPU = 32
NODE_MEMORY_MB = 128 * 1024
# How long ago the seeded deployments went live and their instances last changed.
SETTLED = "interval '1 hour'"

# --- the seed: ids are md5 of a name, so every statement can name any row ------------------

_SEED_REGIONS = (
    "INSERT INTO regions (code, name, country)"
    " SELECT 'region-' || r, 'Region ' || r, 'DE' FROM generate_series(0, $1::int - 1) r"
)
_SEED_NODES = (
    "INSERT INTO nodes (id, region, hostname, address, vcpu, memory_mb, last_heartbeat)"
    " SELECT md5('node-' || n)::uuid, 'region-' || n % $2::int, 'node-' || n,"
    " '10.' || n / 65536 % 256 || '.' || n / 256 % 256 || '.' || n % 256, $3, $4, now()"
    " FROM generate_series(0, $1::int - 1) n"
)
_SEED_PROJECTS = (
    "INSERT INTO projects (id, org, name)"
    " SELECT md5('project-' || p)::uuid, 'bench', 'app-' || p"
    " FROM generate_series(0, $1::int - 1) p"
)
_SEED_ENVIRONMENTS = (
    "INSERT INTO environments (id, project_id, name)"
    " SELECT md5('environment-' || p)::uuid, md5('project-' || p)::uuid, 'production'"
    " FROM generate_series(0, $1::int - 1) p"
)
# Active since an hour, running in every region (recorded, as on leaving placing).
_SEED_DEPLOYMENTS = (
    "INSERT INTO deployments (id, project_id, environment_id, nanoid, status, image, regions,"
    " created_at, placing_at, starting_at, healthy_at, active_at)"
    " SELECT md5('deployment-' || p)::uuid, md5('project-' || p)::uuid,"
    " md5('environment-' || p)::uuid, lpad(to_hex(p), 7, '0'), 'active', 'bench',"
    " (SELECT array_agg(code ORDER BY code) FROM regions), t, t, t, t, t"
    f" FROM generate_series(0, $1::int - 1) p, LATERAL (SELECT now() - {SETTLED} AS t) s"
)
_SEED_CURRENT = (
    "UPDATE environments e SET current_deployment_id = d.id"
    " FROM deployments d WHERE d.environment_id = e.id"
)
# Deployment p's instance in region r goes to the (p mod nodes-per-region)th node of r: the
# nodes of a region get the same number each.
_SEED_INSTANCES = (
    "INSERT INTO instances (deployment_id, node_id, region, state, address, port, healthy,"
    " last_health_at, created_at, updated_at)"
    " SELECT md5('deployment-' || p)::uuid, n.id, n.region, 'running', n.address,"
    f" 10000 + p % 50000, true, now(), now() - {SETTLED}, now() - {SETTLED}"
    " FROM generate_series(0, $1::int - 1) p, generate_series(0, $2::int - 1) r,"
    " nodes n WHERE n.id = md5('node-' || (r + $2::int * (p % ($3::int / $2::int))))::uuid"
)

# The agents' heartbeats, but for a node being silent ($1, or none).
_HEARTBEATS = (
    "UPDATE nodes SET last_heartbeat = now() WHERE state = 'ready' AND id IS DISTINCT FROM $1"
)
_STATES = "SELECT state, count(*)::int AS count FROM instances GROUP BY state"

_NEW_DEPLOYMENTS = (
    "INSERT INTO deployments (project_id, environment_id, nanoid, image)"
    " SELECT md5('project-' || p)::uuid, md5('environment-' || p)::uuid,"
    " 'r' || lpad(to_hex(p), 6, '0'), 'bench'"
    " FROM generate_series(0, $1::int - 1) p RETURNING id"
)
_BUSIEST_NODE = (
    "SELECT n.id FROM nodes n JOIN instances i ON i.node_id = n.id AND i.state = 'running'"
    " WHERE n.state = 'ready' GROUP BY n.id ORDER BY count(*) DESC, n.hostname LIMIT 1"
)
_SILENCE = "UPDATE nodes SET last_heartbeat = now() - make_interval(secs => $2) WHERE id = $1"
# --- recording statements ------------------------------------------------------------------

_VERB = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE)\b")
# The first table named; ``FROM now()`` (in extract) or ``FROM unnest(...)`` is no table.
_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+(\w+)\b(?!\()")


def statement_kind(query: str) -> str:
    """``"SELECT instances"``, ``"UPDATE deployments"``: what a statement does, to what."""
    verb = _VERB.search(query)
    table = _TABLE.search(query)
    return f"{verb[1] if verb else '?'} {table[1] if table else '?'}"


class RecordingConnection:
    """An asyncpg connection that records each statement's kind and time; the rest (the
    transactions) goes to the connection itself."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.statements: list[tuple[str, float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.conn, name)

    async def _timed(self, method: str, query: str, args: tuple[Any, ...]) -> Any:
        started = time.perf_counter()
        try:
            return await getattr(self.conn, method)(query, *args)
        finally:
            self.statements.append((statement_kind(query), time.perf_counter() - started))

    async def execute(self, query: str, *args: Any) -> Any:
        return await self._timed("execute", query, args)

    async def fetch(self, query: str, *args: Any) -> Any:
        return await self._timed("fetch", query, args)

    async def fetchrow(self, query: str, *args: Any) -> Any:
        return await self._timed("fetchrow", query, args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._timed("fetchval", query, args)

    def take(self) -> tuple[tuple[str, float], ...]:
        taken, self.statements = tuple(self.statements), []
        return taken


# --- results -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pass:
    """One scheduler pass, by phase."""

    load_s: float
    plan_s: float
    apply_s: float  # 0 when the plan was empty (nothing is applied)
    rows: dict[str, int]  # what the snapshot held: nodes, deployments, instances, environments
    actions: dict[str, int]  # by kind (``PlaceInstance``: 1,000)
    waiting: int  # deployments the plan could not move on
    queries: tuple[tuple[str, float], ...]  # the snapshot's statements
    writes: tuple[tuple[str, float], ...]  # the apply's statements
    # Instances by state, after the pass minus before ({"pending": 1000}), from the database.
    changed: dict[str, int]

    @property
    def seconds(self) -> float:
        return self.load_s + self.plan_s + self.apply_s

    @property
    def action_count(self) -> int:
        return sum(self.actions.values())


@dataclass
class Result:
    nodes: int
    regions: int
    deployments: int
    rollout: int
    database: str = ""  # the scratch database's name (dropped at the end)
    seed_s: float = 0.0
    steady: list[Pass] = field(default_factory=list)
    rollouts: list[Pass] = field(default_factory=list)
    node_downs: list[Pass] = field(default_factory=list)

    @property
    def instances(self) -> int:
        return self.deployments * self.regions

    @property
    def steady_s(self) -> list[float]:
        """Steady-state passes: load and plan (an empty plan applies nothing)."""
        return [p.load_s + p.plan_s for p in self.steady]


# --- the measurement -----------------------------------------------------------------------


async def seed(conn: Any, nodes: int, regions: int, deployments: int) -> None:
    await conn.execute(_SEED_REGIONS, regions)
    await conn.execute(_SEED_NODES, nodes, regions, NODE_VCPU, NODE_MEMORY_MB)
    for statement in (_SEED_PROJECTS, _SEED_ENVIRONMENTS, _SEED_DEPLOYMENTS):
        await conn.execute(statement, deployments)
    await conn.execute(_SEED_CURRENT)
    await conn.execute(_SEED_INSTANCES, deployments, regions, nodes)
    # Fresh statistics and visibility map, as autovacuum would have them on a live database.
    await conn.execute("VACUUM ANALYZE")


async def node_back(conn: Any, node: UUID) -> None:
    """Undo a node-down pass: the replacements go, the node and its instances come back."""
    await conn.execute("DELETE FROM instances WHERE state = 'pending'")
    await conn.execute(
        "UPDATE instances SET state = 'running', healthy = true, message = NULL,"
        f" updated_at = now() - {SETTLED} WHERE node_id = $1 AND state = 'stopped'",
        node,
    )
    await conn.execute(
        "UPDATE nodes SET state = 'ready', last_heartbeat = now() WHERE id = $1", node
    )


async def instance_states(conn: Any) -> Counter[str]:
    return Counter({row["state"]: row["count"] for row in await conn.fetch(_STATES)})


async def one_pass(
    control: Any,
    scheduler: RecordingConnection,
    settings: Settings,
    fence: tuple[int, int],
    *,
    silent: UUID | None = None,
) -> Pass:
    """A pass on ``scheduler``, timed by phase, after the nodes' heartbeats (all but
    ``silent``'s) are refreshed; ``control`` counts what it changed."""
    await control.execute(_HEARTBEATS, silent)
    before = await instance_states(control)
    gc.collect()
    scheduler.take()
    started = time.perf_counter()
    snapshot = await load_snapshot(scheduler)
    loaded = time.perf_counter()
    result = plan(snapshot, settings)
    planned = time.perf_counter()
    queries = scheduler.take()
    if result.actions:
        await apply_plan(scheduler, result.actions, settings, fence=fence)
    applied = time.perf_counter()
    after = await instance_states(control)
    after.subtract(before)
    return Pass(
        load_s=loaded - started,
        plan_s=planned - loaded,
        apply_s=applied - planned if result.actions else 0.0,
        rows={
            "nodes": len(snapshot.nodes),
            "deployments": len(snapshot.deployments),
            "instances": len(snapshot.instances),
            "environments": len(snapshot.environments),
        },
        actions=dict(describe(result.actions)),
        waiting=len(result.waiting),
        queries=queries,
        writes=scheduler.take(),
        changed={state: n for state, n in sorted(after.items()) if n},
    )


def _expect(what: str, found: Pass, actions: dict[str, int], changed: dict[str, int]) -> None:
    if found.actions != actions or found.changed != changed or found.waiting:
        raise BenchError(
            f"{what}: expected actions {actions} and instances changed by {changed}; the pass"
            f" planned {found.actions} ({found.waiting} deployments waiting) and changed"
            f" {found.changed}"
        )


async def measure(
    dsn: str,
    nodes: int,
    regions: int,
    deployments: int,
    *,
    rollout: int = 100,
    repeat: int = 5,
    settings: Settings | None = None,
) -> Result:
    """Seed the migrated, empty database ``dsn`` and measure the passes."""
    settings = settings or Settings()
    result = Result(nodes, regions, deployments, rollout, database=urlsplit(dsn).path[1:])
    control = await connect(dsn)
    scheduler = RecordingConnection(await connect(dsn))
    try:
        started = time.perf_counter()
        await seed(control, nodes, regions, deployments)
        result.seed_s = time.perf_counter() - started
        # The leader's lock, held on another connection than the passes', as on an edge.
        await control.execute("SELECT pg_advisory_lock($1)", KEY)
        fence = (KEY, int(control.get_server_pid()))

        # The first pass, not counted, prepares the statements.
        for n in range(repeat + 1):
            steady = await one_pass(control, scheduler, settings, fence)
            _expect("the steady state (the seed is inconsistent)", steady, {}, {})
            if n:
                result.steady.append(steady)

        for _ in range(repeat):
            created = await control.fetch(_NEW_DEPLOYMENTS, rollout)
            rolled = await one_pass(control, scheduler, settings, fence)
            _expect(
                f"the rollout of {rollout} deployments",
                rolled,
                {"Transition": 2 * rollout, "PlaceInstance": rollout * regions},
                {"pending": rollout * regions},
            )
            result.rollouts.append(rolled)
            await control.execute(
                "DELETE FROM deployments WHERE id = ANY($1::uuid[])", [r["id"] for r in created]
            )

        node: UUID = await control.fetchval(_BUSIEST_NODE)
        on_node = await control.fetchval(
            "SELECT count(*)::int FROM instances WHERE node_id = $1 AND state = 'running'", node
        )
        for _ in range(repeat):
            await control.execute(_SILENCE, node, settings.heartbeat_timeout + 60)
            down = await one_pass(control, scheduler, settings, fence, silent=node)
            _expect(
                "the node-down pass",
                down,
                {"MarkNodeDown": 1, "StopInstance": on_node, "PlaceInstance": on_node},
                {"running": -on_node, "stopped": on_node, "pending": on_node},
            )
            result.node_downs.append(down)
            await node_back(control, node)

        settled = await one_pass(control, scheduler, settings, fence)
        _expect("the steady state once the passes were undone", settled, {}, {})
    finally:
        await scheduler.conn.close()
        await control.close()
    return result


async def run(
    nodes: int = 1_000,
    regions: int = 10,
    deployments: int = 1_000,
    *,
    rollout: int = 100,
    repeat: int = 5,
    settings: Settings | None = None,
    database_url: str | None = None,
    embedded: bool = False,
) -> Result:
    """The whole benchmark: a scratch database, the measurement, the database dropped.
    ``settings``: the scheduler's (its defaults: a 30 s heartbeat timeout)."""
    if regions < 1 or nodes < 2 * regions:
        raise ValueError("every region needs 2 nodes or more (one to replace a down one)")
    if not 1 <= rollout <= deployments:
        raise ValueError("rollout must be between 1 and deployments")
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    with contextlib.ExitStack() as stack:
        if embedded:
            server = await asyncio.to_thread(stack.enter_context, embedded_server())
        else:
            server = admin_url(database_url)
        async with scratch_database(server) as dsn:
            return await measure(
                dsn, nodes, regions, deployments, rollout=rollout, repeat=repeat, settings=settings
            )
    raise AssertionError("unreachable")


# --- the report ----------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def _spread(values: Sequence[float]) -> str:
    return f"median {_ms(statistics.median(values))}, max {_ms(max(values))}"


def _by_kind(statements: Sequence[tuple[str, float]]) -> list[tuple[str, int, float]]:
    """(kind, count, seconds) per kind of statement, the slowest first."""
    count: Counter[str] = Counter()
    seconds: defaultdict[str, float] = defaultdict(float)
    for kind, spent in statements:
        count[kind] += 1
        seconds[kind] += spent
    return sorted(((k, count[k], seconds[k]) for k in count), key=lambda t: -t[2])


def _median_pass(passes: Sequence[Pass]) -> Pass:
    """The pass of median duration (the lower one of an even count)."""
    ordered = sorted(passes, key=lambda p: p.seconds)
    return ordered[(len(ordered) - 1) // 2]


def _phases(passes: Sequence[Pass]) -> str:
    """Median of each phase, and the apply's statements of the median pass."""
    typical = _median_pass(passes)
    writes = ", ".join(f"{n} {kind} {_ms(s)}" for kind, n, s in _by_kind(typical.writes))
    return (
        f"load {_ms(statistics.median(p.load_s for p in passes))},"
        f" plan {_ms(statistics.median(p.plan_s for p in passes))},"
        f" apply {_ms(statistics.median(p.apply_s for p in passes))}"
        f" ({len(typical.writes)} statements: {writes})"
    )


def format_result(result: Result) -> list[str]:
    """One line per figure."""
    runs = len(result.steady)
    first = result.steady[0]
    queries: defaultdict[str, list[float]] = defaultdict(list)
    for steady in result.steady:
        for kind, count, seconds in _by_kind(steady.queries):
            queries[f"{kind}" if count == 1 else f"{count} {kind}"].append(seconds)
    rows = first.rows
    rollout = _median_pass(result.rollouts)
    down = _median_pass(result.node_downs)
    placed = rollout.actions.get("PlaceInstance", 0)
    stopped = down.actions.get("StopInstance", 0)
    return [
        f"scheduler at scale: {result.nodes:,} nodes in {result.regions} regions,"
        f" {result.deployments:,} deployments x 1 per region = {result.instances:,} instances"
        f" (seeded in {result.seed_s:.1f} s), {runs} runs of each figure",
        f"snapshot: {rows['instances']:,} instances, {rows['nodes']:,} nodes,"
        f" {rows['deployments']:,} deployments, {rows['environments']:,} environments:"
        f" {_spread([p.load_s for p in result.steady])}",
        "snapshot queries (median): "
        + ", ".join(
            f"{kind} {_ms(statistics.median(spent))}"
            for kind, spent in sorted(queries.items(), key=lambda kv: -statistics.median(kv[1]))
        ),
        f"plan, steady state ({first.action_count} actions):"
        f" {_spread([p.plan_s for p in result.steady])}",
        f"steady-state pass (load + plan): {_spread(result.steady_s)}, budget {BUDGET_S:g} s",
        f"rollout pass: {result.rollout:,} deployments, {placed:,} instances placed,"
        f" {rollout.action_count:,} actions: {_spread([p.seconds for p in result.rollouts])}",
        f"rollout pass by phase (median): {_phases(result.rollouts)}",
        f"node-down pass: 1 node, {stopped:,} instances stopped and replaced,"
        f" {down.action_count:,} actions: {_spread([p.seconds for p in result.node_downs])}",
        f"node-down pass by phase (median): {_phases(result.node_downs)}",
    ]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1_000, help="nodes (1,000)")
    parser.add_argument("--regions", type=int, default=10, help="regions (10)")
    parser.add_argument(
        "--deployments", type=int, default=1_000, help="projects, one active deployment each"
    )
    parser.add_argument(
        "--rollout", type=int, default=100, help="new deployments of the rollout pass (100)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="runs of each figure (5)")
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 when a steady-state pass (load + plan) takes over {BUDGET_S:g} s",
    )
    add_database_options(parser)
    args = parser.parse_args(argv)
    if args.regions < 1 or args.nodes < 2 * args.regions:
        parser.error("--regions must be at least 1 and --nodes at least twice --regions")
    if not 1 <= args.rollout <= args.deployments:
        parser.error("--rollout must be between 1 and --deployments")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = parse_args(argv)
    try:
        result = uvloop.run(
            run(
                args.nodes,
                args.regions,
                args.deployments,
                rollout=args.rollout,
                repeat=args.repeat,
                database_url=args.database_url,
                embedded=args.embedded,
            )
        )
    except (BenchError, StoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for line in format_result(result):
        print(line, file=out)
    slowest = max(result.steady_s)
    if args.check and slowest > BUDGET_S:
        print(f"over the {BUDGET_S:g} s budget: a steady-state pass took {_ms(slowest)}", file=out)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
