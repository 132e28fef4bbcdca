"""The memory plan (``dppo train --plan``) of three Qwen2.5 sizes on 1, 8 and 16 GPUs, and on one GPU
with activation checkpointing and LoRA.

The shapes are Qwen2.5's published ``config.json`` values, written out here so that nothing is
downloaded; the models are built on the meta device (no memory). Prints a Markdown table of GiB
per rank: bf16 compute with fp32 master weights, AdamW, FSDP2 on more than one GPU, 8,192 tokens
per micro-batch. Run: ``python benchmarks/memory_plan.py``.
"""

from __future__ import annotations

from transformers import Qwen2Config

from dppo.train.lora import lora_param_count
from dppo.train.memory import param_counts, plan_memory

QWEN25 = {  # hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
    "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 151936, True),
    "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 152064, False),
    "Qwen2.5-72B": (8192, 29568, 80, 64, 8, 152064, False),
}
WORLDS = (1, 8, 16)
TOKENS = 8192


def main() -> None:
    print(f"GiB per rank; bf16 compute, fp32 master weights and gradients, AdamW, {TOKENS:,} tokens per micro-batch; "
          "FSDP2 on 8 and 16 GPUs")
    print()
    print("| model | parameters | " + " | ".join(f"{w} GPU{'s' if w > 1 else ''}" for w in WORLDS) + " |")
    print("|---|---:|" + "---:|" * len(WORLDS))
    for name, (h, i, n, heads, kv, vocab, tied) in QWEN25.items():
        cfg = Qwen2Config(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                          num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied)
        shape = param_counts(cfg)
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
    for name, (h, i, n, heads, kv, vocab, tied) in QWEN25.items():
        cfg = Qwen2Config(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                          num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied)
        shape, lora = param_counts(cfg), lora_param_count(cfg, 16)
        full = plan_memory(shape, precision="bf16", tokens=TOKENS)
        ckpt = plan_memory(shape, precision="bf16", tokens=TOKENS, checkpointing=True)
        small = plan_memory(shape, precision="bf16", tokens=TOKENS, checkpointing=True, lora_params=lora, base_bytes=2)
        print(f"| {name} | {full.total / 2**30:,.1f} | {ckpt.total / 2**30:,.1f} | {small.total / 2**30:,.1f} | "
              f"{lora / 1e6:.1f}M |")


if __name__ == "__main__":
    main()
