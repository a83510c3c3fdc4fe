"""The store layer: the platform's state in PostgreSQL, through asyncpg.

All SQL of the platform lives in this package: one module per aggregate (``regions``,
``nodes``, ``projects`` ...) with typed dataclasses and async functions that take a pool or
a connection, ``migrate`` for the schema, ``db`` to connect and ``embedded`` for the
PostgreSQL started with the platform when no ``DATABASE_URL`` is given. Callers handle the
exceptions of :mod:`edge.store.errors`, never asyncpg's.

Limits: the functions hold no state and no cache; transitions between states (which status
may follow which) are the scheduler's business, the store only records them.
"""

from edge.store.errors import (
    Conflict,
    DatabaseUnavailable,
    Invalid,
    NotFound,
    SchemaTooNew,
    StoreError,
)

__all__ = [
    "Conflict",
    "DatabaseUnavailable",
    "Invalid",
    "NotFound",
    "SchemaTooNew",
    "StoreError",
]
