"""``dppo demo``: the whole pipeline on the built-in task world."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def demo_cmd(
    out: Annotated[Path, typer.Option("--out", help="Folder for the world, shards, runs, evaluations, results and figures.")] = Path("demo-out"),
    seeds: Annotated[Optional[int], typer.Option("--seeds", min=1, help="Training seeds (default 3; 1 with --quick).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=0, help="Processes for the stages that do not depend on each other, one thread each (default: one per CPU core, at most 8; 0 where CUDA is present): 0 runs every stage in this process.")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="A smaller world, one seed, fewer steps and one online round of unll (about a minute on an idle 2-core CPU).")] = False,
) -> None:
    """Make the demo world, then prep, SFT, y_gen, prep with y_gen, tune and train every method (online rounds with the demo's judge included), evaluate against SFT; print the table and write results.md, results.json and the figures."""
    from dppo.demo.pipeline import run_demo

    run_demo(out, quick=quick, seeds=seeds, workers=workers)
