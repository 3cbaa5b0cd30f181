"""The figures' common parts: a chart (title, labels, legend), grouped bars, labelled horizontal bars, lines, and the
footer every figure ends with (how it was measured, the command that reproduces it). Each experiment's ``plot`` only
says what to draw."""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterator
from typing import Any

from bench.common import Section


def figure(width: float = 9, height: float = 5.5, **kwargs: Any) -> tuple[Any, Any]:
    """A new figure and its axes (``plt.subplots``)."""
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height), **kwargs)


def save(fig: Any, section: Section, path: str, **margins: float) -> None:
    """Write the footer (how it was measured, the command), then the PNG; ``margins`` go to ``subplots_adjust``."""
    import matplotlib.pyplot as plt

    fig.subplots_adjust(**{"bottom": 0.25, **margins})
    text = textwrap.fill(section.how, 150) + f"\nReproduce: {section.command}"
    fig.text(0.01, 0.01, text, fontsize=6.5, va="bottom", ha="left", family="monospace")
    fig.savefig(path, dpi=110)
    plt.close(fig)


@contextlib.contextmanager
def chart(
    section: Section, path: str, size: tuple[float, float] = (9, 5.5), *, legend: dict[str, Any] | None = None,
    margins: dict[str, float] | None = None, **props: Any,
) -> Iterator[Any]:  # fmt: skip
    """A figure of one axes, which the block draws on; then ``axes.set(**props)`` (title, labels, scales, limits), the
    legend (``legend``: its options; None: no legend) and :func:`save` (``margins``: ``subplots_adjust``'s)."""
    fig, axes = figure(*size)
    yield axes
    axes.set(**props)
    if legend is not None:
        axes.legend(**legend)
    save(fig, section, path, **(margins or {}))


def grouped_bars(axes: Any, groups: list[str], series: dict[str, list[float]], width: float = 0.8) -> list[Any]:
    """One bar per series side by side in each group; the bar containers, in the order of ``series``."""
    step = width / len(series)
    bars = []
    for i, (label, heights) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * step for j in range(len(groups))]
        bars.append(axes.bar(xs, heights, step, label=label))
    axes.set_xticks(range(len(groups)), groups)
    return bars


def labelled_barh(axes: Any, labels: list[str], values: list[float], texts: list[str], **bar: Any) -> None:
    """Horizontal bars, the first at the top, each followed by its text."""
    axes.barh(labels, values, **bar)
    for i, (value, text) in enumerate(zip(values, texts, strict=True)):
        axes.text(value, i, text, va="center", fontsize=8)
    axes.invert_yaxis()


def lines(axes: Any, xs: list[float], series: list[tuple[list[float], str, str]]) -> None:
    """``(ys, style, label)`` per line, on a log2 x axis."""
    for ys, style, label in series:
        axes.plot(xs, ys, style, label=label)
    axes.set_xscale("log", base=2)
