"""`dppo prep`: ids identical to transformers, truncation, packing, shards round trip, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dppo import _native, testing
from dppo.data import FLAG_BOUNDARY_RESPLIT, ShardError, open_shards
from dppo.prep import PrepConfig, prepare
from dppo.sources import SourceError, open_source

from conftest import write_jsonl, write_parquet


def run(kind, data, tok_dir, out, **kw):
    return prepare(PrepConfig(kind, str(data), str(tok_dir), Path(out), **kw), show_progress=False)


def chat_ids(hf, messages, gen):
    out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


# -- chat template and token ids -----------------------------------------------------------------
def test_template_renders_like_transformers(tok_dir, hf_tokenizer):
    for row in testing.sft_rows(30, seed=9):
        msgs = row["messages"][:3] if row["messages"][0]["role"] == "system" else row["messages"][:2]
        for gen, conv in ((False, msgs), (True, msgs[:-1])):
            want = hf_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            got = _native.render_chat(str(tok_dir), [(m["role"], m["content"]) for m in conv], gen)
            assert got == want


def test_batch_render_matches_one_by_one_and_names_the_bad_conversation(tok_dir):
    convs = [[(m["role"], m["content"]) for m in row["messages"][:2]] for row in testing.sft_rows(40, seed=4)]
    for gen in (False, True):
        want = [_native.render_chat(str(tok_dir), c, gen) for c in convs]
        assert _native.render_chats(str(tok_dir), convs, gen) == want
    assert _native.render_chats(str(tok_dir), [], True) == []



def test_batch_render_error_names_the_conversation(tmp_path, tok_dir):
    strict = tmp_path / "tok"
    shutil.copytree(tok_dir, strict)
    cfg = json.loads((strict / "tokenizer_config.json").read_text())
    cfg["chat_template"] = (
        "{% for m in messages %}{% if m.role == 'narrator' %}{{ raise_exception('unknown role ' + m.role) }}"
        "{% endif %}{{ m.content }}{% endfor %}"
    )
    (strict / "tokenizer_config.json").write_text(json.dumps(cfg))
    convs = [[("user", "a")], [("user", "b")], [("user", "c")], [("narrator", "hello")]]
    with pytest.raises(_native.DppoError, match="conversation 3.*unknown role narrator"):
        _native.render_chats(str(strict), convs, True)


@pytest.mark.parametrize("fallback", [False, True])
def test_sft_ids_equal_transformers_row_by_row(tmp_path, tok_dir, hf_tokenizer, sft_file, fallback):
    summary = run("sft", sft_file, tok_dir, tmp_path / "sft", max_len=100_000, tokenizer_fallback=fallback)
    assert summary["truncated"] == 0
    shards = open_shards(tmp_path / "sft")
    rows = testing.sft_rows(150, seed=3)
    assert len(shards) == len(rows) == summary["rows_kept"]
    resplit = 0
    for i, row in enumerate(rows):
        ex = shards[i]
        assert ex["source_row"] == i
        msgs = row["messages"]
        keep = 3 if msgs[0]["role"] == "system" else 2
        prompt = chat_ids(hf_tokenizer, msgs[: keep - 1], True)
        full = chat_ids(hf_tokenizer, msgs[:keep], False)
        n_prompt = int((ex["labels"] == -100).sum())
        if full[: len(prompt)] == prompt:
            assert ex["input_ids"].tolist() == full
            assert n_prompt == len(prompt)
        else:  # the pre-tokenizer merged across the prompt/response boundary
            resplit += 1
            suffix = hf_tokenizer.apply_chat_template(msgs[:keep], tokenize=False)[len(hf_tokenizer.apply_chat_template(msgs[: keep - 1], tokenize=False, add_generation_prompt=True)):]
            assert ex["input_ids"].tolist() == prompt + hf_tokenizer.encode(suffix, add_special_tokens=False)
        # labels: exactly the assistant turn (with its end-of-turn token)
        assert (ex["labels"][n_prompt:] == ex["input_ids"][n_prompt:]).all()
        assert hf_tokenizer.decode(ex["input_ids"][n_prompt:].tolist()).endswith("<|im_end|>\n")
    assert resplit == summary["boundary_resplit"]


def test_pair_ids_equal_transformers_and_prompt_is_shared(tmp_path, tok_dir, hf_tokenizer, pairs_file, pairs_rows):
    run("prefs", pairs_file, tok_dir, tmp_path / "p", max_len=100_000)
    shards = open_shards(tmp_path / "p")
    assert len(shards) == len(pairs_rows)
    for ex, row in zip(shards, pairs_rows):
        assert ex["prompt_id"] == row["prompt_id"]
        assert ex["score_chosen"] == row["score_chosen"] and ex["score_rejected"] == row["score_rejected"]
        assert ex["ygen_ids"] is None
        prompt = chat_ids(hf_tokenizer, row["chosen"][:1], True)
        assert ex["prompt_ids"].tolist() == prompt
        for key in ("chosen", "rejected"):
            full = chat_ids(hf_tokenizer, row[key], False)
            if full[: len(prompt)] == prompt:
                assert ex[f"{key}_ids"].tolist() == full[len(prompt):]


def test_response_ids_are_the_conversation_ids_after_the_prompt(tmp_path, tok_dir, hf_tokenizer):
    """Responses that start with whitespace or newlines are where a pre-tokenizer can merge across
    the boundary; everywhere else the suffix ids must equal the full conversation's tail."""
    rows = []
    for i, start in enumerate(["", " ", "\n", "\n\n", "  x", "\t", "’", "é", "1", "!!\n", " \n "]):
        p = f"prompt {i}"
        rows.append({"prompt": p, "prompt_id": f"id{i}", "chosen": [{"role": "user", "content": p}, {"role": "assistant", "content": start + "answer"}],
                     "rejected": [{"role": "user", "content": p}, {"role": "assistant", "content": "no" + start}], "score_chosen": 1.0, "score_rejected": 0.0})
    summary = run("prefs", write_parquet(tmp_path / "b.parquet", rows), tok_dir, tmp_path / "o", max_len=100_000)
    shards = open_shards(tmp_path / "o")
    flags = 0
    for ex, row in zip(shards, rows):
        prompt = chat_ids(hf_tokenizer, row["chosen"][:1], True)
        assert ex["prompt_ids"].tolist() == prompt
        for key in ("chosen", "rejected"):
            full = chat_ids(hf_tokenizer, row[key], False)
            text = hf_tokenizer.apply_chat_template(row[key], tokenize=False)
            suffix = text[len(hf_tokenizer.apply_chat_template(row[key][:1], tokenize=False, add_generation_prompt=True)):]
            got = ex[f"{key}_ids"].tolist()
            if full[: len(prompt)] == prompt:
                assert got == full[len(prompt):]
            else:
                flags += 1
                assert got == hf_tokenizer.encode(suffix, add_special_tokens=False)
    assert summary["boundary_resplit"] >= 1  # "\n\n" after "assistant\n" merges in the Qwen2 pattern
    assert summary["boundary_resplit"] <= flags


