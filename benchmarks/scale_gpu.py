"""The largest Qwen2.5-shaped model (random weights) that `dppo train --method dpo` trains on one GPU,
in each of three modes: full fine-tuning, full + activation checkpointing, LoRA r 16 + checkpointing.

The workload of ``train_gpu.py`` and ``../shared/bench/trl_anchor.py``: 8 pairs per optimizer step,
UltraFeedback-like lengths (medians ~100 prompt / ~300 chosen / ~250 rejected tokens, max length
1024), bf16 compute (fp32 master weights for full fine-tuning; a frozen bf16 base under LoRA),
AdamW. Sizes are Qwen2.5's published shapes. Each trial is one ``python -m dppo train`` process
(`--max-steps warmup + steps`, `--no-merge` for LoRA) with a time limit; it succeeds when every step
ran, fails on CUDA's out-of-memory error (any other error is reported as such). Per mode the search
starts at the largest size ``dppo train --plan`` says fits and walks up while trials succeed and
down while they fail, so each reported size is bracketed by a failure above it (or is the
ladder's top). For every successful trial: pairs/s over the steps after the warm-up and the peak
memory the run logged (``peak_mem_gib`` in ``metrics.jsonl``).

    python benchmarks/scale_gpu.py [--modes full,full_ckpt,lora_ckpt] [--sizes 0.5B,1.5B,3B,7B,14B]
                                   [--steps 4] [--warmup 2] [--budget-s 480] [--work DIR]
    SMALL=1 python benchmarks/scale_gpu.py --memory-gib 0.6   # tiny shapes on the CPU: the script itself

Random-init models are written once per size in bf16 (14B: 28 GiB of disk), at most two at a time.
It needs its own device call: a 15-minute device budget holds either this or ``gpu/check.sh``.
Prints one JSON line per trial and a final ``{"scale": ...}`` summary.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import QWEN25, qwen2_config, setup  # noqa: E402

SMALL = os.environ.get("SMALL") == "1"
SIZES = {name.removeprefix("Qwen2.5-"): shape for name, shape in QWEN25.items() if name != "Qwen2.5-72B"}
TINY = {  # SMALL=1: the same search on shapes a CPU trains in seconds
    "t1": (64, 128, 2, 4, 2, 151936, True),
    "t2": (128, 256, 2, 4, 2, 151936, True),
    "t3": (256, 512, 2, 4, 2, 151936, True),
}
MODES = {
    "full": [],
    "full_ckpt": ["--gradient-checkpointing"],
    "lora_ckpt": ["--gradient-checkpointing", "--lora-r", "16", "--no-merge"],
}


def predicted_gib(shape: tuple, mode: str, tokens: int) -> float:
    """What ``dppo train --plan`` predicts for one GPU (GiB)."""
    from dppo.train.lora import lora_param_count
    from dppo.train.memory import param_counts, plan_memory

    cfg = qwen2_config(shape)
    kw = {"precision": "bf16", "tokens": tokens, "checkpointing": mode != "full"}
    if mode == "lora_ckpt":
        kw.update(lora_params=lora_param_count(cfg, 16), base_bytes=2)
    return plan_memory(param_counts(cfg), **kw).total / 2**30


class Inits:
    """Random-init model folders in bf16, one per size, at most ``keep`` on disk at a time."""

    def __init__(self, root: Path, tok: Path, keep: int = 2) -> None:
        self.root, self.tok, self.keep, self.made = root, tok, keep, {}

    def get(self, name: str, shape: tuple) -> tuple[Path, float]:
        if name in self.made:
            return self.made[name], 0.0
        while len(self.made) >= self.keep:
            shutil.rmtree(self.made.pop(next(iter(self.made))), ignore_errors=True)
        import torch
        from transformers import AutoModelForCausalLM

        t = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(qwen2_config(shape), dtype=torch.bfloat16)
        out = self.root / f"init-{name}"
        model.save_pretrained(out)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
        for f in self.tok.iterdir():
            shutil.copy(f, out / f.name)
        self.made[name] = out
        return out, time.perf_counter() - t


def trial(name: str, mode: str, init: Path, shards: str, work: Path, steps: int, warmup: int, limit: float) -> dict:
    out = work / f"run-{name}-{mode}"
    cmd = [sys.executable, "-m", "dppo", "train", "--method", "dpo", "--beta", "0.01", "--data", shards,
           "--init", str(init), "--out", str(out), "--overwrite", "--no-progress", "--batch-size", "8",
           "--grad-accum", "1", "--max-steps", str(warmup + steps), "--warmup-steps", "0", "--save-every", "0",
           "--lr", "1e-6", *MODES[mode]]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = None, e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    wall = time.perf_counter() - t
    row = {"size": name, "mode": mode, "wall_s": round(wall, 1)}
    metrics = out / "metrics.jsonl"
    steps_logged = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
    if rc == 0 and len(steps_logged) == warmup + steps:
        steady = steps_logged[warmup:]
        step_s = sum(m["step_s"] for m in steady) / len(steady)
        peaks = [m["peak_mem_gib"] for m in steps_logged if m.get("peak_mem_gib") is not None]
        row.update(ok=True, pairs_per_s=round(8 / step_s, 2), s_per_step=round(step_s, 3),
                   tokens_per_s=round(sum(m["tokens_per_s"] for m in steady) / len(steady)),
                   mfu=steady[-1].get("mfu"), peak_mem_gib=round(max(peaks), 2) if peaks else None)
    else:
        text = err or ""
        oom = "OutOfMemoryError" in text or "out of memory" in text.lower()
        row.update(ok=False, reason="out of memory" if oom else ("time limit" if rc is None else "error"),
                   last_line=(text.strip().splitlines() or [""])[-1][:300])
    shutil.rmtree(out, ignore_errors=True)
    return row


def search(sizes: list[str], plan: dict[str, float], memory: float, run, time_left) -> dict:
    """Start at the largest size the plan fits in ``memory``; walk up while ``run(size)["ok"]``, down
    while not, each size at most once, while ``time_left()``. The largest success, and what bounds it:
    the failure above it, the ladder's top, or the time budget."""
    fits = [i for i, s in enumerate(sizes) if plan[s] <= memory]
    i = fits[-1] if fits else 0
    tried: dict[int, dict] = {}
    while 0 <= i < len(sizes) and i not in tried and time_left():
        tried[i] = run(sizes[i])
        i = i + 1 if tried[i]["ok"] else i - 1
    ok = [k for k, r in tried.items() if r["ok"]]
    if not ok:
        return {"largest": None, "bounded_by": tried[min(tried)]["reason"] if tried else "no time for a trial"}
    best = max(ok)
    if best + 1 == len(sizes):
        bound = "the ladder's top"
    elif best + 1 in tried:
        bound = tried[best + 1]["reason"]
    else:
        bound = "not bracketed (time budget)"
    row = tried[best]
    return {"largest": sizes[best], "bounded_by": bound,
            **{k: row.get(k) for k in ("pairs_per_s", "peak_mem_gib", "plan_gib", "mfu")}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ladder = TINY if SMALL else SIZES
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--sizes", default=",".join(ladder), help=f"from {list(ladder)}, ascending")
    p.add_argument("--steps", type=int, default=2 if SMALL else 4, help="timed optimizer steps per trial")
    p.add_argument("--warmup", type=int, default=1 if SMALL else 2, help="untimed optimizer steps first")
    p.add_argument("--max-len", type=int, default=128 if SMALL else 1024)
    p.add_argument("--memory-gib", type=float, default=None, help="device memory for the plan (default: the GPU's)")
    p.add_argument("--trial-limit-s", type=float, default=240.0)
    p.add_argument("--budget-s", type=float, default=480.0, help="no new trial starts after this many seconds")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    a = p.parse_args()
    modes, sizes = a.modes.split(","), a.sizes.split(",")
    if set(modes) - set(MODES) or set(sizes) - set(ladder):
        p.error(f"modes from {list(MODES)}, sizes from {list(ladder)}")

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    memory = a.memory_gib or (torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None)
    if memory is None:
        p.error("no GPU here: pass --memory-gib (SMALL=1 runs the search on the CPU)")
    work = Path(a.work or tempfile.mkdtemp(prefix="dppo_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    # the data and its tokenizer (setup also saves a tiny model of the vocabulary, unused here)
    env = setup(work / "data", 8 * (a.warmup + a.steps), a.max_len / 1024, qwen2_config(TINY["t1"]), a.max_len)
    tokens = 2 * 8 * a.max_len  # the plan's micro-batch: 8 pairs, chosen + rejected, at most max_len each
    print(json.dumps({"setup": {"device": torch.cuda.get_device_name() if cuda else "cpu", "memory_gib": round(memory, 1),
                                "sizes": sizes, "modes": modes, "steps": a.steps, "warmup": a.warmup,
                                "max_len": a.max_len, "torch": torch.__version__}}), flush=True)
    inits = Inits(work, Path(env["tok"]))
    results: dict[str, dict] = {}
    for mode in modes:
        plan = {s: predicted_gib(ladder[s], mode, tokens) for s in sizes}

        def run(size: str, mode: str = mode, plan: dict = plan) -> dict:
            init, made_s = inits.get(size, ladder[size])
            row = trial(size, mode, init, env["shards"], work, a.steps, a.warmup, a.trial_limit_s)
            row.update(plan_gib=round(plan[size], 1), init_s=round(made_s, 1))
            print(json.dumps(row), flush=True)
            return row

        results[mode] = search(sizes, plan, memory, run, lambda: time.perf_counter() - t0 < a.budget_s)
    print(json.dumps({"scale": results, "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
