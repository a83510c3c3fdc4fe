"""The routing table: which instances serve which host, and where the table comes from.

A provider produces a :class:`RoutingTable` (plain data: host -> instance addresses). Each
proxy worker compiles it into its own ``dict`` of live routes bound to its connection pools,
so a request costs one dict lookup. The routes file is one provider; the PostgreSQL provider
implements the same interface.
"""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol

_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")


class RoutesError(ValueError):
    """The routing table source is invalid; the message says where."""


class Address(NamedTuple):
    """An instance's address. A tuple, so hashing and comparing it (done for every host of
    every routing table compiled) run in C."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class ProjectLimit(NamedTuple):
    """A project's rate limit: requests per second to all its hosts together, and burst."""

    project: str
    rate: int
    burst: int


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """host (lower case, no port) -> the addresses of the instances that serve it."""

    routes: Mapping[str, tuple[Address, ...]]
    source: str = ""
    loaded_at: float = field(default_factory=time.time)
    # The region each instance runs in, where the source knows it (the routes file does not):
    # the edge prefers instances of its own region.
    regions: Mapping[Address, str] = field(default_factory=dict)
    # The rate limit of each host whose project has one (the database knows them; the
    # routes file does not).
    limits: Mapping[str, ProjectLimit] = field(default_factory=dict)
    # HSTS max-age (seconds) of each host whose project sets one (database only).
    hsts: Mapping[str, int] = field(default_factory=dict)
    # ACME HTTP-01 challenges the edge answers on plain HTTP: token -> (key authorization,
    # expiry as a Unix time). None: the source has none (a routes file), and challenge paths
    # are proxied like any other.
    challenges: Mapping[str, tuple[str, float]] | None = None

    def __len__(self) -> int:
        return len(self.routes)


class RouteProvider(Protocol):
    """Where a routing table comes from (the routes file, PostgreSQL)."""

    def describe(self) -> str: ...

    async def load(self) -> RoutingTable:
        """Return the current table, or raise :class:`RoutesError`."""
        ...


def normalize_host(host: str) -> str:
    """Validate a route's host name and return its lower-case form."""
    name = host.strip().lower().rstrip(".")
    if not name or len(name) > 253:
        raise RoutesError(f"invalid host {host!r}")
    labels = name.split(".")
    for label in labels:
        if not label or len(label) > 63 or not set(label) <= _HOST_CHARS:
            raise RoutesError(f"invalid host {host!r}")
        if label[0] == "-" or label[-1] == "-":
            raise RoutesError(f"invalid host {host!r}")
    return name


def parse_address(value: object) -> Address:
    """Parse ``host:port`` or ``[v6]:port`` of an instance."""
    if not isinstance(value, str):
        raise RoutesError(f"instance address must be a string like '10.0.0.5:3000', got {value!r}")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
    else:
        host, sep, port_text = value.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise RoutesError(f"instance address {value!r} is not host:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise RoutesError(f"instance address {value!r}: port must be 1-65535")
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = normalize_host(host)
    return Address(host, port)


def parse_routes_document(document: object, source: str) -> RoutingTable:
    """Validate a routes document ``{"routes": {host: [address, ...]}}``.

    A route may also be an object ``{"instances": [...]}`` so later per-route settings have a
    place to live. Unknown keys are errors, never silently ignored.
    """
    if not isinstance(document, dict):
        raise RoutesError(f"{source}: top level must be an object with a 'routes' key")
    unknown = set(document) - {"routes"}
    if unknown:
        raise RoutesError(f"{source}: unknown top-level key(s) {sorted(unknown)}")
    routes = document.get("routes")
    if not isinstance(routes, dict):
        raise RoutesError(f"{source}: 'routes' must be an object mapping host -> instances")
    table: dict[str, tuple[Address, ...]] = {}
    for raw_host, spec in routes.items():
        host = normalize_host(raw_host)
        if isinstance(spec, dict):
            unknown = set(spec) - {"instances"}
            if unknown:
                raise RoutesError(f"{source}: route {raw_host!r}: unknown key(s) {sorted(unknown)}")
        instances = spec.get("instances", []) if isinstance(spec, dict) else spec
        if not isinstance(instances, list):
            raise RoutesError(f"{source}: route {raw_host!r} must be a list of 'host:port'")
        if host in table:
            raise RoutesError(f"{source}: host {raw_host!r} appears twice")
        try:
            table[host] = tuple(dict.fromkeys(parse_address(item) for item in instances))
        except RoutesError as exc:
            raise RoutesError(f"{source}: route {raw_host!r}: {exc}") from None
    return RoutingTable(table, source=source)


class FileRouteProvider:
    """Routes from a JSON file, read again on every :meth:`load` (SIGHUP)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def describe(self) -> str:
        return f"routes file {self.path}"

    def load_sync(self) -> RoutingTable:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RoutesError(f"cannot read routes file {self.path}: {exc.strerror}") from None
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RoutesError(
                f"{self.path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        return parse_routes_document(document, str(self.path))

    async def load(self) -> RoutingTable:
        # A routes file is small; reading it inline is cheaper than a thread hop.
        return self.load_sync()
