"""A run's curves from its `metrics.jsonl`, as PNG figures for the report.

One figure per group of streams: the method (one panel per loss term, val r_mean, learned step
sizes), the evaluation students (every student's loss in one panel, their checks in another),
experts. Panels put the step on the bottom axis and the wall time on the top one, so "did the
loss fall" and "how long did it take" read off the same panel; val r_mean marks its peak, and
dashed lines at the random-pairs and full-data references when the page found them. Each figure
carries a note per loss term it plots (`TERM_NOTES`), because raw loss values mislead: CovMatch's
covariance gap grows while its set gets no worse, a trajectory loss of 1 is no progress.
"""

from __future__ import annotations

import io as stdio
from dataclasses import dataclass, field

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
METHOD_TITLE = GROUPS[0][1]  # the method's own streams: its loss terms and val checks
CHECKS = ("val_r_mean", "test_r_mean")
MAX_COLUMNS = 3
# Colours of the dashed test-r_mean lines on a val curve: the run itself, then its references.
REFERENCE_COLORS = ("#1f77b4", "#7a7a7a", "#2a7f2a", "#b8860b")

# What each recorded term measures and why its values have the scale they have, by (scope,
# term). The scope of the `method` stream is its family's kind (FAMILY_SCOPE); other streams
# take their group's (SCOPES). A term without a note gets none.
TERM_NOTES: dict[tuple[str, str], str] = {
    ("covmatch", "loss"): (
        "the synthetic set's loss, cov + lambda x mean (+ the within term x its weight): "
        "cov dominates, so it moves with cov."
    ),
    ("covmatch", "cov"): (
        "||rho C_real - C_syn||_F^2, the squared gap between rho times the real image-text "
        "cross-covariance and the synthetic one, in the online student's feature space. When "
        "the trunks train, that space moves: as the online student learns, its image and text "
        "features become correlated, C_real (so the target rho C_real) grows, the synthetic "
        "set trails it, and the term rises (the default shapes run: from about 5 to about 170 "
        "in 100 steps) while val r_mean holds; it drops back at each reset of the online "
        "student (every reset_every steps). With frozen trunks the target stays put."
    ),
    ("covmatch", "mean"): (
        "the per-modality mean matching of projected features, recorded before its weight "
        "lambda; it grows with the online student's feature scale, like cov, but stays small."
    ),
    ("covmatch", "online"): (
        "the online student's InfoNCE on its real batch: ln(real_batch) at chance (4.85 for "
        "128 pairs); it falls as the student learns and jumps back up at every reset."
    ),
    ("covmatch", "within"): (
        "the within-modality covariance gaps, sum over images and texts of "
        "||rho C_mm - C_mm,syn||^2, recorded before their weight (method.within)."
    ),
    ("trajectory", "loss"): (
        "the normalised trajectory distance, sum over branches of ||theta_hat - theta*_{s+R}||^2 "
        "/ ||theta*_s - theta*_{s+R}||^2: 1 per branch (2 for image + text, 1 with "
        "merge_loss_branches) means the synthetic steps got the student no closer to the "
        "expert's target than its start; below that is progress, above it the synthetic steps "
        "overshoot (large step sizes). Each iteration draws a new expert and start epoch, so "
        "it is noisy."
    ),
    ("trajectory", "step_image"): (
        "the learned step size of the inner student's image branch: it starts at "
        "method.lr_teacher, moves at method.lr_lr and is clamped at method.min_step_size, so its "
        "scale is the config's (a flat line at the clamp: the matching pushed it down)."
    ),
    ("trajectory", "step_text"): "the same learned step size for the text branch.",
    ("student", "loss"): (
        "each evaluation student's training loss on the distilled set. InfoNCE starts near "
        "ln(batch) (ln 100 = 4.6 for 100 pairs) and with few pairs falls close to 0 as the "
        "student memorises the set, which alone says nothing about recall. LoRS's weighted BCE "
        "uses its learned similarity S unclamped (as LoRS does): while S stays in [0, 1] it is "
        "positive, where S leaves [0, 1] it has no floor and can fall far below 0."
    ),
    ("expert", "loss"): (
        "an expert's InfoNCE on real training batches: ln(batch) at chance (4.85 for 128); the "
        "fall is the real-data learning whose parameters the synthetic set is matched to."
    ),
    ("forgetting", "loss"): (
        "the forgetting coreset's student's InfoNCE on real batches, ln(batch) at chance; its "
        "per-pair retrieval events, not this value, pick the coreset."
    ),
}
FAMILY_SCOPE = {
    "covmatch": "covmatch",
    "trajectory": "trajectory",
    "lors": "trajectory",
    "mdw": "trajectory",
}
SCOPES = {
    "forgetting student": "forgetting",
    "experts": "expert",
    "dual-track experts": "expert",
    "evaluation students": "student",
    "evaluation students (trained together)": "student",
}


@dataclass
class Figure:
    title: str
    png: bytes
    text: str  # what the figure shows, in words (alt text, and the peak of a check)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (term, TERM_NOTES' note)


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


def _panel(
    ax, title: str, lines: dict[str, Series], references: dict[str, float] | None = None
) -> str:
    """Draw `lines` (label -> series) into one panel, a check with its `references` (label ->
    r_mean) as dashed lines; returns a sentence about it."""
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
        for (label, value), color in zip(
            (references or {}).items(), REFERENCE_COLORS, strict=False
        ):
            ax.axhline(
                value, linestyle="--", linewidth=1, color=color, label=f"{label}: {value:.1f}"
            )
        if references:
            shown = ", ".join(f"{k} {v:.1f}" for k, v in references.items())
            text += (
                f"; dashed: test r_mean of {shown} (val and test r_mean differ in scale when the "
                "splits differ in size: compare the dashed lines with each other)"
            )
    elif values.min() > 0 and values.max() / values.min() > 50:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if 1 < len(lines) <= 8 or (check and references):
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


def term_notes(title: str, keys: list[str], family: str | None) -> list[tuple[str, str]]:
    """TERM_NOTES' note for each plotted term of the figure `title` that has one."""
    scope = FAMILY_SCOPE.get(family or "") if title == METHOD_TITLE else SCOPES.get(title)
    return [(k, TERM_NOTES[(scope, k)]) for k in keys if (scope, k) in TERM_NOTES]


def figures(
    series: dict[str, dict[str, Series]],
    family: str | None = None,
    references: dict[str, float] | None = None,
) -> list[Figure]:
    """One figure per group of streams present, in page order; `family` (the run's method
    family) picks the notes of the method's terms, `references` (label -> test r_mean) are
    drawn on the method's val checks."""
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
        refs = references if title == METHOD_TITLE else None
        texts = [
            _panel(ax, key, lines, refs)
            for ax, (key, lines) in zip(axes.flat, panels.items(), strict=False)
        ]
        for ax in list(axes.flat)[len(panels) :]:
            ax.set_visible(False)
        fig.tight_layout()
        buffer = stdio.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)
        notes = term_notes(title, list(panels), family)
        out.append(Figure(title, buffer.getvalue(), "; ".join(texts), notes))
    return out
