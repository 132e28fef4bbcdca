"""``dppo curriculum --pairs judge``: online rounds, where the policy's own samples are judged and paired.

Round k (1..K) takes the policy that enters it (round 1: ``--init``; then the previous round's
model) and the round's prompts (``--prompts-per-round N`` walks ``--data`` as ``--pairs-per-round``
does; default: all of them, every round), then

1. **samples** ``--samples K`` responses per prompt (``--temperature``, ``--top-p``, ``--seed``) in
   one batched call of the decoder (``Decoder.run(samples=K)``): sample ``j`` of a prompt is seeded
   by ``(seed, prompt_id, j)`` alone, so it does not depend on the batch, the order, a resumed run
   or the number of ranks; and its greedy response, y_gen (``dppo.generate.generate_rows``);
   ``RUN/round_k/samples.parquet`` (before judging: scores null) and ``ygen.parquet``;
2. **judges** every sample and y_gen with ``--judge`` (any judge ``dppo eval`` takes; scores cached
   in ``RUN/judge_scores.sqlite``, so a resumed round pays no judge call twice). An item the judge
   fails on, after its retries, gets no score and is counted: it never becomes a pair;
3. **pairs** each prompt's best-scored sample (chosen) with its worst (rejected), ``--pair-rule
   best-worst`` (the only rule): equal scores go to the lower sample index; a prompt whose scored
   samples all tie, or with fewer than two scored samples, makes no pair (counted);
   ``RUN/round_k/pairs.parquet`` in UltraFeedback's schema (``prompt``, ``prompt_id``, ``chosen``,
   ``rejected``, ``messages``, ``score_chosen``, ``score_rejected``) plus ``chosen_sample``,
   ``rejected_sample``, ``chosen_ids`` and ``rejected_ids``;
4. **prepares** the pairs with y_gen (``dppo.data.prepare``), storing the **generated token ids** for
   chosen, rejected and y_gen (never a re-tokenization of their text; ``docs/shards.md``);
5. measures the entering policy's **wrong-vote share** on them (the reference pass) and **trains**
   with any method from the entering policy, the reference as ``--round-ref`` says.

``RUN/curriculum.json`` records, per round, the mean score of the samples and of y_gen, the share
of prompts tied, pairs made, judge failures, the wrong-vote share, the training's last loss and the
seconds of each stage (sample, judge, prep, reference, train). With ``--eval-data``, after every
round, the round's greedy model is judged against the initial model on those prompts by the same
judge (``dppo.eval.evaluate``: win rate, LC win rate), a curve in ``curriculum.json`` and
``RUN/online.png``.

Under torchrun the prompts are dealt to the ranks by length for sampling (each rank writes its own
part files) and the judged items by position (``i::world``), as ``dppo generate`` and ``dppo eval``
do. Killed anywhere, ``--resume`` continues inside the round: sampled prompts are kept (part files),
scores come back from the cache, prepared shards and training resume as ``dppo curriculum`` does.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from dppo.artifacts import meta_path_of, model_tokenizer_dir, resolve_model, tokenizer_fingerprint, write_json
from dppo.console import esc
from dppo.data.sources import DataSource
from dppo.errors import ConfigError

__all__ = ["OnlineConfig", "PAIR_RULES", "SAMPLE_COLUMNS", "pair_best_worst", "online_rounds"]

PAIR_RULES = ("best-worst",)
SAMPLE_COLUMNS = ("prompt_id", "prompt", "sample", "response", "response_ids", "finish_reason", "score", "judge_error")


@dataclass(frozen=True)
class OnlineConfig:
    """What ``--pairs judge`` adds to a curriculum: the judge, the sampling, the pairing rule and the
    held-out prompts of the per-round win rate."""

    judge: str
    samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    prompts_per_round: int | None = None
    pair_rule: str = "best-worst"
    eval_data: DataSource | None = None
    eval_limit: int | None = None
    judge_batch_size: int = 8
    api_base: str | None = None
    concurrency: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.judge, str) or not self.judge:
            raise ConfigError("--pairs judge needs --judge (a judge dppo eval takes)")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2:
            raise ConfigError(f"--samples must be an integer >= 2 (a pair needs two responses), got {self.samples!r}")
        if not self.temperature > 0:
            raise ConfigError(f"--temperature must be > 0 for sampled pairs, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise ConfigError(f"--prompts-per-round must be >= 1, got {self.prompts_per_round}")
        if self.pair_rule not in PAIR_RULES:
            raise ConfigError(f"--pair-rule must be one of {', '.join(PAIR_RULES)}, got {self.pair_rule!r}")
        if self.eval_data is not None:
            object.__setattr__(self, "eval_data", DataSource.of(self.eval_data))

    def record(self) -> dict[str, Any]:
        return {"judge": self.judge, "samples": self.samples, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "prompts_per_round": self.prompts_per_round, "pair_rule": self.pair_rule,
                "eval_data": None if self.eval_data is None else self.eval_data.data, "eval_limit": self.eval_limit}


def pair_best_worst(scores: list[float | None]) -> tuple[int, int] | str:
    """The (chosen, rejected) sample indices of one prompt under ``best-worst``, or why none:
    ``"too_few_scored"`` (fewer than two scores) or ``"tied"`` (every scored sample equal). Equal
    scores go to the lower sample index."""
    scored = [(s, j) for j, s in enumerate(scores) if s is not None]
    if len(scored) < 2:
        return "too_few_scored"
    best = max(scored, key=lambda x: (x[0], -x[1]))
    worst = min(scored, key=lambda x: (x[0], x[1]))
    if best[0] == worst[0]:
        return "tied"
    return best[1], worst[1]


def _key(prompt_id: str) -> int:
    """A prompt's sampling key: ``dppo generate``'s (blake2b-64 of its prompt_id)."""
    return int(hashlib.blake2b(prompt_id.encode(), digest_size=8).hexdigest(), 16)


def _schema() -> Any:
    import pyarrow as pa

    return pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()), ("sample", pa.int32()),
                      ("response", pa.string()), ("response_ids", pa.list_(pa.int32())), ("finish_reason", pa.string()),
                      ("score", pa.float64()), ("judge_error", pa.string())])


def _write_parquet(table: Any, path: Path) -> None:
    import io

    import pyarrow.parquet as pq

    from dppo.artifacts import write_atomic

    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(path, buf.getvalue())


def _sample(policy: Path, rows: list[Any], path: Path, decode: Any, online: OnlineConfig, dist: Any, device: Any,
            console: Console, show_progress: bool, label: str) -> None:
    """K samples per prompt of ``rows`` into ``path`` (resuming from its part files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    from dppo.artifacts import resolve_dtype, torch_dtype
    from dppo.distributed import barrier, on_main, split_by_cost
    from dppo.generate.decoding import Decoder, SamplingConfig
    from dppo.generate.run import _load_quietly, render_prompts, stop_token_ids
    from dppo.generate.run import _progress as generation_progress

    if path.is_file():
        return
    parts = path.with_name(path.name + ".parts")
    tok_dir = model_tokenizer_dir(policy, decode.tokenizer)
    k = online.samples
    done: set[str] = set()
    if parts.is_dir():
        counts: dict[str, int] = {}
        for p in sorted(parts.glob("part-*.parquet")):
            for pid in pq.read_table(p, columns=["prompt_id"]).column("prompt_id").to_pylist():
                counts[pid] = counts.get(pid, 0) + 1
        done = {pid for pid, n in counts.items() if n >= k}
    pending = [r for r in rows if r.prompt_id not in done]
    first = max((int(p.stem.split("-")[1]) for p in parts.glob("part-*.parquet")), default=-1) + 1 if parts.is_dir() else 0
    barrier(dist)
    if pending:
        on_main(dist, parts.mkdir, parents=True, exist_ok=True)
        ids = render_prompts(pending, tok_dir, decode.max_prompt_len)
        if dist.active:
            share = split_by_cost([len(x) for x in ids], dist.world)[dist.rank].tolist()
            pending, ids = [pending[i] for i in share], [ids[i] for i in share]
        suffix = f"-r{dist.rank:03d}" if dist.active else ""
        detok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
        stop = stop_token_ids(tok_dir, policy)
        dtype = resolve_dtype(decode.dtype, device)
        lm = _load_quietly(policy, dtype, device)
        decoder = Decoder(lm, stop, engine=decode.engine if decode.engine != "vllm" else "auto", pad_id=stop[0],
                          dtype=str(torch_dtype(dtype)).removeprefix("torch."))
        sampling = SamplingConfig(max_new_tokens=decode.sampling.max_new_tokens, temperature=online.temperature,
                                  top_p=online.top_p, seed=online.seed)
        bs = decode.batch_size or (128 if device.type == "cuda" else 32)
        # a prompt's K sequences are written in one part (a resumed run redoes a prompt whole)
        buffer: dict[int, list[Any]] = {}
        b = 0
        with generation_progress(console, show_progress, f"{label} ({k} per prompt)") as (progress, task, on_tokens):
            progress.update(task, total=len(pending))
            for completions in decoder.run(ids, sampling, batch_size=max(bs, k), keys=[_key(r.prompt_id) for r in pending],
                                           samples=k, on_tokens=on_tokens):
                for c in completions:
                    buffer.setdefault(c.index, []).append(c)
                ready = [i for i, cs in buffer.items() if len(cs) == k]
                if not ready:
                    continue
                table = pa.Table.from_pylist([
                    {"prompt_id": pending[i].prompt_id, "prompt": pending[i].prompt, "sample": c.sample,
                     "response": detok.decode(c.token_ids, skip_special_tokens=False), "response_ids": c.token_ids,
                     "finish_reason": c.finish_reason, "score": None, "judge_error": None}
                    for i in ready for c in sorted(buffer.pop(i), key=lambda c: c.sample)], schema=_schema())
                _write_parquet(table, parts / f"part-{first + b:06d}{suffix}.parquet")
                b += 1
                progress.advance(task, len(ready))
        del decoder, lm
    barrier(dist)

    def merge() -> None:
        tables = [pq.read_table(p) for p in sorted(parts.glob("part-*.parquet"))] if parts.is_dir() else []
        table = pa.concat_tables(tables).cast(_schema()) if tables else _schema().empty_table()
        order = {r.prompt_id: n for n, r in enumerate(rows)}
        got = table.to_pylist()
        latest = {(g["prompt_id"], g["sample"]): g for g in got if g["prompt_id"] in order}
        merged = sorted(latest.values(), key=lambda g: (order[g["prompt_id"]], g["sample"]))
        _write_parquet(pa.Table.from_pylist(merged, schema=_schema()), path)
        write_json(meta_path_of(path), {"format": "dppo-samples", "tokenizer": {"fingerprint": tokenizer_fingerprint(tok_dir)},
                                        "policy": str(policy), **online.record()})
        shutil.rmtree(parts, ignore_errors=True)

    on_main(dist, merge)
    barrier(dist)


def _judge(judge: Any, items: list[tuple[str, str]], cache_path: Path, dist: Any, console: Console, show_progress: bool,
           label: str) -> list[Any]:
    """Scores of ``items`` (cached), judged over the ranks ``i::world`` as ``dppo eval`` does, under
    ``dppo eval``'s bar: this rank's items (a round's samples and y_gen together), cached ones counted
    as done."""
    from dppo.console import progress_bar
    from dppo.eval.judges import ScoreCache, score_over_ranks

    n = len(range(dist.rank, len(items), dist.world))
    with ScoreCache(cache_path) as cache, progress_bar(console, show_progress) as bar:
        task = bar.add_task(esc(label), total=n)
        return score_over_ranks(judge, items, cache, dist, progress=lambda m: bar.advance(task, m))


def _pairs_table(rows: list[Any], samples: list[dict[str, Any]], k: int) -> tuple[Any, dict[str, int]]:
    """The round's pairs (module docstring, step 3) and the counts of prompts without one."""
    import pyarrow as pa

    by_prompt: dict[str, list[dict[str, Any] | None]] = {r.prompt_id: [None] * k for r in rows}
    for s in samples:
        by_prompt[s["prompt_id"]][s["sample"]] = s
    out, counts = [], {"tied": 0, "too_few_scored": 0}
    for r in rows:
        got = by_prompt[r.prompt_id]
        rule = pair_best_worst([None if s is None else s["score"] for s in got])
        if isinstance(rule, str):
            counts[rule] += 1
            continue
        c, w = got[rule[0]], got[rule[1]]
        head = [{"role": role, "content": text} for role, text in r.messages]
        chosen = head + [{"role": "assistant", "content": c["response"]}]
        rejected = head + [{"role": "assistant", "content": w["response"]}]
        out.append({"prompt": r.prompt, "prompt_id": r.prompt_id, "chosen": chosen, "rejected": rejected, "messages": chosen,
                    "score_chosen": c["score"], "score_rejected": w["score"], "chosen_sample": rule[0],
                    "rejected_sample": rule[1], "chosen_ids": c["response_ids"], "rejected_ids": w["response_ids"]})
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    schema = pa.schema([("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", msg), ("rejected", msg),
                        ("messages", msg), ("score_chosen", pa.float64()), ("score_rejected", pa.float64()),
                        ("chosen_sample", pa.int32()), ("rejected_sample", pa.int32()),
                        ("chosen_ids", pa.list_(pa.int32())), ("rejected_ids", pa.list_(pa.int32()))])
    return pa.Table.from_pylist(out, schema=schema), counts


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


@dataclass
class _Rounds:
    """What every round of one online run shares (``online_rounds``' set-up)."""

    cfg: Any
    online: OnlineConfig
    decode: Any
    dist: Any
    device: Any
    console: Console
    show_progress: bool
    record: dict[str, Any]
    record_path: Path
    judge: Any
    rows: list[Any]
    plan: list[Any]
    init_dir: Path

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def online_rounds(cfg: Any, *, console: Console | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Run (or continue) the online rounds of a curriculum ``cfg`` (``pairs="judge"``); returns the
    contents of ``RUN/curriculum.json``."""
    from dppo.curriculum import _finish
    from dppo.distributed import barrier

    run = _start(cfg, console or Console(stderr=True), show_progress)
    policy = run.init_dir
    done = {r["round"]: r for r in run.record["rounds"]}
    for k in range(1, cfg.rounds + 1):
        rdir = run.out / f"round_{k}"
        if not (k in done and (rdir / "model" / "config.json").is_file()):
            _record_round(run, _round(run, k, policy, rdir))
        policy = rdir / "model"
    run.judge.close()
    if run.dist.main:
        _finish(cfg, run.record, run.record_path)
    barrier(run.dist)
    return run.record


def _start(cfg: Any, console: Console, show_progress: bool) -> _Rounds:
    """The run's record opened (or continued), then everything checked before any sampling: the
    train options, the judge, the prompts."""
    from dppo.curriculum import _open_record, round_prompts
    from dppo.distributed import barrier, on_main
    from dppo.distributed import setup as setup_distributed
    from dppo.eval.judges import JudgeOptions, make_judge
    from dppo.generate import load_prompts
    from dppo.generate.run import DecodeConfig
    from dppo.train.config import load_config

    online: OnlineConfig = cfg.online
    decode = cfg.decode or DecodeConfig()
    dist, device = setup_distributed(decode.device)
    if not dist.main:
        console, show_progress = Console(stderr=True, quiet=True), False
    record, record_path = on_main(dist, _open_record, cfg, {"online": online.record()})
    barrier(dist)
    load_config(None, method=cfg.method, data="-", init=cfg.init, out="-", **cfg.train)
    judge = make_judge(online.judge, JudgeOptions(batch_size=online.judge_batch_size, api_base=online.api_base,
                                                  concurrency=online.concurrency))
    judge.check()
    rows, _ = load_prompts(cfg.data)
    if any(r.ids is not None for r in rows):
        raise ConfigError(f"{cfg.data.data}: online rounds need prompts as text (the judge reads them), not prepared shards")
    plan = round_prompts(len(rows), online.prompts_per_round, cfg.rounds, cfg.seed)
    return _Rounds(cfg, online, decode, dist, device, console, show_progress, record, record_path, judge, rows, plan,
                   resolve_model(cfg.init))


def _round(run: _Rounds, k: int, policy: Path, rdir: Path) -> dict[str, Any]:
    """Round ``k``: sample, judge, pair and prepare, vote and train (module docstring, steps 1-5)."""
    from dppo.distributed import on_main

    on_main(run.dist, rdir.mkdir, parents=True, exist_ok=True)
    subset = [run.rows[i] for i in run.plan[k - 1]]
    run.console.rule(f"round {k} of {run.cfg.rounds}: {len(subset):,} prompts x {run.online.samples} samples, policy {policy}")
    times: dict[str, float] = {}
    t = time.perf_counter()
    ygen = _sample_round(run, k, policy, subset, rdir)
    times["sample_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    samples, gens, scores = _judge_round(run, k, subset, rdir, ygen)
    times["judge_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    pairs, skipped = _prepare_round(run, k, subset, rdir, samples, gens, scores[len(samples):], ygen)
    times["prep_s"] = round(time.perf_counter() - t, 1)
    wrong, ref = _train_round(run, policy, rdir, times)
    return _summary(run, k, policy, ref, rdir, subset, samples, gens, scores, pairs, skipped, wrong, times)


def _sample_round(run: _Rounds, k: int, policy: Path, subset: list[Any], rdir: Path) -> Path:
    """Step 1: K samples per prompt (``samples.parquet``) and y_gen (``ygen.parquet``, returned)."""
    from dppo.generate.run import generate_rows

    _sample(policy, subset, rdir / "samples.parquet", run.decode, run.online, run.dist, run.device, run.console,
            run.show_progress, f"round {k}: sample")
    ygen = rdir / "ygen.parquet"
    generate_rows(str(policy), subset, ygen, run.decode, console=run.console, show_progress=run.show_progress,
                  show_summary=False, label=f"round {k}: y_gen")
    return ygen


def _judge_round(run: _Rounds, k: int, subset: list[Any], rdir: Path, ygen: Path) -> tuple[list[dict], list[dict], list[Any]]:
    """Step 2: every sample and y_gen judged (cached: a resumed round pays nothing twice); the
    samples carry their scores, the scores list ends with y_gen's."""
    import pyarrow.parquet as pq

    from dppo.generate.run import read_generations

    samples = pq.read_table(rdir / "samples.parquet").to_pylist()
    gens = read_generations(ygen)
    prompt_of = {r.prompt_id: r.prompt for r in subset}
    items = [(s["prompt"], s["response"]) for s in samples] + [(prompt_of[g["prompt_id"]], g["response"]) for g in gens]
    scores = _judge(run.judge, items, run.out / "judge_scores.sqlite", run.dist, run.console, run.show_progress,
                    f"round {k}: judge {run.judge.name}")
    for s, sc in zip(samples, scores, strict=False):
        s["score"], s["judge_error"] = sc.value, (None if sc.ok else (sc.error or "failed"))
    return samples, gens, scores


def _prepare_round(run: _Rounds, k: int, subset: list[Any], rdir: Path, samples: list[dict], gens: list[dict],
                   ygen_scores: list[Any], ygen: Path) -> tuple[Any, dict[str, int]]:
    """Steps 3 and 4: best vs worst per prompt (``pairs.parquet``), prepared with the generated ids
    (on rank 0; the other ranks wait)."""
    import pyarrow as pa

    from dppo.data.prep import PrepConfig, prepare
    from dppo.distributed import barrier, on_main

    cfg = run.cfg
    pairs, skipped = _pairs_table(subset, samples, run.online.samples)
    samples_path, shards = rdir / "samples.parquet", rdir / "shards"
    values = [sc.value for sc in ygen_scores]

    def write_and_prepare() -> None:
        _write_parquet(pa.Table.from_pylist(samples, schema=_schema()), samples_path)
        _write_parquet(pa.Table.from_pylist(
            [{"prompt_id": g["prompt_id"], "score": v} for g, v in zip(gens, values, strict=True)],
            schema=pa.schema([("prompt_id", pa.string()), ("score", pa.float64())])), rdir / "ygen_scores.parquet")
        pairs_path = rdir / "pairs.parquet"
        _write_parquet(pairs, pairs_path)
        write_json(meta_path_of(pairs_path), json.loads(meta_path_of(samples_path).read_text()))
        if pairs.num_rows == 0:
            raise ConfigError(f"round {k}: no pair among {len(subset)} prompts ({skipped['tied']} tied, "
                              f"{skipped['too_few_scored']} with fewer than two scored samples); see {samples_path}")
        stamp = rdir / "shards.pairs-stamp"
        pairs_id = hashlib.blake2b(pairs_path.read_bytes(), digest_size=8).hexdigest()
        if (shards / "meta.json").is_file() and stamp.is_file() and stamp.read_text() == pairs_id:
            return
        prepare(PrepConfig("prefs", DataSource(str(pairs_path)), cfg.tokenizer, shards, ygen=ygen, pair_ids=pairs_path,
                           max_len=cfg.max_len, overwrite=True), console=run.console, show_progress=run.show_progress)
        stamp.write_text(pairs_id)

    on_main(run.dist, write_and_prepare)
    barrier(run.dist)
    return pairs, skipped


def _train_round(run: _Rounds, policy: Path, rdir: Path, times: dict[str, float]) -> tuple[float, Path]:
    """Step 5: the entering policy's wrong-vote share on the round's pairs, then training from it;
    returns the share and the reference trained against."""
    from dppo.curriculum import _wrong_votes
    from dppo.distributed import on_main
    from dppo.train import train
    from dppo.train.config import load_config

    cfg = run.cfg
    t = time.perf_counter()
    wrong = on_main(run.dist, _wrong_votes, policy, rdir / "shards", cfg)  # one rank writes the reference cache
    times["reference_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    ref = run.init_dir if cfg.round_ref == "init" else policy
    run_cfg = load_config(None, method=cfg.method, data=str(rdir / "shards"), init=str(policy), ref=str(ref), out=str(rdir),
                          resume=True, **cfg.train)
    train(run_cfg, console=run.console)
    times["train_s"] = round(time.perf_counter() - t, 1)
    return wrong, ref


def _summary(run: _Rounds, k: int, policy: Path, ref: Path, rdir: Path, subset: list[Any], samples: list[dict],
             gens: list[dict], scores: list[Any], pairs: Any, skipped: dict[str, int], wrong: float,
             times: dict[str, float]) -> dict[str, Any]:
    """Round ``k``'s entry of ``curriculum.json`` (with ``--eval-data``: its win rate)."""
    metrics = [json.loads(x) for x in (rdir / "metrics.jsonl").read_text().splitlines()]
    ygen_scores = [sc.value for sc in scores[len(samples):]]
    summary: dict[str, Any] = {
        "round": k,
        "policy": str(policy),
        "reference": str(ref),
        "prompts": len(subset),
        "samples": len(samples),
        "mean_sample_score": _mean([s["score"] for s in samples if s["score"] is not None]),
        "mean_ygen_score": _mean([v for v in ygen_scores if v is not None]),
        "tied_share": skipped["tied"] / len(subset) if subset else None,
        "tied": skipped["tied"],
        "too_few_scored": skipped["too_few_scored"],
        "judge_failures": sum(1 for sc in scores if not sc.ok),
        "judge_retries": run.judge.retries,
        "pairs": pairs.num_rows,
        "wrong_vote_fraction": wrong,
        "mean_sample_tokens": _mean([len(s["response_ids"]) for s in samples]),
        "mean_ygen_tokens": _mean([g["response_tokens"] for g in gens]),
        "steps": len(metrics),
        "final_loss": metrics[-1]["loss"] if metrics else None,
        **times,
    }
    vc = json.loads((rdir / "config.json").read_text()).get("vote_clip_auto") if (rdir / "config.json").is_file() else None
    if vc is not None:
        summary["vote_clip"] = vc
    if run.online.eval_data is not None:
        summary["eval"] = _eval_round(run.cfg, run.online, rdir, run.init_dir, run.decode, run.console, run.show_progress)
    return summary


def _record_round(run: _Rounds, summary: dict[str, Any]) -> None:
    """The round's entry into ``curriculum.json`` and ``online.png`` (rank 0), and its line."""
    k = summary["round"]
    run.record["rounds"] = [r for r in run.record["rounds"] if r["round"] != k] + [summary]
    if run.dist.main:
        write_json(run.record_path, run.record)
        _plot(run.record, run.out / "online.png")
    def score(v: float | None) -> str:  # a mean of 0 is a score; only a missing one is "-"
        return "-" if v is None else f"{v:.4g}"

    run.console.print(f"round {k}: {summary['pairs']} pairs ({summary['tied']} prompts tied), mean sample score "
                      f"{score(summary['mean_sample_score'])}, y_gen {score(summary['mean_ygen_score'])}, "
                      f"wrong votes {summary['wrong_vote_fraction']:.3f}", highlight=False)


def _eval_round(cfg: Any, online: OnlineConfig, rdir: Path, init_dir: Path, decode: Any, console: Console,
                show_progress: bool) -> dict[str, Any]:
    """The round's model against the initial model on ``--eval-data``, greedy, by the same judge."""
    from dppo.eval.winrate import EvalConfig, evaluate
    from dppo.generate.decoding import SamplingConfig
    from dppo.generate.run import DecodeConfig

    greedy = DecodeConfig(sampling=SamplingConfig(max_new_tokens=decode.sampling.max_new_tokens),
                          batch_size=decode.batch_size, engine=decode.engine, dtype=decode.dtype, device=decode.device,
                          max_prompt_len=decode.max_prompt_len, tokenizer=decode.tokenizer)
    res = evaluate(EvalConfig(models=(str(rdir / "model"),), baseline=str(init_dir), judge=online.judge, data=online.eval_data,
                              out=rdir / "eval", limit=online.eval_limit, decode=greedy, cache_dir=Path(cfg.out) / "eval_cache",
                              api_base=online.api_base, judge_batch_size=online.judge_batch_size,
                              concurrency=online.concurrency), console=console, show_progress=False)
    row = res["models"][0]
    return {k: row[k] for k in ("n", "win_rate", "se", "lc_win_rate", "lc_se", "wins", "losses", "ties", "mean_reward",
                                "baseline_mean_reward")}


def _plot(record: dict[str, Any], path: Path) -> None:
    """Mean judge score (samples, y_gen) and, with --eval-data, the win rate against round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dppo.artifacts import write_atomic

    rounds = sorted(record["rounds"], key=lambda r: r["round"])
    ks = [r["round"] for r in rounds]
    with_eval = any("eval" in r for r in rounds)
    fig, axes = plt.subplots(1, 2 if with_eval else 1, figsize=(10 if with_eval else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    for key, label in (("mean_sample_score", "samples"), ("mean_ygen_score", "y_gen (greedy)")):
        ax.plot(ks, [r.get(key) if r.get(key) is not None else np.nan for r in rounds], marker="o", label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("mean judge score of the entering policy")
    ax.legend()
    if with_eval:
        ax = axes[0][1]
        for key, label in (("win_rate", "win rate"), ("lc_win_rate", "LC win rate")):
            ys = [(r.get("eval") or {}).get(key) for r in rounds]
            ax.plot(ks, [np.nan if y is None else y for y in ys], marker="o", label=label)
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("round")
        ax.set_ylabel("vs the initial model")
        ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
