"""Greedy generation on one GPU: ``dppo``'s decoder against ``transformers``' ``generate``.

Run it in the same device call as ``../shared/bench/gen_anchor.py`` (the anchor: ``generate``,
greedy, batch 128, 128-token prompts, 256 new tokens, bf16, Qwen2.5-0.5B shape, random weights:
1,660 generated tokens/s on an H200 when measured there); the target is 10x that.

    python benchmarks/gen_gpu.py [--workloads anchor,max_batch,eos] [--no-hf]
    SMALL=1 python benchmarks/gen_gpu.py      # a tiny model on the CPU: checks the script only

Workloads (same model, bf16, random weights, so ``generate`` runs on identical inputs):
* ``anchor``: the anchor's shape exactly: 128 prompts of 128 random ids, 256 new tokens, no stop
  token, one batch of 128. ``dppo`` runs it twice in one process: the first run includes capturing
  the CUDA graph, the second reuses it (both printed).
* ``max_batch``: the anchor's prompts and budget at batch 256, 512, ... as long as it fits in memory
  and a run stays under ~25 s: the best tokens/s and its batch (target: 30x the anchor's batch-128
  figure), and the fraction of the memory-bandwidth limit reached (reading every weight once per
  decode step plus each row's KV cache, at the device's peak bandwidth).
* ``eos``: 512 prompts with UltraFeedback-like lognormal lengths (median ~100), 256 new tokens,
  a stop set covering 3/256 of the vocabulary (responses end after ~85 tokens on average, ~5%
  reach 256), batch 128: continuous batching against ``generate`` on consecutive batches.

Prints one JSON line per (workload, side): generated tokens/s (stop tokens counted, padding not),
wall seconds, and for ``dppo`` the ratio to ``generate`` measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.append(str(Path(__file__).resolve().parents[1] / "python"))  # an installed dppo (a wheel) comes first

from dppo.generate.decoding import Decoder, SamplingConfig  # noqa: E402
from gen_cpu import hf_generate  # noqa: E402  (benchmarks/, the script's own folder)

SMALL = os.environ.get("SMALL") == "1"
VOCAB = 151936


def config() -> transformers.Qwen2Config:
    if SMALL:
        return transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                    num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def dppo_generate(decoder: Decoder, data: list[list[int]], batch: int, new: int) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in data]
    for done in decoder.run(data, SamplingConfig(max_new_tokens=new), batch_size=batch):
        for c in done:
            out[c.index] = c.token_ids + ([c.stop_token] if c.stop_token is not None else [])
    return out


# Peak memory bandwidth, bytes/s, of GPUs by name (the decode step is bandwidth-bound).
_BANDWIDTH = {"H200": 4.8e12, "GH200": 4.0e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "H800": 3.35e12, "B200": 8.0e12,
              "A100-SXM4-80GB": 2.04e12, "A100 80GB PCIe": 1.94e12, "A100": 1.555e12, "L40S": 0.864e12, "L40": 0.864e12,
              "L4": 0.3e12, "A10G": 0.6e12, "A10": 0.6e12}


def bandwidth() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((bw for key, bw in _BANDWIDTH.items() if key in name), None)


def bandwidth_limit(model, batch: int, prompt_len: int, new: int) -> dict:
    """Tokens/s if every decode step only read the weights once and each row's KV cache (mean context
    prompt + new/2), at the device's peak bandwidth: the ceiling of batched greedy decoding."""
    c = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied tensors once
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_per_token = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 2  # bf16 K and V
    step_bytes = weight_bytes + batch * (prompt_len + new / 2) * kv_per_token
    bw = bandwidth()
    return {"weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token, "step_bytes": round(step_bytes),
            "peak_bandwidth": bw, "limit_tokens_per_s": round(bw / step_bytes * batch) if bw else None}


