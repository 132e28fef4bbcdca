"""The step time of every loss relative to DPO's, and DPO's step before and after TRL's pair losses.

Model and pairs of ``train_cpu.py`` (4 layers, width 256, 32k vocabulary, lengths x0.5), 8 pairs a
step, fp32 on the CPU.

1. **methods**: one process, one model, the same pairs; each round runs one step of every method in
   turn (what ``train()``'s step does: the step-context pass where the loss has one, the packed
   forward, the loss and its reduction, backward, clip, AdamW at lr 0), so a machine whose speed
   drifts affects all alike. Reported: each method's median step over DPO's.
2. **before/after** (``--before REV``): ``dppo train --method dpo`` at ``REV`` (a git worktree; the
   engine unchanged) and in this tree, each in its own process, rounds interleaved; the mean step of
   each run after the first, the best round of each: this tree's over REV's.

    python benchmarks/losses_cpu.py [--steps 3] [--warmup 1] [--before 79904bb] [--rounds 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_common import cpu_name, setup  # noqa: E402
from train_cpu import model_config  # noqa: E402

METHODS = ("dpo", "simpo", "minll", "unll", "conll", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "bco_pair",
           "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "orpo",
           "dpo+sft", "dpo+bco_pair+sft", "ipo+unll", "orpo+unll")
EXTRA = {"bco_pair+running": ("bco_pair", {"bco_running_mean": True}), "robust": ("robust", {"label_smoothing": 0.1})}


def method_table(env: dict, batch: int, steps: int, warmup: int) -> dict[str, dict[str, float]]:
    import torch

    from dppo.data import open_shards
    from dppo.distributed import SINGLE
    from dppo.modeling import load_model
    from dppo.train.config import load_config
    from dppo.train.loop import make_optimizer
    from dppo.train.refcache import reference_logps
    from dppo.train.registry import LOSSES
    from dppo.train.step import StepInputs, counted_tokens, forward_logps, step_context, with_context

    device = torch.device("cpu")
    shards = open_shards(env["shards_ygen"])
    n = min(len(shards), batch * (warmup + steps))
    model = load_model(env["init"], dtype="fp32")
    ref = reference_logps(env["init"], shards, np.arange(n), load=lambda: model, need_ygen=True, precision="fp32",
                          autocast=contextlib.nullcontext)
    optimizer = make_optimizer(load_config(None, method="dpo", data="d", init="i", out="o", lr=0.0), model)
    lengths = shards.lengths()
    arms = {}
    for name in (*METHODS, *EXTRA):
        method, opts = EXTRA.get(name, (name, {}))
        cfg = load_config(None, method=method, data="d", init="i", out="o", **opts)
        spec, loss_cfg = LOSSES[method], cfg.loss_config()
        arms[name] = (loss_cfg, spec, StepInputs.of(cfg, model, shards, loss_cfg, spec, ref if spec.needs_reference else None,
                                                    device), {})
    times: dict[str, list[float]] = {k: [] for k in arms}
    params = list(model.parameters())
    for k in range(warmup + steps):
        ids = np.arange(k * batch, (k + 1) * batch) % n
        pos = np.arange(len(ids))
        for name, (loss_cfg, spec, inputs, state) in arms.items():
            t = time.perf_counter()

            def no_grad(x, inputs=inputs):
                with torch.no_grad():
                    return forward_logps(inputs, x)

            context, new_state = step_context(no_grad, spec, loss_cfg, ids, [pos], SINGLE, state)
            logps = forward_logps(inputs, ids)
            out = spec(loss_cfg, with_context(logps, context, pos))
            w = torch.as_tensor(spec.step_weights(counted_tokens(lengths, ids)), dtype=torch.float32)
            spec.weighted(out, w).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()  # lr 0: the full update's work, the same model for every arm
            optimizer.zero_grad(set_to_none=True)
            state.clear()
            state.update(new_state)
            if k >= warmup:
                times[name].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {k: {"s_per_step": round(v, 4), "over_dpo": round(v / med["dpo"], 3)} for k, v in med.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method (table) / per run (before/after)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--scale", type=float, default=0.5)
    parser.add_argument("--before", default="79904bb", help="the revision before TRL's pair losses ('' to skip)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved before/after rounds")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-table", action="store_true", help="only DPO's step before and after")
    args = parser.parse_args()
    import torch

    from dist_cpu import run, worktree

    where = f"CPU: {cpu_name()} x{os.cpu_count()}, torch threads {torch.get_num_threads()}"
    with tempfile.TemporaryDirectory(prefix="dppo-losses-bench-") as tmp:
        work = Path(tmp)
        env = setup(work, args.batch * (args.steps + args.warmup + 1), args.scale, model_config(), int(1024 * args.scale))
        table = {} if args.no_table else method_table(env, args.batch, args.steps, args.warmup)
        print(f"\n{where}; {args.steps} timed steps of {args.batch} pairs after {args.warmup}, median step")
        print(f"{'method':20}{'s/step':>10}{'/ dpo':>8}")
        for k, v in table.items():
            print(f"{k:20}{v['s_per_step']:>10.3f}{v['over_dpo']:>8.3f}")
        before_after = {}
        if args.before:
            import subprocess

            env["budget"] = None
            env["before_python"] = str(worktree(args.before, work / "before") / "python")
            try:
                run("one", "dpo", env, work, 1, 0)  # the reference cache first
                results: dict[str, list[dict]] = {}
                for r in range(args.rounds):
                    for v in ("before", "one"):
                        res = {**run(v, "dpo", env, work, args.steps + args.warmup, args.warmup), "round": r}
                        print(json.dumps(res), flush=True)
                        results.setdefault(v, []).append(res)
            finally:
                subprocess.run(["git", "-C", str(HERE.parent), "worktree", "remove", "--force", str(work / "before")],
                               capture_output=True)
            best = {v: min(rs, key=lambda x: x["s_per_step"]) for v, rs in results.items()}
            before_after = {"before_rev": args.before, "before_s_per_step": best["before"]["s_per_step"],
                            "after_s_per_step": best["one"]["s_per_step"],
                            "after_over_before": round(best["one"]["s_per_step"] / best["before"]["s_per_step"], 3)}
            print(json.dumps(before_after))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": where, "batch": args.batch, "steps": args.steps, "scale": args.scale,
                                        "methods": table, "dpo_before_after": before_after}, indent=1))


if __name__ == "__main__":
    main()
