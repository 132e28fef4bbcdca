"""Data-prep speed: `dppo prep prefs` against the Python pipeline a user would write.

Data: N rows (default 50,000) in the UltraFeedback-binarized schema (``prompt``, ``prompt_id``,
``chosen`` / ``rejected`` / ``messages`` as [user, assistant] lists, ``score_chosen``,
``score_rejected``) whose texts are slices of English-like prose made offline from a seed
(``dppo.synthetic.english_corpus``, 0.7M characters), with UltraFeedback-like lognormal
token lengths (medians ~100 prompt / ~300 chosen / ~250 rejected tokens, long tail), written as
parquet in row groups of 1,000 rows. Tokenizer: a byte-level BPE of 32k tokens with the Qwen2
split pattern and a Qwen-style ChatML template (``dppo.synthetic.make_tokenizer``). Corpus,
tokenizer and parquet are cached under ``--work`` so that re-runs skip generation.

Ways, each in its own subprocess (peak RSS is per way):

* ``a``      ``dppo prep prefs --data X --tokenizer TOK --out DIR --overwrite`` (default
             ``--max-len auto``, what users run): the headline figure;
* ``a_full`` the same with ``--max-len 100000`` (nothing truncated): its ids are checked;
* ``a_half`` the same as ``a`` on the first N/2 rows: peak memory must not grow with rows;
* ``b``      ``datasets.Dataset.from_parquet`` + ``.map(batched=True, num_proc=2)`` with
             ``transformers`` ``AutoTokenizer.apply_chat_template(..., tokenize=True)`` of the
             prompt (with the generation prompt), prompt+chosen and prompt+rejected, then
             ``save_to_disk`` (fresh datasets cache, so nothing is reused between runs);
* ``c``      the same three rendered texts per row (rendered beforehand by ``transformers``,
             not timed) through ``tokenizers.Tokenizer.encode_batch(..., add_special_tokens=False)``
             alone (only the encoding is timed), in chunks of 8,192 texts.

After timing, the ``c`` subprocess checks ``a_full``'s shards (``dppo.data.open_shards``) row by
row against its ids: prompt_ids == ids(prompt text), prompt_ids + chosen_ids == ids(prompt+chosen
text), prompt_ids + rejected_ids == ids(prompt+rejected text); a mismatch is allowed only on an
example flagged boundary re-split (``FLAG_BOUNDARY_RESPLIT``), and those are counted. It also
checks ``b``'s saved ids against the same ids.

Throughput is given in rows/s and in "sequence tokens"/s, where sequence tokens are
len(ids(prompt)) + len(ids(prompt+chosen)) + len(ids(prompt+rejected)) summed over the rows:
the same output for every way (``a`` stores the prompt once, i.e. fewer tokens).

Peak memory: ``ru_maxrss`` of the way's process (``os.wait4``; the largest of the process and
the children it reaped) and the peak of the summed RSS / PSS of its whole process tree, sampled
every 0.1 s (``b`` runs two worker processes).

    python benchmarks/prep_bench.py [--rows 50000] [--work bench-out/prep_work] [--skip b,c]

Prints a table and writes ``bench-out/prep_bench.json``. Needs a release build of the native
module (``cargo build --release -p dppo-py && cp target/release/lib_native.so
python/dppo/_native.abi3.so``); a debug build is reported and warned about.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GEN_VERSION = 1  # bump when the generated data changes
ALL_WAYS = ("a", "a_full", "a_half", "b", "c")

# Token-length model (lognormal, in tokens of the text itself, before the chat template).
LENGTHS = {  # name: (median, sigma, cap)
    "prompt": (100.0, 1.15, 8192),
    "chosen": (300.0, 0.85, 8192),
    "rejected": (250.0, 0.90, 8192),
}
LEADING_NEWLINE = (
    0.01  # share of responses that start with a newline (boundary re-split cases)
)
ROW_GROUP = 1000


# ----------------------------------------------------------------------------------------------
# data and tokenizer (cached)
# ----------------------------------------------------------------------------------------------
def corpus(work: Path) -> list[str]:
    path = work / "corpus.json"
    if path.is_file():
        return json.loads(path.read_text())
    print("  making the English-like corpus (seeded; once) ...", flush=True)
    from dppo.synthetic import english_corpus

    texts = english_corpus(700_000)
    path.write_text(json.dumps(texts))
    return texts


def tokenizer_dir(work: Path, texts: list[str]) -> Path:
    out = work / "tok-bpe32k-qwen2"
    if (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file():
        return out
    print("  training the 32k byte-level BPE (once) ...", flush=True)
    from dppo.synthetic import make_tokenizer

    tmp = work / "tok.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    make_tokenizer(tmp, texts, vocab_size=32000)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _chars_per_token(tok: Path, texts: list[str]) -> float:
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(tok / "tokenizer.json"))
    sample = texts[::3]
    n = sum(len(e.ids) for e in t.encode_batch(sample, add_special_tokens=False))
    return sum(map(len, sample)) / n


def generate(work: Path, rows: int, seed: int, texts: list[str], tok: Path) -> Path:
    """N rows in the UltraFeedback-binarized schema; cached by (rows, seed, GEN_VERSION)."""
    path = work / f"ufb-{rows}-s{seed}-v{GEN_VERSION}.parquet"
    if path.is_file():
        return path
    import pyarrow as pa
    import pyarrow.parquet as pq

    print(f"  generating {rows:,} rows (once) ...", flush=True)
    cpt = _chars_per_token(tok, texts)
    big = "\n\n".join(t.strip() for t in texts)
    starts = np.array(
        [0]
        + [
            i + 1
            for i, ch in enumerate(big)
            if ch.isspace() and i + 1 < len(big) and not big[i + 1].isspace()
        ],
        dtype=np.int64,
    )
    wrap = big + "\n\n" + big
    rng = np.random.default_rng(seed)

    def text(kind: str) -> str:
        median, sigma, cap = LENGTHS[kind]
        n_tok = int(np.clip(rng.lognormal(np.log(median), sigma), 3, cap))
        s = int(starts[rng.integers(len(starts))])
        e = s + max(8, int(n_tok * cpt))
        while e < len(wrap) and not wrap[e].isspace():  # end on a word boundary
            e += 1
        return wrap[s:e].rstrip()

    seen: set[str] = set()
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "prompt",
            "prompt_id",
            "chosen",
            "rejected",
            "messages",
            "score_chosen",
            "score_rejected",
        )
    }
    for _ in range(rows):
        while True:
            prompt = text("prompt")
            pid = hashlib.sha256(prompt.encode("utf-8")).hexdigest()
            if pid not in seen:
                seen.add(pid)
                break
        chosen, rejected = text("chosen"), text("rejected")
        if rng.random() < LEADING_NEWLINE:
            chosen = "\n" + chosen
        if rng.random() < LEADING_NEWLINE:
            rejected = "\n" + rejected
        sc = float(rng.choice([6.0, 7.0, 7.5, 8.0, 8.5, 9.0, 10.0]))
        sr = float(rng.choice([1.0, 2.0, 3.0, 4.0, 5.0, 5.5, 6.0]))
        user = {"content": prompt, "role": "user"}
        cols["prompt"].append(prompt)
        cols["prompt_id"].append(pid)
        cols["chosen"].append([user, {"content": chosen, "role": "assistant"}])
        cols["rejected"].append([user, {"content": rejected, "role": "assistant"}])
        cols["messages"].append([user, {"content": chosen, "role": "assistant"}])
        cols["score_chosen"].append(sc)
        cols["score_rejected"].append(sr)
    msg = pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
    schema = pa.schema(
        [
            ("prompt", pa.string()),
            ("prompt_id", pa.string()),
            ("chosen", msg),
            ("rejected", msg),
            ("messages", msg),
            ("score_chosen", pa.float64()),
            ("score_rejected", pa.float64()),
        ]
    )
    table = pa.Table.from_pydict(cols, schema=schema)
    tmp = path.with_suffix(".partial")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP)
    tmp.rename(path)
    return path


def head_parquet(src: Path, rows: int) -> Path:
    """The first `rows` rows of `src` (cached)."""
    path = src.with_name(src.stem + f"-head{rows}.parquet")
    if path.is_file():
        return path
    import pyarrow.parquet as pq

    tmp = path.with_suffix(".partial")
    pq.write_table(pq.read_table(src).slice(0, rows), tmp, row_group_size=ROW_GROUP)
    tmp.rename(path)
    return path


# ----------------------------------------------------------------------------------------------
# the ways (run in subprocesses)
# ----------------------------------------------------------------------------------------------
def _emit(obj: dict[str, Any]) -> None:
    print("##RESULT " + json.dumps(obj), flush=True)


def _cpu(children: bool = False) -> float:
    """User + system CPU seconds of this process (all threads), plus reaped children if asked."""
    t = os.times()
    return (
        t.user + t.system + ((t.children_user + t.children_system) if children else 0.0)
    )


def _self_peak_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_b(args: dict[str, Any]) -> None:
    t_import = time.perf_counter()
    import datasets
    import transformers

    t0, c0 = time.perf_counter(), _cpu(True)
    tok = transformers.AutoTokenizer.from_pretrained(args["tok"])

    def ids(enc: Any) -> Any:
        return enc["input_ids"] if hasattr(enc, "keys") else enc

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        prompts = [[{"role": "user", "content": p}] for p in batch["prompt"]]
        return {
            "prompt_ids": ids(
                tok.apply_chat_template(
                    prompts, tokenize=True, add_generation_prompt=True
                )
            ),
            "chosen_ids": ids(tok.apply_chat_template(batch["chosen"], tokenize=True)),
            "rejected_ids": ids(
                tok.apply_chat_template(batch["rejected"], tokenize=True)
            ),
        }

    ds = datasets.Dataset.from_parquet(args["data"], cache_dir=args["cache"])
    t1 = time.perf_counter()
    ds = ds.map(
        tokenize,
        batched=True,
        num_proc=args["num_proc"],
        remove_columns=ds.column_names,
    )
    t2 = time.perf_counter()
    ds.save_to_disk(args["out"])
    t3 = time.perf_counter()
    cpu = _cpu(True) - c0
    print("##TIMED_DONE", flush=True)
    _emit(
        {
            "seconds": t3 - t0,
            "cpu_s": cpu,
            "phases": {
                "import": t0 - t_import,
                "load_tokenizer+from_parquet": t1 - t0,
                "map": t2 - t1,
                "save_to_disk": t3 - t2,
            },
            "self_peak_mib": _self_peak_mib(),
            "versions": {
                "datasets": datasets.__version__,
                "transformers": transformers.__version__,
            },
        }
    )


def _render(tok_dir: str, data: str) -> tuple[list[str], int]:
    """[prompt_0, prompt+chosen_0, prompt+rejected_0, prompt_1, ...] rendered by transformers."""
    import pyarrow.parquet as pq
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    t = pq.read_table(data, columns=["prompt", "chosen", "rejected"]).to_pydict()
    n = len(t["prompt"])
    p = tok.apply_chat_template(
        [[{"role": "user", "content": x}] for x in t["prompt"]],
        tokenize=False,
        add_generation_prompt=True,
    )
    c = tok.apply_chat_template(t["chosen"], tokenize=False)
    r = tok.apply_chat_template(t["rejected"], tokenize=False)
    texts = [s for triple in zip(p, c, r) for s in triple]
    return texts, n


def child_c(args: dict[str, Any]) -> None:
    import tokenizers
    from tokenizers import Tokenizer

    t_r = time.perf_counter()
    texts, n = _render(args["tok"], args["data"])
    render_s = time.perf_counter() - t_r
    tok = Tokenizer.from_file(str(Path(args["tok"]) / "tokenizer.json"))
    chunk = args["chunk"]
    lens = np.zeros(len(texts), dtype=np.int64)
    parts: list[np.ndarray] = []
    enc_s = enc_cpu = 0.0
    for i in range(0, len(texts), chunk):
        batch = texts[i : i + chunk]
        t0, c0 = time.perf_counter(), _cpu()
        encs = tok.encode_batch(batch, add_special_tokens=False)
        enc_s += time.perf_counter() - t0
        enc_cpu += _cpu() - c0
        ids = [e.ids for e in encs]
        del encs
        lens[i : i + len(batch)] = [len(x) for x in ids]
        parts.append(
            np.fromiter(
                (t for x in ids for t in x),
                dtype=np.uint32,
                count=int(lens[i : i + len(batch)].sum()),
            )
        )
    peak = _self_peak_mib()
    print("##TIMED_DONE", flush=True)
    del texts
    flat = np.concatenate(parts)
    del parts
    offs = np.zeros(len(lens) + 1, dtype=np.int64)
    np.cumsum(lens, out=offs[1:])
    result: dict[str, Any] = {
        "seconds": enc_s,
        "cpu_s": enc_cpu,
        "phases": {"render (not timed)": render_s, "encode_batch": enc_s},
        "self_peak_mib": peak,
        "sequence_tokens": int(lens.sum()),
        "texts": len(lens),
        "versions": {"tokenizers": tokenizers.__version__},
        "chunk": chunk,
    }

    def ref(row: int, k: int) -> np.ndarray:
        j = 3 * row + k
        return flat[offs[j] : offs[j + 1]]

    if args.get("check_a"):
        result["check_a"] = check_a(args["check_a"], n, ref)
    if args.get("check_b"):
        result["check_b"] = check_b(args["check_b"], n, ref)
    _emit(result)


def check_a(out_dir: str, n: int, ref: Any) -> dict[str, Any]:
    from dppo.data import FLAG_BOUNDARY_RESPLIT, open_shards

    t0 = time.perf_counter()
    shards = open_shards(out_dir)
    seen = np.zeros(n, dtype=bool)
    bad: list[dict[str, Any]] = []
    flagged = flagged_needed = flagged_unneeded = 0
    prompt_ok = full_ok = 0
    lens = {"prompt": [], "chosen": [], "rejected": []}
    g = 0
    for shard in shards._shards:  # per-example flags are not exposed by Shards
        flags = shard.arrays["ex_flags"]
        for j in range(shard.n_examples):
            ex = shards[g]
            g += 1
            row = int(ex["source_row"])
            seen[row] = True
            p, c, r = ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]
            lens["prompt"].append(len(p))
            lens["chosen"].append(len(c))
            lens["rejected"].append(len(r))
            resplit = bool(int(flags[j]) & FLAG_BOUNDARY_RESPLIT)
            flagged += resplit
            if np.array_equal(p, ref(row, 0)):
                prompt_ok += 1
            else:
                bad.append({"row": row, "what": "prompt"})
            mism = [
                name
                for k, (name, resp) in enumerate((("chosen", c), ("rejected", r)))
                if not np.array_equal(np.concatenate([p, resp]), ref(row, k + 1))
            ]
            if not mism:
                full_ok += 1
                flagged_unneeded += resplit
            elif resplit:
                flagged_needed += 1
            else:
                bad.append({"row": row, "what": "+".join(mism)})
    lens_np = {k: np.asarray(v) for k, v in lens.items()}
    return {
        "examples": g,
        "rows_missing": int((~seen).sum()),
        "prompt_identical": prompt_ok,
        "full_identical": full_ok,
        "boundary_resplit_flagged": flagged,
        "boundary_resplit_differs": flagged_needed,
        "boundary_resplit_flagged_but_identical": flagged_unneeded,
        "mismatches_unflagged": len(bad),
        "mismatch_examples": bad[:10],
        "identical": not bad and g == n and not (~seen).any(),
        "lengths": {
            k: {
                "median": float(np.median(v)),
                "mean": float(v.mean()),
                "p95": float(np.percentile(v, 95)),
                "max": int(v.max()),
            }
            for k, v in lens_np.items()
        },
        "seconds": time.perf_counter() - t0,
    }


def check_b(out_dir: str, n: int, ref: Any) -> dict[str, Any]:
    import datasets

    ds = datasets.load_from_disk(out_dir)
    table = ds.data.table
    bad = 0
    for k, col in enumerate(("prompt_ids", "chosen_ids", "rejected_ids")):
        arr = table.column(col).combine_chunks()
        offs = arr.offsets.to_numpy()
        vals = arr.values.to_numpy()
        for row in range(n):
            if not np.array_equal(vals[offs[row] : offs[row + 1]], ref(row, k)):
                bad += 1
    return {"rows": len(ds), "mismatches": bad, "identical": bad == 0 and len(ds) == n}


# ----------------------------------------------------------------------------------------------
# running a subprocess and measuring it
# ----------------------------------------------------------------------------------------------
def _tree(root: int) -> list[int]:
    parent: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError):
            continue
        parent.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parent.get(p, []))
    return out


def _kib(path: str, field: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Sampler(threading.Thread):
    """Peak of the summed RSS and PSS of a process tree, sampled every `interval` s."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.max_procs = 0
        self.frozen: tuple[int, int] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = _tree(self.pid)[1:]  # without the launcher
            rss = sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids)
            pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids)
            self.peak_rss, self.peak_pss = (
                max(self.peak_rss, rss),
                max(self.peak_pss, pss),
            )
            self.max_procs = max(self.max_procs, len(pids))
            self.stop.wait(self.interval)

    def freeze(self) -> None:
        if self.frozen is None:
            self.frozen = (self.peak_rss, self.peak_pss)


