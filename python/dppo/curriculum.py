"""``dppo curriculum``: rounds of on-policy penalization, the paper's self-curriculum.

Round k (1..K) takes the policy that enters it (round 1: ``--init``; then the previous round's
model) and

1. **generates** y_gen greedily with it for the round's prompts (``dppo.generate.generate_rows``:
   ``RUN/round_k/ygen.parquet``, with the generated ``response_ids``);
2. **prepares** the round's pairs with that y_gen (``dppo.data.prepare``: ``RUN/round_k/shards``;
   pairs outside the round have no y_gen and are left out, counted);
3. **trains** on them (``dppo.train.train``: ``RUN/round_k/{model,metrics.jsonl,config.json,
   checkpoints}``), the reference being ``--init`` (``--round-ref init``, default) or the policy
   entering the round (``previous``, as SPIN does).

It is a composition of those three functions, nothing else. ``--pairs-per-round N`` walks through
the prompts in the data's order (round k takes the next N; after the last, a new shuffle of all of
them, seeded, continues); by default every round takes them all.

``RUN/curriculum.json`` records the options and, per round, the fraction of pairs on which the
policy entering the round votes wrong (its summed log-probability prefers the rejected answer: the
pairs the penalty acts on), the mean y_gen length, the training's last loss and each stage's time.
``RUN/model`` is the last round's model. Interrupted anywhere, ``--resume`` continues: finished
stages are reused (generation resumes per batch, shards prepared from a complete y_gen file are
kept, training resumes from its last checkpoint).

``pairs="judge"`` (``--pairs judge``) makes the rounds online instead: the pairs are the policy's
own samples, scored by a judge and paired best against worst (``dppo.online``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from dppo.artifacts import atomic_folder, config_record, resolve_model, write_json
from dppo.data.sources import DataSource
from dppo.errors import ConfigError

__all__ = ["CurriculumConfig", "curriculum", "round_prompts"]

ROUND_REFS = ("init", "previous")
METHODS = ("minll", "unll", "conll")


def _penalizes_ygen(method: str) -> bool:
    """The registry's entry of ``method`` has a y_gen term (minll, unll, conll, a combination with one)."""
    from dppo.train.registry import LOSSES

    return method in LOSSES and LOSSES[method].needs_ygen
PAIRS = ("data", "judge")


@dataclass(frozen=True)
class CurriculumConfig:
    """A curriculum: the rounds, the data (a :class:`~dppo.data.sources.DataSource`; a plain string
    names one), the generation, and the options of every round's training
    (``train``: :class:`~dppo.train.config.TrainConfig` options other than data, init, ref, out)."""

    rounds: int
    method: str
    data: DataSource
    tokenizer: str
    init: str
    out: Path
    pairs_per_round: int | None = None
    round_ref: str = "init"
    max_len: int | None = None  # prep's max length (None: the 95th percentile, per round)
    decode: Any = None  # dppo.generate.DecodeConfig (greedy by default)
    train: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    resume: bool = False
    overwrite: bool = False
    pairs: str = "data"  # "judge": online rounds (dppo.online), configured by `online`
    online: Any = None  # dppo.online.OnlineConfig

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", DataSource.of(self.data))
        if self.rounds < 1:
            raise ConfigError(f"--rounds must be >= 1, got {self.rounds}")
        if self.pairs not in PAIRS:
            raise ConfigError(f"--pairs must be data or judge, got {self.pairs!r}")
        if self.pairs == "judge":
            if self.online is None:
                raise ConfigError("--pairs judge needs --judge (a judge dppo eval takes)")
            if self.pairs_per_round is not None:
                raise ConfigError("--pairs judge makes its own pairs: use --prompts-per-round, not --pairs-per-round")
        elif self.online is not None:
            raise ConfigError("--judge, --samples and --prompts-per-round apply to --pairs judge")
        if self.pairs == "data" and not _penalizes_ygen(self.method):
            raise ConfigError(f"--method must be one of {'|'.join(METHODS)} or a pair loss with one of their penalty "
                              f"terms (ipo+unll): a method that penalizes y_gen, got {self.method!r}")
        if self.round_ref not in ROUND_REFS:
            raise ConfigError(f"--round-ref must be init or previous, got {self.round_ref!r}")
        if self.pairs_per_round is not None and self.pairs_per_round < 1:
            raise ConfigError(f"--pairs-per-round must be >= 1, got {self.pairs_per_round}")
        for own in ("data", "init", "ref", "out", "method", "resume", "overwrite"):
            if own in self.train:
                raise ConfigError(f"--{own.replace('_', '-')} is set by the curriculum itself (each round's data, "
                                  f"policy, reference and folder){' : use --round-ref' if own == 'ref' else ''}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")


