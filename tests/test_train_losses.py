"""TRL's pair losses, their combinations and the penalties on any pair loss, through the trainer:
one SGD step equals the step computed by hand from a plain transformers forward, a step split into
micro-batches (and ranks) gives the same update, every method trains two steps and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dppo.data import open_shards
from dppo.train.config import load_config
from dppo.train.registry import BUILTIN
from test_losses_pairs import formula
from test_train import TIME_FIELDS, load_plain, plain_token_logps
from train_fixtures import *  # noqa: F403
from train_fixtures import FAST, read_metrics, run_train

NEW = [m for m in BUILTIN if m not in ("sft", "dpo", "simpo", "minll", "unll", "conll")]


class _Plain:
    """The per-token log-probs of a batch from a plain transformers forward, in the layout of
    test_losses_pairs.Tokens (so its formulas apply)."""

    def __init__(self, policy, ref, shards, ids):
        rows, refs = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for i in ids:
                ex = shards[int(i)]
                rows.append(plain_token_logps(policy, ex["prompt_ids"], ex[side]))
                with torch.no_grad():
                    refs.append(plain_token_logps(ref, ex["prompt_ids"], ex[side]).sum())
        # the chosen sequences' prompt tokens after the first (orpo's NLL, as TRL's ORPOTrainer)
        prompts = []
        for i in ids:
            ex = shards[int(i)]
            p = ex["prompt_ids"]
            prompts.append(plain_token_logps(policy, p[:1], np.concatenate([p[1:], ex["chosen_ids"]]))[: len(p) - 1])
        t = max(len(r) for r in rows + prompts)
        self.b = len(ids)
        self.mask = torch.stack([torch.arange(t) < len(r) for r in rows])
        self.tok = torch.stack([torch.cat([r, r.new_zeros(t - len(r))]) for r in rows])
        self.pmask = torch.stack([torch.arange(t) < len(r) for r in prompts])
        self.ptok = torch.stack([torch.cat([r, r.new_zeros(t - len(r))]) for r in prompts])
        self.ref = torch.stack(refs)

    def sums(self):
        # fp32 token log-probs summed in float64, as the trainer sums them (a float32 sum of ~60
        # terms of a sequence log-prob near -230 loses ~1e-5, which discopop's curvature at a
        # small tau turns into gradient gaps of ~1e-4)
        s = (self.tok.double() * self.mask).sum(1).to(self.tok.dtype)
        return s[: self.b], s[self.b :]

    def counts(self):
        n = self.mask.sum(1)
        return n[: self.b], n[self.b :]


@pytest.mark.parametrize("method,opts", [
    ("ipo", {}), ("orpo", {}), ("orpo", {"orpo_nll": "answer"}), ("aot", {"label_smoothing": 0.1}), ("aot_unpaired", {}), ("exo_pair", {}),
    ("discopop", {}), ("discopop", {"discopop_tau": 0.5}), ("dpo", {"label_smoothing": 0.2}),
])
def test_sgd_step_equals_hand_computed_step(tmp_path, method, opts, init_dir, ref_dir, pair_shards):
    """One SGD step of the trainer against the loss written out by hand on a plain transformers
    forward. discopop runs at TRL's tau 0.05 as well as 0.5: its mixing weight s(x / tau) makes the
    gradient's sensitivity to the margin x grow as 1/tau^2, so ~1e-5 of float32 rounding in a
    sequence's log-prob (a float32 running sum of its tokens) became gradient gaps up to 7e-5 at
    tau 0.05. Both sides sum the fp32 token log-probs in float64 (the trainer's sequence_logps, the
    hand's _Plain.sums), and the step then agrees within the tolerance of every other loss."""
    beta = 0.5
    extra = {"beta": beta, **opts, **({"ref": str(ref_dir)} if method != "orpo" else {})}
    # a small token budget splits the step into micro-batches: aot's sort is over the whole step
    run = run_train(tmp_path / "run", method=method, data=str(pair_shards), init=str(init_dir), optimizer="sgd", lr=1.0,
                    max_samples=4, max_steps=1, max_tokens_per_batch=120, **extra)
    cfg = load_config(None, method=method, data=str(pair_shards), init=str(init_dir), out="x", **{**FAST, **extra})
    policy, ref = load_plain(init_dir), load_plain(ref_dir if method != "orpo" else init_dir)
    hand = formula(method, _Plain(policy, ref, open_shards(pair_shards), range(4)), beta, cfg.label_smoothing, cfg.discopop_tau,
                   cfg.orpo_nll)
    assert read_metrics(run)[0]["loss"] == pytest.approx(hand.item(), rel=1e-5, abs=1e-6)
    hand.backward()
    got = load_file(run / "model" / "model.safetensors")
    for name, param in policy.named_parameters():
        if name in got:
            # fp32 weights moved by the step: rounding of w - g at ~1e-5 of the largest gradient
            scale = max(1.0, float(param.grad.abs().max()))
            torch.testing.assert_close(got[name] - param.detach(), -param.grad, rtol=1e-4, atol=2e-5 * scale,
                                       msg=lambda m, name=name: f"{name}: {m}")
    assert read_metrics(run)[0]["loss"] == pytest.approx(hand.item(), rel=1e-5, abs=1e-6)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


@pytest.mark.parametrize("method,opts", [
    ("dpo+sft", {"loss_weights": "1,0.5"}), ("ipo+unll", {"alpha": 1.0, "vote_clip": 20.0}),
    ("orpo+minll", {"alpha": 0.5, "weight": "linear", "vote_clip": 20.0}), ("aot_unpaired", {}), ("orpo", {}),
])
def test_a_step_split_into_micro_batches_gives_the_same_update(tmp_path, method, opts, init_dir, ref_dir, pair_shards):
    common = dict(method=method, data=str(pair_shards), init=str(init_dir), optimizer="sgd", lr=1.0, max_samples=6,
                  max_steps=1, batch_size=6, grad_accum=1, beta=0.5, **opts)
    whole = run_train(tmp_path / "whole", **common)
    # micro-batches of at most 2 pairs and 100 tokens, log-probs in chunks of 16 tokens
    split = run_train(tmp_path / "split", **{**common, "batch_size": 2, "grad_accum": 3, "max_tokens_per_batch": 100,
                                             "chunk_size": 16})
    a, b = _weights(whole), _weights(split)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    ma, mb = read_metrics(whole)[0], read_metrics(split)[0]
    assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-6)
    for k in ma:
        if k.startswith("loss/"):
            assert ma[k] == pytest.approx(mb[k], rel=1e-6), k