# A tiny launcher between this process and the measured one. On Linux a process's ru_maxrss starts
# at the high-water RSS of the address space it was exec'ed from (exec keeps signal->maxrss), so a
# child spawned straight from this (large) process would report at least this process's peak.
# The launcher (`python -S`, a few MiB) spawns the command, waits for it with wait4 and writes
# its rusage to a file.
LAUNCHER = """
import json, os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss_kib": ru.ru_maxrss, "utime": ru.ru_utime, "stime": ru.ru_stime}, f)
sys.exit(os.waitstatus_to_exitcode(status) & 255)
"""


def run_measured(
    cmd: list[str], log: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run `cmd`; wall time, ru_maxrss (wait4), sampled tree RSS/PSS, and its ##RESULT line."""
    ru_file = log.with_suffix(".rusage.json")
    ru_file.unlink(missing_ok=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as logf:
        p = subprocess.Popen(
            [sys.executable, "-S", "-c", LAUNCHER, str(ru_file), *cmd],
            stdout=subprocess.PIPE,
            stderr=logf,
            text=True,
            env=env,
            cwd=ROOT,
        )
        sampler = Sampler(p.pid)
        sampler.start()
        result: dict[str, Any] = {}
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("##TIMED_DONE"):
                sampler.freeze()
            elif line.startswith("##RESULT "):
                result = json.loads(line[len("##RESULT ") :])
            else:
                logf.write(line)
        p.wait()
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
    if p.returncode != 0 or not ru_file.is_file():
        tail = log.read_text()[-3000:]
        raise RuntimeError(
            f"{shlex.join(cmd)} failed with exit code {p.returncode}; log {log}:\n{tail}"
        )
    ru = json.loads(ru_file.read_text())
    rss, pss = sampler.frozen or (sampler.peak_rss, sampler.peak_pss)
    return {
        "wall_s": wall,
        "ru_maxrss_mib": ru["maxrss_kib"] / 1024,
        "tree_peak_rss_mib": rss / 1024,
        "tree_peak_pss_mib": pss / 1024,
        "max_processes": sampler.max_procs,
        "user_s": ru["utime"],
        "sys_s": ru["stime"],
        "cpu_s": ru["utime"] + ru["stime"],
        "loadavg_1min_before_after": [load0, os.getloadavg()[0]],
        **result,
    }


def dppo_cli() -> list[str]:
    exe = Path(sys.executable).parent / "dppo"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("dppo")
    return [found] if found else [sys.executable, "-m", "dppo.cli.main"]


def run_a(
    name: str,
    data: Path,
    tok: Path,
    out: Path,
    work: Path,
    max_len: str | None,
    repeat: int,
) -> dict[str, Any]:
    """`repeat` runs; times are the median run's (all runs are kept), peak memory the largest."""
    cmd = [
        *dppo_cli(),
        "prep",
        "prefs",
        "--data",
        str(data),
        "--tokenizer",
        str(tok),
        "--out",
        str(out),
        "--overwrite",
    ]
    if max_len:
        cmd += ["--max-len", max_len]
    runs = []
    for _ in range(repeat):
        r = run_measured(cmd, work / f"log-{name}.txt")
        counts = json.loads((out / "meta.json").read_text())["counts"]
        r["engine"] = {
            k: counts.get(k)
            for k in (
                "seconds",
                "rows_in",
                "rows_kept",
                "boundary_resplit",
                "max_len",
                "max_prompt_len",
                "truncated",
                "tokens",
                "packed_tokens",
                "prompt_tokens_removed",
                "response_tokens_removed",
                "rows_per_s",
                "tokens_per_s",
            )
        }
        runs.append(r)
    res = dict(sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2])
    res.update(
        cmd=shlex.join(cmd),
        seconds=res["wall_s"],
        runs_wall_s=[r["wall_s"] for r in runs],
        runs_engine_s=[r["engine"]["seconds"] for r in runs],
        ru_maxrss_mib=max(r["ru_maxrss_mib"] for r in runs),
        tree_peak_rss_mib=max(r["tree_peak_rss_mib"] for r in runs),
        tree_peak_pss_mib=max(r["tree_peak_pss_mib"] for r in runs),
    )
    return res


def cli_startup(work: Path) -> dict[str, Any]:
    """`dppo prep prefs --help`: the CLI's start-up cost (interpreter + imports), included in (a)."""
    cmd = [*dppo_cli(), "prep", "prefs", "--help"]
    runs = [run_measured(cmd, work / "log-cli-startup.txt") for _ in range(3)]
    r = sorted(runs, key=lambda r: r["wall_s"])[1]
    return {
        "cmd": shlex.join(cmd),
        "wall_s": r["wall_s"],
        "cpu_s": r["cpu_s"],
        "ru_maxrss_mib": r["ru_maxrss_mib"],
        "runs_wall_s": [x["wall_s"] for x in runs],
    }


def run_py(way: str, args: dict[str, Any], work: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_child",
        way,
        "--_args",
        json.dumps(args),
    ]
    res = run_measured(cmd, work / f"log-{way}.txt")
    res["cmd"] = shlex.join(cmd)
    if (
        way == "c"
    ):  # the identity checks ran after the timed part: report the peak up to its end
        res["ru_maxrss_whole_process_mib"] = res["ru_maxrss_mib"]
        res["ru_maxrss_mib"] = res["self_peak_mib"]
    return res


# ----------------------------------------------------------------------------------------------
# environment and report
# ----------------------------------------------------------------------------------------------
def environment(tok: Path) -> dict[str, Any]:
    import dppo
    from dppo import _native

    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    so = Path(_native.__file__)
    debug = (
        so.stat().st_size > 40 << 20
    )  # heuristic: a debug build is ~100 MiB, a release build ~10 MiB
    git = {}
    with contextlib.suppress(Exception):
        git["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        git["dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        )
    t = _native.Tokenizer(str(tok))
    return {
        "cpu_model": cpu,
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dppo": getattr(dppo, "__version__", None),
        "native_module": {
            "path": str(so),
            "bytes": so.stat().st_size,
            "mtime": time.ctime(so.stat().st_mtime),
            "looks_like_debug_build": debug,
        },
        "tokenizer_backend": t.backend,
        "tokenizer_fingerprint": t.fingerprint,
        "git": git,
    }


def fmt_table(rows: list[list[str]], header: list[str]) -> str:
    w = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        return "  ".join(
            str(c).rjust(w[i]) if i else str(c).ljust(w[i]) for i, c in enumerate(r)
        )

    return "\n".join([line(header), "  ".join("-" * x for x in w), *map(line, rows)])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--work",
        type=Path,
        default=ROOT / "bench-out" / "prep_work",
        help="cache of corpus, tokenizer, data, and outputs",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "prep_bench.json")
    ap.add_argument(
        "--skip",
        default="",
        help=f"comma-separated ways to skip, of {','.join(ALL_WAYS)}",
    )
    ap.add_argument(
        "--num-proc", type=int, default=2, help="num_proc of (b)'s datasets.map"
    )
    ap.add_argument(
        "--chunk", type=int, default=8192, help="texts per encode_batch call in (c)"
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each (a) way (the median is reported)",
    )
    ap.add_argument(
        "--keep-outputs",
        action="store_true",
        help="keep the prepared folders under --work",
    )
    ap.add_argument("--_child")
    ap.add_argument("--_args")
    a = ap.parse_args()
    if a._child:
        {"b": child_b, "c": child_c}[a._child](json.loads(a._args))
        return

    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    unknown = skip - set(ALL_WAYS)
    if unknown:
        ap.error(f"unknown way(s) in --skip: {', '.join(sorted(unknown))}")
    work = a.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable, *sys.argv])
    print(f"$ {command}", flush=True)
    t_setup = time.perf_counter()
    texts = corpus(work)
    tok = tokenizer_dir(work, texts)
    data = generate(work, a.rows, a.seed, texts, tok)
    half = head_parquet(data, a.rows // 2) if "a_half" not in skip else None
    del texts
    for f in (data, half):  # warm the page cache for every way alike
        if f:
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    print(
        f"  setup {time.perf_counter() - t_setup:.1f} s; data {data} ({data.stat().st_size / 2**20:.0f} MiB)",
        flush=True,
    )
    env = environment(tok)
    if env["native_module"]["looks_like_debug_build"]:
        print(
            "  WARNING: dppo._native looks like a DEBUG build; timings of (a) are meaningless",
            flush=True,
        )

    res: dict[str, Any] = {}
    startup = cli_startup(work) if not ({"a", "a_full", "a_half"} <= skip) else None
    if startup:
        print(
            f"  CLI start-up (`dppo prep prefs --help`): {startup['wall_s']:.2f} s, peak {startup['ru_maxrss_mib']:.0f} MiB",
            flush=True,
        )
    outs = {w: work / f"out-{w}" for w in ALL_WAYS}
    for w in ("a", "a_full", "a_half"):
        if w not in skip:
            print(f"  running ({w}) ...", flush=True)
            src = half if w == "a_half" else data
            res[w] = run_a(
                w,
                src,
                tok,
                outs[w],
                work,
                "100000" if w == "a_full" else None,
                a.repeat,
            )
            print(
                f"    {res[w]['seconds']:.1f} s (runs: {', '.join(f'{x:.1f}' for x in res[w]['runs_wall_s'])}; engine {res[w]['engine']['seconds']:.1f} s), peak {res[w]['ru_maxrss_mib']:.0f} MiB",
                flush=True,
            )
    if "b" not in skip:
        print("  running (b) ...", flush=True)
        cache = work / "hf-cache-b"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(outs["b"], ignore_errors=True)
        res["b"] = run_py(
            "b",
            {
                "data": str(data),
                "tok": str(tok),
                "out": str(outs["b"]),
                "cache": str(cache),
                "num_proc": a.num_proc,
            },
            work,
        )
        shutil.rmtree(cache, ignore_errors=True)
        print(
            f"    {res['b']['seconds']:.1f} s, tree peak RSS {res['b']['tree_peak_rss_mib']:.0f} MiB",
            flush=True,
        )
    if "c" not in skip:
        print("  running (c) and the identity checks ...", flush=True)
        args = {
            "data": str(data),
            "tok": str(tok),
            "chunk": a.chunk,
            "check_a": str(outs["a_full"]) if "a_full" in res else None,
            "check_b": str(outs["b"]) if "b" in res else None,
        }
        res["c"] = run_py("c", args, work)
        print(f"    {res['c']['seconds']:.1f} s", flush=True)

    # sequence tokens: len(ids(prompt)) + len(ids(prompt+chosen)) + len(ids(prompt+rejected))
    seq_tokens = None
    if "c" in res:
        seq_tokens = res["c"]["sequence_tokens"]
    elif "a_full" in res:
        from dppo.data import open_shards

        L = open_shards(outs["a_full"], verify=False).lengths()
        seq_tokens = int(
            3 * L["prompt"].sum() + L["chosen"].sum() + L["rejected"].sum()
        )
    rows_of = {w: (a.rows // 2 if w == "a_half" else a.rows) for w in ALL_WAYS}
    table = []
    for w in ALL_WAYS:
        if w not in res:
            continue
        r = res[w]
        r["rows"] = rows_of[w]
        r["rows_per_s"] = r["rows"] / r["seconds"]
        if seq_tokens:
            r["sequence_tokens_per_s"] = (
                seq_tokens * (r["rows"] / a.rows) / r["seconds"]
            )
    ref_a = res.get("a", {}).get("seconds")
    for w in ("b", "c"):
        if w in res and ref_a:
            res[w]["ratio_to_a"] = res[w]["seconds"] / ref_a
            res[w]["cpu_ratio_to_a"] = res[w]["cpu_s"] / res["a"]["cpu_s"]
            if "a_full" in res:
                res[w]["ratio_to_a_full"] = res[w]["seconds"] / res["a_full"]["seconds"]
    labels = {
        "a": "(a) dppo prep prefs (max-len auto)",
        "a_full": "(a) dppo prep prefs --max-len 100000",
        "a_half": f"(a) dppo prep prefs, {a.rows // 2:,} rows",
        "b": f"(b) datasets.map(num_proc={a.num_proc}) + apply_chat_template",
        "c": "(c) tokenizers encode_batch only",
    }
    for w in ALL_WAYS:
        if w in res:
            r = res[w]
            table.append(
                [
                    labels[w],
                    f"{r['rows']:,}",
                    f"{r['seconds']:.1f}",
                    f"{r['ratio_to_a']:.2f}x" if "ratio_to_a" in r else "",
                    f"{r['cpu_s']:.1f}",
                    f"{r['cpu_ratio_to_a']:.1f}x" if "cpu_ratio_to_a" in r else "",
                    f"{r['cpu_s'] / r['seconds']:.2f}",
                    f"{r['rows_per_s']:,.0f}",
                    f"{r.get('sequence_tokens_per_s', 0) / 1e6:.2f}M",
                    f"{r['ru_maxrss_mib']:,.0f}",
                    f"{r['tree_peak_rss_mib']:,.0f}",
                    f"{r['tree_peak_pss_mib']:,.0f}",
                ]
            )
    print()
    print(
        f"{a.rows:,} rows, {seq_tokens or 0:,} sequence tokens ({(seq_tokens or 0) / a.rows:,.0f}/row); CPU {env['cpu_model']} x{env['affinity']}; tokenizer backend {env['tokenizer_backend']}"
    )
    print(
        fmt_table(
            table,
            [
                "way",
                "rows",
                "seconds",
                "/ (a)",
                "CPU s",
                "CPU / (a)",
                "cores used",
                "rows/s",
                "seq tok/s",
                "maxrss MiB",
                "tree RSS MiB",
                "tree PSS MiB",
            ],
        )
    )
    print(
        f"(a): wall time of the whole CLI process (Python start-up, reading, tokenizing, writing), median of {a.repeat}; (b): tokenizer load + "
        "from_parquet + map + save_to_disk; (c): encode_batch calls only. CPU s: user + system seconds of the same span (all threads and "
        "processes); cores used = CPU s / seconds (well under the core count: other load on the machine, or serial parts). maxrss: ru_maxrss of the process (largest of it and its "
        "reaped children); tree: peak of the summed RSS / PSS of the process tree, sampled every 0.1 s (for (c), until encoding ended)."
    )
    summary: dict[str, Any] = {}
    if startup:
        summary["cli_startup_s"] = startup["wall_s"]
        print(
            f"CLI start-up (`dppo prep prefs --help`): {startup['wall_s']:.2f} s wall, {startup['ru_maxrss_mib']:.0f} MiB peak, included in (a)"
        )
    for w in ("a", "a_full", "a_half"):
        if w in res:
            e = res[w]["engine"]
            print(
                f"({w}) engine-reported {e['seconds']:.2f} s (Preparer created -> shards written; runs: {', '.join(f'{x:.2f}' for x in res[w]['runs_engine_s'])}), max_len {e['max_len']:,}, truncated {e['truncated']:,}, boundary re-split {e['boundary_resplit']:,}, tokens stored {e['tokens']:,}"
            )
    if "a" in res and "a_half" in res:
        summary["peak_rss_a_half_mib"] = res["a_half"]["ru_maxrss_mib"]
        summary["peak_rss_a_mib"] = res["a"]["ru_maxrss_mib"]
        summary["peak_rss_growth"] = (
            res["a"]["ru_maxrss_mib"] / res["a_half"]["ru_maxrss_mib"]
        )
        print(
            f"(a) peak RSS {a.rows // 2:,} rows -> {a.rows:,} rows: {summary['peak_rss_a_half_mib']:,.0f} -> {summary['peak_rss_a_mib']:,.0f} MiB (x{summary['peak_rss_growth']:.2f})"
        )
    if "ratio_to_a" in res.get("b", {}):
        summary["b_over_a"] = res["b"]["ratio_to_a"]
        summary["target_3x_met"] = res["b"]["ratio_to_a"] >= 3.0
        print(
            f"(b)/(a) = {summary['b_over_a']:.2f}x (target >= 3x: {'met' if summary['target_3x_met'] else 'NOT met'})"
        )
    if "ratio_to_a" in res.get("c", {}):
        summary["c_over_a"] = res["c"]["ratio_to_a"]
        print(f"(c)/(a) = {summary['c_over_a']:.2f}x")
    ca = res.get("c", {}).get("check_a")
    if ca:
        summary["ids_identical_to_c"] = ca["identical"]
        print(
            f"identity (a --max-len 100000) vs (c): {'IDENTICAL' if ca['identical'] else 'DIFFERENT'} - prompt ids identical {ca['prompt_identical']:,}/{ca['examples']:,}, "
            f"prompt+chosen and prompt+rejected identical {ca['full_identical']:,}/{ca['examples']:,}; boundary re-split flagged {ca['boundary_resplit_flagged']:,} "
            f"(differ {ca['boundary_resplit_differs']:,}, identical anyway {ca['boundary_resplit_flagged_but_identical']:,}); unflagged mismatches {ca['mismatches_unflagged']:,}; "
            f"missing rows {ca['rows_missing']:,}"
        )
        print(
            "lengths in (a)'s shards (tokens, with the template): "
            + "; ".join(
                f"{k} median {v['median']:.0f} mean {v['mean']:.0f} p95 {v['p95']:.0f} max {v['max']:,}"
                for k, v in ca["lengths"].items()
            )
        )
    cb = res.get("c", {}).get("check_b")
    if cb:
        print(
            f"identity (b) vs (c): {'IDENTICAL' if cb['identical'] else 'DIFFERENT'} ({cb['mismatches']:,} mismatching sequences)"
        )
    report = {
        "command": command,
        "rows": a.rows,
        "repeat_a": a.repeat,
        "data": {
            "path": str(data),
            "bytes": data.stat().st_size,
            "row_group": ROW_GROUP,
            "lengths_model": LENGTHS,
            "leading_newline_share": LEADING_NEWLINE,
            "gen_version": GEN_VERSION,
        },
        "tokenizer": str(tok),
        "sequence_tokens": seq_tokens,
        "environment": env,
        "loadavg_at_end": os.getloadavg(),
        "cli_startup": startup,
        "ways": res,
        "summary": summary,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {a.out}")
    if not a.keep_outputs:
        for w in ALL_WAYS:
            shutil.rmtree(outs[w], ignore_errors=True)


if __name__ == "__main__":
    main()
