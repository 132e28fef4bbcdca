"""`dppo prep`: ids identical to transformers, truncation that keeps the template, y_gen ids, shards round trip, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dppo import engine, synthetic
from dppo.data import FLAG_BOUNDARY_RESPLIT, ShardError, open_shards
from dppo.data.prep import PrepConfig, prepare
from dppo.data.sources import open_source
from dppo.errors import SourceError

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
    for row in synthetic.sft_rows(30, seed=9):
        msgs = row["messages"][:3] if row["messages"][0]["role"] == "system" else row["messages"][:2]
        for gen, conv in ((False, msgs), (True, msgs[:-1])):
            want = hf_tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            got = engine.render_chat(str(tok_dir), [(m["role"], m["content"]) for m in conv], gen)
            assert got == want


def test_batch_render_matches_one_by_one_and_names_the_bad_conversation(tok_dir):
    convs = [[(m["role"], m["content"]) for m in row["messages"][:2]] for row in synthetic.sft_rows(40, seed=4)]
    for gen in (False, True):
        want = [engine.render_chat(str(tok_dir), c, gen) for c in convs]
        assert engine.render_chats(str(tok_dir), convs, gen) == want
    assert engine.render_chats(str(tok_dir), [], True) == []



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
    with pytest.raises(engine.DppoError, match="conversation 3.*unknown role narrator"):
        engine.render_chats(str(strict), convs, True)


@pytest.mark.parametrize("fallback", [False, True])
def test_sft_ids_equal_transformers_row_by_row(tmp_path, tok_dir, hf_tokenizer, sft_file, fallback):
    summary = run("sft", sft_file, tok_dir, tmp_path / "sft", max_len=100_000, tokenizer_fallback=fallback)
    assert summary["truncated"] == 0
    shards = open_shards(tmp_path / "sft")
    rows = synthetic.sft_rows(150, seed=3)
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
CHATML_HEADER = "<|im_end|>\n<|im_start|>assistant\n"
LLAMA3_HEADER = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def _check_truncation(ref, cut, s, header_ids, kinds):
    """Examples that fit are unchanged; the others keep their prompt's template (head and the
    generation header last) and lose the end of their responses only as far as needed."""
    n_trunc = 0
    for a, b in zip(ref, cut, strict=True):
        pa, pb = a["prompt_ids"].tolist(), b["prompt_ids"].tolist()
        fits = all(len(pa) + len(a[k]) <= s["max_len"] for k in kinds if a[k] is not None)
        assert pb[-len(header_ids):] == header_ids, "every stored prompt ends with the generation header"
        if fits or len(pa) <= s["max_prompt_len"]:
            assert pb == pa
        else:
            assert len(pb) == s["max_prompt_len"]
            assert pb[:4] == pa[:4]  # the template's head (and the user turn's start) stay
        room = s["max_len"] - len(pb)
        for k in kinds:
            if a[k] is not None:
                want = a[k].tolist() if fits else a[k][:room].tolist()
                assert b[k].tolist() == want
        n_trunc += int(pb != pa or any(len(b[k]) < len(a[k]) for k in kinds if a[k] is not None))
    assert n_trunc == s["truncated"]
    return n_trunc


def test_auto_max_len_is_the_95th_percentile_and_truncation_keeps_the_template(
    tmp_path, tok_dir, hf_tokenizer, pairs_file, pairs_rows
):
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
    header = hf_tokenizer.encode(CHATML_HEADER, add_special_tokens=False)
    assert _check_truncation(ref, cut, s, header, ("chosen_ids", "rejected_ids")) > 0
    assert full["tokens"] > s["tokens"]
    assert s["response_tokens_removed"] > 0 and s["truncate_prompt"] == "start"


def _long_prompt_rows(n, seed):
    rows = synthetic.pair_rows(n, seed=seed, long_every=2)
    for i, r in enumerate(rows):
        if i % 3 == 0:  # a very long user turn
            long = r["prompt"] + " " + " ".join(["data model answers"] * 60)
            for k in ("chosen", "rejected", "messages"):
                r[k][0] = {"role": "user", "content": long}
            r["prompt"] = long
    return rows


@pytest.fixture(scope="module")
def llama_tok_dir(tmp_path_factory):
    texts = [m["content"] for r in synthetic.sft_rows(200, seed=1) for m in r["messages"]]
    return synthetic.make_tokenizer(
        tmp_path_factory.mktemp("llama_tok"), texts + ["user assistant system"], vocab_size=600,
        template=synthetic.LLAMA3_TEMPLATE, special_tokens=synthetic.LLAMA3_SPECIAL_TOKENS,
        eos_token="<|eot_id|>", pad_token="<|end_of_text|>", bos_token="<|begin_of_text|>",
    )


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_long_prompts_lose_user_content_never_the_template(tmp_path, tok_dir, llama_tok_dir, template):
    from transformers import AutoTokenizer

    tdir = tok_dir if template == "chatml" else llama_tok_dir
    hf = AutoTokenizer.from_pretrained(str(tdir))
    header = hf.encode(CHATML_HEADER if template == "chatml" else LLAMA3_HEADER, add_special_tokens=False)
    rows = _long_prompt_rows(30, seed=5)
    data = write_parquet(tmp_path / "pairs.parquet", rows)
    run("prefs", data, tdir, tmp_path / "ref", max_len=100_000)
    ref = open_shards(tmp_path / "ref")
    for keep in ("start", "end"):
        s = run("prefs", data, tdir, tmp_path / f"cut-{keep}", max_len=120, max_prompt_len=70, truncate_prompt=keep)
        cut = open_shards(tmp_path / f"cut-{keep}")
        assert s["truncated_prompt"] >= 10 and s["prompt_tokens_removed"] > 0
        _check_truncation(ref, cut, s, header, ("chosen_ids", "rejected_ids"))
        for a, b in zip(ref, cut):
            if len(b["prompt_ids"]) < len(a["prompt_ids"]):
                pa, pb = a["prompt_ids"].tolist(), b["prompt_ids"].tolist()
                if keep == "end":  # the user turn's last tokens stay before the header
                    assert pb[-len(header) - 5:] == pa[-len(header) - 5:]
                else:
                    assert pb[: len(pb) - len(header)] == pa[: len(pb) - len(header)]
    # rows that fit are byte-identical to apply_chat_template, SFT as well
    for ex, row in zip(ref, rows):
        assert ex["prompt_ids"].tolist() == chat_ids(hf, row["chosen"][:1], True)
    sft = [{"messages": r["chosen"]} for r in rows]
    s = run("sft", write_parquet(tmp_path / "sft.parquet", sft), tdir, tmp_path / "sft", max_len=120, max_prompt_len=70)
    assert s["truncated_prompt"] >= 10
    for ex, row in zip(open_shards(tmp_path / "sft"), sft):
        n_prompt = int((ex["labels"] == -100).sum())
        prompt = ex["input_ids"][:n_prompt].tolist()
        assert prompt[-len(header):] == header
        full = chat_ids(hf, row["messages"], False)
        if len(full) <= 120:
            assert ex["input_ids"].tolist() == full
        assert len(ex["input_ids"]) <= 120


def test_fixed_max_len_and_percentile_option(tmp_path, tok_dir, sft_file):
    s = run("sft", sft_file, tok_dir, tmp_path / "a", max_len=60, max_prompt_len=40)
    assert s["max_len"] == 60 and s["max_prompt_len"] == 40 and s["max_len_from"] == "fixed"
    for ex in open_shards(tmp_path / "a"):
        n_prompt = int((ex["labels"] == -100).sum())
        assert len(ex["input_ids"]) <= 60 and n_prompt <= 59
    s50 = run("sft", sft_file, tok_dir, tmp_path / "b", percentile=50)
    s99 = run("sft", sft_file, tok_dir, tmp_path / "c", percentile=99)
    assert s50["max_len"] < s99["max_len"]


def test_a_prompt_whose_template_exceeds_the_budget_is_skipped_and_counted(tmp_path, tok_dir, sft_file):
    s = run("sft", sft_file, tok_dir, tmp_path / "a", max_len=40, max_prompt_len=6)
    assert s["dropped"]["prompt_too_long"] > 0
    assert s["rows_kept"] + sum(s["dropped"].values()) == s["rows_in"]
    with pytest.raises(engine.InputError, match=r"row \d+: .*prompt_too_long"):
        run("sft", sft_file, tok_dir, tmp_path / "b", max_len=40, max_prompt_len=6, strict=True)


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


def _non_canonical(hf, text):
    """Ids that decode to ``text`` but are not its tokenization: one token per character."""
    ids = [hf.encode(ch, add_special_tokens=False)[0] for ch in text]
    assert len(ids) == len(text) and hf.decode(ids) == text and ids != hf.encode(text, add_special_tokens=False)
    return ids


def test_ygen_response_ids_are_stored_as_generated(tmp_path, tok_dir, hf_tokenizer, pairs_file, pairs_rows):
    texts = [f"the model answers {i}" for i in range(len(pairs_rows))]
    ygen = [{"prompt_id": r["prompt_id"], "response": t, "response_ids": _non_canonical(hf_tokenizer, t)}
            for r, t in zip(pairs_rows, texts)]
    ygen[0]["response_ids"] = None  # a row without ids falls back to its text
    path = write_parquet(tmp_path / "ygen.parquet", ygen)
    meta = tmp_path / "ygen.parquet.meta.json"
    meta.write_text(json.dumps({"format": "dppo-generations", "tokenizer": {"fingerprint": engine.Tokenizer(str(tok_dir)).fingerprint}}))
    s = run("prefs", pairs_file, tok_dir, tmp_path / "o", ygen=path, max_len=100_000)
    assert s["ygen"]["from_ids"] == len(pairs_rows) - 1 and s["ygen"]["from_text"] == 1
    end = hf_tokenizer.encode("<|im_end|>\n", add_special_tokens=False)
    sh = open_shards(tmp_path / "o")
    assert sh.meta["ygen_source"]["used"] == "ids"
    for i, (ex, y) in enumerate(zip(sh, ygen)):
        want = (y["response_ids"] if i else hf_tokenizer.encode(texts[0], add_special_tokens=False)) + end
        assert ex["ygen_ids"].tolist() == want
    # another tokenizer's ids are not used: the text is tokenized instead, and prep says so
    meta.write_text(json.dumps({"tokenizer": {"fingerprint": "0000000000000000"}}))
    from rich.console import Console

    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)
    s = prepare(PrepConfig("prefs", str(pairs_file), str(tok_dir), tmp_path / "o2", ygen=path, max_len=100_000),
                console=console, show_progress=False)
    console.file.close()
    assert s["ygen"]["from_ids"] == 0 and s["ygen"]["from_text"] == len(pairs_rows)
    assert "response_ids not used" in (tmp_path / "log.txt").read_text()
    ex = open_shards(tmp_path / "o2")[1]
    assert ex["ygen_ids"].tolist() == hf_tokenizer.encode(texts[1], add_special_tokens=False) + end


def test_pair_ids_are_stored_as_generated(tmp_path, tok_dir, hf_tokenizer, pairs_file, pairs_rows):
    """PrepConfig(pair_ids=FILE): chosen and rejected stored as the ids given (framed as y_gen's: the
    ids, then the template's end of turn), never re-tokenized; a pair without ids, or with an id
    outside the vocabulary, is tokenized from its text (counted); another tokenizer's ids are not used."""
    from rich.console import Console

    def text(msgs):
        return msgs[-1]["content"]

    rows = []
    for i, r in enumerate(pairs_rows[:-1]):  # the last pair has no ids
        rows.append({"prompt_id": r["prompt_id"], "chosen_ids": _non_canonical(hf_tokenizer, f"the model answers {i}"),
                     "rejected_ids": _non_canonical(hf_tokenizer, f"the model answers not {i}")})
    rows[3]["rejected_ids"] = [10**6]  # unusable: this pair comes from its text
    path = write_parquet(tmp_path / "ids.parquet", rows)
    meta = tmp_path / "ids.parquet.meta.json"
    meta.write_text(json.dumps({"tokenizer": {"fingerprint": engine.Tokenizer(str(tok_dir)).fingerprint}}))
    s = run("prefs", pairs_file, tok_dir, tmp_path / "o", pair_ids=path, max_len=100_000)
    n = len(pairs_rows)
    assert s["pair_ids"] == {"pairs": n - 2, "bad_rows": 1, "duplicates": 0, "from_ids": n - 2, "from_text": 2}
    end = hf_tokenizer.encode("<|im_end|>\n", add_special_tokens=False)
    sh = open_shards(tmp_path / "o")
    assert sh.meta["pair_ids_source"]["used"] == "ids"
    by_id = {r["prompt_id"]: r for r in rows}
    for ex, r in zip(sh, pairs_rows):
        got = by_id.get(r["prompt_id"])
        if got is None or got["rejected_ids"] == [10**6]:
            for col, key in (("chosen_ids", "chosen"), ("rejected_ids", "rejected")):
                assert ex[col].tolist() == hf_tokenizer.encode(text(r[key]), add_special_tokens=False) + end
        else:
            assert ex["chosen_ids"].tolist() == got["chosen_ids"] + end
            assert ex["rejected_ids"].tolist() == got["rejected_ids"] + end
    meta.write_text(json.dumps({"tokenizer": {"fingerprint": "0000000000000000"}}))
    console = Console(file=open(tmp_path / "log.txt", "w"), width=200)  # noqa: SIM115
    s = prepare(PrepConfig("prefs", str(pairs_file), str(tok_dir), tmp_path / "o2", pair_ids=path, max_len=100_000),
                console=console, show_progress=False)
    console.file.close()
    assert s.get("pair_ids") is None and "chosen_ids/rejected_ids not used" in (tmp_path / "log.txt").read_text()
    with pytest.raises(SourceError, match="lacks column"):
        write_parquet(tmp_path / "bad.parquet", [{"prompt_id": "x", "chosen_ids": [1]}])
        (tmp_path / "bad.parquet.meta.json").write_text(meta.read_text())
        run("prefs", pairs_file, tok_dir, tmp_path / "o3", pair_ids=tmp_path / "bad.parquet")


def test_ygen_ids_outside_the_vocabulary_are_unusable_rows(tmp_path, tok_dir, pairs_file, pairs_rows):
    ygen = [{"prompt_id": r["prompt_id"], "response": "x", "response_ids": [1, 2]} for r in pairs_rows]
    ygen[4]["response_ids"] = [10**6]
    write_parquet(tmp_path / "ygen.parquet", ygen)
    (tmp_path / "ygen.parquet.meta.json").write_text(json.dumps({"tokenizer": {"fingerprint": engine.Tokenizer(str(tok_dir)).fingerprint}}))
    s = run("prefs", pairs_file, tok_dir, tmp_path / "o", ygen=tmp_path / "ygen.parquet", allow_missing_ygen=True)
    assert s["ygen"]["bad_ids"] == 1 and s["dropped"]["missing_ygen"] == 1


def test_missing_ygen_is_an_error_unless_allowed(tmp_path, tok_dir, pairs_file, pairs_rows):
    ygen = [{"prompt_id": r["prompt_id"], "response": "x"} for r in pairs_rows[3:]]
    write_jsonl(tmp_path / "ygen.jsonl", ygen)
    with pytest.raises(engine.DppoError) as e:
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
    with pytest.raises(engine.DppoError, match=r"^row 2: a message has empty content \(empty_content\)$"):
        run("sft", src, tok_dir, tmp_path / "o", strict=True)
    assert not (tmp_path / "o").exists()


def test_bad_pairs(tmp_path, tok_dir):
    rows = synthetic.pair_rows(4, seed=1)
    rows[1]["rejected"][0] = {"role": "user", "content": "another prompt"}
    rows[2]["rejected"] = None
    rows[3]["chosen"] = rows[3]["chosen"][:1]
    s = run("prefs", write_parquet(tmp_path / "x.parquet", rows), tok_dir, tmp_path / "o")
    assert s["rows_kept"] == 1
    assert s["dropped"]["prompt_mismatch"] == 1 and s["dropped"]["missing_field"] == 1 and s["dropped"]["no_assistant_turn"] == 1
    with pytest.raises(engine.DppoError, match=f"row 2 \\(prompt_id {rows[1]['prompt_id']}\\)"):
        run("prefs", tmp_path / "x.parquet", tok_dir, tmp_path / "o2", strict=True)


def test_missing_column_and_unreadable_sources(tmp_path, tok_dir):
    write_parquet(tmp_path / "t.parquet", [{"text": "a"}])
    with pytest.raises(engine.DppoError, match="no column 'messages'.*columns are: text"):
        run("sft", tmp_path / "t.parquet", tok_dir, tmp_path / "o")
    write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}])
    with pytest.raises(engine.DppoError, match=r"no usable rows: 2 rows read, all skipped \(missing_field: 2\)"):
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
    assert "could not load data set 'HuggingFaceH4/ultrafeedback_binarized'" in str(e.value) and "\n" not in str(e.value)
    assert "HF_HUB_OFFLINE" in str(e.value)