# -- truncation and percentile --------------------------------------------------------------------
def test_auto_max_len_is_the_95th_percentile_and_truncation_keeps_starts(tmp_path, tok_dir, hf_tokenizer, pairs_file, pairs_rows):
    full = run("prefs", pairs_file, tok_dir, tmp_path / "full", max_len=100_000)
    ref = open_shards(tmp_path / "full")
    lengths = []
    for ex in ref:
        lengths += [len(ex["prompt_ids"]) + len(ex["chosen_ids"]), len(ex["prompt_ids"]) + len(ex["rejected_ids"])]
    want = int(np.percentile(lengths, 95, method="inverted_cdf"))
    s = run("prefs", pairs_file, tok_dir, tmp_path / "auto")
    assert s["max_len"] == want and s["max_len_from"] == {"auto": {"percentile": 95.0}}
    assert s["max_prompt_len"] == max(want - 21, want // 2)
    cut = open_shards(tmp_path / "auto")
    n_trunc = 0
    for a, b in zip(ref, cut):
        p = a["prompt_ids"][: s["max_prompt_len"]]
        assert b["prompt_ids"].tolist() == p.tolist()
        room = s["max_len"] - len(p)
        for k in ("chosen_ids", "rejected_ids"):
            assert b[k].tolist() == a[k][:room].tolist()
            assert len(b["prompt_ids"]) + len(b[k]) <= s["max_len"]
        n_trunc += int(len(b["prompt_ids"]) < len(a["prompt_ids"]) or any(len(b[k]) < len(a[k]) for k in ("chosen_ids", "rejected_ids")))
    assert n_trunc == s["truncated"] > 0
    assert full["tokens"] > s["tokens"]


def test_fixed_max_len_and_percentile_option(tmp_path, tok_dir, sft_file):
    s = run("sft", sft_file, tok_dir, tmp_path / "a", max_len=40, max_prompt_len=10)
    assert s["max_len"] == 40 and s["max_prompt_len"] == 10 and s["max_len_from"] == "fixed"
    for ex in open_shards(tmp_path / "a"):
        assert len(ex["input_ids"]) <= 40 and int((ex["labels"] == -100).sum()) <= 10
    s50 = run("sft", sft_file, tok_dir, tmp_path / "b", percentile=50)
    s99 = run("sft", sft_file, tok_dir, tmp_path / "c", percentile=99)
    assert s50["max_len"] < s99["max_len"]


# -- packing -----------------------------------------------------------------------------------
def _check_packing(shards):
    seen = np.zeros(len(shards), dtype=int)
    for row in shards.packed_rows():
        total = 0
        for i in row:
            ex = shards[int(i)]
            if shards.kind == "sft":
                total += len(ex["input_ids"])
            else:
                p = len(ex["prompt_ids"])
                total += sum(p + len(ex[k]) for k in ("chosen_ids", "rejected_ids", "ygen_ids") if ex[k] is not None)
            seen[int(i)] += 1
        assert 0 < total <= shards.pack_len
    assert (seen == 1).all()  # every example in exactly one row: nothing split, lost or duplicated


def test_packing_invariants_and_padding(tmp_path, tok_dir, sft_file, pairs_file):
    s = run("sft", sft_file, tok_dir, tmp_path / "s", max_len=120, pack_len=256)
    sh = open_shards(tmp_path / "s")
    _check_packing(sh)
    assert sh.num_packed_rows == s["rows"]
    assert s["padding_fraction"] == pytest.approx(1 - s["packed_tokens"] / (s["rows"] * 256))
    run("prefs", pairs_file, tok_dir, tmp_path / "p")
    _check_packing(open_shards(tmp_path / "p"))


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(1, 40), seed=st.integers(0, 10_000), pack=st.sampled_from([128, 200, 512]))
def test_packing_property(tmp_path_factory, tok_dir, n, seed, pack):
    d = tmp_path_factory.mktemp("h")
    rows = testing.pair_rows(n, seed=seed, long_every=3)
    run("prefs", write_parquet(d / "x.parquet", rows), tok_dir, d / "o", max_len=60, pack_len=pack)
    sh = open_shards(d / "o")
    assert len(sh) == n
    _check_packing(sh)


