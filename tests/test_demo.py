"""`dppo demo --quick`: every stage runs and leaves its artifacts; SFT against itself scores 0.5."""

from __future__ import annotations

import json
from pathlib import Path

from dppo.cli.main import app
from typer.testing import CliRunner


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert r.exit_code == 0, r.output
    # every stage's artifacts
    for rel in ("world/world.json", "world/sft.parquet", "world/prefs_train.parquet", "world/prefs_test.parquet",
                "shards/sft/meta.json", "base/sft/model/config.json", "base/ygen.parquet",
                "shards/prefs/meta.json", "seed0/eval/results.json", "diagnostics.json", "tune/eval/results.json",
                "tune/choices.json", "seed0/runs/curriculum/curriculum.json",
                "results.json", "results.md", "fig_alpha.png", "fig_data_efficiency.png", "fig_reward_diff.png"):
        assert (out / rel).exists(), rel
    for run in ("dpo", "simpo", "minll", "unll", "conll", "unll+dpo", "unll-linear", "curriculum"):
        assert (out / "seed0" / "runs" / run / "model" / "config.json").exists(), run
        run_dir = out / "seed0" / "runs" / run
        # a curriculum keeps each round's training run in round_K/
        assert (run_dir / "metrics.jsonl").exists() or (run_dir / "round_1" / "metrics.jsonl").exists(), run
    res = json.loads((out / "results.json").read_text())
    rows = {row["method"]: row for row in res["table"]}
    assert rows["sft"]["win_rate"] == 0.5  # the SFT model judged against itself: all ties
    assert set(rows) >= {"dpo", "simpo", "minll", "unll", "conll", "unll+dpo", "curriculum", "unll-linear"}
    assert all(0 <= rows[m]["lc_win_rate"] <= 1 for m in ("dpo", "unll", "curriculum"))
    # the settings each method trained with are the ones chosen on the validation prompts
    tuning = res["tuning"]
    assert {g["method"] for g in tuning["grid"]} == {"dpo", "simpo", "minll", "unll", "conll"}
    for m in ("dpo", "unll"):
        cfg = json.loads((out / "seed0" / "runs" / m / "config.json").read_text())["config"]
        assert cfg["lr"] == tuning[m]["lr"] and cfg[tuning[m]["knob"]] == tuning[m]["value"]
        best = max(g["val_win_rate"] for g in tuning["grid"] if g["method"] == m)
        assert tuning[m]["val_win_rate"] == best
    # the quick demo's online row: one round of unll, judged by the demo's judge, at unll's chosen settings
    cur = json.loads((out / "seed0" / "runs" / "online-unll" / "curriculum.json").read_text())
    assert cur["options"]["online"]["judge"] == "demo" and cur["options"]["online"]["samples"] == 4
    assert len(cur["rounds"]) == 1 and cur["rounds"][0]["pairs"] > 0
    rcfg = json.loads((out / "seed0" / "runs" / "online-unll" / "round_1" / "config.json").read_text())["config"]
    assert rcfg["lr"] == tuning["unll"]["lr"] and rcfg["alpha"] == tuning["unll"]["value"]
    assert "online-unll" in rows and 0 <= rows["online-unll"]["win_rate"] <= 1
    assert res["online"]["unll"][0]["pairs"] == cur["rounds"][0]["pairs"] and (out / "fig_online.png").exists()
    lin = json.loads((out / "seed0" / "runs" / "unll-linear" / "config.json").read_text())["config"]
    assert lin["alpha_schedule"] == "linear" and lin["alpha_end"] == 0.0
    assert set(res["versions"]) >= {"dppo", "torch", "transformers", "numpy", "cpu"} and res["world_version"] == 3
    assert res["settings"]["seeds"] == 1
    diag = res["diagnostics"]
    assert 0 <= diag["sft_prefers_rejected"] <= 1 and diag["pairs"] == 320
    assert diag["mean_tokens_chosen"] >= diag["mean_tokens_rejected"] > 1  # UltraFeedback's direction (world v3)
    # the same world and settings give the same table
    meta = json.loads((out / "shards" / "prefs" / "meta.json").read_text())
    assert meta["counts"]["has_ygen"]
    # one progress display: the stages' own messages go to demo.log, not the terminal
    log = (out / "demo.log").read_text()
    assert "done:" in log and "reference log-probs" in log
    assert "step 1/" not in r.output and "done:" not in r.output
    assert "results.md" in r.output and "demo.log" in r.output
    assert set(res["stage_seconds"]) >= {"make the world", "train sft", "generate y_gen", "sft votes on the pairs",
                                         "tune: eval on the validation prompts", "seed 0: train dpo", "seed 0: eval vs sft"}
    # run again into the same folder: every stage is reused, the table is the same
    again = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)])
    assert again.exit_code == 0, again.output
    res2 = json.loads((out / "results.json").read_text())
    assert res2["table"] == res["table"]
    assert res2["seconds"] < res["seconds"] / 3 and len(res2["stages_reused"]) == len(res["stage_seconds"])
    # the stages' own times are kept from when they ran, and results.md says the run reused them
    assert res2["stage_seconds"] == res["stage_seconds"]
    md = (out / "results.md").read_text()
    assert f"reused {len(res2['stages_reused'])} of" in md and f"took {res['stage_seconds_total']:.0f} s" in md
    # the default demo into the quick demo's folder would reuse stages made with other settings: refused
    other = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert other.exit_code == 1 and "other settings" in other.output and "n_sft 8000 there, 48000 now" in other.output
    # and from scratch in another folder: the same world and settings give the same table
    fresh = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "again")])
    assert fresh.exit_code == 0, fresh.output
    res3 = json.loads((tmp_path / "again" / "results.json").read_text())
    judged = ("method", "win_rate", "se", "strict_win_rate", "mean_judge_score", "per_seed_win_rates")
    assert [{k: row[k] for k in judged} for row in res3["table"]] == [{k: row[k] for k in judged} for row in res["table"]]
    assert res3["diagnostics"] == res["diagnostics"] and res3["settings"] == res["settings"]


