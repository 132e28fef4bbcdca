"""`dppo generate`: greedy output identical to transformers, stopping, sampling, files, resume, prep round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
from harness import dies_after, run_cli
import torch
from conftest import write_jsonl
from dppo import engine, synthetic
from dppo.data import open_shards
from dppo.generate.decoding import Completion, Decoder, SamplingConfig, sample_key, supports_fast_decoding
from dppo.errors import ConfigError
from dppo.generate import (
    OUTPUT_COLUMNS,
    DecodeConfig,
    GenConfig,
    PromptRow,
    generate,
    generate_rows,
    load_prompts,
    read_generations,
    render_prompts,
    stop_token_ids,
)
from dppo.data.prep import PrepConfig, prepare



pytestmark = pytest.mark.usefixtures("one_thread")

# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vocab(tok_dir: Path) -> int:
    return tm.vocab_size(tok_dir)


@pytest.fixture(scope="module")
def ids_prompts(vocab: int) -> list[list[int]]:
    """Prompts of many lengths (3..60 tokens), random ids."""
    rng = np.random.default_rng(1)
    return [rng.integers(3, vocab, int(n)).tolist() for n in [3, 60, 17, 5, 41, 9, 33, 12, 25, 48, 7, 20]]


@pytest.fixture(scope="module")
def lm(vocab: int):
    return tm.causal_lm(vocab, seed=0)


def hf_greedy(model, prompt: list[int], new: int, stop: list[int]) -> tuple[list[int], str]:
    """transformers' greedy generate on one prompt (no padding): the reference."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=new,
            do_sample=False, eos_token_id=stop or None, pad_token_id=0,
        )[0, len(prompt) :].tolist()
    for t, tok in enumerate(out):
        if tok in stop:
            return out[:t], "stop"
    return out, "length"


def run(decoder: Decoder, prompts, sampling, batch_size, keys=None) -> dict[int, tuple[list[int], str]]:
    got: dict[int, tuple[list[int], str]] = {}
    for batch in decoder.run(prompts, sampling, batch_size=batch_size, keys=keys):
        assert len(batch) <= batch_size
        for c in batch:
            assert c.index not in got
            got[c.index] = (c.token_ids, c.finish_reason)
    assert sorted(got) == list(range(len(prompts)))
    return got


# -- the decoder ----------------------------------------------------------------------------------
def test_greedy_is_token_identical_to_transformers_generate(lm, ids_prompts):
    new = 24
    free = [hf_greedy(lm, p, new, [])[0] for p in ids_prompts]
    # stop tokens that occur mid-response in several rows: rows stop at different steps, so the
    # batch sheds finished rows while the others go on
    counts: dict[int, int] = {}
    for row in free:
        for tok in set(row[2:-2]):
            counts[tok] = counts.get(tok, 0) + 1
    stop = sorted(counts, key=lambda t: (-counts[t], t))[:3]
    want = [hf_greedy(lm, p, new, stop) for p in ids_prompts]
    reasons = {w[1] for w in want}
    assert reasons == {"stop", "length"}, "the test needs rows that stop and rows that run out"
    sampling = SamplingConfig(max_new_tokens=new)
    for engine, graphs, bs in (("dppo", False, 5), ("dppo", False, 12), ("dppo", True, 5), ("hf", False, 5)):
        got = run(Decoder(lm, stop, engine=engine, cuda_graphs=graphs), ids_prompts, sampling, bs)
        for i, w in enumerate(want):
            assert got[i] == w, (engine, graphs, bs, i)


def test_static_step_sheds_rows_in_halves(lm, ids_prompts):
    """The fixed-shape step (the CUDA-graph path, run eagerly here), whose slot set halves once
    half its rows have finished and no prompt is left, gives the same tokens as the dynamic path."""
    prompts = ids_prompts * 3
    stop = sorted({r[0][1] for r in (hf_greedy(lm, p, 12, []) for p in ids_prompts[:6])})
    sampling = SamplingConfig(max_new_tokens=12)
    dynamic = run(Decoder(lm, stop, cuda_graphs=False), prompts, sampling, 32)
    decoder = Decoder(lm, stop, cuda_graphs=True)
    static = run(decoder, prompts, sampling, 32)
    assert static == dynamic
    assert sorted(n for n, _ in decoder._slot_sets) == [16, 32]  # the tail moved to 16 slots
    assert {r for _, r in dynamic.values()} == {"stop", "length"}


