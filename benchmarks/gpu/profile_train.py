"""Where a dppo training step spends its time on this machine: torch.profiler over a few steps.

    python benchmarks/gpu/profile_train.py [--method dpo] [--steps 6] [--out DIR]
    SMALL=1 python benchmarks/gpu/profile_train.py      # a tiny model on the CPU: checks the script

The model and data are those of ``benchmarks/train_gpu.py`` (Qwen2.5-0.5B-shaped, 8 pairs, max
length 1024). Prints one JSON line (seconds per step of a plain run, how often each packed attention
kernel ran) and the profiler's tables by device time and by CPU time (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import setup  # noqa: E402
from train_gpu import SMALL, model_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="dpo")
    parser.add_argument("--steps", type=int, default=2 if SMALL else 6)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch
    from rich.console import Console
    from torch.profiler import ProfilerActivity, profile

    import dppo.modeling.attention as attention
    from dppo.train import train
    from dppo.train.config import load_config

    kernels: Counter[str] = Counter()
    for name in ("_varlen_attention", "_sdpa_loop_attention", "_dense_attention"):
        fn = getattr(attention, name)
        setattr(attention, name, lambda *a, _fn=fn, _name=name, **k: (kernels.update([_name]), _fn(*a, **k))[1])

    max_len, batch = (128, 2) if SMALL else (1024, 8)
    with tempfile.TemporaryDirectory(prefix="dppo_profile_") as tmp:
        env = setup(Path(tmp), batch * (args.steps + 3), max_len / 1024, model_config(), max_len)
        data = env["shards_ygen"] if args.method != "dpo" else env["shards"]

        def run(name: str, steps: int) -> list[dict]:
            cfg = load_config(None, method=args.method, data=data, init=env["init"], out=str(Path(tmp) / name),
                              overwrite=True, batch_size=batch, grad_accum=1, max_steps=steps, warmup_steps=0,
                              save_every=0, progress=False)
            train(cfg, console=Console(stderr=True, quiet=True))
            return [json.loads(line) for line in (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()]

        t = time.perf_counter()
        metrics = run("plain", args.steps)
        print(json.dumps({"profile": args.method, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                          "step_s": [round(m["step_s"], 4) for m in metrics], "tokens": [m["tokens"] for m in metrics],
                          "mfu": [m.get("mfu") for m in metrics], "kernels": dict(kernels),
                          "wall_s": round(time.perf_counter() - t, 1)}), flush=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with profile(activities=activities) as prof:
            run("profiled", 3)
    device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    tables = [prof.key_averages().table(sort_by=device_key, row_limit=30),
              prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)]
    for table in tables:
        print(table, flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile.txt").write_text("\n\n".join(tables))


if __name__ == "__main__":
    main()
