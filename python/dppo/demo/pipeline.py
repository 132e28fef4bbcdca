"""``dppo demo``: every stage of the pipeline on the built-in task world, and the paper's comparisons
in miniature.

make the world -> ``prep sft`` -> ``train --method sft`` -> ``generate`` y_gen with the SFT model ->
``prep prefs --ygen`` -> how often the SFT model votes wrong on the pairs -> **tuning**: every
preference method trains once per point of the same small grid (learning rate x its own main knob:
beta for dpo and simpo, alpha for the penalties) and is judged on the *validation* prompts; the
best point of each is kept -> per seed: ``train`` dpo, simpo, minll, unll, conll with their chosen
settings (and ipo+unll, a pair loss with unll's penalty term), unll followed by DPO post-tuning, a
``curriculum`` of unll rounds, online rounds (``curriculum --pairs judge``: the demo's judge scores
the policy's own samples) of dpo, unll and ipo+unll, unll with a linear alpha decay, an alpha
sweep and a data-efficiency sweep -> ``eval`` every model against the SFT
model on the *test* prompts with the programmatic judge; then one table and the figures.

It calls the same library functions as the CLI commands. The world, the grid and the protocol
were fixed before any test-split result was seen (docs/demo.md, "Version 3"); every method gets the
same tuning budget. The settings, the grid, each point's validation win rate, the choices and the
versions of the libraries are written into ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from dppo.console import esc, print_table

__all__ = ["FULL", "PAPER", "QUICK", "DemoSettings", "make_init_model", "run_demo", "sft_config"]

# Win rates against the SFT model reported by the paper (Fig. 3A), for the side-by-side table.
PAPER = {"dpo": 0.759, "minll": 0.893, "unll": 0.898, "conll": 0.890, "unll+dpo": 0.977}


@dataclass(frozen=True)
class DemoSettings:
    """Everything that defines a demo run (recorded in the results)."""

    # the world
    n_sft: int = 48000
    n_pairs: int = 1000
    n_test: int = 150
    n_val: int = 150
    world_seed: int = 0
    vocab_size: int = 2048
    # the model: a Qwen2-architecture transformer trained from random weights by the SFT stage
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    # SFT: sized by the SFT model's own judge score on held-out prompts (docs/demo.md, "Revisions");
    # copying words in reverse order only starts to appear after about 60k examples at this size
    sft_epochs: int = 2
    sft_lr: float = 3e-3
    sft_batch: int = 32
    sft_warmup: int = 20
    # every preference method: same optimizer, batch and number of steps; the learning rate and the
    # method's own knob are chosen on the validation prompts from the same grid for every method
    pref_epochs: int = 1
    pref_batch: int = 16
    pref_warmup: int = 10
    tune_lrs: tuple[float, ...] = (3e-5, 1e-4)
    tune_knobs: tuple[tuple[str, str, tuple[float, ...]], ...] = (
        ("dpo", "beta", (0.01, 0.1)),
        ("simpo", "beta", (1.0, 2.5)),
        ("minll", "alpha", (1.0, 10.0)),
        ("unll", "alpha", (0.1, 1.0)),
        ("conll", "alpha", (0.1, 1.0)),
        # a pair loss with a DPPO penalty term: IPO (TRL's default beta 0.1) plus unll's alpha * f(r) * UL(y_gen)
        ("ipo+unll", "alpha", (0.1, 1.0)),
    )
    # beyond the paper: rounds of unll (each round a third of the pairs: the same data budget), and
    # unll with alpha decaying linearly from its chosen value to 0
    curriculum_rounds: int = 3
    # online rounds (dppo curriculum --pairs judge): each round samples K answers per prompt from the
    # policy entering it, the demo's judge scores them, best vs worst are trained on; the prompts of
    # the training pairs walked in equal parts (the same data budget), each method at its tuned settings
    online_methods: tuple[str, ...] = ("dpo", "unll", "ipo+unll")
    online_rounds: int = 2
    online_samples: int = 4
    online_temperature: float = 1.0
    # the vote clip C bounds r = logp(y_w) - logp(y_l), a difference of sums over response tokens:
    # the paper's (2000 for minll/unll, 700 for conll, responses of ~250 tokens) rescaled by the
    # ratio of mean response lengths, here 14.9 tokens over chosen and rejected as written (14.6 after
    # prep's truncation; results.json "diagnostics"): C * 14.9 / 250
    vote_clip: float = 120.0
    conll_vote_clip: float = 42.0
    # generation
    max_new_tokens: int = 48
    gen_batch: int = 64
    # the sweeps (Fig. 2A: alpha of unll; Fig. 2C: training pairs of dpo and unll)
    alphas: tuple[float, ...] = (0.01, 0.1, 1.0)
    sample_sizes: tuple[int, ...] = (250, 500)
    seeds: int = 3


FULL = DemoSettings()
QUICK = DemoSettings(
    n_sft=8000, n_pairs=320, n_test=48, n_val=48, sft_epochs=1, alphas=(0.1,), sample_sizes=(96,), seeds=1,
    max_new_tokens=24, tune_lrs=(1e-4,), curriculum_rounds=2, online_methods=("unll",), online_rounds=1,
    tune_knobs=(("dpo", "beta", (0.1,)), ("simpo", "beta", (2.5,)), ("minll", "alpha", (10.0,)),
                ("unll", "alpha", (0.1, 1.0)), ("conll", "alpha", (0.1,))),
)

TUNING_SEED = 0
"""The seed of the tuning runs; that seed's test run of each method is its tuning run at the chosen settings."""
COMPARED_METHODS = ("dpo", "simpo", "minll", "unll", "conll")
"""The paper's preference methods, each trained from the SFT model and compared with it."""
LOSSES_ONLINE = ("dpo", "unll", "ipo+unll", "minll", "conll", "simpo")  # the order of online rows in the table


