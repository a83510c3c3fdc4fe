"""Leader election among the edges that share one database: a PostgreSQL advisory lock.

The leader is the edge whose dedicated connection holds ``pg_try_advisory_lock(KEY)``; the
lock goes with the connection, so an edge that dies or loses its connection stops being
leader at once on the server's side, and another edge takes the lock at its next try. An edge
that is not leader tries every ``interval`` seconds; the leader checks its connection as
often, so it notices a lost lock within that time too.

The singleton loops that run on the leader (the scheduler, ACME) read
:attr:`LeaderLock.is_leader`, and fence their writes with :attr:`LeaderLock.fence`: a write
transaction that checks the lock is still held by this edge's session cannot land after
another edge took over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from edge.store.db import connect
from edge.store.errors import TRANSLATED, StoreError, translate

log = logging.getLogger("edge.leader")


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background loop's task (if any) and wait until it has ended."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


_FAILURES: tuple[type[BaseException], ...] = (StoreError, *TRANSLATED)

# The advisory lock key of the platform's leader ("zeitwork" in ASCII, as a bigint).
KEY = 0x7A65_6974_776F_726B


class Leadership(Protocol):
    """What a leader's loop asks of leadership (a :class:`LeaderLock`, or a test's stand-in)."""

    @property
    def is_leader(self) -> bool: ...


class FencedLeadership(Leadership, Protocol):
    """Leadership whose writes can be fenced (:attr:`LeaderLock.fence`)."""

    @property
    def fence(self) -> tuple[int, int] | None: ...


class LeaderLock:
    def __init__(self, dsn: str, *, interval: float = 2.0) -> None:
        self.dsn = dsn
        self.interval = interval
        self.is_leader = False
        self._conn: Any = None
        self._task: asyncio.Task[None] | None = None

    @property
    def fence(self) -> tuple[int, int] | None:
        """(lock key, server pid of the session holding it) while leader, else None."""
        if not self.is_leader or self._conn is None:
            return None
        return KEY, int(self._conn.get_server_pid())

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="leader-lock")

    async def stop(self) -> None:
        await cancel_task(self._task)
        await self._drop()

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except _FAILURES as exc:
                if self.is_leader:
                    log.error("lost the leader lock: %s", translate(exc))
                self.is_leader = False
                await self._drop()
            await asyncio.sleep(self.interval)

    async def _step(self) -> None:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self.dsn)
        if self.is_leader:
            # The lock lives as long as the connection: a round trip proves both.
            await self._conn.fetchval("SELECT 1")
            return
        if await self._conn.fetchval("SELECT pg_try_advisory_lock($1)", KEY):
            self.is_leader = True
            log.info("this edge is now the leader")

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)


class Notifications:
    """A dedicated LISTEN connection for a leader's loop: any notification on ``channels``
    sets ``wake``. :meth:`listen` (re)connects when there is no live connection (a lost one
    is noticed by its termination callback) and raises what connecting raised; :meth:`drop`
    closes it, when the edge stops leading or stops."""

    def __init__(self, dsn: str, channels: tuple[str, ...], wake: asyncio.Event) -> None:
        self.dsn = dsn
        self.channels = channels
        self.wake = wake
        self._conn: Any = None

    async def listen(self) -> None:
        if self._conn is not None and not self._conn.is_closed():
            return
        conn = await connect(self.dsn)
        try:
            for channel in self.channels:
                await conn.add_listener(channel, self._notified)
            conn.add_termination_listener(self._terminated)
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        self._conn = conn

    def _notified(self, *_: object) -> None:
        self.wake.set()

    def _terminated(self, *_: object) -> None:
        self._conn = None

    async def drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2.0)
