"""The worker's fixed allocator thresholds (edge.malloc), observed where a block lands: a
2 MiB block is mapped on its own by default, and comes from the heap once the thresholds are
fixed (so that, freed, it stays there for the next one)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import sys
from edge.malloc import steady_heap
fixed = sys.argv[1] == "fixed"
if fixed:
    assert steady_heap()
block = bytes(2 * 1024 * 1024)  # header and data in one block (a bytearray has two)
address = id(block)
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        start, end = (int(part, 16) for part in line.split()[0].split("-"))
        print("heap" if start <= address < end else "mapped")
        break
"""

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt thresholds are glibc's",
)


def where(mode: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_a_large_block_is_mapped_by_default() -> None:
    assert where("default") == "mapped"


def test_with_fixed_thresholds_it_comes_from_the_heap() -> None:
    assert where("fixed") == "heap"
