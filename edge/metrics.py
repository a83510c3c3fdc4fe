"""The proxy's metrics: counted in each worker on the hot path, published by the master.

A worker counts in plain Python lists (an increment is a list store, a histogram observation
a scan of the buckets): no prometheus-client object, no lock, no allocation per request.
About once a second its ticker copies the counts into a block of shared memory (a
``multiprocessing`` array of doubles that the master created for that worker), and the master's
:class:`ProxyCollector` sums the blocks of all workers at each scrape of the admin port's
``/metrics``, so one scrape covers every worker process. A worker that dies and is started
again leaves its last counts to the master (``retire``), so counters never go backwards.

Limits: what a worker counted in the second before it died is lost; a scrape may see one
worker's histogram a tick apart from its request counter.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableSequence, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# Upper bounds (seconds) of the latency histograms' buckets; the last bucket is +Inf.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# What went wrong with an instance (label ``kind`` of zeitwork_upstream_errors_total).
UPSTREAM_ERRORS = ("connect", "connect_timeout", "reset", "timeout", "protocol")
CONNECT, CONNECT_TIMEOUT, RESET, TIMEOUT, PROTOCOL = range(len(UPSTREAM_ERRORS))
# Who a request was refused for (label ``scope`` of zeitwork_rate_limited_total).
RATE_LIMIT_SCOPES = ("client", "project")
STATUSES = 600
# Why a TLS handshake failed (label ``reason`` of zeitwork_tls_handshake_failures_total):
# it ran out of time, broke the protocol (an old version, no shared cipher, plain HTTP ...),
# named a host the edge has no certificate for (and there is no default), or the client left.
TLS_FAILURES = ("timeout", "protocol", "no_certificate", "closed", "other")
TLS_TIMEOUT, TLS_PROTOCOL, TLS_NO_CERTIFICATE, TLS_CLOSED, TLS_OTHER = range(len(TLS_FAILURES))

# The shared block: [statuses][request buckets][request sum][upstream buckets][upstream sum]
# [upstream errors][retries][rate limited][TLS handshakes][TLS failures][open connections]
# [routing table hosts]
_NB = len(LATENCY_BUCKETS) + 1
_REQ = STATUSES
_REQ_SUM = _REQ + _NB
_UP = _REQ_SUM + 1
_UP_SUM = _UP + _NB
_ERR = _UP_SUM + 1
_RETRIES = _ERR + len(UPSTREAM_ERRORS)
_LIMITED = _RETRIES + 1
_TLS = _LIMITED + len(RATE_LIMIT_SCOPES)
_TLS_FAILED = _TLS + 1
_OPEN = _TLS_FAILED + len(TLS_FAILURES)
_HOSTS = _OPEN + 1
SIZE = _HOSTS + 1
# Gauges are not carried over from a dead worker.
_GAUGES = (_OPEN, _HOSTS)


def bucket(seconds: float) -> int:
    """The latency bucket of ``seconds``: the first whose bound is not below it (the last is
    +Inf). A scan from the smallest: most requests end in the first few buckets, and compiled
    it compares C doubles, where a bisection compares Python floats."""
    i = 0
    for bound in LATENCY_BUCKETS:
        if seconds <= bound:
            return i
        i += 1
    return i


class ProxyMetrics:
    """One worker's counts."""

    __slots__ = (
        "errors",
        "limited",
        "request_buckets",
        "request_sum",
        "retries",
        "statuses",
        "tls_failures",
        "tls_handshakes",
        "upstream_buckets",
        "upstream_sum",
    )

    def __init__(self) -> None:
        self.statuses = [0] * STATUSES
        self.request_buckets = [0] * _NB
        self.request_sum = 0.0
        self.upstream_buckets = [0] * _NB
        self.upstream_sum = 0.0
        self.errors = [0] * len(UPSTREAM_ERRORS)
        self.retries = 0
        self.limited = [0] * len(RATE_LIMIT_SCOPES)
        self.tls_handshakes = 0
        self.tls_failures = [0] * len(TLS_FAILURES)

    def request_done(self, status: int, seconds: float) -> None:
        """A response was sent with ``status``, ``seconds`` after the request began."""
        self.statuses[status] += 1
        self.request_buckets[bucket(seconds)] += 1
        self.request_sum += seconds

    def upstream_answered(self, seconds: float) -> None:
        """An instance's response head arrived ``seconds`` after the request went to it."""
        self.upstream_buckets[bucket(seconds)] += 1
        self.upstream_sum += seconds

    def upstream_error(self, kind: int) -> None:
        self.errors[kind] += 1

    def publish(self, block: MutableSequence[float], open_connections: int, hosts: int) -> None:
        """Copy the counts into the worker's shared block."""
        block[:_REQ] = self.statuses
        block[_REQ:_REQ_SUM] = self.request_buckets
        block[_REQ_SUM] = self.request_sum
        block[_UP:_UP_SUM] = self.upstream_buckets
        block[_UP_SUM] = self.upstream_sum
        block[_ERR:_RETRIES] = self.errors
        block[_RETRIES] = self.retries
        block[_LIMITED:_TLS] = self.limited
        block[_TLS] = self.tls_handshakes
        block[_TLS_FAILED:_OPEN] = self.tls_failures
        block[_OPEN] = open_connections
        block[_HOSTS] = hosts


