"""Build and write the demo world: SFT data from the demonstrator, preference pairs from the
external generators scored by the judge, held-out test prompts, and a tokenizer trained on the
world's text. Fully offline and deterministic given the seed.

    paths = write_world("runs/demo/world", n_sft=2000, n_pairs=2000, n_test=300, seed=0)

The files use the real data sets' schemas, so `dppo prep sft` / `dppo prep prefs` read them as
they read SmolTalk and UltraFeedback-binarized.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any, Iterator

from dppo.demo.generators import EXTERNAL, FILLER, demonstrator
from dppo.demo.judge import MAX_SCORE, score_task
from dppo.demo.tasks import KINDS, TEMPLATES, TEST_FRACTION, VAL_FRACTION, WORDS, Task, random_task, split_of
from dppo.synthetic import make_tokenizer, prompt_id

__all__ = ["World", "build_world", "write_world", "sample_tasks", "VOCAB_SIZE", "DEFAULT_SYSTEM", "SPLIT_PATTERN"]

# The tokenizer's pre-split: runs of letters, runs of digits, runs of spaces, runs of anything else.
# So every word and number of the world is one token, the same token in the prompt and in the
# answer (Qwen2's pattern would glue the leading space to a word, " drum" in the prompt but "drum"
# first in an answer, and split numbers into digits), and a tiny model can learn to copy them.
SPLIT_PATTERN = r"\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+"
VOCAB_SIZE = 2048  # an upper bound: merges run out at about 1,200 (every word and number whole)
DEFAULT_SYSTEM = "You are a helpful assistant."  # what the Qwen-style template adds without a system turn
_MAX_MISSES = 2000  # draws of a kind without a new prompt before the kind counts as exhausted


def _rng(seed: int, *parts: str) -> random.Random:
    """An independent stream per purpose (and per prompt), so a row never depends on the order in
    which others were made. String seeds hash with sha512: stable across runs and platforms."""
    return random.Random(":".join(["dppo-demo", str(seed), *parts]))


def _task_stream(rng: random.Random, split: str) -> Iterator[Task]:
    """Distinct tasks of one split, kinds drawn uniformly (a kind is redrawn until a new prompt of
    it turns up, so repeats do not thin it out); a kind whose prompts run out (spell has ~1,000)
    drops out of the draw. Raises ValueError when every kind is exhausted."""
    seen: set[str] = set()
    kinds = list(KINDS)
    while kinds:
        kind = rng.choice(kinds)
        for _ in range(_MAX_MISSES):
            task = random_task(rng, kind)
            if task.prompt not in seen and split_of(task.prompt) == split:
                seen.add(task.prompt)
                yield task
                break
        else:
            kinds.remove(kind)
    raise ValueError(f"the demo world has no more distinct {split} prompts")


def sample_tasks(n: int, seed: int, split: str = "train", purpose: str = "tasks") -> list[Task]:
    """``n`` distinct tasks of ``split`` (``"train"``, ``"val"`` or ``"test"``)."""
    stream = _task_stream(_rng(seed, purpose, split), split)
    return [next(stream) for _ in range(n)]


def _chat(prompt: str, response: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


@dataclass
class World:
    """The rows of the three files and what was measured while making them."""

    seed: int
    sft: list[dict[str, Any]]
    prefs_train: list[dict[str, Any]]
    prefs_test: list[dict[str, Any]]
    prefs_val: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


def _sft_rows(n: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    rows, scores, by_kind, filler = [], [], {k: [] for k in KINDS}, 0
    for task in sample_tasks(n, seed, "train", "sft"):
        response = demonstrator(task, _rng(seed, "demonstrator", task.prompt))
        s = score_task(task, response)
        rows.append({"messages": _chat(task.prompt, response)})
        scores.append(s)
        by_kind[task.kind].append(s == MAX_SCORE)
        filler += response.endswith(FILLER)
    stats = {
        "exact": _frac(s == MAX_SCORE for s in scores),
        "mean_score": _round(mean(scores)) if scores else None,
        "exact_by_kind": {k: _frac(v) for k, v in by_kind.items()},
        "filler": _round(filler / max(n, 1)),
    }
    return rows, stats


def _pair_rows(n: int, seed: int, split: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """UltraFeedback's recipe: every external generator answers, the judge scores each answer,
    chosen = a best-scored one, rejected = a random one among those scored strictly lower; prompts
    where all tie are skipped."""
    names = list(EXTERNAL)
    rows, skipped = [], 0
    gen_scores: dict[str, list[float]] = {g: [] for g in names}
    chosen_by, rejected_by, kinds = Counter[str](), Counter[str](), Counter[str]()
    stream = _task_stream(_rng(seed, "prefs", split), split)
    while len(rows) < n:
        task = next(stream)
        p = task.prompt
        responses = {g: EXTERNAL[g](task, _rng(seed, g, p)) for g in names}
        scores = {g: score_task(task, r) for g, r in responses.items()}
        for g in names:
            gen_scores[g].append(scores[g])
        best = max(scores.values())
        worse = [g for g in names if scores[g] < best]
        if not worse:
            skipped += 1
            continue
        pick = _rng(seed, "pick", p)
        c = pick.choice([g for g in names if scores[g] == best])
        r = pick.choice(worse)
        chosen_by[c] += 1
        rejected_by[r] += 1
        kinds[task.kind] += 1
        rows.append(
            {
                "prompt": p,
                "prompt_id": prompt_id(p),
                "chosen": _chat(p, responses[c]),
                "rejected": _chat(p, responses[r]),
                "messages": _chat(p, responses[c]),
                "score_chosen": scores[c],
                "score_rejected": scores[r],
            }
        )
    def words(r: dict[str, Any], side: str) -> float:
        return len(r[side][1]["content"].split())

    stats = {
        "pairs": len(rows),
        "skipped_all_tied": skipped,
        "mean_words_chosen": _round(mean(words(r, "chosen") for r in rows)) if rows else None,
        "mean_words_rejected": _round(mean(words(r, "rejected") for r in rows)) if rows else None,
        "kinds": dict(sorted(kinds.items())),
        "mean_score_chosen": _round(mean(r["score_chosen"] for r in rows)) if rows else None,
        "mean_score_rejected": _round(mean(r["score_rejected"] for r in rows)) if rows else None,
        "chosen_by": {g: chosen_by[g] for g in names},
        "rejected_by": {g: rejected_by[g] for g in names},
        "generators": {
            g: {"exact": _frac(s == MAX_SCORE for s in v), "mean_score": _round(mean(v)) if v else None} for g, v in gen_scores.items()
        },
    }
    return rows, stats


def _frac(flags: Any) -> float | None:
    flags = list(flags)
    return _round(sum(flags) / len(flags)) if flags else None


def _round(x: float) -> float:
    return round(float(x), 4)


def build_world(*, n_sft: int, n_pairs: int, n_test: int, n_val: int | None = None, seed: int = 0) -> World:
    """All rows of the world, in memory (``n_val``: validation pairs, default ``n_test``)."""
    sft, sft_stats = _sft_rows(n_sft, seed)
    train, train_stats = _pair_rows(n_pairs, seed, "train")
    test, test_stats = _pair_rows(n_test, seed, "test")
    val, val_stats = _pair_rows(n_test if n_val is None else n_val, seed, "val")
    stats = {"demonstrator_sft": sft_stats, "prefs_train": train_stats, "prefs_val": val_stats, "prefs_test": test_stats}
    return World(seed, sft, train, test, val, stats)


def _write_parquet(path: Path, rows: list[dict[str, Any]], kind: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    if kind == "sft":
        schema = pa.schema([("messages", chat)])
    else:
        schema = pa.schema(
            [("prompt", pa.string()), ("prompt_id", pa.string()), ("chosen", chat), ("rejected", chat),
             ("messages", chat), ("score_chosen", pa.float64()), ("score_rejected", pa.float64())]
        )
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _tokenizer_texts(world: World) -> list[str]:
    """The training side of the world (SFT rows and training pairs) with the words the chat
    template adds, one text per conversation; test prompts are not used."""
    head = f"system\n{DEFAULT_SYSTEM}\nuser\n"
    texts = [f"{head}{r['messages'][0]['content']}\nassistant\n{r['messages'][1]['content']}" for r in world.sft]
    for r in world.prefs_train:
        texts += [f"{head}{r['prompt']}\nassistant\n{r['chosen'][1]['content']}", f"assistant\n{r['rejected'][1]['content']}"]
    return texts


def _token_stats(tok_dir: Path, world: World) -> dict[str, Any]:
    """Token counts with the trained tokenizer, the prompt rendered by the Qwen-style template
    (default system turn + user turn + generation prompt) and the response with its end of turn."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    head = f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n"
    convs = [r["messages"] for r in world.sft] + [r[k] for r in world.prefs_train for k in ("chosen", "rejected")]
    users = [m[0]["content"] for m in convs]
    # one batched call per column (the tokenizer's own threads), not one call per text
    user = [len(e.ids) for e in tok.encode_batch(users)]
    prompt = [len(e.ids) for e in tok.encode_batch([f"{head}{u}<|im_end|>\n<|im_start|>assistant\n" for u in users])]
    response = [len(e.ids) for e in tok.encode_batch([f"{m[1]['content']}<|im_end|>\n" for m in convs])]
    full = [p + r for p, r in zip(prompt, response)]

    def summary(v: list[int]) -> dict[str, float]:
        s = sorted(v)
        return {"mean": _round(mean(s)), "p95": s[int(0.95 * (len(s) - 1))], "max": s[-1]} if s else {}

    return {"vocab_size": tok.get_vocab_size(), "user_turn": summary(user), "prompt_templated": summary(prompt),
            "response": summary(response), "sequence": summary(full)}


