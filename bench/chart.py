"""The suite's chart: requests per CPU-second by scenario and proxy, and idle memory.

One PNG, drawn with matplotlib's Agg canvas (no display, no pyplot state): on the left a
grouped bar chart of each proxy's requests per CPU-second (medians, log scale: the
scenarios span from thousands of new TLS handshakes to tens of thousands of small requests),
on the right the Rss of the process of each proxy that holds the idle connections (its
worker), with the edge's goal.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from bench.report import IDLE_GOAL_BYTES, MB, Report

# Figure size in inches at DPI: the PNG is WIDTH_IN * DPI by HEIGHT_IN * DPI pixels.
WIDTH_IN, HEIGHT_IN, DPI = 12.0, 5.0, 100
COLOURS = {"edge": "#1f77b4", "edge-pg": "#9ecae1", "nginx": "#2ca02c", "haproxy": "#ff7f0e"}


def render_chart(report: Report, path: Path) -> None:
    """Write the chart of ``report`` as a PNG to ``path``."""
    # Imported here: only writing the chart needs matplotlib, and it is slow to import.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: PLC0415

    figure = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    idle = [p for p in report.idle_proxies() if report.idle_summary(p) is not None]
    wrk_scenarios = [
        s
        for s in report.config.scenario_list()
        if s.kind == "wrk" and any(report.summary(s.name, p) for p in report.config.proxies_used())
    ]
    panels = [n for n in (len(wrk_scenarios), len(idle)) if n]
    if not panels:
        raise ValueError("the report has no measurement to chart")
    axes = list(figure.subplots(1, len(panels), width_ratios=panels, squeeze=False)[0])

    if wrk_scenarios:
        ax = axes.pop(0)
        labelled: set[str] = set()
        top, bottom = 0.0, float("inf")
        for x, scenario in enumerate(wrk_scenarios):
            # The bars of the proxies this scenario measured, centred on its tick.
            bars = [
                (proxy, s.per_core)
                for proxy in report.config.proxies_used()
                if (s := report.summary(scenario.name, proxy)) is not None
                and s.per_core is not None
            ]
            width = 0.8 / max(len(bars), 1)
            for i, (proxy, value) in enumerate(bars):
                bar = ax.bar(
                    x + (i - (len(bars) - 1) / 2) * width,
                    value,
                    width,
                    color=COLOURS.get(proxy),
                    label=None if proxy in labelled else proxy,
                )
                labelled.add(proxy)
                ax.bar_label(bar, labels=[_short(value)], fontsize=7, padding=1)
                top, bottom = max(top, value), min(bottom, value)
        ax.set_xticks(
            range(len(wrk_scenarios)),
            [
                textwrap.fill(s.title.replace(",", ""), 12, break_on_hyphens=False)
                for s in wrk_scenarios
            ],
            fontsize=9,
        )
        ax.set_yscale("log")
        # Bars start well below the lowest, and leave room above the tallest for its label
        # and the legend.
        if top:
            ax.set_ylim(bottom / 3, top * 4)
        ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("requests per CPU-second of the proxy (log)")
        ax.set_title("Requests per CPU-second (median over rounds)")
        ax.legend(fontsize=8, loc="upper center", ncols=len(labelled) or 1)
        ax.grid(axis="y", which="both", alpha=0.3)

    if idle:
        ax = axes.pop(0)
        summaries = [report.idle_summary(p) for p in idle]
        values = [s.after_largest_rss / MB for s in summaries if s is not None]
        bars = ax.bar(idle, values, color=[COLOURS.get(p) for p in idle])
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=8, padding=1)
        ax.axhline(IDLE_GOAL_BYTES / MB, color="red", linestyle="--", linewidth=1)
        ax.text(-0.4, IDLE_GOAL_BYTES / MB, "edge goal", color="red", fontsize=8, va="bottom")
        count = next(s.connections for s in summaries if s is not None)
        ax.set_ylabel("MB (Rss of the worker holding them)")
        ax.set_title(f"Memory with {count:,} idle connections", fontsize=10)
        ax.set_ylim(0, max([*values, IDLE_GOAL_BYTES / MB]) * 1.15)

    figure.savefig(path, format="png")


def _short(value: float) -> str:
    return f"{value / 1000:.1f}k" if value >= 1000 else f"{value:.0f}"
