"""Peak memory of DPO on the CPU: full fine-tuning against LoRA and activation checkpointing.

The same ``dppo train --method dpo`` command on a Qwen2-shaped model of 4 layers, width
``--width`` (default 1024, MLP 2.75x, 32k vocabulary, tied embeddings, random weights, fp32: 79M
parameters, so that weights, gradients and AdamW's moments weigh beside the activations), on the
pairs of ``train_cpu.py`` (lengths x ``--scale``), 8 pairs per optimizer step in one micro-batch
(``--max-tokens-per-batch`` large enough for the whole step), AdamW; the reference log-probs
cached by a first run. Each variant is its own process, which imports peft first whatever the
variant (peft's import alone adds ~185 MiB of resident memory: every baseline carries it), with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set; its peak resident
size (``ru_maxrss`` from ``wait4``) and the mean step time after the first are reported, with the
ratios to full fine-tuning.

    python benchmarks/memory_cpu.py [--steps 4] [--scale 1.0] [--lora-r 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import cpu_name, setup  # noqa: E402
from train_cpu import model_config  # noqa: E402

VARIANTS = {
    "full": [],
    "full + checkpointing": ["--gradient-checkpointing"],
    "lora": ["--lora-r", "{r}", "--no-merge"],
    "lora + checkpointing": ["--lora-r", "{r}", "--no-merge", "--gradient-checkpointing"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--scale", type=float, default=0.5)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dppo-mem-bench-") as tmp:
        work = Path(tmp)
        config = model_config()
        config.hidden_size, config.intermediate_size = a.width, int(2.75 * a.width) // 64 * 64
        config.num_attention_heads, config.num_key_value_heads = max(1, a.width // 64), max(1, a.width // 256)
        env = setup(work, 8 * a.steps, a.scale, config, int(1024 * a.scale))
        # glibc keeps freed heap blocks resident (the peak would show the allocator's history, not the
        # run's live memory): large tensors go through mmap, which returns them to the system on free
        penv = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "MALLOC_MMAP_THRESHOLD_": "65536"}
        base = [sys.executable, "-c", "import sys, peft; from dppo.cli.main import app; app(sys.argv[1:])", "train",
                "--method", "dpo", "--data", env["shards"], "--init", env["init"], "--batch-size", "8", "--grad-accum", "1",
                "--max-tokens-per-batch", "65536", "--warmup-steps", "0", "--lr", "1e-5", "--save-every", "0", "--no-progress"]
        subprocess.run([*base, "--out", str(work / "warm"), "--max-steps", "1"], env=penv, check=True,
                       capture_output=True)  # the reference cache
        rows = []
        for name, extra in VARIANTS.items():
            out = work / name.replace(" ", "").replace("+", "_")
            cmd = [*base, "--out", str(out), "--max-steps", str(a.steps), *[x.format(r=a.lora_r) for x in extra]]
            # ru_maxrss is per child only through wait4: run it under a fresh Popen (communicate reaps it otherwise)
            proc = subprocess.Popen(cmd, env=penv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            err = proc.stderr.read()
            _, status, usage = os.wait4(proc.pid, 0)
            if status != 0:
                raise SystemExit(f"{name} failed:\n{err[-3000:]}")
            metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
            step_s = sum(m["step_s"] for m in metrics[1:]) / max(1, len(metrics) - 1)
            rows.append({"variant": name, "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "s_per_step": round(step_s, 3)})
            print(json.dumps(rows[-1]), flush=True)
    full = rows[0]
    print(f"\nCPU: {cpu_name()} x{os.cpu_count()}; DPO, width {a.width}, 8 pairs per step in one micro-batch, "
          f"scale {a.scale}, LoRA r {a.lora_r}")
    print(f"{'variant':24}{'peak RSS MiB':>14}{'/ full':>9}{'s/step':>9}{'/ full':>9}")
    for r in rows:
        print(f"{r['variant']:24}{r['peak_rss_mib']:>14.1f}{r['peak_rss_mib'] / full['peak_rss_mib']:>9.2f}"
              f"{r['s_per_step']:>9.3f}{r['s_per_step'] / full['s_per_step']:>9.2f}")
    if a.out:
        a.out.write_text(json.dumps({"cpu": cpu_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
