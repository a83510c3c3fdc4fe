"""The rate limiter (edge/ratelimit.py): GCRA decisions, bounded memory, headers, log throttle.

Plain synchronous tests: time is passed in as ``now``, as the proxy passes ``loop.time()``.
"""

from __future__ import annotations

import gc
import math
import sys
import time
import tracemalloc

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge.ratelimit import (
    EARLY,
    Limiter,
    LogThrottle,
    RateLimit,
    policy_header,
    ratelimit_header,
    retry_after_header,
)

# Clocks as loop.time() may read: just booted, days and years of uptime.
CLOCKS = (0.0, 1_000.25, 1_000_000.0, 100_000_000.0)


def client(i: int) -> str:
    return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"


# -- the policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "burst"),
    [
        (0, 1),
        (-1, 1),
        (math.nan, 1),
        (math.inf, 1),
        (True, 1),
        ("10", 1),
        (1, 0),
        (1, -3),
        (1, 1.5),
        (1, True),
    ],
)
def test_rate_limit_rejects_invalid_policies(rate: object, burst: object) -> None:
    with pytest.raises(ValueError, match=r"rate|burst"):
        RateLimit(rate, burst)  # type: ignore[arg-type]


def test_rate_limit_is_a_frozen_value() -> None:
    limit = RateLimit(10, 20)
    assert limit.rate == 10.0 and isinstance(limit.rate, float)
    assert limit.interval == 0.1
    assert limit == RateLimit(10.0, 20)
    assert str(limit) == "10/s burst 20"
    assert str(RateLimit(0.5, 1)) == "0.5/s burst 1"
    with pytest.raises(AttributeError):
        limit.rate = 5  # type: ignore[misc]


def test_limiter_rejects_an_invalid_cap_and_name() -> None:
    for max_keys in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_keys"):
            Limiter(RateLimit(1, 1), max_keys=max_keys, name="client")  # type: ignore[arg-type]
    for name in ("", "clïent", "new\nline"):
        with pytest.raises(ValueError, match="printable ASCII"):
            Limiter(RateLimit(1, 1), name=name)


# -- decisions -------------------------------------------------------------------------


@pytest.mark.parametrize("start", CLOCKS)
def test_the_burst_passes_at_once_then_the_next_waits_one_interval(start: float) -> None:
    limiter = Limiter(RateLimit(10, 5), name="client")

    assert [limiter.check("a", start) for _ in range(5)] == [0.0] * 5
    retry = limiter.check("a", start)

    assert retry == pytest.approx(0.1, rel=1e-6)
    # Refused requests cost nothing: asking again gives the same wait.
    assert limiter.check("a", start) == retry
    assert limiter.check("a", start + retry - 0.01) > 0.0
    assert limiter.check("a", start + retry) == 0.0
    assert limiter.check("a", start + retry) > 0.0


@pytest.mark.parametrize("start", CLOCKS)
@pytest.mark.parametrize("rate", [0.1, 1, 3, 7, 10, 33.3, 1000, 12_345.6])
@pytest.mark.parametrize("burst", [1, 2, 10, 999])
def test_the_burst_boundary_is_exact(start: float, rate: float, burst: int) -> None:
    """Exactly ``burst`` at one instant, whatever the rate (1/rate need not be exact in
    binary) and however large the clock: never one fewer, never one more."""
    limiter = Limiter(RateLimit(rate, burst), name="client")

    for used in range(burst):
        assert limiter.remaining("k", start) == burst - used
        assert limiter.check("k", start) == 0.0
    assert limiter.remaining("k", start) == 0
    retry = limiter.check("k", start)
    assert retry == pytest.approx(1 / rate, rel=1e-6)
    assert limiter.reset("k", start) == pytest.approx(burst / rate, rel=1e-6)


@pytest.mark.parametrize("start", CLOCKS)
def test_the_sustained_rate_passes_and_no_more(start: float) -> None:
    limiter = Limiter(RateLimit(10, 1), name="client")

    # Exactly at the rate: every request passes, for 100 seconds.
    assert all(limiter.check("steady", start + i / 10) == 0.0 for i in range(1000))

    # 25% faster than the rate: over 100 seconds, 1000 pass (the rate) plus the burst.
    fast = Limiter(RateLimit(10, 4), name="client")
    allowed = sum(fast.check("fast", start + i * 0.08) == 0.0 for i in range(1250))
    assert allowed == 4 + 1000 - 1  # the burst, then one per 0.1 s after the first 0.4 s


