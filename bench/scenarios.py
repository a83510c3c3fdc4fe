"""The scenarios of the proxy benchmark suite, the proxies each one drives, and the
configuration of a run.

A scenario decides the request and how wrk sends it (path, method, body, plain HTTP or TLS,
kept-alive or a new connection per request), or that it measures memory instead: idle
keep-alive connections held open while the proxy's memory is read. A proxy is one of the
programs measured; every (scenario, proxy) cell gets processes of its own, in front of the
same upstream. The registry is plain data: :mod:`bench.proxy` starts and drives the cells.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from bench.errors import BenchError
from bench.procfs import DISTURBED_CORES

# "edge-pg" is the edge routing from PostgreSQL (a scratch database seeded for the run)
# instead of a routes file: the same request path, so it is measured where it matters, the
# small keep-alive requests, unless asked for elsewhere.
PROXIES = ("edge", "edge-pg", "nginx", "haproxy")
EDGE_PROXIES = frozenset({"edge", "edge-pg"})
# Every ratio is taken to this proxy's figure in the same scenario and round.
REFERENCE = "nginx"

KIB = 1024
MIB = 1024 * KIB

Kind = Literal["wrk", "idle"]


@dataclass(frozen=True)
class Scenario:
    name: str
    # A few words for tables and the chart.
    title: str
    # What the Markdown says about it.
    description: str
    # The proxies it runs unless --proxies says otherwise.
    proxies: tuple[str, ...] = ("edge", "nginx", "haproxy")
    kind: Kind = "wrk"
    path: str = "/"
    method: str = "GET"
    # Request body sent with every request; the upstream reads all of it before answering.
    body_bytes: int = 0
    # Body of the upstream's answer: every response must carry at least this much.
    response_bytes: int = 12
    scheme: Literal["http", "https"] = "http"
    # Connection: close, so that every request is a new connection (and over TLS a handshake).
    close: bool = False
    # The edge runs with per-client rate limiting at a limit no client reaches, so every
    # request pays for the check and none is refused; nginx and HAProxy run as always.
    rate_limited: bool = False


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "keepalive",
            "keep-alive, 12 B",
            "keep-alive connections, `GET /` answered with 12 bytes",
            proxies=("edge", "edge-pg", "nginx", "haproxy"),
        ),
        Scenario(
            "64k",
            "keep-alive, 64 KiB",
            "keep-alive connections, `GET /64k` answered with 64 KiB (a static file of the "
            "upstream)",
            path="/64k",
            response_bytes=64 * KIB,
        ),
        Scenario(
            "upload",
            "1 MiB uploads",
            "keep-alive connections, `POST /upload` with a 1 MiB body that the upstream reads "
            "completely before it answers",
            path="/upload",
            method="POST",
            body_bytes=MIB,
            response_bytes=8,
        ),
        Scenario(
            "close",
            "new connection",
            "`Connection: close`: every request on a new plain-HTTP connection",
            close=True,
        ),
        Scenario("tls", "TLS keep-alive", "TLS keep-alive connections", scheme="https"),
        Scenario(
            "handshake",
            "TLS handshake",
            "TLS with `Connection: close`: every request a new connection and full handshake "
            "(wrk resumes no sessions)",
            scheme="https",
            close=True,
        ),
        Scenario(
            "limited",
            "rate limited",
            "keep-alive as in *keepalive*, the edge with per-client rate limiting on at a limit "
            "never reached (every request checked, none refused); nginx without",
            proxies=("edge", "nginx"),
            rate_limited=True,
        ),
        Scenario(
            "idle",
            "idle connections",
            "connections opened and kept idle after one small request each; the proxy's "
            "memory before and after",
            kind="idle",
        ),
    )
}


def setup_of(scenario: Scenario, proxy: str) -> str:
    """How ``proxy`` is configured for ``scenario``: ``plain``, ``tls``, ``limited`` (the
    edge with rate limiting) or ``idle`` (sized and timed for the idle connections).
    Scenarios that configure a proxy alike share its processes."""
    if scenario.kind == "idle":
        return "idle"
    if scenario.rate_limited and proxy in EDGE_PROXIES:
        return "limited"
    return "tls" if scenario.scheme == "https" else "plain"


def scenario_proxies(scenario: Scenario, proxies: tuple[str, ...] | None) -> tuple[str, ...]:
    """The proxies ``scenario`` runs: its own choice, or ``proxies`` in the order of PROXIES."""
    if proxies is None:
        return scenario.proxies
    return tuple(p for p in PROXIES if p in proxies)


def default_edge_cmd() -> tuple[str, ...]:
    """The ``zeitwork`` script next to the running interpreter, i.e. the venv's."""
    return (str(Path(sys.executable).parent / "zeitwork"),)


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures and how long; checked when built, nothing started."""

    scenarios: tuple[str, ...] = tuple(SCENARIOS)
    # None: each scenario's own proxies.
    proxies: tuple[str, ...] | None = None
    duration: int = 8
    connections: int = 50
    rounds: int = 3
    warmup: int = 1
    idle_connections: int = 10_000
    # Other processes using more than this many cores on average disturb a run.
    disturbed_cores: float = DISTURBED_CORES
    edge_cmd: tuple[str, ...] = field(default_factory=default_edge_cmd)

    def __post_init__(self) -> None:
        for what, names, known in (
            ("scenarios", self.scenarios, tuple(SCENARIOS)),
            ("proxies", self.proxies or PROXIES, PROXIES),
        ):
            unknown = sorted(set(names) - set(known))
            if unknown or not names or len(set(names)) != len(names):
                raise BenchError(
                    f"{what} must be distinct names among {', '.join(known)}, got {','.join(names)}"
                )
        if self.duration < 1 or self.rounds < 1 or self.warmup < 0:
            raise BenchError("duration and rounds must be >= 1 and warmup >= 0")
        if self.connections < 1 or self.idle_connections < 1:
            raise BenchError("connections and idle connections must be >= 1")
        if not self.disturbed_cores > 0:
            raise BenchError("the disturbance threshold must be a positive number of cores")
        if not self.cells():
            raise BenchError("no scenario runs any of the chosen proxies")

    def scenario_list(self) -> list[Scenario]:
        return [SCENARIOS[name] for name in self.scenarios]

    def cells(self) -> list[tuple[Scenario, str]]:
        """Every (scenario, proxy) measured, in the order of each round."""
        return [
            (scenario, proxy)
            for scenario in self.scenario_list()
            for proxy in scenario_proxies(scenario, self.proxies)
        ]

    def proxies_used(self) -> list[str]:
        return [p for p in PROXIES if any(proxy == p for _, proxy in self.cells())]
