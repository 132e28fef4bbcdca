"""What dppo writes loads elsewhere as it was trained: with transformers and peft alone, from another
working directory, and as the start of another run.

The tokenizer here pre-splits like the demo's (runs of digits stay whole: ``69`` is one piece), which
Qwen2's own tokenizer class would split digit by digit: a folder that transformers loaded with the
model type's class instead of its ``tokenizer.json`` would give other ids.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from dppo import synthetic
from dppo.artifacts import copy_tokenizer_files
from dppo.cli.main import app
from dppo.data.prep import PrepConfig, prepare
from dppo.demo.world import SPLIT_PATTERN
from dppo.engine import Tokenizer
from dppo.generate import read_generations

from conftest import _corpus
from train_fixtures import run_train

pytest.importorskip("peft")

MIXED = "Order 69 33 costs 12450.75 EUR; naïve café, 日本語 ünïcødé\n\n  two  spaces\tand a tab\n\n\nend 2024"
LORA = dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.0)


@pytest.fixture(scope="module")
def digit_tok(tmp_path_factory) -> Path:
    texts = _corpus() + [f"{a} {b} {a * b} {a}.{b} year 19{a % 100:02d}" for a in range(1, 300, 7) for b in (3, 12, 69)]
    texts += ["naïve café 日本語 ünïcødé EUR Order costs spaces tab end"] * 5
    return synthetic.make_tokenizer(tmp_path_factory.mktemp("digit_tok"), texts, vocab_size=700, pattern=SPLIT_PATTERN)


@pytest.fixture(scope="module")
def digit_init(tmp_path_factory, digit_tok) -> Path:
    vocab = Tokenizer(digit_tok).vocab_size
    path = tmp_path_factory.mktemp("digit_init") / "model"
    synthetic.tiny_qwen2(vocab, hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64, seed=3).save_pretrained(path)
    copy_tokenizer_files(digit_tok, path)
    return path


@pytest.fixture(scope="module")
def digit_sft(tmp_path_factory, digit_tok, sft_file) -> Path:
    out = tmp_path_factory.mktemp("digit_sft") / "shards"
    prepare(PrepConfig("sft", str(sft_file), str(digit_tok), out, max_len=96), show_progress=False)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digit_init, digit_sft) -> dict[str, Path]:
    """A full SFT run, and a LoRA run (merged) and one with --no-merge, started from a relative --init."""
    root = tmp_path_factory.mktemp("runs")
    opts = dict(method="sft", data=str(digit_sft), optimizer="sgd", lr=2.0, max_samples=4, max_steps=1)
    here = os.getcwd()
    os.chdir(digit_init.parent.parent)
    try:
        rel = os.path.relpath(digit_init)
        assert not Path(rel).is_absolute()
        full = run_train(root / "full", init=rel, **opts)
        lora = run_train(root / "lora", init=rel, **opts, **LORA)
        nomerge = run_train(root / "nomerge", init=rel, **opts, **LORA, merge=False)
    finally:
        os.chdir(here)
    return {"full": full, "lora": lora, "nomerge": nomerge}


def _folders(runs, digit_tok, digit_init, tok_dir, tmp_path_factory) -> dict[str, Path]:
    from dppo.demo.pipeline import DemoSettings, make_init_model

    demo_init = tmp_path_factory.mktemp("demo") / "init"
    make_init_model(demo_init, digit_tok, DemoSettings(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64))
    return {
        "RUN/model": runs["full"] / "model",
        "lora RUN/model": runs["lora"] / "model",
        "RUN/adapter": runs["lora"] / "adapter",
        "--no-merge RUN/adapter": runs["nomerge"] / "adapter",
        "tokenizer (make_tokenizer)": digit_tok,
        "tests' tokenizer": tok_dir,
        "demo init model": demo_init,
        "init model": digit_init,
    }


def test_autotokenizer_gives_the_engines_ids(runs, digit_tok, digit_init, tok_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    folders = _folders(runs, digit_tok, digit_init, tok_dir, tmp_path_factory)
    for name, folder in folders.items():
        want = Tokenizer(folder).encode(MIXED)
        for trust in (False, True):
            tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust)
            assert tok.encode(MIXED, add_special_tokens=False) == want, (name, trust, type(tok).__name__)
            assert tok(MIXED)["input_ids"] == want, (name, trust)
            assert tok.decode(want) == MIXED, name
    # the split this test relies on: whole numbers are single pieces here, and Qwen2's class would split them
    whole = Tokenizer(digit_tok).encode("69")
    assert len(whole) == 1


def test_transformers_generate_equals_dppo_generate(tmp_path, runs, pairs_file, pairs_rows):
    """Greedy decoding through AutoTokenizer's chat template + AutoModelForCausalLM.generate gives the
    tokens `dppo generate` gives, for a saved model and for an adapter (peft's AutoPeftModelForCausalLM)."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    new = 8
    for name, folder in (("model", runs["full"] / "model"), ("adapter", runs["lora"] / "adapter")):
        out = tmp_path / f"{name}.jsonl"
        r = CliRunner().invoke(app, ["generate", "--model", str(folder), "--data", str(pairs_file), "--limit", "4",
                                     "--max-new-tokens", str(new), "--out", str(out), "--engine", "dppo"])
        assert r.exit_code == 0, r.output
        ours = {g["prompt_id"]: g["response_ids"] for g in read_generations(out)}
        tok = AutoTokenizer.from_pretrained(str(folder))
        load = AutoPeftModelForCausalLM if name == "adapter" else AutoModelForCausalLM
        model = load.from_pretrained(str(folder), dtype=torch.float32).eval()
        stops = {tok.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int)
                                    else model.generation_config.eos_token_id or [])}
        prompts = {row["prompt_id"]: row["prompt"] for row in pairs_rows}
        for pid, ids in ours.items():
            prompt = tok.apply_chat_template([{"role": "user", "content": prompts[pid]}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)
            with torch.no_grad():
                got = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                                     eos_token_id=sorted(s for s in stops if s is not None))[0, len(prompt):].tolist()
            cut = next((i for i, t in enumerate(got) if t in stops), len(got))
            assert got[:cut] == ids, (name, pid)