def write_world(out_dir: str | Path, *, n_sft: int = 2000, n_pairs: int = 2000, n_test: int = 300,
                n_val: int | None = None, seed: int = 0, vocab_size: int = VOCAB_SIZE) -> dict[str, Path]:
    """Write the demo world into ``out_dir``: ``sft.parquet`` (SmolTalk schema),
    ``prefs_train.parquet``, ``prefs_val.parquet`` (where settings are chosen) and
    ``prefs_test.parquet`` (UltraFeedback-binarized schema), ``tokenizer/`` and ``world.json``
    (settings, seeds, measured statistics). The same arguments give byte-identical files. Returns
    the paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_val = n_test if n_val is None else n_val
    world = build_world(n_sft=n_sft, n_pairs=n_pairs, n_test=n_test, n_val=n_val, seed=seed)
    paths = {
        "sft": out / "sft.parquet",
        "prefs_train": out / "prefs_train.parquet",
        "prefs_val": out / "prefs_val.parquet",
        "prefs_test": out / "prefs_test.parquet",
        "tokenizer": out / "tokenizer",
        "world": out / "world.json",
    }
    _write_parquet(paths["sft"], world.sft, "sft")
    _write_parquet(paths["prefs_train"], world.prefs_train, "prefs")
    _write_parquet(paths["prefs_val"], world.prefs_val, "prefs")
    _write_parquet(paths["prefs_test"], world.prefs_test, "prefs")
    make_tokenizer(paths["tokenizer"], _tokenizer_texts(world), vocab_size=vocab_size, pattern=SPLIT_PATTERN)
    meta = {
        "format": "dppo-demo-world",
        "version": 3,
        "settings": {"split_pattern": SPLIT_PATTERN, "n_sft": n_sft, "n_pairs": n_pairs, "n_test": n_test, "n_val": n_val,
                     "seed": seed, "vocab_size": vocab_size, "test_fraction": TEST_FRACTION, "val_fraction": VAL_FRACTION},
        "files": {k: p.name for k, p in paths.items() if k != "world"},
        "judge": {"name": "demo", "scale": [0.0, MAX_SCORE], "doc": "docs/demo.md"},
        "kinds": list(KINDS),
        "templates": {k: list(v) for k, v in TEMPLATES.items()},
        "words": len(WORDS),
        "demonstrator": _doc(demonstrator),
        "external_generators": {g: _doc(f) for g, f in EXTERNAL.items()},
        "stats": {**world.stats, "tokens": _token_stats(paths["tokenizer"], world)},
    }
    paths["world"].write_text(json.dumps(meta, indent=2) + "\n")
    return paths


def _doc(f: Any) -> str:
    return " ".join((f.__doc__ or "").split())