def test_one_data_source_for_every_stage(tmp_path, tok_dir, pairs_file):
    """``DataSource`` is checked once, read by every stage, and saved flat in each configuration."""
    from dppo.curriculum import CurriculumConfig
    from dppo.data import DataSource, PrepConfig
    from dppo.errors import ConfigError
    from dppo.eval import EvalConfig
    from dppo.generate import GenConfig

    src = DataSource(pairs_file, split="train_prefs", config="", revision=" ")
    assert (src.data, src.split, src.config, src.revision) == (str(pairs_file), "train_prefs", None, None)
    for bad, match in [(dict(data=""), "--data must name"), (dict(data=None), "--data must name"),
                       (dict(data="x", split=3), "split must be a name"), (dict(data="x", revision=["main"]), "revision")]:
        with pytest.raises(ConfigError, match=match):
            DataSource(**bad)
    # a plain string names a source; each stage keeps its own default split
    assert DataSource.of(src) is src and DataSource.of(str(pairs_file)) == DataSource(str(pairs_file))
    assert GenConfig(model="m", data=str(pairs_file), out=tmp_path / "y.parquet").data == DataSource(str(pairs_file))
    assert EvalConfig(models=("a",), baseline="b", judge="j", data=str(pairs_file), out=tmp_path).data.split == "test_prefs"
    assert EvalConfig.from_options(models=("a",), baseline="b", judge="j", data="d", out=tmp_path).data.split == "test_prefs"
    gen = GenConfig.from_options(model="m", data="d", split="s", revision="r", out=tmp_path / "y.jsonl", max_new_tokens=3)
    assert gen.data == DataSource("d", split="s", revision="r") and gen.decode.sampling.max_new_tokens == 3
    cur = CurriculumConfig(rounds=1, method="unll", data=src, tokenizer="t", init="i", out=tmp_path)
    assert cur.data is src
    # the saved records keep the fields flat, as before there was one class
    from dppo.artifacts import config_record

    flat = config_record(gen)
    assert (flat["data"], flat["split"], flat["config"], flat["revision"]) == ("d", "s", None, "r")
    summary = prepare(PrepConfig("prefs", src, str(tok_dir), tmp_path / "o"), show_progress=False)
    meta = open_shards(tmp_path / "o").meta
    assert summary["rows_kept"] > 0 and meta["config"]["data"] == str(pairs_file) and meta["config"]["split"] == "train_prefs"
    assert "source" not in meta["config"] and meta["config"]["tokenizer"] == str(tok_dir)


