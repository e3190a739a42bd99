"""Turns raw samples into the Markdown report and the PNG chart.

A figure's samples are one value per repetition per server. The report shows median
and min-max for popbox and each Dovecot shape, picks the better Dovecot shape per
figure (the one to beat), and gives the ratio popbox/Dovecot of the medians with the
target marked met or not.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Figure", "best_dovecot", "chart", "markdown_table", "summarise"]


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    # The target as a bound on popbox/Dovecot: ">=" for throughput, "<=" for
    # times, memory and CPU; None when the issue sets none.
    target: float | None = None


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cell(values: Sequence[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return _fmt(values[0])
    return f"{_fmt(_median(values))} ({_fmt(min(values))}-{_fmt(max(values))})"


def best_dovecot(figure: Figure, samples: dict[str, list[float]]) -> str | None:
    """The Dovecot shape with the better median for this figure."""
    shapes = [name for name in samples if name.startswith("dovecot") and samples[name]]
    if not shapes:
        return None
    pick = max if figure.higher_is_better else min
    return pick(shapes, key=lambda name: _median(samples[name]))


@dataclass
class Row:
    figure: Figure
    samples: dict[str, list[float]]
    best: str | None
    ratio: float | None
    met: bool | None


def summarise(figures: Sequence[Figure], data: dict[str, dict[str, list[float]]]) -> list[Row]:
    rows: list[Row] = []
    for figure in figures:
        samples = data.get(figure.key, {})
        if not samples:
            continue
        best = best_dovecot(figure, samples)
        ratio = met = None
        popbox = samples.get("popbox")
        if best is not None and popbox:
            base = _median(samples[best])
            if base:
                ratio = _median(popbox) / base
                if figure.target is not None:
                    met = (ratio >= figure.target if figure.higher_is_better
                           else ratio <= figure.target)
        rows.append(Row(figure, samples, best, ratio, met))
    return rows


def base_ratio(row: Row, base: str) -> str:
    """popbox against an earlier popbox of the same run (the medians' ratio)."""
    mine, theirs = row.samples.get("popbox"), row.samples.get(base)
    if not mine or not theirs or not _median(theirs):
        return "—"
    return f"{_median(mine) / _median(theirs):.2f}"


def markdown_table(rows: Sequence[Row], servers: Sequence[str], base: str | None = None) -> str:
    """The figures as a table; ``base`` names an earlier popbox to compare with."""
    compared = [] if base is None or base not in servers else [
        f"popbox/{base.removeprefix('popbox-')}"]
    head = ["figure", "unit", *servers, *compared, "best Dovecot", "popbox/Dovecot", "target",
            "met"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        figure = row.figure
        better = "higher" if figure.higher_is_better else "lower"
        if figure.target is None:
            target = "—"
        else:
            target = ("≥ " if figure.higher_is_better else "≤ ") + _fmt(figure.target)
        met = "—" if row.met is None else ("**met**" if row.met else "not met")
        cells = [
            f"{figure.label}",
            f"{figure.unit} ({better} is better)",
            *(_cell(row.samples.get(server, [])) for server in servers),
            *([base_ratio(row, base)] if compared and base is not None else []),
            (row.best or "—").removeprefix("dovecot-"),
            "—" if row.ratio is None else f"{row.ratio:.2f}",
            target,
            met,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(rows: Sequence[Row], path: Path, title: str) -> None:
    """A horizontal bar per figure: popbox's advantage over the best Dovecot (>1 wins)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [row for row in rows if row.ratio]
    if not shown:
        return
    labels = [row.figure.label for row in shown]
    # For lower-is-better figures invert, so that every bar reads "times better".
    advantage = [
        (row.ratio if row.figure.higher_is_better else 1 / row.ratio) for row in shown
        if row.ratio is not None
    ]
    goals = [
        None if row.figure.target is None
        else (row.figure.target if row.figure.higher_is_better else 1 / row.figure.target)
        for row in shown
    ]
    height = max(3.0, 0.35 * len(shown) + 1.2)
    fig, ax = plt.subplots(figsize=(9, height))
    positions = list(range(len(shown)))
    colors = ["tab:green" if row.met or (row.met is None and a >= 1) else "tab:red"
              for row, a in zip(shown, advantage, strict=True)]
    ax.barh(positions, advantage, color=colors)
    for pos, goal in zip(positions, goals, strict=True):
        if goal is not None:
            ax.plot([goal, goal], [pos - 0.4, pos + 0.4], color="black", linewidth=2)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(positions, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("popbox advantage over the better Dovecot (x, log scale; black tick = target)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
