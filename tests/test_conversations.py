"""Whole conversations (`--turns all`): ids equal transformers' `apply_chat_template`, label spans
equal the prefix rule computed here from transformers' own rendering, truncation that keeps the
template, pairs after a multi-turn history, and one SFT step against plain PyTorch."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dppo import engine, synthetic
from dppo.data import ShardError, open_shards
from dppo.data.prep import PrepConfig, prepare

from conftest import write_jsonl, write_parquet
from train_fixtures import *  # noqa: F403
from train_fixtures import run_train

TEMPLATE_DIR = Path(__file__).parent / "templates"
FAMILIES = {  # file in tests/templates: (bos, eos, special tokens)
    "qwen2.5": (None, "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    "llama3.2": ("<|begin_of_text|>", "<|eot_id|>", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "smollm2": (None, "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    "mistral": ("<s>", "</s>", ["<s>", "</s>", "[INST]", "[/INST]"]),
    "gemma2": ("<bos>", "<eos>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "phi3": (None, "<|endoftext|>", ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "olmo2": ("<|endoftext|>", "<|endoftext|>", ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]),
    "qwen3": (None, "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"]),
}
NO_SYSTEM = {"gemma2"}


def run(kind, data, tok, out, **kw):
    return prepare(PrepConfig(kind, str(data), str(tok), Path(out), **kw), show_progress=False)


def conversations(n: int, seed: int, system: bool = True, long: bool = False) -> list[list[dict]]:
    """SmolTalk-shaped conversations: 1 to 4 exchanges, some with a system turn."""
    rng = random.Random(seed)
    words = "the a model answers questions about data with care and some short words of text here".split()

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) + rng.choice([".", "?", "!", ""])

    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": text(2, 6)}] if system and rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 4)):
            msgs.append({"role": "user", "content": text(2, 40 if long else 12)})
            msgs.append({"role": "assistant", "content": text(2, 40 if long else 15)})
        out.append(msgs)
    return out


def render(hf, msgs, gen):
    return hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def encode(hf, text):
    return hf(text, add_special_tokens=False)["input_ids"]


def prefix_rule(hf, msgs):
    """(ids, spans) by transformers' rendering: ids = apply_chat_template(msgs); the span of assistant
    turn k runs from the tokens of msgs[:k] rendered with the generation header to those of msgs[:k+1]
    (where a template writes a turn differently once later turns exist, to where the two renderings
    part). None where the rule has no answer (a prefix that is not one): such rows are skipped."""
    full_text = render(hf, msgs, False)
    ids = encode(hf, full_text)
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        p = render(hf, msgs[:k], True)
        f = render(hf, msgs[: k + 1], False)
        if not full_text.startswith(p):
            return None
        if not full_text.startswith(f):
            common = next((i for i, (a, b) in enumerate(zip(full_text, f)) if a != b), min(len(f), len(full_text)))
            for t in hf.added_tokens_decoder.values():  # never inside a special token
                at = full_text.find(t.content, max(0, common - len(t.content) + 1))
                if 0 <= at < common < at + len(t.content):
                    common = at
            if common <= len(p):
                return None
            f = full_text[:common]
        start, end = encode(hf, p), encode(hf, f)
        assert ids[: len(start)] == start and ids[: len(end)] == end, "a boundary re-split (not in these fixtures)"
        spans.append((len(start), len(end)))
    return ids, spans


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory) -> dict[str, Path]:
    corpus = synthetic.english_corpus(40_000)
    out = {}
    for name, (bos, eos, specials) in FAMILIES.items():
        out[name] = synthetic.make_tokenizer(
            tmp_path_factory.mktemp(f"tok-{name}"), corpus, vocab_size=400,
            template=(TEMPLATE_DIR / f"{name}.jinja").read_text(), special_tokens=specials, eos_token=eos,
            pad_token=specials[-1] if name != "llama3.2" else eos, bos_token=bos)
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_whole_conversations_equal_apply_chat_template_and_the_prefix_rule(tmp_path, name, family_tokenizers):
    from transformers import AutoTokenizer

    tok = family_tokenizers[name]
    hf = AutoTokenizer.from_pretrained(str(tok))
    convs = conversations(24, seed=1, system=name not in NO_SYSTEM)
    rows = [{"messages": c, "extra": i} for i, c in enumerate(convs)]
    s = run("sft", write_jsonl(tmp_path / "sft.jsonl", rows), tok, tmp_path / "out", turns="all", max_len=100_000)
    want = [prefix_rule(hf, c) for c in convs]
    kept = [w for w in want if w is not None]
    assert s["rows_kept"] == len(kept) and s["dropped"]["template_not_prefix"] == len(want) - len(kept)
    assert s["label_spans"] == sum(len(w[1]) for w in kept)
    shards = open_shards(tmp_path / "out")
    for ex, (ids, spans) in zip(shards, kept, strict=True):
        assert ex["input_ids"].tolist() == ids, name
        assert ex["spans"] == spans, name
        labels = np.full(len(ids), -100)
        for a, b in spans:
            labels[a:b] = np.asarray(ids[a:b])
        assert ex["labels"].tolist() == labels.tolist()
    if name == "qwen3":
        # Qwen3 writes an empty <think> block into the last assistant turn only: an earlier turn
        # rendered as the last one is not a prefix of the conversation, so only single-exchange
        # conversations are kept (the docs say so)
        assert 0 < len(kept) < len(want)
        assert all(len(w[1]) == 1 for w in kept)
    elif name != "mistral":  # Mistral puts the system turn before the last user turn only
        assert len(kept) == len(want)


def _long_rows(n, seed):
    return [{"messages": c} for c in conversations(n, seed=seed, long=True)]


@pytest.fixture(scope="module")
def llama_tok(family_tokenizers):
    return family_tokenizers["llama3.2"]


@pytest.mark.parametrize("family", ["chatml", "llama3"])
def test_truncation_drops_earliest_exchanges_whole_and_keeps_the_template(tmp_path, tok_dir, llama_tok, family):
    from transformers import AutoTokenizer

    tok = tok_dir if family == "chatml" else llama_tok
    hf = AutoTokenizer.from_pretrained(str(tok))
    rows = _long_rows(40, seed=3)
    data = write_parquet(tmp_path / "sft.parquet", rows)
    max_len, max_prompt_len = (90, 60) if family == "chatml" else (200, 150)  # Llama 3.2's system header is long
    s = run("sft", data, tok, tmp_path / "out", turns="all", max_len=max_len, max_prompt_len=max_prompt_len)
    assert s["exchanges_dropped"] > 0 and s["conversations_shortened"] > 0
    assert s["label_spans_dropped"] == s["exchanges_dropped"]
    gen_header = encode(hf, render(hf, [{"role": "user", "content": "x"}], True)[len(render(hf, [{"role": "user", "content": "x"}], False)):])
    shards = open_shards(tmp_path / "out")
    assert len(shards) == len(rows) == s["rows_kept"]
    exact = partial = 0
    for ex, row in zip(shards, rows):
        ids = ex["input_ids"].tolist()
        assert len(ids) <= max_len
        msgs = row["messages"]
        full = encode(hf, render(hf, msgs, False))
        if len(full) <= max_len:
            assert ids == full
            continue
        # the earliest exchanges went first, whole: the result is the template's own rendering of
        # the conversation without them, or (down to one exchange) that exchange truncated
        sys = msgs[:1] if msgs[0]["role"] == "system" else []
        rest = msgs[len(sys):]
        candidates = [encode(hf, render(hf, sys + rest[2 * j:], False)) for j in range(len(rest) // 2)]
        if ids in candidates:
            exact += 1
            j = candidates.index(ids)
            want = prefix_rule(hf, sys + rest[2 * j:])[1]
            assert ex["spans"] == want  # every kept label span whole
            continue
        partial += 1
        last = sys + rest[-2:]
        (a, b), = ex["spans"]
        # the generation header precedes the one label span; the system turn and the user header lead
        assert ids[a - len(gen_header): a] == gen_header
        head = encode(hf, render(hf, last[:-1], True))
        assert ids[:4] == head[:4]
        assert ids[a:b] == encode(hf, render(hf, last, False))[len(head):][: b - a]
    assert exact > 0 and partial > 0


def test_a_template_that_cannot_drop_exchanges_is_counted(tmp_path, tok_dir):
    # a template marking the first turn renders the conversation without its first exchange differently
    tmpl = ("{% for m in messages %}<|im_start|>{{ m.role }}{{ ' first' if loop.first else '' }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = tmp_path / "tok"
    tok.mkdir()
    for f in tok_dir.iterdir():
        (tok / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg["chat_template"] = tmpl
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tok / "chat_template.jinja").unlink(missing_ok=True)
    rows = _long_rows(20, seed=4)
    s = run("sft", write_jsonl(tmp_path / "d.jsonl", rows), tok, tmp_path / "out", turns="all", max_len=90)
    # without a system turn the first user turn is marked: no exchange can go (with one, the system
    # turn carries the mark and exchanges can)
    assert s["dropped"]["not_truncatable"] > 0
    assert s["dropped"]["not_truncatable"] + s["rows_kept"] == len(rows)
    assert all(len(ex["input_ids"]) <= 90 for ex in open_shards(tmp_path / "out"))


def test_pairs_after_a_history(tmp_path, tok_dir, hf_tokenizer):
    hf = hf_tokenizer
    rows = []
    for i, c in enumerate(conversations(30, seed=5)):
        hist = c[:-1]
        rows.append({"prompt_id": f"p{i}", "chosen": hist + [{"role": "assistant", "content": f"good answer {i}"}],
                     "rejected": hist + [{"role": "assistant", "content": f"bad {i}"}], "score_chosen": 9.0, "score_rejected": 1.0})
    bad = json.loads(json.dumps(rows[3]))
    bad["rejected"][0]["content"] += " changed"
    bad["prompt_id"] = "bad"
    data = write_jsonl(tmp_path / "p.jsonl", rows + [bad])
    s = run("prefs", data, tok_dir, tmp_path / "out", turns="all", max_len=100_000)
    assert s["rows_kept"] == 30 and s["dropped"]["prompt_mismatch"] == 1
    shards = open_shards(tmp_path / "out")
    for ex, row in zip(shards, rows):
        prompt = encode(hf, render(hf, row["chosen"][:-1], True))
        assert ex["prompt_ids"].tolist() == prompt
        for side in ("chosen", "rejected"):
            full = encode(hf, render(hf, row[side], False))
            assert ex["prompt_ids"].tolist() + ex[f"{side}_ids"].tolist() == full
    assert any(len(r["chosen"]) > 4 for r in rows)
    # --strict names the bad row counted from 1: the file's last line
    with pytest.raises(engine.InputError, match=f"row {len(rows) + 1} \\(prompt_id bad\\)"):
        run("prefs", data, tok_dir, tmp_path / "strict", turns="all", strict=True, max_len=100_000)


def test_a_pair_history_is_shortened_from_its_earliest_exchange(tmp_path, tok_dir, hf_tokenizer):
    hf = hf_tokenizer
    rows = []
    for i, c in enumerate(conversations(30, seed=6, long=True)):
        rows.append({"prompt_id": f"p{i}", "chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": "no."}]})
    s = run("prefs", write_jsonl(tmp_path / "p.jsonl", rows), tok_dir, tmp_path / "out", turns="all", max_len=120,
            max_prompt_len=80)
    assert s["exchanges_dropped"] > 0
    header = encode(hf, "<|im_end|>\n<|im_start|>assistant\n")
    for ex, row in zip(open_shards(tmp_path / "out"), rows):
        p = ex["prompt_ids"].tolist()
        assert p[-len(header):] == header and len(p) + len(ex["chosen_ids"]) <= 120
        full = encode(hf, render(hf, row["chosen"][:-1], True))
        if len(full) + len(encode(hf, render(hf, row["chosen"], False))) - len(full) > 120 and len(full) > 80:
            assert len(p) <= 80


def test_generate_shortens_a_long_history_as_prep_does(tmp_path, tok_dir, hf_tokenizer):
    from dppo.generate import load_prompts, render_prompts

    hf = hf_tokenizer
    rows = [{"prompt_id": f"p{i}", "chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": "no."}]}
            for i, c in enumerate(conversations(30, seed=6, long=True))]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    s = run("prefs", data, tok_dir, tmp_path / "out", turns="all", max_len=120, max_prompt_len=80)
    assert s["exchanges_dropped"] > 0
    prompts, _ = load_prompts(str(data), turns="all")
    ids = dict(zip([p.prompt_id for p in prompts], render_prompts(prompts, tok_dir, 80), strict=True))
    compared = dropped = 0
    for ex, row in zip(open_shards(tmp_path / "out"), rows, strict=True):
        full = encode(hf, render(hf, row["chosen"][:-1], True))
        longest = max(len(encode(hf, render(hf, row[side], False))) for side in ("chosen", "rejected"))
        if len(full) > 80 and longest <= 120:
            continue  # the pair fits: prep keeps its prompt whole, generate shortens it to 80
        got = ids[row["prompt_id"]]
        assert got == ex["prompt_ids"].tolist() and len(got) <= 80
        compared += 1
        if len(full) > 80:
            # earliest exchanges went whole: the template's own rendering of a later suffix, or that
            # with the content of its last user turn shortened (headers kept)
            sys = row["chosen"][:1] if row["chosen"][0]["role"] == "system" else []
            rest = row["chosen"][len(sys):-1]
            suffixes = [encode(hf, render(hf, sys + rest[2 * j:], True)) for j in range(1, len(rest) // 2 + 1)]
            dropped += got in suffixes
            header = encode(hf, "<|im_end|>\n<|im_start|>assistant\n")
            assert got[-len(header):] == header  # the last user turn's end and the generation header
    assert compared > 10 and dropped > 0


def test_shards_of_an_older_format_are_refused_in_one_line(tmp_path, tok_dir, sft_file):
    run("sft", sft_file, tok_dir, tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    meta["version"] = 2
    (tmp_path / "out" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ShardError, match="version 2.*dppo prep") as e:
        open_shards(tmp_path / "out")
    assert "\n" not in str(e.value)


def test_turns_first_is_the_default_and_spans_are_exposed(tmp_path, tok_dir, hf_tokenizer):
    convs = conversations(10, seed=7)
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in convs])
    s = run("sft", data, tok_dir, tmp_path / "first", max_len=100_000)
    assert s["turns"] == "first" and s["label_spans"] == 10
    shards = open_shards(tmp_path / "first")
    for ex, c in zip(shards, convs):
        first = c[: 3 if c[0]["role"] == "system" else 2]
        ids, spans = prefix_rule(hf_tokenizer, first)
        assert ex["input_ids"].tolist() == ids and ex["spans"] == spans
    assert shards.spans(1) == shards[1]["spans"]
    lengths = shards.lengths()
    assert (lengths["prompt"] + lengths["response"]).tolist() == [len(ex["input_ids"]) for ex in shards]
    s = run("sft", data, tok_dir, tmp_path / "all", turns="all", max_len=100_000)
    every = open_shards(tmp_path / "all")
    lengths = every.lengths()
    assert lengths["response"].tolist() == [sum(b - a for a, b in ex["spans"]) for ex in every]
    assert s["label_spans"] == sum(len(c) // 2 for c in convs)


# -- one SGD step: dppo train on --turns all shards against plain PyTorch ------------------------
def test_one_sgd_step_on_whole_conversations_equals_plain_pytorch(tmp_path, tok_dir, hf_tokenizer, init_dir):
    from transformers import AutoModelForCausalLM

    convs = conversations(8, seed=8)
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": c} for c in convs])
    run("sft", data, tok_dir, tmp_path / "shards", turns="all", max_len=100_000)
    lr = 1.0
    out = run_train(tmp_path / "run", method="sft", data=str(tmp_path / "shards"), init=str(init_dir), optimizer="sgd",
                    lr=lr, max_samples=4, max_steps=1)
    policy = AutoModelForCausalLM.from_pretrained(str(init_dir), torch_dtype=torch.float32)
    total, count = 0.0, 0
    for c in convs[:4]:  # transformers' own rendering and the prefix rule, written here
        ids, spans = prefix_rule(hf_tokenizer, c)
        x = torch.tensor([ids])
        logp = torch.log_softmax(policy(x).logits[0, :-1].float(), -1).gather(-1, x[0, 1:, None])[:, 0]
        for a, b in spans:
            total = total + logp[a - 1: b - 1].sum()
            count += b - a
    loss = -total / count  # the token mean over every labelled token of the step
    loss.backward()
    got = load_file(out / "model" / "model.safetensors")
    checked = 0
    for name, param in policy.named_parameters():
        if name in got:
            torch.testing.assert_close(got[name] - param.detach(), -lr * param.grad, rtol=1e-4, atol=2e-7, msg=name)
            checked += 1
    assert checked == len(got)


def test_generate_takes_the_history_prep_takes(tmp_path, tok_dir):
    from dppo.generate import load_prompts, render_prompts

    rows = []
    for i, c in enumerate(conversations(20, seed=9)):
        rows.append({"prompt_id": f"p{i}", "chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": "no"}]})
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    run("prefs", data, tok_dir, tmp_path / "out", turns="all", max_len=100_000)
    prompts, info = load_prompts(str(data), turns="all")
    assert info["skipped"] == 0 and len(prompts) == 20
    ids = dict(zip([p.prompt_id for p in prompts], render_prompts(prompts, tok_dir), strict=True))
    shards = open_shards(tmp_path / "out")
    for ex in shards:
        assert ids[ex["prompt_id"]] == ex["prompt_ids"].tolist()
    assert any(len(p.messages) > 2 for p in prompts)
    first, _ = load_prompts(str(data))
    assert all(p.messages[-1][0] == "user" and len(p.messages) <= 2 for p in first)


# -- prompt ids: the engine names a row without one, the same way on every path -------------------
def _derived_id(row: dict, turns: str) -> str:
    """A row's prompt id, written here apart from the engine: its own, else the sha256 of the prompt
    `--turns` takes: of its text when it is one user turn (UltraFeedback's ids), else of the whole
    history as (role, content) netstrings (docs/shards.md)."""
    import hashlib

    if row.get("prompt_id"):
        return str(row["prompt_id"])
    msgs = row.get("chosen") or row["messages"]
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    first_user = min(i for i, m in enumerate(msgs) if m["role"] == "user")
    prompt = msgs[: (first_user if turns == "first" else last_user) + 1]
    if len(prompt) == 1:
        return hashlib.sha256(prompt[0]["content"].encode("utf-8")).hexdigest()
    parts = (x.encode("utf-8") for m in prompt for x in (m["role"], m["content"]))
    return hashlib.sha256(b"".join(b"%d:%s," % (len(x), x) for x in parts)).hexdigest()


def test_prompt_ids_are_derived_by_the_engine_on_every_path(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dppo.generate import load_prompts

    convs = conversations(24, seed=21)
    assert any(len(c) > 3 for c in convs) and any(len(c) <= 3 for c in convs)  # single- and multi-turn
    rows = []
    for i, c in enumerate(convs):
        row = {"chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": f"worse {i}"}]}
        if i % 3 == 0:
            row["prompt_id"] = f"given-{i}"
        elif i % 3 == 1:
            row["prompt_id"] = None if i % 2 else ""
        rows.append(row)
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    sft = write_jsonl(tmp_path / "s.jsonl", [{"messages": c, **({"prompt_id": r["prompt_id"]} if "prompt_id" in r else {})}
                                             for c, r in zip(convs, rows, strict=True)])
    # a parquet pair file without the prompt_id column at all
    nocol = tmp_path / "nocol.parquet"
    pq.write_table(pa.Table.from_pylist([{"chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]), nocol)
    for turns in ("first", "all"):
        want = [_derived_id(r, turns) for r in rows]
        assert len(set(want)) == len(want)
        for src in (data, sft):
            prompts, info = load_prompts(str(src), turns=turns)
            assert [p.prompt_id for p in prompts] == want and info["skipped"] == 0, (src.name, turns)
        got = [pid for _, pid, _, _ in engine.prompt_rows(pq.read_table(nocol), 0, turns)]
        assert got == [_derived_id({k: v for k, v in r.items() if k != "prompt_id"}, turns) for r in rows]
        # prep names the pairs the same way, so a y_gen keyed by those ids joins them all
        ygen = write_jsonl(tmp_path / f"y-{turns}.jsonl", [{"prompt_id": w, "response": f"greedy {k}"} for k, w in enumerate(want)])
        s = run("prefs", data, tok_dir, tmp_path / f"out-{turns}", turns=turns, max_len=100_000, ygen=ygen)
        assert s["rows_kept"] == len(rows)
        assert [ex["prompt_id"] for ex in open_shards(tmp_path / f"out-{turns}")] == want
        s = run("prefs", nocol, tok_dir, tmp_path / f"nocol-{turns}", turns=turns, max_len=100_000)
        assert [ex["prompt_id"] for ex in open_shards(tmp_path / f"nocol-{turns}")] == [
            _derived_id({k: v for k, v in r.items() if k != "prompt_id"}, turns) for r in rows]


def test_a_missing_ygen_is_named_by_the_derived_id(tmp_path, tok_dir):
    convs = conversations(6, seed=22)
    rows = [{"chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": "no"}]} for c in convs]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    ygen = write_jsonl(tmp_path / "y.jsonl", [{"prompt_id": "other", "response": "x"}])
    with pytest.raises(engine.DppoError) as e:
        run("prefs", data, tok_dir, tmp_path / "o", turns="all", max_len=100_000, ygen=ygen)
    assert _derived_id(rows[0], "all") in str(e.value)


def test_histories_that_end_with_the_same_user_turn_get_their_own_ids_and_y_gen(tmp_path, tok_dir, hf_tokenizer):
    import hashlib

    from dppo.generate import load_prompts

    u, a = {"role": "user", "content": "and then?"}, {"role": "assistant", "content": "done."}
    histories = [
        [u],
        [{"role": "system", "content": "be brief"}, u],
        [{"role": "system", "content": "be kind"}, u],
        [{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"}, u],
        [{"role": "user", "content": "first"}, {"role": "assistant", "content": "two"}, u],
    ]
    rows = [{"chosen": h + [a], "rejected": h + [{"role": "assistant", "content": f"worse {i}"}]} for i, h in enumerate(histories)]
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    want = [_derived_id(r, "all") for r in rows]
    assert len(set(want)) == len(rows)
    assert want[0] == hashlib.sha256(b"and then?").hexdigest()  # one user turn: UltraFeedback's id
    prompts, info = load_prompts(str(data), turns="all")
    assert [p.prompt_id for p in prompts] == want and info["duplicates"] == 0
    ygen = write_jsonl(tmp_path / "y.jsonl", [{"prompt_id": w, "response": f"answer number {k}"} for k, w in enumerate(want)][::-1])
    s = run("prefs", data, tok_dir, tmp_path / "o", turns="all", max_len=100_000, ygen=ygen)
    assert s["rows_kept"] == len(rows) and s["ygen"]["responses"] == len(rows)
    shards = list(open_shards(tmp_path / "o"))
    assert [ex["prompt_id"] for ex in shards] == want
    for k, (ex, h) in enumerate(zip(shards, histories, strict=True)):
        full = encode(hf_tokenizer, render(hf_tokenizer, h + [{"role": "assistant", "content": f"answer number {k}"}], False))
        assert ex["prompt_ids"].tolist() + ex["ygen_ids"].tolist() == full, k


# -- dppo generate: --turns is one of the settings a resumed output must share ---------------------
def test_generate_refuses_to_resume_under_another_turns(tmp_path, init_dir):
    from dppo.errors import ConfigError
    from dppo.generate import GenConfig, generate

    rows = [{"prompt_id": f"p{i}", "messages": c} for i, c in enumerate(conversations(4, seed=23))]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    opts = dict(model=str(init_dir), data=str(data), out=tmp_path / "y.parquet", max_new_tokens=2, device="cpu")
    generate(GenConfig.from_options(**opts), show_progress=False)
    meta = json.loads((tmp_path / "y.parquet.meta.json").read_text())
    assert meta["settings"]["turns"] == "first"
    with pytest.raises(ConfigError, match=r"made with other settings \(turns 'first' -> 'all'\).*--overwrite") as e:
        generate(GenConfig.from_options(**opts, turns="all"), show_progress=False)
    assert "\n" not in str(e.value)
    s = generate(GenConfig.from_options(**opts), show_progress=False)  # the same settings resume
    assert s["already_done"] == 4 and s["generated"] == 0
    s = generate(GenConfig.from_options(**opts, turns="all", overwrite=True), show_progress=False)
    assert s["generated"] == 4
    assert json.loads((tmp_path / "y.parquet.meta.json").read_text())["settings"]["turns"] == "all"
    # the command line: one line naming the setting, exit status 1
    import typer
    from typer.testing import CliRunner

    from dppo.cli.generate_eval import generate_cmd
    from dppo.cli.main import user_errors

    app = typer.Typer()
    app.command("generate")(user_errors(generate_cmd))
    app.command("other")(lambda: None)
    args = ["generate", "--model", str(init_dir), "--data", str(data), "--out", str(tmp_path / "cli.jsonl"), "--max-new-tokens", "2"]
    assert CliRunner().invoke(app, [*args, "--turns", "all"]).exit_code == 0
    res = CliRunner().invoke(app, [*args, "--turns", "first"])
    assert res.exit_code == 1 and "(turns 'all' -> 'first')" in res.output and "--overwrite" in res.output, res.output


# -- sources: the columns the engine does not read stay out of the way ----------------------------
def _unreadable_column(n: int):
    """A column polars cannot read (a 40-digit decimal): reading it would fail the whole file."""
    import decimal

    import pyarrow as pa

    return pa.array([decimal.Decimal(i) for i in range(n)], type=pa.decimal256(40, 2))


def test_only_the_columns_the_engine_reads_are_read(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dppo.data.sources import open_source
    from dppo.generate import load_prompts

    convs = conversations(12, seed=24)
    pairs = [{"prompt_id": f"p{i}", "chosen": c, "rejected": c[:-1] + [{"role": "assistant", "content": "no"}]}
             for i, c in enumerate(convs)]
    table = pa.Table.from_pylist(pairs).append_column("source", pa.array(["smol"] * len(convs)))
    pq.write_table(table.append_column("odd", _unreadable_column(len(convs))), tmp_path / "p.parquet")
    sft = pa.table({"messages": table.column("chosen"), "source": table.column("source"), "odd": _unreadable_column(len(convs))})
    pq.write_table(sft, tmp_path / "s.parquet")
    s = run("sft", tmp_path / "s.parquet", tok_dir, tmp_path / "sft", turns="all", max_len=100_000)
    assert s["rows_kept"] == len(convs)
    s = run("prefs", tmp_path / "p.parquet", tok_dir, tmp_path / "prefs", turns="all", max_len=100_000)
    assert s["rows_kept"] == len(convs)
    prompts, _ = load_prompts(str(tmp_path / "p.parquet"), turns="all")
    assert [p.prompt_id for p in prompts] == [r["prompt_id"] for r in pairs]
    got = [b.columns for b in open_source(tmp_path / "s.parquet", columns=engine.ROW_COLUMNS["sft"]).batches]
    assert got == [["messages"]]
    # a source with none of them keeps its columns, so the engine's error names them
    with pytest.raises(engine.DppoError, match="no column 'messages'.*columns are: text"):
        run("sft", write_parquet(tmp_path / "t.parquet", [{"text": "a"}]), tok_dir, tmp_path / "o")


def test_a_hub_data_set_hands_the_engine_only_its_columns(tmp_path, tok_dir, monkeypatch):
    import datasets

    import dppo.artifacts
    from dppo.data.sources import DataSource

    convs = conversations(10, seed=25)
    rows = [{"messages": c, "source": "smol-magpie", "n_turns": len(c) // 2} for c in convs]
    monkeypatch.setattr(dppo.artifacts, "hub_offline", lambda: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows))
    src = DataSource("HuggingFaceTB/smoltalk", split="train").open(4, columns=engine.ROW_COLUMNS["sft"])
    assert [b.column_names for b in src.batches] == [["messages"]] * 3
    s = run("sft", DataSource("HuggingFaceTB/smoltalk", split="train"), tok_dir, tmp_path / "hub", turns="all", max_len=100_000)
    local = run("sft", write_jsonl(tmp_path / "l.jsonl", rows), tok_dir, tmp_path / "local", turns="all", max_len=100_000)
    assert s["rows_kept"] == local["rows_kept"] == len(convs)
    assert [ex["input_ids"].tolist() for ex in open_shards(tmp_path / "hub")] == [
        ex["input_ids"].tolist() for ex in open_shards(tmp_path / "local")]