def test_context_limit_and_empty_prompt(vocab):
    model = tm.causal_lm(vocab, seed=1)
    model.config.max_position_embeddings = 20
    d = Decoder(model, [0])
    got = run(d, [[5] * 18, [5] * 20, [5] * 3], SamplingConfig(max_new_tokens=8), 3)
    assert len(got[0][0]) == 2 and got[0][1] == "context"
    assert got[1] == ([], "context")
    assert got[2][1] in ("length", "stop")
    with pytest.raises(ValueError, match="at least one token"):
        list(d.run([[]], SamplingConfig()))


def test_sampling_is_reproducible_whatever_the_batching(lm, ids_prompts):
    s = SamplingConfig(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=7)
    keys = [1000 + i for i in range(len(ids_prompts))]
    a = run(Decoder(lm, []), ids_prompts, s, 3, keys)
    b = run(Decoder(lm, []), ids_prompts, s, 12, keys)
    assert a == b
    c = run(Decoder(lm, []), ids_prompts, SamplingConfig(max_new_tokens=16, temperature=0.9, top_p=0.95, seed=8), 3, keys)
    assert a != c
    greedy = run(Decoder(lm, []), ids_prompts, SamplingConfig(max_new_tokens=16), 4)
    assert a != greedy
    # a nucleus this small keeps only the most likely token: greedy again
    tiny = run(Decoder(lm, []), ids_prompts, SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=1e-9), 4, keys)
    assert tiny == greedy


def run_k(decoder: Decoder, prompts, sampling, batch_size, k, keys=None) -> dict[tuple[int, int], tuple[list[int], str]]:
    got: dict[tuple[int, int], tuple[list[int], str]] = {}
    for batch in decoder.run(prompts, sampling, batch_size=batch_size, keys=keys, samples=k):
        assert len(batch) <= batch_size
        for c in batch:
            assert (c.index, c.sample) not in got
            got[c.index, c.sample] = (c.token_ids, c.finish_reason)
    assert sorted(got) == [(i, j) for i in range(len(prompts)) for j in range(k)]
    return got


def test_k_samples_are_k_single_runs_under_their_keys(lm, ids_prompts):
    """One call with samples=K gives, for sample j of prompt i, exactly the single-sample run of
    prompt i under key sample_key(keys[i], j): the K slots of a prompt share its prefill without
    changing a token, whatever the batch size, the order of the prompts or the other prompts."""
    k = 4
    s = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=3)
    keys = [50 + 7 * i for i in range(len(ids_prompts))]
    stop = sorted({t for p in ids_prompts[:4] for t in hf_greedy(lm, p, 8, [])[0][2:4]})
    got = run_k(Decoder(lm, stop), ids_prompts, s, 6, k, keys)
    for i, p in enumerate(ids_prompts):
        for j in range(k):
            alone = run(Decoder(lm, stop), [p], s, 1, [sample_key(keys[i], j)])
            assert got[i, j] == alone[0], (i, j)
    assert {r for _, r in got.values()} == {"stop", "length"}
    # samples of one prompt differ (a degenerate stream would repeat sample 0)
    assert len({tuple(got[0, j][0]) for j in range(k)}) > 1
    # batch size, order and the other prompts change nothing: each key's stream is its own
    for bs in (1, 5, 48):
        assert run_k(Decoder(lm, stop), ids_prompts, s, bs, k, keys) == got
    rev = run_k(Decoder(lm, stop), ids_prompts[::-1], s, 7, k, keys[::-1])
    n = len(ids_prompts)
    assert {(n - 1 - i, j): v for (i, j), v in rev.items()} == got
    # ranks: two halves decoded apart (as two ranks would) give the same samples
    half = n // 2
    a = run_k(Decoder(lm, stop), ids_prompts[:half], s, 4, k, keys[:half])
    b = run_k(Decoder(lm, stop), ids_prompts[half:], s, 4, k, keys[half:])
    assert {**a, **{(i + half, j): v for (i, j), v in b.items()}} == got
    # the fixed-shape step (the CUDA-graph path, run eagerly) agrees too
    assert run_k(Decoder(lm, stop, cuda_graphs=True), ids_prompts, s, 16, k, keys) == got