def test_adapters_record_an_absolute_base_and_load_from_anywhere(tmp_path, runs, digit_init, pairs_file, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    for run in (runs["lora"], runs["nomerge"]):
        base = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
        assert Path(base).is_absolute() and Path(base) == digit_init.resolve(), base
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    model = AutoPeftModelForCausalLM.from_pretrained(str(runs["lora"] / "adapter"), dtype=torch.float32)
    merged = model.merge_and_unload().state_dict()
    saved = load_file(runs["lora"] / "model" / "model.safetensors")
    for key, value in saved.items():
        torch.testing.assert_close(merged[key], value, rtol=0, atol=1e-6, msg=key)
    r = CliRunner().invoke(app, ["generate", "--model", str(runs["nomerge"]), "--data", str(pairs_file), "--limit", "2",
                                 "--max-new-tokens", "4", "--out", str(tmp_path / "g.jsonl")])
    assert r.exit_code == 0, r.output


def test_full_fine_tuning_from_an_adapter_trains_every_weight(tmp_path, runs, digit_sft):
    """--init of an adapter folder (or of a --no-merge run) without --lora-r: its base with the adapter
    merged in, every weight trained: the same run as one started from the merged model."""
    opts = dict(method="sft", data=str(digit_sft), optimizer="sgd", lr=2.0, max_samples=4, max_steps=2)
    ref = run_train(tmp_path / "from_merged", init=str(runs["lora"] / "model"), **opts)
    want = load_file(ref / "model" / "model.safetensors")
    start = load_file(runs["lora"] / "model" / "model.safetensors")
    for init in (runs["lora"] / "adapter", runs["lora"]):  # the adapter folder; a run folder holding both
        got = load_file(run_train(tmp_path / init.name, init=str(init), **opts) / "model" / "model.safetensors")
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    got = load_file(run_train(tmp_path / "from_nomerge", init=str(runs["nomerge"]), **opts) / "model" / "model.safetensors")
    assert got.keys() == want.keys()
    # every weight trained: the layers LoRA never touches (norms, embeddings) moved as well
    moved = {k for k in want if not torch.equal(want[k], start[k])}
    assert any("norm" in k for k in moved) and any("embed" in k for k in moved) and any("q_proj" in k for k in moved)
