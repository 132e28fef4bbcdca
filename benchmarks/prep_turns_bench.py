"""Whole-conversation SFT prep speed: `dppo prep sft --turns all` against `datasets.map` +
`apply_chat_template(..., return_assistant_tokens_mask=True)`, the way transformers and TRL
(`assistant_only_loss`) label every assistant turn.

Data: N rows (default 50,000) in SmolTalk's schema (``messages``), each a conversation of 3 or 4
exchanges (a system turn in a third of them) whose texts are slices of English prose available
offline (``dppo.synthetic.english_corpus``), with lognormal lengths (medians ~40 user / ~120
assistant tokens), written as parquet in row groups of 1,000 rows. Tokenizer: a byte-level BPE with
the Qwen2 split pattern and a ChatML template (``dppo.synthetic.make_tokenizer``); the anchor's copy
carries the same template with ``{% generation %}`` tags around each assistant turn (what
``return_assistant_tokens_mask`` needs), which renders the same text. Corpus, tokenizer and data are
cached under ``--work``.

Ways, each in its own subprocess (peak memory is per way), all in one run:

* ``a``      ``dppo prep sft --turns all --max-len 100000`` (nothing truncated, so ids compare);
* ``a_half`` the same on the first N/2 rows: peak memory must not grow with rows;
* ``b``      ``datasets.Dataset.from_parquet`` + ``.map(num_proc=2)`` with ``AutoTokenizer``'s
             ``apply_chat_template(messages, tokenize=True, return_dict=True,
             return_assistant_tokens_mask=True)``, then ``save_to_disk`` (fresh cache).

After timing, ``a``'s shards are checked against ``b``'s output on every row: the same
``input_ids``, and label positions equal to the assistant mask.

    python benchmarks/prep_turns_bench.py [--rows 50000] [--work bench-out/turns_work] [--skip b]

Prints a table and writes ``bench-out/prep_turns_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prep_bench import dppo_cli, run_measured  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PLAIN = ("{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}<|im_end|>\n"
         "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TAGGED = PLAIN.replace("{{ m.content }}<|im_end|>\n{% else %}",
                       "{% generation %}{{ m.content }}<|im_end|>\n{% endgeneration %}{% else %}")

ANCHOR = r'''
import json, sys, time
from pathlib import Path
import datasets
from transformers import AutoTokenizer
data, tok_dir, out = sys.argv[1:4]
datasets.disable_progress_bars()
tok = AutoTokenizer.from_pretrained(tok_dir)
def one(row):
    enc = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return {"input_ids": enc["input_ids"], "assistant_masks": enc["assistant_masks"]}
t0 = time.perf_counter()
ds = datasets.Dataset.from_parquet(data)
ds = ds.map(one, num_proc=2, remove_columns=ds.column_names)
ds.save_to_disk(out)
print("##TIMED_DONE", flush=True)
print("##RESULT " + json.dumps({"timed_s": time.perf_counter() - t0, "rows": len(ds)}), flush=True)
'''


def build(work: Path, rows: int, seed: int) -> tuple[Path, Path, Path]:
    from dppo.synthetic import english_corpus, make_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    corpus_path = work / "corpus.json"
    if not corpus_path.is_file():
        corpus_path.write_text(json.dumps(english_corpus(8_000_000)))
    texts = json.loads(corpus_path.read_text())
    tok = work / "tok"
    if not (tok / "tokenizer.json").is_file():
        make_tokenizer(tok, texts, vocab_size=16000, template=PLAIN)
    tagged = work / "tok-tagged"
    if not (tagged / "tokenizer.json").is_file():
        shutil.copytree(tok, tagged, dirs_exist_ok=True)
        cfg = json.loads((tagged / "tokenizer_config.json").read_text())
        cfg["chat_template"] = TAGGED
        (tagged / "tokenizer_config.json").write_text(json.dumps(cfg))
        (tagged / "chat_template.jinja").unlink(missing_ok=True)
    data = work / f"smoltalk-{rows}.parquet"
    if not data.is_file():
        import pyarrow as pa
        import pyarrow.parquet as pq

        rng = random.Random(seed)
        words = " ".join(texts).split()

        def text(median: float) -> str:
            n = max(3, int(rng.lognormvariate(0, 0.6) * median * 0.75))  # ~0.75 words a token
            at = rng.randrange(0, len(words) - n)
            return " ".join(words[at: at + n])

        out = []
        for _ in range(rows):
            msgs = [{"role": "system", "content": text(15)}] if rng.random() < 1 / 3 else []
            for _ in range(rng.choice((3, 4))):
                msgs += [{"role": "user", "content": text(40)}, {"role": "assistant", "content": text(120)}]
            out.append({"messages": msgs})
        pq.write_table(pa.Table.from_pylist(out), data, row_group_size=1000)
    return data, tok, tagged


def head(data: Path, n: int) -> Path:
    import pyarrow.parquet as pq

    out = data.with_name(data.stem + f"-head{n}.parquet")
    if not out.is_file():
        pq.write_table(pq.read_table(data).slice(0, n), out, row_group_size=1000)
    return out


def check(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    import datasets
    import numpy as np

    from dppo.data import open_shards

    shards = open_shards(a_dir)
    ref = datasets.load_from_disk(str(b_dir))
    assert len(shards) == len(ref), (len(shards), len(ref))
    ids_equal = labels_equal = 0
    for i in range(len(shards)):
        ex, want = shards[i], ref[i]
        ids_equal += ex["input_ids"].tolist() == want["input_ids"]
        labels_equal += ((ex["labels"] != -100) == np.asarray(want["assistant_masks"], dtype=bool)).all()
    return {"rows": len(shards), "ids_equal": int(ids_equal), "labels_equal": int(labels_equal)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--work", type=Path, default=ROOT / "bench-out" / "turns_work")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip", default="", help="comma-separated ways to skip (a_half, b)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    data, tok, tagged = build(args.work, args.rows, args.seed)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true"}
    res: dict[str, Any] = {"rows": args.rows, "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}
    with open("/proc/cpuinfo") as f:
        res["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    common = ["--tokenizer", str(tok), "--turns", "all", "--max-len", "100000", "--overwrite"]
    res["a"] = run_measured([*dppo_cli(), "prep", "sft", "--data", str(data), "--out", str(args.work / "a"), *common],
                            args.work / "a.log", env)
    if "a_half" not in skip:
        res["a_half"] = run_measured([*dppo_cli(), "prep", "sft", "--data", str(head(data, args.rows // 2)),
                                      "--out", str(args.work / "a_half"), *common], args.work / "a_half.log", env)
    if "b" not in skip:
        b_out = args.work / "b"
        shutil.rmtree(b_out, ignore_errors=True)
        cache = args.work / "hf-cache"
        shutil.rmtree(cache, ignore_errors=True)
        res["b"] = run_measured([sys.executable, "-c", ANCHOR, str(data), str(tagged), str(b_out)], args.work / "b.log",
                                {**env, "HF_DATASETS_CACHE": str(cache)})
        res["check"] = check(args.work / "a", b_out)
        res["speedup_wall"] = res["b"]["wall_s"] / res["a"]["wall_s"]
        res["speedup_cpu"] = res["b"]["cpu_s"] / res["a"]["cpu_s"]
    print(f"{res['rows']:,} SmolTalk-shaped rows (3-4 exchanges), {res['cpu']} ({res['machine']})")
    for way in ("a", "a_half", "b"):
        if way in res:
            r = res[way]
            print(f"  {way:7s} wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  peak rss {r['tree_peak_rss_mib']:7.0f} MiB"
                  f" (maxrss {r['ru_maxrss_mib']:.0f})")
    if "speedup_wall" in res:
        print(f"  speed-up: {res['speedup_wall']:.1f}x wall, {res['speedup_cpu']:.1f}x CPU seconds; check {res['check']}")
    out = ROOT / "bench-out" / "prep_turns_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