def test_hub_lookups_without_network_fail_fast_naming_offline_mode(monkeypatch):
    """No network and no HF_HUB_OFFLINE: one line within seconds, not a minute of retries."""
    import time

    from dppo import artifacts

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    artifacts.hub_reachable.cache_clear()
    try:
        t0 = time.perf_counter()
        with pytest.raises(SourceError) as e:
            open_source("HuggingFaceH4/ultrafeedback_binarized", split="train_prefs")
        assert time.perf_counter() - t0 < 10
        msg = str(e.value)
        assert "cannot be reached" in msg and "HF_HUB_OFFLINE=1" in msg and "local path" in msg and "\n" not in msg
        with pytest.raises(SourceError, match="tokenizer 'org/some-tokenizer'.*cannot be reached"):
            from dppo.artifacts import resolve_tokenizer

            resolve_tokenizer("org/some-tokenizer")
    finally:
        artifacts.hub_reachable.cache_clear()


def test_tokenizer_without_chat_template(tmp_path, tok_dir, sft_file):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    with pytest.raises(engine.DppoError, match="has no chat template"):
        run("sft", sft_file, d, tmp_path / "o")


def test_existing_output_needs_overwrite(tmp_path, tok_dir, sft_file):
    run("sft", sft_file, tok_dir, tmp_path / "o", max_len=120)
    with pytest.raises(engine.DppoError, match="already holds prepared shards; pass --overwrite"):
        run("sft", sft_file, tok_dir, tmp_path / "o", max_len=120)
    s = run("sft", sft_file, tok_dir, tmp_path / "o", max_len=100, overwrite=True)
    assert open_shards(tmp_path / "o").meta["counts"]["max_len"] == 100 == s["max_len"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]  # no leftovers beside it


