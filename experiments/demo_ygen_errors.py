"""What mistakes does the demo's SFT model make in its own greedy answers (y_gen), and do the pairs'
rejected answers show them? Reads a finished demo folder; trains and generates nothing.

For every training prompt it classifies y_gen against the exact answer (exact; list kinds: cut
short at the end, first item missing, right items in the wrong order, same length with wrong
items, longer, shorter otherwise; number kinds: off by d), per task kind, and counts how often
y_gen and the rejected answers show the demonstrator's habits (the last item overlooked on long
inputs, count one short, a forgotten carry) where those habits can apply.

    dppo demo --out runs/demo
    python experiments/demo_ygen_errors.py --from runs/demo
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def classify(task, response: str) -> str:
    items, answer = response.split(), list(task.answer_items)
    if response.strip() == task.answer:
        return "exact"
    if task.kind in ("sort", "reverse", "spell"):
        if len(items) < len(answer) and items == answer[: len(items)]:
            return "cut short at the end"
        if items == answer[1:]:
            return "first item missing"
        if sorted(items) == sorted(answer):
            return "right items, wrong order"
        if len(items) == len(answer):
            return "same length, wrong items"
        return "longer" if len(items) > len(answer) else "shorter, otherwise"
    if items and items[0].isdigit():
        d = int(items[0]) - int(answer[0])
        return f"off by {d:+d}" if abs(d) <= 20 else "another number"
    return "no number"


def shows_habit(task, response: str) -> bool | None:
    """True/False where one of the demonstrator's habits can apply to the task, else None."""
    from dppo.demo.generators import carries, is_long

    r = response.strip()
    if task.kind == "add":
        return (r == str(int(task.answer) - 10 * carries(task))) if carries(task) else None
    if not is_long(task):
        return None
    if task.kind in ("sort", "reverse", "spell"):
        return r == " ".join(task.answer_items[:-1])
    if task.kind == "count":
        return r == str(len(task.items) - 1)
    return r == str(max(int(x) for x in task.items[:-1])) and r != task.answer  # max


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="demo", required=True, help="a finished `dppo demo` folder")
    p.add_argument("--json", default=None, help="also write the counts here")
    args = p.parse_args()

    import polars as pl

    from dppo.demo.tasks import parse_prompt

    demo = Path(args.demo)
    ygen = pl.read_parquet(demo / "base" / "ygen.parquet")
    pairs = pl.read_parquet(demo / "world" / "prefs_train.parquet")
    kinds: dict[str, Counter] = {}
    habit = {"y_gen": [0, 0], "rejected": [0, 0]}
    for prompt, response in zip(ygen["prompt"].to_list(), ygen["response"].to_list()):
        task = parse_prompt(prompt)
        kinds.setdefault(task.kind, Counter())[classify(task, response)] += 1
        h = shows_habit(task, response)
        if h is not None:
            habit["y_gen"][0] += 1
            habit["y_gen"][1] += h
    for prompt, rejected in zip(pairs["prompt"].to_list(), pairs["rejected"].to_list()):
        h = shows_habit(parse_prompt(prompt), rejected[-1]["content"])
        if h is not None:
            habit["rejected"][0] += 1
            habit["rejected"][1] += h

    print(f"y_gen of {ygen.height} training prompts ({demo}):")
    for kind in sorted(kinds):
        n = sum(kinds[kind].values())
        top = ", ".join(f"{cat} {c}" for cat, c in kinds[kind].most_common(4))
        print(f"  {kind:8s} {n:4d}: {top}")
    for who, (applies, shown) in habit.items():
        print(f"the demonstrator's habits where they can apply: {who} shows them on {shown} of {applies} "
              f"({shown / max(applies, 1):.1%})")
    if args.json:
        Path(args.json).write_text(json.dumps({"kinds": {k: dict(v) for k, v in kinds.items()}, "habits": habit}, indent=2))


if __name__ == "__main__":
    main()