def test_pack_len_too_small_is_a_clear_error(tmp_path, tok_dir, sft_file):
    with pytest.raises(_native.DppoError, match="--pack-len 16 is shorter"):
        run("sft", sft_file, tok_dir, tmp_path / "o", max_len=64, pack_len=16)
    assert not (tmp_path / "o").exists()


# -- y_gen -------------------------------------------------------------------------------------
def test_ygen_join_by_prompt_id(tmp_path, tok_dir, hf_tokenizer, pairs_file, pairs_rows):
    ygen = [{"prompt_id": r["prompt_id"], "response": f"greedy answer {i} ✓"} for i, r in enumerate(pairs_rows)][::-1]
    write_parquet(tmp_path / "ygen.parquet", ygen)
    s = run("prefs", pairs_file, tok_dir, tmp_path / "o", ygen=tmp_path / "ygen.parquet", max_len=100_000)
    assert s["has_ygen"] and s["ygen"]["responses"] == len(pairs_rows)
    sh = open_shards(tmp_path / "o")
    assert sh.has_ygen
    for i, (ex, row) in enumerate(zip(sh, pairs_rows)):
        conv = row["chosen"][:1] + [{"role": "assistant", "content": f"greedy answer {i} ✓"}]
        full = chat_ids(hf_tokenizer, conv, False)
        assert ex["prompt_ids"].tolist() + ex["ygen_ids"].tolist() == full
    _check_packing(sh)


def test_missing_ygen_is_an_error_unless_allowed(tmp_path, tok_dir, pairs_file, pairs_rows):
    ygen = [{"prompt_id": r["prompt_id"], "response": "x"} for r in pairs_rows[3:]]
    write_jsonl(tmp_path / "ygen.jsonl", ygen)
    with pytest.raises(_native.DppoError) as e:
        run("prefs", pairs_file, tok_dir, tmp_path / "o", ygen=tmp_path / "ygen.jsonl")
    msg = str(e.value)
    assert "lacks 3 of the data's prompt_ids" in msg and pairs_rows[0]["prompt_id"] in msg and "--allow-missing-ygen" in msg
    assert not (tmp_path / "o").exists()
    s = run("prefs", pairs_file, tok_dir, tmp_path / "o", ygen=tmp_path / "ygen.jsonl", allow_missing_ygen=True)
    assert s["dropped"]["missing_ygen"] == 3 and s["rows_kept"] == len(pairs_rows) - 3


