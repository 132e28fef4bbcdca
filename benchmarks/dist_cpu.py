"""One process against two gloo ranks on this CPU, and the one-process path before and after the
distributed trainer: the same ``dppo train`` command, the same model, pairs and global batch.

Model and data: those of ``train_cpu.py`` (Qwen2-shaped, 4 layers, width 256, 32k vocabulary, random
weights, fp32; synthetic UltraFeedback-like pairs with y_gen at ``--scale``). 8 pairs per optimizer
step, the reference log-probs cached by the first run (its pass is outside the steps' times).

Variants, each a ``dppo train`` subprocess, ``--rounds`` times interleaved:
  before      one process, the code at ``--before REV`` (a git worktree; the Rust engine is unchanged)
  one         one process, this tree (all cores)
  fsdp2       ``torchrun --standalone --nproc-per-node 2``, ``--parallel fsdp``, one thread per rank
  ddp2        the same with ``--parallel ddp``
  fsdp1       ``torchrun --nproc-per-node 1 ... --parallel fsdp``: FSDP2's overhead on one device
  ddp1        the same with ``--parallel ddp``

On a GPU (``benchmarks/gpu/check.sh`` runs ``--variants one,fsdp1 --model qwen2.5-0.5b``) every
variant trains on CUDA in bf16 (dppo's defaults there).

Reported per variant (best round): seconds per optimizer step (mean over the steps after
``--warmup``, from metrics.jsonl) and the whole command's wall time; then the ratios to ``one``.

    python benchmarks/dist_cpu.py [--methods dpo,unll] [--steps 6] [--warmup 1] [--rounds 2] [--before 3010ae6]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench_common import cpu_name, setup  # noqa: E402
from train_cpu import model_config  # noqa: E402

VARIANTS = ("before", "one", "fsdp2", "ddp2", "fsdp1", "ddp1")


def qwen05_config():
    """Qwen2.5-0.5B's shape (its published config.json), random weights."""
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=4096)


def worktree(rev: str, where: Path) -> Path:
    """``rev`` checked out at ``where`` with this tree's compiled engine beside its Python package."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev], check=True,
                   capture_output=True)
    native = next((ROOT / "python" / "dppo").glob("_native*.so"))
    shutil.copy(native, where / "python" / "dppo" / native.name)
    return where


def this_tree() -> str | None:
    """This tree's python/ when it holds a compiled engine (a source checkout); else None: the
    installed dppo (the GPU check installs the carried wheel)."""
    return str(ROOT / "python") if list((ROOT / "python" / "dppo").glob("_native*.so")) else None


def command(variant: str, method: str, env: dict, out: Path, steps: int) -> tuple[list[str], dict[str, str]]:
    data = env["shards"] if method == "dpo" else env["shards_ygen"]
    args = ["train", "--method", method, "--data", data, "--init", env["init"], "--out", str(out), "--overwrite",
            "--batch-size", "8", "--grad-accum", "1", "--max-steps", str(steps), "--warmup-steps", "0",
            "--save-every", "0", "--no-progress"] + (["--max-tokens-per-batch", str(env["budget"])] if env.get("budget") else [])
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base["TOKENIZERS_PARALLELISM"] = "false"
    if variant in ("before", "one"):
        py = env["before_python"] if variant == "before" else this_tree()
        return [sys.executable, "-m", "dppo", *args], {**base, "PYTHONPATH": os.pathsep.join(filter(None, [py, base.get("PYTHONPATH")]))}
    parallel, ranks = variant[:-1], int(variant[-1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "dppo",
           *args, "--parallel", parallel]
    threads = max(1, (os.cpu_count() or 2) // ranks)
    return cmd, {**base, "PYTHONPATH": os.pathsep.join(filter(None, [this_tree(), base.get("PYTHONPATH")])),
                 "OMP_NUM_THREADS": str(threads)}


def run(variant: str, method: str, env: dict, work: Path, steps: int, warmup: int) -> dict:
    out = work / f"run_{variant}_{method}"
    cmd, penv = command(variant, method, env, out, steps)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=penv, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{variant} {method} failed:\n{proc.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = metrics[warmup:]
    return {"variant": variant, "method": method, "s_per_step": round(float(np.mean([m["step_s"] for m in steady])), 4),
            "pairs_per_s": round(8 / float(np.mean([m["step_s"] for m in steady])), 3), "command_wall_s": round(wall, 1),
            "final_loss": metrics[-1]["loss"], "load_avg": round(os.getloadavg()[0], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dpo,unll")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--before", default="3010ae6", help="the revision of the one-process baseline")
    parser.add_argument("--variants", default="before,one,fsdp2,ddp2", help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--model", default="small", choices=("small", "qwen2.5-0.5b"),
                        help="small: train_cpu.py's 4-layer model; qwen2.5-0.5b: that shape, random weights")
    parser.add_argument("--max-tokens-per-batch", type=int, default=None,
                        help="the same token budget for every variant (default: each version's own estimate)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    with tempfile.TemporaryDirectory(prefix="dppo-dist-bench-") as tmp:
        work = Path(tmp)
        config = model_config() if args.model == "small" else qwen05_config()
        env = setup(work, 8 * (args.steps + 1), args.scale, config, int(1024 * args.scale))
        env["budget"] = args.max_tokens_per_batch
        if "before" in variants:
            env["before_python"] = str(worktree(args.before, work / "before") / "python")
        try:
            for method in args.methods.split(",") if "before" in variants else ():
                run("one", method, env, work, 1, 0)  # the reference cache first (else the first run makes it)
            results: dict[tuple[str, str], list[dict]] = {}
            for r in range(args.rounds):
                for method in args.methods.split(","):
                    for v in variants:
                        res = {**run(v, method, env, work, args.steps, args.warmup), "round": r}
                        print(json.dumps(res), flush=True)
                        results.setdefault((v, method), []).append(res)
        finally:
            if "before" in variants:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "before")],
                               capture_output=True)
    best = {k: min(rs, key=lambda x: x["s_per_step"]) for k, rs in results.items()}
    import torch

    where = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {cpu_name()} x{os.cpu_count()}"
    print(f"\n{where}; model {args.model}; {args.steps - args.warmup} timed steps of 8 pairs, best of {args.rounds}")
    print(f"{'method':8}{'variant':10}{'s/step':>10}{'pairs/s':>10}{'vs one':>10}{'command s':>12}")
    summary = {}
    for (v, method), res in sorted(best.items(), key=lambda kv: (kv[0][1], VARIANTS.index(kv[0][0]))):
        one = best.get(("one", method))
        ratio = res["s_per_step"] / one["s_per_step"] if one else float("nan")
        summary[f"{method}: {v} s/step / one"] = round(ratio, 3)
        print(f"{method:8}{v:10}{res['s_per_step']:>10.3f}{res['pairs_per_s']:>10.2f}{ratio:>10.3f}{res['command_wall_s']:>12.1f}")
    print(json.dumps({"ratios": summary, "device": where, "model": args.model}))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpu": cpu_name(), "cores": os.cpu_count(), "best": [best[k] for k in best],
                                        "ratios": summary}, indent=1))


if __name__ == "__main__":
    main()
