"""Compile time and memory of the edge's routing table at platform scale.

What it measures: how long one proxy worker takes to install a routing table of N hosts
(default 100,000, each served by 2 instances drawn from a fleet of N/20 instance addresses,
each instance in one of 3 regions) and how much memory the compiled table holds (the
worker's routes dict, Route objects and connection pools; measured with tracemalloc, and as
the process's RSS growth). The goal for 100,000 hosts: under 1 s and under 300 MB.

Run from the repository root: ``.venv/bin/python -m bench.routing_table [--hosts N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import tracemalloc
from pathlib import Path

from edge.config import EdgeConfig
from edge.proxy.worker import ProxyWorker
from edge.routing import Address, FileRouteProvider, RoutingTable

REGIONS = ("eu-west", "us-east", "ap-south")


def make_table(hosts: int) -> RoutingTable:
    fleet = [
        Address(f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}", 3000 + i % 1000)
        for i in range(max(2, hosts // 20))
    ]
    regions = {address: REGIONS[i % len(REGIONS)] for i, address in enumerate(fleet)}
    routes = {
        f"app{i}-{i:07x}-org{i % 997}.zeitwork.app": (
            fleet[i % len(fleet)],
            fleet[(i * 7 + 1) % len(fleet)],
        )
        for i in range(hosts)
    }
    return RoutingTable(routes, source="bench", regions=regions)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def measure(hosts: int, repeats: int) -> None:
    config = EdgeConfig(routes_path=Path("/dev/null"), workers=1, region="eu-west")
    worker = ProxyWorker(config, FileRouteProvider(Path("/dev/null")))
    table = make_table(hosts)
    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start()
    started = time.perf_counter()
    worker.install(table)
    first = time.perf_counter() - started
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth = rss_bytes() - rss_before
    # Re-installs swap a new table in while the old one is live (the reload path).
    times = []
    for _ in range(repeats):
        fresh = make_table(hosts)
        started = time.perf_counter()
        worker.install(fresh)
        times.append(time.perf_counter() - started)
    print(f"hosts: {hosts:,} ({len(worker.pools):,} instance pools)")
    print(f"first install: {first * 1000:.0f} ms (under tracemalloc, which slows it)")
    print(f"install (table swap): best {min(times) * 1000:.0f} ms of {repeats}")
    print(
        f"compiled table memory: {held / 2**20:.1f} MiB traced, "
        f"RSS growth {rss_growth / 2**20:.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(measure(args.hosts, args.repeats))


if __name__ == "__main__":
    main()
