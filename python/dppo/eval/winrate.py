"""``dppo eval``: win rates of models against a baseline, judged by a reward model.

For every evaluation prompt, each model and the baseline answer it (``dppo.generate``, cached
under ``CACHE/generations/`` by model fingerprint, tokenizer and sampling settings; rows by
prompt), a judge scores every answer (``dppo.eval.judges``, cached in ``CACHE/judge_scores.sqlite``),
and each model is compared with the baseline prompt by prompt.

With ``d_i = reward(model, i) - reward(baseline, i)`` over the ``n`` prompts where both rewards
exist, a prompt is a win if ``d_i > tol``, a loss if ``d_i < -tol`` and a tie otherwise
(``tol = 0`` by default: equal rewards, e.g. identical answers). Then

    win_rate = (wins + ties / 2) / n
    se       = sqrt((mean(s_i^2) - win_rate^2) / n),  s_i = 1, 1/2, 0 for win, tie, loss
             (the binomial sqrt(p (1 - p) / n) when there are no ties)
    strict   = wins / n  (ties count as losses, as the author's script did), se sqrt(s (1 - s) / n)

A judge failure that survives the judge's retries removes that prompt from the model's ``n``; the
count and the prompt_ids are reported, never dropped silently, and a model left with no scored
comparison at all makes the evaluation fail (after its files are written). Everything that can be
checked before the (long) generation is: the judge loads its config and tokenizer (an offline hub
or a classifier without a trained score head fails in one line), every model and tokenizer
resolves, the prompts load.

Outputs in ``OUT``: ``results.json`` and ``results.md`` (one table, all models), ``scores.jsonl``
(per model and prompt: rewards, difference, outcome), ``winrate.png``, ``reward_diff.png`` and
``config.json``. Beside the win rate, the length-controlled win rate (``dppo.eval.lengthctl``: a
logistic fit of the outcome on the length difference, read at equal length) and, in
``scores.jsonl``, both answers' lengths in characters.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from rich.console import Console
from rich.table import Table
from dppo.console import esc, print_table, progress_bar

from dppo.artifacts import config_record, model_tokenizer_dir, resolve_device, resolve_dtype, resolve_model, write_atomic, write_json
from dppo.data.sources import DataSource
from dppo.errors import ConfigError, EvaluationError
from dppo.eval.lengthctl import length_controlled
from dppo.generate.run import DecodeConfig, FlatOptions

__all__ = ["EvalConfig", "Comparison", "compare", "evaluate", "results_markdown"]


@dataclass(frozen=True)
class EvalConfig(FlatOptions):
    """One ``dppo eval`` run; saved (flat) into ``OUT/config.json``. ``data`` is the prompts'
    :class:`~dppo.data.sources.DataSource` (a plain string names one, split ``test_prefs``);
    ``decode`` says how every model answers (the same :class:`~dppo.generate.DecodeConfig` as
    ``dppo generate``'s); ``cache_dir`` defaults to ``OUT/cache``."""

    default_split: ClassVar[str | None] = "test_prefs"

    models: tuple[str, ...]
    baseline: str
    judge: str
    data: DataSource
    out: Path
    limit: int | None = 1000
    turns: str = "first"  # the prompt: the first user turn, or the whole history ("all")
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    cache_dir: Path | None = None
    api_base: str | None = None
    judge_batch_size: int = 8
    concurrency: int = 8
    tie_tolerance: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", DataSource.of(self.data, split=self.default_split))


@dataclass(frozen=True)
class Comparison:
    """A model against the baseline over the prompts both have a reward for."""

    n: int
    wins: int
    losses: int
    ties: int
    win_rate: float | None
    se: float | None
    strict_win_rate: float | None
    strict_se: float | None
    mean_reward: float | None
    baseline_mean_reward: float | None
    mean_diff: float | None
    excluded: dict[str, list[str]]  # reason -> prompt_ids
    diffs: dict[str, float]  # prompt_id -> reward difference

    def outcome(self, prompt_id: str, tol: float = 0.0) -> str:
        d = self.diffs[prompt_id]
        return "win" if d > tol else "loss" if d < -tol else "tie"


def compare(
    rewards: Mapping[str, float | None], baseline: Mapping[str, float | None], tie_tolerance: float = 0.0
) -> Comparison:
    """Win rate and the rest (module docstring) of ``rewards`` against ``baseline`` (by prompt_id).

    A prompt_id missing or None on either side is excluded, under the reason ``judge_failed``
    (the model's reward) or ``baseline_judge_failed``.
    """
    excluded: dict[str, list[str]] = {"judge_failed": [], "baseline_judge_failed": []}
    diffs: dict[str, float] = {}
    mine, theirs = [], []
    for pid in list(dict.fromkeys([*rewards, *baseline])):
        r, b = rewards.get(pid), baseline.get(pid)
        if r is None:
            excluded["judge_failed"].append(pid)
        elif b is None:
            excluded["baseline_judge_failed"].append(pid)
        else:
            diffs[pid] = r - b
            mine.append(r)
            theirs.append(b)
    n = len(diffs)
    wins = sum(d > tie_tolerance for d in diffs.values())
    losses = sum(d < -tie_tolerance for d in diffs.values())
    ties = n - wins - losses
    if n == 0:
        return Comparison(0, 0, 0, 0, None, None, None, None, None, None, None, excluded, diffs)
    rate = (wins + ties / 2) / n
    second_moment = (wins + ties / 4) / n
    strict = wins / n
    return Comparison(
        n=n,
        wins=wins,
        losses=losses,
        ties=ties,
        win_rate=rate,
        se=math.sqrt(max(second_moment - rate * rate, 0.0) / n),
        strict_win_rate=strict,
        strict_se=math.sqrt(strict * (1 - strict) / n),
        mean_reward=sum(mine) / n,
        baseline_mean_reward=sum(theirs) / n,
        mean_diff=sum(diffs.values()) / n,
        excluded=excluded,
        diffs=diffs,
    )


def _name(model: str) -> str:
    """A model's short name: its folder (the run's name for ``RUN/model``) or its hub id."""
    p = Path(model)
    return p.parent.name if p.name == "model" and p.parent.name else (p.name or model)


def _labels(baseline: str, models: Sequence[str]) -> list[str]:
    """Distinct names for the baseline and the models (``name#2`` for a repeated name; the
    baseline is ``name (baseline)`` where a model has its name)."""
    names = [_name(m) for m in models]
    out = []
    for k, n in enumerate(names):
        out.append(n if names.count(n) == 1 else f"{n}#{names[: k + 1].count(n)}")
    base = _name(baseline)
    return [f"{base} (baseline)" if base in out else base, *out]


def evaluate(cfg: EvalConfig, *, console: Console | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Generate, judge and compare (module docstring); returns what ``results.json`` holds.

    The phases: check everything that can fail before the long work (``_prepare``: the judge, every
    model, the prompts); every model's answers, cached (``_answers``); every answer judged,
    data-parallel under torchrun (``_judge_answers``); each model against the baseline
    (``_compare_models``); the files written by rank 0 (``_write_outputs``); the report, and a
    failure if a model has no scored comparison.
    """
    from dppo.distributed import barrier
    from dppo.distributed import setup as setup_distributed

    if not cfg.models:
        raise ConfigError("name at least one model to evaluate")
    if cfg.tie_tolerance < 0:
        raise ConfigError(f"--tie-tolerance must be >= 0, got {cfg.tie_tolerance}")
    dist, _ = setup_distributed(cfg.decode.device)
    console = console or Console(stderr=True)
    if not dist.main:
        console, show_progress = Console(stderr=True, quiet=True), False
    t0 = time.perf_counter()
    out = Path(cfg.out)
    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir is not None else out / "cache"
    out.mkdir(parents=True, exist_ok=True)
    run = _prepare(cfg)
    responses, gen_files = _answers(cfg, run, cache_dir, console, show_progress)
    rewards, errors, answers = _judge_answers(run, responses, cache_dir, dist, console, show_progress)
    table, details = _compare_models(cfg, run, responses, rewards)
    base = run.names[0]
    base_lengths = [g["response_tokens"] for g in responses[base].values()]
    base_scores = [v for v in rewards[base].values() if v is not None]
    results = {
        "baseline": {
            "model": base,
            "path": cfg.baseline,
            "mean_reward": sum(base_scores) / len(base_scores) if base_scores else None,
            "mean_response_tokens": sum(base_lengths) / len(base_lengths) if base_lengths else None,
            "judge_failures": len(errors[base]),
        },
        "judge": {"spec": cfg.judge, "key": run.judge.key, "retries": run.judge.retries,
                  "failures": sum(len(errs) for errs in errors.values())},
        "prompts": len(run.rows),
        "models": table,
        "judge_errors": {name: errs for name, errs in errors.items() if errs},
        "generation_files": gen_files,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if dist.main:
        _write_outputs(out, cfg, results, details, run.source)
    barrier(dist)
    if show_progress:
        _report(console, results, answers, out)
    _fail_if_unscored(results, errors, out)
    return results


@dataclass(frozen=True)
class _Eval:
    """An evaluation checked and resolved: the judge, the models (baseline first) with their short
    names and folders, the prompts and their source's description."""

    judge: Any
    models: list[str]
    names: list[str]
    dirs: list[tuple[Path, Path]]
    rows: list[Any]
    source: dict[str, Any]


def _prepare(cfg: EvalConfig) -> _Eval:
    """Everything that can fail, checked before generating: the judge (an unknown judge, a missing
    API key, an offline hub, a classifier without a score head), every model and the prompts."""
    from dppo.eval.judges import JudgeOptions, make_judge
    from dppo.generate.run import load_prompts

    judge = make_judge(cfg.judge, JudgeOptions(batch_size=cfg.judge_batch_size, api_base=cfg.api_base,
                                               concurrency=cfg.concurrency))
    judge.check()
    models = [cfg.baseline, *cfg.models]
    names = _labels(cfg.baseline, cfg.models)
    dirs = [(d, model_tokenizer_dir(d, cfg.decode.tokenizer)) for d in map(resolve_model, models)]
    rows, source = load_prompts(cfg.data, limit=cfg.limit, turns=cfg.turns)
    if any(r.ids is not None for r in rows):
        raise ConfigError(f"{cfg.data}: eval needs the raw data (the judge reads the prompt text), not prepared shards")
    return _Eval(judge, models, names, dirs, rows, source)


def _answers(cfg: EvalConfig, run: _Eval, cache_dir: Path, console: Console,
             show_progress: bool) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, str]]:
    """Every model's answers by prompt_id, generated into (or read from) the cache, keyed by the
    model's fingerprint, the tokenizer and the settings; and the cache file of each."""
    from dppo.generate.run import generate_rows, generation_settings, read_generations

    dtype_name = resolve_dtype(cfg.decode.dtype, resolve_device(cfg.decode.device))
    wanted = {r.prompt_id for r in run.rows}
    responses: dict[str, dict[str, dict[str, Any]]] = {}
    gen_files: dict[str, str] = {}
    for model, name, (model_dir, tok_dir) in zip(run.models, run.names, run.dirs, strict=True):
        settings = generation_settings(model_dir, tok_dir, cfg.decode, dtype_name, cfg.turns)
        key = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=8).hexdigest()
        path = cache_dir / "generations" / f"{settings['model_fingerprint']}-{key}.parquet"
        gen_files[name] = str(path)
        generate_rows(model, run.rows, path, cfg.decode, turns=cfg.turns, console=console, show_progress=show_progress,
                      show_summary=False, label=f"generate {name}")
        responses[name] = {g["prompt_id"]: g for g in read_generations(path) if g["prompt_id"] in wanted}
    return responses, gen_files


