"""``dppo plot RUN [RUN...]``: a run's training curves from its ``metrics.jsonl``, runs overlaid."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from dppo.errors import ConfigError

__all__ = ["FIGURES", "read_metrics", "plot_runs", "draw"]

FIGURES = {
    "loss": ("training loss", "loss", ["loss", "eval/loss"]),
    "rewards": ("implicit rewards (beta x log-ratio)", "reward", ["rewards/chosen", "rewards/rejected"]),
    "margins": ("reward margin (chosen - rejected)", "reward margin", ["rewards/margins"]),
    "accuracies": ("reward accuracy (share of pairs with a positive margin)", "accuracy", ["rewards/accuracies"]),
    "penalized": ("fraction of pairs whose y_gen term is active", "fraction", ["penalized"]),
    "lr": ("learning rate", "learning rate", ["lr"]),
}
"""One PNG per quantity: (title, y-axis label, metrics drawn). Metrics share a figure only when they
are the same quantity on the same scale (margins of about 1e-3 never share an axis with accuracies
from 0 to 1); a metric a run does not log is left out."""


def read_metrics(run: Path) -> list[dict]:
    """The records of ``RUN/metrics.jsonl`` (a line cut by a kill ends the list)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run}: no metrics.jsonl (not a `dppo train` run folder)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows


def plot_runs(runs: Sequence[Path], out: Path | None = None) -> list[Path]:
    """Write ``FIGURES`` for ``runs`` (overlaid: a line style per run, a marker per metric) into
    ``out`` (default ``RUNS[0]/plots``); returns the PNGs written."""
    if not runs:
        raise ConfigError("name at least one run folder")
    data = {Path(r): read_metrics(Path(r)) for r in runs}
    out = Path(out) if out is not None else Path(runs[0]) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    names = [r.name if r.name != "model" else r.parent.name for r in data]
    written = []
    for key in FIGURES:
        fig = draw(key, data, names)
        if fig is None:
            continue
        fig.savefig(out / f"{key}.png")
        written.append(out / f"{key}.png")
    if not written:
        raise ConfigError(f"{', '.join(map(str, runs))}: no metrics to draw")
    return written


def draw(key: str, data: dict[Path, list[dict]], names: Sequence[str]):
    """The figure of ``FIGURES[key]`` for the runs' records (a line style per run, a marker per
    metric), or None when no run logs its metrics."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    title, quantity, metrics = FIGURES[key]
    styles = ["-", "--", ":", "-."]
    fig = Figure(figsize=(6.0, 3.6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    drawn = 0
    for c, ((run, rows), name) in enumerate(zip(data.items(), names, strict=True)):
        for m, metric in enumerate(metrics):
            pts = [(r["step"], r[metric]) for r in rows if r.get(metric) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            # a line style and width per run, so that a run equal to another stays visible under it
            ax.plot(xs, ys, linestyle=styles[c % len(styles)], linewidth=2.6 - 1.6 * c / max(1, len(data) - 1),
                    color=f"C{(c * len(metrics) + m) % 10}", marker="os^D"[m % 4] if len(xs) < 30 else None,
                    markersize=4 - c % 2, label=f"{name}: {metric}" if len(metrics) > 1 or len(data) > 1 else metric)
            drawn += 1
    if not drawn:
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(quantity)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