def timed(fn, *args):
    sync()
    t = time.perf_counter()
    out = fn(*args)
    sync()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="anchor,eos")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' generate (use the anchor's figure)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config()).to(dev, dtype=torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    rng = np.random.default_rng(0)
    batch, new = (2, 8) if SMALL else (128, 256)
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "transformers": transformers.__version__}
    with torch.inference_mode():
        model.generate(torch.zeros(1, 16, dtype=torch.long, device=dev), max_new_tokens=4, do_sample=False, pad_token_id=0)
        for workload in args.workloads.split(","):
            if workload == "max_batch":
                max_batch(model, info, new)
                continue
            if workload == "anchor":
                data = [row.tolist() for row in torch.randint(0, 150000, (batch, 128), generator=torch.Generator().manual_seed(0))]
                stop: list[int] = []
            else:
                n = 8 if SMALL else 512
                lengths = np.clip(rng.lognormal(np.log(100), 0.6, n), 4, 512).astype(int)
                data = [rng.integers(0, 150000, int(k)).tolist() for k in lengths]
                stop = sorted(rng.choice(150000, size=round(150000 * 3 / new), replace=False).tolist())
            decoder = Decoder(model, stop, engine="dppo")
            runs = [timed(dppo_generate, decoder, data, batch, new) for _ in range(2)]
            made = sum(map(len, runs[-1][0]))
            hf_tps = None
            if not args.no_hf:
                hf_out, hf_wall = timed(hf_generate, model, data, batch, new, stop)
                hf_tps = sum(map(len, hf_out)) / hf_wall
                same = sum(a == b for a, b in zip(hf_out, runs[-1][0], strict=True)) / len(data)
                print(json.dumps({"workload": workload, "side": "hf_generate", "batch": batch, "new_tokens": new,
                                  "prompts": len(data), "gen_tokens_per_s": round(hf_tps), "wall_s": round(hf_wall, 2),
                                  **info}), flush=True)
            for k, (out, wall) in enumerate(runs):
                tps = sum(map(len, out)) / wall
                row = {"workload": workload, "side": "dppo", "run": "first (graph capture included)" if k == 0 else "second",
                       "batch": batch, "new_tokens": new, "prompts": len(data), "generated_tokens": made,
                       "gen_tokens_per_s": round(tps), "wall_s": round(wall, 2),
                       "vs_hf_same_process": round(tps / hf_tps, 2) if hf_tps else None,
                       "vs_anchor_1660": round(tps / 1660, 1)}
                if workload == "anchor":
                    lim = bandwidth_limit(model, batch, 128, new)
                    row["bandwidth_limit"] = lim
                    row["fraction_of_bandwidth_limit"] = round(tps / lim["limit_tokens_per_s"], 3) if lim["limit_tokens_per_s"] else None
                if not args.no_hf:
                    row["rows_identical_to_hf_bf16"] = round(same, 3)
                print(json.dumps({**row, **info}), flush=True)
            decoder = None  # frees its caches and graphs
            if dev == "cuda":
                torch.cuda.empty_cache()


def max_batch(model, info: dict, new: int) -> None:
    """The anchor's prompts at growing batches while they fit and stay quick; one line per batch."""
    sizes = [2, 4] if SMALL else [256, 512, 1024, 2048, 4096, 8192]
    best = None
    for batch in sizes:
        data = [row.tolist() for row in torch.randint(0, 150000, (batch, 128), generator=torch.Generator().manual_seed(1))]
        decoder = Decoder(model, [], engine="dppo")
        try:
            dppo_generate(decoder, data[: min(batch, 8)], batch, 4)  # capture the graphs outside the timing
            out, wall = timed(dppo_generate, decoder, data, batch, new)
        except torch.cuda.OutOfMemoryError:
            print(json.dumps({"workload": "max_batch", "batch": batch, "error": "out of memory", **info}), flush=True)
            break
        finally:
            decoder = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        tps = sum(map(len, out)) / wall
        lim = bandwidth_limit(model, batch, 128, new)
        row = {"workload": "max_batch", "side": "dppo", "batch": batch, "new_tokens": new, "gen_tokens_per_s": round(tps),
               "wall_s": round(wall, 2), "vs_anchor_1660": round(tps / 1660, 1),
               "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
               "fraction_of_bandwidth_limit": round(tps / lim["limit_tokens_per_s"], 3) if lim["limit_tokens_per_s"] else None,
               **info}
        print(json.dumps(row), flush=True)
        best = row if best is None or tps > best["gen_tokens_per_s"] else best
        if wall > 25:
            break
    if best is not None:
        print(json.dumps({**best, "workload": "max_batch_best"}), flush=True)


if __name__ == "__main__":
    main()
