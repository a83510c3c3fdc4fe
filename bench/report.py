"""The results of a benchmark suite run: its measurements, their summaries, and how they are
printed (plain text while it runs) and written (Markdown).

Figures are compared only within a round: every ratio is a proxy's figure over nginx's in
the same scenario and round, and summaries are medians over rounds. A round of a scenario is
*disturbed* when any of its runs was (other processes used the CPUs meanwhile, see
:mod:`bench.procfs`); a scenario's medians leave its disturbed rounds out whenever at least
one undisturbed round exists, and say which rounds they use.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench.procfs import Memory
from bench.scenarios import REFERENCE, BenchConfig
from bench.wrk import WRK_THREADS, WrkResult

MB = 1_000_000
KB = 1_000
# The edge's memory with the idle connections open, Pss summed over its processes.
IDLE_GOAL_BYTES = 150 * MB


@dataclass(frozen=True)
class Measurement:
    """One wrk run of one proxy in one scenario."""

    round: int
    scenario: str
    proxy: str
    result: WrkResult
    # CPU time (user + system) the proxy's processes used during the run; None: unknown.
    cpu_s: float | None = None
    # Cores that processes the benchmark did not start kept busy on average meanwhile.
    others_cores: float | None = None
    disturbed: bool = False
    # What the benchmark's own checks found wrong with the answers (bodies too short ...).
    problems: tuple[str, ...] = ()
    # Uploads the upstream answered during the run, and their request bytes (head and body).
    upstream_requests: int | None = None
    upstream_bytes: int | None = None

    @property
    def per_core(self) -> float | None:
        """Requests per CPU-second of the proxy: what one fully used core would serve."""
        if not self.cpu_s:
            return None
        return self.result.requests / self.cpu_s

    @property
    def failed(self) -> bool:
        return bool(self.result.errors or self.problems)

    def describe_problems(self) -> str:
        parts = [self.result.describe_errors()] if self.result.errors else []
        return "; ".join([*parts, *self.problems])


@dataclass(frozen=True)
class IdleMeasurement:
    """Memory of one proxy before and after ``connections`` idle connections were opened."""

    round: int
    proxy: str
    connections: int
    before: Memory
    # None: they could not all be opened (``error`` says why).
    after: Memory | None = None
    # Seconds it took to open them all.
    open_s: float = 0.0
    # How many of them the proxy had closed by the time its memory was read.
    closed_by_peer: int = 0
    error: str | None = None

    @property
    def per_connection_bytes(self) -> float:
        if self.after is None:
            return 0.0
        return (self.after.pss - self.before.pss) / self.connections

    @property
    def failed(self) -> bool:
        return self.after is None or self.closed_by_peer > 0

    def describe_failure(self) -> str:
        if self.error is not None:
            return self.error
        return f"the proxy closed {self.closed_by_peer} of the {self.connections:,} connections"


@dataclass(frozen=True)
class CellSummary:
    scenario: str
    proxy: str
    requests_per_sec: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    runs: int
    runs_failed: int
    # The rounds the medians are taken over.
    rounds: tuple[int, ...]
    cpu_s: float | None = None
    per_core: float | None = None
    # Medians of the per-round ratios to nginx of the same scenario (None: not measured).
    ratio: float | None = None
    core_ratio: float | None = None


@dataclass(frozen=True)
class IdleSummary:
    proxy: str
    connections: int
    before_pss: float
    after_pss: float
    after_rss: float
    # Rss of the proxy's largest process (its worker) with the connections open.
    after_largest_rss: float
    per_connection_bytes: float
    runs: int
    runs_failed: int


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


@dataclass
class Report:
    config: BenchConfig
    environment: dict[str, str] = field(default_factory=dict)
    measurements: list[Measurement] = field(default_factory=list)
    idle: list[IdleMeasurement] = field(default_factory=list)

    def runs(self, scenario: str, proxy: str | None = None) -> list[Measurement]:
        return [
            m
            for m in self.measurements
            if m.scenario == scenario and (proxy is None or m.proxy == proxy)
        ]

    def results(self, scenario: str, proxy: str) -> list[WrkResult]:
        return [m.result for m in self.runs(scenario, proxy)]

    def disturbed_rounds(self, scenario: str) -> list[int]:
        return sorted({m.round for m in self.runs(scenario) if m.disturbed})

    def rounds_used(self, scenario: str) -> list[int]:
        """The rounds a scenario's medians are taken over: its undisturbed ones, or all of
        them when every round was disturbed."""
        rounds = sorted({m.round for m in self.runs(scenario)})
        disturbed = set(self.disturbed_rounds(scenario))
        return [r for r in rounds if r not in disturbed] or rounds

    def ratios_by_round(
        self, scenario: str, proxy: str, *, per_core: bool = False
    ) -> dict[int, float]:
        """``proxy``/nginx in ``scenario`` for each round that measured both: requests/s, or
        requests per CPU-second."""
        figures: dict[int, dict[str, float]] = {}
        for m in self.runs(scenario):
            value = m.per_core if per_core else m.result.requests_per_sec
            if value is not None:
                figures.setdefault(m.round, {})[m.proxy] = value
        return {
            round_no: by_proxy[proxy] / by_proxy[REFERENCE]
            for round_no, by_proxy in sorted(figures.items())
            if by_proxy.get(REFERENCE) and proxy in by_proxy
        }

    def summary(self, scenario: str, proxy: str) -> CellSummary | None:
        """Medians over the rounds used; None when the cell was not measured."""
        used = self.rounds_used(scenario)
        runs = [m for m in self.runs(scenario, proxy) if m.round in used]
        if not runs:
            return None
        results = [m.result for m in runs]
        ratios = self.ratios_by_round(scenario, proxy)
        core_ratios = self.ratios_by_round(scenario, proxy, per_core=True)
        return CellSummary(
            scenario=scenario,
            proxy=proxy,
            requests_per_sec=statistics.median(r.requests_per_sec for r in results),
            p50_ms=statistics.median(r.p50_ms for r in results),
            p99_ms=statistics.median(r.p99_ms for r in results),
            p999_ms=statistics.median(r.p999_ms for r in results),
            runs=len(runs),
            runs_failed=sum(1 for m in runs if m.failed),
            rounds=tuple(used),
            cpu_s=_median([m.cpu_s for m in runs if m.cpu_s is not None]),
            per_core=_median([m.per_core for m in runs if m.per_core is not None]),
            ratio=_median([ratios[r] for r in used if r in ratios]),
            core_ratio=_median([core_ratios[r] for r in used if r in core_ratios]),
        )

    def idle_summary(self, proxy: str) -> IdleSummary | None:
        """Medians over the rounds in which all the connections were opened; None when
        there is none."""
        runs = [m for m in self.idle if m.proxy == proxy]
        opened = [(m, m.after) for m in runs if m.after is not None]
        if not opened:
            return None
        return IdleSummary(
            proxy=proxy,
            connections=runs[0].connections,
            before_pss=statistics.median(m.before.pss for m, _ in opened),
            after_pss=statistics.median(after.pss for _, after in opened),
            after_rss=statistics.median(after.rss for _, after in opened),
            after_largest_rss=statistics.median(after.largest_rss for _, after in opened),
            per_connection_bytes=statistics.median(m.per_connection_bytes for m, _ in opened),
            runs=len(runs),
            runs_failed=sum(1 for m in runs if m.failed),
        )

    def wrk_cells(self) -> list[tuple[str, str]]:
        return [(s.name, p) for s, p in self.config.cells() if s.kind == "wrk"]

    def idle_proxies(self) -> list[str]:
        return [p for s, p in self.config.cells() if s.kind == "idle"]

    @property
    def runs_failed(self) -> list[Measurement]:
        return [m for m in self.measurements if m.failed]

    @property
    def idle_failed(self) -> list[IdleMeasurement]:
        return [m for m in self.idle if m.failed]

    @property
    def failed(self) -> bool:
        return bool(self.runs_failed or self.idle_failed)


# --- plain text ----------------------------------------------------------------------------


def format_ms(value: float) -> str:
    return f"{value * 1000:.0f} µs" if value < 1 else f"{value:.2f} ms"


def format_per_core(value: float | None) -> str:
    return "?" if value is None else f"{value:,.0f}"


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_cpu(value: float | None) -> str:
    return "?" if value is None else f"{value:.2f}"


def format_mb(value: float) -> str:
    return f"{value / MB:,.1f} MB"


def format_kb(value: float) -> str:
    return f"{value / KB:,.1f} kB"


def _rows(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        indent
        + "  ".join(
            cell.rjust(w) if i > 1 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def format_round_table(report: Report, round_no: int) -> str:
    rows = []
    for m in report.measurements:
        if m.round != round_no:
            continue
        ratio = report.ratios_by_round(m.scenario, m.proxy, per_core=True).get(round_no)
        rows.append(
            [
                m.scenario,
                m.proxy,
                f"{m.result.requests_per_sec:,.0f}",
                format_per_core(m.per_core),
                format_ratio(ratio),
                format_ms(m.result.p50_ms),
                format_ms(m.result.p99_ms),
                format_ms(m.result.p999_ms),
                format_ratio(m.others_cores) + (" disturbed" if m.disturbed else ""),
                str(m.result.errors + len(m.problems)) + (" !!" if m.failed else ""),
            ]
        )
    for i in report.idle:
        if i.round == round_no:
            rows.append(
                [
                    "idle",
                    i.proxy,
                    f"{i.connections:,} conns",
                    format_mb(i.after.pss) if i.after else "failed",
                    "",
                    f"+{format_kb(i.per_connection_bytes)}/conn" if i.after else "",
                    "",
                    "",
                    "",
                    str(i.closed_by_peer) + (" !!" if i.failed else ""),
                ]
            )
    header = [
        "scenario",
        "proxy",
        "req/s",
        "req/CPU-s",
        "/nginx",
        "p50",
        "p99",
        "p99.9",
        "others' cores",
        "errors",
    ]
    return f"round {round_no}/{report.config.rounds}\n" + _rows(header, rows)


def format_summary(report: Report) -> str:
    rows = []
    for scenario, proxy in report.wrk_cells():
        s = report.summary(scenario, proxy)
        if s is None:
            continue
        rows.append(
            [
                scenario,
                proxy,
                f"{s.requests_per_sec:,.0f}",
                format_per_core(s.per_core),
                format_ratio(s.ratio),
                format_ratio(s.core_ratio),
                format_ms(s.p50_ms),
                format_ms(s.p99_ms),
                format_ms(s.p999_ms),
                ",".join(map(str, s.rounds)),
                f"{s.runs_failed}/{s.runs}",
            ]
        )
    header = [
        "scenario",
        "proxy",
        "req/s",
        "req/CPU-s",
        "/nginx",
        "/nginx CPU",
        "p50",
        "p99",
        "p99.9",
        "rounds",
        "failed",
    ]
    text = "summary (medians over the rounds shown)"
    if rows:
        text += "\n" + _rows(header, rows)
    for proxy in report.idle_proxies():
        i = report.idle_summary(proxy)
        if i is not None:
            text += (
                f"\n  idle {proxy}: {i.connections:,} connections, Pss "
                f"{format_mb(i.before_pss)} -> {format_mb(i.after_pss)} "
                f"({format_kb(i.per_connection_bytes)} per connection), "
                f"Rss {format_mb(i.after_rss)}, largest process Rss "
                f"{format_mb(i.after_largest_rss)}"
            )
            if proxy == "edge":
                met = "met" if i.after_largest_rss < IDLE_GOAL_BYTES else "NOT met"
                text += f"; goal: worker Rss < {format_mb(IDLE_GOAL_BYTES)}: {met}"
    for scenario in report.config.scenarios:
        if disturbed := report.disturbed_rounds(scenario):
            text += f"\n  {scenario}: disturbed round(s) {', '.join(map(str, disturbed))}"
            text += (
                ", left out"
                if report.rounds_used(scenario) != sorted({m.round for m in report.runs(scenario)})
                else ", kept (no undisturbed round)"
            )
    if bad := report.runs_failed:
        text += f"\n!! {len(bad)} measured run(s) failed:" + "".join(
            f"\n!!   round {m.round}, {m.scenario} {m.proxy}: {m.describe_problems()}" for m in bad
        )
    if idle_bad := report.idle_failed:
        text += "".join(
            f"\n!!   round {m.round}, idle {m.proxy}: {m.describe_failure()}" for m in idle_bad
        )
    return text


# --- Markdown ------------------------------------------------------------------------------


def _cell(report: Report, scenario: str, proxy: str) -> CellSummary | None:
    return report.summary(scenario, proxy) if scenario in report.config.scenarios else None


def render_headline(report: Report) -> list[str]:
    """The short tables: per scenario, each proxy's requests/s and per CPU-second with the
    ratios to nginx; then the idle connections' memory."""
    proxies = [p for p in ("edge", "nginx", "haproxy") if p in report.config.proxies_used()]
    others = [p for p in proxies if p != REFERENCE]
    lines: list[str] = []
    wrk_scenarios = [s for s in report.config.scenario_list() if s.kind == "wrk"]
    if wrk_scenarios:
        lines += [
            "| scenario | "
            + " | ".join(f"{p} req/s | {p} req/CPU-s" for p in proxies)
            + "".join(f" | {p}/nginx per CPU-s" for p in others)
            + " |",
            "| --- |" + " ---: |" * (2 * len(proxies) + len(others)),
        ]
        for scenario in wrk_scenarios:
            cells = {p: _cell(report, scenario.name, p) for p in proxies}
            row = f"| {scenario.title} |"
            for p in proxies:
                c = cells[p]
                row += (
                    " - | - |"
                    if c is None
                    else f" {c.requests_per_sec:,.0f} | {format_per_core(c.per_core)} |"
                )
            for p in others:
                c = cells[p]
                row += f" {format_ratio(c.core_ratio if c else None)} |"
            lines.append(row)
    idle_proxies = report.idle_proxies()
    if idle_proxies and report.idle:
        count = report.idle[0].connections
        lines += [
            "",
            f"| {count:,} idle connections | " + " | ".join(idle_proxies) + " | goal |",
            "| --- |" + " ---: |" * (len(idle_proxies) + 1),
        ]
        summaries = {p: report.idle_summary(p) for p in idle_proxies}
        edge = summaries.get("edge")
        goal = (
            "edge worker < 150 MB: "
            + ("met" if edge.after_largest_rss < IDLE_GOAL_BYTES else "**not met**")
            if edge
            else "edge worker < 150 MB"
        )
        lines.append(
            "| Rss of the worker holding them | "
            + " | ".join(format_mb(s.after_largest_rss) if s else "-" for s in summaries.values())
            + f" | {goal} |"
        )
        lines.append(
            "| all processes (Pss) | "
            + " | ".join(format_mb(s.after_pss) if s else "-" for s in summaries.values())
            + " | |"
        )
        lines.append(
            "| per connection | "
            + " | ".join(
                format_kb(s.per_connection_bytes) if s else "-" for s in summaries.values()
            )
            + " | |"
        )
    return lines


