"""wrk's command line for a scenario, and the parser of what it prints.

Every run uses the script bench/wrk.lua: it sets the request's method and body from the
arguments after the URL, and at the end prints one line with the 99.9th latency percentile
and the exact counts of requests and bytes read, which wrk's own report lacks (``--latency``
prints only 50/75/90/99, and the byte count rounded).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import WrkParseError
from bench.scenarios import Scenario

WRK_SCRIPT = Path(__file__).resolve().parent / "wrk.lua"
WRK_THREADS = 1
SOCKET_ERROR_KINDS = ("connect", "read", "write", "timeout")

# wrk prints times with the largest unit that keeps the number >= 1: us, ms, s, then m and h.
_TIME_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_TIME = r"(\d+(?:\.\d+)?)(us|ms|s|m|h)"
_PERCENTILE_RE = re.compile(rf"^\s*(\d+(?:\.\d+)?)%\s+{_TIME}\s*$", re.MULTILINE)
_REQUESTS_RE = re.compile(rf"^\s*(\d+) requests in {_TIME},", re.MULTILINE)
_RPS_RE = re.compile(r"^Requests/sec:\s+(\d+(?:\.\d+)?)\s*$", re.MULTILINE)
_SOCKET_ERRORS_RE = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"
)
_NON_2XX_RE = re.compile(r"Non-2xx or 3xx responses: (\d+)")
# The line of bench/wrk.lua's done().
_SCRIPT_RE = re.compile(
    r"^zeitwork-bench: p99\.9 (\d+) us; requests (\d+); bytes (\d+)\s*$", re.MULTILINE
)


def time_to_ms(value: str, unit: str) -> float:
    """Convert a wrk time (``"520.12"``, ``"us"``) to milliseconds."""
    try:
        return float(value) * _TIME_UNIT_MS[unit]
    except KeyError:
        raise WrkParseError(f"unknown wrk time unit {unit!r}") from None


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run measured; latencies in milliseconds, keyed by percentile."""

    requests: int
    duration_s: float
    requests_per_sec: float
    latency_ms: Mapping[float, float]
    # All bytes read from the server (heads and bodies), as bench/wrk.lua counted them.
    bytes_read: int = 0
    non_2xx_3xx: int = 0
    socket_errors: Mapping[str, int] = field(
        default_factory=lambda: dict.fromkeys(SOCKET_ERROR_KINDS, 0)
    )

    @property
    def p50_ms(self) -> float:
        return self.latency_ms[50]

    @property
    def p99_ms(self) -> float:
        return self.latency_ms[99]

    @property
    def p999_ms(self) -> float:
        return self.latency_ms[99.9]

    @property
    def errors(self) -> int:
        return self.non_2xx_3xx + sum(self.socket_errors.values())

    def describe_errors(self) -> str:
        sockets = ", ".join(f"{kind} {self.socket_errors[kind]}" for kind in SOCKET_ERROR_KINDS)
        plural = "" if self.errors == 1 else "s"
        return (
            f"{self.errors} error{plural}: non-2xx/3xx {self.non_2xx_3xx}; socket errors {sockets}"
        )


def parse_wrk_output(text: str) -> WrkResult:
    """Parse the report of ``wrk --latency -s bench/wrk.lua``.

    wrk prints the "Socket errors" and "Non-2xx or 3xx" lines only when they are non-zero, so
    their absence means zero; anything else missing is an error.
    """
    rps = _RPS_RE.search(text)
    requests = _REQUESTS_RE.search(text)
    script = _SCRIPT_RE.search(text)
    latency: dict[float, float] = {
        float(pct): time_to_ms(value, unit) for pct, value, unit in _PERCENTILE_RE.findall(text)
    }
    missing = [
        what
        for what, ok in (
            ("Requests/sec", rps is not None),
            ("'N requests in T' line", requests is not None),
            ("50% latency (was --latency given?)", 50 in latency),
            ("99% latency (was --latency given?)", 99 in latency),
            (f"the line of {WRK_SCRIPT.name} (was -s {WRK_SCRIPT.name} given?)", script),
        )
        if not ok
    ]
    if missing or rps is None or requests is None or script is None:
        raise WrkParseError(f"wrk output lacks {', '.join(missing)}:\n{text}")
    # wrk's histogram counts microseconds.
    latency[99.9] = int(script.group(1)) / 1000
    socket_errors = dict.fromkeys(SOCKET_ERROR_KINDS, 0)
    if match := _SOCKET_ERRORS_RE.search(text):
        socket_errors = dict(zip(SOCKET_ERROR_KINDS, map(int, match.groups()), strict=True))
    non_2xx = _NON_2XX_RE.search(text)
    count = int(requests.group(1))
    if int(script.group(2)) != count:
        raise WrkParseError(
            f"wrk counted {count} requests, {WRK_SCRIPT.name} {script.group(2)}:\n{text}"
        )
    return WrkResult(
        requests=count,
        duration_s=time_to_ms(requests.group(2), requests.group(3)) / 1000,
        requests_per_sec=float(rps.group(1)),
        latency_ms=latency,
        bytes_read=int(script.group(3)),
        non_2xx_3xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
    )


def wrk_argv(
    wrk: str,
    host: str,
    port: int,
    scenario: Scenario,
    *,
    vhost: str,
    duration: int,
    connections: int,
) -> list[str]:
    """wrk's command line for ``scenario`` against ``host:port``."""
    return [
        wrk,
        f"-t{WRK_THREADS}",
        f"-c{connections}",
        f"-d{duration}s",
        "--latency",
        "-s",
        str(WRK_SCRIPT),
        "-H",
        f"Host: {vhost}",
        *(["-H", "Connection: close"] if scenario.close else []),
        f"{scenario.scheme}://{host}:{port}{scenario.path}",
        # Read by bench/wrk.lua's init().
        "--",
        scenario.method,
        str(scenario.body_bytes),
    ]