def test_retry_after_is_the_wait_for_the_next_request() -> None:
    limiter = Limiter(RateLimit(2, 3), name="client")
    now = 500.0
    for _ in range(3):
        assert limiter.check("a", now) == 0.0
    now += 0.2  # 0.4 of an interval refilled
    assert limiter.check("a", now) == pytest.approx(0.3)
    now += 0.3
    assert limiter.check("a", now) == 0.0
    assert limiter.check("a", now) == pytest.approx(0.5)


def test_keys_are_independent() -> None:
    limiter = Limiter(RateLimit(1, 2), name="client")
    assert limiter.check("a", 0.0) == limiter.check("a", 0.0) == 0.0
    assert limiter.check("a", 0.0) > 0.0

    assert limiter.check("b", 0.0) == 0.0
    assert limiter.check(b"a", 0.0) == 0.0  # bytes and str keys are distinct keys
    assert limiter.remaining("b", 0.0) == 1
    assert limiter.remaining("a", 0.0) == 0
    assert limiter.remaining("never-seen", 0.0) == 2
    assert limiter.size == 3


def test_remaining_and_reset_follow_the_refill() -> None:
    limiter = Limiter(RateLimit(4, 8), name="client")
    for _ in range(8):
        limiter.check("a", 10.0)
    assert limiter.reset("a", 10.0) == pytest.approx(2.0)
    assert limiter.remaining("a", 10.0) == 0
    assert limiter.remaining("a", 10.24) == 0
    assert limiter.remaining("a", 10.25) == 1
    assert limiter.remaining("a", 11.0) == 4
    assert limiter.reset("a", 11.0) == pytest.approx(1.0)
    assert limiter.remaining("a", 12.0) == 8
    assert limiter.reset("a", 12.0) == 0.0
    assert limiter.remaining("a", 99.0) == 8
    assert limiter.reset("a", 99.0) == 0.0
    assert limiter.reset("unknown", 10.0) == 0.0


def test_a_refused_request_does_not_change_the_state() -> None:
    limiter = Limiter(RateLimit(1, 1), name="client")
    limiter.check("a", 0.0)
    for i in range(100):
        assert limiter.check("a", i / 200) > 0.0
    assert limiter.check("a", 1.0) == 0.0


# -- properties ------------------------------------------------------------------------

policies = st.builds(
    RateLimit,
    rate=st.floats(0.05, 2000.0, allow_nan=False, allow_infinity=False),
    burst=st.integers(1, 30),
)
# Gaps between arrivals: many at one instant, short and long waits.
gaps = st.lists(
    st.one_of(st.just(0.0), st.floats(0.0, 2.0), st.floats(0.0, 0.01)), min_size=1, max_size=150
)


@settings(max_examples=300, deadline=None)
@given(limit=policies, start=st.sampled_from(CLOCKS), gaps=gaps)
@example(limit=RateLimit(10, 1), start=0.0, gaps=[0.0, 0.05, 0.05, 0.05])
def test_no_window_ever_passes_more_than_burst_plus_rate_times_its_length(
    limit: RateLimit, start: float, gaps: list[float]
) -> None:
    limiter = Limiter(limit, name="client")
    now = start
    allowed: list[float] = []
    for gap in gaps:
        now += gap
        if limiter.check("k", now) == 0.0:
            allowed.append(now)

    # The tightest window around allowed requests i..j is [allowed[i], allowed[j]].
    for i, first in enumerate(allowed):
        for j in range(i, len(allowed)):
            passed = j - i + 1
            bound = limit.burst + limit.rate * (allowed[j] - first)
            # EARLY: a request may pass 1/1000 of an interval early; as much again for float
            # rounding of the clock (1e8 s, to 15 ns) times the rate.
            assert passed <= bound + 2 * EARLY, (i, j, passed, bound)


