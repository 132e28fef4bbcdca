"""LoRA (peft) and activation checkpointing in the trainer, checked against full fine-tuning.

The mathematics: from B = 0, one SGD step (no dropout) leaves every A and every base weight as they
were and sets B = (alpha / r) dW A^T, where dW is the update full fine-tuning makes on the same batch
(a ``--lora-r 0`` run of the same trainer); the merged model is base + (alpha / r) B A.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dppo.errors import ConfigError
from dppo.train.checkpoint import checkpoint_weights
from dppo.train.config import load_config

from train_fixtures import *  # noqa: F403
from train_fixtures import read_metrics, run_train

pytest.importorskip("peft")

R, ALPHA = 4, 8.0
SCALE = ALPHA / R
METHODS = {"dpo": {"beta": 0.5}, "unll": {"beta": 0.5, "alpha": 0.5, "vote_clip": 20.0}}


def init_weights(init_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(init_dir / "model.safetensors")


def adapter_weights(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{module name (as in the base model): {"A": [r, in], "B": [out, r]}} of RUN/adapter."""
    raw = load_file(run / "adapter" / "adapter_model.safetensors")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in raw.items():
        name = key.removeprefix("base_model.model.")
        module, kind = name.split(".lora_")
        out.setdefault(module, {})[kind.split(".")[0]] = value
    return out


def step(tmp_path: Path, name: str, method: str, data: Path, init: Path, lr: float, **extra) -> Path:
    return run_train(tmp_path / name, method=method, data=str(data), init=str(init), optimizer="sgd", lr=lr,
                     max_samples=4, max_steps=1, **{**METHODS[method], **extra})


@pytest.mark.parametrize("method", list(METHODS))
def test_one_lora_step_is_the_full_update_projected_on_A(tmp_path, method, init_dir, pair_shards):
    lr = 1.0
    full = step(tmp_path, "full", method, pair_shards, init_dir, lr)
    w0, w1 = init_weights(init_dir), load_file(full / "model" / "model.safetensors")
    lora = dict(lora_r=R, lora_alpha=ALPHA, lora_dropout=0.0)
    before = adapter_weights(step(tmp_path, "lr0", method, pair_shards, init_dir, 0.0, **lora))  # A0, B0
    run = step(tmp_path, "lora", method, pair_shards, init_dir, lr, **lora)
    after = adapter_weights(run)
    assert before.keys() == after.keys() and len(after) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    for module, ab in after.items():
        a0, b0 = before[module]["A"], before[module]["B"]
        assert torch.count_nonzero(b0) == 0  # peft starts B at zero
        assert torch.equal(ab["A"], a0), module  # d loss / dA = s B^T G = 0 at B = 0
        dw = w1[module + ".weight"] - w0[module + ".weight"]  # full fine-tuning's update, [out, in]
        want = SCALE * dw @ a0.T
        torch.testing.assert_close(ab["B"], want, rtol=1e-4, atol=1e-6 * float(want.abs().max()) + 1e-9, msg=module)
        assert float(want.abs().max()) > 1e-6
    # the merged model: base + s B A on the adapted layers, the base itself elsewhere
    merged = load_file(run / "model" / "model.safetensors")
    for key, base in w0.items():
        module = key.removesuffix(".weight")
        if module in after:
            want = base + SCALE * after[module]["B"] @ after[module]["A"]
            torch.testing.assert_close(merged[key], want, rtol=0, atol=1e-6, msg=key)
        else:
            assert torch.equal(merged[key], base), key
    first = read_metrics(run)[0]
    assert first["loss"] == pytest.approx(read_metrics(full)[0]["loss"], rel=1e-6)  # B = 0: the same model


def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(tmp_path, init_dir, pair_shards):
    opts = dict(method="unll", data=str(pair_shards), init=str(init_dir), optimizer="adamw", lr=1e-2, max_samples=24,
                max_steps=4, save_every=2, keep_last=0, lora_r=R, lora_dropout=0.1, **{k: v for k, v in METHODS["unll"].items()})
    whole = run_train(tmp_path / "whole", **opts)
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for p in ("model", "adapter", "checkpoints/step_4"):
        shutil.rmtree(cut / p)
    run_train(cut, resume=True, **opts)
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # dropout's RNG restored too
    saved = checkpoint_weights(whole / "checkpoints" / "step_2")
    assert saved and all("lora_" in k for k in saved), sorted(saved)[:4]
    state = json.loads((whole / "checkpoints" / "step_2" / "state.json").read_text())
    assert state["trainable_only"] is True
    # a checkpoint of adapters cannot be resumed as full fine-tuning, and the reverse
    with pytest.raises(Exception, match="other options|adapters"):
        run_train(cut, resume=True, **{**opts, "lora_r": 0, "lora_dropout": 0.0})


