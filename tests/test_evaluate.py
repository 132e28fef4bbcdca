"""`dppo eval`: win-rate arithmetic by hand, the whole run on tiny models, caching, failures, the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import tiny_models as tm
from dppo.data import DataSource
from dppo.generate import DecodeConfig, SamplingConfig
from dppo.generate.decoding import Decoder
from dppo.errors import ConfigError, EvaluationError, SourceError
from dppo.eval.winrate import EvalConfig, compare, evaluate
from dppo.eval.judges import register_judge
from chat_server import KEY, ChatServer


pytestmark = pytest.mark.usefixtures("one_thread")

# -- the arithmetic ------------------------------------------------------------------------------
# prompt:     p0   p1   p2   p3   p4    p5    p6   p7   p8   p9
MODEL = [3.0, 1.0, 2.0, 5.0, None, 0.0, 4.0, 2.0, 7.0, 1.0]
BASE = [1.0, 1.0, 3.0, 5.0, 2.0, None, 1.0, 2.5, 6.0, 0.0]
# diff:       +2   0    -1   0    fail  fail  +3   -.5  +1   +1
# outcome:    W    T    L    T    -     -     W    L    W    W     -> n 8, W 4, L 2, T 2


def test_win_rate_against_a_hand_computed_table():
    ids = [f"p{i}" for i in range(10)]
    c = compare(dict(zip(ids, MODEL, strict=True)), dict(zip(ids, BASE, strict=True)))
    assert (c.n, c.wins, c.losses, c.ties) == (8, 4, 2, 2)
    assert c.win_rate == pytest.approx(5 / 8)  # (4 + 2/2) / 8
    # per-prompt outcome s = 1, 1/2, 0: mean(s^2) = (4 + 2/4) / 8 = 0.5625, var = 0.5625 - 0.625^2
    assert c.se == pytest.approx(math.sqrt((0.5625 - 0.390625) / 8))
    assert c.se == pytest.approx(0.146575, abs=1e-6)
    assert c.strict_win_rate == pytest.approx(0.5) and c.strict_se == pytest.approx(math.sqrt(0.25 / 8))
    assert c.mean_reward == pytest.approx(25 / 8) and c.baseline_mean_reward == pytest.approx(19.5 / 8)
    assert c.mean_diff == pytest.approx(5.5 / 8)
    assert c.excluded == {"judge_failed": ["p4"], "baseline_judge_failed": ["p5"]}
    assert [c.outcome(p) for p in ("p0", "p1", "p2", "p7")] == ["win", "tie", "loss", "loss"]
    # a tolerance turns |d| <= 0.5 into ties: p7 becomes a tie
    t = compare(dict(zip(ids, MODEL, strict=True)), dict(zip(ids, BASE, strict=True)), tie_tolerance=0.5)
    assert (t.wins, t.losses, t.ties) == (4, 1, 3) and t.win_rate == pytest.approx(5.5 / 8)


def test_win_rate_without_ties_has_the_binomial_error_and_empty_is_none():
    c = compare({"a": 1.0, "b": 0.0, "c": 2.0, "d": 5.0}, {"a": 0.0, "b": 1.0, "c": 1.0, "d": 4.0})
    assert c.win_rate == 0.75 and c.se == pytest.approx(math.sqrt(0.75 * 0.25 / 4)) and c.se == c.strict_se
    empty = compare({"a": None}, {"a": 1.0})
    assert empty.n == 0 and empty.win_rate is None and empty.se is None and empty.excluded["judge_failed"] == ["a"]


# -- the whole run --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory, tok_dir: Path) -> dict[str, Path]:
    """A baseline, an identical copy of it in a run folder, and a different model."""
    vocab = tm.vocab_size(tok_dir)
    root = tmp_path_factory.mktemp("models")
    base = tm.save(tm.causal_lm(vocab, seed=11), root / "sft", tok_dir)
    twin = root / "twin-run" / "model"
    shutil.copytree(base, twin)
    other = tm.save(tm.causal_lm(vocab, seed=12), root / "other", tok_dir)
    return {"base": base, "twin": twin.parent, "other": other}


CALLS: list[tuple[str, str]] = []


def counting_judge(prompt: str, response: str) -> float:
    CALLS.append((prompt, response))
    if "(#3)" in prompt:
        raise TimeoutError("judge unavailable")
    return float(len(response) % 7)


register_judge("test-count", counting_judge, overwrite=True)


def config(out: Path, ms: dict[str, Path], data: Path, **kw) -> EvalConfig:
    return EvalConfig(
        **{
            "models": (str(ms["twin"]), str(ms["other"])),
            "baseline": str(ms["base"]),
            "judge": "test-count",
            "data": DataSource(str(data)),
            "out": out,
            "limit": 10,
            "decode": DecodeConfig(sampling=SamplingConfig(max_new_tokens=12), batch_size=4),
            **kw,
        }
    )


def test_evaluate_end_to_end_with_caching(tmp_path, models, pairs_file, tok_dir, monkeypatch):
    CALLS.clear()
    out = tmp_path / "eval"
    res = evaluate(config(out, models, pairs_file), show_progress=False)
    assert len(CALLS) <= 30 and len(set(CALLS)) == len(CALLS)  # each distinct answer judged once
    rows = {r["model"]: r for r in res["models"]}
    assert list(rows) == ["twin-run", "other"]
    twin, other = rows["twin-run"], rows["other"]
    # prompt #3 failed for every model: excluded (baseline side) and reported, n = 9
    assert twin["n"] == other["n"] == 9 and twin["prompts"] == 10
    assert twin["judge_failures"] == 1 and twin["baseline_judge_failures"] == 0
    assert res["baseline"]["judge_failures"] == 1
    failed = res["judge_errors"]["sft"]
    assert len(failed) == 1 and "judge unavailable" in next(iter(failed.values()))
    # an identical model ties everywhere
    assert (twin["wins"], twin["losses"], twin["ties"], twin["win_rate"], twin["strict_win_rate"]) == (0, 0, 9, 0.5, 0.0)
    assert twin["mean_reward_diff"] == 0
    assert twin["lc_win_rate"] == 0.5 and twin["lc_length_slope"] == 0.0  # the same answers: no length difference
    assert 0 <= other["lc_win_rate"] <= 1 and other["lc_se"] is not None
    assert other["wins"] + other["losses"] + other["ties"] == 9
    # the files
    scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    mine = {s["prompt_id"]: s["diff"] for s in scores if s["model"] == "other"}
    from dppo.eval.lengthctl import length_controlled

    rows_other = [s for s in scores if s["model"] == "other"]
    assert all(isinstance(s["length"], int) and isinstance(s["baseline_length"], int) for s in rows_other)
    lc = length_controlled([s["outcome"] for s in rows_other], [s["length"] - s["baseline_length"] for s in rows_other])
    assert lc.win_rate == pytest.approx(other["lc_win_rate"])
    again = compare({p: d for p, d in mine.items()}, {p: 0.0 for p in mine})
    assert again.win_rate == pytest.approx(other["win_rate"])
    assert json.loads((out / "results.json").read_text())["models"][1]["win_rate"] == other["win_rate"]
    md = (out / "results.md").read_text()
    assert "| twin-run | 9 | 0.500 |" in md and "excluded from n" in md
    for png in ("winrate.png", "reward_diff.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["judge"] == "test-count"

    # A rerun generates nothing and judges only the failure again; a new model pays for itself only.
    def no_decoding(*a, **k):
        raise AssertionError("generation should come from the cache")

    CALLS.clear()
    monkeypatch.setattr(Decoder, "run", no_decoding)
    res2 = evaluate(config(out, models, pairs_file), show_progress=False)
    assert res2["models"] == res["models"]
    assert all("(#3)" in p for p, _ in CALLS)
    monkeypatch.undo()
    CALLS.clear()
    new = tm.save(tm.causal_lm(tm.vocab_size(tok_dir), seed=13), tmp_path / "new", tok_dir)
    res3 = evaluate(config(out, models, pairs_file, models=(str(models["other"]), str(new))), show_progress=False)
    assert res3["models"][0] == rows["other"]
    assert len([c for c in CALLS if "(#3)" not in c[0]]) <= 9  # only the new model's answers


def test_evaluate_refuses_bad_inputs(tmp_path, models, pairs_file, tok_dir):
    with pytest.raises(ConfigError, match="unknown judge"):
        evaluate(config(tmp_path / "e", models, pairs_file, judge="nope"), show_progress=False)
    with pytest.raises(ConfigError, match="at least one model"):
        evaluate(config(tmp_path / "e", models, pairs_file, models=()), show_progress=False)
    from dppo.data.prep import PrepConfig, prepare

    prepare(PrepConfig("prefs", str(pairs_file), str(tok_dir), tmp_path / "s"), show_progress=False)
    with pytest.raises(ConfigError, match="raw data"):
        evaluate(config(tmp_path / "e", models, tmp_path / "s"), show_progress=False)


def test_cli_eval_with_the_api_judge(tmp_path, models, pairs_file, monkeypatch):
    import typer
    from dppo.cli.generate_eval import eval_cmd
    from dppo.cli.main import user_errors
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("eval")(user_errors(eval_cmd))
    app.command("other")(lambda: None)
    server = ChatServer()
    try:
        monkeypatch.setenv("NVIDIA_API_KEY", KEY)
        args = ["eval", str(models["other"]), "--baseline", str(models["base"]), "--judge", "nemotron-api",
                "--api-base", server.base, "--data", str(pairs_file), "--split", "", "--limit", "6",
                "--max-new-tokens", "6", "--out", str(tmp_path / "e"), "--concurrency", "3"]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        assert KEY not in res.output
        out = json.loads((tmp_path / "e" / "results.json").read_text())
        assert out["models"][0]["n"] == 6 and out["judge"]["key"] == f"api:nvidia/llama-3.1-nemotron-70b-reward@{server.base}"
        assert len(server.attempts) == 6  # 6 prompts (each answered by both models)
        monkeypatch.setenv("NVIDIA_API_KEY", "wrong")
        res = CliRunner().invoke(app, [*args[:-4], "--out", str(tmp_path / "e2"), "--concurrency", "3"])
        assert res.exit_code == 1 and "refused the key" in res.output
    finally:
        server.close()


def test_model_labels_are_short_and_distinct():
    from dppo.eval.winrate import _labels

    assert _labels("runs/sft/model", ["runs/dpo/model", "runs/unll", "Qwen/Qwen2.5-0.5B"]) == ["sft", "dpo", "unll", "Qwen2.5-0.5B"]
    assert _labels("runs/sft/model", ["runs/sft/model", "a/dpo", "b/dpo"]) == ["sft (baseline)", "sft", "dpo#1", "dpo#2"]


def _no_generation(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("nothing may be generated before the judge is known to work")

    monkeypatch.setattr(Decoder, "run", refuse)


def test_an_evaluation_whose_judge_always_fails_exits_nonzero(tmp_path, models, pairs_file):
    def broken(prompt: str, response: str) -> float:
        raise ConnectionError("judge down")

    register_judge("test-broken", broken, overwrite=True)
    with pytest.raises(EvaluationError, match="no scored comparison for twin-run, other.*judge down"):
        evaluate(config(tmp_path / "e", models, pairs_file, judge="test-broken"), show_progress=False)
    res = json.loads((tmp_path / "e" / "results.json").read_text())  # the files are still written
    assert [m["n"] for m in res["models"]] == [0, 0] and res["judge"]["failures"] == 30
    import typer
    from dppo.cli.generate_eval import eval_cmd
    from dppo.cli.main import user_errors
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("eval")(user_errors(eval_cmd))
    app.command("other")(lambda: None)
    args = ["eval", str(models["other"]), "--baseline", str(models["base"]), "--judge", "test-broken", "--data",
            str(pairs_file), "--split", "", "--limit", "3", "--max-new-tokens", "4", "--out", str(tmp_path / "e2")]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and "no scored comparison" in r.output and "Traceback" not in r.output


def test_an_unreachable_judge_fails_before_any_generation(tmp_path, models, pairs_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_generation(monkeypatch)
    with pytest.raises(SourceError) as e:
        evaluate(config(tmp_path / "e", models, pairs_file, judge="nemotron:someorg/not-cached-reward"), show_progress=False)
    assert "HF_HUB_OFFLINE" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="no such folder"):
        evaluate(config(tmp_path / "e", models, pairs_file, judge="hf:/no/such/reward-model"), show_progress=False)


def test_a_causal_lm_is_refused_as_a_sequence_classification_judge(tmp_path, models, pairs_file, monkeypatch):
    _no_generation(monkeypatch)
    with pytest.raises(ConfigError, match="no trained score head.*score.weight"):
        evaluate(config(tmp_path / "e", models, pairs_file, judge=f"hf:{models['base']}"), show_progress=False)


def test_cli_eval_with_a_judge_in_the_users_file(tmp_path, models, pairs_file):
    """`dppo eval --judge py:FILE:FUNCTION`: a rule-based reward in a .py file, a function or a factory."""
    from typer.testing import CliRunner

    from dppo.cli.main import app

    rules = tmp_path / "rules.py"
    rules.write_text(
        "def length(prompt, response):\n    return float(len(response))\n\n"
        "def shorter_is_better(options):\n    return lambda prompt, response: -float(len(response))\n"
    )
    common = [str(models["other"]), "--baseline", str(models["base"]), "--data", str(pairs_file), "--split", "",
              "--limit", "6", "--max-new-tokens", "8", "--batch-size", "6", "--cache-dir", str(tmp_path / "cache")]
    for function, sign in (("length", 1.0), ("shorter_is_better", -1.0)):
        out = tmp_path / function
        res = CliRunner().invoke(app, ["eval", *common, "--judge", f"py:{rules}:{function}", "--out", str(out)])
        assert res.exit_code == 0, res.output
        scores = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
        assert len(scores) == 6
        for s in scores:  # the reward is the rule's value of each answer (lengths in characters)
            assert (s["reward"], s["baseline_reward"]) == (sign * s["length"], sign * s["baseline_length"])
        results = json.loads((out / "results.json").read_text())
        assert results["judge"]["spec"] == f"py:{rules}:{function}" and results["models"][0]["n"] == 6
    res = CliRunner().invoke(app, ["eval", *common, "--judge", f"py:{rules}:nope", "--out", str(tmp_path / "x")])
    assert res.exit_code == 1 and f"--judge py:{rules}:nope: module {rules} has no 'nope'" in " ".join(res.output.split())
