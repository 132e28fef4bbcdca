"""The accelerator path checked against the fp32 reference: ``pytest -m cuda`` (``benchmarks/gpu/check.sh``).

On a CUDA machine every test runs on the GPU: the packed varlen attention under bf16 autocast, a
DPO/unll optimizer step, greedy generation with and without CUDA graphs, and a killed + resumed
run. Without one (``check.sh --cpu``, in CI) the same tests run the code paths the CPU has
(``sdpa_loop`` under bf16 autocast, eager decoding), so the script and its tests cannot rot.
``DPPO_CHECK_DEVICE=cpu|cuda`` forces the device; each test appends its figures as one JSON line
to ``$DPPO_CHECK_OUT/correctness.jsonl`` when that is set.

The bf16 tolerance of the packed log-probs is derived, not guessed: the same tokens are scored by
the plain, unpacked Hugging Face forward under the same bf16 autocast, and its distance to the
fp32 dense-mask reference is bf16's own error on this model (the noise floor). Packing and the
varlen kernel must not add to it: max |packed bf16 - fp32| <= 2 x that floor + 2^-8 (one bf16
unit in the last place at 1.0), per token and per sequence sum. bf16 keeps 8 significant bits, so
a log-prob of magnitude m is known to about m x 2^-8 after rounding, which is what the floor
measures at this model's depth.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dppo import synthetic
import tiny_models as tm
from harness import CLI, dies_after, run_cli

pytestmark = pytest.mark.cuda

DEVICE = os.environ.get("DPPO_CHECK_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.startswith("cuda")
BF16_ULP = 2.0**-8


def report(check: str, **fields) -> None:
    """One JSON line per check into $DPPO_CHECK_OUT/correctness.jsonl (the summary reads it)."""
    out = os.environ.get("DPPO_CHECK_OUT")
    if out:
        with open(Path(out) / "correctness.jsonl", "a") as f:
            f.write(json.dumps({"check": check, "device": _device_name(), **fields}) + "\n")


def _device_name() -> str:
    return torch.cuda.get_device_name() if ON_CUDA else "cpu"


@pytest.fixture(scope="module", autouse=True)
def _require_device():
    if ON_CUDA and not torch.cuda.is_available():
        pytest.fail("DPPO_CHECK_DEVICE asks for CUDA, and torch sees no CUDA device")


def _config(vocab: int):
    # head dim 64 (varlen's kernels need a multiple of 8, at most 256); GQA 8 -> 2 like Qwen2.5
    return tm.qwen2_config(vocab, hidden=256 if ON_CUDA else 128, layers=4, heads=4 if ON_CUDA else 2,
                           kv_heads=2 if ON_CUDA else 1, tie_word_embeddings=True, initializer_range=0.1)


# -- 1. packed log-probs: varlen in bf16 against the fp32 dense reference ---------------------------


def test_packed_bf16_logps_match_the_fp32_reference_within_bf16_error():
    from dppo.modeling import PackedBatch, load_model, sequence_logps
    from dppo.modeling.attention import _varlen_fn

    torch.manual_seed(0)
    vocab = 4096
    cfg = _config(vocab)
    rng = np.random.default_rng(0)
    seqs = [(rng.integers(0, vocab, int(rng.integers(8, 120))), rng.integers(0, vocab, int(rng.integers(4, 200))))
            for _ in range(12)]
    batch = PackedBatch.from_sequences(seqs).to(DEVICE)
    model = load_model(cfg, dtype="fp32", device=DEVICE)
    # fp32, dense block-causal mask: the independent reference (and its gradients)
    ref = sequence_logps(model, batch, kernel="dense")
    ref.sums.sum().backward()
    ref_grad = torch.cat([p.grad.flatten() for p in model.parameters()]).clone()
    model.zero_grad(set_to_none=True)
    # bf16's own error: each sequence alone through the plain forward, same autocast
    plain = load_model(cfg, dtype="fp32", device=DEVICE, attn="sdpa")
    plain.load_state_dict(model.state_dict())
    floor_tok, floor_sum = [], 0.0
    with torch.no_grad(), torch.autocast(DEVICE.split(":")[0], dtype=torch.bfloat16):
        for i, (p, r) in enumerate(seqs):
            ids = torch.as_tensor(np.concatenate([p, r]), device=DEVICE)[None]
            logits = plain(ids).logits[0].float()
            lp = torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0][len(p) - 1:]
            floor_tok.append((lp - ref.token_logps[ref.token_seq == i].detach()).abs())
            floor_sum = max(floor_sum, abs(float(lp.sum() - ref.sums[i].detach())))
    floor_tok = torch.cat(floor_tok)
    # the packed path under bf16 autocast: varlen on CUDA, one SDPA call per sequence on the CPU
    kernel = "auto"
    with torch.autocast(DEVICE.split(":")[0], dtype=torch.bfloat16):
        got = sequence_logps(model, batch, kernel=kernel)
        got.sums.sum().backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    err_tok = (got.token_logps.detach() - ref.token_logps.detach()).abs()
    err_sum = (got.sums.detach() - ref.sums.detach()).abs()
    tol_tok = 2 * float(floor_tok.max()) + BF16_ULP
    tol_sum = 2 * floor_sum + BF16_ULP * len(seqs)
    cosine = float(torch.nn.functional.cosine_similarity(grad.float(), ref_grad.float(), dim=0))
    used = "varlen" if ON_CUDA and _varlen_fn() is not None else "sdpa_loop"
    report("packed_logps_bf16_vs_fp32", kernel=used, tokens=int(err_tok.numel()), max_err=float(err_tok.max()),
           mean_err=float(err_tok.mean()), floor_max=float(floor_tok.max()), floor_mean=float(floor_tok.mean()),
           tolerance=tol_tok, max_sum_err=float(err_sum.max()), sum_tolerance=tol_sum, grad_cosine=cosine,
           passed=bool(err_tok.max() <= tol_tok and err_sum.max() <= tol_sum and cosine > 0.99))
    assert float(err_tok.max()) <= tol_tok, (float(err_tok.max()), tol_tok)
    assert float(err_sum.max()) <= tol_sum
    assert float(err_tok.mean()) <= 2 * float(floor_tok.mean()) + 1e-4
    assert cosine > 0.99


# -- 2. one optimizer step on the device against the fp32 CPU step ---------------------------------


@pytest.fixture(scope="module")
def step_setup(tmp_path_factory, tok_dir):
    from dppo.data.prep import PrepConfig, prepare

    from conftest import write_jsonl

    root = tmp_path_factory.mktemp("cuda_step")
    rows = synthetic.pair_rows(24, seed=8)
    write_jsonl(root / "pairs.jsonl", rows)
    write_jsonl(root / "ygen.jsonl", [{"prompt_id": r["prompt_id"], "response": r["rejected"][1]["content"][::-1]} for r in rows])
    prepare(PrepConfig("prefs", str(root / "pairs.jsonl"), str(tok_dir), root / "shards", ygen=root / "ygen.jsonl",
                       max_len=256), show_progress=False)
    from transformers import AutoModelForCausalLM

    vocab = _vocab_size(tok_dir)
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(_config(vocab))
    init = root / "init"
    model.save_pretrained(init)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (init / name).write_bytes((tok_dir / name).read_bytes())
    return root


def _vocab_size(tok_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()


def _train(out: Path, root: Path, device: str, **kw) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from dppo.train.config import load_config
    from dppo.train import train

    opts = dict(data=str(root / "shards"), init=str(root / "init"), out=str(out), batch_size=4, grad_accum=2,
                warmup_steps=0, max_grad_norm=0.0, progress=False, save_every=0, optimizer="sgd", lr=1.0,
                max_samples=8, max_steps=1, device=device, overwrite=True)
    train(load_config(None, **{**opts, **kw}))
    return load_file(out / "model" / "model.safetensors")


@pytest.mark.parametrize("method", ["dpo", "unll"])
def test_a_bf16_step_on_the_device_moves_the_weights_as_the_fp32_cpu_step(tmp_path, step_setup, method):
    from safetensors.torch import load_file

    extra = {"beta": 0.1} if method == "dpo" else {"beta": 0.1, "alpha": 1.0, "vote_clip": 20.0}
    on_device = _train(tmp_path / "dev", step_setup, DEVICE, method=method, dtype="bf16", **extra)
    on_cpu = _train(tmp_path / "cpu", step_setup, "cpu", method=method, dtype="fp32", **extra)
    init = load_file(step_setup / "init" / "model.safetensors")
    a = torch.cat([(on_device[k].float() - init[k].float()).flatten() for k in sorted(init)])
    b = torch.cat([(on_cpu[k].float() - init[k].float()).flatten() for k in sorted(init)])
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    ratio = float(a.norm() / b.norm())
    report(f"{method}_step_device_bf16_vs_cpu_fp32", cosine=cosine, norm_ratio=ratio, passed=cosine > 0.99)
    assert cosine > 0.99 and 0.9 < ratio < 1.1
    # the device run logs its peak memory, the CPU run has no such field
    dev_log = json.loads((tmp_path / "dev" / "metrics.jsonl").read_text().splitlines()[-1])
    cpu_log = json.loads((tmp_path / "cpu" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "peak_mem_gib" not in cpu_log
    if DEVICE.startswith("cuda"):
        assert dev_log["peak_mem_gib"] > 0


# -- 3. greedy generation: token-identical to transformers' generate ----------------------------------


@pytest.fixture(scope="module")
def gen_model(tmp_path_factory, tok_dir):
    import tiny_models as tm

    vocab = tm.vocab_size(tok_dir)
    model = tm.causal_lm(vocab, seed=21)
    end = _end_id(tok_dir)
    prompts = [list(np.random.default_rng(i).integers(0, vocab - 3, 6 + 3 * i)) for i in range(4)]
    tm.make_it_stop(model, end, tm.frequent_token(model, prompts))
    return tm.save(model, tmp_path_factory.mktemp("gen") / "model", tok_dir)


def _end_id(tok_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json")).token_to_id("<|im_end|>")


def _hf_greedy(model_dir: Path, prompts: list[list[int]], stop: list[int], new: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager").to(DEVICE).eval()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = hf.generate(torch.tensor([p], device=DEVICE), max_new_tokens=new, do_sample=False,
                              eos_token_id=stop, pad_token_id=stop[0])[0, len(p):].tolist()
            cut = next((k for k, t in enumerate(ids) if t in stop), len(ids))
            out.append(ids[:cut])
    return out


def test_generate_is_token_identical_to_transformers_greedy_with_and_without_cuda_graphs(tmp_path, gen_model, pairs_rows):
    from conftest import write_jsonl
    from dppo.generate.decoding import Decoder, SamplingConfig
    from dppo.generate import GenConfig, generate, load_prompts, read_generations, render_prompts, stop_token_ids
    from dppo.modeling import load_model

    new = 24
    pairs_file = write_jsonl(tmp_path / "pairs.jsonl", pairs_rows)  # jsonl: read without polars (absent on the device)
    out = tmp_path / "y.jsonl"
    generate(GenConfig.from_options(model=str(gen_model), data=str(pairs_file), out=out, max_new_tokens=new, limit=16,
                                    dtype="fp32", device=DEVICE, engine="dppo", batch_size=5), show_progress=False)
    rows = read_generations(out)
    prompts, _ = load_prompts(str(pairs_file), limit=16)
    ids = render_prompts(prompts, gen_model)
    stop = stop_token_ids(gen_model, gen_model)
    want = _hf_greedy(gen_model, ids, stop, new)
    by_id = {r["prompt_id"]: r["response_ids"] for r in rows}
    via_generate = [by_id[p.prompt_id] for p in prompts]
    results = {"generate (CUDA graphs on CUDA)": via_generate}
    lm = load_model(str(gen_model), dtype="fp32", device=DEVICE, attn="sdpa")
    for graphs in ([False, True] if ON_CUDA else [False]):
        dec = Decoder(lm, stop, engine="dppo", cuda_graphs=graphs)
        got: list[list[int]] = [[] for _ in ids]
        for done in dec.run(ids, SamplingConfig(max_new_tokens=new), batch_size=5):
            for c in done:
                got[c.index] = c.token_ids
        results[f"decoder cuda_graphs={graphs}"] = got
    same = {k: sum(a == b for a, b in zip(v, want, strict=True)) / len(want) for k, v in results.items()}
    report("greedy_generate_vs_hf_fp32", prompts=len(want), tokens=sum(map(len, want)), identical_fraction=same,
           stopped=sum(len(w) < new for w in want), passed=all(v == 1.0 for v in same.values()))
    assert any(len(w) < new for w in want) and any(len(w) == new for w in want)  # stops and budget both occur
    for k, v in results.items():
        assert v == want, k


# -- 4. a killed run resumes to the weights of an uninterrupted one ------------------------------------

def _cli(args: list[str], kill_at_save: int = 0) -> subprocess.CompletedProcess:
    """The command line; with ``kill_at_save`` it dies by SIGKILL after that many checkpoint parts (2 per checkpoint)."""
    return run_cli(args, dies_after("torch.distributed.checkpoint:save", kill_at_save) if kill_at_save else CLI, timeout=600)


@pytest.mark.parametrize("deterministic", [True, False])
def test_a_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, step_setup, deterministic):
    from safetensors.torch import load_file

    args = ["train", "--method", "unll", "--data", str(step_setup / "shards"), "--init", str(step_setup / "init"),
            "--alpha", "1", "--vote-clip", "20", "--lr", "1e-3", "--warmup-steps", "2", "--batch-size", "2",
            "--grad-accum", "2", "--max-samples", "24", "--max-steps", "6", "--save-every", "2", "--no-progress",
            "--device", DEVICE, "--deterministic" if deterministic else "--no-deterministic"]
    t = time.perf_counter()
    whole = _cli([*args, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = _cli([*args, "--out", str(tmp_path / "cut")], kill_at_save=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = _cli([*args, "--out", str(tmp_path / "cut"), "--resume"])
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-2000:]
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    init = load_file(step_setup / "init" / "model.safetensors")
    identical = all(torch.equal(a[k], b[k]) for k in a)
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    update = max(float((a[k].float() - init[k].float()).abs().max()) for k in a)
    report("kill_resume", deterministic=deterministic, bit_identical=identical, max_abs_diff=diff,
           max_abs_update=update, seconds=round(time.perf_counter() - t, 1), passed=identical or diff <= 1e-3 * update)
    if deterministic or not ON_CUDA:
        assert identical, f"max |diff| {diff} (update {update})"
    else:  # atomics in some CUDA backward kernels may reorder sums: equal to float rounding
        assert diff <= 1e-3 * update
