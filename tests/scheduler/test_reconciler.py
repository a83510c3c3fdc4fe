"""The reconciler's decisions, pass by pass, on the in-memory world (no I/O)."""

from __future__ import annotations

import itertools
from collections import Counter
from uuid import UUID

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.lifecycle import TRANSITIONS, IllegalTransition, allowed, check
from scheduler.reconciler import (
    HOLDING,
    MarkNodeDown,
    PlaceInstance,
    SetCurrent,
    Settings,
    StopInstance,
    Transition,
)
from tests.scheduler.world import World

# -- the transition table -------------------------------------------------------------------


def test_every_pair_of_statuses_is_either_allowed_or_refused() -> None:
    for source, targets in TRANSITIONS.items():
        for target in TRANSITIONS:
            if target in targets:
                check(source, target)
                assert allowed(source, target)
            else:
                with pytest.raises(IllegalTransition, match=f"from {source} to {target}"):
                    check(source, target)
                assert not allowed(source, target)


def test_the_table_is_the_designed_lifecycle() -> None:
    path = ["pending", "placing", "starting", "healthy", "active", "draining", "inactive"]
    for source, target in itertools.pairwise(path):
        assert allowed(source, target)
    assert TRANSITIONS["failed"] == frozenset()
    assert allowed("draining", "active")  # rollback inside the window
    assert allowed("inactive", "placing")  # rollback after it
    assert not allowed("pending", "active")  # traffic never skips health
    with pytest.raises(IllegalTransition, match="'paused' is not a deployment status"):
        check("paused", "active")


def test_a_plan_cannot_hold_an_illegal_transition() -> None:
    with pytest.raises(IllegalTransition):
        Transition(UUID(int=1), "x", "starting", "active")


# -- rollout --------------------------------------------------------------------------------


def test_first_deployment_is_placed_spread_started_and_becomes_current() -> None:
    w = World()
    nodes = [w.node(f"n{i}") for i in range(3)]
    env = w.environment()
    d = w.deploy(env, "v1", per_region=3)

    first = w.step()
    moves = [(a.source, a.target) for a in first.actions if isinstance(a, Transition)]
    assert moves == [("pending", "placing"), ("placing", "starting")]
    placed = [a for a in first.actions if isinstance(a, PlaceInstance)]
    assert sorted(a.node_id for a in placed) == sorted(nodes)  # one per node
    assert w.deployments[d].regions == ("eu",)

    # Not healthy yet: nothing moves, traffic does not.
    w.run_assigned(healthy=False)
    assert not w.step().actions
    assert w.environments[env].current is None

    w.run_assigned()
    for i in w.of(d):
        w._set(i.id, healthy=True)
    result = w.step()
    moves = [(a.source, a.target) for a in result.actions if isinstance(a, Transition)]
    assert moves == [("starting", "healthy"), ("healthy", "active")]
    assert SetCurrent(env, d, None) in result.actions
    assert w.environments[env].current == d


def test_new_deployment_replaces_the_current_one_which_drains_then_stops() -> None:
    w = World()
    w.node("n1")
    env = w.environment()
    v1 = w.deployed(env, "v1")
    v2 = w.deployed(env, "v2")
    assert (w.environments[env].current, w.environments[env].previous) == (v2, v1)
    assert w.status(v1) == "draining"
    assert [i.state for i in w.of(v1)] == ["running"]  # kept for a rollback

    w.advance(119)
    assert not w.step().actions  # inside the window
    w.advance(2)
    result = w.step()
    assert Transition(v1, "v1", "draining", "inactive", "rollback window of 120 s is over") in (
        result.actions
    )
    assert [i.state for i in w.of(v1)] == ["stopping"]
    w.run_assigned()
    assert [i.state for i in w.of(v1)] == ["stopped"]
    assert w.environments[env].current == v2


def test_a_deployment_no_longer_the_rollback_target_stops_at_once() -> None:
    w = World()
    w.node("n1", vcpu=8)
    env = w.environment()
    v1 = w.deployed(env, "v1")
    w.deployed(env, "v2")
    w.deployed(env, "v3")
    w.settle()
    # v2 is previous now; nothing can roll back to v1.
    assert w.status(v1) == "inactive"
    assert {i.state for i in w.of(v1)} == {"stopping"}


def test_an_older_deployment_healthy_after_a_newer_one_is_superseded() -> None:
    w = World()
    w.node("n1")
    env = w.environment()
    old = w.deploy(env, "old")
    w.advance(1)
    new = w.deploy(env, "new")
    w.settle()
    w.run_assigned(only=new)
    w.settle()
    assert w.status(new) == "active"
    w.run_assigned(only=old)
    w.settle()
    assert w.status(old) == "inactive"
    assert w.environments[env].current == new
    assert {i.state for i in w.of(old)} == {"stopping"}


