"""PNG figures of an evaluation (matplotlib, Agg backend, no global pyplot state).

* ``plot_win_rates``: win rate per model against the baseline, with 95% intervals (1.96 standard
  errors) and the 0.5 line (the paper's Fig. 3A).
* ``plot_reward_differences``: the distribution of per-prompt reward differences, model minus
  baseline, one histogram per model (the paper's Fig. 3B).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["plot_win_rates", "plot_reward_differences"]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def plot_win_rates(rows: Sequence[Mapping[str, object]], path: str | Path, baseline: str = "baseline") -> Path:
    """Bars of ``row["win_rate"]`` with ``1.96 * row["se"]`` error bars, labelled by ``row["model"]``."""
    path = Path(path)
    names = [str(r["model"]) for r in rows]
    rates = [float(r["win_rate"]) if r["win_rate"] is not None else float("nan") for r in rows]  # type: ignore[arg-type]
    errors = [1.96 * float(r["se"]) if r.get("se") is not None else 0.0 for r in rows]  # type: ignore[arg-type]
    fig = _figure(max(4.0, 1.1 * len(rows) + 2), 3.6)
    ax = fig.add_subplot()
    xs = range(len(rows))
    ax.bar(xs, rates, yerr=errors, capsize=4, color="#4C72B0")
    for x, rate, err in zip(xs, rates, errors, strict=True):
        if rate == rate:
            ax.text(x, min(rate + err + 0.02, 0.99), f"{rate:.3f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(list(xs), names, rotation=20 if len(rows) > 3 else 0, ha="right" if len(rows) > 3 else "center")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("win rate (ties count 1/2)")
    ax.set_title(f"Win rate against {baseline} (95% intervals)")
    fig.tight_layout()
    fig.savefig(path)
    return path


def plot_reward_differences(diffs: Mapping[str, Sequence[float]], path: str | Path, baseline: str = "baseline") -> Path:
    """Histograms of reward(model) - reward(baseline) per prompt, one per model."""
    import numpy as np

    path = Path(path)
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot()
    values = [np.asarray(v, dtype=float) for v in diffs.values() if len(v)]
    if values:
        lo = min(float(v.min()) for v in values)
        hi = max(float(v.max()) for v in values)
        if lo == hi:
            lo, hi = lo - 1, hi + 1
        bins = np.linspace(lo, hi, 41)
        # line styles and widths differ, so a series equal to another stays visible under it
        styles = ["-", "--", ":", "-."]
        shown = [(name, v) for name, v in diffs.items() if len(v)]
        for k, (name, v) in enumerate(shown):
            ax.hist(np.asarray(v, dtype=float), bins=bins, histtype="step", linestyle=styles[k % len(styles)],
                    linewidth=2.6 - 1.6 * k / max(1, len(shown) - 1), label=f"{name} (n={len(v)})")
        ax.legend(fontsize=8)
    ax.axvline(0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel(f"reward(model) - reward({baseline})")
    ax.set_ylabel("prompts")
    ax.set_title("Distribution of reward differences")
    fig.tight_layout()
    fig.savefig(path)
    return path
