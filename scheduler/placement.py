"""Placement: which nodes run a deployment's instances, as a pure function.

``place(nodes, demand)`` decides, for each region of the demand, the nodes that get its
``per_region`` instances. No I/O and no state: the caller passes the nodes as the store has them
(capacity, current use, replicas of each deployment already on them) and records the result;
:func:`apply_placement` gives the nodes as they stand after a placement, to place several
demands in a row.

Rules, for each instance of a region in turn:

- candidates are the region's ready nodes whose free vCPU and memory (capacity minus current
  use minus what this call already placed there) hold one instance: never overcommitted;
- spread first: the candidate with the fewest replicas of this deployment (counting those
  already running) wins, so no node gets a second replica while a candidate has none;
- then least-loaded: load is the larger of the node's vCPU and memory utilisation, in integer
  millionths (floored); then node id. Same input, same output.

The spread guarantee the tests check: when a node received a replica in this call and ends with
k replicas, every node of the region that could still fit an instance ends with k - 1 or more.

vCPU is counted in integer milli-vCPU: capacities round down, uses and demands round up, so
rounding can only leave capacity unused, never overcommit; floats convert through their
shortest repr (``0.1`` is exactly 100 milli-vCPU). Memory is integer MiB.

A region that cannot hold its share gets what fits plus a :class:`Shortfall` whose reason names
the limit; the lifecycle decides whether the deployment fails or waits.

Cost: O(nodes) per call to index and build one heap per region, then O(log nodes) per instance.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from types import MappingProxyType

MILLI = 1000  # milli-vCPU per vCPU
LOAD_SCALE = 1_000_000  # load is utilisation in millionths

__all__ = [
    "Assignment",
    "Demand",
    "Node",
    "Placement",
    "Shortfall",
    "apply_placement",
    "format_vcpu",
    "place",
    "to_millicpu",
]


def to_millicpu(value: Decimal | float, *, round_up: bool) -> int:
    """``value`` vCPU as integer milli-vCPU, rounded up or down to the next whole milli."""
    if isinstance(value, bool):
        raise TypeError("vCPU must be a number, not a bool")
    if isinstance(value, int):
        return value * MILLI
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"vCPU must be finite, not {value!r}")
        value = Decimal(repr(value))
    if not value.is_finite():
        raise ValueError(f"vCPU must be finite, not {value!r}")
    return int((value * MILLI).to_integral_value(ROUND_CEILING if round_up else ROUND_FLOOR))


def format_vcpu(milli: int) -> str:
    """``1500`` -> ``"1.5"``, ``2000`` -> ``"2"``."""
    return format((Decimal(milli) / MILLI).normalize(), "f")


def _non_negative(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")


@dataclass(frozen=True, slots=True)
class Node:
    """A worker node as placement sees it.

    ``instances_of`` maps a deployment id to how many of its instances already run on the
    node (absent: none); it is copied into a read-only mapping.
    """

    id: str
    region: str
    ready: bool
    vcpu: Decimal | float
    memory: int  # MiB
    used_vcpu: Decimal | float = 0
    used_memory: int = 0  # MiB
    instances_of: Mapping[str, int] = field(default_factory=dict)
    # (capacity, used) in milli-vCPU and the load, computed once: place() does no Decimal
    # arithmetic and no division for nodes it only looks at.
    _millicpu: tuple[int, int] = field(init=False, repr=False, compare=False)
    _load_ppm: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _non_negative("memory", self.memory)
        _non_negative("used_memory", self.used_memory)
        capacity = to_millicpu(self.vcpu, round_up=False)
        used = to_millicpu(self.used_vcpu, round_up=True)
        if capacity < 0 or used < 0:
            raise ValueError(f"node {self.id}: vCPU capacity and use must not be negative")
        counts = dict(self.instances_of)
        for deployment, count in counts.items():
            _non_negative(f"node {self.id}: instances of {deployment}", count)
        object.__setattr__(self, "instances_of", MappingProxyType(counts))
        object.__setattr__(self, "_millicpu", (capacity, used))
        object.__setattr__(self, "_load_ppm", _load(used, capacity, self.used_memory, self.memory))


@dataclass(frozen=True, slots=True)
class Demand:
    """``per_region`` instances of ``deployment``, each needing ``vcpu`` and ``memory`` MiB, in
    each of ``regions`` (``None``: every region that has a ready node, in name order)."""

    deployment: str
    per_region: int
    vcpu: Decimal | float
    memory: int  # MiB
    regions: tuple[str, ...] | None = None
    _millicpu: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _non_negative("per_region", self.per_region)
        _non_negative("memory", self.memory)
        millicpu = to_millicpu(self.vcpu, round_up=True)
        if millicpu < 0:
            raise ValueError(f"vcpu must not be negative, not {self.vcpu!r}")
        if self.regions is not None and len(set(self.regions)) != len(self.regions):
            raise ValueError(f"regions are repeated: {self.regions!r}")
        object.__setattr__(self, "_millicpu", millicpu)


@dataclass(frozen=True, slots=True)
class Assignment:
    """One instance of the demand's deployment goes to ``node_id``."""

    node_id: str
    region: str


@dataclass(frozen=True, slots=True)
class Shortfall:
    """A region got ``placed`` of the ``wanted`` instances; ``reason`` says why, region first,
    ready to show an operator as is."""

    wanted: int
    placed: int
    reason: str


@dataclass(frozen=True, slots=True)
class Placement:
    """Assignments in region order (the demand's, else by name), within a region in the order
    chosen; a shortfall for each region that got fewer than it wanted, and only those."""

    assignments: tuple[Assignment, ...]
    shortfalls: Mapping[str, Shortfall]

    @property
    def complete(self) -> bool:
        return not self.shortfalls

    @property
    def reason(self) -> str:
        """Every shortfall's reason, ``"; "``-separated (empty when complete)."""
        return "; ".join(shortfall.reason for shortfall in self.shortfalls.values())