def test_never_healthy_fails_after_the_start_timeout_and_traffic_stays() -> None:
    w = World()
    w.node("n1")
    env = w.environment()
    v1 = w.deployed(env, "v1")
    v2 = w.deploy(env, "v2")
    w.settle()
    w.run_assigned(healthy=False, only=v2)
    w.advance(59)
    assert not w.step().actions
    w.advance(2)
    w.step()
    d = w.deployments[v2]
    assert d.status == "failed"
    failed = next(a for a in w.history[-1].actions if isinstance(a, Transition))
    assert failed.reason is not None
    assert failed.reason.startswith("not healthy within 60 s (eu: 0 of 1 healthy; instance ")
    assert "is unhealthy" in failed.reason
    assert w.environments[env].current == v1 and w.status(v1) == "active"
    assert {i.state for i in w.of(v2)} == {"stopping"}


def test_an_instance_that_fails_while_starting_fails_the_deployment_at_once() -> None:
    w = World()
    w.node("n1")
    env = w.environment()
    d = w.deploy(env, "v1", per_region=1)
    w.step()
    (instance,) = w.of(d)
    w.advance(1)
    w.fail(instance.id, "exited with status 3")
    result = w.step()
    (failed,) = [a for a in result.actions if isinstance(a, Transition)]
    assert (failed.source, failed.target) == ("starting", "failed")
    assert failed.reason == f"instance {instance.id} on n1 failed: exited with status 3"
    assert w.environments[env].current is None


def test_placement_shortfall_waits_then_fails_with_the_regions_reason() -> None:
    w = World()
    w.node("small", vcpu=1, memory=256)
    env = w.environment()
    d = w.deploy(env, "big", memory=512)
    first = w.step()
    assert w.status(d) == "placing"
    assert first.waiting[d].startswith("eu: 0 of 1 placed: no ready node has 1 vCPU and 512 MiB")
    w.advance(61)
    w.step()
    assert w.status(d) == "failed"
    reason = next(a for a in w.history[-1].actions if isinstance(a, Transition)).reason
    assert reason is not None and reason.startswith("not placed within 60 s: eu: 0 of 1 placed")


def test_a_region_without_ready_nodes_is_waited_for_then_fails() -> None:
    w = World()
    env = w.environment()
    d = w.deploy(env, "v1")
    assert w.step().waiting[d] == "no region has a ready node"
    w.advance(30)
    w.node("late")  # capacity arrives in time: placed
    w.step()
    assert w.status(d) == "starting"

    other = w.deploy(w.environment(), "v2")
    for node in list(w.nodes):
        w.drain(node)
    w.step()
    w.advance(61)
    w.step()
    assert w.status(other) == "failed"


def test_every_region_with_a_ready_node_gets_its_instances() -> None:
    w = World()
    for region in ("eu", "us", "ap"):
        for n in range(2):
            w.node(f"{region}{n}", region)
    env = w.environment()
    d = w.deployed(env, "v1", per_region=2)
    assert Counter(i.region for i in w.of(d)) == {"eu": 2, "us": 2, "ap": 2}
    assert w.deployments[d].regions == ("ap", "eu", "us")


# -- nodes ----------------------------------------------------------------------------------


def test_a_silent_node_is_down_and_its_instances_are_replaced() -> None:
    w = World()
    a, b, c = w.node("a"), w.node("b"), w.node("c")
    env = w.environment()
    d = w.deployed(env, "v1", per_region=2)
    lost = [i for i in w.of(d) if i.node_id == a] or [i for i in w.of(d) if i.node_id == b]
    gone = lost[0].node_id
    assert gone is not None
    w.advance(31, silent=frozenset({gone}))
    result = w.step()
    assert [a.hostname for a in result.actions if isinstance(a, MarkNodeDown)] == [
        w.nodes[gone].hostname
    ]
    stop = next(a for a in result.actions if isinstance(a, StopInstance))
    assert stop.at_once and "is down" in stop.message
    (placed,) = [a for a in result.actions if isinstance(a, PlaceInstance)]
    assert placed.node_id not in (gone,)
    assert placed.node_id in {a, b, c} - {gone}
    assert w.status(d) == "active"  # it keeps serving from the other instance


def test_drain_replaces_first_and_stops_only_once_the_replacement_serves() -> None:
    w = World()
    a = w.node("a")
    env = w.environment()
    d = w.deployed(env, "v1")
    b = w.node("b")
    w.drain(a)
    w.step()
    (old,) = [i for i in w.of(d) if i.node_id == a]
    (new,) = [i for i in w.of(d) if i.node_id == b]
    assert old.state == "running" and new.state == "pending"
    # The replacement starts but is not healthy yet: the old one keeps serving.
    w.run_assigned(healthy=False)
    w.step()
    assert w.instances[old.id].state == "running"
    w._set(new.id, healthy=True)
    w.step()
    assert w.instances[old.id].state == "stopping"
    assert w.nodes[a].state == "draining"  # until its agent confirms the stop
    w.run_assigned()
    w.step()
    assert w.nodes[a].state == "drained"


