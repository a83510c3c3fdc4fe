"""Store exceptions, grouped by how a caller handles them, and their translation from asyncpg.

Each carries the HTTP status the admin API maps it to. PostgreSQL's constraint errors are
translated once, here, into messages that name the table and the field ("nodes: hostname
'n1' already exists"), so no caller parses asyncpg exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import ClassVar

import asyncpg  # type: ignore[import-untyped, unused-ignore]


class StoreError(Exception):
    """A store operation failed; the message says what and where."""

    status: ClassVar[int] = 500

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class DatabaseUnavailable(StoreError):
    """PostgreSQL cannot be reached, refused the login, or went away mid-operation."""

    status = 503


class NotFound(StoreError):
    """The row, or a row it refers to, does not exist."""

    status = 404


class Conflict(StoreError):
    """A unique value is taken, a row is still referenced, or the row changed meanwhile."""

    status = 409


class Invalid(StoreError):
    """A value breaks a rule of the schema (a check constraint, a missing value, a bad type)."""

    status = 422


class SchemaTooNew(StoreError):
    """The database has migrations this code does not know: a newer release migrated it."""


def _key(detail: str | None) -> tuple[str, str]:
    """``("org, name", "acme, web")`` from a detail like ``Key (org, name)=(acme, web) ...``."""
    if not detail or not detail.startswith("Key (") or ")=(" not in detail:
        return "", ""
    columns, _, rest = detail[len("Key (") :].partition(")=(")
    # The value may itself contain ") "; the detail ends with the fixed wording after it.
    for tail in (") already exists.", ") is not present in table", ") is still referenced"):
        if tail in rest:
            return columns, rest[: rest.index(tail)]
    return columns, ""


def translate(exc: BaseException) -> StoreError:
    """The store exception for an asyncpg (or connection) exception."""
    if isinstance(exc, StoreError):
        return exc
    table = getattr(exc, "table_name", None) or "database"
    detail = getattr(exc, "detail", None)
    if isinstance(exc, asyncpg.UniqueViolationError):
        columns, value = _key(detail)
        if columns:
            return Conflict(f"{table}: {columns} {value!r} already exists", field=columns)
        return Conflict(f"{table}: {exc}", field=getattr(exc, "constraint_name", None))
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        columns, value = _key(detail)
        if detail and "is still referenced from table" in detail:
            other = detail.rpartition("from table ")[2].strip('".')
            return Conflict(
                f"{table}: {columns} {value!r} is still referenced by {other}", field=columns
            )
        target = detail.rpartition("in table ")[2].strip('".') if detail else "?"
        return NotFound(
            f"{table}: {columns} {value!r} does not exist in {target}", field=columns or None
        )
    if isinstance(exc, asyncpg.CheckViolationError):
        constraint = getattr(exc, "constraint_name", None) or ""
        # PostgreSQL names a column check "<table>_<column>_check".
        column = constraint.removeprefix(f"{table}_").removesuffix("_check")
        return Invalid(f"{table}: {column} is not allowed ({constraint})", field=column or None)
    if isinstance(exc, asyncpg.NotNullViolationError):
        column = getattr(exc, "column_name", None)
        return Invalid(f"{table}: {column} is required", field=column)
    if isinstance(exc, asyncpg.DataError):
        return Invalid(f"invalid value: {exc}")
    if isinstance(
        exc,
        asyncpg.PostgresConnectionError
        | asyncpg.CannotConnectNowError
        | asyncpg.InterfaceError
        | asyncpg.exceptions.OperatorInterventionError
        | OSError
        | asyncio.TimeoutError,
    ):
        if isinstance(exc, asyncio.TimeoutError):
            return DatabaseUnavailable("database unavailable: the statement timed out")
        return DatabaseUnavailable(f"database unavailable: {str(exc) or type(exc).__name__}")
    if isinstance(exc, asyncpg.PostgresError):
        return StoreError(f"database error: {exc}")
    return StoreError(f"{type(exc).__name__}: {exc}")


# Exceptions that translate() knows; anything else (a bug) propagates unchanged.
TRANSLATED: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    asyncio.TimeoutError,
)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Raise store exceptions instead of asyncpg's inside the block."""
    try:
        yield
    except TRANSLATED as exc:
        raise translate(exc) from exc
