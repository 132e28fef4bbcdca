"""Fixtures of the trainer's tests, made in-process: tiny Qwen2 models saved with the test tokenizer,
and shards (SFT, pairs with and without y_gen, a separable pair set) prepared by `dppo prep`.

Import the fixtures into a test module with ``from train_fixtures import *``; the hand-written loss
(:func:`hand_loss`, :func:`plain_token_logps`, :func:`load_plain`) by name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dppo import synthetic
from dppo.train.config import TrainConfig, load_config
from dppo.data.prep import PrepConfig, prepare
from dppo.train import train

from conftest import write_jsonl

__all__ = [
    "vocab_size",
    "init_dir",
    "ref_dir",
    "pair_shards",
    "pair_shards_noygen",
    "sft_shards",
    "sft_all_shards",
    "separable_shards",
    "run_train",
    "read_metrics",
    "FAST",
]

MAX_LEN = 96

# Options that make a test run short and exact: no warm-up, no clipping, small batches.
FAST: dict[str, Any] = dict(batch_size=2, grad_accum=2, warmup_steps=0, max_grad_norm=0.0, progress=False, save_every=0)


def run_train(out: Path, **options: Any) -> Path:
    """Train with ``options`` over :data:`FAST`; returns the run folder."""
    train(load_config(None, out=str(out), **{**FAST, **options}))
    return out


def read_metrics(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# -- the loss written out by hand, the independent computation the trainer's steps are checked against --
def load_plain(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32).eval()


def plain_token_logps(model: torch.nn.Module, prompt: np.ndarray, response: np.ndarray) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of every response token: the sequence alone, full log-softmax."""
    ids = torch.from_numpy(np.concatenate([prompt, response]).astype(np.int64))[None]
    logits = model(ids).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt) - 1 :]


def hand_loss(cfg: TrainConfig, shards, ids, policy, ref) -> torch.Tensor:
    """The step's loss straight from docs/method.md (default options: gradient through f(r))."""
    if cfg.method == "sft":
        total, count = 0.0, 0
        for i in ids:
            ex = shards[int(i)]
            n_prompt = int((ex["labels"] == -100).sum())
            lp = plain_token_logps(policy, ex["input_ids"][:n_prompt], ex["input_ids"][n_prompt:])
            total, count = total + lp.sum(), count + lp.numel()
        return -total / count  # mean over all assistant tokens of the step
    losses = []
    for i in ids:
        ex = shards[int(i)]
        p = ex["prompt_ids"]
        c, r = plain_token_logps(policy, p, ex["chosen_ids"]), plain_token_logps(policy, p, ex["rejected_ids"])
        if cfg.method == "simpo":
            losses.append(-F.logsigmoid(cfg.beta * (c.mean() - r.mean()) - cfg.gamma))
            continue
        with torch.no_grad():
            rc, rr = plain_token_logps(ref, p, ex["chosen_ids"]).sum(), plain_token_logps(ref, p, ex["rejected_ids"]).sum()
        margin = (c.sum() - rc) - (r.sum() - rr)
        dpo = -F.logsigmoid(cfg.beta * margin)
        if cfg.method == "dpo":
            losses.append(dpo)
            continue
        vote = c.sum() - r.sum()
        rn = vote.clamp(-cfg.vote_clip, cfg.vote_clip) / cfg.vote_clip
        neg = (rn < 0).float()
        f = (neg - cfg.zeta) * rn**2 if cfg.weight == "expectile" else neg * rn**2
        g = plain_token_logps(policy, p, ex["ygen_ids"])
        if cfg.method == "minll":
            losses.append(dpo + cfg.alpha * f * g.mean())
        elif cfg.method == "unll":
            prob = g.exp().clamp(max=1 - 1e-5)
            losses.append(dpo + cfg.alpha * f * (-torch.log1p(-prob)).mean())
        else:  # conll
            with torch.no_grad():
                rg = plain_token_logps(ref, p, ex["ygen_ids"]).sum()
            losses.append(-F.logsigmoid(cfg.beta * margin - cfg.alpha * cfg.beta * f * (g.sum() - rg)))
    return torch.stack(losses).mean()


