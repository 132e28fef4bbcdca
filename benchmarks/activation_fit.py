"""The measurements behind ``dppo.train.memory``'s activation coefficients, against the plan.

Runs ``tests/test_memory.py``'s measurement (one packed forward + backward of a Qwen2-shaped model
with random weights, fp32, 4,096 tokens in 8 sequences of 128 prompt + 384 response tokens; the
rise of the peak resident size over the state before it, with ``MALLOC_MMAP_THRESHOLD_=65536`` so
that freed tensors leave the resident set) for four shapes, with and without activation
checkpointing, and prints each measured peak beside ``activation_bytes``' prediction.

    python benchmarks/activation_fit.py          # ~2 minutes on 2 cores
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((512, 1408, 4), (512, 1408, 2), (256, 1408, 4), (512, 704, 4))  # hidden, intermediate, layers
TOKENS = 4096


def main() -> None:
    from transformers import Qwen2Config

    from dppo.train.memory import activation_bytes, param_counts

    spec = importlib.util.spec_from_file_location("test_memory", ROOT / "tests" / "test_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    default = f"H, I, L, V, T = 512, 1408, 4, 8192, {TOKENS}"
    assert default in mod.MEASURE
    print("| hidden | intermediate | layers | checkpointing | measured MB | plan MB | plan / measured |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for h, i, n in SHAPES:
        for ckpt in (False, True):
            src = mod.MEASURE.replace(default, f"H, I, L, V, T = {h}, {i}, {n}, 8192, {TOKENS}")
            env = {**os.environ, "CKPT": "1" if ckpt else "0", "MALLOC_MMAP_THRESHOLD_": "65536"}
            out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, check=True, env=env)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            cfg = Qwen2Config(vocab_size=8192, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                              num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
            plan = activation_bytes(param_counts(cfg), got["tokens"], "fp32", keep_probs_bytes=1 << 30,
                                    checkpointing=ckpt)
            print(f"| {h} | {i} | {n} | {'yes' if ckpt else 'no'} | {got['act'] / 1e6:,.1f} | {plan / 1e6:,.1f} | "
                  f"{plan / got['act']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
