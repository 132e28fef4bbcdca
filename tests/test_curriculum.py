"""``dppo curriculum``: each round's y_gen is the entering policy's greedy generation, each round's
model is what ``dppo train`` makes by hand on that round's shards, and an interrupted curriculum
resumes to the same end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dppo import engine
from dppo.curriculum import CurriculumConfig, curriculum, round_prompts
from dppo.errors import ConfigError
from dppo.generate import load_prompts
from dppo.generate.run import DecodeConfig, read_generations, stop_token_ids
from dppo.generate.decoding import SamplingConfig

from train_fixtures import *  # noqa: F403
from train_fixtures import run_train

TRAIN = dict(optimizer="sgd", lr=0.5, batch_size=2, grad_accum=2, max_steps=2, warmup_steps=0, max_grad_norm=0.0,
             save_every=1, beta=0.1, alpha=1.0, vote_clip=20.0, progress=False)


def config(out: Path, pairs_file: Path, tok_dir: Path, init_dir: Path, **kw) -> CurriculumConfig:
    return CurriculumConfig(**{"rounds": 2, "method": "unll", "data": str(pairs_file), "tokenizer": str(tok_dir),
                               "init": str(init_dir), "out": out, "pairs_per_round": 16,
                               "decode": DecodeConfig(sampling=SamplingConfig(max_new_tokens=8), batch_size=8),
                               "train": dict(TRAIN), **kw})


def test_round_prompts_walk_the_data_and_wrap_into_a_new_shuffle():
    rounds = round_prompts(10, 4, 4, seed=3)
    assert [r.tolist() for r in rounds[:2]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    third = rounds[2].tolist()
    assert third[:2] == [8, 9] and len(third) == 4 and len(set(third)) == 4
    perm = np.random.default_rng([3, 1]).permutation(10).tolist()
    assert third[2:] == perm[:2] and rounds[3].tolist() == perm[2:6]
    assert all((r == np.arange(5)).all() for r in round_prompts(5, None, 3, 0))


def test_each_round_generates_with_its_policy_and_trains_as_dppo_train_would(tmp_path, pairs_file, tok_dir, init_dir):
    from transformers import AutoModelForCausalLM

    cfg = config(tmp_path / "cur", pairs_file, tok_dir, init_dir)
    record = curriculum(cfg, show_progress=False)
    assert [r["round"] for r in record["rounds"]] == [1, 2]
    rows, _ = load_prompts(str(pairs_file))
    plan = round_prompts(len(rows), 16, 2, 0)
    stop = stop_token_ids(tok_dir, init_dir)
    for k, policy in ((1, init_dir), (2, tmp_path / "cur" / "round_1" / "model")):
        rdir = tmp_path / "cur" / f"round_{k}"
        # y_gen: transformers' greedy generate of the policy entering the round, prompt by prompt
        lm = AutoModelForCausalLM.from_pretrained(str(policy), dtype=torch.float32).eval()
        gens = {g["prompt_id"]: g for g in read_generations(rdir / "ygen.parquet")}
        subset = [rows[i] for i in plan[k - 1]]
        assert sorted(gens) == sorted(r.prompt_id for r in subset)
        ids = engine.encode_prompts(str(tok_dir), [list(r.messages) for r in subset])
        for r, prompt in zip(subset, ids, strict=True):
            x = torch.tensor([prompt])
            out = lm.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8, do_sample=False,
                              eos_token_id=stop, pad_token_id=stop[0])[0, len(prompt):].tolist()
            cut = next((i for i, t in enumerate(out) if t in stop), len(out))
            assert list(gens[r.prompt_id]["response_ids"]) == out[:cut], (k, r.prompt_id)
        # the model: dppo train by hand on the round's shards with the same options
        by_hand = run_train(tmp_path / f"hand_{k}", method="unll", data=str(rdir / "shards"), init=str(policy),
                            ref=str(init_dir), **{**TRAIN, "save_every": 0})
        a, b = load_file(rdir / "model" / "model.safetensors"), load_file(by_hand / "model" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), k
        summary = record["rounds"][k - 1]
        assert 0.0 <= summary["wrong_vote_fraction"] <= 1.0 and summary["pairs"] == 16 and summary["steps"] == 2
    saved = json.loads((tmp_path / "cur" / "curriculum.json").read_text())
    assert saved["rounds"] == record["rounds"]
    last = load_file(tmp_path / "cur" / "model" / "model.safetensors")
    two = load_file(tmp_path / "cur" / "round_2" / "model" / "model.safetensors")
    assert all(torch.equal(last[n], two[n]) for n in two)


def test_an_interrupted_curriculum_resumes_to_the_same_end(tmp_path, pairs_file, tok_dir, init_dir, monkeypatch):
    import dppo.train.loop as loop

    whole = curriculum(config(tmp_path / "whole", pairs_file, tok_dir, init_dir, round_ref="previous"), show_progress=False)
    calls = {"n": 0}
    real = loop.save_checkpoint

    def dies_in_round_2(*args, **kwargs):  # round 2's first checkpoint is written, then the job dies
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(loop, "save_checkpoint", dies_in_round_2)
    cut = config(tmp_path / "cut", pairs_file, tok_dir, init_dir, round_ref="previous")
    with pytest.raises(KeyboardInterrupt):
        curriculum(cut, show_progress=False)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="--resume"):
        curriculum(cut, show_progress=False)
    again = curriculum(config(tmp_path / "cut", pairs_file, tok_dir, init_dir, round_ref="previous", resume=True),
                       show_progress=False)
    a, b = (load_file(tmp_path / d / "model" / "model.safetensors") for d in ("whole", "cut"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("_s") and k not in ("policy", "reference")} for r in rs]  # noqa: E731
    assert strip(whole["rounds"]) == strip(again["rounds"])
    assert whole["rounds"][1]["reference"].endswith("round_1/model")  # previous: the entering policy


def test_options_the_curriculum_owns_are_refused(tmp_path, pairs_file, tok_dir, init_dir):
    with pytest.raises(ConfigError, match="--ref is set by the curriculum"):
        config(tmp_path / "x", pairs_file, tok_dir, init_dir, train={**TRAIN, "ref": "m"})
    with pytest.raises(ConfigError, match="penalizes y_gen"):
        config(tmp_path / "x", pairs_file, tok_dir, init_dir, method="dpo")
    with pytest.raises(ConfigError, match="--lr"):
        curriculum(config(tmp_path / "y", pairs_file, tok_dir, init_dir, train={**TRAIN, "lr": -1.0}), show_progress=False)
    assert not (tmp_path / "y" / "round_1" / "ygen.parquet").exists()  # refused before any generation


def test_the_command_line(tmp_path, pairs_file, tok_dir, init_dir):
    from typer.testing import CliRunner

    from dppo.cli.main import app

    args = ["curriculum", "--rounds", "1", "--method", "unll", "--data", str(pairs_file), "--tokenizer", str(tok_dir),
            "--init", str(init_dir), "--out", str(tmp_path / "c"), "--pairs-per-round", "8", "--max-new-tokens", "6",
            "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "1",
            "--warmup-steps", "0", "--alpha", "0.5", "--alpha-schedule", "linear", "--alpha-end", "0", "--no-progress"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    saved = json.loads((tmp_path / "c" / "round_1" / "config.json").read_text())["config"]
    assert saved["alpha_schedule"] == "linear" and saved["lr"] == 0.1 and saved["method"] == "unll"
    r = CliRunner().invoke(app, [*args[:-1], "--ref", "x"])
    assert r.exit_code != 0 and "No such option: --ref" in r.output
