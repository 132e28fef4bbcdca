"""Penalty schedules (--alpha-schedule): the formula, a two-step run against hand-computed steps, resume."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dppo.data import open_shards
from dppo.errors import ConfigError
from dppo.train import DataOrder, alpha_at
from dppo.train.config import load_config

from train_fixtures import hand_loss, load_plain
from train_fixtures import *  # noqa: F403
from train_fixtures import FAST, read_metrics, run_train

BASE = dict(method="unll", data="d", init="i", out="o")


def cfg_of(**kw):
    return load_config(None, **{**BASE, **kw})


def test_the_schedules_by_hand():
    lin = cfg_of(alpha=2.0, alpha_schedule="linear", alpha_end=0.0)
    assert [alpha_at(lin, s, 5) for s in range(5)] == pytest.approx([2.0, 1.5, 1.0, 0.5, 0.0])
    cos = cfg_of(alpha=1.0, alpha_schedule="cosine", alpha_end=0.2)
    assert alpha_at(cos, 0, 3) == pytest.approx(1.0) and alpha_at(cos, 2, 3) == pytest.approx(0.2)
    assert alpha_at(cos, 1, 3) == pytest.approx(0.2 + 0.8 * (1 + math.cos(math.pi / 2)) / 2)
    step = cfg_of(alpha=0.1, alpha_schedule="step", alpha_end=0.4, alpha_steps="2,5,7")
    assert [alpha_at(step, s, 9) for s in range(9)] == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4])
    assert alpha_at(lin, 0, 1) == 2.0  # S = 1: alpha
    assert alpha_at(cfg_of(alpha=0.3), 7, 10) == 0.3
    assert alpha_at(cfg_of(method="dpo"), 0, 10) is None


@pytest.mark.parametrize("bad,match", [
    (dict(alpha_schedule="linear"), "needs --alpha-end"),
    (dict(alpha_end=0.0), "--alpha-end needs --alpha-schedule"),
    (dict(alpha_schedule="step", alpha_end=0.0), "--alpha-steps goes with"),
    (dict(alpha_schedule="step", alpha_end=0.0, alpha_steps="3,1"), "increasing"),
    (dict(alpha_schedule="warp", alpha_end=0.0), "must be one of"),
    (dict(method="dpo", alpha_schedule="linear", alpha_end=0.0), "minll, unll, conll"),
])
def test_bad_schedules_are_refused_in_one_line(bad, match):
    with pytest.raises(ConfigError, match=match):
        cfg_of(**bad)


def test_linear_two_to_zero_over_two_steps_is_an_unll_step_then_a_dpo_step(tmp_path, init_dir, pair_shards):
    lr, common = 1.0, dict(beta=0.5, vote_clip=20.0)
    run = run_train(tmp_path / "run", method="unll", data=str(pair_shards), init=str(init_dir), optimizer="sgd", lr=lr,
                    max_samples=8, max_steps=2, alpha=2.0, alpha_schedule="linear", alpha_end=0.0, **common)
    assert [m["alpha"] for m in read_metrics(run)] == [2.0, 0.0]
    # by hand: step 1 is unll at alpha 2, step 2 DPO (alpha 0), each against the same reference (--init)
    order = DataOrder(8, FAST["batch_size"] * FAST["grad_accum"], 1, 2, 0)
    shards = open_shards(pair_shards)
    policy, ref = load_plain(init_dir), load_plain(init_dir)
    unll = load_config(None, method="unll", data=str(pair_shards), init=str(init_dir), out="x", alpha=2.0, **FAST, **common)
    dpo = load_config(None, method="dpo", data=str(pair_shards), init=str(init_dir), out="x", beta=0.5, **FAST)
    for cfg, s in ((unll, 0), (dpo, 1)):
        policy.zero_grad()
        hand_loss(cfg, shards, order.step_examples(s), policy, ref).backward()
        with torch.no_grad():
            for p in policy.parameters():
                if p.grad is not None:
                    p -= lr * p.grad
    got = load_file(run / "model" / "model.safetensors")
    w0 = load_file(init_dir / "model.safetensors")
    for name, p in policy.named_parameters():
        if name in got:
            update = float((p.detach() - w0[name]).abs().max())
            torch.testing.assert_close(got[name], p.detach(), rtol=0, atol=1e-5 * max(update, 1e-3) + 3e-7, msg=name)


def test_a_resumed_run_continues_the_schedule(tmp_path, init_dir, pair_shards):
    opts = dict(method="unll", data=str(pair_shards), init=str(init_dir), optimizer="adamw", lr=1e-3, max_samples=24,
                max_steps=6, save_every=2, keep_last=0, alpha=1.0, alpha_schedule="cosine", alpha_end=0.1, vote_clip=20.0)
    whole = run_train(tmp_path / "whole", **opts)
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for p in ("model", "checkpoints/step_6", "checkpoints/step_4"):
        shutil.rmtree(cut / p)
    run_train(cut, resume=True, **opts)
    a, b = read_metrics(whole), read_metrics(cut)
    assert [m["alpha"] for m in a] == [m["alpha"] for m in b]
    assert a[-1]["alpha"] == pytest.approx(0.1)
    wa, wb = (load_file(r / "model" / "model.safetensors") for r in (whole, cut))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
