"""Build offline data for `tok_bench`: English prose and a 32k byte-level BPE.

Collects the docstrings of the Python standard library (modules, classes,
functions, methods) and the language reference topics of `pydoc_data` as
documents, writes them one JSON string per line to `OUT/docs.jsonl`, and
trains a 32k-vocab byte-level BPE set up like Qwen2 (NFC, Qwen2 split regex,
ByteLevel, ChatML special tokens), saved as `OUT/tokenizer.json`. The stdlib
alone is too small to fill 32k merges, so the training text (not the
benchmark documents) also takes the docstrings of a few installed packages
(`--train-packages`, skipped when missing).

Usage: python3 tok_bench_data.py OUT_DIR [--vocab 32000] [--train-packages numpy,sympy]
Then:  cargo run --release -p dppo-core --example tok_bench -- OUT_DIR/tokenizer.json OUT_DIR/docs.jsonl
"""

import argparse
import importlib
import inspect
import json
import pathlib
import pkgutil
import pydoc_data.topics
import sys
import warnings

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Modules with import-time side effects (GUI, printing, opening browsers).
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "pydoc_data", "__main__"}


def modules(top_names):
    """The given top-level modules and the submodules of those that are packages."""
    for name in top_names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = importlib.import_module(name)
        except Exception:
            continue
        yield name, mod
        for info in pkgutil.walk_packages(getattr(mod, "__path__", []), name + ".", onerror=lambda _: None):
            if any(part in SKIP or part == "tests" or part == "test" for part in info.name.split(".")):
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    yield info.name, importlib.import_module(info.name)
            except Exception:
                continue


def docstrings(top_names, seen):
    for name, mod in modules(top_names):
        stack = [mod]
        visited = set()
        while stack:
            obj = stack.pop()
            if id(obj) in visited:
                continue
            visited.add(id(obj))
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 40 and doc not in seen:
                seen.add(doc)
                yield doc
            if inspect.ismodule(obj) or inspect.isclass(obj):
                for _, member in inspect.getmembers(obj):
                    owner = getattr(member, "__module__", None)
                    if (inspect.isclass(member) or inspect.isroutine(member)) and (
                        owner == name or (owner or "").startswith(name + ".")
                    ):
                        stack.append(member)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--train-packages", default="numpy,pandas,sympy,networkx,matplotlib,docutils")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seen = set()
    stdlib = sorted(n for n in sys.stdlib_module_names if n not in SKIP and not n.startswith("_"))
    docs = list(docstrings(stdlib, seen))
    docs += [t for t in pydoc_data.topics.topics.values() if t.strip()]
    extra = list(docstrings([p for p in args.train_packages.split(",") if p], seen))
    with open(args.out / "docs.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    print(f"{len(docs)} docs, {sum(map(len, docs)) / 1e6:.1f} M chars -> {args.out / 'docs.jsonl'}")

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    print(f"training on {len(docs) + len(extra)} docs")
    tok.train_from_iterator(docs + extra, trainer=trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(str(args.out / "tokenizer.json"))
    print(f"vocab {tok.get_vocab_size()} -> {args.out / 'tokenizer.json'}")


if __name__ == "__main__":
    main()