@settings(max_examples=300, deadline=None)
@given(limit=policies, start=st.sampled_from(CLOCKS), gaps=gaps)
def test_a_client_that_waits_retry_after_gets_in(
    limit: RateLimit, start: float, gaps: list[float]
) -> None:
    limiter = Limiter(limit, name="client")
    now = start
    for gap in gaps:
        now += gap
        retry = limiter.check("k", now)
        if retry:
            assert retry > 0.0
            # Not a hundredth of an interval sooner...
            sooner = now + retry - limit.interval / 100
            assert limiter.check("k", sooner) > 0.0
            # ... but at retry-after, and that request counts.
            remaining = limiter.remaining("k", now + retry)
            assert remaining >= 1
            assert limiter.check("k", now + retry) == 0.0
            assert limiter.remaining("k", now + retry) == remaining - 1
            now += retry


@settings(max_examples=200, deadline=None)
@given(limit=policies, gaps=gaps)
def test_remaining_says_how_many_would_pass_now(limit: RateLimit, gaps: list[float]) -> None:
    times = [1_000.0 + sum(gaps[: i + 1]) for i in range(len(gaps))]
    limiter, probe = Limiter(limit, name="client"), Limiter(limit, name="probe")
    for now in times:
        limiter.check("k", now)
        probe.check("k", now)
    now = times[-1]
    remaining = limiter.remaining("k", now)

    passes = 0
    while passes <= limit.burst and probe.check("k", now) == 0.0:
        passes += 1
    assert passes == remaining


# -- bounded memory --------------------------------------------------------------------


def test_sweep_drops_expired_keys_within_its_budget() -> None:
    limiter = Limiter(RateLimit(1, 2), name="client")
    for i in range(10):
        limiter.check(client(i), 0.0)  # TAT 1 s: expired from t=1

    assert limiter.sweep(0.99, budget=100) == 0
    assert limiter.size == 10

    assert limiter.sweep(1.0, budget=4) == 4
    assert limiter.size == 6
    assert limiter.sweep(1.0, budget=4) == 4
    assert limiter.sweep(1.0, budget=4) == 2
    assert limiter.sweep(1.0, budget=4) == 0
    assert limiter.size == 0
    assert limiter.expired == 10 and limiter.evicted == 0


def test_sweep_keeps_live_keys_and_steps_over_them() -> None:
    limiter = Limiter(RateLimit(1, 10), name="client")
    for _ in range(10):
        limiter.check("busy", 0.0)  # TAT 10 s ahead
    for i in range(5):
        limiter.check(client(i), 0.0)  # TAT 1 s

    assert limiter.sweep(2.0, budget=3) == 2  # "busy" looked at, kept
    assert limiter.sweep(2.0, budget=10) == 3
    assert limiter.size == 1
    assert limiter.remaining("busy", 2.0) == 2  # its state is intact


def test_an_expired_key_is_like_a_new_one() -> None:
    limiter = Limiter(RateLimit(1, 3), name="client")
    for _ in range(3):
        limiter.check("a", 0.0)
    assert limiter.check("a", 0.0) > 0.0
    limiter.sweep(3.0, budget=10)
    assert limiter.size == 0
    fresh = Limiter(RateLimit(1, 3), name="client")
    assert [limiter.check("a", 3.0) for _ in range(4)] == [fresh.check("a", 3.0) for _ in range(4)]


def test_the_cap_evicts_the_least_recently_used_key() -> None:
    limiter = Limiter(RateLimit(0.001, 3), max_keys=5, name="client")
    for key in "abcde":
        limiter.check(key, 0.0)
    limiter.check("a", 1.0)  # allowed: a is now the most recent
    limiter.check("b", 1.0)
    limiter.check("b", 1.0)
    limiter.check("b", 1.0)  # refused: still makes b recent

    limiter.check("f", 2.0)  # over the cap: c goes
    assert limiter.size == 5
    assert limiter.evicted == 1
    assert limiter.remaining("c", 2.0) == 3  # forgotten
    assert limiter.remaining("a", 2.0) == 1
    assert limiter.remaining("b", 2.0) == 0

    limiter.check("g", 3.0)
    limiter.check("h", 3.0)
    assert limiter.evicted == 3
    assert limiter.remaining("d", 3.0) == limiter.remaining("e", 3.0) == 3
    assert limiter.remaining("a", 3.0) == 1
    assert limiter.remaining("b", 3.0) == 0


