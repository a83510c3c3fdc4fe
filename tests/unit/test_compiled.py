"""The proxy's hot path runs compiled (setup.py builds it with mypyc), and not from a build
older than its source: a stale extension would run other code than the file says."""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compiled_sources() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            value = ast.literal_eval(node.value)
            assert isinstance(value, list)
            return [str(path) for path in value]
    raise AssertionError("setup.py names no COMPILED modules")


def test_the_compiled_modules_are_the_request_path() -> None:
    assert compiled_sources() == [
        "edge/proxy/client.py",
        "edge/proxy/upstream.py",
        "edge/proxy/http.py",
        "edge/proxy/worker.py",
        "edge/metrics.py",
    ]


@pytest.mark.skipif(
    bool(os.environ.get("ZEITWORK_PURE_PYTHON")), reason="installed as plain Python on purpose"
)
@pytest.mark.parametrize("source", compiled_sources())
def test_module_is_compiled_from_its_current_source(source: str) -> None:
    module = importlib.import_module(source.removesuffix(".py").replace("/", "."))
    loaded = Path(module.__file__ or "")
    assert loaded.name.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)), (
        f"{module.__name__} runs from {loaded}, not compiled: reinstall (scripts/test does)"
    )
    assert loaded.stat().st_mtime >= (ROOT / source).stat().st_mtime, (
        f"{loaded.name} is older than {source}: reinstall (scripts/test does)"
    )