def _judge_answers(run: _Eval, responses: dict[str, dict[str, dict[str, Any]]], cache_dir: Path, dist: Any,
                   console: Console, show_progress: bool) -> tuple[dict[str, dict[str, float | None]], dict[str, dict[str, str]], int]:
    """Every answer's reward (None where the judge failed, with its error), by model and prompt_id,
    cached by judge, prompt and response; and the number of answers. Under torchrun each rank
    scores every N-th answer with its own copy of the judge (a judge that fits one GPU); the scores
    meet on every rank."""
    from dppo.eval.judges import ScoreCache, score_over_ranks

    items, owners = [], []
    for name in run.names:
        for r in run.rows:
            g = responses[name].get(r.prompt_id)
            if g is not None:
                items.append((r.prompt, g["response"]))
                owners.append((name, r.prompt_id))
    judge = run.judge
    with ScoreCache(cache_dir / "judge_scores.sqlite") as cache, progress_bar(console, show_progress) as progress:
        task = progress.add_task(f"judge {esc(judge.name)}", total=len(range(dist.rank, len(items), dist.world)))
        scores = score_over_ranks(judge, items, cache, dist, progress=lambda n: progress.advance(task, n))
    judge.close()
    rewards: dict[str, dict[str, float | None]] = {name: {r.prompt_id: None for r in run.rows} for name in run.names}
    errors: dict[str, dict[str, str]] = {name: {} for name in run.names}
    for (name, pid), sc in zip(owners, scores, strict=True):
        rewards[name][pid] = sc.value
        if sc.value is None:
            errors[name][pid] = sc.error or "failed"
    return rewards, errors, len(items)


