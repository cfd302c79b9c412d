"""A run's curves from its `metrics.jsonl`, as PNG figures for the report.

One figure per group of streams: the method (one panel per loss term, val r_mean, learned step
sizes), the evaluation students (every student's loss in one panel, their checks in another),
experts. Panels put the step on the bottom axis and the wall time on the top one, so "did the
loss fall" and "how long did it take" read off the same panel; val r_mean marks its peak.
"""

from __future__ import annotations

import io as stdio
from dataclasses import dataclass

import numpy as np

from mmdistill.metrics import Series

# Stream prefix -> the figure it belongs to, in page order.
GROUPS = (
    ("method", "distillation"),
    ("forgetting", "forgetting student"),
    ("expert/", "experts"),
    ("robust/", "dual-track experts"),
    ("student/", "evaluation students"),
    ("students", "evaluation students (trained together)"),
)
CHECKS = ("val_r_mean", "test_r_mean")
MAX_COLUMNS = 3


@dataclass
class Figure:
    title: str
    png: bytes
    text: str  # what the figure shows, in words (alt text, and the peak of a check)


def group_of(stream: str) -> str | None:
    for prefix, title in GROUPS:
        if stream == prefix or (prefix.endswith("/") and stream.startswith(prefix)):
            return title
    return None


def _increasing(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The points where both x and y strictly increase (an invertible piecewise-linear map)."""
    keep_x, keep_y = [x[0]], [y[0]]
    for a, b in zip(x[1:], y[1:], strict=True):
        if a > keep_x[-1] and b > keep_y[-1]:
            keep_x.append(a)
            keep_y.append(b)
    return np.array(keep_x), np.array(keep_y)


def _linear(xp: np.ndarray, fp: np.ndarray):
    """np.interp, extended linearly past both ends (axis ticks may fall outside the data)."""

    def f(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        y = np.interp(x, xp, fp)
        lo = (fp[1] - fp[0]) / (xp[1] - xp[0])
        hi = (fp[-1] - fp[-2]) / (xp[-1] - xp[-2])
        y = np.where(x < xp[0], fp[0] + (x - xp[0]) * lo, y)
        return np.where(x > xp[-1], fp[-1] + (x - xp[-1]) * hi, y)

    return f


def _wall_axis(ax, s: Series) -> None:
    """Wall seconds on the top axis, mapped from the steps of `s`."""
    steps, walls = _increasing(np.array(s.steps), np.array(s.walls))
    if len(steps) < 2:
        return
    from matplotlib.ticker import MaxNLocator

    top = ax.secondary_xaxis("top", functions=(_linear(steps, walls), _linear(walls, steps)))
    top.xaxis.set_major_locator(MaxNLocator(nbins=4))  # val checks make the spacing uneven
    top.set_xlabel("wall (s)", fontsize=8)
    top.tick_params(labelsize=7)


def _panel(ax, title: str, lines: dict[str, Series]) -> str:
    """Draw `lines` (label -> series) into one panel; returns a sentence about it."""
    first = next(iter(lines.values()))
    values = np.concatenate([np.array(s.values) for s in lines.values()])
    check = title in CHECKS
    for label, s in lines.items():
        style = {"marker": "o", "markersize": 3} if check or len(s.steps) < 3 else {}
        ax.plot(s.steps, s.values, label=label, linewidth=1.2, **style)
    text = f"{title}: {len(first.steps)} points, last {first.values[-1]:.4g}"
    if check:
        best = max(lines.values(), key=lambda s: max(s.values))
        i = int(np.argmax(best.values))
        ax.margins(y=0.2)
        ax.annotate(
            f"peak {best.values[i]:.2f}",
            (best.steps[i], best.values[i]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=7,
        )
        text = (
            f"{title} peaked at {best.values[i]:.2f} at step {best.steps[i]:g} "
            f"({best.walls[i]:.0f} s)"
        )
    elif values.min() > 0 and values.max() / values.min() > 50:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if 1 < len(lines) <= 8:
        ax.legend(fontsize=6)
    _wall_axis(ax, first)
    return text


def _panels(streams: dict[str, dict[str, Series]]) -> dict[str, dict[str, Series]]:
    """panel title -> its lines. One stream: a panel per value; several (students, experts):
    a panel per value with one line per stream (the learning rate of the first stream only)."""
    panels: dict[str, dict[str, Series]] = {}
    names = sorted(streams, key=lambda n: (len(n), n))  # student/2 before student/10
    for name in names:
        for key, s in streams[name].items():
            if key == "lr" and name != names[0]:
                continue
            label = name.rsplit("/", 1)[-1] if len(names) > 1 else key
            panels.setdefault(key, {})[label] = s
    return dict(sorted(panels.items(), key=lambda kv: _rank(kv[0])))


def _rank(key: str) -> int:
    """Panel order: the loss, its terms, checks, then learning rates and step sizes."""
    if key == "loss":
        return 0
    if key in CHECKS:
        return 2
    return 3 if key == "lr" or key.startswith("step_") else 1


def figures(series: dict[str, dict[str, Series]]) -> list[Figure]:
    """One figure per group of streams present, in page order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped: dict[str, dict[str, dict[str, Series]]] = {}
    for stream, values in series.items():
        title = group_of(stream) or stream
        grouped.setdefault(title, {})[stream] = values
    order = [t for _, t in GROUPS]
    out = []
    for title in sorted(grouped, key=lambda t: order.index(t) if t in order else len(order)):
        panels = _panels(grouped[title])
        if not panels:
            continue
        cols = min(MAX_COLUMNS, len(panels))
        rows = -(-len(panels) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.1 * rows), squeeze=False)
        texts = [
            _panel(ax, key, lines)
            for ax, (key, lines) in zip(axes.flat, panels.items(), strict=False)
        ]
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        fig.tight_layout()
        buffer = stdio.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)
        out.append(Figure(title, buffer.getvalue(), "; ".join(texts)))
    return out