def round_prompts(n: int, per_round: int | None, rounds: int, seed: int) -> list[np.ndarray]:
    """The prompt positions of each round: all of them every round, or the next ``per_round`` in the
    data's order, wrapping into a fresh permutation (seeded by ``seed`` and the pass) at the end."""
    if per_round is None:
        return [np.arange(n) for _ in range(rounds)]
    out, stream, pass_no = [], np.arange(n), 0
    pos = 0
    for _ in range(rounds):
        take: list[int] = []
        while len(take) < min(per_round, n):
            if pos == len(stream):
                pass_no += 1
                stream, pos = np.random.default_rng([seed, pass_no]).permutation(n), 0
            k = min(min(per_round, n) - len(take), len(stream) - pos)
            take.extend(int(i) for i in stream[pos : pos + k])
            pos += k
        out.append(np.array(take, dtype=np.int64))
    return out


def _wrong_votes(policy: Path, shards_dir: Path, cfg: CurriculumConfig) -> float:
    """Fraction of the round's pairs where ``policy`` gives the rejected answer the larger summed
    log-probability (its reference-cache entry: a cache the round's training reuses when the
    policy is its reference)."""
    from dppo.train import score_pairs

    logps = score_pairs(policy, shards_dir, dtype=cfg.train.get("dtype", "auto"), device=cfg.train.get("device", "auto"),
                        batch_tokens=cfg.train.get("max_tokens_per_batch") or 16384)
    return float(np.mean(logps.chosen < logps.rejected))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _open_record(cfg: CurriculumConfig, extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], Path]:
    """``RUN/curriculum.json`` as saved (``--resume``) or new, and its path; refuses a folder
    that holds another curriculum."""
    out = Path(cfg.out)
    record_path = out / "curriculum.json"
    if out.exists() and any(out.iterdir()):
        if cfg.overwrite:
            shutil.rmtree(out)
        elif not cfg.resume:
            raise ConfigError(f"{out} already holds a curriculum: pass --resume to continue it or --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    options = {"rounds": cfg.rounds, "method": cfg.method, "data": cfg.data.data, "tokenizer": cfg.tokenizer,
               "init": cfg.init, "pairs_per_round": cfg.pairs_per_round, "round_ref": cfg.round_ref,
               "max_len": cfg.max_len, "seed": cfg.seed, "train": cfg.train,
               "decode": config_record(cfg.decode) if cfg.decode is not None else None,
               **({"pairs": cfg.pairs} if cfg.pairs != "data" else {}), **(extra or {})}
    record: dict[str, Any] = {"format": "dppo-curriculum", "options": options, "rounds": []}
    if record_path.is_file():
        saved = json.loads(record_path.read_text())
        if saved.get("options") != json.loads(json.dumps(options, default=str)):
            raise ConfigError(f"--resume: the curriculum in {out} was started with other options; start a new --out")
        record = saved
    return record, record_path


def _finish(cfg: CurriculumConfig, record: dict[str, Any], record_path: Path) -> None:
    """``RUN/model``: the last round's model (hard links where the file system allows)."""
    out = Path(cfg.out)
    last = out / f"round_{cfg.rounds}" / "model"
    with atomic_folder(out / "model") as work:
        for f in last.iterdir():
            if f.is_file():
                _link_or_copy(f, work / f.name)
    record["model"] = str(out / "model")
    write_json(record_path, record)


