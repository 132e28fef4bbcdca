"""The memory plan (``dppo train --plan``) of three Qwen2.5 sizes on 1, 8 and 16 GPUs, and on one GPU
with activation checkpointing and LoRA.

The shapes are Qwen2.5's published ``config.json`` values, written out here so that nothing is
downloaded; the models are built on the meta device (no memory). Prints a Markdown table of GiB
per rank: bf16 compute with fp32 master weights, AdamW, FSDP2 on more than one GPU, 8,192 tokens
per micro-batch. Run: ``python benchmarks/memory_plan.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import QWEN25, qwen2_config  # noqa: E402

from dppo.train.lora import lora_param_count  # noqa: E402
from dppo.train.memory import param_counts, plan_memory  # noqa: E402

MODELS = ("Qwen2.5-0.5B", "Qwen2.5-7B", "Qwen2.5-72B")
WORLDS = (1, 8, 16)
TOKENS = 8192


def main() -> None:
    print(f"GiB per rank; bf16 compute, fp32 master weights and gradients, AdamW, {TOKENS:,} tokens per micro-batch; "
          "FSDP2 on 8 and 16 GPUs")
    print()
    print("| model | parameters | " + " | ".join(f"{w} GPU{'s' if w > 1 else ''}" for w in WORLDS) + " |")
    print("|---|---:|" + "---:|" * len(WORLDS))
    for name in MODELS:
        shape = param_counts(qwen2_config(QWEN25[name]))
        cells = []
        for w in WORLDS:
            plan = plan_memory(shape, world=w, parallel="fsdp" if w > 1 else "none", precision="bf16", tokens=TOKENS)
            act = next(v for k, v in plan.rows.items() if k.startswith("activations"))
            cells.append(f"{plan.total / 2**30:,.1f} (act. {act / 2**30:,.1f})")
        print(f"| {name} | {shape.params / 1e9:.2f}B | " + " | ".join(cells) + " |")
    print()
    print(f"One GPU, GiB: full fine-tuning, with activation checkpointing, and LoRA r 16 on every linear layer "
          f"(base frozen in bf16) with checkpointing; {TOKENS:,} tokens per micro-batch")
    print()
    print("| model | full | full + checkpointing | LoRA r 16 + checkpointing | LoRA parameters |")
    print("|---|---:|---:|---:|---:|")
    for name in MODELS:
        cfg = qwen2_config(QWEN25[name])
        shape, lora = param_counts(cfg), lora_param_count(cfg, 16)
        full = plan_memory(shape, precision="bf16", tokens=TOKENS)
        ckpt = plan_memory(shape, precision="bf16", tokens=TOKENS, checkpointing=True)
        small = plan_memory(shape, precision="bf16", tokens=TOKENS, checkpointing=True, lora_params=lora, base_bytes=2)
        print(f"| {name} | {full.total / 2**30:,.1f} | {ckpt.total / 2**30:,.1f} | {small.total / 2**30:,.1f} | "
              f"{lora / 1e6:.1f}M |")


if __name__ == "__main__":
    main()