def retire(block: MutableSequence[float], retired: list[float]) -> None:
    """Move a dead worker's counters into ``retired`` and zero its block for its successor."""
    for i in range(SIZE):
        if i not in _GAUGES:
            retired[i] += block[i]
        block[i] = 0.0


class ProxyCollector:
    """A prometheus-client collector summing the workers' blocks at scrape time."""

    def __init__(self, blocks: Sequence[MutableSequence[float]], retired: Sequence[float]) -> None:
        self.blocks = blocks
        self.retired = retired

    def _sums(self) -> tuple[list[float], float]:
        total = list(self.retired)
        hosts = 0.0
        for block in self.blocks:
            values = block[:]
            for i, value in enumerate(values):
                if value:
                    total[i] += value
            hosts = max(hosts, values[_HOSTS])
        return total, hosts

    def collect(self) -> Iterator[Any]:
        total, hosts = self._sums()
        requests = CounterMetricFamily(
            "http_requests_total", "Responses sent to clients, by status.", labels=["status"]
        )
        for status in range(100, STATUSES):
            if total[status]:
                requests.add_metric([str(status)], total[status])
        yield requests
        yield _histogram(
            "http_request_duration_seconds",
            "Time from a request's first byte to its response's end.",
            total[_REQ:_REQ_SUM],
            total[_REQ_SUM],
        )
        yield _histogram(
            "zeitwork_upstream_duration_seconds",
            "Time from sending a request to an instance to its response head.",
            total[_UP:_UP_SUM],
            total[_UP_SUM],
        )
        errors = CounterMetricFamily(
            "zeitwork_upstream_errors_total", "Failures of instances, by kind.", labels=["kind"]
        )
        for i, kind in enumerate(UPSTREAM_ERRORS):
            errors.add_metric([kind], total[_ERR + i])
        yield errors
        yield CounterMetricFamily(
            "zeitwork_upstream_retries_total",
            "Requests sent again to another instance.",
            value=total[_RETRIES],
        )
        limited = CounterMetricFamily(
            "zeitwork_rate_limited_total", "Requests refused with 429, by scope.", labels=["scope"]
        )
        for i, scope in enumerate(RATE_LIMIT_SCOPES):
            limited.add_metric([scope], total[_LIMITED + i])
        yield limited
        yield CounterMetricFamily(
            "zeitwork_tls_handshakes_total", "TLS handshakes completed.", value=total[_TLS]
        )
        failures = CounterMetricFamily(
            "zeitwork_tls_handshake_failures_total",
            "TLS handshakes that failed, by reason.",
            labels=["reason"],
        )
        for i, reason in enumerate(TLS_FAILURES):
            failures.add_metric([reason], total[_TLS_FAILED + i])
        yield failures
        yield GaugeMetricFamily(
            "zeitwork_open_connections", "Open client connections.", value=total[_OPEN]
        )
        yield GaugeMetricFamily(
            "zeitwork_routing_table_hosts", "Hosts in the routing table.", value=hosts
        )


def _histogram(name: str, doc: str, buckets: Sequence[float], total: float) -> Any:
    cumulative = []
    running = 0.0
    for bound, count in zip((*LATENCY_BUCKETS, float("inf")), buckets, strict=True):
        running += count
        cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=total)
