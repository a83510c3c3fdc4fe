"""Running a statement and mapping its rows into a dataclass, with errors translated.

The aggregate modules call these instead of asyncpg so that every statement raises store
exceptions only. Rows map by column name onto the dataclass's fields (``SELECT *`` is safe
because :func:`edge.store.migrate.migrate` refuses a schema newer than the code, so a table
has exactly the columns its dataclass declares; a test checks every pair).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

from edge.store.errors import translated

T = TypeVar("T")


class Executor(Protocol):
    """What the store needs of a connection: an ``asyncpg.Pool`` or ``asyncpg.Connection``
    (created by :mod:`edge.store.db`, which installs the jsonb codec)."""

    async def execute(self, query: str, *args: Any) -> str: ...

    async def executemany(self, command: str, args: Sequence[Sequence[Any]]) -> None: ...

    async def fetch(self, query: str, *args: Any) -> list[Mapping[str, Any]]: ...

    async def fetchrow(self, query: str, *args: Any) -> Mapping[str, Any] | None: ...

    async def fetchval(self, query: str, *args: Any) -> Any: ...


async def fetch_one(db: Executor, cls: type[T], query: str, *args: Any) -> T | None:
    with translated():
        row = await db.fetchrow(query, *args)
    return None if row is None else cls(**row)


async def fetch_all(db: Executor, cls: type[T], query: str, *args: Any) -> list[T]:
    with translated():
        rows = await db.fetch(query, *args)
    return [cls(**row) for row in rows]


async def fetch_value(db: Executor, query: str, *args: Any) -> Any:
    with translated():
        return await db.fetchval(query, *args)


async def execute(db: Executor, query: str, *args: Any) -> int:
    """Run a statement; the number of rows it touched."""
    with translated():
        status = await db.execute(query, *args)
    # The command tag ends with the row count ("UPDATE 3", "INSERT 0 1", "DELETE 0").
    last = status.rpartition(" ")[2]
    return int(last) if last.isdigit() else 0


async def execute_many(db: Executor, query: str, args: Sequence[Sequence[Any]]) -> None:
    with translated():
        await db.executemany(query, args)