def render_markdown(report: Report, chart: str | None = None) -> str:
    """The results as Markdown; ``chart``: file name of the PNG beside it, if any."""
    c, env = report.config, report.environment
    scenarios = c.scenario_list()
    lines = [
        "## Proxy benchmark suite: the edge beside nginx and HAProxy",
        "",
        f"{c.rounds} rounds; in each, every scenario drives every proxy in turn with "
        f"`wrk -t{WRK_THREADS} -c{c.connections} -d{c.duration}s --latency -s bench/wrk.lua` "
        f"after {c.warmup} s of uncounted warm-up. Each proxy runs one worker (the edge "
        "`--workers 1`, nginx `worker_processes 1`, HAProxy `nbthread 1`) in front of the same "
        "upstream, one nginx worker; scenarios that configure a proxy alike share its "
        "processes (plain HTTP, TLS, the edge rate limiting, the idle connections). Ratios are to "
        "nginx in the same scenario and round; figures are medians over rounds. "
        "req/CPU-s: requests per CPU-second of the proxy's processes during the run (what "
        "one core would serve), the fair figure on a machine that wrk and the upstream "
        "share with the proxy.",
        "",
    ]
    lines += render_headline(report)
    lines += ["", "Scenarios:", ""]
    for scenario in scenarios:
        text = scenario.description
        if scenario.kind == "idle":
            text += (
                f" ({c.idle_connections:,} connections; Pss summed over the proxy's processes "
                "from /proc/<pid>/smaps_rollup, shared pages split between them; Rss for "
                "comparison; MB = 10^6 bytes)"
            )
        lines.append(f"- **{scenario.name}**: {text}.")
    lines += [
        "",
        "Set-up: nginx proxies with upstream keep-alive (`keepalive 64`), "
        "`client_max_body_size 2m` and `proxy_request_buffering off`, so that it streams "
        "uploads to the upstream as the edge and HAProxy do (nginx's default would read each "
        "whole body first), through a 256 KiB buffer (`client_body_buffer_size 256k`, what "
        "the edge reads at a time; nginx's default 16 KiB costs it about twice the CPU per "
        "upload); responses are buffered in memory only (`proxy_max_temp_file_size 0`). "
        "HAProxy: HTTP mode, `http-reuse always`, its default 16 KiB buffers (it streams "
        "bodies). All three check the Host and add "
        "X-Forwarded headers; TLS scenarios use one ECDSA P-256 certificate made for the "
        "run, TLS 1.2/1.3 with the same suites. The upstream answers `/64k` from a file, "
        "and reads each upload whole (nginx's echo module) before answering with the length "
        "it received, which its log records: a run in which the upstream got a shorter "
        "upload, or wrk read less than the expected bodies, is failed. For the idle "
        "connections each proxy's keep-alive timeout is 300 s, nginx has "
        "`worker_connections` for them and HAProxy `maxconn`.",
        "",
    ]
    lines += [
        "### Every scenario and proxy",
        "",
        "| scenario | proxy | req/s | p50 | p99 | p99.9 | CPU s | req/CPU-s "
        "| /nginx req/s | /nginx per CPU-s | rounds used | failed runs |",
        "| --- | --- |" + " ---: |" * 10,
    ]
    for name, proxy in report.wrk_cells():
        s = report.summary(name, proxy)
        if s is None:
            continue
        lines.append(
            f"| {name} | {proxy} | {s.requests_per_sec:,.0f} | {format_ms(s.p50_ms)} "
            f"| {format_ms(s.p99_ms)} | {format_ms(s.p999_ms)} | {format_cpu(s.cpu_s)} "
            f"| {format_per_core(s.per_core)} | {format_ratio(s.ratio)} "
            f"| {format_ratio(s.core_ratio)} | {', '.join(map(str, s.rounds))} "
            f"| {s.runs_failed}/{s.runs} |"
        )
    idle_proxies = report.idle_proxies()
    if idle_proxies and report.idle:
        lines += [
            "",
            "| idle | connections | Pss before | Pss after | per connection | Rss after "
            "| worker Rss after | failed runs |",
            "| --- |" + " ---: |" * 7,
        ]
        for proxy in idle_proxies:
            if (i := report.idle_summary(proxy)) is not None:
                lines.append(
                    f"| {proxy} | {i.connections:,} | {format_mb(i.before_pss)} "
                    f"| {format_mb(i.after_pss)} | {format_kb(i.per_connection_bytes)} "
                    f"| {format_mb(i.after_rss)} | {format_mb(i.after_largest_rss)} "
                    f"| {i.runs_failed}/{i.runs} |"
                )
    lines += [
        "",
        "**Disturbed runs.** During each run the benchmark reads the machine's busy CPU time "
        "(/proc/stat) and the CPU time of everything it started (the proxies, the upstream, "
        "wrk, itself). When other processes used more than "
        f"{c.disturbed_cores:.2f} of a core on average, the run is disturbed, and so is its "
        "round of that scenario. A scenario's medians leave its disturbed rounds out when it "
        "has at least one undisturbed round, and use all rounds otherwise.",
        "",
    ]
    notes = []
    for scenario in scenarios:
        disturbed = report.disturbed_rounds(scenario.name)
        if not disturbed:
            continue
        all_rounds = sorted({m.round for m in report.runs(scenario.name)})
        kept = report.rounds_used(scenario.name) == all_rounds
        notes.append(
            f"{scenario.name}: round(s) {', '.join(map(str, disturbed))} disturbed, "
            + ("kept (no undisturbed round)" if kept else "left out")
        )
    lines.append(("Disturbed: " + "; ".join(notes) + ".") if notes else "No run was disturbed.")
    if bad := report.runs_failed:
        lines += [
            "",
            f"**Warning: {len(bad)} measured run(s) failed:** "
            + "; ".join(
                f"round {m.round} {m.scenario} {m.proxy}: {m.describe_problems()}" for m in bad
            ),
        ]
    if idle_bad := report.idle_failed:
        lines += [
            "",
            f"**Warning: {len(idle_bad)} idle connection run(s) failed:** "
            + "; ".join(f"round {m.round} {m.proxy}: {m.describe_failure()}" for m in idle_bad),
        ]
    if chart:
        lines += ["", f"![requests per CPU-second and idle memory]({chart})"]
    lines += [
        "",
        "### Rounds",
        "",
        "| round | scenario | proxy | req/s | p50 | p99 | p99.9 | CPU s | req/CPU-s "
        "| /nginx per CPU-s | others' cores | disturbed | errors |",
        "| ---: | --- | --- |" + " ---: |" * 8 + " --- | ---: |",
    ]
    for m in report.measurements:
        ratio = report.ratios_by_round(m.scenario, m.proxy, per_core=True).get(m.round)
        lines.append(
            f"| {m.round} | {m.scenario} | {m.proxy} | {m.result.requests_per_sec:,.0f} "
            f"| {format_ms(m.result.p50_ms)} | {format_ms(m.result.p99_ms)} "
            f"| {format_ms(m.result.p999_ms)} | {format_cpu(m.cpu_s)} "
            f"| {format_per_core(m.per_core)} | {format_ratio(ratio)} "
            f"| {format_ratio(m.others_cores)} | {'**yes**' if m.disturbed else 'no'} "
            f"| {m.result.errors + len(m.problems)} |"
        )
    if report.idle:
        lines += [
            "",
            "| round | idle | Pss before | Pss after | per connection | Rss after "
            "| worker Rss after | opened in | closed by the proxy |",
            "| ---: | --- |" + " ---: |" * 7,
        ]
        for run in report.idle:
            if run.after is None:
                lines.append(
                    f"| {run.round} | {run.proxy} | {format_mb(run.before.pss)} "
                    "| failed | | | | | |"
                )
                continue
            lines.append(
                f"| {run.round} | {run.proxy} | {format_mb(run.before.pss)} "
                f"| {format_mb(run.after.pss)} | {format_kb(run.per_connection_bytes)} "
                f"| {format_mb(run.after.rss)} | {format_mb(run.after.largest_rss)} "
                f"| {run.open_s:.1f} s | {run.closed_by_peer} |"
            )
    lines += [
        "",
        f"Machine: {env.get('cpu', '?')}, Linux {env.get('kernel', '?')}; "
        f"Python {env.get('python', '?')}, {env.get('nginx', '?')}, "
        f"{env.get('haproxy', '?')}, {env.get('wrk', '?')}; "
        f"commit {env.get('commit', '?')}, {env.get('date', '?')}. "
        "Produced by `python -m bench`.",
        "",
    ]
    return "\n".join(lines)