Job = tuple[Callable[..., Any], tuple[Any, ...]]
"""A stage's work as a module-level function and its (picklable) arguments; the function also takes
``console=`` for its messages, so it runs the same in this process or in a worker process."""


@dataclass
class _Plan:
    """The ordered stages of one run, for the single progress display: each stage's name, the file
    whose existence says it is done (then it is reused), and the function that makes it. A stage with
    a job may run in a worker process beside its neighbours (``_run_stages``): ``jobs[name]`` is the
    call that makes its ``Job`` when it starts (options tuning chose are read then) and the stages
    it needs finished first; a stage without one waits for every running job and runs here."""

    stages: list[tuple[str, Path, Callable[[], Any]]] = field(default_factory=list)
    jobs: dict[str, tuple[Callable[[], Job], tuple[str, ...]]] = field(default_factory=dict)

    def add(self, name: str, done: Path, fn: Callable[[], Any]) -> None:
        self.stages.append((name, done, fn))

    def add_job(self, name: str, done: Path, job: Callable[[], Job], log: Console, needs: tuple[str, ...] = ()) -> None:
        def here() -> Any:
            fn, args = job()
            return fn(*args, console=log)

        self.stages.append((name, done, here))
        self.jobs[name] = (job, tuple(needs))


# -- the stages' work, as module-level functions a worker process can run ---------------------------------
def _job_train(cfg: Any, *, console: Console) -> Any:
    from dppo.train import train

    return train(cfg, console=console)


def _job_curriculum(cfg: Any, *, console: Console) -> Any:
    from dppo.curriculum import curriculum

    return curriculum(cfg, console=console, show_progress=False)


def _job_eval(cfg: Any, *, console: Console) -> Any:
    from dppo.eval.winrate import evaluate

    return evaluate(cfg, console=console, show_progress=False)


def _job_copy_run(src: Path, dst: Path, *, console: Console) -> None:
    """A run identical to one already made (the same options, data, initial model and seed): its
    folder copied, its model last (the stage's done-marker), with ``reused.json`` naming the source."""
    import shutil

    tmp = dst.with_name(dst.name + ".copying")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    (tmp / "reused.json").write_text(json.dumps({"copied_from": str(src), "why": "the same options, data, initial "
                                                 "model and seed: training again gives the same weights"}, indent=2) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    console.print(f"the same run as {src}: copied", highlight=False)


def _register_demo_judge() -> None:
    from dppo.demo.judge import judge as demo_judge
    from dppo.eval.judges import register_judge

    register_judge("demo", demo_judge, overwrite=True)


def _worker_init() -> None:
    """A worker process: one thread (the results do not depend on how many workers run), no library
    progress bars, the demo's judge registered."""
    import torch
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(1)
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    _register_demo_judge()


def _warm_worker() -> None:
    """Import what the stages use, so a worker is ready when the first stage reaches it."""
    import dppo.curriculum  # noqa: F401
    import dppo.eval.winrate  # noqa: F401
    import dppo.train.loop  # noqa: F401
    from transformers import Qwen2ForCausalLM  # noqa: F401


def _run_job(fn: Callable[..., Any], args: tuple[Any, ...], log_path: str) -> float:
    """Run one stage's job in a worker, its messages into ``log_path``; returns its seconds."""
    t = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as f:
        fn(*args, console=Console(file=f, width=120, force_terminal=False, soft_wrap=True))
    return time.perf_counter() - t


def default_workers() -> int:
    """Worker processes for the demo's independent stages: one per CPU core (at most 8); none (every
    stage in this process) where CUDA is present, whose one device the stages would share."""
    import os

    import torch

    if torch.cuda.is_available():
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores))