def curriculum(cfg: CurriculumConfig, *, console: Console | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the rounds; returns the contents of ``RUN/curriculum.json``.

    The phases: claim ``RUN/`` and its record (``_open_record``: a resumed curriculum must have
    the same options); check the train options and read the prompts, once; each round not yet
    finished (``_run_round``: y_gen, the pairs, the wrong votes and training); ``RUN/model``
    (``_finish``). With ``pairs="judge"`` the rounds are online ones (``dppo.online``).
    """
    from dppo.generate import load_prompts
    from dppo.generate.run import DecodeConfig
    from dppo.train.config import load_config

    if cfg.pairs == "judge":
        from dppo.online import online_rounds

        return online_rounds(cfg, console=console, show_progress=show_progress)
    console = console or Console(stderr=True)
    out = Path(cfg.out)
    record, record_path = _open_record(cfg)
    # the train options are checked once, before any generation (one line for a bad option)
    load_config(None, method=cfg.method, data="-", init=cfg.init, out="-", **cfg.train)
    decode = cfg.decode or DecodeConfig()
    rows, _ = load_prompts(cfg.data)
    plan = round_prompts(len(rows), cfg.pairs_per_round, cfg.rounds, cfg.seed)
    init_dir = resolve_model(cfg.init)
    policy = init_dir
    done = {r["round"]: r for r in record["rounds"]}
    for k in range(1, cfg.rounds + 1):
        rdir = out / f"round_{k}"
        if k in done and (rdir / "model" / "config.json").is_file():
            policy = rdir / "model"
            continue
        rdir.mkdir(parents=True, exist_ok=True)
        console.rule(f"round {k} of {cfg.rounds}: {len(plan[k - 1]):,} prompts, policy {policy}")
        ref = init_dir if cfg.round_ref == "init" else policy
        subset = [rows[i] for i in plan[k - 1]]
        summary = _run_round(cfg, k, rdir, policy, ref, subset, len(subset) < len(rows), decode, console, show_progress)
        record["rounds"] = [r for r in record["rounds"] if r["round"] != k] + [summary]
        write_json(record_path, record)
        console.print(f"round {k}: wrong votes {summary['wrong_vote_fraction']:.3f} of {summary['pairs']} pairs, y_gen "
                      f"{summary['mean_ygen_tokens'] or 0:.1f} tokens, final loss {summary['final_loss']:.4f}", highlight=False)
        policy = rdir / "model"
    _finish(cfg, record, record_path)
    return record


def _run_round(cfg: CurriculumConfig, k: int, rdir: Path, policy: Path, ref: Path, subset: list[Any], partial: bool,
               decode: Any, console: Console, show_progress: bool) -> dict[str, Any]:
    """Round ``k``: y_gen from the policy entering it, the round's pairs with that y_gen, how often
    the policy votes wrong on them, then training; returns the round's line of the record."""
    from dppo.data import open_shards
    from dppo.generate.run import generate_rows, read_generations
    from dppo.train import train
    from dppo.train.config import load_config

    times: dict[str, float] = {}
    # 1. y_gen: the greedy responses of the policy entering the round (resumes per batch)
    t = time.perf_counter()
    ygen = rdir / "ygen.parquet"
    generate_rows(str(policy), subset, ygen, decode, console=console, show_progress=show_progress,
                  show_summary=False, label=f"round {k}: y_gen")
    gens = read_generations(ygen)
    times["generate_s"] = round(time.perf_counter() - t, 1)
    # 2. the round's pairs with that y_gen (pairs outside the round are not part of its prep)
    t = time.perf_counter()
    shards = _round_pairs(cfg, rdir, ygen, partial, console, show_progress)
    times["prep_s"] = round(time.perf_counter() - t, 1)
    # 3. how often the entering policy votes wrong on them, then training
    t = time.perf_counter()
    wrong = _wrong_votes(policy, shards, cfg)
    train(load_config(None, method=cfg.method, data=str(shards), init=str(policy), ref=str(ref), out=str(rdir),
                      resume=True, **cfg.train), console=console)
    times["train_s"] = round(time.perf_counter() - t, 1)
    metrics = [json.loads(x) for x in (rdir / "metrics.jsonl").read_text().splitlines()]
    return {
        "round": k,
        "policy": str(policy),
        "reference": str(ref),
        "prompts": len(subset),
        "pairs": len(open_shards(shards)),
        "wrong_vote_fraction": wrong,
        "mean_ygen_tokens": float(np.mean([g["response_tokens"] for g in gens])) if gens else None,
        "steps": len(metrics),
        "final_loss": metrics[-1]["loss"] if metrics else None,
        "penalized": float(np.mean([m.get("penalized", 0.0) for m in metrics])) if metrics else None,
        **times,
    }


def _round_pairs(cfg: CurriculumConfig, rdir: Path, ygen: Path, partial: bool, console: Console, show_progress: bool) -> Path:
    """``rdir/shards``: the pairs joined with the round's y_gen (a partial round prepares only its own
    pairs), kept when already prepared from this very y_gen file."""
    from dppo.data.prep import PrepConfig, prepare

    shards = rdir / "shards"
    stamp = rdir / "shards.ygen-stamp"
    ygen_id = f"{ygen.stat().st_size}-{ygen.stat().st_mtime_ns}"
    if not ((shards / "meta.json").is_file() and stamp.is_file() and stamp.read_text() == ygen_id):
        prepare(PrepConfig("prefs", cfg.data, cfg.tokenizer, shards, ygen=ygen, max_len=cfg.max_len,
                           ygen_subset=partial, overwrite=True),
                console=console, show_progress=show_progress)
        stamp.write_text(ygen_id)
    return shards
