"""DPO training throughput on the CPU: dppo against TRL's DPOTrainer, same model, same pairs, one run.

Model: Qwen2-shaped, 4 layers, width 256, 32k vocabulary, random weights, fp32. Data: synthetic
UltraFeedback-like pairs (the lognormal lengths of ``../shared/bench/trl_anchor.py``, scaled by
``--scale`` together with the maximum length 1024) through a word-level tokenizer whose ids are
identical in dppo's shards and in TRL's own tokenization. 8 pairs per optimizer step, beta 0.01.

    python benchmarks/train_cpu.py [--steps 4] [--warmup 1] [--scale 0.5] [--rounds 1] [--variants ...]

Variants, each in its own subprocess (the first ``--warmup`` steps are not timed):
  ours_dpo           dppo DPO; its reference pass (cold cache) is timed and counted per pair
  ours_unll          dppo unll (y_gen, quadratic weight, policy vote: y_gen skipped where f(r) = 0)
  ours_unll_noskip   the same with --no-skip-ygen (every y_gen forwarded)
  ours_step_ratio    dpo, unll and unll --no-skip-ygen steps alternating in one process: median ratios
  trl_no_ckpt        TRL, online reference model, no gradient checkpointing
  trl_precompute     TRL, reference log-probs precomputed before training (pass not counted)
  trl_default        TRL defaults (gradient checkpointing on)
Prints one JSON line per variant and round, then the ratios (each variant's fastest round; wall and CPU time).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import OURS, TRL, cpu_name, drive, run_variant_from_argv, setup, summarize  # noqa: E402

DEFAULT = ("ours_dpo", "ours_unll", "ours_unll_noskip", "ours_step_ratio", "trl_no_ckpt", "trl_precompute")


def model_config():
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=32768, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=4096)


def main() -> None:
    if run_variant_from_argv(sys.argv):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    parser.add_argument("--batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--scale", type=float, default=0.5, help="scale of the lengths and of max_length (1024)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions; the fastest is kept")
    parser.add_argument("--variants", default=",".join(DEFAULT), help=f"comma-separated, from {OURS + TRL}")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(OURS + TRL):
        parser.error(f"unknown variants {sorted(set(variants) - set(OURS + TRL))}")

    import torch

    with tempfile.TemporaryDirectory(prefix="dppo_bench_") as tmp:
        max_len = round(1024 * args.scale)
        env = setup(Path(tmp), args.batch * (args.warmup + args.steps), args.scale, model_config(), max_len)
        print(json.dumps({"setup": {"model": "qwen2 4 layers x 256, vocab 32768, fp32", "scale": args.scale,
                                    "max_len": max_len, "batch": args.batch, "threads": args.threads or torch.get_num_threads(),
                                    "cpu": cpu_name(), "torch": torch.__version__}}), flush=True)
        results = drive(__file__, variants, env, args.batch, args.steps, args.warmup, args.rounds, args.threads)
    print(json.dumps({"summary": summarize(results)}), flush=True)


if __name__ == "__main__":
    main()
