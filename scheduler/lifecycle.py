"""The deployment lifecycle as one explicit transition table.

::

    pending -> placing -> starting -> healthy -> active -> draining -> inactive
                  |           |          |                   ^  |          |
                  v           v          v                   |  v          |
               failed      failed     inactive (superseded)  active        placing
                                                          (rollback)   (rollback restart)

- ``pending``: created, not yet looked at by the scheduler.
- ``placing``: instances are being assigned to nodes (it waits here while a region lacks
  capacity, until the start timeout).
- ``starting``: every instance is placed; the agents start them and report their health.
- ``healthy``: every instance is running and healthy. At once either ``active`` (it becomes its
  environment's current deployment) or, when a newer deployment of the environment is current
  already, ``inactive`` (superseded; its instances stop).
- ``active``: the environment's current deployment.
- ``draining``: the former current deployment, still running for the rollback window; a
  rollback makes it ``active`` again.
- ``inactive``: its instances are stopped; a rollback to it places them again (``placing``).
- ``failed``: never became healthy (with a reason); final.

Every status change goes through :func:`check`: a change the table does not hold is an
:class:`IllegalTransition`, never a silent update.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal, get_args

Status = Literal[
    "pending", "placing", "starting", "healthy", "active", "draining", "inactive", "failed"
]
STATUSES: tuple[Status, ...] = get_args(Status)

TRANSITIONS: Mapping[Status, frozenset[Status]] = MappingProxyType(
    {
        "pending": frozenset({"placing", "failed"}),
        "placing": frozenset({"starting", "failed"}),
        "starting": frozenset({"healthy", "failed"}),
        "healthy": frozenset({"active", "inactive"}),
        "active": frozenset({"draining"}),
        "draining": frozenset({"active", "inactive"}),
        "inactive": frozenset({"placing"}),
        "failed": frozenset(),
    }
)

# Statuses the scheduler still works on (their instances must run or are being placed).
LIVE: frozenset[Status] = frozenset(
    {"pending", "placing", "starting", "healthy", "active", "draining"}
)
# Statuses in which a deployment's instances should be running (placed and started).
RUNNING: frozenset[Status] = frozenset({"starting", "healthy", "active", "draining"})


class IllegalTransition(ValueError):
    """A status change the transition table does not allow."""

    def __init__(self, source: str, target: str) -> None:
        allowed = TRANSITIONS.get(source, frozenset())  # type: ignore[call-overload]
        if source not in TRANSITIONS:
            detail = f"{source!r} is not a deployment status"
        elif not allowed:
            detail = f"{source} is final"
        else:
            detail = f"from {source} it may only go to {', '.join(sorted(allowed))}"
        super().__init__(f"a deployment cannot go from {source} to {target}: {detail}")
        self.source = source
        self.target = target


def check(source: str, target: str) -> None:
    """Raise :class:`IllegalTransition` unless the table allows ``source -> target``."""
    if target not in TRANSITIONS.get(source, ()):  # type: ignore[call-overload]
        raise IllegalTransition(source, target)


def allowed(source: str, target: str) -> bool:
    return target in TRANSITIONS.get(source, ())  # type: ignore[call-overload]
