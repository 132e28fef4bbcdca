"""How the demo's comparison moves when the learning rate is one value for every method instead of
each method's choice from the validation grid (world version 3 tunes it, docs/demo.md). A
sensitivity check beside `dppo demo`, not a tuning step: each method's main knob is still chosen
on the validation prompts, and the table is judged on the same held-out test prompts, so picking
the best of these rates would be tuning on the test set.

    dppo demo --out runs/demo                                  # once: the world, SFT and y_gen
    python experiments/demo_lr_sensitivity.py --from runs/demo --lrs 2e-5 6e-5

Each rate reuses the finished demo's world, shards, SFT model and y_gen (copied) and retrains every
preference method for every seed; prints win rate vs SFT (mean over seeds) per method and rate.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="src", required=True, help="a finished `dppo demo` folder")
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-5, 6e-5])
    p.add_argument("--out", default="bench-out/demo-lr")
    a = p.parse_args()

    from dppo.demo.pipeline import FULL, run_demo
    from rich.console import Console

    src = Path(a.src)
    base = json.loads((src / "results.json").read_text())
    def frozen(v):
        return tuple(frozen(x) for x in v) if isinstance(v, list) else v

    settings = replace(FULL, **{k: frozen(v) for k, v in base["settings"].items()})
    tables: dict = {"tuned": base["table"]}
    for lr in a.lrs:
        out = Path(a.out) / f"lr{lr:g}"
        if not (out / "results.json").exists():
            out.mkdir(parents=True, exist_ok=True)
            for part in ("world", "shards", "base", "cache"):
                if not (out / part).exists():
                    shutil.copytree(src / part, out / part)
        res = run_demo(out, settings=replace(settings, tune_lrs=(lr,)), console=Console(stderr=True), show_progress=False)
        tables[lr] = res["table"]
    methods = [row["method"] for row in base["table"] if row["win_rate"] is not None]
    rates = ["tuned", *sorted(k for k in tables if k != "tuned")]
    print("| method | " + " | ".join(lr if lr == "tuned" else f"lr {lr:g}" for lr in rates) + " |")
    print("| --- |" + " --- |" * len(rates))
    for m in methods:
        cells = []
        for lr in rates:
            row = next((r for r in tables[lr] if r["method"] == m), None)
            cells.append("-" if row is None or row["win_rate"] is None else
                         f"{row['win_rate']:.3f} ± {row['se'] or 0:.3f} ({row['mean_judge_score']:.2f})")
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