def test_a_penalty_term_at_alpha_zero_trains_exactly_as_the_base_loss(tmp_path, init_dir, ref_dir, pair_shards):
    common = dict(data=str(pair_shards), init=str(init_dir), ref=str(ref_dir), optimizer="sgd", lr=1.0, max_samples=4,
                  max_steps=2, beta=0.5)
    base = run_train(tmp_path / "base", method="ipo", **common)
    pen = run_train(tmp_path / "pen", method="ipo+unll", alpha=0.0, **common)
    a, b = _weights(base), _weights(pen)
    assert all(torch.equal(a[k], b[k]) for k in a)
    mp, mb = read_metrics(pen), read_metrics(base)
    assert [m["loss"] for m in mb] == [m["loss"] for m in mp]
    assert all(m["penalized"] == 0 for m in mp)
    assert [m["tokens"] for m in mb] == [m["tokens"] for m in mp]  # no y_gen forward ran


def test_metrics_log_each_terms_value(tmp_path, init_dir, pair_shards, capfd):
    run = run_train(tmp_path / "run", method="dpo+bco_pair+sft", loss_weights="0.8,0.2,1", data=str(pair_shards),
                    init=str(init_dir), max_samples=4, max_steps=1)
    m = read_metrics(run)[0]
    assert m["loss"] == pytest.approx(0.8 * m["loss/dpo"] + 0.2 * m["loss/bco_pair"] + m["loss/sft"], rel=1e-6)
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["loss_weights"] == "0.8,0.2,1" and saved["beta"] == 0.01
    capfd.readouterr()
    orpo = read_metrics(run_train(tmp_path / "orpo", method="orpo", data=str(pair_shards), init=str(init_dir),
                                  max_samples=4, max_steps=1))[0]
    assert "reference log-probs" not in capfd.readouterr().err  # no reference pass, no cache
    assert orpo["loss"] == pytest.approx(orpo["nll_loss"] + orpo["loss/odds_ratio"], rel=1e-6)
    assert "rewards/margins" in orpo
    assert json.loads((tmp_path / "orpo" / "config.json").read_text())["config"]["ref"] is None