# -- shards ------------------------------------------------------------------------------------
def test_meta_records_provenance(tmp_path, tok_dir, sft_file):
    run("sft", sft_file, tok_dir, tmp_path / "o")
    meta = open_shards(tmp_path / "o").meta
    assert meta["format"] == "dppo-shards" and meta["version"] == 3 and meta["kind"] == "sft"
    assert meta["tokenizer"]["fingerprint"] == engine.Tokenizer(str(tok_dir)).fingerprint
    assert meta["chat_template"] == synthetic.QWEN_STYLE_TEMPLATE
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
from dppo import engine
from dppo.data.sources import open_source
prep = engine.Preparer("sft", sys.argv[1], sys.argv[2], max_len=64)
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
    assert "rows kept" in r.output and "truncated" in r.output
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
    text = r.output.replace("\n", "")
    assert len(lines) <= 3 and "tokenizer 'Qwen/Qwen2.5-0.5B'" in text and "HF_HUB_OFFLINE" in text


# -- rows users have (datasets folders, scores, y_gen's room) ---------------------------------------
def test_a_save_to_disk_folder_is_read_as_its_arrow_files(tmp_path, tok_dir):
    import datasets

    rows = synthetic.sft_rows(20, seed=2)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    s = run("sft", tmp_path / "saved", tok_dir, tmp_path / "o")
    assert s["rows_in"] == 20 and s["rows_kept"] == 20
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:5]), "test": datasets.Dataset.from_list(rows[5:8])}).save_to_disk(
        str(tmp_path / "dict"))
    from dppo.data.sources import DataSource

    def split(name, out):
        return prepare(PrepConfig("sft", DataSource(str(tmp_path / "dict"), split=name), str(tok_dir), out), show_progress=False)

    assert split("test", tmp_path / "o2")["rows_in"] == 3
    with pytest.raises(SourceError, match="without split 'valid'"):
        split("valid", tmp_path / "o3")


