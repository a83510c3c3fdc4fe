"""Smoke test of the placement benchmark (bench/placement.py): it runs for real but small and
prints its figures."""

from __future__ import annotations

import io
import re

import pytest

from bench import placement


def test_placement_bench_smoke() -> None:
    thin, many, one = placement.run(nodes=50, regions=5, instances=500, deployments=(100, 10))

    assert [r.scenario for r in (thin, many, one)] == ["many", "many", "one"]
    assert [r.deployments for r in (thin, many, one)] == [100, 10, 1]
    for result in (thin, many, one):
        assert (result.nodes, result.regions, result.wanted) == (50, 5, 500)
        assert result.placed == 500  # the fleet has room for all of it
        assert result.seconds > 0 and result.per_s > 1_000


def test_placement_bench_main_prints_figures_and_checks() -> None:
    out = io.StringIO()
    argv = ["--nodes", "40", "--regions", "4", "--instances", "400", "--deployments", "5"]
    assert placement.main([*argv, "--check"], out=out) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "(5 deployments)" in lines[0] and "(1 deployment)" in lines[1]
    for line in lines:
        assert re.fullmatch(
            r"(many|one): 400 of 400 instances \(\d+ deployments?\) on 40 nodes in 4 regions: "
            r"\d+\.\d{3} s, [\d,]+ instances/s",
            line,
        ), line

    # --check fails a run over budget; without it the run only reports.
    slow = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(placement, "BUDGET_S", 0.0)
        assert placement.main([*argv, "--check"], out=slow) == 1
        assert placement.main(argv, out=io.StringIO()) == 0
    assert "over the 0.0 s budget: many, one" in slow.getvalue()


def test_placement_bench_refuses_uneven_splits() -> None:
    with pytest.raises(ValueError, match="multiple"):
        placement.run(nodes=10, regions=3, instances=100, deployments=(1,))