def test_a_failed_instance_of_a_running_deployment_is_replaced_with_backoff() -> None:
    w = World()
    w.node("a", vcpu=64, memory=65536)
    env = w.environment()
    d = w.deployed(env, "v1")
    delays = []
    for _ in range(5):
        (running,) = w.of(d, "running", "pending")
        w.fail(running.id)
        waited = 0.0
        while not any(isinstance(a, PlaceInstance) for a in w.step().actions):
            w.advance(0.5)
            waited += 0.5
            assert waited < 120
        delays.append(waited)
        w.run_assigned()
    # 1 s, doubling: a crashing app does not flood its node.
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert w.status(d) == "active"


# -- rollback after the window -------------------------------------------------------------


def test_an_inactive_deployment_moved_back_to_placing_is_started_and_made_current() -> None:
    w = World()
    w.node("a")
    env = w.environment()
    v1 = w.deployed(env, "v1")
    w.advance(1)
    v2 = w.deployed(env, "v2")
    w.advance(121)
    w.settle()
    w.run_assigned()
    assert w.status(v1) == "inactive"
    # What the rollback endpoint does.
    w.apply(Transition(v1, "v1", "inactive", "placing"))
    w.settle()
    assert w.environments[env].current == v2  # serving until v1 is healthy again
    w.run_assigned(only=v1)
    w.settle()
    assert w.environments[env].current == v1 and w.status(v1) == "active"
    assert w.status(v2) == "draining"
    assert len(w.of(v1, "running")) == 1


# -- properties -----------------------------------------------------------------------------


# Weighted: with more rollouts and runs, more deployments get somewhere.
STEPS = ("deploy", "deploy", "run", "run", "run", "sick", "fail", "drain", "silence", "tick")


@st.composite
def _worlds(draw: st.DrawFn) -> tuple[World, list[tuple[str, int]]]:
    w = World(Settings(start_timeout=20, rollback_window=10, heartbeat_timeout=5))
    for n in range(draw(st.integers(1, 6))):
        w.node(
            f"n{n}",
            draw(st.sampled_from(["eu", "us"])),
            vcpu=draw(st.integers(1, 4)),
            memory=draw(st.sampled_from([512, 1024, 2048])),
        )
    steps = draw(
        st.lists(
            st.tuples(
                st.sampled_from(STEPS),
                st.integers(0, 1000),
            ),
            max_size=40,
        )
    )
    return w, steps


@settings(max_examples=150, deadline=None)
@given(_worlds())
def test_invariants_hold_whatever_happens(case: tuple[World, list[tuple[str, int]]]) -> None:
    w, steps = case
    envs = [w.environment(), w.environment()]
    silent: set[UUID] = set()
    became_current: set[UUID] = set()
    for kind, pick in steps:
        if kind == "deploy":
            w.deploy(envs[pick % 2], f"d{len(w.deployments)}", per_region=1 + pick % 2)
        elif kind == "run":
            w.run_assigned()
        elif kind == "sick":
            w.run_assigned(healthy=False)
        elif kind in ("fail", "drain", "silence"):
            live = [i for i in w.instances.values() if i.state == "running"]
            nodes = sorted(w.nodes)
            if kind == "fail" and live:
                w.fail(live[pick % len(live)].id)
            elif kind == "drain":
                w.drain(nodes[pick % len(nodes)])
            elif kind == "silence":
                silent.add(nodes[pick % len(nodes)])
        w.advance(1 + pick % 7, silent=frozenset(silent))
        result = w.step()
        for action in result.actions:
            if isinstance(action, PlaceInstance):
                # Only on ready nodes.
                assert w.nodes[action.node_id].state == "ready"
            if isinstance(action, SetCurrent):
                became_current.add(action.deployment_id)
        # Never overcommitted.
        used: Counter[UUID] = Counter()
        memory: Counter[UUID] = Counter()
        for i in w.instances.values():
            if i.state in HOLDING and i.node_id is not None:
                used[i.node_id] += int(i.vcpu * 1000)
                memory[i.node_id] += i.memory_mb
        for node in w.nodes.values():
            assert used[node.id] <= node.vcpu * 1000 and memory[node.id] <= node.memory_mb
        # A current deployment is active (or draining after a rollback swap, which this
        # world does not do) and got there through health.
        for env in w.environments.values():
            if env.current is not None:
                assert w.status(env.current) == "active"
                assert env.current in became_current
        # Nothing is left running for a deployment that left the lifecycle.
        for i in w.instances.values():
            if w.status(i.deployment_id) in ("failed", "inactive"):
                assert i.state not in ("pending", "starting", "running"), (i, result, steps)