def test_a_non_numeric_score_is_a_bad_row(tmp_path, tok_dir):
    rows = synthetic.pair_rows(6, seed=3)
    rows[2]["score_chosen"] = "high"
    rows[4]["score_rejected"] = [1]
    s = run("prefs", write_jsonl(tmp_path / "p.jsonl", rows), tok_dir, tmp_path / "o")
    assert s["rows_kept"] == 4 and s["dropped"]["non_numeric_score"] == 2
    with pytest.raises(engine.InputError, match=r"^row 3 .*not a number \(non_numeric_score\)$"):
        run("prefs", tmp_path / "p.jsonl", tok_dir, tmp_path / "o2", strict=True)
    rows[4]["score_rejected"] = 1.0
    for r in rows:
        r["score_chosen"] = str(r["score_chosen"])
    rows[0]["score_chosen"] = None  # a null is an absent score, not a bad one
    s = run("prefs", write_parquet(tmp_path / "p.parquet", rows), tok_dir, tmp_path / "o3")  # a string column
    assert s["rows_kept"] == 1 and s["dropped"]["non_numeric_score"] == 5


def test_a_long_ygen_leaves_the_pairs_prompt_as_it_is(tmp_path, tok_dir, pairs_file, pairs_rows):
    ygen = [{"prompt_id": r["prompt_id"], "response": " ".join(["word"] * 400)} for r in pairs_rows]
    write_jsonl(tmp_path / "ygen.jsonl", ygen)
    s = run("prefs", pairs_file, tok_dir, tmp_path / "with", max_len=120, ygen=tmp_path / "ygen.jsonl")
    plain = run("prefs", pairs_file, tok_dir, tmp_path / "without", max_len=120)
    a, b = open_shards(tmp_path / "with"), open_shards(tmp_path / "without")
    assert [x["prompt_ids"].tolist() for x in a] == [x["prompt_ids"].tolist() for x in b]
    assert s["prompt_tokens_removed"] == plain["prompt_tokens_removed"]
    assert s["ygen_truncated"] == len(a) and s["ygen_tokens_removed"] > 0
    assert all(len(x["prompt_ids"]) + len(x["ygen_ids"]) <= 120 for x in a)


def test_a_rounds_prep_counts_only_its_own_pairs(tmp_path, tok_dir, pairs_file, pairs_rows):
    ygen = [{"prompt_id": r["prompt_id"], "response": "a reply"} for r in pairs_rows[:30]]
    write_jsonl(tmp_path / "ygen.jsonl", ygen)
    s = run("prefs", pairs_file, tok_dir, tmp_path / "o", ygen=tmp_path / "ygen.jsonl", ygen_subset=True)
    assert s["rows_in"] == 30 and s["dropped"]["missing_ygen"] == 0 and s["outside_ygen"] == len(pairs_rows) - 30


def test_pack_rows_refuses_lengths_it_cannot_hold():
    with pytest.raises(engine.InputError, match="item 1 .* over the packing limit"):
        engine.pack_rows([3, 2**32], 10)
    with pytest.raises(engine.InputError, match="budget"):
        engine.pack_rows([3], 2**32)


def test_an_exception_in_the_progress_callback_stops_finish(tmp_path, tok_dir, sft_file):
    prep = engine.Preparer("sft", str(tok_dir), str(tmp_path / "o"))
    for batch in open_source(str(sft_file)).batches:
        prep.feed(batch, 0)

    def stop(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prep.finish("{}", stop)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))
