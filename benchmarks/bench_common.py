"""Shared machinery of the training benchmarks (``train_cpu.py``, ``train_gpu.py``).

* A word-level tokenizer (``t{i}`` -> id i) with ChatML specials and a Qwen-style chat template, so that
  ``dppo prep prefs`` and TRL (which applies the chat template itself) produce identical token ids.
* Synthetic UltraFeedback-like pairs: the lognormal lengths of ``../shared/bench/trl_anchor.py``
  (medians ~100 prompt / ~300 chosen / ~250 rejected and y_gen), times ``scale``.
* One function per side, each run in its own subprocess by :func:`drive` (clean memory, own peak):
  :func:`run_ours` (dppo's ``train()``, its reference pass timed and counted per pair) and
  :func:`run_trl` (TRL's ``DPOTrainer``, steps timed by a callback as in trl_anchor.py).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's published config.json shapes: hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings
QWEN25 = {
    "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, 151936, True),
    "Qwen2.5-1.5B": (1536, 8960, 28, 12, 2, 151936, True),
    "Qwen2.5-3B": (2048, 11008, 36, 16, 2, 151936, True),
    "Qwen2.5-7B": (3584, 18944, 28, 28, 4, 152064, False),
    "Qwen2.5-14B": (5120, 13824, 48, 40, 8, 152064, False),
    "Qwen2.5-32B": (5120, 27648, 64, 40, 8, 152064, False),
    "Qwen2.5-72B": (8192, 29568, 80, 64, 8, 152064, False),
}


def qwen2_config(shape: tuple) -> Any:
    """A ``Qwen2Config`` of a ``QWEN25``-style shape tuple (Qwen2.5's rope and norm settings)."""
    from transformers import Qwen2Config

    h, i, n, heads, kv, vocab, tied = shape
    return Qwen2Config(hidden_size=h, intermediate_size=i, num_hidden_layers=n, num_attention_heads=heads,
                       num_key_value_heads=kv, vocab_size=vocab, tie_word_embeddings=tied,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)
OURS = ("ours_dpo", "ours_unll", "ours_unll_noskip", "ours_step_ratio")
TRL = ("trl_no_ckpt", "trl_precompute", "trl_default")


# -- data -------------------------------------------------------------------------------------------


def word_tokenizer(out: Path, vocab: int) -> Path:
    """Save a word-level tokenizer (``t{i}`` -> i) with ChatML specials and a chat template into ``out``."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from dppo.synthetic import QWEN_STYLE_TEMPLATE

    words = {f"t{i}": i for i in range(vocab - len(SPECIALS))}
    for k, s in enumerate(SPECIALS):
        words[s] = vocab - len(SPECIALS) + k
    tok = Tokenizer(models.WordLevel(words, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = QWEN_STYLE_TEMPLATE
    hf.save_pretrained(out)
    return out


def synthetic_pairs(n: int, vocab: int, scale: float = 1.0, seed: int = 0) -> list[dict[str, Any]]:
    """UltraFeedback-binarized-schema rows plus a ``ygen`` text, lengths as in trl_anchor.py times ``scale``."""
    rng = np.random.default_rng(seed)

    def lengths(median: float, sigma: float, lo: float, hi: float) -> np.ndarray:
        x = np.exp(math.log(median * scale) + sigma * rng.standard_normal(n))
        return np.clip(np.round(x), max(1, round(lo * scale)), round(hi * scale)).astype(int)

    p, c, r, g = lengths(100, 0.9, 8, 600), lengths(300, 0.6, 4, 900), lengths(250, 0.7, 4, 900), lengths(250, 0.7, 4, 900)

    def text(k: int) -> str:
        return " ".join(f"t{i}" for i in rng.integers(1, vocab - len(SPECIALS), k))

    rows = []
    for i in range(n):
        prompt = text(p[i])
        user = {"role": "user", "content": prompt}
        rows.append({
            "prompt": prompt,
            "prompt_id": f"p{i:06d}",
            "chosen": [user, {"role": "assistant", "content": text(c[i])}],
            "rejected": [user, {"role": "assistant", "content": text(r[i])}],
            "ygen": text(g[i]),
        })
    return rows


def setup(work: Path, n_pairs: int, scale: float, config: Any, max_len: int) -> dict[str, Any]:
    """Tokenizer, initial model (random weights, saved), pairs (jsonl) and shards with and without y_gen."""
    import torch
    from transformers import AutoModelForCausalLM

    from dppo.data.prep import PrepConfig, prepare

    tok = word_tokenizer(work / "tok", config.vocab_size)
    torch.manual_seed(0)
    init = work / "init"
    AutoModelForCausalLM.from_config(config).save_pretrained(init)
    for f in tok.iterdir():
        shutil.copy(f, init / f.name)
    rows = synthetic_pairs(n_pairs, config.vocab_size, scale=scale)
    (work / "rows.json").write_text(json.dumps(rows))
    data = work / "data"
    data.mkdir()
    pairs, ygen = data / "pairs.jsonl", data / "ygen.jsonl"
    pairs.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "ygen"}) + "\n" for r in rows))
    ygen.write_text("".join(json.dumps({"prompt_id": r["prompt_id"], "response": r["ygen"]}) + "\n" for r in rows))
    # Prompts stay far below max_len - 21, so prep and TRL truncate alike (each response keeps its start).
    for name, extra in (("shards", {}), ("shards_ygen", {"ygen": ygen})):
        prepare(PrepConfig("prefs", str(pairs), str(tok), data / name, max_len=max_len, **extra), show_progress=False)
    return {"work": str(work), "init": str(init), "tok": str(tok), "max_len": max_len,
            "shards": str(data / "shards"), "shards_ygen": str(data / "shards_ygen")}


# -- one variant ------------------------------------------------------------------------------------


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_ours(variant: str, env: dict[str, Any], batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """dppo's ``train()`` for ``warmup + steps`` optimizer steps of ``batch`` pairs; the reference pass
    (cold cache) is timed on its own first, exactly as ``train()`` would run it, then found cached."""
    import torch
    from rich.console import Console

    from dppo.train.config import load_config
    from dppo.data import open_shards
    from dppo.modeling import load_model
    from dppo.train.refcache import model_fingerprint, reference_logps
    from dppo.train import token_budget, train

    cuda = torch.cuda.is_available()
    method = "dpo" if variant == "ours_dpo" else "unll"
    data = env["shards"] if method == "dpo" else env["shards_ygen"]
    out = Path(env["work"]) / f"run_{variant}"
    shards = open_shards(data)
    shutil.rmtree(Path(data) / "refcache", ignore_errors=True)
    cfg = load_config(None, method=method, data=data, init=env["init"], out=str(out), overwrite=True, batch_size=batch,
                      grad_accum=1, max_steps=warmup + steps, warmup_steps=0, save_every=0, progress=False,
                      skip_ygen=variant != "ours_unll_noskip")
    precision = "bf16" if cuda else "fp32"
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext
    n = min(len(shards), batch * (warmup + steps))
    model = load_model(cfg.ref, dtype="fp32")
    t = time.perf_counter()
    model_fingerprint(cfg.ref)
    fingerprint_s = time.perf_counter() - t
    _sync()
    t, cpu = time.perf_counter(), time.process_time()
    reference_logps(cfg.ref, shards, np.arange(n), load=lambda: model, need_ygen=False, precision=precision,
                    autocast=autocast, chunk_size=cfg.chunk_size,
                    batch_tokens=cfg.max_tokens_per_batch or token_budget(model, model.device, precision))
    _sync()
    # the forward pass itself: the fingerprint was taken (and is remembered per file) before the clock started
    ref_s = time.perf_counter() - t
    ref_cpu_s = time.process_time() - cpu
    model = None  # free it: train() loads its own
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    train(cfg, console=Console(stderr=True, quiet=True))
    wall = time.perf_counter() - t
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = metrics[warmup:]
    step_s = float(np.mean([m["step_s"] for m in steady]))
    step_cpu_s = float(np.mean([m["step_cpu_s"] for m in steady]))
    ref_per_step = ref_s / n * batch
    ref_cpu_per_step = ref_cpu_s / n * batch
    mfu = [m["mfu"] for m in steady if m.get("mfu") is not None]
    return {
        "variant": variant, "batch": batch, "steps": steps, "s_per_step": round(step_s, 4),
        "ref_pass_s": round(ref_s, 2), "ref_pairs": n, "ref_s_per_step": round(ref_per_step, 4),
        "fingerprint_s": round(fingerprint_s, 2),
        "pairs_per_s": round(batch / step_s, 3),
        "pairs_per_s_with_ref": round(batch / (step_s + ref_per_step), 3),
        "cpu_s_per_step": round(step_cpu_s, 4),
        "ref_cpu_s_per_step": round(ref_cpu_per_step, 4),
        "pairs_per_cpu_s_with_ref": round(batch / (step_cpu_s + ref_cpu_per_step), 3),
        "tokens_per_s": round(float(np.mean([m["tokens_per_s"] for m in steady]))),
        "mfu": round(float(np.mean(mfu)), 4) if mfu else None,
        "penalized": round(float(np.mean([m.get("penalized", 0.0) for m in steady])), 3),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "train_wall_s": round(wall, 1),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def run_step_ratio(variant: str, env: dict[str, Any], batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """unll's optimizer step over DPO's, measured step by step *alternately* in one process (same model,
    same pairs each round), so that a machine whose speed drifts affects both alike: the median ratio.

    Each step is what ``train()``'s loop does: ``forward_logps``, the loss, backward, clip, AdamW."""
    import torch

    from dppo.train.config import load_config
    from dppo.data import open_shards
    from dppo.train.losses import LOSSES
    from dppo.modeling import load_model
    from dppo.train.refcache import reference_logps
    from dppo.train.loop import make_optimizer
    from dppo.train.step import StepInputs, forward_logps

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext
    shards = open_shards(env["shards_ygen"])
    n = min(len(shards), batch * (warmup + steps))
    model = load_model(env["init"], dtype="fp32")
    ref = reference_logps(env["init"], shards, np.arange(n), load=lambda: model, need_ygen=False,
                          precision="bf16" if cuda else "fp32", autocast=autocast)
    optimizer = make_optimizer(load_config(None, method="dpo", data="d", init="i", out="o", lr=0.0), model)
    arms = {}
    for name, method, skip in (("dpo", "dpo", True), ("unll", "unll", True), ("unll_noskip", "unll", False)):
        cfg = load_config(None, method=method, data="d", init="i", out="o", skip_ygen=skip)
        arms[name] = (cfg.loss_config(), LOSSES[method],
                      StepInputs.of(cfg, model, shards, cfg.loss_config(), LOSSES[method], ref, device))
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in arms}
    params = [p for p in model.parameters()]
    for k in range(warmup + steps):
        ids = np.arange(k * batch, (k + 1) * batch) % n
        for name, (loss_cfg, objective, inputs) in arms.items():
            _sync()
            t, cpu = time.perf_counter(), time.process_time()
            with autocast():
                logps = forward_logps(inputs, ids)
            objective(loss_cfg, logps).loss.mean().backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()  # lr 0: the full update's work, the same model for every arm
            optimizer.zero_grad(set_to_none=True)
            _sync()
            if k >= warmup:
                times[name].append((time.perf_counter() - t, time.process_time() - cpu))
    med = {k: (float(np.median([w for w, _ in v])), float(np.median([c for _, c in v]))) for k, v in times.items()}
    return {"variant": variant, "batch": batch, "steps": steps,
            **{f"{k}_s_per_step": round(w, 4) for k, (w, _) in med.items()},
            **{f"{k}_cpu_s_per_step": round(c, 4) for k, (_, c) in med.items()},
            "unll_over_dpo": round(med["unll"][0] / med["dpo"][0], 3),
            "unll_noskip_over_dpo": round(med["unll_noskip"][0] / med["dpo"][0], 3),
            "cpu_unll_over_dpo": round(med["unll"][1] / med["dpo"][1], 3),
            "cpu_unll_noskip_over_dpo": round(med["unll_noskip"][1] / med["dpo"][1], 3),
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def run_trl(variant: str, env: dict[str, Any], batch: int, steps: int, warmup: int) -> dict[str, Any]:
    """TRL's DPOTrainer on the same pairs, as ``../shared/bench/trl_anchor.py`` runs it."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    cuda = torch.cuda.is_available()

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.cpu: list[float] = []
            self.t0 = self.c0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            _sync()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            _sync()
            self.times.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

    rows = json.loads((Path(env["work"]) / "rows.json").read_text())[: batch * (warmup + steps)]
    dataset = Dataset.from_dict({"prompt": [r["chosen"][:1] for r in rows], "chosen": [r["chosen"][1:] for r in rows],
                                 "rejected": [r["rejected"][1:] for r in rows]})
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(env["init"], dtype=dtype).to("cuda" if cuda else "cpu")
    tok = AutoTokenizer.from_pretrained(env["tok"])
    precompute = variant == "trl_precompute"
    cfg = DPOConfig(output_dir=str(Path(env["work"]) / "trl_out"), per_device_train_batch_size=batch,
                    gradient_accumulation_steps=1, max_steps=warmup + steps, logging_steps=1000, save_strategy="no",
                    report_to="none", bf16=cuda, gradient_checkpointing=variant == "trl_default",
                    max_length=env["max_len"], beta=0.01, learning_rate=1e-6, precompute_ref_log_probs=precompute,
                    use_cpu=not cuda, dataloader_drop_last=True, disable_tqdm=True)
    timer = StepTimer()
    ref = None if precompute else copy.deepcopy(model).eval()
    precompute_s = []  # TRL precomputes the reference log-probs inside DPOTrainer.__init__: time that call
    original = DPOTrainer._precompute_ref_logps

    def timed(self, *a, **kw):
        _sync()
        t, cpu = time.perf_counter(), time.process_time()
        result = original(self, *a, **kw)
        _sync()
        precompute_s.append((time.perf_counter() - t, time.process_time() - cpu))
        return result

    DPOTrainer._precompute_ref_logps = timed
    trainer = DPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=dataset, processing_class=tok, callbacks=[timer])
    td = trainer.train_dataset
    tokens = sum(min(len(a) + len(b), env["max_len"]) + min(len(a) + len(c), env["max_len"])
                 for a, b, c in zip(td["prompt_ids"], td["chosen_ids"], td["rejected_ids"], strict=True))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t
    steady = timer.times[warmup:]
    step_s = sum(steady) / len(steady)
    step_cpu_s = sum(timer.cpu[warmup:]) / len(steady)
    out = {"variant": variant, "batch": batch, "steps": steps, "s_per_step": round(step_s, 4),
           "pairs_per_s": round(batch / step_s, 3), "cpu_s_per_step": round(step_cpu_s, 4),
           "pairs_per_cpu_s": round(batch / step_cpu_s, 3), "tokens_per_s": round(tokens / (warmup + steps) / step_s),
           "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
           "train_wall_s": round(wall, 1), "device": torch.cuda.get_device_name() if cuda else "cpu"}
    if precompute:
        pre, pre_cpu = (sum(x) for x in zip(*precompute_s, strict=True))
        out["precompute_s"] = round(pre, 2)
        out["pairs_per_s_with_ref"] = round(batch / (step_s + pre / len(rows) * batch), 3)
        out["pairs_per_cpu_s_with_ref"] = round(batch / (step_cpu_s + pre_cpu / len(rows) * batch), 3)
    return out


# -- driver -----------------------------------------------------------------------------------------


def run_variant_from_argv(argv: list[str]) -> bool:
    """In a variant subprocess (``--variant V --env JSON ...``): run it, print its JSON line, return True."""
    if "--variant" not in argv:
        return False
    args = dict(zip(argv[1::2], argv[2::2]))
    if "--threads" in args:
        import torch

        torch.set_num_threads(int(args["--threads"]))
    variant, env = args["--variant"], json.loads(args["--env"])
    fn = run_step_ratio if variant == "ours_step_ratio" else run_ours if variant in OURS else run_trl
    print(json.dumps(fn(variant, env, int(args["--batch"]), int(args["--steps"]), int(args["--warmup"]))), flush=True)
    return True


def drive(script: str, variants: list[str], env: dict[str, Any], batch: int, steps: int, warmup: int,
          rounds: int = 1, threads: int | None = None) -> dict[str, list[dict[str, Any]]]:
    """Run each variant in its own subprocess, ``rounds`` times interleaved (ours and TRL alternate, so a
    machine whose load changes over time affects both alike); returns every round's result."""
    results: dict[str, list[dict[str, Any]]] = {}
    for r in range(rounds):
        for v in variants:
            cmd = [sys.executable, script, "--variant", v, "--env", json.dumps(env), "--batch", str(batch),
                   "--steps", str(steps), "--warmup", str(warmup)]
            if threads:
                cmd += ["--threads", str(threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if proc.returncode != 0:
                print(json.dumps({"variant": v, "round": r, "error": proc.stderr.strip().splitlines()[-3:]}), flush=True)
                continue
            result = {**json.loads(proc.stdout.strip().splitlines()[-1]), "round": r, "load_avg": _load()}
            print(json.dumps(result), flush=True)
            if "s_per_step" in result:
                results.setdefault(v, []).append(result)
    return results


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Our DPO pairs/s (reference pass counted) over each TRL variant's, and unll's step over DPO's, by
    wall-clock time and by CPU time (the fairer clock on a shared machine); each variant's best round."""
    out: dict[str, float] = {}
    clocks = (("wall", "pairs_per_s_with_ref", "pairs_per_s", "s_per_step"),
              ("cpu", "pairs_per_cpu_s_with_ref", "pairs_per_cpu_s", "cpu_s_per_step"))
    for clock, ours_key, trl_key, step_key in clocks:
        best = {v: min(rs, key=lambda r: r.get(step_key) or math.inf) for v, rs in results.items()}
        if "ours_dpo" not in best or best["ours_dpo"].get(ours_key) is None:
            continue
        ours = best["ours_dpo"][ours_key]
        trl = {v: best[v][trl_key] for v in TRL if v in best and best[v].get(trl_key)}
        for v, pps in trl.items():
            out[f"{clock}: ours_dpo_with_ref / {v}"] = round(ours / pps, 2)
        if trl:
            out[f"{clock}: ours_dpo_with_ref / trl_fastest"] = round(ours / max(trl.values()), 2)
        for v in ("ours_unll", "ours_unll_noskip"):
            if v in best and best[v].get(step_key):
                out[f"{clock}: {v}_step / ours_dpo_step"] = round(best[v][step_key] / best["ours_dpo"][step_key], 3)
    return out


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or "cpu"