@pytest.fixture(scope="session")
def vocab_size(tok_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()


def _save_model(path: Path, vocab: int, seed: int, tok_dir: Path | None) -> Path:
    model = synthetic.tiny_qwen2(vocab, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, seed=seed)
    model.save_pretrained(path)
    if tok_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok_dir / name, path / name)
    return path


@pytest.fixture(scope="session")
def init_dir(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path, vocab_size: int) -> Path:
    """The initial policy (random weights) with the tokenizer the shards use."""
    return _save_model(tmp_path_factory.mktemp("init") / "model", vocab_size, seed=0, tok_dir=tok_dir)


@pytest.fixture(scope="session")
def ref_dir(tmp_path_factory: pytest.TempPathFactory, vocab_size: int) -> Path:
    """Another model of the same shape, to serve as a reference different from the policy."""
    return _save_model(tmp_path_factory.mktemp("ref") / "model", vocab_size, seed=7, tok_dir=None)


def _prep(kind: str, data: Path, tok_dir: Path, out: Path, **kw: Any) -> Path:
    prepare(PrepConfig(kind, str(data), str(tok_dir), out, max_len=MAX_LEN, **kw), show_progress=False)
    return out


@pytest.fixture(scope="session")
def pair_shards(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path, pairs_file: Path, pairs_rows: list[dict]) -> Path:
    """Preference shards with y_gen (the rejected answer's words reversed stand in for greedy outputs)."""
    root = tmp_path_factory.mktemp("pairs_ygen")
    ygen = [{"prompt_id": r["prompt_id"], "response": " ".join(reversed(r["rejected"][1]["content"].split()))} for r in pairs_rows]
    write_jsonl(root / "ygen.jsonl", ygen)
    return _prep("prefs", pairs_file, tok_dir, root / "shards", ygen=root / "ygen.jsonl")


@pytest.fixture(scope="session")
def pair_shards_noygen(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path, pairs_file: Path) -> Path:
    return _prep("prefs", pairs_file, tok_dir, tmp_path_factory.mktemp("pairs") / "shards")


@pytest.fixture(scope="session")
def sft_shards(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path, sft_file: Path) -> Path:
    return _prep("sft", sft_file, tok_dir, tmp_path_factory.mktemp("sft") / "shards")


@pytest.fixture(scope="session")
def sft_all_shards(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> Path:
    """Whole conversations (``--turns all``): 2 to 3 exchanges each, every assistant turn labelled."""
    from dppo import synthetic

    source = synthetic.sft_rows(120, seed=11, long_every=0)
    rows = []
    for i in range(40):  # the first exchanges of two or three source rows, after the first's system turn
        group = source[3 * i: 3 * i + 2 + i % 2]
        msgs = [m for m in group[0]["messages"] if m["role"] == "system"]
        for r in group:
            msgs += [m for m in r["messages"] if m["role"] != "system"][:2]
        rows.append({"messages": msgs})
    root = tmp_path_factory.mktemp("sft_all")
    data = write_jsonl(root / "conversations.jsonl", rows)
    prepare(PrepConfig("sft", str(data), str(tok_dir), root / "shards", max_len=160, turns="all"), show_progress=False)
    return root / "shards"


@pytest.fixture(scope="session")
def separable_shards(tmp_path_factory: pytest.TempPathFactory, tok_dir: Path) -> Path:
    """Pairs whose chosen answers always use one set of words and rejected answers another."""
    import random

    rng = random.Random(0)
    good = "the model answers a question about data with care".split()
    bad = "naïve café résumé Straße list of steps".split()
    rows = []
    for i in range(32):
        prompt = f"question {i}: " + " ".join(rng.choice(good + bad) for _ in range(6))
        user = {"role": "user", "content": prompt}
        chosen = " ".join(rng.choice(good) for _ in range(rng.randint(4, 10)))
        rejected = " ".join(rng.choice(bad) for _ in range(rng.randint(4, 10)))
        rows.append({"prompt": prompt, "prompt_id": synthetic.prompt_id(prompt),
                     "chosen": [user, {"role": "assistant", "content": chosen}],
                     "rejected": [user, {"role": "assistant", "content": rejected}]})
    root = tmp_path_factory.mktemp("separable")
    write_jsonl(root / "pairs.jsonl", rows)
    return _prep("prefs", root / "pairs.jsonl", tok_dir, root / "shards")