def test_k_greedy_samples_are_the_greedy_response(lm, ids_prompts):
    """Greedy decoding has no stream: K "samples" are K copies of the greedy response, which is
    the one-sample greedy output unchanged (transformers' greedy generate)."""
    s = SamplingConfig(max_new_tokens=10)
    one = run(Decoder(lm, []), ids_prompts, s, 5)
    got = run_k(Decoder(lm, []), ids_prompts, s, 5, 3)
    for i, p in enumerate(ids_prompts):
        assert one[i] == (hf_greedy(lm, p, 10, [])[0], "length")
        assert got[i, 0] == got[i, 1] == got[i, 2] == one[i]


def test_k_samples_prefill_each_prompt_once(lm, ids_prompts, monkeypatch):
    """The K sequences of a prompt admitted together cost one prefill row, not K."""
    from dppo.generate import decoding

    rows = []
    orig = decoding._Forward.prefill

    def counting(self, ids, last, cache, slots):
        rows.append(ids.shape[0])
        return orig(self, ids, last, cache, slots)

    monkeypatch.setattr(decoding._Forward, "prefill", counting)
    s = SamplingConfig(max_new_tokens=4, temperature=1.0)
    run_k(Decoder(lm, []), ids_prompts, s, 4 * len(ids_prompts), 4)
    assert sum(rows) == len(ids_prompts)


def test_samples_must_be_positive(lm):
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="samples"):
            list(Decoder(lm, []).run([[1, 2]], SamplingConfig(), samples=bad))
    with pytest.raises(ValueError, match="keys"):
        list(Decoder(lm, []).run([[1, 2]], SamplingConfig(), keys=[1, 2]))


def test_sample_key_is_stable():
    """The key of sample j is a fixed function of (key, j): files made on another machine, another
    version or another number of ranks draw the same streams."""
    assert sample_key(0, 0) != sample_key(0, 1) != sample_key(1, 0)
    assert sample_key(-1, 3) == sample_key(2**64 - 1, 3)
    assert 0 <= sample_key(12345, 2) < 2**64
    assert sample_key(12345, 2) == 14541357495683251765  # blake2b-64 of the two little-endian u64s


def test_engine_support_checks(lm):
    assert supports_fast_decoding(lm) is None
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
    assert "gpt2" in supports_fast_decoding(gpt2)
    assert Decoder(gpt2, [1]).engine == "hf"
    with pytest.raises(ValueError, match="does not support"):
        Decoder(gpt2, [1], engine="dppo")
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0)


# -- files, settings, resume --------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok_dir: Path, vocab: int, pairs_rows) -> Path:
    """A tiny model that ends some of its turns with <|im_end|>, saved with the test tokenizer."""
    model = tm.causal_lm(vocab, seed=3)
    rows = [PromptRow(r["prompt_id"], r["prompt"], (("user", r["prompt"]),)) for r in pairs_rows[:8]]
    end = engine.Tokenizer(str(tok_dir)).encode("<|im_end|>")[0]
    tm.make_it_stop(model, end, tm.frequent_token(model, render_prompts(rows, tok_dir)))
    return tm.save(model, tmp_path_factory.mktemp("lm") / "model", tok_dir)


def test_stop_ids_come_from_the_tokenizer_and_model(tok_dir, model_dir):
    enc = engine.Tokenizer(str(tok_dir))
    want = {enc.encode("<|im_end|>")[0], enc.encode("<|endoftext|>")[0]}
    assert set(stop_token_ids(tok_dir)) == want
    cfg = json.loads((model_dir / "generation_config.json").read_text()) if (model_dir / "generation_config.json").exists() else {}
    assert set(stop_token_ids(tok_dir, model_dir)) >= want | ({cfg["eos_token_id"]} if isinstance(cfg.get("eos_token_id"), int) else set())