def make_init_model(init: Path, tokenizer_dir: Path, s: DemoSettings) -> None:
    """Save the demo's randomly initialised Qwen2-architecture model, with the world's tokenizer, to ``init``."""
    from transformers import AutoTokenizer

    from dppo.artifacts import copy_tokenizer_files
    from dppo.synthetic import tiny_qwen2

    vocab = len(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    model = tiny_qwen2(vocab, hidden=s.hidden, layers=s.layers, heads=s.heads, kv_heads=s.kv_heads,
                       intermediate=s.intermediate, seed=1000)
    model.save_pretrained(init)
    copy_tokenizer_files(Path(tokenizer_dir), init)


def sft_config(s: DemoSettings, data: Path, init: Path, run: Path) -> Any:
    """The demo's SFT run as a ``TrainConfig``."""
    from dppo.train.config import TrainConfig

    return TrainConfig(method="sft", data=str(data), init=str(init), out=str(run), seed=0, overwrite=True,
                       progress=False, save_every=0, dtype="fp32", lr=s.sft_lr, epochs=s.sft_epochs,
                       batch_size=s.sft_batch, grad_accum=1, warmup_steps=s.sft_warmup, lr_schedule="linear")


def _check_same_settings(out: Path, s: DemoSettings) -> None:
    """Stages found in ``out`` are reused, so they must have been made with these settings (the
    number of seeds aside: more seeds reuse the ones already run). Records them on first use."""
    from dppo.errors import ConfigError

    path = out / "settings.json"
    want = {k: v for k, v in json.loads(json.dumps(asdict(s))).items() if k != "seeds"}
    if path.exists():
        have = {k: v for k, v in json.loads(path.read_text()).items() if k != "seeds"}
        if have != want:
            diff = ", ".join(f"{k} {have.get(k)!r} there, {want.get(k)!r} now" for k in sorted(set(have) | set(want))
                             if have.get(k) != want.get(k))
            raise ConfigError(f"{out} holds a demo made with other settings ({diff}): give another --out, or delete it")
    else:
        path.write_text(json.dumps(asdict(s), indent=2) + "\n")


@contextlib.contextmanager
def _quiet_libraries() -> Any:
    """Silence transformers' and huggingface_hub's own progress bars while the demo shows its one."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    hub_was_off = are_progress_bars_disabled()
    tf_was_on = hf_logging.is_progress_bar_enabled()
    disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not hub_was_off:
            enable_progress_bars()
        if tf_was_on:
            hf_logging.enable_progress_bar()


def run_demo(out: str | Path = "demo-out", *, settings: DemoSettings | None = None, quick: bool = False,
             seeds: int | None = None, workers: int | None = None, console: Console | None = None,
             show_progress: bool = True) -> dict[str, Any]:
    """Run the whole demo into ``out`` and return the results (also in ``out/results.json``).

    The phases: the settings checked against those ``out`` was made with; the plan of stages
    (``_Demo``: the world and the SFT model, the tuning grid, every seed's runs and evaluation); the
    stages run in order into ``out`` (``_run_stages``), each reused where its output exists, so an
    interrupted demo continues where it stopped; the results aggregated, written and shown.
    ``workers``: processes for the stages that do not depend on each other (default
    ``default_workers()``; 0 runs every stage in this process).
    """
    s = settings or (QUICK if quick else FULL)
    if seeds is not None:
        s = replace(s, seeds=seeds)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_same_settings(out, s)
    console = console or Console(stderr=True)
    _register_demo_judge()
    t0 = time.perf_counter()
    # Every stage writes its own messages into OUT/demo.log; the terminal shows one progress bar.
    with open(out / "demo.log", "a", encoding="utf-8") as log_file:
        demo = _Demo(s, out, Console(file=log_file, width=120, force_terminal=False, soft_wrap=True))
        demo.base_stages()
        demo.tuning_stages()
        for seed in range(s.seeds):
            demo.seed_stages(seed)
        workers = default_workers() if workers is None else workers
        stage_seconds, reused = _run_stages(demo.plan, out, demo.log, console, show_progress, workers)
    results = _aggregate(out, s, time.perf_counter() - t0, stage_seconds, reused, workers)
    if show_progress:
        print_table(console, _table(results))
        diag = results.get("diagnostics") or {}
        if "sft_prefers_rejected" in diag:
            console.print(f"Before any preference method, the SFT model prefers the rejected answer on "
                          f"{diag['sft_prefers_rejected']:.1%} of the training pairs (where unll's and conll's penalties "
                          "act).", highlight=False)
        console.print(f"{results['seconds']:.0f} s. Results: {esc(out)}/results.md, results.json, fig_alpha.png, "
                      f"fig_data_efficiency.png, fig_reward_diff.png, fig_online.png; every stage's messages: {esc(out)}/demo.log",
                      highlight=False)
    return results


class _Demo:
    """The demo's stages, planned in order: each a name, the file that says it is done and the call
    that makes it (the library's functions, as the CLI calls them). One SFT model, one y_gen and one
    set of pair shards; the seeds vary the preference stage (its data order and every random
    number), as the paper compares methods from one SFT model."""

    def __init__(self, s: DemoSettings, out: Path, log: Console) -> None:
        from dppo.generate import DecodeConfig, SamplingConfig

        self.s, self.out, self.log, self.plan = s, out, log, _Plan()
        world = out / "world"
        self.world = world
        self.paths = {k: world / f"{k}.parquet" for k in ("sft", "prefs_train", "prefs_val", "prefs_test")}
        self.tokenizer = world / "tokenizer"
        self.sft_model = out / "base" / "sft" / "model"
        self.ygen = out / "base" / "ygen.parquet"
        self.prefs = out / "shards" / "prefs"
        self.tune = out / "tune"
        self.grid = _grid(s)
        # every tuned method gets its test run per seed: the paper's and the loss family's row (ipo+unll)
        self.methods = tuple(dict.fromkeys(m for m, _, _ in s.tune_knobs))
        self.decode = DecodeConfig(sampling=SamplingConfig(max_new_tokens=s.max_new_tokens), batch_size=s.gen_batch)

    # -- the world, the SFT model, y_gen and the pairs ---------------------------------------------------
    def base_stages(self) -> None:
        from dppo.artifacts import write_json
        from dppo.data.prep import PrepConfig, prepare
        from dppo.demo.world import write_world
        from dppo.generate import GenConfig, generate
        from dppo.train import train

        s, out, plan, log = self.s, self.out, self.plan, self.log
        plan.add("make the world", self.world / "world.json", lambda: write_world(
            self.world, n_sft=s.n_sft, n_pairs=s.n_pairs, n_test=s.n_test, n_val=s.n_val, seed=s.world_seed,
            vocab_size=s.vocab_size))
        sft_shards = out / "shards" / "sft"
        plan.add("prep sft", sft_shards / "meta.json", lambda: prepare(
            PrepConfig("sft", str(self.paths["sft"]), str(self.tokenizer), sft_shards), console=log, show_progress=False))
        init = out / "base" / "init"
        plan.add("random init", init / "config.json", lambda: make_init_model(init, self.tokenizer, s))
        sft_run = self.sft_model.parent
        plan.add("train sft", self.sft_model / "config.json", lambda: train(sft_config(s, sft_shards, init, sft_run), console=log))
        plan.add("generate y_gen", self.ygen, lambda: generate(
            GenConfig(model=str(self.sft_model), data=str(self.paths["prefs_train"]), out=self.ygen, decode=self.decode),
            console=log, show_progress=False))
        plan.add("prep prefs --ygen", self.prefs / "meta.json", lambda: prepare(
            PrepConfig("prefs", str(self.paths["prefs_train"]), str(self.tokenizer), self.prefs, ygen=self.ygen),
            console=log, show_progress=False))
        # before any preference method: where the SFT model votes wrong (the pairs its penalties act on)
        plan.add("sft votes on the pairs", out / "diagnostics.json", lambda: write_json(
            out / "diagnostics.json", _sft_votes(self.prefs, self.sft_model)))

    # -- tuning: the same grid for every method, judged on the validation prompts (seed 0) -------------
    def tuning_stages(self) -> None:
        from dppo.artifacts import write_json

        tune = self.tune
        runs = []
        for method, lr, knob, value, name in self.grid:
            runs.append(self.train_run(f"tune: {name}", tune / "runs" / name, method, self.sft_model, TUNING_SEED,
                                       lambda m=method, lr=lr, k=knob, v=value: self.method_opts(m, lr, k, v)))
        models = [str(self.sft_model)] + [str(tune / "runs" / g[-1] / "model") for g in self.grid]
        self.eval_run("tune: eval on the validation prompts", tune / "eval", self.paths["prefs_val"], lambda: models,
                      needs=tuple(runs))
        self.plan.add("tune: choose each method's settings", tune / "choices.json", lambda: write_json(
            tune / "choices.json", _choose(self.grid, json.loads((tune / "eval" / "results.json").read_text()))))

    # -- the test runs of one seed ------------------------------------------------------------------------
    def seed_stages(self, seed: int) -> None:
        s, chosen, prefs_model = self.s, self.chosen, self.sft_model
        sd = self.out / f"seed{seed}"
        runs = sd / "runs"
        stages = []
        for m in self.methods:
            # seed 0: the tuning run at the chosen settings is this very run: copied, not trained again
            tuned = (lambda m=m: self.tune / "runs" / self.choice(m)["run"]) if seed == TUNING_SEED else None
            stages.append(self.train_run(f"seed {seed}: train {m}", runs / m, m, prefs_model, seed, lambda m=m: chosen(m),
                                         same_as=tuned))
        unll_model = runs / "unll" / "model"
        unll = f"seed {seed}: train unll"
        stages.append(self.train_run(f"seed {seed}: train unll+dpo", runs / "unll+dpo", "dpo", unll_model, seed,
                                     lambda: {**chosen("dpo"), "ref": str(unll_model)}, needs=(unll,)))
        stages.append(self.train_run(f"seed {seed}: train unll, alpha linear to 0", runs / "unll-linear", "unll", prefs_model,
                                     seed, lambda: chosen("unll", alpha_schedule="linear", alpha_end=0.0)))
        name = f"seed {seed}: curriculum, {s.curriculum_rounds} rounds of unll"
        self.plan.add_job(name, runs / "curriculum" / "model" / "config.json",
                          lambda: (_job_curriculum, (self.curriculum_config(seed, runs / "curriculum"),)), self.log)
        stages.append(name)
        for m in s.online_methods:
            name = f"seed {seed}: online {m}, {s.online_rounds} rounds of {s.online_samples} samples"
            self.plan.add_job(name, runs / f"online-{m}" / "model" / "config.json",
                              lambda m=m: (_job_curriculum, (self.online_config(m, seed, runs / f"online-{m}"),)), self.log)
            stages.append(name)
        for a in s.alphas:
            # the sweep's point at unll's chosen alpha is the seed's unll run: copied
            stages.append(self.train_run(
                f"seed {seed}: train unll alpha={a:g}", runs / f"unll-alpha{a:g}", "unll", prefs_model, seed,
                lambda a=a: chosen("unll", alpha=a), needs=(unll,),
                same_as=lambda a=a: runs / "unll" if self.choice("unll")["value"] == a else None))
        for n in s.sample_sizes:
            for m in ("dpo", "unll"):
                stages.append(self.train_run(f"seed {seed}: train {m} on {n} pairs", runs / f"{m}-n{n}", m, prefs_model, seed,
                                             lambda m=m, n=n: chosen(m, max_samples=n)))

        def models() -> list[str]:
            return [str(self.sft_model)] + [str(p / "model") for p in sorted(runs.iterdir()) if (p / "model" / "config.json").exists()]

        # evaluations one at a time: they share the generation cache
        previous = (f"seed {seed - 1}: eval vs sft",) if seed > 0 else ()
        self.eval_run(f"seed {seed}: eval vs sft", sd / "eval", self.paths["prefs_test"], models, needs=tuple(stages) + previous)

    # -- the stages' calls ----------------------------------------------------------------------------------
    def common(self, **kw: Any) -> dict[str, Any]:
        return {"progress": False, "save_every": 0, "dtype": "fp32", **kw}

    def method_opts(self, method: str, lr: float, knob: str | None = None, value: float | None = None) -> dict[str, Any]:
        s = self.s
        # a method with a DPPO penalty, alone or as a term of a combination (ipo+unll), takes its vote clip
        clip = {"minll": s.vote_clip, "unll": s.vote_clip, "conll": s.conll_vote_clip}
        terms = [t for t in method.split("+") if t in clip]
        extra = {"vote_clip": clip[terms[0]]} if terms else {}
        pref_kw = dict(epochs=s.pref_epochs, batch_size=s.pref_batch, grad_accum=1, warmup_steps=s.pref_warmup)
        return {**pref_kw, "lr": lr, **extra, **({knob: value} if knob else {})}

    def choice(self, method: str) -> dict[str, Any]:
        """What tuning chose for ``method`` (lr, knob, value, run), read when a stage starts."""
        return json.loads((self.tune / "choices.json").read_text())[method]

    def chosen(self, method: str, **over: Any) -> dict[str, Any]:
        """``method``'s options with the settings tuning chose (read when the stage runs)."""
        c = self.choice(method)
        return {**self.method_opts(method, c["lr"], c["knob"], c["value"]), **over}

    def train_run(self, name: str, run: Path, method: str, init_dir: Path, seed: int,
                  options: Callable[[], dict[str, Any]], needs: tuple[str, ...] = (),
                  same_as: Callable[[], Path | None] | None = None) -> str:
        """A training stage on the pairs whose options are read when it runs (the tuned ones exist only
        then); ``same_as()``, when it names a run, makes it a copy of that identical run instead."""
        from dppo.train.config import TrainConfig

        def job() -> Job:
            src = same_as() if same_as is not None else None
            if src is not None:
                return _job_copy_run, (src, run)
            cfg = TrainConfig(method=method, data=str(self.prefs), init=str(init_dir), out=str(run), seed=seed,
                              overwrite=True, **self.common(**options()))
            return _job_train, (cfg,)

        self.plan.add_job(name, run / "model" / "config.json", job, self.log, needs)
        return name

    def eval_run(self, name: str, out: Path, prompts: Path, models: Callable[[], list[str]], needs: tuple[str, ...] = ()) -> None:
        """An evaluation stage: ``models()`` (the SFT model first: the baseline) on ``prompts``, judged by the demo's judge."""
        from dppo.data.sources import DataSource
        from dppo.eval.winrate import EvalConfig

        def job() -> Job:
            cfg = EvalConfig(models=tuple(models()), baseline=str(self.sft_model), judge="demo", data=DataSource(str(prompts)),
                             out=out, limit=None, decode=self.decode, cache_dir=self.out / "cache")
            return _job_eval, (cfg,)

        self.plan.add_job(name, out / "results.json", job, self.log, needs)

    def curriculum_config(self, seed: int, run: Path) -> Any:
        from dppo.curriculum import CurriculumConfig

        s = self.s
        opts = {**self.common(**self.chosen("unll")), "seed": seed}
        return CurriculumConfig(
            rounds=s.curriculum_rounds, method="unll", data=str(self.paths["prefs_train"]), tokenizer=str(self.tokenizer),
            init=str(self.sft_model), out=run, pairs_per_round=s.n_pairs // s.curriculum_rounds,
            decode=self.decode, train=opts, seed=seed, resume=True)

    def online_config(self, method: str, seed: int, run: Path) -> Any:
        """Online rounds (``dppo curriculum --pairs judge``) of ``method`` at its tuned settings, judged by the demo's judge."""
        from dppo.curriculum import CurriculumConfig
        from dppo.online import OnlineConfig

        s = self.s
        return CurriculumConfig(
            rounds=s.online_rounds, method=method, data=str(self.paths["prefs_train"]), tokenizer=str(self.tokenizer),
            init=str(self.sft_model), out=run, pairs="judge",
            online=OnlineConfig(judge="demo", samples=s.online_samples, temperature=s.online_temperature, seed=seed,
                                prompts_per_round=s.n_pairs // s.online_rounds),
            decode=self.decode, train={**self.common(**self.chosen(method)), "seed": seed}, seed=seed, resume=True)


def _run_stages(plan: _Plan, out: Path, log: Console, console: Console, show_progress: bool,
                workers: int = 0) -> tuple[dict[str, float], list[str]]:
    """Every stage in order under one progress bar, a stage whose output exists reused; returns each
    stage's time when it ran (kept across runs into the same folder in ``stage_seconds.json``: a
    reused stage keeps it) and the names of the reused ones.

    With ``workers`` > 0, stages with a job run in that many worker processes (one thread each, so a
    stage's result does not depend on how many run beside it), each as soon as the stages it needs
    are finished; its messages go to ``out/logs/`` and then into ``log``. A stage without a job waits
    for every running one. A failing stage lets the running ones finish, then raises."""
    import concurrent.futures as cf
    import multiprocessing
    import re

    columns = [TextColumn("[bold]dppo demo[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    times_path = out / "stage_seconds.json"
    stage_seconds: dict[str, float] = json.loads(times_path.read_text()) if times_path.exists() else {}
    reused: list[str] = []
    finished: set[str] = set()
    running: dict[cf.Future[float], tuple[str, Path]] = {}
    pending = [st for st in plan.stages if not st[1].exists()]
    pool = None
    if workers > 0 and any(name in plan.jobs for name, _, _ in pending):
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)
        for _ in range(workers):  # every worker started and its imports done while the first stages run here
            pool.submit(_warm_worker)
    logs = out / "logs"

    with Progress(*columns, console=console, disable=not show_progress) as bar, _quiet_libraries():
        task = bar.add_task("", total=len(plan.stages))

        def record(name: str, seconds: float) -> None:
            stage_seconds[name] = round(seconds, 2)
            times_path.write_text(json.dumps(stage_seconds, indent=2) + "\n")
            finished.add(name)
            bar.advance(task)

        def collect(until: Callable[[], bool]) -> None:
            """Wait for running jobs until ``until()`` holds; a failed job is raised once the others finished."""
            while running and not until():
                done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for fut in done:
                    name, log_path = running.pop(fut)
                    log.rule(name)
                    with contextlib.suppress(OSError):
                        log.out(log_path.read_text(encoding="utf-8").rstrip("\n"), highlight=False)
                    if fut.exception() is not None:
                        cf.wait(running)
                        raise fut.exception()
                    record(name, fut.result())

        try:
            for name, done, fn in plan.stages:
                if done.exists():
                    reused.append(name)
                    finished.add(name)
                    bar.advance(task)
                    continue
                job = plan.jobs.get(name) if pool is not None else None
                if job is None:
                    collect(lambda: False)
                    bar.update(task, description=name)
                    log.rule(name)
                    t = time.perf_counter()
                    fn()
                    record(name, time.perf_counter() - t)
                    continue
                make, needs = job
                collect(lambda: len(running) < workers and all(n in finished for n in needs))
                bar.update(task, description=name)
                logs.mkdir(exist_ok=True)
                log_path = logs / (re.sub(r"[^A-Za-z0-9.+=-]+", "_", name).strip("_") + ".log")
                fn_job, args = make()
                running[pool.submit(_run_job, fn_job, args, str(log_path))] = (name, log_path)
            collect(lambda: False)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    return {name: stage_seconds[name] for name, _, _ in plan.stages if name in stage_seconds}, reused


# -- tuning ---------------------------------------------------------------------------------------------
def _grid(s: DemoSettings) -> list[tuple[str, float, str, float, str]]:
    """(method, lr, knob, value, run name) of every tuning run, in a fixed order (ties go to the first)."""
    out = []
    for method, knob, values in s.tune_knobs:
        for lr in s.tune_lrs:
            for v in values:
                out.append((method, lr, knob, v, f"{method}-lr{lr:g}-{knob}{v:g}"))
    return out


def _choose(grid: list[tuple[str, float, str, float, str]], val: dict[str, Any]) -> dict[str, Any]:
    """Each method's grid point with the highest validation win rate against the SFT model (the
    first in grid order on a tie), and every point's figures."""
    rows = {r["model"]: r for r in val["models"]}
    choices: dict[str, Any] = {}
    table = []
    for method, lr, knob, value, name in grid:
        r = rows.get(name, {})
        wr = r.get("win_rate")
        table.append({"method": method, "lr": lr, "knob": knob, "value": value, "val_win_rate": wr,
                      "val_lc_win_rate": r.get("lc_win_rate"), "val_mean_reward": r.get("mean_reward")})
        best = choices.get(method)
        if wr is not None and (best is None or wr > best["val_win_rate"]):
            choices[method] = {"lr": lr, "knob": knob, "value": value, "val_win_rate": wr, "run": name}
    return {**choices, "grid": table}


def _sft_votes(prefs: Path, sft_model: Path) -> dict[str, Any]:
    """Before any preference method: how often the SFT model (the reference) already prefers the
    rejected response (r = logp(y_w) - logp(y_l) < 0: the pairs where the DPPO penalties act), its
    mean summed log-probs, and the mean response lengths in tokens (end of turn included). The
    reference pass is cached beside the shards, where every method's training finds it."""
    import numpy as np

    from dppo.data import open_shards
    from dppo.train import score_pairs

    shards = open_shards(prefs)
    lengths = shards.lengths()
    logps = score_pairs(sft_model, shards, dtype="fp32", device="cpu", batch_tokens=16384)
    c, r = logps.chosen, logps.rejected
    return {
        "pairs": int(len(shards)),
        "sft_prefers_rejected": round(float(np.mean(c < r)), 4),
        "sft_mean_logp_chosen": round(float(c.mean()), 2),
        "sft_mean_logp_rejected": round(float(r.mean()), 2),
        "mean_tokens_chosen": round(float(lengths["chosen"].mean()), 2),
        "mean_tokens_rejected": round(float(lengths["rejected"].mean()), 2),
        "mean_tokens_ygen": round(float(lengths["ygen"].mean()), 2) if "ygen" in lengths else None,
    }


def _versions() -> dict[str, Any]:
    import platform

    import numpy
    import torch
    import transformers

    import dppo

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import os

    return {"dppo": dppo.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "numpy": numpy.__version__, "python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count()}


# -- results ------------------------------------------------------------------------------------------
def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    mean = statistics.fmean(vals)
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None
    return mean, se


def _pairs_per_s(run: Path) -> float | None:
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = rows[1:] or rows  # the first step pays for warm-up
    rates = [r["examples_per_s"] for r in rows if r.get("examples_per_s")]
    return statistics.fmean(rates) if rates else None


def _aggregate(
    out: Path, s: DemoSettings, seconds: float, stage_seconds: dict[str, float] | None = None, reused: list[str] | None = None,
    workers: int = 0,
) -> dict[str, Any]:
    per_model: dict[str, dict[str, list[float]]] = {}
    diffs: dict[str, list[float]] = {}
    for seed in range(s.seeds):
        res = json.loads((out / f"seed{seed}" / "eval" / "results.json").read_text())
        for row in res["models"]:
            d = per_model.setdefault(row["model"], {"win_rate": [], "strict_win_rate": [], "mean_reward": [], "pairs_per_s": [],
                                                    "lc_win_rate": [], "mean_tokens": []})
            d["win_rate"].append(row["win_rate"])
            d["lc_win_rate"].append(row.get("lc_win_rate"))
            d["mean_tokens"].append(row.get("mean_response_tokens"))
            d["strict_win_rate"].append(row["strict_win_rate"])
            d["mean_reward"].append(row["mean_reward"])
            run_dir = out / f"seed{seed}" / "runs" / row["model"]
            rate = _pairs_per_s(run_dir if run_dir.exists() else out / "base" / row["model"])
            if rate is not None:
                d["pairs_per_s"].append(rate)
        scores = out / f"seed{seed}" / "eval" / "scores.jsonl"
        if scores.exists():
            for line in scores.read_text().splitlines():
                r = json.loads(line)
                if "diff" in r and r.get("diff") is not None:
                    diffs.setdefault(r["model"], []).append(r["diff"])
        base = res["baseline"]["mean_reward"]
        per_model.setdefault("sft (baseline)", {"win_rate": [], "strict_win_rate": [], "mean_reward": [], "pairs_per_s": [],
                                                "lc_win_rate": [], "mean_tokens": []})
        per_model["sft (baseline)"]["mean_reward"].append(base)
        per_model["sft (baseline)"]["mean_tokens"].append(res["baseline"].get("mean_response_tokens"))
    table = []
    for name, d in per_model.items():
        wr, wr_se = _mean_se(d["win_rate"])
        st, st_se = _mean_se(d["strict_win_rate"])
        mr, _ = _mean_se(d["mean_reward"])
        pps, _ = _mean_se(d["pairs_per_s"])
        lc, lc_se = _mean_se(d["lc_win_rate"])
        toks, _ = _mean_se(d["mean_tokens"])
        spread = [v for v in d["win_rate"] if v is not None]
        table.append({"method": name, "win_rate": wr, "se": wr_se, "strict_win_rate": st, "strict_se": st_se,
                      "lc_win_rate": lc, "lc_se": lc_se, "mean_response_tokens": toks,
                      "mean_judge_score": mr, "train_pairs_per_s": pps, "paper_win_rate": PAPER.get(name),
                      "per_seed_win_rates": d["win_rate"],
                      "seed_range": (round(max(spread) - min(spread), 4) if len(spread) > 1 else None)})
    table.sort(key=lambda row: _order(row["method"]))
    tuning = json.loads((out / "tune" / "choices.json").read_text()) if (out / "tune" / "choices.json").exists() else {}
    diag_path = out / "diagnostics.json"
    online = _online_rounds(out, s)
    results = {"settings": asdict(s), "seeds": s.seeds, "seconds": round(seconds, 1), "table": table, "online": online,
               "paper": PAPER, "diagnostics": json.loads(diag_path.read_text()) if diag_path.exists() else {},
               "tuning": tuning, "versions": _versions(),
               "world_version": json.loads((out / "world" / "world.json").read_text()).get("version"),
               "stage_seconds": stage_seconds or {},
               "stages_reused": reused or [], "stage_seconds_total": round(sum((stage_seconds or {}).values()), 1),
               "workers": workers}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(_markdown(results))
    _figures(out, results, diffs, s)
    return results


def _online_rounds(out: Path, s: DemoSettings) -> dict[str, list[dict[str, Any]]]:
    """Per online method and round, the means over seeds of what its curriculum.json records: the
    judge's mean score of the entering policy's samples and greedy answers, pairs, ties, wrong votes."""
    keys = ("mean_sample_score", "mean_ygen_score", "pairs", "tied_share", "wrong_vote_fraction", "sample_s", "judge_s",
            "prep_s", "reference_s", "train_s")
    found: dict[str, list[dict[str, Any]]] = {}
    for m in s.online_methods:
        per_round: dict[int, dict[str, list[float]]] = {}
        for seed in range(s.seeds):
            path = out / f"seed{seed}" / "runs" / f"online-{m}" / "curriculum.json"
            if not path.exists():
                continue
            for r in json.loads(path.read_text())["rounds"]:
                d = per_round.setdefault(r["round"], {k: [] for k in keys})
                for k in keys:
                    if r.get(k) is not None:
                        d[k].append(float(r[k]))
        if per_round:
            found[m] = [{"round": k, **{name: (statistics.fmean(v) if v else None) for name, v in d.items()}}
                        for k, d in sorted(per_round.items())]
    return found


def _order(name: str) -> tuple[int, float, str]:
    """sft, the paper's methods in its order, unll+dpo, then the alpha and data-size sweeps."""
    main = ["sft", *COMPARED_METHODS, "ipo+unll", "unll+dpo", "curriculum", "unll-linear", *(f"online-{m}" for m in LOSSES_ONLINE)]
    if name in main:
        return (0, main.index(name), "")
    if name.startswith("unll-alpha"):
        return (1, float(name.removeprefix("unll-alpha")), "")
    if "-n" in name:
        method, n = name.rsplit("-n", 1)
        return (2, float(n) if n.isdigit() else 0.0, method)
    return (3, 0.0, name)


def _fmt(v: Any, nd: int = 3) -> str:
    return "-" if v is None else f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def _markdown(r: dict[str, Any]) -> str:
    v = r.get("versions") or {}
    lines = ["# dppo demo results", "",
             f"World version {r.get('world_version')}; {r['seeds']} seed(s); win rate against the SFT model on the held-out "
             "test prompts, judged by the programmatic judge (mean over seeds; +- standard error over seeds; range: "
             "the largest minus the smallest seed's win rate); LC: the length-controlled win rate. Each method's "
             "learning rate and main knob were chosen on the validation prompts (below).", "",
             f"dppo {v.get('dppo')}, torch {v.get('torch')}, transformers {v.get('transformers')}, numpy {v.get('numpy')}, "
             f"Python {v.get('python')}; {v.get('cpu')} x{v.get('cores')}.", "",
             "| method | win rate | +- | range | LC | strict | mean judge score | tokens | train pairs/s | paper |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in r["table"]:
        lines.append(f"| {row['method']} | {_fmt(row['win_rate'])} | {_fmt(row['se'])} | {_fmt(row.get('seed_range'))} | "
                     f"{_fmt(row.get('lc_win_rate'))} | {_fmt(row['strict_win_rate'])} | {_fmt(row['mean_judge_score'], 2)} | "
                     f"{_fmt(row.get('mean_response_tokens'), 1)} | {_fmt(row['train_pairs_per_s'], 1)} | {_fmt(row['paper_win_rate'])} |")
    diag = r.get("diagnostics") or {}
    if "sft_prefers_rejected" in diag:
        lines += ["", f"Before any preference method: the SFT model prefers the rejected response (logp(y_w) < logp(y_l)) on "
                      f"{diag['sft_prefers_rejected']:.1%} of the {diag['pairs']} training pairs, where unll's and conll's "
                      "penalty weights (quadratic) are nonzero at the start (minll's expectile weight also acts where r > 0, "
                      f"rewarding y_gen). Mean logp: chosen {diag['sft_mean_logp_chosen']}, rejected "
                      f"{diag['sft_mean_logp_rejected']}; mean tokens: chosen {diag['mean_tokens_chosen']}, rejected "
                      f"{diag['mean_tokens_rejected']}, y_gen {diag.get('mean_tokens_ygen')}."]
    tuning = r.get("tuning") or {}
    if tuning.get("grid"):
        lines += ["", "## Tuning (seed 0, validation prompts)", "",
                  "| method | lr | knob | value | validation win rate | LC | chosen |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for g in tuning["grid"]:
            c = tuning.get(g["method"], {})
            mark = "yes" if (c.get("lr"), c.get("value")) == (g["lr"], g["value"]) else ""
            lines.append(f"| {g['method']} | {g['lr']:g} | {g['knob']} | {g['value']:g} | {_fmt(g['val_win_rate'])} | "
                         f"{_fmt(g.get('val_lc_win_rate'))} | {mark} |")
        lines += ["", "unll+dpo uses dpo's chosen settings; curriculum, unll-linear (alpha from its chosen value to 0) and "
                      "the alpha and data-size sweeps use unll's; online-M uses M's."]
    for method, rounds in (r.get("online") or {}).items():
        if rounds and method == next(iter(r["online"])):
            lines += ["", "## Online rounds (mean over seeds; scores of the policy entering the round)", "",
                      "| method | round | mean sample score | mean y_gen score | pairs | tied share | wrong votes | "
                      "seconds: sample / judge / prep / reference / train |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for x in rounds:
            secs = " / ".join(_fmt(x.get(k), 1) for k in ("sample_s", "judge_s", "prep_s", "reference_s", "train_s"))
            lines.append(f"| online-{method} | {x['round']} | {_fmt(x['mean_sample_score'])} | {_fmt(x['mean_ygen_score'])} | "
                         f"{_fmt(x['pairs'], 0)} | {_fmt(x['tied_share'])} | {_fmt(x['wrong_vote_fraction'])} | {secs} |")
    reused = r.get("stages_reused") or []
    total = f"Total time: {r['seconds']:.0f} s"
    if reused:
        total += (f" for this run, which reused {len(reused)} of {len(r['stage_seconds']) or len(reused)} stages from an "
                  f"earlier run in this folder; the stages took {r.get('stage_seconds_total', 0):.0f} s when they ran")
    lines += ["", "## Settings", "", "```json", json.dumps(r["settings"], indent=2), "```", "", total + ".", ""]
    return "\n".join(lines)


def _table(r: dict[str, Any]) -> Table:
    t = Table(title="dppo demo: win rate vs the SFT model", title_justify="left")
    for col in ("method", "win rate", "+-", "LC", "strict", "judge score", "tokens", "pairs/s", "paper"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for row in r["table"]:
        t.add_row(esc(row["method"]), _fmt(row["win_rate"]), _fmt(row["se"]), _fmt(row.get("lc_win_rate")), _fmt(row["strict_win_rate"]),
                  _fmt(row["mean_judge_score"], 2), _fmt(row.get("mean_response_tokens"), 1), _fmt(row["train_pairs_per_s"], 1),
                  _fmt(row["paper_win_rate"]))
    return t


def _figures(out: Path, r: dict[str, Any], diffs: dict[str, list[float]], s: DemoSettings) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dppo.eval.plots import plot_reward_differences

    rows = {row["method"]: row for row in r["table"]}

    def series(names: list[str]) -> tuple[list[float], list[float]]:
        ys = [rows[n]["win_rate"] if n in rows and rows[n]["win_rate"] is not None else float("nan") for n in names]
        es = [rows[n]["se"] or 0.0 if n in rows else 0.0 for n in names]
        return ys, es

    # Fig. 2A: win rate vs alpha (unll)
    names = [f"unll-alpha{a:g}" for a in s.alphas]
    ys, es = series(names)
    fig, ax = plt.subplots(figsize=(4.5, 3.4), dpi=120)
    ax.errorbar(list(s.alphas), ys, yerr=es, marker="s", capsize=3, label="unll", zorder=3)
    dpo, _ = series(["dpo"])
    ax.axhline(dpo[0], color="gray", ls="--", label="dpo")
    ax.set_xscale("log")
    ax.set_xlabel("alpha")
    ax.set_ylabel("win rate vs SFT")
    ax.set_title("Win rate vs penalty strength")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig_alpha.png")
    plt.close(fig)

    # Fig. 2C: win rate vs number of training pairs (dpo, unll)
    n_full = _n_pairs(out)
    fig, ax = plt.subplots(figsize=(4.5, 3.4), dpi=120)
    for k, (m, marker, style) in enumerate((("dpo", "o", "-"), ("unll", "s", "--"))):
        sizes = [n for n in s.sample_sizes if n < n_full] + [n_full]
        ys, es = series([f"{m}-n{n}" for n in s.sample_sizes if n < n_full] + [m])
        # a small horizontal offset keeps a series visible where it equals the other
        ax.errorbar([x * (1.04 ** k) for x in sizes], ys, yerr=es, marker=marker, ls=style, capsize=3, label=m,
                    fillstyle="full" if k == 0 else "none")
    ax.set_xscale("log")
    ax.set_xlabel("training pairs")
    ax.set_ylabel("win rate vs SFT")
    ax.set_title("Data efficiency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "fig_data_efficiency.png")
    plt.close(fig)

    # Fig. 3B: distribution of reward differences (main methods, pooled over seeds)
    main = {m: diffs[m] for m in (*COMPARED_METHODS, "unll+dpo") if m in diffs}
    plot_reward_differences(main, out / "fig_reward_diff.png", baseline="sft")

    # judge score of the entering policy against round, per online method (mean over seeds), on the
    # round's training prompts; beside them (unconnected) the final model's and the SFT model's mean
    # score on the test prompts
    online = r.get("online") or {}
    if online:
        fig, ax = plt.subplots(figsize=(8.5, 3.8))
        last = 0
        for method, rounds in online.items():
            ks = [x["round"] for x in rounds]
            last = max(last, ks[-1])
            line = ax.plot(ks, [x["mean_sample_score"] for x in rounds], marker="o", label=f"online-{method}: samples")[0]
            ax.plot(ks, [x["mean_ygen_score"] for x in rounds], marker="s", ls="--", color=line.get_color(),
                    label=f"online-{method}: greedy")
            final = rows.get(f"online-{method}", {}).get("mean_judge_score")
            if final is not None:
                ax.scatter([ks[-1] + 1], [final], marker="*", s=90, color=line.get_color(),
                           label=f"online-{method}: final model, test prompts")
        sft = rows.get("sft (baseline)", {}).get("mean_judge_score")
        if sft is not None:
            ax.scatter([last + 1], [sft], marker="x", color="grey", label="sft, test prompts")
        ax.set_xticks(range(1, last + 2))
        ax.set_xlabel("round (entering policy, training prompts); last: after training")
        ax.set_ylabel("mean judge score")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)  # beside the plot, not on it
        fig.tight_layout()
        fig.savefig(out / "fig_online.png")
        plt.close(fig)


def _n_pairs(out: Path) -> int:
    meta = json.loads((out / "shards" / "prefs" / "meta.json").read_text())
    return int(meta["counts"]["rows_kept"])
