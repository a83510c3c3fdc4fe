"""Smoke test of the rate limiter micro-benchmark (bench/ratelimit.py): it runs for real but
small, and must give sane figures."""

from __future__ import annotations

import io

from bench import ratelimit


def test_ratelimit_bench_smoke() -> None:
    result = ratelimit.run(hot_checks=5_000, keys=20_000, max_keys=5_000)

    assert (result.hot_checks, result.keys, result.max_keys) == (5_000, 20_000, 5_000)
    assert result.empty_call_ns > 0
    # Even a slow CI machine does 100,000 checks a second.
    for per_s in (
        result.hot_allowed_per_s,
        result.hot_refused_per_s,
        result.distinct_capped_per_s,
        result.distinct_uncapped_per_s,
    ):
        assert 1e5 < per_s < 1e9
    assert result.evicted >= 20_000 - 5_000 - 50  # the cap held; the last batch may be short
    # A dict slot and a float at least; well under the unit test's bound of 200 with the key.
    assert 24 < result.bytes_per_key < result.bytes_per_key_with_key < 200
    assert 0 < result.sweep_ns_per_key < 100_000

    report = ratelimit.format_result(result)
    assert "hot key, allowed" in report and "M checks/s" in report
    assert "bytes with its key string" in report


def test_ratelimit_bench_main_and_arguments() -> None:
    args = ratelimit.parse_args(["--keys", "10", "--hot-checks", "7", "--max-keys", "3"])
    assert (args.keys, args.hot_checks, args.max_keys) == (10, 7, 3)
    assert ratelimit.parse_args([]).max_keys is None
    assert ratelimit.client_address(0) == "10.0.0.0"
    assert ratelimit.client_address(65_793) == "10.1.1.1"
    assert ratelimit.client_address(1 << 24) == "fd00::1000000"
    assert len(set(ratelimit.make_keys(1000))) == 1000

    out = io.StringIO()
    ratelimit.main(["--keys", "2000", "--hot-checks", "1000", "--max-keys", "500"], out=out)
    assert "2,000 distinct keys, cap 500" in out.getvalue()
