"""Cost of the edge's rate limiter (edge/ratelimit.py): time per check and memory per key.

What it measures, in this process, with fake time passed in as the proxy passes
``loop.time()``:

- checks per second for one hot key, allowed (the common path) and refused (a client
  flooding past its limit);
- checks per second for N distinct keys (default 1,000,000, each seen once: a flood of
  distinct addresses), with the default cap of 100,000 keys (so evicting) and with a cap
  of N (so holding them all);
- memory per key with N keys held, by tracemalloc: the limiter's own (dict slot and TAT
  float) and including the key strings, which the limiter keeps alive;
- one sweep of expired keys, per key looked at.

Each figure includes the Python loop and call that drive it; the empty-call figure printed
alongside is that overhead alone. The budget per proxied request is about 10 us.

Run from the repository root: ``.venv/bin/python -m bench.ratelimit [--keys N]``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

from edge.ratelimit import Key, Limiter, RateLimit

NOW = 1_000_000.0  # a clock some days after boot, like loop.time() on a long-running edge
SWEEP_BUDGET = 10_000


@dataclass(frozen=True, slots=True)
class Result:
    hot_checks: int
    keys: int
    max_keys: int  # the cap of the evicting run
    empty_call_ns: float
    hot_allowed_per_s: float
    hot_refused_per_s: float
    distinct_capped_per_s: float
    distinct_uncapped_per_s: float
    evicted: int
    bytes_per_key: float  # the limiter's own: dict slot and TAT
    bytes_per_key_with_key: float  # plus the key strings it keeps alive
    sweep_ns_per_key: float


def client_address(i: int) -> str:
    """The ``i``-th distinct client address, as the proxy would key it."""
    if i < 1 << 24:
        return f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"
    return f"fd00::{i:x}"


def make_keys(count: int) -> list[Key]:
    return [client_address(i) for i in range(count)]


def _time_calls(check: Callable[[Key, float], float], key: Key, count: int) -> float:
    """Best seconds per call of ``check(key, NOW)`` over three runs of ``count``."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(count):
            check(key, NOW)
        best = min(best, (time.perf_counter() - started) / count)
    return best


def _time_distinct(limiter: Limiter, keys: Sequence[Key]) -> float:
    check = limiter.check
    gc.collect()
    started = time.perf_counter()
    for key in keys:
        check(key, NOW)
    return (time.perf_counter() - started) / len(keys)


def _memory_per_key(keys: Sequence[Key]) -> tuple[float, float]:
    """Bytes per key held by a limiter holding all ``keys``: its own, then with new copies
    of the key strings (made inside the measured window, as requests would make them)."""
    gc.collect()
    tracemalloc.start()
    try:
        limiter = Limiter(RateLimit(1.0, 10), max_keys=len(keys), name="bench")
        check = limiter.check
        for key in keys:
            check(key, NOW)
        own, _ = tracemalloc.get_traced_memory()
        del limiter, check
        gc.collect()
        tracemalloc.clear_traces()
        limiter = Limiter(RateLimit(1.0, 10), max_keys=len(keys), name="bench")
        check = limiter.check
        for i in range(len(keys)):
            check(client_address(i), NOW)  # built here, so the strings are traced
        with_keys, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return own / len(keys), with_keys / len(keys)


def _sweep_ns_per_key(keys: Sequence[Key]) -> float:
    limiter = Limiter(RateLimit(1.0, 1), max_keys=len(keys), name="bench")
    check = limiter.check
    for key in keys:
        check(key, NOW)
    later = NOW + 2.0  # every key has expired
    started = time.perf_counter()
    while limiter.sweep(later, SWEEP_BUDGET):
        pass
    elapsed = time.perf_counter() - started
    assert limiter.size == 0
    return elapsed / len(keys) * 1e9


def run(hot_checks: int = 2_000_000, keys: int = 1_000_000, max_keys: int | None = None) -> Result:
    """Measure; ``max_keys`` (default: the limiter's default) caps the evicting run."""
    if max_keys is None:
        max_keys = Limiter(RateLimit(1.0, 1), name="bench").max_keys
    empty = _time_calls(lambda key, now: 0.0, "10.0.0.1", hot_checks)
    # A limit no request reaches: every check takes the allowed path.
    allowing = Limiter(RateLimit(1e12, 1_000_000_000), name="bench")
    hot_allowed = _time_calls(allowing.check, "10.0.0.1", hot_checks)
    refusing = Limiter(RateLimit(1.0, 1), name="bench")
    hot_refused = _time_calls(refusing.check, "10.0.0.1", hot_checks)

    distinct = make_keys(keys)
    capped = Limiter(RateLimit(1.0, 10), max_keys=max_keys, name="bench")
    capped_s = _time_distinct(capped, distinct)
    uncapped = Limiter(RateLimit(1.0, 10), max_keys=keys, name="bench")
    uncapped_s = _time_distinct(uncapped, distinct)
    evicted = capped.evicted
    del capped, uncapped
    own, with_key = _memory_per_key(distinct)
    sweep = _sweep_ns_per_key(distinct)
    return Result(
        hot_checks=hot_checks,
        keys=keys,
        max_keys=max_keys,
        empty_call_ns=empty * 1e9,
        hot_allowed_per_s=1 / hot_allowed,
        hot_refused_per_s=1 / hot_refused,
        distinct_capped_per_s=1 / capped_s,
        distinct_uncapped_per_s=1 / uncapped_s,
        evicted=evicted,
        bytes_per_key=own,
        bytes_per_key_with_key=with_key,
        sweep_ns_per_key=sweep,
    )


def _rate(per_s: float) -> str:
    return f"{per_s / 1e6:.2f} M checks/s ({1e9 / per_s:.0f} ns each)"


def format_result(result: Result) -> str:
    return "\n".join(
        (
            f"python {sys.version.split()[0]}; loop + empty call: {result.empty_call_ns:.0f} ns",
            f"hot key, allowed: {_rate(result.hot_allowed_per_s)}",
            f"hot key, refused: {_rate(result.hot_refused_per_s)}",
            f"{result.keys:,} distinct keys, cap {result.max_keys:,}: "
            f"{_rate(result.distinct_capped_per_s)}, {result.evicted:,} evicted",
            f"{result.keys:,} distinct keys, cap {result.keys:,}: "
            f"{_rate(result.distinct_uncapped_per_s)}",
            f"memory per key ({result.keys:,} held): {result.bytes_per_key:.0f} bytes "
            f"(dict slot + TAT), {result.bytes_per_key_with_key:.0f} bytes with its key string",
            f"sweep of expired keys: {result.sweep_ns_per_key:.0f} ns per key "
            f"(budget {SWEEP_BUDGET:,} per call)",
        )
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="distinct keys")
    parser.add_argument("--hot-checks", type=int, default=2_000_000, help="checks of a hot key")
    parser.add_argument(
        "--max-keys", type=int, default=None, help="cap of the evicting run (default: 100,000)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> None:
    args = parse_args(argv)
    print(format_result(run(args.hot_checks, args.keys, args.max_keys)), file=out)


if __name__ == "__main__":
    main()
