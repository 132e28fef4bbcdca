"""``dppo.synthetic``: the offline English-like corpus is the same text everywhere."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from dppo import synthetic

PINNED = "ffdd5fcc5ec3dc7a2904474b411f4fe22baaf5d51fedab277e2f18f46d59453f"  # sha256 of english_corpus(20_000), seed 0


def digest(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()


def test_english_corpus_is_pinned_and_independent_of_the_process():
    texts = synthetic.english_corpus(20_000)
    assert digest(texts) == PINNED
    assert sum(map(len, texts)) >= 20_000 and sum(map(len, texts[:-1])) < 20_000
    # another interpreter with another hash seed (set and dict orders differ) makes the same text
    code = "import hashlib, sys; from dppo.synthetic import english_corpus; sys.stdout.write(hashlib.sha256('\\x00'.join(english_corpus(20_000)).encode()).hexdigest())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout == PINNED


def test_english_corpus_grows_by_prefix_and_varies_with_the_seed():
    small, large = synthetic.english_corpus(5_000), synthetic.english_corpus(60_000)
    assert large[: len(small)] == small
    assert synthetic.english_corpus(5_000, seed=1) != small
    words = " ".join(large).split()
    # Zipf-like: the commonest words dominate, and the vocabulary keeps growing with the text
    assert words.count("the") > words.count("data") > 0 and len(set(words)) > 2_000
    assert any("\n\n" in t for t in large) and any(ch.isdigit() for ch in "".join(large))


def test_a_tokenizer_trained_on_it_round_trips(tmp_path):
    from tokenizers import Tokenizer

    texts = synthetic.english_corpus(60_000)
    tok = Tokenizer.from_file(str(synthetic.make_tokenizer(tmp_path, texts, vocab_size=500) / "tokenizer.json"))
    assert tok.get_vocab_size() == 500
    for t in texts[:5]:
        assert tok.decode(tok.encode(t).ids) == t
