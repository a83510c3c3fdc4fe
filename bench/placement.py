"""Speed of the scheduler's placement (scheduler/placement.py): instances placed per second.

It builds a seeded fleet (default 1,000 nodes in 10 regions, 8 to 32 vCPU at 4 GiB per vCPU,
up to 30% already used, 3% not ready) and places 10,000 instances two ways:

- ``many``: deployments one after another, each ``instances / (deployments x regions)`` per
  region (sizes from 0.25 vCPU / 256 MiB to 2 vCPU / 2 GiB); after each, the fleet is updated
  with :func:`apply_placement`, as the scheduler would see it next time, and the time includes
  those updates. By default twice: 1,000 deployments of 1 per region (the worst case: a call,
  an O(nodes) scan and an update per 10 instances) and 100 deployments of 10 per region.
- ``one``: a single deployment of ``instances / regions`` per region, in one call: the heap
  path, with many replicas per node.

The issue's budget is 1 s for each. ``--check`` exits 1 when any is over it.

Run from the repository root: ``.venv/bin/python -m bench.placement [--check]``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TextIO

from scheduler.placement import Demand, Node, apply_placement, place

BUDGET_S = 1.0
SIZES = (
    (Decimal("0.25"), 256),
    (Decimal("0.5"), 512),
    (Decimal(1), 1024),
    (Decimal(2), 2048),
)


@dataclass(frozen=True, slots=True)
class Result:
    scenario: str
    nodes: int
    regions: int
    deployments: int
    wanted: int
    placed: int
    seconds: float

    @property
    def per_s(self) -> float:
        return self.placed / self.seconds if self.seconds > 0 else float("inf")


def make_nodes(count: int, regions: int, rng: random.Random) -> list[Node]:
    nodes = []
    for i in range(count):
        vcpu = rng.choice((8, 16, 32))
        memory = vcpu * 4096
        nodes.append(
            Node(
                id=f"node-{i:05d}",
                region=f"region-{i % regions:02d}",
                ready=rng.random() >= 0.03,
                vcpu=vcpu,
                memory=memory,
                used_vcpu=Decimal(rng.randrange(vcpu * 300)) / 1000,
                used_memory=rng.randrange(memory * 3 // 10),
            )
        )
    return nodes


def run_many(nodes: list[Node], regions: int, instances: int, deployments: int) -> Result:
    per_region, rest = divmod(instances, deployments * regions)
    if per_region == 0 or rest:
        raise ValueError("instances must be a multiple of deployments x regions")
    rng = random.Random(1)
    demands = [Demand(f"dep-{j:04d}", per_region, *rng.choice(SIZES)) for j in range(deployments)]
    fleet: Sequence[Node] = nodes
    placed = 0
    started = time.perf_counter()
    for demand in demands:
        result = place(fleet, demand)
        fleet = apply_placement(fleet, demand, result)
        placed += len(result.assignments)
    seconds = time.perf_counter() - started
    return Result("many", len(nodes), regions, deployments, instances, placed, seconds)


def run_one(nodes: list[Node], regions: int, instances: int) -> Result:
    per_region, rest = divmod(instances, regions)
    if per_region == 0 or rest:
        raise ValueError("instances must be a multiple of regions")
    demand = Demand("dep-one", per_region, Decimal("0.25"), 256)
    started = time.perf_counter()
    result = place(nodes, demand)
    seconds = time.perf_counter() - started
    return Result("one", len(nodes), regions, 1, instances, len(result.assignments), seconds)


def run(
    nodes: int = 1_000,
    regions: int = 10,
    instances: int = 10_000,
    deployments: Sequence[int] = (1_000, 100),
) -> list[Result]:
    fleet = make_nodes(nodes, regions, random.Random(0))
    results = [run_many(fleet, regions, instances, count) for count in deployments]
    return [*results, run_one(fleet, regions, instances)]


def format_result(result: Result) -> str:
    deployments = f"{result.deployments:,} deployment{'' if result.deployments == 1 else 's'}"
    return (
        f"{result.scenario}: {result.placed:,} of {result.wanted:,} instances "
        f"({deployments}) on {result.nodes:,} nodes in "
        f"{result.regions} regions: {result.seconds:.3f} s, {result.per_s:,.0f} instances/s"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1_000)
    parser.add_argument("--regions", type=int, default=10)
    parser.add_argument("--instances", type=int, default=10_000)
    parser.add_argument(
        "--deployments",
        type=int,
        nargs="+",
        default=[1_000, 100],
        help="deployments of the 'many' scenario, one run per figure",
    )
    parser.add_argument(
        "--check", action="store_true", help=f"exit 1 when a scenario takes over {BUDGET_S} s"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = parse_args(argv)
    results = run(args.nodes, args.regions, args.instances, args.deployments)
    for result in results:
        print(format_result(result), file=out)
    over = [r.scenario for r in results if r.seconds > BUDGET_S]
    if args.check and over:
        print(f"over the {BUDGET_S} s budget: {', '.join(over)}", file=out)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
