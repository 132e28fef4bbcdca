"""Sampling K responses per prompt on the CPU (an online round's sampling stage): ``dppo``'s
decoder, ``Decoder.run(samples=K)``, against ``transformers``' ``generate(do_sample=True,
num_return_sequences=K)``.

Model and prompts: those of ``gen_cpu.py`` (Qwen2-shaped, 4 layers, width 256, 32k vocabulary,
random weights, fp32; UltraFeedback-like lognormal prompt lengths, median ~100 tokens). Both sides
sample at the same temperature and nucleus, decode the same number of sequences at once
(``--batch``; ``transformers`` gets ``--batch / K`` prompts per call, left-padded, each expanded to
K sequences by ``num_return_sequences``) and stop on the same stop ids (``gen_cpu.stop_set``:
responses end after varied lengths, mean about ``--new`` / 3).

    python benchmarks/sample_cpu.py [--prompts 32] [--k 4] [--batch 64] [--new 128] [--rounds 2] [--threads N]

The sides alternate ``--rounds`` times in one process; each side's best round counts. The outputs
are samples, so the two sides make different tokens: each side's tokens/s is its own tokens
(stop tokens included, padding not) over its own time. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.append(str(Path(__file__).resolve().parents[1] / "python"))  # an installed dppo (a wheel) comes first

from gen_cpu import config, prompts, stop_set  # noqa: E402

from dppo.generate.decoding import Decoder, SamplingConfig  # noqa: E402


def hf_sample(model, data, k, batch, new, stop, temperature, top_p, seed) -> list[list[int]]:
    """``generate(do_sample=True, num_return_sequences=k)`` on consecutive left-padded batches of
    ``batch // k`` prompts; each sequence's ids up to and including its stop."""
    torch.manual_seed(seed)
    per = max(1, batch // k)
    out = []
    for s in range(0, len(data), per):
        chunk = data[s : s + per]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(chunk):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        gen = model.generate(
            ids, attention_mask=mask, max_new_tokens=new, do_sample=True, temperature=temperature, top_p=top_p,
            top_k=None, num_return_sequences=k, eos_token_id=stop or None, pad_token_id=0,
        )[:, width:].tolist()
        for row in gen:
            for t, tok in enumerate(row):
                if tok in stop:
                    row = row[: t + 1]
                    break
            out.append(row)
    return out


def dppo_sample(model, data, k, batch, new, stop, temperature, top_p, seed) -> list[list[int]]:
    out = []
    sampling = SamplingConfig(max_new_tokens=new, temperature=temperature, top_p=top_p, seed=seed)
    for done in Decoder(model, stop, engine="dppo").run(data, sampling, batch_size=batch, samples=k):
        out += [c.token_ids + ([c.stop_token] if c.stop_token is not None else []) for c in done]
    return out


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config()).eval()
    data = prompts(args.prompts)
    stop = stop_set(args.new)
    times: dict[str, list[float]] = {"hf": [], "dppo": []}
    made: dict[str, int] = {}
    lengths: dict[str, list[int]] = {}
    with torch.inference_mode():
        model.generate(torch.tensor([data[0][:8]]), max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        for r in range(args.rounds):
            for name, fn in (("hf", hf_sample), ("dppo", dppo_sample)):
                t = time.perf_counter()
                out = fn(model, data, args.k, args.batch, args.new, stop, args.temperature, args.top_p, r)
                times[name].append(time.perf_counter() - t)
                assert len(out) == len(data) * args.k
                made[name], lengths[name] = sum(map(len, out)), [len(x) for x in out]
    tps = {n: made[n] / min(times[n]) for n in times}
    print(json.dumps({
        "prompts": len(data), "k": args.k, "sequences": len(data) * args.k, "batch_sequences": args.batch,
        "max_new_tokens": args.new, "temperature": args.temperature, "top_p": args.top_p,
        "sampled_tokens": made, "response_len_mean": {n: round(float(np.mean(v)), 1) for n, v in lengths.items()},
        "seconds_best": {n: round(min(v), 2) for n, v in times.items()},
        "hf_generate_tokens_per_s": round(tps["hf"], 1), "dppo_tokens_per_s": round(tps["dppo"], 1),
        "ratio": round(tps["dppo"] / tps["hf"], 2),
        "threads": torch.get_num_threads(), "cpu": cpu_name(), "torch": torch.__version__,
        "transformers": transformers.__version__,
    }), flush=True)


if __name__ == "__main__":
    main()
