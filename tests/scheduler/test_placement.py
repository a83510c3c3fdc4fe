"""Tests of scheduler.placement: hypothesis properties for each placement rule, and examples
for the reasons' wording, least-loaded filling and the units.

The generated vCPU figures are whole milli-vCPU Decimals, so the checks below do exact
arithmetic in milli-vCPU, independently of the module's rounding.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import scheduler
from scheduler.placement import (
    Assignment,
    Demand,
    Node,
    Placement,
    Shortfall,
    apply_placement,
    format_vcpu,
    place,
    to_millicpu,
)

PROPERTY_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
REGIONS = ("ap-south", "eu-west", "us-east")
DEPLOYMENT = "web"
UNBOUNDED = 10**9


def milli(m: int) -> Decimal:
    return Decimal(m) / 1000


@st.composite
def nodes_st(draw: st.DrawFn) -> list[Node]:
    count = draw(st.integers(0, 14))
    ids = draw(st.lists(st.integers(0, 99), min_size=count, max_size=count, unique=True))
    nodes = []
    for i in ids:
        cap_cpu = draw(st.integers(0, 8000))
        cap_mem = draw(st.integers(0, 8192))
        # Now and then a node already over its capacity (capacity lowered on re-registration).
        nodes.append(
            Node(
                id=f"n{i:02d}",
                region=draw(st.sampled_from(REGIONS)),
                ready=draw(st.booleans() | st.just(True)),
                vcpu=milli(cap_cpu),
                memory=cap_mem,
                used_vcpu=milli(draw(st.integers(0, cap_cpu + 500))),
                used_memory=draw(st.integers(0, cap_mem + 512)),
                instances_of={
                    DEPLOYMENT: draw(st.integers(0, 3)),
                    "other": draw(st.integers(0, 2)),
                },
            )
        )
    return nodes


@st.composite
def demand_st(draw: st.DrawFn) -> Demand:
    regions = draw(
        st.none() | st.lists(st.sampled_from((*REGIONS, "nowhere")), unique=True).map(tuple)
    )
    return Demand(
        deployment=DEPLOYMENT,
        per_region=draw(st.integers(0, 15)),
        vcpu=milli(draw(st.sampled_from((0, 250, 500, 1000, 1500, 2000)) | st.integers(0, 3000))),
        memory=draw(st.sampled_from((0, 128, 256, 512, 1024)) | st.integers(0, 2048)),
        regions=regions,
    )


def mcpu(value: Decimal | float) -> int:
    exact = Decimal(value) * 1000
    assert exact == exact.to_integral_value()
    return int(exact)


def fit_count(node: Node, demand: Demand, added: int = 0) -> int:
    """How many more instances of ``demand`` fit on ``node`` after ``added`` more."""
    count = UNBOUNDED
    for cap, used, need in (
        (mcpu(node.vcpu), mcpu(node.used_vcpu) + added * mcpu(demand.vcpu), mcpu(demand.vcpu)),
        (node.memory, node.used_memory + added * demand.memory, demand.memory),
    ):
        if used > cap:
            return 0
        if need:
            count = min(count, (cap - used) // need)
    return count


def target_regions(nodes: list[Node], demand: Demand) -> tuple[str, ...]:
    if demand.regions is not None:
        return demand.regions
    return tuple(sorted({n.region for n in nodes if n.ready}))


@given(nodes_st(), demand_st())
@PROPERTY_SETTINGS
def test_never_overcommits_vcpu_or_memory(nodes: list[Node], demand: Demand) -> None:
    added = Counter(a.node_id for a in place(nodes, demand).assignments)
    for node in nodes:
        if added[node.id]:
            used_cpu = mcpu(node.used_vcpu) + added[node.id] * mcpu(demand.vcpu)
            used_mem = node.used_memory + added[node.id] * demand.memory
            assert used_cpu <= mcpu(node.vcpu)
            assert used_mem <= node.memory


@given(nodes_st(), demand_st())
@PROPERTY_SETTINGS
def test_uses_only_ready_nodes_of_the_assigned_region(nodes: list[Node], demand: Demand) -> None:
    by_id = {n.id: n for n in nodes}
    regions = target_regions(nodes, demand)
    for assignment in place(nodes, demand).assignments:
        node = by_id[assignment.node_id]
        assert node.ready
        assert node.region == assignment.region
        assert assignment.region in regions


@given(nodes_st(), demand_st())
@PROPERTY_SETTINGS
def test_spread_no_node_ends_two_ahead_of_a_node_that_still_fits(
    nodes: list[Node], demand: Demand
) -> None:
    """If a node received a replica here and ends with k, every ready node of its region that
    can still fit an instance ends with at least k - 1."""
    added = Counter(a.node_id for a in place(nodes, demand).assignments)

    def final(node: Node) -> int:
        return node.instances_of.get(DEPLOYMENT, 0) + added[node.id]

    for receiver in (n for n in nodes if added[n.id]):
        for other in nodes:
            still_fits = other.ready and fit_count(other, demand, added[other.id]) > 0
            if other.region == receiver.region and still_fits:
                assert final(other) >= final(receiver) - 1, (receiver, other, added)


@given(nodes_st(), demand_st())
@PROPERTY_SETTINGS
def test_distinct_nodes_first(nodes: list[Node], demand: Demand) -> None:
    """Without earlier replicas, a region with at least ``per_region`` fitting nodes gets each
    replica on a different node."""
    nodes = [replace(n, instances_of={}) for n in nodes]
    result = place(nodes, demand)
    for region in target_regions(nodes, demand):
        fitting = [n for n in nodes if n.region == region and n.ready and fit_count(n, demand)]
        if len(fitting) >= demand.per_region:
            used = [a.node_id for a in result.assignments if a.region == region]
            assert len(used) == len(set(used)) == demand.per_region


@given(nodes_st(), demand_st())
@PROPERTY_SETTINGS
def test_places_what_fits_and_reports_exactly_the_shortfalls(
    nodes: list[Node], demand: Demand
) -> None:
    result = place(nodes, demand)
    per_region = Counter(a.region for a in result.assignments)
    regions = target_regions(nodes, demand)
    assert set(per_region) <= set(regions)
    assert set(result.shortfalls) <= set(regions)
    for region in regions:
        # Instances are alike, so the most that fits is each node's own count, summed.
        room = sum(fit_count(n, demand) for n in nodes if n.region == region and n.ready)
        assert per_region[region] == min(demand.per_region, room)
        if per_region[region] < demand.per_region:
            shortfall = result.shortfalls[region]
            assert (shortfall.wanted, shortfall.placed) == (demand.per_region, per_region[region])
            assert shortfall.reason.startswith(
                f"{region}: {per_region[region]} of {demand.per_region} placed: no ready node"
            )
        else:
            assert region not in result.shortfalls
    assert result.complete == (not result.shortfalls)


@given(nodes_st(), demand_st(), st.randoms(use_true_random=False))
@PROPERTY_SETTINGS
def test_deterministic_whatever_the_node_order(
    nodes: list[Node], demand: Demand, rnd: random.Random
) -> None:
    first = place(nodes, demand)
    assert place(nodes, demand) == first
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    assert place(shuffled, demand) == first


@given(nodes_st(), demand_st(), demand_st())
@PROPERTY_SETTINGS
def test_placing_in_a_row_with_apply_never_overcommits(
    nodes: list[Node], first: Demand, second: Demand
) -> None:
    second = Demand("api", second.per_region, second.vcpu, second.memory, second.regions)
    after_first = apply_placement(nodes, first, place(nodes, first))
    after_second = apply_placement(after_first, second, place(after_first, second))
    for before, after in zip(nodes, after_second, strict=True):
        if after != before:
            assert mcpu(after.used_vcpu) <= mcpu(after.vcpu)
            assert after.used_memory <= after.memory


# -- examples --------------------------------------------------------------------------------


def node(
    node_id: str,
    vcpu: Decimal | float = 8,
    memory: int = 8192,
    *,
    region: str = "eu-west",
    ready: bool = True,
    used_vcpu: Decimal | float = 0,
    used_memory: int = 0,
    replicas: int = 0,
) -> Node:
    return Node(
        node_id, region, ready, vcpu, memory, used_vcpu, used_memory, {DEPLOYMENT: replicas}
    )


def ids(placement: Placement) -> list[str]:
    return [a.node_id for a in placement.assignments]


def test_reason_names_the_limit_when_the_region_is_full() -> None:
    nodes = [
        node("n1", vcpu=2, memory=4096),
        node("n2", vcpu=3, memory=4096),
        node("n3", vcpu=8, memory=512),  # enough vCPU, short of memory
        node("n4", vcpu=64, memory=65536, ready=False),
        node("n5", vcpu=64, memory=65536, region="us-east"),
    ]
    result = place(nodes, Demand(DEPLOYMENT, 3, Decimal(2), 1024, regions=("eu-west",)))

    assert result.assignments == (Assignment("n1", "eu-west"), Assignment("n2", "eu-west"))
    assert result.shortfalls == {
        "eu-west": Shortfall(
            3,
            2,
            "eu-west: 2 of 3 placed: no ready node has 2 vCPU and 1024 MiB free "
            "(of 3 ready nodes, 2 lack vCPU, 1 lack memory)",
        )
    }
    assert not result.complete


def test_reason_when_a_region_has_no_ready_nodes() -> None:
    nodes = [node("n1", ready=False), node("n2", ready=False), node("n3", region="ap-south")]
    demand = Demand(DEPLOYMENT, 2, Decimal("0.5"), 256, regions=("eu-west", "us-east"))
    result = place(nodes, demand)

    assert result.assignments == ()
    assert result.reason == (
        "eu-west: 0 of 2 placed: no ready nodes (2 nodes not ready); "
        "us-east: 0 of 2 placed: no ready nodes"
    )
    one = place([node("n1", vcpu=Decimal("0.25"))], Demand(DEPLOYMENT, 1, Decimal("1.5"), 0))
    assert one.reason == (
        "eu-west: 0 of 1 placed: no ready node has 1.5 vCPU and 0 MiB free "
        "(of 1 ready node, 1 lack vCPU, 0 lack memory)"
    )


def test_default_regions_are_those_with_ready_nodes_in_name_order() -> None:
    nodes = [
        node("a", region="us-east"),
        node("b", region="eu-west"),
        node("c", region="ap-south", ready=False),
    ]
    result = place(nodes, Demand(DEPLOYMENT, 1, 1, 128))
    assert result.assignments == (Assignment("b", "eu-west"), Assignment("a", "us-east"))
    assert result.complete and result.reason == ""


def test_fills_the_least_loaded_node_by_the_larger_utilisation() -> None:
    nodes = [
        node("a", vcpu=10, memory=10_000, used_vcpu=5),  # load 0.5
        node("b", vcpu=10, memory=10_000, used_vcpu=1, used_memory=6000),  # 0.6 (memory)
        node("c", vcpu=10, memory=10_000, used_vcpu=2),  # 0.2
    ]
    demand = Demand(DEPLOYMENT, 3, 1, 100)
    assert ids(place(nodes, demand)) == ["c", "a", "b"]
    # Second round, among nodes with one replica each: c is at 0.3, a at 0.6, b at 0.61.
    demand = Demand(DEPLOYMENT, 5, 1, 100)
    assert ids(place(nodes, demand)) == ["c", "a", "b", "c", "a"]


def test_spreads_before_loading_and_breaks_ties_by_id() -> None:
    nodes = [
        node("n3"),
        node("n2", replicas=1),  # the idlest, but already runs a replica
        node("n1", used_vcpu=4),
        node("n0", used_vcpu=4),
    ]
    assert ids(place(nodes, Demand(DEPLOYMENT, 3, 1, 64))) == ["n3", "n0", "n1"]
    # Other deployments' replicas count only through load.
    other = [node("n1", used_vcpu=1), Node("n2", "eu-west", True, 8, 8192, 0, 0, {"api": 5})]
    assert ids(place(other, Demand(DEPLOYMENT, 1, 1, 64))) == ["n2"]


def test_exact_milli_vcpu_so_floats_do_not_drift() -> None:
    # In floats 0.1 + 0.1 + 0.1 > 0.3, which would leave room for only one instance.
    result = place([node("n1", vcpu=0.3, used_vcpu=0.1)], Demand(DEPLOYMENT, 3, 0.1, 0))
    assert ids(result) == ["n1", "n1"]
    assert result.shortfalls["eu-west"].placed == 2
    assert to_millicpu(Decimal("0.0001"), round_up=True) == 1
    assert to_millicpu(Decimal("0.0019"), round_up=False) == 1
    assert to_millicpu(2, round_up=False) == 2000
    assert format_vcpu(1500) == "1.5" and format_vcpu(10_000) == "10"


def test_apply_placement_counts_use_and_replicas() -> None:
    nodes = (node("n1", vcpu=2, memory=1024, replicas=1), node("n2", vcpu=2, memory=1024))
    demand = Demand(DEPLOYMENT, 3, Decimal("0.75"), 256)
    result = place(nodes, demand)
    assert ids(result) == ["n2", "n1", "n2"]
    after = apply_placement(nodes, demand, result)
    assert after[0].used_vcpu == Decimal("0.75") and after[0].used_memory == 256
    assert after[1].used_vcpu == Decimal("1.5") and after[1].used_memory == 512
    assert dict(after[0].instances_of) == {DEPLOYMENT: 2}
    assert dict(after[1].instances_of) == {DEPLOYMENT: 2}
    assert place(after, demand).shortfalls["eu-west"].placed == 1  # only n1 has 0.75 left
    with pytest.raises(ValueError, match="unknown nodes"):
        apply_placement(nodes[:1], demand, result)


@pytest.mark.parametrize(
    "build",
    [
        lambda: place([node("n1"), node("n1")], Demand(DEPLOYMENT, 1, 1, 1)),
        lambda: Demand(DEPLOYMENT, 1, 1, 1, regions=("eu-west", "eu-west")),
        lambda: Demand(DEPLOYMENT, -1, 1, 1),
        lambda: Demand(DEPLOYMENT, 1, Decimal(-1), 1),
        lambda: Demand(DEPLOYMENT, 1, float("nan"), 1),
        lambda: node("n1", memory=-1),
        lambda: Node("n1", "eu-west", True, 1, 1, instances_of={DEPLOYMENT: -1}),
    ],
)
def test_bad_input_is_refused(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        build()


def test_nodes_are_immutable_values() -> None:
    counts = {DEPLOYMENT: 1}
    n = Node("n1", "eu-west", True, 1, 1, instances_of=counts)
    counts[DEPLOYMENT] = 5
    assert n.instances_of[DEPLOYMENT] == 1
    with pytest.raises(TypeError):
        n.instances_of[DEPLOYMENT] = 2  # type: ignore[index]


def test_scheduler_imports_neither_edge_nor_agent() -> None:
    for path in Path(scheduler.__file__).parent.rglob("*.py"):
        for stmt in ast.walk(ast.parse(path.read_text())):
            if isinstance(stmt, ast.Import):
                names = [alias.name for alias in stmt.names]
            elif isinstance(stmt, ast.ImportFrom):
                names = [stmt.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in {"edge", "agent"}, (path, name)