def test_option_checks(init_dir, pair_shards):
    from dppo.errors import ConfigError

    base = dict(data=str(pair_shards), init=str(init_dir), out="x")
    for method, opts, match in (
        ("ipo", {"label_smoothing": 0.1}, "label-smoothing"), ("dpo", {"discopop_tau": 0.1}, "discopop-tau"),
        ("ipo", {"loss_weights": "1"}, "loss-weights"), ("robust", {"label_smoothing": 0.5}, "0.5"),
        ("ipo+sft", {"loss_weights": "1"}, "one weight per term"), ("ipo+conll", {}, "conll"),
        ("orpo", {"ref": "x"}, "--ref"), ("orpo+unll", {"vote": "ref"}, "no reference model"),
        ("ipo", {"alpha": 0.1}, "--alpha"), ("dpo", {"orpo_nll": "answer"}, "orpo-nll"),
        ("orpo+sft", {}, "orpo_nll 'answer'"), ("orpo", {"orpo_nll": "prompt"}, "orpo_nll"),
    ):
        with pytest.raises(ConfigError, match=match):
            load_config(None, method=method, **base, **opts)


def _two_steps_and_resume(tmp_path: Path, method: str, init_dir: Path, data: Path, **extra) -> None:
    common = dict(method=method, data=str(data), init=str(init_dir), optimizer="adamw", lr=1e-3, warmup_steps=0,
                  max_samples=8, batch_size=2, grad_accum=2, save_every=1, keep_last=0, max_tokens_per_batch=200, **extra)
    if method.split("+")[0] in ("exo_pair",):
        common["label_smoothing"] = 0.01
    whole = run_train(tmp_path / "whole", max_steps=2, **common)
    run_train(tmp_path / "cut", max_steps=2, **common)
    import shutil

    for done in ("model", "adapter", "checkpoints/step_2"):  # as if killed after step 1's checkpoint
        shutil.rmtree(tmp_path / "cut" / done, ignore_errors=True)
    run_train(tmp_path / "cut", max_steps=2, resume=True, **common)
    a, b = _weights(whole), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a), method
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in rows]  # noqa: E731
    assert strip(read_metrics(whole)) == strip(read_metrics(tmp_path / "cut"))


FAST_METHODS = ["ipo", "orpo", "aot", "ipo+unll"]


@pytest.mark.parametrize("method", [*FAST_METHODS, *[pytest.param(m, marks=pytest.mark.slow) for m in NEW + ["dpo+sft", "orpo+minll"]
                                                      if m not in FAST_METHODS]])
def test_every_method_trains_two_steps_and_resumes_exactly(tmp_path, method, init_dir, pair_shards):
    _two_steps_and_resume(tmp_path, method, init_dir, pair_shards)


def test_bco_running_mean_is_kept_in_checkpoints(tmp_path, init_dir, pair_shards):
    _two_steps_and_resume(tmp_path, "bco_pair", init_dir, pair_shards, bco_running_mean=True)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step_1" / "state.json").read_text())
    assert state["loss_state"]["bco_steps"] == 1
    m = read_metrics(tmp_path / "cut")
    # delta after step 1 is step 1's mean reward; after step 2 the mean of both steps' means
    assert m[0]["bco_delta"] == pytest.approx(state["loss_state"]["bco_mean"], rel=1e-6)
    final = json.loads((tmp_path / "cut" / "checkpoints" / "step_2" / "state.json").read_text())["loss_state"]
    assert final["bco_steps"] == 2 and m[1]["bco_delta"] == pytest.approx(final["bco_mean"], rel=1e-6)


# -- many ranks: torchrun with gloo, 2 processes, against one process ---------------------------------