def test_generate_and_eval_take_an_adapter_folder(tmp_path, init_dir, pair_shards, pairs_file):
    from typer.testing import CliRunner

    from dppo.artifacts import model_fingerprint
    from dppo.cli.main import app
    from dppo.generate import read_generations

    run = run_train(tmp_path / "run", method="dpo", data=str(pair_shards), init=str(init_dir), optimizer="sgd", lr=5.0,
                    max_samples=4, max_steps=1, beta=0.5, lora_r=R, lora_alpha=ALPHA)
    cli = CliRunner()
    outs = {}
    for name, model in (("adapter", run / "adapter"), ("merged", run / "model")):
        out = tmp_path / f"{name}.parquet"
        r = cli.invoke(app, ["generate", "--model", str(model), "--data", str(pairs_file), "--limit", "6",
                             "--max-new-tokens", "8", "--out", str(out)])
        assert r.exit_code == 0, r.output
        outs[name] = read_generations(out)
    assert outs["adapter"] == outs["merged"]
    assert model_fingerprint(run / "adapter") != model_fingerprint(init_dir)
    # --no-merge: the run folder stands for its adapter
    nomerge = run_train(tmp_path / "nomerge", method="dpo", data=str(pair_shards), init=str(init_dir), optimizer="sgd",
                        lr=5.0, max_samples=4, max_steps=1, beta=0.5, lora_r=R, lora_alpha=ALPHA, merge=False)
    assert not (nomerge / "model").exists() and (nomerge / "adapter" / "adapter_config.json").is_file()
    r = cli.invoke(app, ["generate", "--model", str(nomerge), "--data", str(pairs_file), "--limit", "6",
                         "--max-new-tokens", "8", "--out", str(tmp_path / "nm.parquet")])
    assert r.exit_code == 0, r.output
    assert read_generations(tmp_path / "nm.parquet") == outs["adapter"]


def test_lora_options_need_a_rank(init_dir, pair_shards):
    base = dict(method="dpo", data=str(pair_shards), init=str(init_dir), out="x")
    with pytest.raises(ConfigError, match="--lora-alpha needs --lora-r"):
        load_config(None, lora_alpha=16.0, **base)
    with pytest.raises(ConfigError, match="--no-merge|--merge needs"):
        load_config(None, merge=False, **base)
    assert load_config(None, lora_r=8, **base).lora_alpha == 16.0

def test_lora_targets_that_match_nothing_fail_in_one_line(tmp_path, init_dir, pair_shards):
    with pytest.raises(ConfigError, match="--lora-targets 'no_such_module'"):
        run_train(tmp_path / "run", method="dpo", data=str(pair_shards), init=str(init_dir), lora_r=2,
                  lora_targets="no_such_module", max_steps=1)


# -- activation checkpointing ----------------------------------------------------------------------
@pytest.mark.parametrize("extra", [{}, {"lora_r": R, "lora_alpha": ALPHA}], ids=["full", "lora"])
def test_gradient_checkpointing_gives_the_same_step(tmp_path, extra, init_dir, pair_shards):
    """unll with y_gen skipping (the policy's vote), packed rows, chunked log-probs: with and without."""
    opts = dict(method="unll", data=str(pair_shards), init=str(init_dir), optimizer="sgd", lr=1.0, max_samples=6,
                max_steps=2, max_tokens_per_batch=160, chunk_size=16, **METHODS["unll"], **extra)
    plain = run_train(tmp_path / "plain", **opts)
    ckpt = run_train(tmp_path / "ckpt", gradient_checkpointing=True, **opts)
    kind = "adapter/adapter_model.safetensors" if extra else "model/model.safetensors"
    w0 = {} if extra else init_weights(init_dir)
    a, b = load_file(plain / kind), load_file(ckpt / kind)
    for k in a:
        update = float((a[k] - w0[k]).abs().max()) if k in w0 else float(a[k].abs().max())
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6 * max(update, 1e-3), msg=k)
    for m1, m2 in zip(read_metrics(plain), read_metrics(ckpt), strict=True):
        assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-6) and m1["penalized"] == m2["penalized"]
