"""Rate limiting for the proxy's hot path: GCRA with one float per key, in bounded memory.

A :class:`RateLimit` is the policy (``rate`` requests per second sustained, ``burst`` at once);
a :class:`Limiter` applies one policy to many keys (client addresses, project ids) and holds
one theoretical arrival time (TAT) per key in a plain ``dict``. :class:`LogThrottle` keeps a
flood of refusals from flooding the log. Time is always passed in (``loop.time()`` on the
proxy, fake time in tests): nothing here reads a clock, so it is all plain synchronous code.

The algorithm (GCRA, "virtual scheduling" form). Time is counted in *emission intervals*
(``T = 1/rate`` seconds): ``u = now * rate``. Each allowed request pushes the key's TAT one
interval further; a request is allowed while the TAT is at most ``burst - 1`` intervals
ahead of now::

    tat = max(TAT[key], u)
    if tat - u > burst - 1:  refuse, retry after (tat - u - (burst - 1)) intervals
    else:                    TAT[key] = tat + 1

So ``burst`` requests pass at once, then one per ``T``, and over any window of ``w`` seconds
at most ``burst + rate * w`` requests pass. Counting in intervals rather than seconds makes
the burst boundary exact: ``burst`` requests at one instant leave the TAT exactly ``burst``
intervals ahead (adding 1.0 to a float is exact), where adding ``1/rate`` seconds ``burst``
times would accumulate rounding and refuse the last request of a burst now and then. A
request up to 1/1000 of an interval early is still allowed (:data:`EARLY`): ``now * rate``
is rounded, and a client that waited exactly the retry-after it was given must get in.

Memory: an entry whose TAT is in the past means the same as no entry, so :meth:`Limiter.sweep`
drops those, a bounded number of keys per call (a periodic tick calls it; it never blocks the
loop for long). The dict is kept in least-recently-used order (every hit re-inserts its key),
and a hard cap, ``max_keys``, evicts the oldest keys in small batches when a new key would
exceed it: a flood of distinct addresses costs the idle keys their state, never the active
clients theirs, and never everyone's at once.

Limits: one process's view (each proxy worker limits on its own, so a client spread over N
workers gets up to N times the rate); a limiter's state lives as long as the limiter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import islice
from typing import TypeAlias

# How early (in emission intervals) a request may come and still be allowed; see the module
# docstring. Float rounding of ``now * rate`` stays far below it for any realistic clock and
# rate (u < 2**42, e.g. 10,000 req/s on a clock of 13 years, keeps the rounding < 2**-10).
EARLY = 1e-3

# The largest batch of keys evicted at once when the cap is reached. Eviction walks the dict
# from the front, past the slots of keys deleted since the dict was last compacted, so one
# batch should be a fixed fraction of the cap (a batch of 1 makes every new key at the cap
# scan tens of thousands of dead slots); the ceiling keeps each batch well under a millisecond.
MAX_EVICT_BATCH = 4096

# Client addresses, project ids: whatever the caller keys its limits by.
Key: TypeAlias = str | bytes


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A policy: ``rate`` requests per second sustained, up to ``burst`` at once."""

    rate: float
    burst: int
    # Derived once, for the hot path and the headers.
    interval: float = field(init=False, repr=False, compare=False)  # seconds between requests

    def __post_init__(self) -> None:
        rate, burst = self.rate, self.burst
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise ValueError(f"rate must be a number of requests per second, got {rate!r}")
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be positive and finite, got {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            raise ValueError(f"burst must be an integer >= 1, got {burst!r}")
        object.__setattr__(self, "rate", float(rate))
        object.__setattr__(self, "interval", 1.0 / rate)

    def __str__(self) -> str:
        return f"{self.rate:g}/s burst {self.burst}"

    def window(self) -> tuple[int, int]:
        """``(q, w)`` for ``RateLimit-Policy``: a quota of ``q`` requests per ``w`` seconds.
        ``w`` is the time the whole burst takes to refill, rounded up to whole seconds (the
        draft's windows are integers), and ``q`` the larger of the burst and what the rate
        refills over ``w``: 100/s burst 100 is ``q=100;w=1``, 10/s burst 50 ``q=50;w=5``,
        100/s burst 1 ``q=100;w=1``, 0.5/s burst 1 ``q=1;w=2``."""
        w = max(1, math.ceil(self.burst / self.rate - EARLY))
        return max(self.burst, math.floor(self.rate * w + EARLY)), w


def _sf_string(value: str) -> str:
    """``value`` as a structured-field string (RFC 8941 3.3.3)."""
    if not value or not all(" " <= c <= "~" for c in value):
        raise ValueError(f"a limiter name must be printable ASCII, got {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def policy_header(name: str, limit: RateLimit) -> bytes:
    """The ``RateLimit-Policy`` field line (with CRLF), e.g.
    ``RateLimit-Policy: "client";q=100;w=1`` (draft-ietf-httpapi-ratelimit-headers)."""
    q, w = limit.window()
    return f"RateLimit-Policy: {_sf_string(name)};q={q};w={w}\r\n".encode("ascii")


def ratelimit_header(name: str, remaining: int, reset: float) -> bytes:
    """The ``RateLimit`` field line (with CRLF), e.g. ``RateLimit: "client";r=0;t=3``:
    ``remaining`` requests allowed now, the whole quota back in ``reset`` seconds (rounded
    up to whole seconds, as the draft's ``t`` is an integer)."""
    t = max(0, math.ceil(reset))
    return f"RateLimit: {_sf_string(name)};r={max(0, remaining)};t={t}\r\n".encode("ascii")


def retry_after_header(seconds: float) -> bytes:
    """The ``Retry-After`` field line (with CRLF): whole seconds, rounded up, at least 1
    (RFC 9110 10.2.3 has no fractions, and 0 would invite an immediate retry)."""
    return b"Retry-After: %d\r\n" % max(1, math.ceil(seconds))


class Limiter:
    """One :class:`RateLimit` applied per key, at most ``max_keys`` keys at a time.

    ``name`` names the policy in the ``RateLimit``/``RateLimit-Policy`` headers ("client",
    "project"). ``expired`` and ``evicted`` count the keys dropped by :meth:`sweep` and by
    the cap (an evicted key whose TAT had passed counts as expired: it lost nothing).
    """

    __slots__ = (
        "_batch",
        "_rate",
        "_tats",
        "_tau",
        "evicted",
        "expired",
        "limit",
        "max_keys",
        "name",
        "policy_line",
    )

    def __init__(self, limit: RateLimit, *, max_keys: int = 100_000, name: str) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys must be an integer >= 1, got {max_keys!r}")
        self.name = name
        self.max_keys = max_keys
        self._batch = min(MAX_EVICT_BATCH, max(1, max_keys // 100))
        # key -> TAT, in emission intervals (now * rate), least recently used first.
        self._tats: dict[Key, float] = {}
        self.expired = 0
        self.evicted = 0
        self._set_limit(limit)

    def _set_limit(self, limit: RateLimit) -> None:
        self.limit = limit
        self._rate = limit.rate
        self._tau = limit.burst - 1 + EARLY
        self.policy_line = policy_header(self.name, limit)

    @property
    def size(self) -> int:
        """How many keys have state (a gauge for metrics)."""
        return len(self._tats)

    def __repr__(self) -> str:
        return f"<Limiter {self.name!r} {self.limit} keys={len(self._tats)}/{self.max_keys}>"

    def check(self, key: Key, now: float) -> float:
        """0.0 if a request for ``key`` at ``now`` is allowed (and counts it), else the
        seconds until one would be (nothing is counted: refused requests cost no quota).

        The allowed path is a dict pop, a comparison or two and a dict store; re-inserting
        the key moves it to the end, so the dict's order is least recently used first.
        A refused hit also re-inserts its key, with its TAT unchanged: a client hammering
        away while refused stays recent, so the cap evicts idle keys first and does not hand
        it a fresh burst.
        """
        tats = self._tats
        u = now * self._rate
        tat = tats.pop(key, None)
        if tat is None:
            if len(tats) >= self.max_keys:
                self._evict(u)
            tats[key] = u + 1.0
            return 0.0
        if tat - u > self._tau:
            tats[key] = tat
            return (tat - u - self._tau + EARLY) / self._rate
        tats[key] = (tat if tat > u else u) + 1.0
        return 0.0

    def remaining(self, key: Key, now: float) -> int:
        """How many requests for ``key`` would be allowed at ``now``, back to back."""
        tat = self._tats.get(key)
        burst = self.limit.burst
        if tat is None:
            return burst
        ahead = tat - now * self._rate
        if ahead <= 0.0:
            return burst
        return max(0, math.floor(burst - ahead + EARLY))

    def reset(self, key: Key, now: float) -> float:
        """Seconds until ``key`` has its whole burst back (0.0 if it has now)."""
        tat = self._tats.get(key)
        if tat is None:
            return 0.0
        return max(0.0, (tat - now * self._rate) / self._rate)

    def deny_headers(self, key: Key, now: float, retry_after: float) -> bytes:
        """The header lines of a 429 for ``key`` refused at ``now`` with ``retry_after``
        (what :meth:`check` returned): ``Retry-After``, ``RateLimit-Policy``, ``RateLimit``."""
        return b"".join(
            (
                retry_after_header(retry_after),
                self.policy_line,
                ratelimit_header(self.name, self.remaining(key, now), self.reset(key, now)),
            )
        )

    def sweep(self, now: float, budget: int) -> int:
        """Drop the expired keys among the ``budget`` least recently used ones; how many.

        Called from a periodic tick: the cost is bounded by ``budget``, whatever the size.
        Keys near the front are the least recently used, so they are the most likely to
        have expired; a live key there is stepped over (and looked at again next time).
        """
        tats = self._tats
        u = now * self._rate
        dead = [key for key, tat in islice(tats.items(), budget) if tat <= u]
        for key in dead:
            del tats[key]
        self.expired += len(dead)
        return len(dead)

    def _evict(self, u: float) -> None:
        """Make room for a new key: drop the least recently used batch of keys."""
        tats = self._tats
        expired = 0
        for key in list(islice(tats, self._batch)):
            if tats.pop(key) <= u:
                expired += 1
            else:
                self.evicted += 1
        self.expired += expired

    def replace_limit(self, limit: RateLimit) -> None:
        """Apply a new policy (a configuration reload) keeping every key's state: a key
        keeps its TAT in seconds, so a client owes the same wait as before the change."""
        if limit == self.limit:
            return
        scale = limit.rate / self._rate
        self._tats = {key: tat * scale for key, tat in self._tats.items()}
        self._set_limit(limit)

    def clear(self) -> None:
        self._tats.clear()


class LogThrottle:
    """At most one log line per ``interval`` seconds, counting the lines held back.

    ``allow(now)`` is ``None`` while the line is to be suppressed, else the number of lines
    suppressed since the last one let through (0 included: test with ``is not None``).
    """

    __slots__ = ("_next", "_suppressed", "interval")

    def __init__(self, interval: float = 1.0) -> None:
        if not (math.isfinite(interval) and interval >= 0):
            raise ValueError(f"interval must be a non-negative number of seconds: {interval!r}")
        self.interval = interval
        self._next = -math.inf
        self._suppressed = 0

    def allow(self, now: float) -> int | None:
        if now < self._next:
            self._suppressed += 1
            return None
        self._next = now + self.interval
        suppressed = self._suppressed
        self._suppressed = 0
        return suppressed