def test_the_full_demo_plans_online_ipo_unll_at_its_tuned_settings(tmp_path, monkeypatch):
    """The default demo (not run here: planned only) tunes ipo+unll on the validation grid like every
    method, trains it offline per seed, and runs its online rounds (dppo curriculum --pairs judge, the
    demo's judge) at the settings the grid chose, with unll's vote clip; --quick keeps its one online
    round of unll."""
    import dppo.curriculum
    from dppo.demo.pipeline import FULL, QUICK, _Demo
    from dppo.train.config import load_config
    from rich.console import Console

    demo = _Demo(FULL, tmp_path, Console(quiet=True))
    demo.tuning_stages()
    demo.seed_stages(0)
    names = [name for name, _, _ in demo.plan.stages]
    assert [n for n in names if n.startswith("tune: ipo+unll")] == [
        f"tune: ipo+unll-lr{lr:g}-alpha{a:g}" for lr in FULL.tune_lrs for a in (0.1, 1.0)]
    assert "seed 0: train ipo+unll" in names
    online = [n for n in names if n.startswith("seed 0: online")]
    assert online == [f"seed 0: online {m}, 2 rounds of 4 samples" for m in ("dpo", "unll", "ipo+unll")]
    # the online stage's call, with the choices tuning would have written
    (tmp_path / "tune").mkdir()
    (tmp_path / "tune" / "choices.json").write_text(json.dumps(
        {"ipo+unll": {"lr": 3e-5, "knob": "alpha", "value": 1.0, "val_win_rate": 0.6, "run": "x"}}))
    seen = []
    monkeypatch.setattr(dppo.curriculum, "curriculum", lambda cfg, **kw: seen.append(cfg))
    stage = dict((name, fn) for name, _, fn in demo.plan.stages)
    stage["seed 0: online ipo+unll, 2 rounds of 4 samples"]()
    (cfg,) = seen
    assert cfg.method == "ipo+unll" and cfg.pairs == "judge" and cfg.rounds == 2 and cfg.round_ref == "init"
    assert cfg.online.judge == "demo" and cfg.online.samples == 4 and cfg.online.prompts_per_round == FULL.n_pairs // 2
    assert Path(cfg.out).name == "online-ipo+unll" and cfg.init == str(demo.sft_model)
    assert {k: cfg.train[k] for k in ("lr", "alpha", "vote_clip", "seed")} == {"lr": 3e-5, "alpha": 1.0, "vote_clip": 120.0,
                                                                           "seed": 0}
    trained = load_config(None, method=cfg.method, data="-", init="-", out="-", **cfg.train)
    assert trained.alpha == 1.0 and trained.vote_clip == 120.0 and trained.beta == 0.1  # IPO at TRL's default beta
    # the quick demo is as it was: no ipo+unll, one online round of unll
    quick = _Demo(QUICK, tmp_path / "quick", Console(quiet=True))
    quick.tuning_stages()
    quick.seed_stages(0)
    qnames = [name for name, _, _ in quick.plan.stages]
    assert not any("ipo+unll" in n for n in qnames)
    assert [n for n in qnames if "online" in n] == ["seed 0: online unll, 1 rounds of 4 samples"]


