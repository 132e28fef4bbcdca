"""Shared fixtures, all made in-process (no network): a byte-level BPE tokenizer with ChatML special
tokens and a Qwen-style chat template, and small data files in the SmolTalk and UltraFeedback schemas."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dppo import synthetic  # noqa: E402


def _corpus() -> list[str]:
    texts = []
    for r in synthetic.sft_rows(200, seed=1):
        texts += [m["content"] for m in r["messages"]]
    for r in synthetic.pair_rows(200, seed=2):
        texts += [r["prompt"], r["chosen"][1]["content"], r["rejected"][1]["content"]]
    texts.append("system user assistant You are a helpful assistant.")
    return texts


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and much faster on a busy machine (no thread barriers); a
    module that wants it says ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.make_tokenizer(tmp_path_factory.mktemp("tok"), _corpus(), vocab_size=600)


@pytest.fixture(scope="session")
def hf_tokenizer(tok_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    lines = (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=64)
    return path


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_parquet(tmp_path_factory.mktemp("sft") / "smoltalk.parquet", synthetic.sft_rows(150, seed=3))


@pytest.fixture(scope="session")
def pairs_rows() -> list[dict]:
    return synthetic.pair_rows(120, seed=4)


@pytest.fixture(scope="session")
def pairs_file(tmp_path_factory: pytest.TempPathFactory, pairs_rows: list[dict]) -> Path:
    return write_parquet(tmp_path_factory.mktemp("prefs") / "train_prefs.parquet", pairs_rows)