def _load(used_cpu: int, cap_cpu: int, used_mem: int, cap_mem: int) -> int:
    # A zero capacity counts as full once anything uses it, else as empty.
    cpu = used_cpu * LOAD_SCALE // cap_cpu if cap_cpu else (LOAD_SCALE if used_cpu else 0)
    mem = used_mem * LOAD_SCALE // cap_mem if cap_mem else (LOAD_SCALE if used_mem else 0)
    return max(cpu, mem)


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


# Heap entry: (replicas of the deployment, load, node id, used milli-vCPU, used MiB, capacity
# milli-vCPU, capacity MiB). Node ids are unique, so comparison never goes past the id.
_Entry = tuple[int, int, str, int, int, int, int]


def _place_region(
    region: str, ready: list[Node], not_ready: int, demand: Demand
) -> tuple[list[Assignment], Shortfall | None]:
    wanted = demand.per_region
    if wanted == 0:
        return [], None
    deployment = demand.deployment
    need_cpu, need_mem = demand._millicpu, demand.memory
    heap: list[_Entry] = []
    for node in ready:
        cap_cpu, used_cpu = node._millicpu
        cap_mem, used_mem = node.memory, node.used_memory
        if used_cpu + need_cpu <= cap_cpu and used_mem + need_mem <= cap_mem:
            replicas = node.instances_of.get(deployment, 0)
            heap.append((replicas, node._load_ppm, node.id, used_cpu, used_mem, cap_cpu, cap_mem))
    heapq.heapify(heap)

    placed: list[Assignment] = []
    # Final use of each node that got an instance, for the shortfall's reason.
    final: dict[str, tuple[int, int]] = {}
    while heap and len(placed) < wanted:
        replicas, _, node_id, used_cpu, used_mem, cap_cpu, cap_mem = heap[0]
        used_cpu += need_cpu
        used_mem += need_mem
        placed.append(Assignment(node_id, region))
        final[node_id] = (used_cpu, used_mem)
        if used_cpu + need_cpu <= cap_cpu and used_mem + need_mem <= cap_mem:
            load = _load(used_cpu, cap_cpu, used_mem, cap_mem)
            entry = (replicas + 1, load, node_id, used_cpu, used_mem, cap_cpu, cap_mem)
            heapq.heapreplace(heap, entry)
        else:
            heapq.heappop(heap)

    if len(placed) == wanted:
        return placed, None
    head = f"{region}: {len(placed)} of {wanted} placed"
    if not ready:
        detail = f" ({_plural(not_ready, 'node')} not ready)" if not_ready else ""
        return placed, Shortfall(wanted, len(placed), f"{head}: no ready nodes{detail}")
    lack_cpu = lack_mem = 0
    for node in ready:
        used_cpu, used_mem = final.get(node.id, (node._millicpu[1], node.used_memory))
        lack_cpu += used_cpu + need_cpu > node._millicpu[0]
        lack_mem += used_mem + need_mem > node.memory
    reason = (
        f"{head}: no ready node has {format_vcpu(need_cpu)} vCPU and {need_mem} MiB free "
        f"(of {_plural(len(ready), 'ready node')}, {lack_cpu} lack vCPU, {lack_mem} lack memory)"
    )
    return placed, Shortfall(wanted, len(placed), reason)


def place(nodes: Iterable[Node], demand: Demand) -> Placement:
    """Place ``demand`` on ``nodes`` (ids unique) by the rules of this module's docstring."""
    nodes = list(nodes)
    if len({node.id for node in nodes}) != len(nodes):
        twice = sorted(i for i, n in Counter(node.id for node in nodes).items() if n > 1)
        raise ValueError(f"node ids appear twice: {twice}")
    ready: dict[str, list[Node]] = {}
    not_ready: Counter[str] = Counter()
    for node in nodes:
        if node.ready:
            members = ready.get(node.region)
            if members is None:
                ready[node.region] = members = []
            members.append(node)
        else:
            not_ready[node.region] += 1
    if demand.regions is None:
        regions: Iterable[str] = sorted(ready)
    else:
        regions = demand.regions
    assignments: list[Assignment] = []
    shortfalls: dict[str, Shortfall] = {}
    for region in regions:
        placed, shortfall = _place_region(region, ready.get(region, []), not_ready[region], demand)
        assignments.extend(placed)
        if shortfall is not None:
            shortfalls[region] = shortfall
    return Placement(tuple(assignments), MappingProxyType(shortfalls))


def apply_placement(
    nodes: Iterable[Node], demand: Demand, placement: Placement
) -> tuple[Node, ...]:
    """``nodes`` with ``placement``'s instances of ``demand`` counted in: use and replicas."""
    added: dict[str, int] = {}
    for assignment in placement.assignments:
        added[assignment.node_id] = added.get(assignment.node_id, 0) + 1
    result: list[Node] = []
    for node in nodes:
        count = added.pop(node.id, 0)
        if not count:
            result.append(node)
            continue
        instances = dict(node.instances_of)
        instances[demand.deployment] = instances.get(demand.deployment, 0) + count
        used_cpu = node._millicpu[1] + count * demand._millicpu
        result.append(
            replace(
                node,
                used_vcpu=Decimal(used_cpu) / MILLI,
                used_memory=node.used_memory + count * demand.memory,
                instances_of=instances,
            )
        )
    if added:
        raise ValueError(f"placement names unknown nodes: {sorted(added)}")
    return tuple(result)