def _compare_models(cfg: EvalConfig, run: _Eval, responses: dict[str, dict[str, dict[str, Any]]],
                    rewards: dict[str, dict[str, float | None]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each model against the baseline: its row of the results table, and its per-prompt details
    (``scores.jsonl``)."""
    base = run.names[0]
    table, details = [], []
    for model, name in zip(run.models[1:], run.names[1:], strict=True):
        c = compare(rewards[name], rewards[base], cfg.tie_tolerance)
        lengths = [responses[name][pid]["response_tokens"] for pid in c.diffs]
        chars = {pid: (len(responses[name][pid]["response"]), len(responses[base][pid]["response"])) for pid in c.diffs}
        lc = length_controlled([c.outcome(pid, cfg.tie_tolerance) for pid in c.diffs],
                               [chars[pid][0] - chars[pid][1] for pid in c.diffs])
        table.append({
            "model": name, "path": model, "n": c.n, "prompts": len(run.rows),
            "win_rate": c.win_rate, "se": c.se, "wins": c.wins, "losses": c.losses, "ties": c.ties,
            "strict_win_rate": c.strict_win_rate, "strict_se": c.strict_se,
            "lc_win_rate": lc.win_rate, "lc_se": lc.se, "lc_length_slope": lc.slope,
            "mean_reward": c.mean_reward, "baseline_mean_reward": c.baseline_mean_reward, "mean_reward_diff": c.mean_diff,
            "mean_response_tokens": sum(lengths) / len(lengths) if lengths else None,
            "judge_failures": len(c.excluded["judge_failed"]),
            "baseline_judge_failures": len(c.excluded["baseline_judge_failed"]),
            "excluded_prompt_ids": c.excluded,
        })
        details += [{"model": name, "prompt_id": pid, "reward": rewards[name][pid], "baseline_reward": rewards[base][pid],
                     "diff": d, "outcome": c.outcome(pid, cfg.tie_tolerance),
                     "response_tokens": responses[name][pid]["response_tokens"],
                     "length": chars[pid][0], "baseline_length": chars[pid][1]} for pid, d in c.diffs.items()]
    return table, details


def _write_outputs(out: Path, cfg: EvalConfig, results: dict[str, Any], details: list[dict[str, Any]],
                   source: dict[str, Any]) -> None:
    """(Rank 0.) results.json, results.md, scores.jsonl, config.json and the two figures."""
    from dppo.eval.plots import plot_reward_differences, plot_win_rates

    write_json(out / "results.json", results)
    write_atomic(out / "results.md", results_markdown(results))
    write_atomic(out / "scores.jsonl", "".join(json.dumps(d) + "\n" for d in details))
    write_json(out / "config.json", {"config": config_record(cfg), "source": source["description"]})
    table, base = results["models"], results["baseline"]["model"]
    plot_win_rates(table, out / "winrate.png", baseline=base)
    plot_reward_differences({row["model"]: [d["diff"] for d in details if d["model"] == row["model"]] for row in table},
                            out / "reward_diff.png", baseline=base)


def _report(console: Console, results: dict[str, Any], answers: int, out: Path) -> None:
    print_table(console, _rich_table(results))
    for name, errs in results["judge_errors"].items():
        ids = ", ".join(pid[:16] + ("…" if len(pid) > 16 else "") for pid in list(errs)[:5]) + (", ..." if len(errs) > 5 else "")
        first = next(iter(errs.values()))
        console.print(
            f"[yellow]{esc(name)}: {len(errs)} judge failure(s) excluded from n[/] (prompt_ids {esc(ids)}; e.g. {esc(first)})",
            highlight=False,
        )
    j = results["judge"]
    console.print(f"judge {esc(j['spec'])}: {answers:,} answers, {j['retries']:,} retries, {j['failures']:,} failures", highlight=False)
    console.print(f"results in {esc(out)}/ (results.md, results.json, scores.jsonl, winrate.png, reward_diff.png)")


def _fail_if_unscored(results: dict[str, Any], errors: dict[str, dict[str, str]], out: Path) -> None:
    """A model with no scored comparison fails the evaluation (after its files are written)."""
    unscored = [row["model"] for row in results["models"] if row["n"] == 0]
    if unscored:
        first = next((e for errs in errors.values() for e in errs.values()), "no answer to judge")
        raise EvaluationError(
            f"no scored comparison for {', '.join(unscored)}: the judge failed on every prompt "
            f"({results['judge']['failures']} failures after {results['judge']['retries']} retries; e.g. {first}); see {out}/results.json"
        )


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


COLUMNS = (
    ("model", "model"),
    ("n", "n"),
    ("win rate", "win_rate"),
    ("± se", "se"),
    ("W / L / T", "wlt"),
    ("strict", "strict_win_rate"),
    ("LC win rate", "lc_win_rate"),
    ("± se (LC)", "lc_se"),
    ("mean reward", "mean_reward"),
    ("baseline reward", "baseline_mean_reward"),
    ("mean Δ", "mean_reward_diff"),
    ("mean tokens", "mean_response_tokens"),
    ("judge failures", "failures"),
)


def _cell(row: Mapping[str, Any], key: str) -> str:
    if key == "wlt":
        return f"{row['wins']} / {row['losses']} / {row['ties']}"
    if key == "failures":
        return f"{row['judge_failures']} + {row['baseline_judge_failures']} baseline"
    return _fmt(row[key], 1 if key == "mean_response_tokens" else 3)


def results_markdown(results: Mapping[str, Any]) -> str:
    """The results table in markdown (``results.md``)."""
    b = results["baseline"]
    lines = [
        f"# Win rates against {b['model']}",
        "",
        f"Judge `{results['judge']['spec']}` ({results['judge'].get('retries', 0)} retries, "
        f"{results['judge'].get('failures', 0)} failures); {results['prompts']} prompts; win rate = (wins + ties/2) / n, "
        "n = prompts where the judge scored both answers; strict counts ties as losses; LC: the length-controlled "
        "win rate (a logistic fit of the outcome on tanh(length difference / its sd), at equal length; its se "
        "from 200 bootstrap resamples of the prompts).",
        "",
        "| " + " | ".join(h for h, _ in COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(_cell(r, key) for _, key in COLUMNS) + " |" for r in results["models"]]
    lines += [
        "",
        f"Baseline `{b['model']}`: mean reward {_fmt(b['mean_reward'])}, mean response {_fmt(b['mean_response_tokens'], 1)} tokens, "
        f"{b['judge_failures']} judge failure(s).",
    ]
    for name, errs in results.get("judge_errors", {}).items():
        lines.append(f"- {name}: {len(errs)} judge failure(s), excluded from n: {', '.join(errs)}")
    return "\n".join(lines) + "\n"


def _rich_table(results: Mapping[str, Any]) -> Table:
    """The console's narrower table (results.md has every column)."""
    t = Table(title=esc(f"win rate against {results['baseline']['model']} (judge {results['judge']['spec']})"))
    for h in ("model", "n", "win rate ± se", "LC ± se", "W / L / T", "strict", "reward (baseline)", "tokens", "failures"):
        t.add_column(h, justify="left" if h == "model" else "right")
    for r in results["models"]:
        t.add_row(
            esc(r["model"]),
            str(r["n"]),
            f"{_fmt(r['win_rate'])} ± {_fmt(r['se'])}",
            f"{_fmt(r.get('lc_win_rate'))} ± {_fmt(r.get('lc_se'))}",
            _cell(r, "wlt"),
            _fmt(r["strict_win_rate"]),
            f"{_fmt(r['mean_reward'], 2)} ({_fmt(r['baseline_mean_reward'], 2)})",
            _fmt(r["mean_response_tokens"], 1),
            str(r["judge_failures"] + r["baseline_judge_failures"]),
        )
    return t