def test_ygen_file_without_columns(tmp_path, tok_dir, pairs_file):
    write_jsonl(tmp_path / "y.jsonl", [{"id": "a", "text": "b"}])
    with pytest.raises(SourceError, match="lacks column"):
        run("prefs", pairs_file, tok_dir, tmp_path / "o", ygen=tmp_path / "y.jsonl")


# -- bad input -------------------------------------------------------------------------------
BAD_SFT = [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, None),
    ({"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "yo"}]}, "empty_content"),
    ({"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "yo"}]}, "non_string_content"),
    ({"messages": [{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]}, "bad_roles"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}, "missing_field"),
    ({"other": 1}, "missing_field"),
    ("not json at all", "invalid_json"),
    ({"messages": [{"role": "user", "content": "ünïcödé 東京 😀"}, {"role": "assistant", "content": "ok"}]}, None),
]


def test_bad_rows_are_skipped_and_counted(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD_SFT])
    s = run("sft", src, tok_dir, tmp_path / "o")
    assert s["rows_in"] == len(BAD_SFT) and s["rows_kept"] == 2
    want: dict[str, int] = {}
    for _, reason in BAD_SFT:
        if reason:
            want[reason] = want.get(reason, 0) + 1
    assert {k: v for k, v in s["dropped"].items() if v} == want
    assert [ex["source_row"] for ex in open_shards(tmp_path / "o")] == [0, 8]


def test_strict_names_the_first_bad_row(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "bad.jsonl", [r for r, _ in BAD_SFT])
    with pytest.raises(_native.DppoError, match=r"^row 1: a message has empty content \(empty_content\)$"):
        run("sft", src, tok_dir, tmp_path / "o", strict=True)
    assert not (tmp_path / "o").exists()


def test_bad_pairs(tmp_path, tok_dir):
    rows = testing.pair_rows(4, seed=1)
    rows[1]["rejected"][0] = {"role": "user", "content": "another prompt"}
    rows[2]["prompt_id"] = None
    rows[3]["chosen"] = rows[3]["chosen"][:1]
    s = run("prefs", write_parquet(tmp_path / "x.parquet", rows), tok_dir, tmp_path / "o")
    assert s["rows_kept"] == 1
    assert s["dropped"]["prompt_mismatch"] == 1 and s["dropped"]["missing_field"] == 1 and s["dropped"]["no_assistant_turn"] == 1
    with pytest.raises(_native.DppoError, match=f"row 1 \\(prompt_id {rows[1]['prompt_id']}\\)"):
        run("prefs", tmp_path / "x.parquet", tok_dir, tmp_path / "o2", strict=True)


def test_missing_column_and_unreadable_sources(tmp_path, tok_dir):
    write_parquet(tmp_path / "t.parquet", [{"text": "a"}])
    with pytest.raises(_native.DppoError, match="no column 'messages'.*columns are: text"):
        run("sft", tmp_path / "t.parquet", tok_dir, tmp_path / "o")
    write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(_native.DppoError, match=r"no usable rows: 2 rows read, all skipped \(missing_field: 2\)"):
        run("sft", tmp_path / "t.jsonl", tok_dir, tmp_path / "o")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(SourceError, match="broken.parquet: cannot read parquet"):
        run("sft", tmp_path / "broken.parquet", tok_dir, tmp_path / "o")
    with pytest.raises(SourceError, match="no such file"):
        run("sft", tmp_path / "missing.parquet", tok_dir, tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no parquet, jsonl"):
        run("sft", tmp_path / "empty", tok_dir, tmp_path / "o")


def test_hub_source_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError) as e:
        open_source("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")
    assert "could not load 'HuggingFaceH4/ultrafeedback_binarized'" in str(e.value) and "\n" not in str(e.value)


def test_tokenizer_without_chat_template(tmp_path, tok_dir, sft_file):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(_native.DppoError, match="has no chat template"):
        run("sft", sft_file, d, tmp_path / "o")


def test_existing_output_needs_overwrite(tmp_path, tok_dir, sft_file):
    run("sft", sft_file, tok_dir, tmp_path / "o", max_len=64)
    with pytest.raises(_native.DppoError, match="already holds prepared shards; pass --overwrite"):
        run("sft", sft_file, tok_dir, tmp_path / "o", max_len=64)
    s = run("sft", sft_file, tok_dir, tmp_path / "o", max_len=32, overwrite=True)
    assert open_shards(tmp_path / "o").meta["counts"]["max_len"] == 32 == s["max_len"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no leftovers beside it


# -- shards ------------------------------------------------------------------------------------
def test_meta_records_provenance(tmp_path, tok_dir, sft_file):
    run("sft", sft_file, tok_dir, tmp_path / "o")
    meta = open_shards(tmp_path / "o").meta
    assert meta["format"] == "dppo-shards" and meta["version"] == 1 and meta["kind"] == "sft"
    assert meta["tokenizer"]["fingerprint"] == _native.Tokenizer(str(tok_dir)).fingerprint
    assert meta["chat_template"] == testing.QWEN_STYLE_TEMPLATE
    assert meta["source"]["type"] == "local" and len(meta["source"]["files"][0]["blake2b"]) == 16
    assert meta["counts"]["max_len_from"] == {"auto": {"percentile": 95.0}}
    assert meta["config"]["kind"] == "sft"


def test_shards_are_zero_copy_views(tmp_path, tok_dir, pairs_file):
    run("prefs", pairs_file, tok_dir, tmp_path / "o")
    ex = open_shards(tmp_path / "o")[5]
    assert ex["chosen_ids"].dtype == np.uint32 and not ex["chosen_ids"].flags.owndata
    assert isinstance(ex["chosen_ids"].base, (np.memmap, np.ndarray))


def test_corrupt_or_truncated_shards_fail_naming_the_file(tmp_path, tok_dir, sft_file):
    run("sft", sft_file, tok_dir, tmp_path / "o")
    tok = tmp_path / "o" / "shard-00000.tok"
    data = bytearray(tok.read_bytes())
    data[7] ^= 0xFF
    tok.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-00000.tok: corrupt shard: token checksum mismatch"):
        open_shards(tmp_path / "o")
    tok.write_bytes(bytes(data[:-4]))
    with pytest.raises(ShardError, match="shard-00000.tok: corrupt shard: token file is"):
        open_shards(tmp_path / "o", verify=False)
    (tmp_path / "o" / "meta.json").unlink()
    with pytest.raises(ShardError, match="meta.json: missing"):
        open_shards(tmp_path / "o")


KILL_SCRIPT = r"""
import os, signal, sys
from dppo import _native
from dppo.sources import open_source
prep = _native.Preparer("sft", sys.argv[1], sys.argv[2], max_len=64)
src = open_source(sys.argv[3], batch_rows=50)
rows = 0
for i, b in enumerate(src.batches):
    rows += prep.feed(b, rows)
    if sys.argv[4] == "feed" and i == 1:
        os.kill(os.getpid(), signal.SIGKILL)
prep.finish("{}", lambda done, total: os.kill(os.getpid(), signal.SIGKILL))
"""


@pytest.mark.parametrize("when", ["feed", "finish"])
def test_killed_prep_leaves_no_complete_looking_output(tmp_path, tok_dir, sft_file, when):
    out = tmp_path / "o"
    p = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(tok_dir), str(out), str(sft_file), when], capture_output=True)
    assert p.returncode == -9, p.stderr.decode()
    assert not out.exists()
    leftovers = [x.name for x in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".o.partial-")
    with pytest.raises(ShardError, match="no such folder"):
        open_shards(out)
    # the next run removes the dead run's working folder and succeeds
    run("sft", sft_file, tok_dir, out, max_len=64)
    assert [x.name for x in tmp_path.iterdir()] == ["o"]
    assert len(open_shards(out)) == 150


# -- CLI -----------------------------------------------------------------------------------------
def test_cli_prep_and_errors(tmp_path, tok_dir, sft_file, pairs_file):
    from typer.testing import CliRunner

    from dppo.cli.main import app

    runner = CliRunner()
    r = runner.invoke(app, ["prep", "sft", "--data", str(sft_file), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert "rows kept" in r.output and "padding" in r.output
    r = runner.invoke(app, ["prep", "prefs", "--data", str(pairs_file), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "s")])
    assert r.exit_code == 1
    assert "error:" in r.output and "already holds prepared shards" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["prep", "sft", "--data", str(sft_file), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "x"), "--max-len", "abc"])
    assert r.exit_code == 2 and "expected 'auto' or an integer" in r.output


def test_cli_bare_prep_offline_is_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dppo.cli.main import app

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = CliRunner().invoke(app, ["prep", "--out", str(tmp_path / "d")])
    assert r.exit_code == 1
    lines = [l for l in r.output.strip().splitlines() if l.strip()]
    assert len(lines) <= 2 and "could not fetch tokenizer 'Qwen/Qwen2.5-0.5B'" in r.output.replace("\n", "")
