"""The routing table followed live from PostgreSQL, one updater per proxy worker.

:class:`PostgresRouteProvider` is the database's :class:`~edge.routing.RouteProvider`: it
compiles the table with one query (``edge.store.routes``). :class:`LiveRoutes` keeps a
worker's table current:

- one dedicated connection per worker LISTENs on ``zeitwork_routes`` (the schema's triggers
  notify once per statement that can change a route);
- notifications are debounced: the first of a burst opens a window (50 ms by default), one
  full reload at its end covers them all, so a rollout that touches many rows costs one
  reload, and a change waits at most the window plus one reload;
- a full reload on a timer (30 s by default) covers notifications lost in any way (a
  trigger disabled, a notification queue overflow, a bug);
- with HTTPS on, the worker's certificates follow the ``certificates`` table the same way
  (:class:`~edge.tls.DatabaseCertificates`): a notification from that table reloads the
  certificates only, any other the routing table only, the timer both;
- if the database goes away, the worker keeps serving its last table ("stale beats down"),
  :meth:`LiveRoutes.table_age` grows, and the updater reconnects with capped, jittered
  exponential backoff, reloading at once when it is back (catching up on what it missed).

The request path never touches any of this: it reads ``worker.routes``, which
:meth:`ProxyWorker.install` swaps in one reference assignment.

Limits: each reload compiles the whole table (no deltas), on the worker's own event loop;
that is tens of milliseconds for tens of thousands of hosts, and it is what keeps the
updater simple and self-healing. Notifications carry only the changed table's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any, Protocol

from edge.leader import cancel_task
from edge.routing import RoutesError, RoutingTable
from edge.store.db import connect, describe_dsn
from edge.store.errors import StoreError
from edge.store.routes import load_routes

log = logging.getLogger("edge.live_routes")

CHANNEL = "zeitwork_routes"
# The payload of a change to the certificates (every other table feeds the routing table).
CERTIFICATES = "certificates"

# While the database stays down, how often the log says so again (seconds).
REMINDER_INTERVAL = 60.0

# What a lost or refusing database raises (the store translates asyncpg's errors); anything
# else is a bug, logged with its traceback but handled the same way: the updater must never
# die and leave a table frozen without a word.
DATABASE_ERRORS: tuple[type[BaseException], ...] = (StoreError,)


class PostgresRouteProvider:
    """Routing tables from the platform database (see :mod:`edge.store.routes`)."""

    def __init__(
        self,
        dsn: str,
        apps_domain: str,
        *,
        query_timeout: float = 30.0,
    ) -> None:
        self.dsn = dsn
        self.apps_domain = apps_domain
        # Bounds a reload on a connection that went silent (no RST ever arrives): the
        # updater then reconnects instead of waiting forever.
        self.query_timeout = query_timeout

    def describe(self) -> str:
        return f"PostgreSQL {describe_dsn(self.dsn)}"

    async def connect(self) -> Any:
        """A new ``asyncpg.Connection``; :class:`DatabaseUnavailable` when it cannot."""
        return await connect(self.dsn)

    async def load_from(self, conn: Any) -> RoutingTable:
        """Compile the table on ``conn``; database errors propagate unchanged."""
        return await load_routes(
            conn, self.apps_domain, source=self.describe(), query_timeout=self.query_timeout
        )

    async def load(self) -> RoutingTable:
        """Compile the table on a connection of its own (a worker's first load, a check)."""
        try:
            conn = await self.connect()
            try:
                return await self.load_from(conn)
            finally:
                conn.terminate()  # a one-off: no need to wait for a polite goodbye
        except DATABASE_ERRORS as exc:
            raise RoutesError(f"cannot load routes from {self.describe()}: {exc}") from None


class RoutesTarget(Protocol):
    """What the updater installs tables into (a :class:`~edge.proxy.worker.ProxyWorker`)."""

    def install(self, table: RoutingTable) -> None: ...


class CertificatesTarget(Protocol):
    """What follows the certificates table (a :class:`~edge.tls.DatabaseCertificates`)."""

    async def reload(self, conn: Any) -> None: ...


class _ConnectionLost(Exception):
    """The listening connection was closed under us (its termination listener ran)."""


class LiveRoutes:
    """Keeps one worker's routing table in step with the database (see the module doc)."""

    def __init__(
        self,
        target: RoutesTarget,
        provider: PostgresRouteProvider,
        *,
        debounce: float = 0.05,
        reload_interval: float = 30.0,
        backoff_min: float = 0.1,
        backoff_max: float = 5.0,
        certificates: CertificatesTarget | None = None,
    ) -> None:
        self.target = target
        self.provider = provider
        self.certificates = certificates
        self.debounce = debounce
        self.reload_interval = reload_interval
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        # Status for /health and metrics: read them, never set them.
        self.healthy = False  # connected, listening, and the last reload succeeded
        self.last_success: float | None = None  # wall-clock time of the last installed table
        self.reloads = 0  # tables installed
        self.notifications = 0  # notifications received
        self.failures = 0  # connection or reload failures
        self.last_error = ""
        self.last_reload_seconds = 0.0  # duration of the last successful reload
        self.loaded = asyncio.Event()  # set once the first table is installed
        self._loop = asyncio.get_running_loop()
        self._success_mono: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._conn: Any = None
        self._wake = asyncio.Event()
        # Something to reload (debounced), and which: the routing table, the certificates.
        self._dirty = False
        self._dirty_routes = False
        self._dirty_certificates = False
        self._dirty_since = 0.0
        self._lost = False
        self._down_since: float | None = None
        self._reminded_at = float("-inf")  # when the log last said the database is down

    # -- status --------------------------------------------------------------------------

    def table_age(self) -> float | None:
        """Seconds since the installed table was read from the database (None: never)."""
        if self._success_mono is None:
            return None
        return self._loop.time() - self._success_mono

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL backend of the listening connection (None while disconnected)."""
        conn = self._conn
        return None if conn is None or conn.is_closed() else int(conn.get_server_pid())

    def status(self) -> dict[str, object]:
        """A JSON-ready summary for /health."""
        age = self.table_age()
        return {
            "source": self.provider.describe(),
            "healthy": self.healthy,
            "table_age_seconds": None if age is None else round(age, 3),
            "reloads": self.reloads,
            "failures": self.failures,
            "last_error": self.last_error,
        }

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = self._loop.create_task(self._run(), name="live-routes")

    async def stop(self) -> None:
        """Stop following the database and close the connection (the table stays)."""
        task, self._task = self._task, None
        await cancel_task(task)
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await conn.close(timeout=1.0)
            except Exception:  # a polite close is best effort; abort instead
                conn.terminate()
        self.healthy = False

    def request_reload(self) -> None:
        """Reload soon (SIGHUP), through the same debounce as a notification."""
        self._mark_dirty(routes=True, certificates=True)

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        delay = self.backoff_min
        while True:
            reloads = self.reloads
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._on_failure(exc)
            self._drop_connection()
            if self.reloads > reloads:  # that session worked for a while: a new outage
                delay = self.backoff_min
            # Jitter: the edges of a whole fleet lose the database together and should not
            # all come back in the same millisecond.
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.backoff_max)

    async def _session(self) -> None:
        """Connect, listen, catch up, then follow notifications until the connection fails."""
        self._lost = False
        conn = self._conn = await self.provider.connect()
        conn.add_termination_listener(self._on_terminated)
        # LISTEN before loading: a change committed in between then wakes us up instead of
        # waiting for the timer.
        await conn.add_listener(CHANNEL, self._on_notify)
        self._dirty = False
        await self._reload(conn, routes=True, certificates=True)
        await self._follow(conn)

    async def _follow(self, conn: Any) -> None:
        loop = self._loop
        next_full = loop.time() + self.reload_interval
        while True:
            if self._lost:
                raise _ConnectionLost("connection to the database lost")
            now = loop.time()
            if self._dirty:
                wait = self._dirty_since + self.debounce - now
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue  # look at _lost again before using the connection
            elif now < next_full:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(next_full - now):
                        await self._wake.wait()
                continue
            routes = certificates = True
            if self._dirty:
                routes, certificates = self._dirty_routes, self._dirty_certificates
            await self._reload(conn, routes=routes, certificates=certificates)
            if routes and (certificates or self.certificates is None):
                # That was a full reload; one of the routes alone must not postpone the
                # certificates' (route changes can come more often than the period).
                next_full = loop.time() + self.reload_interval

    async def _reload(self, conn: Any, *, routes: bool, certificates: bool) -> None:
        # Cleared before the query: a change notified while it runs may be missing from its
        # snapshot, so it must cause one more reload.
        self._dirty = self._dirty_routes = self._dirty_certificates = False
        if certificates and self.certificates is not None:
            # Before the first table: a worker listens for HTTPS once both are in.
            await self.certificates.reload(conn)
        if not routes:
            return
        started = self._loop.time()
        table = await self.provider.load_from(conn)
        self.target.install(table)
        now = self._loop.time()
        self.last_reload_seconds = now - started
        self._success_mono = now
        self.last_success = time.time()
        self.reloads += 1
        if not self.healthy:
            if self._down_since is not None:
                log.info(
                    "routes: %s is back after %.1fs; %d hosts loaded",
                    self.provider.describe(),
                    now - self._down_since,
                    len(table),
                )
            else:
                log.info("routes: following %s, %d hosts", self.provider.describe(), len(table))
            self._down_since = None
        self.healthy = True
        self.loaded.set()

    # -- callbacks from asyncpg (run on the loop) -------------------------------------------

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        self.notifications += 1
        if payload == CERTIFICATES:
            self._mark_dirty(certificates=True)
        else:
            self._mark_dirty(routes=True)

    def _mark_dirty(self, *, routes: bool = False, certificates: bool = False) -> None:
        self._dirty_routes |= routes
        self._dirty_certificates |= certificates
        if not self._dirty:
            self._dirty = True
            self._dirty_since = self._loop.time()
            self._wake.set()

    def _on_terminated(self, conn: Any) -> None:
        if conn is self._conn:
            self._lost = True
            self._wake.set()

    # -- failures ------------------------------------------------------------------------

    def _on_failure(self, exc: Exception) -> None:
        self.failures += 1
        self.last_error = str(exc) or type(exc).__name__
        age = self.table_age()
        age_text = "no table yet" if age is None else f"serving a table {age:.1f}s old"
        if not isinstance(exc, (*DATABASE_ERRORS, _ConnectionLost)):
            log.exception("routes: unexpected error, reconnecting (%s)", age_text)
        elif self.healthy or self._down_since is None:
            log.warning(
                "routes: %s unavailable (%s); %s, reconnecting",
                self.provider.describe(),
                self.last_error,
                age_text,
            )
        elif self._loop.time() - self._reminded_at >= REMINDER_INTERVAL:
            # A reminder a minute while it stays down, with how stale the table has grown;
            # each retry in between only at debug, so an outage does not flood the log.
            log.warning("routes: still unavailable (%s); %s", self.last_error, age_text)
        else:
            log.debug("routes: still unavailable (%s); %s", self.last_error, age_text)
        if self._down_since is None:
            self._down_since = self._loop.time()
        if self.healthy or self._loop.time() - self._reminded_at >= REMINDER_INTERVAL:
            self._reminded_at = self._loop.time()
        self.healthy = False

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
