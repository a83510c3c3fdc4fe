"""The proxy's counts: published into shared blocks and summed by the master's collector."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge import metrics
from edge.metrics import ProxyCollector, ProxyMetrics


def scrape(collector: ProxyCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counts_of_all_workers_are_summed() -> None:
    blocks = [[0.0] * metrics.SIZE, [0.0] * metrics.SIZE]
    retired = [0.0] * metrics.SIZE
    first, second = ProxyMetrics(), ProxyMetrics()
    first.request_done(200, 0.0007)
    first.request_done(200, 0.003)
    second.request_done(200, 0.02)
    second.request_done(502, 7.0)
    first.upstream_answered(0.002)
    second.upstream_error(metrics.CONNECT)
    second.retries += 1
    first.limited[0] += 3
    first.publish(blocks[0], open_connections=4, hosts=10)
    second.publish(blocks[1], open_connections=1, hosts=12)
    got = scrape(ProxyCollector(blocks, retired))
    assert got[("http_requests_total", (("status", "200"),))] == 3
    assert got[("http_requests_total", (("status", "502"),))] == 1
    assert ("http_requests_total", (("status", "404"),)) not in got
    # Cumulative buckets: 0.0007 <= 0.001, 0.003 <= 0.005, 0.02 <= 0.025, 7.0 <= 10.
    bucket = "http_request_duration_seconds_bucket"
    assert got[(bucket, (("le", "0.0005"),))] == 0
    assert got[(bucket, (("le", "0.001"),))] == 1
    assert got[(bucket, (("le", "0.005"),))] == 2
    assert got[(bucket, (("le", "0.025"),))] == 3
    assert got[(bucket, (("le", "5.0"),))] == 3
    assert got[(bucket, (("le", "+Inf"),))] == 4
    assert got[("http_request_duration_seconds_count", ())] == 4
    assert abs(got[("http_request_duration_seconds_sum", ())] - 7.0237) < 1e-9
    assert got[("zeitwork_upstream_duration_seconds_count", ())] == 1
    assert got[("zeitwork_upstream_errors_total", (("kind", "connect"),))] == 1
    assert got[("zeitwork_upstream_errors_total", (("kind", "timeout"),))] == 0
    assert got[("zeitwork_upstream_retries_total", ())] == 1
    assert got[("zeitwork_rate_limited_total", (("scope", "client"),))] == 3
    assert got[("zeitwork_open_connections", ())] == 5
    # Every worker holds the same table: the largest, not the sum.
    assert got[("zeitwork_routing_table_hosts", ())] == 12


def test_a_dead_workers_counts_stay_and_its_gauges_go() -> None:
    block = [0.0] * metrics.SIZE
    retired = [0.0] * metrics.SIZE
    collector = ProxyCollector([block], retired)
    old = ProxyMetrics()
    for _ in range(5):
        old.request_done(200, 0.001)
    old.publish(block, open_connections=7, hosts=3)
    metrics.retire(block, retired)
    assert block == [0.0] * metrics.SIZE
    successor = ProxyMetrics()
    successor.request_done(200, 0.001)
    successor.publish(block, open_connections=1, hosts=3)
    got = scrape(collector)
    # The counter goes on from 5, it never goes back to 1.
    assert got[("http_requests_total", (("status", "200"),))] == 6
    assert got[("http_request_duration_seconds_count", ())] == 6
    assert got[("zeitwork_open_connections", ())] == 1
