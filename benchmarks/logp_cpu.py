"""Packed + chunked log-probs against the padded, full-logits way, forward + backward, on the CPU.

Model: Qwen2-shaped, 4 layers, width 256, 32k vocabulary, random weights. Data: 8 preference pairs
with UltraFeedback-like lognormal lengths (prompt median ~100, responses ~250), i.e. 16 sequences.

    python benchmarks/logp_cpu.py [--repeats 5] [--threads N]

Each variant runs in its own subprocess so that its peak RSS is its own. Prints one JSON line per
variant: tokens/s (real, non-pad tokens through forward + backward), seconds per step, peak RSS,
and peak RSS above the RSS right after the model was built.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.append(str(Path(__file__).resolve().parents[1] / "python"))  # an installed dppo (a wheel) comes first

VARIANTS = ("padded_full_logits", "packed_chunked")


def config() -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=32768,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
    )


def pairs(n_pairs: int = 8, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt, response) sequences: each pair's chosen and rejected share the prompt."""
    rng = np.random.default_rng(seed)

    def length(median: float, cap: int) -> int:
        return int(np.clip(rng.lognormal(np.log(median), 0.6), 4, cap))

    seqs = []
    for _ in range(n_pairs):
        prompt = rng.integers(0, 32768, length(100, 512))
        for _ in range(2):
            seqs.append((prompt, rng.integers(0, 32768, length(250, 768))))
    return seqs


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def padded_step(model, seqs) -> torch.Tensor:
    """What a padded trainer does: right-pad, full [B, L, V] logits, log_softmax, mask, sum."""
    longest = max(len(p) + len(r) for p, r in seqs)
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    attention = torch.zeros_like(ids)
    counted = torch.zeros(len(seqs), longest, dtype=torch.bool)
    for i, (p, r) in enumerate(seqs):
        ids[i, : len(p) + len(r)] = torch.from_numpy(np.concatenate([p, r]))
        attention[i, : len(p) + len(r)] = 1
        counted[i, len(p) : len(p) + len(r)] = True
    logits = model(ids, attention_mask=attention, use_cache=False).logits[:, :-1].float()
    logps = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None])[..., 0]
    return (logps * counted[:, 1:]).sum(-1)


def run_variant(name: str, repeats: int) -> dict:
    from dppo.modeling import PackedBatch, load_model, sequence_logps

    torch.manual_seed(0)
    seqs = pairs()
    tokens = sum(len(p) + len(r) for p, r in seqs)
    attn = "sdpa" if name == "padded_full_logits" else "dppo_packed"
    model = load_model(config(), dtype="fp32", device="cpu", attn=attn).train()
    base = rss_mib()
    if name == "packed_chunked":
        batch = PackedBatch.from_sequences(seqs)

        def step():
            return sequence_logps(model, batch, chunk_size=1024).sums
    else:

        def step():
            return padded_step(model, seqs)

    times = []
    for i in range(repeats + 1):  # the first step warms up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step().sum().backward()
        if i:
            times.append(time.perf_counter() - start)
    seconds = float(np.median(times))
    return {
        "variant": name,
        "sequences": len(seqs),
        "tokens": tokens,
        "s_per_step": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds),
        "peak_rss_mib": round(peak_rss_mib()),
        "peak_above_model_mib": round(peak_rss_mib() - base),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.repeats)), flush=True)
        return
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", name, "--repeats", str(args.repeats)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