def test_prompts_render_exactly_as_prep(tmp_path, tok_dir, pairs_file, pairs_rows):
    rows, info = load_prompts(str(pairs_file))
    assert [r.prompt_id for r in rows] == [r["prompt_id"] for r in pairs_rows]
    assert info["rows_in"] == len(pairs_rows) and info["skipped"] == 0
    prepare(PrepConfig("prefs", str(pairs_file), str(tok_dir), tmp_path / "s", max_len=100_000), show_progress=False)
    shards = open_shards(tmp_path / "s")
    ids = dict(zip([r.prompt_id for r in rows], render_prompts(rows, tok_dir), strict=True))
    for i in range(len(shards)):
        ex = shards[i]
        assert ids[ex["prompt_id"]] == ex["prompt_ids"].tolist()
    # a system message leads the prompt as in prep; duplicates and bad rows are counted
    sys_row = {"prompt_id": "s", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]}
    src = write_jsonl(tmp_path / "mixed.jsonl", [sys_row, sys_row, {"prompt": "plain text"}, {"messages": []}, "not json"])
    rows, info = load_prompts(str(src))
    assert [r.messages for r in rows] == [(("system", "Be brief."), ("user", "Hi?")), (("user", "plain text"),)]
    assert rows[1].prompt_id == synthetic.prompt_id("plain text")
    assert info["duplicates"] == 1 and info["skipped"] == 2
    assert load_prompts(str(pairs_file), limit=5)[0] == load_prompts(str(pairs_file))[0][:5]


def test_generate_writes_parquet_and_jsonl(tmp_path, model_dir, pairs_file, tok_dir):
    common = dict(model=str(model_dir), data=str(pairs_file), max_new_tokens=16, batch_size=8, limit=30)
    s = generate(GenConfig.from_options(out=tmp_path / "y.parquet", **common), show_progress=False)
    assert s["generated"] == 30 and s["rows"] == 30 and s["already_done"] == 0
    rows = read_generations(tmp_path / "y.parquet")
    assert tuple(rows[0]) == OUTPUT_COLUMNS
    assert {r["finish_reason"] for r in rows} == {"stop", "length"}
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    prompts, _ = load_prompts(str(pairs_file), limit=30)
    assert [r["prompt_id"] for r in rows] == [p.prompt_id for p in prompts]  # source order
    ids = render_prompts(prompts, tok_dir)
    for r, p, pid in zip(rows, prompts, ids, strict=True):
        assert r["prompt"] == p.prompt and r["prompt_tokens"] == len(pid)
        assert r["response_tokens"] <= 16 and (r["response_tokens"] == 16) == (r["finish_reason"] == "length")
        assert "<|im_end|>" not in r["response"]
    # the responses are the model's greedy continuation, decoded
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    stop = stop_token_ids(tok_dir, model_dir)
    for r, pid in list(zip(rows, ids, strict=True))[:6]:
        toks, why = hf_greedy(lm, pid, 16, stop)
        assert (tok.decode(toks, skip_special_tokens=False), why) == (r["response"], r["finish_reason"])
    meta = json.loads((tmp_path / "y.parquet.meta.json").read_text())
    assert meta["settings"]["max_new_tokens"] == 16 and meta["rows"] == 30
    assert not (tmp_path / "y.parquet.parts").exists()

    generate(GenConfig.from_options(out=tmp_path / "y.jsonl", **common), show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / "y.jsonl").read_text().splitlines()]
    assert lines == rows


def test_run_folder_and_settings_guard(tmp_path, model_dir, pairs_file):
    run_dir = tmp_path / "run"
    (run_dir / "model").mkdir(parents=True)
    for f in model_dir.iterdir():
        (run_dir / "model" / f.name).write_bytes(f.read_bytes())
    opts = dict(model=str(run_dir), data=str(pairs_file), out=tmp_path / "y.parquet", max_new_tokens=4, limit=4)
    cfg = GenConfig.from_options(**opts)
    generate(cfg, show_progress=False)
    with pytest.raises(ConfigError, match=r"max_new_tokens 4 -> 5.*--overwrite"):
        generate(GenConfig.from_options(**{**opts, "max_new_tokens": 5}), show_progress=False)
    s = generate(GenConfig.from_options(**{**opts, "max_new_tokens": 5, "overwrite": True}), show_progress=False)
    assert s["generated"] == 4
    with pytest.raises(ConfigError, match="neither a run folder"):
        generate(GenConfig.from_options(**{**opts, "model": str(tmp_path)}), show_progress=False)
    with pytest.raises(ConfigError, match=r"\.parquet or \.jsonl"):
        generate(GenConfig.from_options(**{**opts, "out": tmp_path / "y.csv"}), show_progress=False)


