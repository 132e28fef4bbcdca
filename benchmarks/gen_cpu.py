"""Greedy generation on the CPU: ``dppo``'s decoder against ``transformers``' ``generate``.

Model: Qwen2-shaped, 4 layers, width 256, 32k vocabulary, random weights, fp32. Prompts:
UltraFeedback-like lognormal lengths (median ~100 tokens, capped at 512), random ids, in data order.
Both sides get the same prompts, the same batch size and the same stop token; ``transformers``
runs the way a user would call it: ``model.generate`` on consecutive batches, left-padded.

Two workloads:
* ``eos``: a set of stop ids (3/``--new`` of the vocabulary) ends responses after varied
  lengths (geometric, mean about ``--new``/3, ~5% reach ``--new``), as a real model's do.
* ``no_eos``: no stop token; every row generates exactly ``--new`` tokens (pure decode loop).

    python benchmarks/gen_cpu.py [--prompts 96] [--batch 32] [--new 128] [--rounds 2] [--threads N]

The two sides alternate ``--rounds`` times in one process (the machine may be shared, so each
side's best round is compared). Prints one JSON line per workload: generated tokens/s of both
(tokens actually produced, stop tokens included, padding not), their ratio, and whether the
outputs are token-identical.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.append(str(Path(__file__).resolve().parents[1] / "python"))  # an installed dppo (a wheel) comes first

from dppo.generate.decoding import Decoder, SamplingConfig  # noqa: E402


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
        initializer_range=0.1,  # at 0.02 a random model repeats one token forever
    )


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(100), 0.6, n), 4, 512).astype(int)
    return [rng.integers(0, 32768, int(k)).tolist() for k in lengths]


def hf_generate(model, data: list[list[int]], batch: int, new: int, stop: list[int]) -> list[list[int]]:
    """``generate`` on consecutive left-padded batches (on the model's device); each row's ids up to
    and including its stop. Shared with ``gen_gpu.py``."""
    dev = next(model.parameters()).device
    out = []
    for s in range(0, len(data), batch):
        chunk = data[s : s + batch]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(chunk):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        gen = model.generate(
            ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new, do_sample=False, eos_token_id=stop or None,
            pad_token_id=0,
        )[:, width:].tolist()
        for row in gen:
            for t, tok in enumerate(row):
                if tok in stop:
                    row = row[: t + 1]
                    break
            out.append(row)
    return out


def dppo_generate(model, data: list[list[int]], batch: int, new: int, stop: list[int]) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in data]
    decoder = Decoder(model, stop, engine="dppo")
    for done in decoder.run(data, SamplingConfig(max_new_tokens=new), batch_size=batch):
        for c in done:
            out[c.index] = c.token_ids + ([c.stop_token] if c.stop_token is not None else [])
    return out


def stop_set(new: int, vocab: int = 32768, seed: int = 1) -> list[int]:
    """Random stop ids covering 3/``new`` of the vocabulary: a random model's greedy tokens are
    spread over the vocabulary, so responses end after a geometric number of tokens with mean
    about ``new / 3`` (about 5% reach ``new``), like a real model's varied lengths."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(vocab, size=max(1, round(vocab * 3 / new)), replace=False).tolist())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workloads", default="eos,no_eos")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config()).eval()
    data = prompts(args.prompts)
    with torch.inference_mode():
        model.generate(torch.tensor([data[0][:8]]), max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        for workload in args.workloads.split(","):
            stop = stop_set(args.new) if workload == "eos" else []
            times: dict[str, list[float]] = {"hf": [], "dppo": []}
            outs = {}
            for _ in range(args.rounds):
                for name, fn in (("hf", hf_generate), ("dppo", dppo_generate)):
                    t = time.perf_counter()
                    outs[name] = fn(model, data, args.batch, args.new, stop)
                    times[name].append(time.perf_counter() - t)
            made = sum(map(len, outs["dppo"]))
            lengths = [len(r) for r in outs["dppo"]]
            hf_tps = made / min(times["hf"])
            ours_tps = made / min(times["dppo"])
            print(
                json.dumps(
                    {
                        "workload": workload,
                        "prompts": len(data),
                        "batch": args.batch,
                        "max_new_tokens": args.new,
                        "generated_tokens": made,
                        "response_len_mean": round(float(np.mean(lengths)), 1),
                        "response_len_median": float(np.median(lengths)),
                        "hf_generate_tokens_per_s": round(hf_tps, 1),
                        "dppo_tokens_per_s": round(ours_tps, 1),
                        "ratio": round(ours_tps / hf_tps, 2),
                        "round_ratios": [round(h / d, 2) for h, d in zip(times["hf"], times["dppo"], strict=True)],
                        "identical": outs["hf"] == outs["dppo"],
                        "threads": torch.get_num_threads(),
                        "torch": torch.__version__,
                        "transformers": transformers.__version__,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