def test_seed0_test_runs_and_the_alpha_sweeps_chosen_point_are_copies_of_identical_runs(tmp_path):
    """Tuning trains every grid point on seed 0, so seed 0's test run of a method at its chosen
    settings is that run: copied, not trained again; so is the alpha sweep's point at unll's chosen
    alpha (the seed's unll run). Other seeds and other alphas train."""
    from dppo.demo.pipeline import FULL, TUNING_SEED, _Demo, _job_copy_run, _job_train
    from rich.console import Console

    demo = _Demo(FULL, tmp_path, Console(quiet=True))
    demo.tuning_stages()
    demo.seed_stages(0)
    demo.seed_stages(1)
    (tmp_path / "tune").mkdir()
    choices = {m: {"lr": 1e-4, "knob": k, "value": vals[-1], "val_win_rate": 0.5, "run": f"{m}-lr0.0001-{k}{vals[-1]:g}"}
               for m, k, vals in FULL.tune_knobs}
    (tmp_path / "tune" / "choices.json").write_text(json.dumps(choices))
    assert TUNING_SEED == 0
    for m in demo.methods:
        fn, args = demo.plan.jobs[f"seed 0: train {m}"][0]()
        assert fn is _job_copy_run and args == (tmp_path / "tune" / "runs" / choices[m]["run"], tmp_path / "seed0" / "runs" / m)
        fn, (cfg,) = demo.plan.jobs[f"seed 1: train {m}"][0]()
        assert fn is _job_train and cfg.seed == 1 and cfg.lr == 1e-4 and getattr(cfg, choices[m]["knob"]) == choices[m]["value"]
    chosen_alpha = choices["unll"]["value"]
    for seed in (0, 1):
        for a in FULL.alphas:
            job, needs = demo.plan.jobs[f"seed {seed}: train unll alpha={a:g}"]
            fn, args = job()
            assert needs == (f"seed {seed}: train unll",)
            if a == chosen_alpha:
                assert fn is _job_copy_run and args == (tmp_path / f"seed{seed}" / "runs" / "unll", tmp_path / f"seed{seed}" / "runs" / "unll-alpha1")
            else:
                assert fn is _job_train and args[0].alpha == a and args[0].seed == seed
    # the test evaluations wait for their seed's runs and for the one before (they share a cache)
    _, needs = demo.plan.jobs["seed 1: eval vs sft"]
    assert "seed 0: eval vs sft" in needs and "seed 1: online unll, 2 rounds of 4 samples" in needs
    assert "seed 1: train unll+dpo" in needs and all(n.startswith(("seed 1", "seed 0: eval")) for n in needs)


def test_stages_run_in_workers_after_what_they_need_and_a_failure_is_raised(tmp_path):
    """The scheduler: job stages in worker processes, each after the stages it needs; a stage without a
    job waits for every running one; a failing job is raised after the others finished; each stage's
    time and messages are kept."""
    import pytest
    from dppo.demo.pipeline import _job_copy_run, _Plan, _run_stages
    from rich.console import Console

    src = tmp_path / "src"
    (src / "model").mkdir(parents=True)
    (src / "model" / "config.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    log_file = out / "demo.log"
    seen: list[bool] = []
    with open(log_file, "w") as f:
        log = Console(file=f, width=120)
        plan = _Plan()
        plan.add_job("a", out / "a" / "model" / "config.json", lambda: (_job_copy_run, (src, out / "a")), log)
        plan.add_job("b", out / "b" / "model" / "config.json", lambda: (_job_copy_run, (out / "a", out / "b")), log, needs=("a",))
        plan.add("barrier", out / "barrier.txt", lambda: (seen.append((out / "b" / "model").exists()),
                                                          (out / "barrier.txt").write_text("x")))
        plan.add_job("c", out / "c" / "model" / "config.json", lambda: (_job_copy_run, (src, out / "c")), log)
        seconds, reused = _run_stages(plan, out, log, Console(quiet=True), False, workers=2)
    assert seen == [True] and reused == [] and set(seconds) == {"a", "b", "barrier", "c"}
    assert json.loads((out / "b" / "reused.json").read_text())["copied_from"] == str(out / "a")
    text = log_file.read_text()
    assert all(f"the same run as {p}: copied" in text for p in (src, out / "a"))
    assert (out / "logs" / "b.log").exists()
    # a failing job (its source is missing) is raised once the job beside it has finished
    with open(log_file, "a") as f:
        log = Console(file=f, width=120)
        plan = _Plan()
        plan.add_job("slow", out / "d" / "model" / "config.json", lambda: (_job_copy_run, (src, out / "d")), log)
        plan.add_job("bad", out / "e" / "model" / "config.json", lambda: (_job_copy_run, (tmp_path / "missing", out / "e")), log)
        with pytest.raises(FileNotFoundError):
            _run_stages(plan, out, log, Console(quiet=True), False, workers=2)
    assert (out / "d" / "model" / "config.json").exists() and not (out / "e").exists()