def test_the_cap_evicts_in_small_batches_oldest_first() -> None:
    limiter = Limiter(RateLimit(1, 1), max_keys=1000, name="client")
    for i in range(1000):
        limiter.check(client(i), 0.0)

    limiter.check("new", 0.5)

    # One percent of the cap goes at once, the oldest first; everyone else keeps state.
    assert limiter.size == 991
    assert limiter.evicted == 10 and limiter.expired == 0
    assert all(limiter.remaining(client(i), 0.5) == 1 for i in range(10))
    assert all(limiter.remaining(client(i), 0.5) == 0 for i in range(10, 1000))


def test_evicting_an_expired_key_counts_as_expiry() -> None:
    limiter = Limiter(RateLimit(1, 1), max_keys=2, name="client")
    limiter.check("old", 0.0)
    limiter.check("live", 5.0)
    limiter.check("new", 5.0)
    assert (limiter.expired, limiter.evicted) == (1, 0)
    limiter.check("newer", 5.0)
    assert (limiter.expired, limiter.evicted) == (1, 1)


def test_an_active_client_keeps_its_state_through_a_flood_of_distinct_keys() -> None:
    limiter = Limiter(RateLimit(1, 5), max_keys=1000, name="client")
    now = 0.0
    for _ in range(5):
        limiter.check("legit", now)
    # 50 times the cap in distinct addresses, while the legitimate client keeps coming
    # (refused: it has used its burst and time hardly moves).
    for i in range(50_000):
        limiter.check(client(i), now)
        if i % 500 == 0:
            assert limiter.check("legit", now) > 0.0
        now += 1e-6
    assert limiter.size <= 1000
    assert limiter.evicted >= 49_000
    assert limiter.remaining("legit", now) == 0


# The bound: memory per key of the cap, whatever the number of distinct keys that came,
# counting the dict, the TAT floats and the key strings the limiter keeps alive. Measured on
# CPython 3.11 (x86-64): about 55 bytes per key for a dict slot and its TAT plus 60 for an
# IPv4 address string; a dict whose keys churned holds more free slots (about 165 in all
# per key at the default cap). The peak adds a resize, old and new dict tables held at once.
BYTES_PER_KEY_BOUND = 200
PEAK_BYTES_PER_KEY_BOUND = 300


@pytest.fixture(scope="module")
def million_addresses() -> list[str]:
    return [client(i) for i in range(1_000_000)]


@pytest.mark.parametrize("max_keys", [100_000, 1_000_000])
def test_a_million_distinct_keys_stay_within_the_memory_bound(
    max_keys: int, million_addresses: list[str]
) -> None:
    limiter = Limiter(RateLimit(1, 10), max_keys=max_keys, name="client")
    check = limiter.check
    now = 1_000_000.0
    for _ in range(3):
        check("legit", now)
    gc.collect()
    started = time.perf_counter()
    tracemalloc.start()
    try:
        for start in range(0, len(million_addresses), 1000):
            check("legit", now)
            for address in million_addresses[start : start + 1000]:
                check(address, now)
            now += 1e-3
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started

    assert limiter.size <= max_keys
    assert limiter.size + limiter.evicted + limiter.expired == 1_000_001
    # The addresses were made before tracing began (as a flood's requests would make them
    # anyway); the ones the limiter keeps alive count too.
    keys = sum(sys.getsizeof(key) for key in limiter._tats)
    print(
        f"\ncap {max_keys:,}: {(held + keys) / limiter.size:.0f} bytes per key held "
        f"({held / limiter.size:.0f} without the key), peak {(peak + keys) / max_keys:.0f}, "
        f"{elapsed:.1f} s"
    )
    assert held + keys < BYTES_PER_KEY_BOUND * max_keys
    assert peak + keys < PEAK_BYTES_PER_KEY_BOUND * max_keys
    # The legitimate client came every thousand keys: it kept its state, its burst used up
    # in the flood's second (a key evicted and seen again would have its whole burst back).
    assert limiter.remaining("legit", now) == 0
    assert check("legit", now) > 0.0
    assert elapsed < 10  # under tracemalloc, which slows it several times