RANK_CASES = {
    "aot": {"label_smoothing": 0.1},
    "bco_pair": {"bco_running_mean": True},
    "orpo+unll": {"alpha": 1.0, "vote_clip": 20.0},
    "dpo+sft": {"loss_weights": "1,0.5"},
    "ipo+minll": {"alpha": 1.0, "vote_clip": 20.0, "weight": "linear"},
}


@pytest.mark.parametrize("method,parallel", [
    pytest.param("aot", "fsdp"),
    *[pytest.param(m, p, marks=pytest.mark.slow) for m in RANK_CASES for p in ("fsdp", "ddp") if (m, p) != ("aot", "fsdp")],
])
def test_two_ranks_give_the_update_of_one_process(tmp_path, method, parallel, init_dir, pair_shards):
    from test_distributed import fresh, one_process, relative_difference, torchrun, train_args

    data = fresh(pair_shards, tmp_path)
    opts = {**RANK_CASES[method], "max_tokens_per_batch": 160, "save_every": 1}
    two = torchrun(train_args(method, data, init_dir, tmp_path / "two", parallel=parallel, **opts))
    assert two.returncode == 0, two.stderr[-3000:]
    one = one_process(train_args(method, data, init_dir, tmp_path / "one", **opts))
    assert one.returncode == 0, one.stderr[-3000:]
    assert relative_difference(tmp_path / "one", tmp_path / "two", init_dir) < 1e-5
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        for k in a:
            if k.startswith("loss/") or k in ("bco_delta", "nll_loss"):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    s1, s2 = (json.loads((tmp_path / r / "checkpoints" / "step_3" / "state.json").read_text()) for r in ("one", "two"))
    assert s1["loss_state"].keys() == s2["loss_state"].keys()
    for k in s1["loss_state"]:
        assert s1["loss_state"][k] == pytest.approx(s2["loss_state"][k], rel=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ipo", "orpo+unll", "aot"])
def test_lora_trains_two_steps_and_resumes_exactly(tmp_path, method, init_dir, pair_shards):
    opts = {"lora_r": 4, **({"alpha": 1.0, "vote_clip": 20.0} if "unll" in method else {})}
    _two_steps_and_resume(tmp_path, method, init_dir, pair_shards, **opts)


def test_lora_with_a_penalty_on_a_reference_free_loss(tmp_path, init_dir, pair_shards):
    run = run_train(tmp_path / "run", method="orpo+unll", alpha=1.0, vote_clip=20.0, lora_r=4, data=str(pair_shards),
                    init=str(init_dir), max_samples=4, max_steps=2, gradient_checkpointing=True)
    m = read_metrics(run)
    assert len(m) == 2 and "loss/unll" in m[0] and (run / "adapter").is_dir()
    assert not (run / "refcache").exists()


def test_plan_and_curriculum_take_the_new_losses(tmp_path, init_dir, pair_shards, pairs_file, tok_dir):
    from typer.testing import CliRunner

    from dppo.cli.main import app

    r = CliRunner().invoke(app, ["train", "--method", "orpo+unll", "--data", str(pair_shards), "--init", str(init_dir),
                                 "--out", str(tmp_path / "p"), "--plan"])
    assert r.exit_code == 0, r.output
    args = ["curriculum", "--rounds", "1", "--method", "ipo+unll", "--loss-weights", "1,2", "--data", str(pairs_file),
            "--tokenizer", str(tok_dir), "--init", str(init_dir), "--out", str(tmp_path / "c"), "--pairs-per-round", "8",
            "--max-new-tokens", "6", "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "2", "--grad-accum", "2",
            "--max-steps", "1", "--warmup-steps", "0", "--alpha", "0.5", "--vote-clip", "20", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "c" / "round_1" / "config.json").read_text())["config"]
    assert (saved["method"], saved["loss_weights"], saved["beta"]) == ("ipo+unll", "1,2", 0.1)
    m = read_metrics(tmp_path / "c" / "round_1")[0]
    assert m["loss"] == pytest.approx(m["loss/ipo"] + 2 * m["loss/unll"], rel=1e-6)