def test_resume_after_a_crash_loses_only_the_batch_in_flight(tmp_path, model_dir, pairs_file, monkeypatch):
    common = dict(model=str(model_dir), data=str(pairs_file), max_new_tokens=12, batch_size=4, limit=22)
    full = generate(GenConfig.from_options(out=tmp_path / "full.parquet", **common), show_progress=False)
    assert full["generated"] == 22

    real_run = Decoder.run

    def crashing_run(self, *args, **kwargs):
        for k, batch in enumerate(real_run(self, *args, **kwargs)):
            if k == 3:
                raise RuntimeError("power cut")  # the fourth batch is in flight
            yield batch

    monkeypatch.setattr(Decoder, "run", crashing_run)
    out = tmp_path / "y.parquet"
    with pytest.raises(RuntimeError, match="power cut"):
        generate(GenConfig.from_options(out=out, **common), show_progress=False)
    assert not out.exists()
    parts = sorted((tmp_path / "y.parquet.parts").glob("part-*.parquet"))
    assert len(parts) == 3
    monkeypatch.setattr(Decoder, "run", real_run)

    s = generate(GenConfig.from_options(out=out, **common), show_progress=False)
    assert s["already_done"] == 12 and s["generated"] == 10
    assert read_generations(out) == read_generations(tmp_path / "full.parquet")
    # a larger limit only generates the new prompts; the file keeps source order
    s = generate(GenConfig.from_options(out=out, **{**common, "limit": 26}), show_progress=False)
    assert s["already_done"] == 22 and s["generated"] == 4
    prompts, _ = load_prompts(str(pairs_file), limit=26)
    assert [r["prompt_id"] for r in read_generations(out)] == [p.prompt_id for p in prompts]


def test_a_killed_generation_resumes_from_its_parts(tmp_path, model_dir, pairs_file):
    import signal

    out = tmp_path / "y.parquet"
    args = ["generate", "--model", str(model_dir), "--data", str(pairs_file), "--limit", "10", "--batch-size", "3",
            "--max-new-tokens", "6"]
    # the second batch's part is on disk, then SIGKILL
    killed = run_cli([*args, "--out", str(out)], dies_after("dppo.generate.run:_write_table", 2))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists() and len(list((tmp_path / "y.parquet.parts").glob("part-*.parquet"))) == 2
    common = dict(model=str(model_dir), data=str(pairs_file), limit=10, batch_size=3, max_new_tokens=6)
    s = generate(GenConfig.from_options(out=out, **common), show_progress=False)
    assert s["already_done"] == 6 and s["generated"] == 4 and s["merged"] and not (tmp_path / "y.parquet.parts").exists()
    whole = generate(GenConfig.from_options(out=tmp_path / "whole.parquet", **common), show_progress=False)
    assert whole["generated"] == 10 and read_generations(out) == read_generations(tmp_path / "whole.parquet")