# -- headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "line"),
    [
        (RateLimit(100, 100), b'RateLimit-Policy: "client";q=100;w=1\r\n'),
        (RateLimit(10, 50), b'RateLimit-Policy: "client";q=50;w=5\r\n'),
        (RateLimit(100, 1), b'RateLimit-Policy: "client";q=100;w=1\r\n'),
        (RateLimit(0.5, 1), b'RateLimit-Policy: "client";q=1;w=2\r\n'),
        (RateLimit(3, 5), b'RateLimit-Policy: "client";q=6;w=2\r\n'),
        (RateLimit(1 / 3, 1), b'RateLimit-Policy: "client";q=1;w=3\r\n'),
    ],
)
def test_policy_header(limit: RateLimit, line: bytes) -> None:
    assert policy_header("client", limit) == line
    assert Limiter(limit, name="client").policy_line == line


def test_header_names_are_structured_field_strings() -> None:
    assert policy_header('a"b\\c', RateLimit(1, 1)) == (
        b'RateLimit-Policy: "a\\"b\\\\c";q=1;w=1\r\n'
    )
    with pytest.raises(ValueError, match="printable ASCII"):
        policy_header("", RateLimit(1, 1))


def test_ratelimit_and_retry_after_headers() -> None:
    assert ratelimit_header("client", 0, 2.5) == b'RateLimit: "client";r=0;t=3\r\n'
    assert ratelimit_header("project", 42, 0.0) == b'RateLimit: "project";r=42;t=0\r\n'
    assert ratelimit_header("client", -1, -1.0) == b'RateLimit: "client";r=0;t=0\r\n'
    assert retry_after_header(0.001) == b"Retry-After: 1\r\n"
    assert retry_after_header(1.0) == b"Retry-After: 1\r\n"
    assert retry_after_header(1.2) == b"Retry-After: 2\r\n"
    assert retry_after_header(0.0) == b"Retry-After: 1\r\n"


def test_deny_headers_for_a_429() -> None:
    limiter = Limiter(RateLimit(1, 3), name="client")
    for _ in range(3):
        limiter.check("1.2.3.4", 100.0)
    retry = limiter.check("1.2.3.4", 100.5)

    assert retry == pytest.approx(0.5)
    assert limiter.deny_headers("1.2.3.4", 100.5, retry) == (
        b"Retry-After: 1\r\n"
        b'RateLimit-Policy: "client";q=3;w=3\r\n'
        b'RateLimit: "client";r=0;t=3\r\n'  # 2.5 s until the whole burst is back
    )


# -- policy changes --------------------------------------------------------------------


def test_replace_limit_keeps_the_wait_each_key_owes() -> None:
    limiter = Limiter(RateLimit(1, 2), name="project")
    limiter.check("p", 0.0)
    limiter.check("p", 0.0)
    assert limiter.check("p", 0.0) == pytest.approx(1.0)

    limiter.replace_limit(RateLimit(4, 2))

    assert limiter.limit == RateLimit(4, 2)
    assert limiter.policy_line == b'RateLimit-Policy: "project";q=4;w=1\r\n'
    assert limiter.reset("p", 0.0) == pytest.approx(2.0)  # still owed, in seconds
    assert limiter.check("p", 1.5) > 0.0
    assert limiter.check("p", 1.5 + 0.25) == 0.0
    limiter.replace_limit(RateLimit(4, 2))  # the same policy: nothing to do
    assert limiter.size == 1


# -- the log throttle ------------------------------------------------------------------


def test_log_throttle_lets_one_line_per_interval_through() -> None:
    throttle = LogThrottle(1.0)
    assert throttle.allow(10.0) == 0
    assert [throttle.allow(10.0 + i / 100) for i in range(1, 100)] == [None] * 99
    assert throttle.allow(11.0) == 99
    assert throttle.allow(11.5) is None
    assert throttle.allow(30.0) == 1
    assert throttle.allow(30.0) is None


def test_log_throttle_with_no_interval_lets_everything_through() -> None:
    throttle = LogThrottle(0.0)
    assert [throttle.allow(1.0) for _ in range(3)] == [0, 0, 0]


def test_log_throttle_rejects_a_bad_interval() -> None:
    for interval in (-1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="interval"):
            LogThrottle(interval)
