"""Propagation delay of the live PostgreSQL routing table: from a committed change to the edge.

What it measures: a rollout, repeated N times (default 200). Each change is a new deployment
of one app whose one instance is running and healthy, then made the environment's current
deployment, so the app's custom domain flips to it. From the moment the flipping statement
(``environments.set_current``) is sent, two delays:

- *table*: until the worker has installed a routing table in which the domain routes to the
  new instance (recorded inside ``install``, no polling);
- *request*: until the first request to the domain, sent back to back on one keep-alive
  connection through the edge, is answered by the new instance.

The time includes the statement's own round trip and commit, the NOTIFY, the debounce window
(50 ms by default) and one full reload. The goal on loopback: p99 under 100 ms.

How: a fresh database (``zeitwork_bench_<random>``) is created on the server of
``--database-url`` (else ``$DATABASE_URL``, else ``postgresql://postgres@127.0.0.1:5432/postgres``;
or, with ``--embedded``, on an embedded PostgreSQL in a temporary directory), migrated, and
seeded through the store layer (``edge.store``), as the control plane would. A real
:class:`~edge.proxy.worker.ProxyWorker` with :class:`~edge.live_routes.LiveRoutes` listens
on a loopback port in this process's event loop (uvloop). Each new instance is a small
asyncio HTTP server on a port of its own that answers 200 with its port number as the body,
so the client can tell which instance served it. Before each flip the benchmark waits until
the worker is quiet (the preparatory statements' reloads done), so every flip starts from
an idle updater. The database is dropped at the end, whatever happened.

Run from the repository root:
``.venv/bin/python -m bench.propagation [--changes 200] [--database-url URL | --embedded]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import uvloop

from edge.config import EdgeConfig
from edge.live_routes import LiveRoutes, PostgresRouteProvider
from edge.proxy.worker import ProxyWorker, listen_socket
from edge.routing import RoutingTable
from edge.store import deployments, domains, environments, instances, projects, regions
from edge.store.db import connect
from edge.store.embedded import EmbeddedPostgres
from edge.store.errors import StoreError
from edge.store.migrate import migrate

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
HOST = "127.0.0.1"
APPS_DOMAIN = "zeitwork.app"
DOMAIN = "shop.bench.example"
REGION = "eu-1"
# Bounds every wait: a change not seen by then is a failure, not a long figure.
CHANGE_TIMEOUT_S = 5.0
# The updater counts as quiet once it installed no table for this long (plus the debounce).
QUIET_S = 0.03


class BenchError(Exception):
    """A failure that deserves one clear message rather than a traceback."""


# --- a scratch database --------------------------------------------------------------------


def admin_url(given: str | None) -> str:
    """The server to create the scratch database on: ``given``, $DATABASE_URL, the default."""
    return given or os.environ.get("DATABASE_URL") or DEFAULT_ADMIN_URL


def database_in(dsn: str, name: str) -> str:
    """``dsn`` with its database replaced by ``name`` (keeps host, user and query)."""
    return urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))


@contextlib.contextmanager
def embedded_server() -> Iterator[str]:
    """An embedded PostgreSQL in a temporary directory, stopped and removed at the end."""
    with (
        tempfile.TemporaryDirectory(prefix="zeitwork-bench-") as tmp,
        EmbeddedPostgres(Path(tmp) / "data") as server,
    ):
        yield server.dsn


async def create_scratch_database(server_dsn: str) -> str:
    """A fresh, migrated database on the server of ``server_dsn``; returns its DSN."""
    name = f"zeitwork_bench_{secrets.token_hex(4)}"
    admin = await connect(server_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = database_in(server_dsn, name)
    try:
        conn = await connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
    except BaseException:
        await drop_scratch_database(server_dsn, dsn)
        raise
    return dsn


async def drop_scratch_database(server_dsn: str, dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    admin = await connect(server_dsn)
    try:
        # FORCE: a connection left behind by a failure must not keep the database.
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@contextlib.asynccontextmanager
async def scratch_database(server_dsn: str) -> AsyncIterator[str]:
    """A fresh database on the server of ``server_dsn``, migrated; dropped at the end."""
    dsn = await create_scratch_database(server_dsn)
    try:
        yield dsn
    finally:
        await drop_scratch_database(server_dsn, dsn)


# --- instances: tiny upstreams that answer with their port ---------------------------------


class _Answer(asyncio.Protocol):
    """HTTP/1.1 keep-alive, GET only: one fixed response per request head received."""

    def __init__(self, instance: Instance) -> None:
        self.instance = instance
        self.buffer = b""
        self.transport: Any = None  # uvloop's transports are no asyncio.Transport subclass

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.instance.transports.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.instance.transports.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            self.buffer = self.buffer[end + 4 :]
            self.transport.write(self.instance.response)


@dataclass
class Instance:
    """An app instance on loopback: ``GET`` anything, 200 with the port as the body."""

    port: int = 0
    response: bytes = b""
    transports: set[Any] = field(default_factory=set)
    _server: asyncio.AbstractServer | None = None

    async def start(self) -> Instance:
        sock = listen_socket(HOST, 0, 128)
        self.port = int(sock.getsockname()[1])
        body = str(self.port).encode()
        self.response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Answer(self), sock=sock)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for transport in list(self.transports):
                transport.abort()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()


# --- a keep-alive client -------------------------------------------------------------------


class Client:
    """One keep-alive HTTP/1.1 connection to the edge; ``get`` returns (status, body)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Client:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def get(self, host: str) -> tuple[int, bytes]:
        self.writer.write(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        body = await self.reader.readexactly(length) if length else b""
        return status, body

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


# --- the measurement -----------------------------------------------------------------------


class RecordingTarget:
    """What LiveRoutes installs into: the worker, plus the time each table arrived."""

    def __init__(self, worker: ProxyWorker) -> None:
        self.worker = worker
        self.loop = asyncio.get_running_loop()
        self.installed_at = 0.0
        # Set when a table routes DOMAIN to the port being waited for.
        self.waiting_for: int | None = None
        self.seen: asyncio.Event = asyncio.Event()
        self.seen_at = 0.0

    def install(self, table: RoutingTable) -> None:
        self.worker.install(table)
        now = self.installed_at = self.loop.time()
        port = self.waiting_for
        if port is not None and not self.seen.is_set():
            addresses = table.routes.get(DOMAIN, ())
            if any(address.port == port for address in addresses):
                self.seen_at = now
                self.seen.set()


@dataclass
class Result:
    changes: int
    debounce_s: float
    table_s: list[float] = field(default_factory=list)
    request_s: list[float] = field(default_factory=list)
    requests: int = 0  # sent while waiting for the flips
    reloads: int = 0
    notifications: int = 0


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (p99 of 200 values is the 198th smallest)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def format_result(result: Result) -> str:
    lines = [
        f"propagation over {result.changes} changes (debounce {result.debounce_s * 1e3:g} ms,"
        f" loopback, uvloop)"
    ]
    for label, values in (
        ("commit -> worker table", result.table_s),
        ("commit -> first routed request", result.request_s),
    ):
        lines.append(
            f"  {label:<31} p50 {statistics.median(values) * 1e3:6.1f} ms"
            f"  p99 {percentile(values, 99) * 1e3:6.1f} ms"
            f"  max {max(values) * 1e3:6.1f} ms"
        )
    lines.append(
        f"  reloads {result.reloads}, notifications {result.notifications},"
        f" requests sent while waiting {result.requests}"
    )
    verdict = "met" if percentile(result.request_s, 99) < 0.1 else "NOT met"
    lines.append(f"  goal p99 < 100 ms (first routed request): {verdict}")
    return "\n".join(lines)


async def _quiet(target: RecordingTarget, debounce: float) -> None:
    """Wait until the updater installed nothing for a while: no reload pending or running."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(CHANGE_TIMEOUT_S):
        # Polling: "nothing happened for a while" has no event to wait for.
        while (left := target.installed_at + debounce + QUIET_S - loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(left)


async def _first_routed(client: Client, port: int, result: Result) -> None:
    """Send requests back to back until one is answered by the instance on ``port``."""
    expected = str(port).encode()
    while True:
        status, body = await client.get(DOMAIN)
        result.requests += 1
        if status == 200 and body == expected:
            return


async def measure(
    dsn: str, changes: int, *, debounce: float = 0.05, out: TextIO | None = None
) -> Result:
    """Run ``changes`` flips against the migrated, empty database ``dsn``."""
    loop = asyncio.get_running_loop()
    result = Result(changes=changes, debounce_s=debounce)
    conn = await connect(dsn)
    started: list[Instance] = []
    worker: ProxyWorker | None = None
    live: LiveRoutes | None = None
    client: Client | None = None
    try:
        # The control plane's side: one app with a custom domain, through the store layer.
        await regions.create(conn, REGION, "Bench", "DE")
        project = await projects.create(conn, "bench", "shop")
        env = await environments.create(conn, project.id, "production")
        domain = await domains.create(conn, DOMAIN, project_id=project.id, environment_id=env.id)
        await domains.record_check(conn, domain.id, verified=True, pointing=True)

        async def roll_out() -> tuple[UUID, UUID, Instance]:
            """A deployment with one running, healthy instance (not yet current)."""
            instance = await Instance().start()
            started.append(instance)
            deployment = await deployments.create(
                conn, project_id=project.id, environment_id=env.id, image="bench"
            )
            for source, target in deployments.PATH_TO_HEALTHY:
                await deployments.transition(conn, deployment.id, source, target)
            row = await instances.create(conn, deployment_id=deployment.id, region=REGION)
            await instances.report(conn, row.id, "running", address=HOST, port=instance.port)
            await instances.set_health(conn, row.id, True)
            return deployment.id, row.id, instance

        first, first_row, first_instance = await roll_out()
        await environments.set_current(conn, env.id, first)
        await deployments.transition(conn, first, "healthy", "active")

        # The edge's side: one worker following the database.
        config = EdgeConfig(
            database_url=dsn, http_host=HOST, http_port=1, workers=1, routes_debounce=debounce
        )
        provider = PostgresRouteProvider(dsn, APPS_DOMAIN)
        worker = ProxyWorker(config, provider)
        target = RecordingTarget(worker)
        live = LiveRoutes(target, provider, debounce=debounce)
        live.start()
        async with asyncio.timeout(CHANGE_TIMEOUT_S):
            await live.loaded.wait()
        sock = listen_socket(HOST, 0, 128)
        edge_port = int(sock.getsockname()[1])
        await worker.start(sock)
        client = await Client.open(edge_port)
        async with asyncio.timeout(CHANGE_TIMEOUT_S):
            await _first_routed(client, first_instance.port, result)

        current, current_row, current_instance = first, first_row, first_instance
        for n in range(1, changes + 1):
            new, new_row, new_instance = await roll_out()
            await _quiet(target, debounce)
            target.waiting_for = new_instance.port
            target.seen.clear()
            requests = asyncio.ensure_future(_first_routed(client, new_instance.port, result))
            sent = loop.time()
            await environments.set_current(conn, env.id, new)
            try:
                async with asyncio.timeout(CHANGE_TIMEOUT_S):
                    await requests
                    routed = loop.time()
                    await target.seen.wait()
            except TimeoutError:
                raise BenchError(
                    f"change {n}: the domain did not flip within {CHANGE_TIMEOUT_S:g} s"
                ) from None
            finally:
                requests.cancel()
            result.table_s.append(target.seen_at - sent)
            result.request_s.append(routed - sent)
            target.waiting_for = None
            # Retire the previous deployment as the scheduler would (outside the timing).
            await deployments.transition(conn, new, "healthy", "active")
            await deployments.transition(conn, current, "active", "draining")
            await deployments.transition(conn, current, "draining", "inactive")
            await instances.report(conn, current_row, "stopped")
            await current_instance.stop()
            current, current_row, current_instance = new, new_row, new_instance
            if out is not None and n % 50 == 0:
                print(f"  {n}/{changes} changes", file=out, flush=True)
        result.reloads = live.reloads
        result.notifications = live.notifications
        return result
    finally:
        if client is not None:
            await client.close()
        if live is not None:
            await live.stop()
        if worker is not None:
            await worker.shutdown(grace=0.5)
        for instance in started:
            await instance.stop()
        await conn.close()


async def run(
    changes: int,
    *,
    database_url: str | None = None,
    embedded: bool = False,
    debounce: float = 0.05,
    out: TextIO | None = None,
) -> Result:
    """The whole benchmark: a scratch database, the measurement, the database dropped."""
    with contextlib.ExitStack() as stack:
        if embedded:
            server = await asyncio.to_thread(stack.enter_context, embedded_server())
        else:
            server = admin_url(database_url)
        async with scratch_database(server) as dsn:
            return await measure(dsn, changes, debounce=debounce, out=out)
    raise AssertionError("unreachable")


def add_database_options(parser: argparse.ArgumentParser) -> None:
    """``--database-url`` or ``--embedded``: where the scratch database goes."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--database-url",
        help="an admin DSN of the server to create the scratch database on"
        f" (default: $DATABASE_URL, else {DEFAULT_ADMIN_URL})",
    )
    source.add_argument(
        "--embedded", action="store_true", help="use an embedded PostgreSQL in a temp dir"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--changes", type=int, default=200, help="flips to measure (200)")
    add_database_options(parser)
    parser.add_argument(
        "--debounce", type=float, default=0.05, help="LiveRoutes debounce in seconds (0.05)"
    )
    args = parser.parse_args(argv)
    if args.changes < 1:
        parser.error("--changes must be at least 1")
    if args.debounce < 0:
        parser.error("--debounce must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = uvloop.run(
            run(
                args.changes,
                database_url=args.database_url,
                embedded=args.embedded,
                debounce=args.debounce,
                out=sys.stdout,
            )
        )
    except TimeoutError:
        print(f"error: no progress within {CHANGE_TIMEOUT_S:g} s", file=sys.stderr)
        return 1
    except (BenchError, StoreError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(format_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