def test_generate_then_prep_round_trip(tmp_path, model_dir, pairs_file, pairs_rows, tok_dir, hf_tokenizer):
    ygen = tmp_path / "ygen.parquet"
    generate(GenConfig.from_options(model=str(model_dir), data=str(pairs_file), out=ygen, max_new_tokens=20), show_progress=False)
    prepare(PrepConfig("prefs", str(pairs_file), str(tok_dir), tmp_path / "s", ygen=ygen, max_len=100_000), show_progress=False)
    shards = open_shards(tmp_path / "s")
    assert shards.has_ygen and len(shards) == len(pairs_rows)
    by_id = {r["prompt_id"]: r for r in read_generations(ygen)}
    end = hf_tokenizer.encode("<|im_end|>\n", add_special_tokens=False)  # the template's end of turn
    assert shards.meta["counts"]["ygen"]["from_ids"] == len(shards)
    retokenized = 0
    for i in range(len(shards)):
        ex = shards[i]
        g = by_id[ex["prompt_id"]]
        # y_gen is what the model generated (the penalised sequence is the reference's own argmax),
        # then the template's end-of-turn tokens; never the ids of its decoded text
        assert ex["ygen_ids"].tolist() == g["response_ids"] + end
        assert g["response_ids"] == list(map(int, g["response_ids"])) and len(g["response_ids"]) == g["response_tokens"]
        assert len(ex["prompt_ids"]) == g["prompt_tokens"]
        retokenized += hf_tokenizer(g["response"], add_special_tokens=False)["input_ids"] != g["response_ids"]
    # a random model emits non-canonical splits: re-tokenizing its text would change the ids
    assert retokenized > 0


def test_generate_from_prepared_shards(tmp_path, model_dir, pairs_file, tok_dir):
    prepare(PrepConfig("prefs", str(pairs_file), str(tok_dir), tmp_path / "s", max_len=100_000), show_progress=False)
    out = tmp_path / "y.parquet"
    generate(GenConfig.from_options(model=str(model_dir), data=str(tmp_path / "s"), out=out, max_new_tokens=4, limit=6), show_progress=False)
    rows = read_generations(out)
    shards = open_shards(tmp_path / "s")
    assert [r["prompt_id"] for r in rows] == [shards[i]["prompt_id"] for i in range(6)]
    assert [r["prompt_tokens"] for r in rows] == [len(shards[i]["prompt_ids"]) for i in range(6)]
    assert rows[0]["prompt"].startswith("<|im_start|>")
    # resuming from shards keys on prompt_id alone
    assert generate(GenConfig.from_options(model=str(model_dir), data=str(tmp_path / "s"), out=out, max_new_tokens=4, limit=6), show_progress=False)["generated"] == 0


def test_cli_generate(tmp_path, model_dir, pairs_file):
    import typer
    from dppo.cli.generate_eval import generate_cmd
    from dppo.cli.main import user_errors
    from typer.testing import CliRunner

    app = typer.Typer()
    app.command("generate")(user_errors(generate_cmd))
    app.command("other")(lambda: None)
    runner = CliRunner()
    out = tmp_path / "y.jsonl"
    res = runner.invoke(app, ["generate", "--model", str(model_dir), "--data", str(pairs_file), "--out", str(out), "--limit", "3", "--max-new-tokens", "3"])
    assert res.exit_code == 0, res.output
    assert len(out.read_text().splitlines()) == 3
    res = runner.invoke(app, ["generate", "--model", str(model_dir), "--data", str(pairs_file), "--out", str(out), "--limit", "3", "--max-new-tokens", "4"])
    assert res.exit_code == 1 and "--overwrite" in res.output
    res = runner.invoke(app, ["generate", "--model", str(model_dir), "--data", str(pairs_file), "--out", str(out), "--temperature", "-1"])
    assert res.exit_code == 2


def test_completion_is_plain_data():
    c = Completion(3, [1, 2], "stop")
    assert (c.index, c.token_ids, c.finish_reason) == (3, [1, 2], "stop")


def test_long_prompts_are_shortened_as_prep_does(tmp_path, tok_dir, hf_tokenizer):
    """--max-prompt-len keeps the template: the prompt still ends with the generation header."""
    from dppo.generate import PromptRow, render_prompts

    long = "data model answers " * 80
    rows = [PromptRow("a", long, (("user", long),)), PromptRow("b", "hi", (("user", "hi"),))]
    ids = render_prompts(rows, tok_dir, max_prompt_len=40)
    header = hf_tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    full = hf_tokenizer.apply_chat_template([{"role": "user", "content": long}], tokenize=True, add_generation_prompt=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    assert len(ids[0]) == 40 and ids[0][-len(header):] == header
    assert ids[0][: 40 - len(header)] == full[: 40 - len(header)]
    assert ids[1] == list(render_prompts(rows[1:], tok_dir)[0])
