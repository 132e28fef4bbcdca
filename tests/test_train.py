"""The trainer end to end on tiny models (CPU, fp32, no network).

The central check is :func:`test_sgd_step_equals_hand_computed_step`: one optimizer step of every
method with ``--optimizer sgd`` moves each parameter by exactly ``-lr * d loss / d theta``, where the
loss is written out here in plain PyTorch from ``docs/method.md`` (each sequence run alone through an
eager-attention copy of the model, full log-softmax, no packing, no chunking, no cache).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from dppo.train.checkpoint import CheckpointError, list_checkpoints
from dppo.train.config import TrainConfig, load_config
from dppo.data import open_shards
from dppo.errors import ConfigError
from dppo.modeling import PackedBatch, load_model, sequence_logps
from dppo.train import DataOrder, lr_at

from harness import CLI, dies_after, run_cli
from train_fixtures import *  # noqa: F403
from train_fixtures import FAST, hand_loss, load_plain, plain_token_logps, read_metrics, run_train

TIME_FIELDS = {"tokens_per_s", "examples_per_s", "step_s", "step_cpu_s", "elapsed_s", "mfu"}


@pytest.mark.parametrize("method", ["sft", "dpo", "simpo", "minll", "unll", "conll"])
def test_sgd_step_equals_hand_computed_step(tmp_path, method, init_dir, ref_dir, pair_shards, sft_shards):
    data = sft_shards if method == "sft" else pair_shards
    extra = {} if method in ("sft", "simpo") else {"ref": str(ref_dir), "beta": 0.1}
    if method in ("unll", "conll"):
        extra.update(alpha=0.5, vote_clip=20.0)  # large enough weights f(r) to matter
    lr = 1.0
    run = run_train(tmp_path / "run", method=method, data=str(data), init=str(init_dir), optimizer="sgd", lr=lr,
                    max_samples=4, max_steps=1, **extra)
    cfg = load_config(None, method=method, data=str(data), init=str(init_dir), out="x", **{**FAST, **extra})

    policy, ref = load_plain(init_dir), load_plain(ref_dir)
    shards = open_shards(data)
    hand_loss(cfg, shards, range(4), policy, ref).backward()
    got = load_file(run / "model" / "model.safetensors")
    checked = 0
    for name, param in policy.named_parameters():
        if name not in got:  # a tied output projection is stored once
            continue
        torch.testing.assert_close(got[name] - param.detach(), -lr * param.grad, rtol=1e-4, atol=2e-7, msg=name)
        checked += 1
    assert checked == len(got)
    first = read_metrics(run)[0]
    hand = hand_loss(cfg, shards, range(4), policy, ref).item()
    assert first["loss"] == pytest.approx(hand, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("vote", ["policy", "ref"])
def test_skipping_ygen_changes_nothing(tmp_path, vote, init_dir, ref_dir, pair_shards):
    """y_gen's forward is skipped where f(r) = 0 (r >= 0 for the quadratic weight): same parameters."""
    common = dict(method="unll", data=str(pair_shards), init=str(init_dir), ref=str(ref_dir), vote=vote, alpha=1.0,
                  vote_clip=20.0, optimizer="sgd", lr=0.5, max_samples=16, max_steps=3)
    a = run_train(tmp_path / "skip", **common)
    b = run_train(tmp_path / "noskip", skip_ygen=False, **common)
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-7)
    ma, mb = read_metrics(a), read_metrics(b)
    assert all(0 < m["penalized"] < 1 for m in ma)  # some examples skipped, some not
    assert sum(m["tokens"] for m in ma) < sum(m["tokens"] for m in mb)  # and skipping saved work
    for x, y in zip(ma, mb, strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["penalized"] == y["penalized"]


def test_predicted_ygen_rows_equal_forwarding_every_ygen(init_dir, ref_dir, pair_shards):
    """Policy vote: the reference's vote picks the y_gen for the first row, a second row catches the
    mispredicted examples; losses and gradients equal those with every y_gen forwarded."""
    from dppo.train.losses import LOSSES
    from dppo.train.refcache import reference_logps
    from dppo.train.registry import YgenPlan, ygen_plan
    from dppo.train.step import StepInputs, TokenCounts, forward_logps

    shards, ids = open_shards(pair_shards), np.arange(24)
    ref = reference_logps(ref_dir, shards, ids, load=lambda: load_model(ref_dir, dtype="fp32", device="cpu"),
                          need_ygen=True, precision="fp32")
    # swap the reference's chosen and rejected on every other example: its vote then mispredicts
    # the policy's on many examples, both ways
    swap = np.arange(len(ref.chosen)) % 2 == 0
    ref = dataclasses.replace(ref, chosen=np.where(swap, ref.rejected, ref.chosen),
                              rejected=np.where(swap, ref.chosen, ref.rejected))
    policy = load_model(init_dir, dtype="fp32", device="cpu")
    cfg = TrainConfig(method="conll", data="d", init="i", out="o", alpha=1.0, vote_clip=20.0)
    objective, loss_cfg = LOSSES["conll"], cfg.loss_config()
    predicted = ygen_plan(loss_cfg)
    assert predicted == YgenPlan(forward=True, skip=True, known_before=False)
    got = {}
    for mode, plan in (("all", YgenPlan(forward=True)), ("predicted", predicted)):
        policy.zero_grad(set_to_none=True)
        work = TokenCounts()
        inputs = dataclasses.replace(StepInputs.of(cfg, policy, shards, loss_cfg, objective, ref, torch.device("cpu")), ygen=plan)
        logps = forward_logps(inputs, ids, work)
        out = objective(loss_cfg, logps)
        out.loss.sum().backward()
        got[mode] = (out.loss.detach(), [p.grad.clone() for p in policy.parameters()], work.tokens, logps)
    torch.testing.assert_close(got["predicted"][0], got["all"][0], rtol=1e-6, atol=1e-6)
    for a, b in zip(got["predicted"][1], got["all"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert got["predicted"][2] < got["all"][2]  # some y_gen were not forwarded
    lp = got["all"][3]
    r_policy = (lp.policy_chosen - lp.policy_rejected).detach().numpy()
    r_ref = ref.chosen[ids] - ref.rejected[ids]
    assert ((r_policy < 0) & (r_ref >= 0)).any()  # the second row was needed
    assert ((r_policy >= 0) & (r_ref < 0)).any()  # and some y_gen were forwarded for nothing


def test_sft_lowers_the_loss(tmp_path, init_dir, sft_shards):
    run = run_train(tmp_path / "run", method="sft", data=str(sft_shards), init=str(init_dir), lr=3e-3, batch_size=4,
                    grad_accum=1, max_samples=64, epochs=2, eval_data=str(sft_shards), eval_samples=16, eval_every=8)
    m = read_metrics(run)
    assert len(m) == 32
    assert np.mean([x["loss"] for x in m[-4:]]) < 0.8 * np.mean([x["loss"] for x in m[:4]])
    evals = [x["eval/loss"] for x in m if "eval/loss" in x]
    assert len(evals) == 4 and evals[-1] < evals[0]


def test_dpo_raises_reward_accuracy_on_a_separable_set(tmp_path, init_dir, separable_shards):
    run = run_train(tmp_path / "run", method="dpo", data=str(separable_shards), init=str(init_dir), beta=0.1,
                    lr=2e-3, batch_size=4, grad_accum=2, epochs=3, eval_data=str(separable_shards), eval_every=4)
    m = read_metrics(run)
    assert m[0]["rewards/accuracies"] == 0.0  # policy == reference: all rewards are zero at the first step
    evals = [x for x in m if "eval/rewards/accuracies" in x]
    assert evals[-1]["eval/rewards/accuracies"] >= 0.95
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"] > 0
    assert m[-1]["loss"] < m[0]["loss"]


# -- resume, checkpoints ---------------------------------------------------------------------------

def _cli(args: list[str], kill_at_save: int = 0) -> subprocess.CompletedProcess:
    """The command line; with ``kill_at_save`` it dies by SIGKILL after that many checkpoint parts (2 per checkpoint)."""
    return run_cli(args, dies_after("torch.distributed.checkpoint:save", kill_at_save) if kill_at_save else CLI)


def test_killed_run_resumes_bit_identical(tmp_path, init_dir, pair_shards):
    args = ["train", "--method", "unll", "--data", str(pair_shards), "--init", str(init_dir), "--alpha", "1",
            "--vote-clip", "20", "--lr", "1e-3", "--warmup-steps", "3", "--batch-size", "2", "--grad-accum", "2",
            "--max-samples", "24", "--max-steps", "7", "--save-every", "2", "--keep-last", "2", "--no-progress"]
    whole = _cli([*args, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    # Killed while writing its second checkpoint (step 4): step_2 is the last complete one.
    killed = _cli([*args, "--out", str(tmp_path / "cut")], kill_at_save=3)
    assert killed.returncode == -signal.SIGKILL
    ckpts = tmp_path / "cut" / "checkpoints"
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [2]
    assert any(p.name.startswith(".step_4.partial-") for p in ckpts.iterdir())
    assert len(read_metrics(tmp_path / "cut")) == 4
    resumed = _cli([*args, "--out", str(tmp_path / "cut"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr

    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "whole")) == strip(read_metrics(tmp_path / "cut"))
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [4, 6]
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # the dead run's leftovers are gone


def test_corrupt_checkpoint_fails_with_a_clear_error(tmp_path, init_dir, pair_shards):
    opts = dict(method="dpo", data=str(pair_shards), init=str(init_dir), max_samples=8, max_steps=2, save_every=1)
    run = run_train(tmp_path / "run", **opts)
    weights = run / "checkpoints" / "step_2" / "model" / "__0_0.distcp"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"step_2 is damaged: model/__0_0.distcp fails its checksum") as error:
        run_train(run, resume=True, **opts)
    assert "start over with --overwrite" in str(error.value)  # the advice names an option that is accepted
    (run / "checkpoints" / "step_2" / "state.json").write_text('{"format": "dppo-chec')
    result = CliRunner().invoke(_app(), ["train", "--method", "dpo", "--data", str(pair_shards), "--init", str(init_dir),
                                         "--out", str(run), "--resume", "--max-samples", "8", "--max-steps", "2",
                                         "--save-every", "1", *_fast_flags()])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "step_2 is damaged: state.json is unreadable" in lines[0]


def test_resume_refuses_other_options_and_existing_runs(tmp_path, init_dir, pair_shards):
    opts = dict(method="dpo", data=str(pair_shards), init=str(init_dir), max_samples=4, max_steps=1)
    run = run_train(tmp_path / "run", **opts)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_train(run, **opts)
    with pytest.raises(ConfigError, match=r"--beta 0.01 -> 0.2"):
        run_train(run, resume=True, **{**opts, "beta": 0.2})
    run_train(run, overwrite=True, **opts)  # replaces it


# -- reference cache -------------------------------------------------------------------------------


def test_reference_cache_reused_and_invalidated(tmp_path, init_dir, pair_shards):
    import shutil

    from dppo.train.refcache import reference_logps

    shards_dir = tmp_path / "shards"
    shutil.copytree(pair_shards, shards_dir, ignore=shutil.ignore_patterns("refcache"))
    shards = open_shards(shards_dir)
    ref = tmp_path / "ref"
    shutil.copytree(init_dir, ref)
    loads = []

    def load():
        loads.append(1)
        return load_model(ref, dtype="fp32", device="cpu")

    kw = dict(load=load, need_ygen=True, precision="fp32")
    first = reference_logps(ref, shards, np.arange(6), **kw)
    assert not first.hit and len(loads) == 1
    assert np.isnan(first.chosen[6:]).all() and not np.isnan(first.ygen[:6]).any()
    # the values are the reference's log-probs
    model = load_model(ref, dtype="fp32", device="cpu")
    ex = shards[3]
    want = sequence_logps(model, PackedBatch.from_sequences([(ex["prompt_ids"], ex["rejected_ids"])])).sums[0]
    assert first.rejected[3] == pytest.approx(want.item(), abs=1e-4)

    again = reference_logps(ref, shards, np.arange(6), **kw)
    assert again.hit and len(loads) == 1  # reused: the model was not even loaded
    np.testing.assert_array_equal(again.chosen, first.chosen)
    more = reference_logps(ref, shards, np.arange(10), **kw)  # only the 4 new examples are computed
    assert not more.hit and len(loads) == 2
    np.testing.assert_array_equal(more.chosen[:6], first.chosen[:6])

    # another reference (changed weights): another fingerprint, computed afresh
    changed = load_model(ref, dtype="fp32", device="cpu")
    with torch.no_grad():
        changed.model.norm.weight.mul_(1.5)
    changed.save_pretrained(ref)
    other = reference_logps(ref, shards, np.arange(6), **kw)
    assert not other.hit and len(loads) == 3 and other.cache_dir != first.cache_dir
    assert not np.allclose(other.chosen[:6], first.chosen[:6])
    assert len(list((shards_dir / "refcache").iterdir())) == 2


def test_trainer_reuses_the_reference_cache(tmp_path, init_dir, pair_shards):
    opts = dict(method="dpo", data=str(pair_shards), init=str(init_dir), max_samples=4, max_steps=1)
    out = CliRunner().invoke(_app(), _flags(opts, out=tmp_path / "a"))
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(_app(), _flags(opts, out=tmp_path / "b"))
    assert out.exit_code == 0 and "reference log-probs (train, 4 pairs) reused" in out.output


# -- command line, configuration, outputs ------------------------------------------------------------


def _app():
    from dppo.cli.main import app

    return app


def _fast_flags() -> list[str]:
    return ["--batch-size", "2", "--grad-accum", "2", "--warmup-steps", "0", "--max-grad-norm", "0", "--no-progress",
            "--save-every", "0"]


def _flags(opts: dict, out: Path) -> list[str]:
    args = ["train", "--out", str(out), *_fast_flags()]
    for k, v in opts.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


@pytest.mark.parametrize("method", ["minll", "unll", "conll"])
def test_ygen_methods_refuse_shards_without_ygen(tmp_path, method, init_dir, pair_shards_noygen):
    result = CliRunner().invoke(_app(), _flags(dict(method=method, data=pair_shards_noygen, init=init_dir), tmp_path / "r"))
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert f"--method {method} needs y_gen" in lines[0]
    assert "dppo generate --model" in lines[0] and "dppo prep prefs" in lines[0] and "--ygen ygen.parquet" in lines[0]
    assert not (tmp_path / "r").exists()


def test_toml_config_and_command_line_override(tmp_path, init_dir, pair_shards):
    toml = tmp_path / "run.toml"
    toml.write_text(
        f'method = "unll"\ndata = "{pair_shards}"\ninit = "{init_dir}"\nbeta = 0.2\nlr = 1e-4\n'
        'grad-accum = 1\nbatch_size = 2\nmax_samples = 4\nmax_steps = 2\nweight = "linear"\n'
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(_app(), ["train", "--config", str(toml), "--out", str(out), "--beta", "0.3",
                                         "--no-progress", "--warmup-steps", "0"])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "config.json").read_text())
    cfg = saved["config"]
    assert cfg["beta"] == 0.3 and cfg["lr"] == 1e-4 and cfg["grad_accum"] == 1 and cfg["weight"] == "linear"
    assert cfg["alpha"] == 0.1 and cfg["vote_clip"] == 2000.0  # unll's defaults fill the rest
    assert cfg["ref"] == str(init_dir)  # --ref defaults to --init
    assert saved["data"]["fingerprint"] and saved["init"]["fingerprint"] == saved["ref"]["fingerprint"]
    assert len(read_metrics(out)) == 2

    toml.write_text('method = "dpo"\nlearning_rate = 1e-4\n')
    result = CliRunner().invoke(_app(), ["train", "--config", str(toml), "--out", str(out)])
    assert result.exit_code == 1 and "unknown option `learning_rate`" in result.output


def test_method_defaults_follow_method_md():
    base = dict(data="d", init="i", out="o")
    dpo, minll, unll, conll, simpo = (TrainConfig(method=m, **base) for m in ("dpo", "minll", "unll", "conll", "simpo"))
    assert dpo.beta == unll.beta == 0.01 and dpo.lr == 1e-6 and dpo.warmup_steps == 150
    assert (dpo.batch_size, dpo.grad_accum, dpo.optimizer) == (4, 8, "adamw")
    assert (minll.alpha, minll.weight, minll.zeta) == (10.0, "expectile", 0.5)
    assert (unll.alpha, unll.weight, unll.vote_clip) == (0.1, "quadratic", 2000.0)
    assert (conll.alpha, conll.vote_clip) == (0.1, 700.0)
    assert (simpo.beta, simpo.gamma, simpo.ref) == (2.5, 1.0, None)
    assert dpo.ref == "i" and TrainConfig(method="dpo", ref="r", **base).ref == "r"
    with pytest.raises(ConfigError, match="--optimizer must be one of adamw|rmsprop|sgd"):
        TrainConfig(method="dpo", optimizer="adam", **base)
    with pytest.raises(ConfigError, match="missing --data"):
        TrainConfig(method="dpo", init="i", out="o")


def test_metrics_and_saved_model(tmp_path, init_dir, ref_dir, pair_shards, pair_shards_noygen):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = run_train(tmp_path / "run", method="unll", data=str(pair_shards), init=str(init_dir), ref=str(ref_dir),
                    alpha=1.0, vote_clip=20.0, lr=1e-3, max_samples=12, max_steps=3, save_every=3,
                    eval_data=str(pair_shards_noygen), eval_samples=6, peak_tflops=1.0)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    fields = {"step", "epoch", "loss", "dpo_loss", "penalty", "rewards/chosen", "rewards/rejected", "rewards/margins",
              "rewards/accuracies", "r/mean", "r/std", "weight/mean", "penalized", "lr", "grad_norm", "tokens",
              "tokens_per_s", "examples_per_s", "mfu", "step_s", "step_cpu_s"}
    assert fields <= rows[0].keys()
    assert all(0 < r["mfu"] < 1 and r["tokens_per_s"] > 0 for r in rows)
    # the eval set has no y_gen: DPO loss and rewards only, after the last step
    assert "eval/rewards/accuracies" in rows[-1] and "eval/penalty" not in rows[-1] and "eval/loss" not in rows[0]

    # RUN/model loads with plain transformers and gives the trained policy's log-probs
    model_dir = run / "model"
    plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    packed = load_model(model_dir, dtype="fp32", device="cpu")
    ckpt = load_model(init_dir, dtype="fp32", device="cpu")
    from dppo.train.checkpoint import checkpoint_weights

    ckpt.load_state_dict(checkpoint_weights(run / "checkpoints" / "step_3"))
    ex = open_shards(pair_shards)[5]
    seqs = [(ex["prompt_ids"], ex["chosen_ids"]), (ex["prompt_ids"], ex["ygen_ids"])]
    with torch.no_grad():
        want = sequence_logps(ckpt, PackedBatch.from_sequences(seqs)).token_logps
        got = sequence_logps(packed, PackedBatch.from_sequences(seqs)).token_logps
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        plain_lp = torch.cat([plain_token_logps(plain, p, r) for p, r in seqs])
    torch.testing.assert_close(plain_lp, want, rtol=1e-5, atol=1e-5)


def test_bf16_autocast_runs_on_cpu(tmp_path, init_dir, pair_shards):
    run = run_train(tmp_path / "run", method="conll", data=str(pair_shards), init=str(init_dir), dtype="bf16",
                    lr=1e-3, max_samples=4, max_steps=1)
    assert np.isfinite(read_metrics(run)[0]["loss"])
    assert json.loads((run / "config.json").read_text())["precision"] == "bf16"
    assert next(iter(load_file(run / "model" / "model.safetensors").values())).dtype == torch.bfloat16


def test_schedule_and_data_order():
    cfg = TrainConfig(method="dpo", data="d", init="i", out="o", lr=1.0, warmup_steps=4, lr_schedule="linear")
    assert [lr_at(cfg, s, 12) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 0.875]
    order = DataOrder(n=10, per_step=4, epochs=2, max_steps=None, seed=3)
    assert order.total_steps == 6
    epoch0 = np.concatenate([order.step_examples(s) for s in range(3)])
    epoch1 = np.concatenate([order.step_examples(s) for s in range(3, 6)])
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and not np.array_equal(epoch0, epoch1)
    assert np.array_equal(order.step_examples(4), DataOrder(10, 4, 2, None, 3).step_examples(4))


# -- micro-batches, first contact ----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["sft", "unll"])
def test_a_step_split_into_1_2_or_5_micro_batches_gives_the_same_update(tmp_path, method, init_dir, ref_dir, pair_shards, sft_shards):
    """The loss is the mean over the step's examples (SFT: over its assistant tokens) however the
    step's 10 examples are grouped: by --batch-size, or by the token budget."""
    data = sft_shards if method == "sft" else pair_shards
    extra = {} if method == "sft" else {"ref": str(ref_dir), "alpha": 1.0, "vote_clip": 20.0}
    common = dict(method=method, data=str(data), init=str(init_dir), optimizer="sgd", lr=1.0, max_samples=10,
                  max_steps=1, **extra)
    splits = {1: dict(batch_size=10, grad_accum=1), 2: dict(batch_size=5, grad_accum=2), 5: dict(batch_size=2, grad_accum=5)}
    weights = {}
    for k, opts in splits.items():
        run = run_train(tmp_path / f"split{k}", **common, **opts)
        weights[k] = load_file(run / "model" / "model.safetensors")
    # a token budget that forces one example per micro-batch
    run = run_train(tmp_path / "budget", **common, batch_size=10, grad_accum=1, max_tokens_per_batch=1)
    weights["budget"] = load_file(run / "model" / "model.safetensors")
    assert json.loads((run / "config.json").read_text())["max_tokens_per_batch"] == 1
    init = load_file(init_dir / "model.safetensors")
    for k in (2, 5, "budget"):
        for name, w in weights[1].items():
            update, other = w - init[name], weights[k][name] - init[name]
            torch.testing.assert_close(other, update, rtol=1e-5, atol=1e-7, msg=f"{k}: {name}")
    assert any((weights[1][n] - init[n]).abs().max() > 1e-4 for n in init)  # the step moved the weights


def test_resume_into_a_folder_that_does_not_exist_starts_from_step_0(tmp_path, init_dir, pair_shards):
    run = tmp_path / "not" / "yet" / "run"
    run_train(run, method="dpo", data=str(pair_shards), init=str(init_dir), max_samples=4, max_steps=2, resume=True)
    assert [m["step"] for m in read_metrics(run)] == [1, 2] and (run / "model" / "config.json").is_file()


def test_options_a_method_does_not_use_are_refused():
    base = dict(data="d", init="i", out="o")
    cases = [
        (dict(method="dpo", alpha=0.5), "--alpha is not used by --method dpo (it applies to conll, minll, unll)"),
        (dict(method="unll", gamma=1.0), "--gamma is not used by --method unll (it applies to simpo)"),
        (dict(method="sft", beta=0.1), "--beta is not used by --method sft"),
        (dict(method="unll", penalty_norm="sum"), "--penalty-norm is not used by --method unll (it applies to minll)"),
        (dict(method="unll", zeta=0.3), "--zeta is used by --weight expectile only"),
        (dict(method="simpo", ref="r"), "--ref is not used by --method simpo"),
        (dict(method="dpo", eval_every=5), "--eval-every needs --eval-data"),
    ]
    for opts, msg in cases:
        with pytest.raises(ConfigError) as e:
            TrainConfig(**base, **opts)
        assert msg in str(e.value), (opts, str(e.value))
    # the options the method does not read are recorded as None, never as if used
    dpo = TrainConfig(method="dpo", **base)
    assert dpo.alpha is None and dpo.gamma is None and dpo.vote_clip is None and dpo.beta == 0.01
    assert TrainConfig(method="unll", weight="expectile", zeta=0.3, **base).zeta == 0.3
    assert TrainConfig(method="unll", **base).zeta is None


def test_saved_files_are_readable_by_others(tmp_path, init_dir, pair_shards):
    run = run_train(tmp_path / "run", method="dpo", data=str(pair_shards), init=str(init_dir), max_samples=4,
                    max_steps=1, save_every=1)
    files = [f for f in [*(run / "model").rglob("*"), *(run / "checkpoints" / "step_1").rglob("*")] if f.is_file()]
    assert len(files) > 6
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~_umask(), f


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- the registry: adding a loss is one pure function and one registry line ---------------------------


def margin_loss(cfg, logps):
    """A toy preference loss: -log sigmoid(beta * (logp(y_w) - logp(y_l))), no reference."""
    from dppo.train.losses import LossOutput

    return LossOutput(loss=-F.logsigmoid(cfg.beta * (logps.policy_chosen - logps.policy_rejected)))


def test_a_registered_toy_loss_trains_a_step_with_the_hand_computed_update(tmp_path, init_dir, pair_shards):
    from dppo.train.registry import LOSSES, LossSpec, register_loss

    register_loss("margin", LossSpec(margin_loss, data="pairs", needs_reference=False, options=("beta",)), overwrite=True)
    try:
        run = run_train(tmp_path / "run", method="margin", data=str(pair_shards), init=str(init_dir), beta=0.5,
                        optimizer="sgd", lr=1.0, max_samples=4, max_steps=1)
        cfg = json.loads((run / "config.json").read_text())["config"]
        assert cfg["method"] == "margin" and cfg["beta"] == 0.5 and cfg["alpha"] is None and cfg["ref"] is None
        with pytest.raises(ConfigError, match="--alpha is not used by --method margin"):
            TrainConfig(method="margin", data="d", init="i", out="o", alpha=1.0)
        # the update is -lr * the gradient of the mean over the step's 4 pairs, computed by hand
        policy = load_plain(init_dir)
        shards = open_shards(pair_shards)
        losses = []
        for i in range(4):
            ex = shards[i]
            c = plain_token_logps(policy, ex["prompt_ids"], ex["chosen_ids"]).sum()
            r = plain_token_logps(policy, ex["prompt_ids"], ex["rejected_ids"]).sum()
            losses.append(-F.logsigmoid(0.5 * (c - r)))
        torch.stack(losses).mean().backward()
        got = load_file(run / "model" / "model.safetensors")
        for name, param in policy.named_parameters():
            if name in got:
                torch.testing.assert_close(got[name] - param.detach(), -param.grad, rtol=1e-4, atol=5e-6, msg=name)
        assert read_metrics(run)[0]["loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)
    finally:
        LOSSES.pop("margin", None)


def test_the_reference_cache_and_generation_agree_on_a_models_fingerprint(tmp_path, init_dir, pair_shards):
    """One model identity: the reference cache's folder and the generation settings name it alike."""
    from dppo.artifacts import model_fingerprint
    from dppo.generate import DecodeConfig, generation_settings

    run = run_train(tmp_path / "run", method="dpo", data=str(pair_shards), init=str(init_dir), max_samples=4, max_steps=1)
    saved = json.loads((run / "config.json").read_text())
    settings = generation_settings(init_dir, init_dir, DecodeConfig(), "fp32")
    assert saved["init"]["fingerprint"] == settings["model_fingerprint"] == model_fingerprint(init_dir)
    caches = [p.name for p in (pair_shards / "refcache").iterdir()]
    assert f"{settings['model_fingerprint']}-fp32" in caches


# -- failed starts and full disks ------------------------------------------------------------------


def test_a_model_whose_weights_cannot_be_read_is_refused_before_the_run_folder_is_claimed(tmp_path, init_dir, pair_shards):
    import shutil

    bad = tmp_path / "bad_model"
    shutil.copytree(init_dir, bad)
    weights = bad / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[:8] = b"\xff" * 8  # the header's length: far beyond the file
    weights.write_bytes(bytes(raw))
    run = tmp_path / "run"
    opts = dict(method="dpo", data=pair_shards, max_samples=4, max_steps=1)
    result = CliRunner().invoke(_app(), _flags({**opts, "init": bad}, run))
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors: not a readable safetensors file" in lines[0], result.output
    assert not (run / "config.json").exists() and not (run / "metrics.jsonl").exists()
    # the same command with a readable model: no --overwrite needed, nothing was claimed
    result = CliRunner().invoke(_app(), _flags({**opts, "init": init_dir}, run))
    assert result.exit_code == 0, result.output
    assert len(read_metrics(run)) == 1


def test_a_tracker_that_is_not_installed_is_refused_before_the_reference_pass(tmp_path, monkeypatch, init_dir, pair_shards):
    import shutil

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    shards = tmp_path / "shards"
    shutil.copytree(pair_shards, shards, ignore=shutil.ignore_patterns("refcache"))
    run = tmp_path / "run"
    result = CliRunner().invoke(_app(), _flags(dict(method="dpo", data=shards, init=init_dir, max_samples=4, max_steps=1,
                                                    report_to="wandb"), run))
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--report-to wandb needs the wandb package" in lines[0], result.output
    assert not (run / "config.json").exists() and not (shards / "refcache").exists()


def test_a_run_that_ended_before_its_first_step_starts_again_without_overwrite(tmp_path, init_dir, pair_shards):
    opts = dict(method="dpo", data=str(pair_shards), init=str(init_dir), max_samples=4, max_steps=1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"config": {}}')  # what a run that failed in its reference pass leaves
    (run / "metrics.jsonl").write_text("")
    run_train(run, **opts)
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert json.loads((run / "config.json").read_text())["config"]["method"] == "dpo"
    with pytest.raises(ConfigError, match="already holds a run"):  # one that did a step still needs a word
        run_train(run, **opts)


def _ckpt_opts(pair_shards, init_dir) -> dict:
    return dict(method="dpo", data=str(pair_shards), init=str(init_dir), max_samples=12, max_steps=3, save_every=1)


def _check_full_disk_then_resume(run: Path, opts: dict, error: pytest.ExceptionInfo, monkeypatch) -> None:
    """One line naming the checkpoints folder and the cause, step_1 intact, no leftovers; --resume continues."""
    import errno

    from dppo.train.checkpoint import read_state

    assert error.value.errno == errno.ENOSPC
    assert str(run / "checkpoints") in str(error.value) and "no space left" in str(error.value)
    assert "\n" not in str(error.value)
    assert [s for s, _ in list_checkpoints(run)] == [1]
    read_state(run / "checkpoints" / "step_1")  # sizes and checksums as written
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()  # space freed
    run_train(run, resume=True, **opts)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert list_checkpoints(run)[-1][0] == 3


def test_a_full_disk_before_a_checkpoint_ends_in_one_line_and_resume_continues(tmp_path, monkeypatch, init_dir, pair_shards):
    from dppo.train import checkpoint

    calls = []

    def free_bytes(folder):  # room for the first checkpoint only
        calls.append(folder)
        return 1 << 40 if len(calls) == 1 else 4096

    monkeypatch.setattr(checkpoint, "_free_bytes", free_bytes)
    run = tmp_path / "run"
    opts = _ckpt_opts(pair_shards, init_dir)
    with pytest.raises(OSError) as error:
        run_train(run, **opts)
    _check_full_disk_then_resume(run, opts, error, monkeypatch)


def test_a_disk_that_fills_during_a_checkpoint_ends_in_one_line_and_resume_continues(tmp_path, monkeypatch, init_dir, pair_shards):
    import torch.distributed.checkpoint as dcp

    from dppo.train import checkpoint

    save, saves, free_calls = dcp.save, [], []

    def save_until_full(state, checkpoint_id):  # the second checkpoint's weights hit a full disk half-way
        saves.append(checkpoint_id)
        if len(saves) == 3:
            Path(checkpoint_id).mkdir(parents=True)
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"\0" * 598)
            raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 704 vs 598")
        return save(state, checkpoint_id=checkpoint_id)

    def free_bytes(folder):  # plenty before each write; nothing once the write has failed
        free_calls.append(folder)
        return 1 << 40 if len(saves) < 3 else 0

    monkeypatch.setattr(dcp, "save", save_until_full)
    monkeypatch.setattr(checkpoint, "_free_bytes", free_bytes)
    run = tmp_path / "run"
    opts = _ckpt_opts(pair_shards, init_dir)
    with pytest.raises(OSError) as error:
        run_train(run, **opts)
    assert isinstance(error.value.__cause__, RuntimeError)  # the writer's own error stays in the chain
    _check_full_disk_then_resume(run, opts, error, monkeypatch)


def test_a_full_disk_at_a_checkpoint_is_one_line_on_the_command_line(tmp_path, monkeypatch, init_dir, pair_shards):
    from dppo.train import checkpoint

    monkeypatch.setattr(checkpoint, "_free_bytes", lambda folder: 4096)
    run = tmp_path / "run"
    args = _flags(dict(method="dpo", data=pair_shards, init=init_dir, max_samples=4, max_steps=1), run)
    result = CliRunner().invoke(_app(), [*args, "--save-every", "1"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.strip().endswith(errors[0]), result.output  # one line, no traceback
    assert f"{run / 'checkpoints'}" in errors[0] and "no space left" in errors[0]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_real_full_disk_keeps_earlier_checkpoints_and_resume_continues(tmp_path, init_dir, pair_shards):
    import errno

    first = tmp_path / "first"
    run_train(first, **{**_ckpt_opts(pair_shards, init_dir), "max_steps": 1})
    size = sum(p.stat().st_size for p in (first / "checkpoints" / "step_1").rglob("*") if p.is_file())
    disk = tmp_path / "disk"
    disk.mkdir()
    room = int(size * 1.5) + (64 << 10)  # one checkpoint and the run's small files, not two checkpoints
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={room}", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        run = disk / "run"
        opts = _ckpt_opts(pair_shards, init_dir)
        with pytest.raises(OSError) as error:
            run_train(run, **opts)
        assert error.value.errno == errno.ENOSPC and str(run / "checkpoints") in str(error.value)
        assert [s for s, _ in list_checkpoints(run)] == [1]
        from dppo.train.checkpoint import read_state

        read_state(run / "checkpoints" / "step_1")
        subprocess.run(["mount", "-o", f"remount,size={room * 4}", str(disk)], check=True)  # space freed
        run_train(run, resume=True, **opts)
        assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_score_pairs_fills_the_cache_a_training_run_reads(tmp_path, init_dir, pair_shards, capsys):
    import shutil

    from dppo.train import score_pairs

    shards = tmp_path / "shards"
    shutil.copytree(pair_shards, shards, ignore=shutil.ignore_patterns("refcache"))
    scored = score_pairs(init_dir, shards, range(4), dtype="fp32", device="cpu")
    assert not scored.hit and np.isfinite(scored.chosen[:4]).all() and np.isnan(scored.chosen[4:]).all()
    with torch.no_grad():  # the values: each pair's responses under the model, as the trainer's forward gives them
        model, ex = load_model(init_dir, dtype="fp32", device="cpu"), open_shards(shards)[2]
        want = sequence_logps(model, PackedBatch.from_sequences([(ex["prompt_ids"], ex["chosen_ids"])])).sums[0]
    assert scored.chosen[2] == pytest.approx(float(want), abs=1e-5)
    run_train(tmp_path / "run", method="dpo", data=str(shards), init=str(init_dir), ref=str(init_dir), max_samples=4,
              max_steps=1)
    assert "reference log-probs (train, 4 pairs) reused" in capsys.readouterr().err.replace("\n", " ")
