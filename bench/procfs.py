"""CPU time and memory of processes, and the machine's busy time, read from Linux's /proc.

The benchmark starts every server in a session of its own, so a session id (the leader's
pid) names a server with all the workers it forked. What it measures from here:

* the CPU time (user + system) of a session, which gives requests per CPU-second;
* the memory of a session: the sum over its processes of Pss (proportional set size, from
  ``/proc/<pid>/smaps_rollup``: pages shared between a master and its workers are split
  between them rather than counted twice) and, for comparison, of Rss;
* the CPU time of everything else on the machine during a run: the machine's busy time from
  ``/proc/stat`` less the CPU time of what the benchmark started. A run during which other
  processes used more than a threshold is *disturbed*: its figures measure the neighbours
  as much as the proxy.

The kernel counts CPU time in ticks (normally 10 ms): a few ticks of error per reading.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
# Other processes using more than this share of one core on average during a run disturb it.
DISTURBED_CORES = 0.25


def _ticks_per_second() -> int:
    return os.sysconf("SC_CLK_TCK")


def sessions_cpu_seconds(sessions: Collection[int]) -> dict[int, float]:
    """User and system CPU time of the live processes of each session in ``sessions``, from
    one pass over /proc."""
    ticks = dict.fromkeys(sessions, 0)
    for stat in PROC.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rpartition(")")[2].split()
            # After "(comm)": state ppid pgrp session ... utime (11) stime (12).
            session = int(fields[3])
            if session in ticks:
                ticks[session] += int(fields[11]) + int(fields[12])
    return {session: n / _ticks_per_second() for session, n in ticks.items()}


def session_cpu_seconds(session: int) -> float:
    """User and system CPU time of the live processes of ``session`` (a server started in a
    session of its own: the master and its workers)."""
    return sessions_cpu_seconds([session])[session]


def machine_busy_seconds(stat_text: str | None = None) -> float:
    """CPU time the machine's CPUs spent busy since boot, summed over CPUs: user, nice,
    system, irq and softirq from the ``cpu`` line of /proc/stat.

    Time in interrupts counts as busy because, with tick-based accounting, the process a
    tick interrupted is charged for it too; steal (another guest on the host) and idle/iowait
    do not count.
    """
    text = stat_text if stat_text is not None else (PROC / "stat").read_text()
    first = text.partition("\n")[0].split()
    if not first or first[0] != "cpu":
        raise ValueError(f"unexpected first line of /proc/stat: {' '.join(first)!r}")
    # cpu user nice system idle iowait irq softirq steal guest guest_nice; guest time is
    # already included in user.
    user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in first[1:8])
    return (user + nice + system + irq + softirq) / _ticks_per_second()


@dataclass(frozen=True)
class CpuSnapshot:
    """What the CPUs had done at one moment: the machine's busy time, each session's CPU
    time, and the benchmark's own (including its children that have exited, e.g. wrk)."""

    wall_s: float
    machine_busy_s: float
    sessions_s: Mapping[int, float]
    bench_s: float

    @property
    def ours_s(self) -> float:
        return sum(self.sessions_s.values()) + self.bench_s


def cpu_snapshot(sessions: Collection[int]) -> CpuSnapshot:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return CpuSnapshot(
        wall_s=time.monotonic(),
        machine_busy_s=machine_busy_seconds(),
        sessions_s=sessions_cpu_seconds(sessions),
        bench_s=own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
    )


def others_cores(machine_busy_s: float, ours_s: float, wall_s: float) -> float:
    """Average number of cores that processes the benchmark did not start kept busy during a
    run of ``wall_s`` seconds: the machine's busy CPU time less the benchmark's own. Never
    negative (the kernel's tick sampling can put the difference slightly below zero)."""
    if wall_s <= 0:
        raise ValueError(f"wall time must be positive, got {wall_s}")
    return max(0.0, (machine_busy_s - ours_s) / wall_s)


def others_cores_between(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """:func:`others_cores` over the interval between two snapshots. A session that was not
    alive at one of them (a server started or stopped between) counts from zero."""
    return others_cores(
        after.machine_busy_s - before.machine_busy_s,
        after.ours_s - before.ours_s,
        after.wall_s - before.wall_s,
    )


def is_disturbed(cores: float, threshold: float = DISTURBED_CORES) -> bool:
    return cores > threshold


@dataclass(frozen=True)
class Memory:
    """Memory of a session's processes in bytes: summed Pss, summed Rss and the Rss of the
    largest process (a proxy's worker, which holds the connections)."""

    pss: int
    rss: int
    processes: int
    largest_rss: int = 0


def _rollup_bytes(text: str) -> tuple[int, int]:
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            # "Pss:                1234 kB"
            values[name] = int(rest.split()[0]) * 1024
    return values.get("Pss", 0), values.get("Rss", 0)


def session_memory(session: int) -> Memory:
    """Summed Pss and Rss of the live processes of ``session``."""
    pss = rss = processes = largest = 0
    for stat in PROC.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rpartition(")")[2].split()[3]) != session:
                continue
            p, r = _rollup_bytes((stat.parent / "smaps_rollup").read_text())
            pss, rss, processes = pss + p, rss + r, processes + 1
            largest = max(largest, r)
    return Memory(pss=pss, rss=rss, processes=processes, largest_rss=largest)
