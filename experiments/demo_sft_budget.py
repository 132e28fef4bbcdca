"""How good an SFT model does the demo world's SFT stage make? The judge's mean score of the SFT
model's greedy answers to held-out prompts, overall and per task kind, for one SFT budget.

This is how the demo's SFT settings were chosen (docs/demo.md, "Revisions"): by the SFT model's own
score, before and without any preference method.

    python experiments/demo_sft_budget.py --n-sft 48000 --epochs 2 --batch 32            # the demo's
    python experiments/demo_sft_budget.py --n-sft 8000 --epochs 4 --batch 32 --split qwen2 --vocab 1024
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-out/demo-sft")
    p.add_argument("--n-sft", type=int, default=48000)
    p.add_argument("--n-test", type=int, default=300)
    p.add_argument("--split", choices=("word", "qwen2"), default="word", help="tokenizer pre-split: the demo's or Qwen2's")
    p.add_argument("--vocab", type=int, default=None, help="tokenizer vocabulary bound (default: the world's)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()

    import polars as pl
    import torch
    from dppo.demo.judge import judge
    from dppo.demo.pipeline import FULL, make_init_model, sft_config
    from dppo.demo.tasks import parse_prompt
    from dppo.demo.world import VOCAB_SIZE, _tokenizer_texts, build_world, write_world
    from dppo.generate import DecodeConfig, GenConfig, SamplingConfig, generate
    from dppo.data.prep import PrepConfig, prepare
    from dppo.synthetic import QWEN2_PATTERN, make_tokenizer
    from dppo.train import train
    from rich.console import Console

    if a.threads:
        torch.set_num_threads(a.threads)
    # the demo's own settings with this budget: the same model construction and SFT run as `dppo demo`
    s = replace(FULL, n_sft=a.n_sft, layers=a.layers, hidden=a.hidden, heads=a.heads, kv_heads=a.kv_heads,
                intermediate=a.intermediate, sft_epochs=a.epochs, sft_batch=a.batch, sft_lr=a.lr)
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    vocab_bound = a.vocab or VOCAB_SIZE
    paths = write_world(out / "world", n_sft=a.n_sft, n_pairs=50, n_test=a.n_test, seed=0, vocab_size=vocab_bound)
    if a.split == "qwen2":  # the same rows, tokenizer retrained with Qwen2's pre-split
        shutil.rmtree(paths["tokenizer"])
        world = build_world(n_sft=a.n_sft, n_pairs=50, n_test=a.n_test, seed=0)
        make_tokenizer(paths["tokenizer"], _tokenizer_texts(world), vocab_size=vocab_bound, pattern=QWEN2_PATTERN)
    quiet = Console(quiet=True)
    prepare(PrepConfig("sft", str(paths["sft"]), str(paths["tokenizer"]), out / "shards"), console=quiet, show_progress=False)
    make_init_model(out / "init", paths["tokenizer"], s)
    t1 = time.perf_counter()
    train(sft_config(s, out / "shards", out / "init", out / "sft"), console=quiet)
    t2 = time.perf_counter()
    generate(GenConfig(model=str(out / "sft" / "model"), data=str(paths["prefs_test"]), out=out / "answers.parquet",
                       decode=DecodeConfig(sampling=SamplingConfig(max_new_tokens=48), batch_size=64)),
             console=quiet, show_progress=False)
    by_kind: dict[str, list[float]] = defaultdict(list)
    for row in pl.read_parquet(out / "answers.parquet").iter_rows(named=True):
        by_kind[parse_prompt(row["prompt"]).kind].append(judge(row["prompt"], row["response"]))
    scores = [x for v in by_kind.values() for x in v]
    log = [json.loads(line) for line in (out / "sft" / "metrics.jsonl").read_text().splitlines()]
    result = {
        "settings": vars(a),
        "steps": len(log), "examples_seen": sum(r["examples"] for r in log), "mean_score": round(sum(scores) / len(scores), 2),
        "exact": round(sum(s == 10 for s in scores) / len(scores), 3),
        "by_kind": {k: round(sum(v) / len(v), 2) for k, v in sorted(by_kind.items())},
        "seconds": {"world_prep_init": round(t1 - t0, 1), "sft": round(t2 - t1, 1)},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
