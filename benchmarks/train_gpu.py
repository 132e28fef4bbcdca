"""DPO training throughput on one GPU: dppo on a Qwen2.5-0.5B-shaped model (random weights).

The setting of ``../shared/bench/trl_anchor.py``: vocabulary 151,936, 24 layers, width 896, batch 8
pairs, max length 1024, UltraFeedback-like lognormal lengths, beta 0.01, bf16. Run it in the same
device call as the anchor (``bash .anchor/device_anchor.sh; python benchmarks/train_gpu.py``) and
compare the ratios: our DPO pairs/s with the reference pass counted (target: >= 2x TRL's fastest,
48.5 pairs/s on an H200), peak memory (target: <= half of TRL's 26.9 GiB), MFU, and unll's step
over DPO's (target: <= 1.35).

    python benchmarks/train_gpu.py [--steps 25] [--warmup 3] [--variants ours_dpo,ours_unll,...]
    SMALL=1 python benchmarks/train_gpu.py      # a tiny model on the CPU: checks the script itself

Variants run in their own subprocesses (see ``bench_common.py``): ``ours_dpo`` (reference pass timed
and counted per pair), ``ours_unll``, ``ours_unll_noskip``, ``ours_step_ratio`` (dpo / unll /
unll --no-skip-ygen steps alternating in one process: the median step ratios); TRL variants
(``trl_no_ckpt``, ``trl_precompute``, ``trl_default``) run too when TRL is installed and named.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import OURS, TRL, cpu_name, drive, run_variant_from_argv, setup, summarize  # noqa: E402

SMALL = os.environ.get("SMALL") == "1"


def model_config():
    from transformers import Qwen2Config

    if SMALL:
        return Qwen2Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def main() -> None:
    if run_variant_from_argv(sys.argv):
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2 if SMALL else 25, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=1 if SMALL else 3, help="untimed optimizer steps first")
    parser.add_argument("--batch", type=int, default=2 if SMALL else 8, help="pairs per optimizer step")
    parser.add_argument("--max-len", type=int, default=128 if SMALL else 1024)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--variants", default=",".join(OURS), help=f"comma-separated, from {OURS + TRL}")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(OURS + TRL):
        parser.error(f"unknown variants {sorted(set(variants) - set(OURS + TRL))}")

    import torch
    import transformers

    scale = args.max_len / 1024
    with tempfile.TemporaryDirectory(prefix="dppo_bench_") as tmp:
        env = setup(Path(tmp), args.batch * (args.warmup + args.steps), scale, model_config(), args.max_len)
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
        print(json.dumps({"setup": {"model": "tiny (SMALL=1)" if SMALL else "Qwen2.5-0.5B-shaped", "max_len": args.max_len,
                                    "batch": args.batch, "device": device, "torch": torch.__version__,
                                    "transformers": transformers.__version__}}), flush=True)
        results = drive(__file__, variants, env, args.batch, args.steps, args.warmup, args.rounds)
    print(json.dumps({"summary": summarize(results)}), flush=True)


if __name__ == "__main__":
    main()
