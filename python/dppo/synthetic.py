"""Offline building blocks for tests, benchmarks and the demo: a byte-level BPE tokenizer trained on
the spot with ChatML special tokens and a Qwen-style chat template, tiny Qwen2-shaped models with
random weights, small files in the exact schemas of SmolTalk and UltraFeedback-binarized, and
English-like prose made from a seed (the same on every machine). Shipped with the library (the demo
builds its model and tokenizer with it); the tests import it as ``dppo.synthetic``."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "QWEN2_PATTERN",
    "QWEN_STYLE_TEMPLATE",
    "LLAMA3_TEMPLATE",
    "LLAMA3_SPECIAL_TOKENS",
    "SPECIAL_TOKENS",
    "make_tokenizer",
    "tiny_qwen2",
    "prompt_id",
    "sft_rows",
    "pair_rows",
    "english_corpus",
]

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""Meta-Llama-3-8B-Instruct's chat template (headers as special tokens, content trimmed, a BOS first)."""
LLAMA3_SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


# The 300 commonest English words, roughly by frequency (Zipf ranks 0..299 of the corpus's lexicon);
# the ranks after them are pseudo-words spelled from English syllables.
_COMMON_WORDS = tuple("""
the of and to a in is that for it as with was on be by this are or from at which not have an but
can their has more one all been its also other were they when there use used such these may only
data between each time first into new two most some than many will would should could over under
number model system value so if what about out up who them then no make like how our just because
any well where much through back after before most people year way even want give day good know
take see come think look work life child world school still try ask need feel become leave put mean
keep let begin seem help talk turn start show hear play run move live believe hold bring happen
write provide sit stand lose pay meet include continue set learn change lead understand watch follow
stop create speak read allow add spend grow open walk win offer remember love consider appear buy
wait serve die send expect build stay fall cut reach kill remain suggest raise pass sell require
report decide pull it's don't can't I'm you're they'll we've isn't doesn't won't that's there's
question answer list step result reason example problem part point group case week company program
word fact hand place home water room mother area money story month lot right study book eye job
business issue side kind head house service friend father power hour game line end member law car
city community name president team minute idea kid body information nothing ago lead social whether
back parent face others level office door health person art war history party morning air
""".split())
_ONSETS = ("b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y", "z",
           "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "qu", "sc", "sh", "sl", "sm",
           "sn", "sp", "st", "str", "sw", "th", "tr", "wh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ea", "ai", "ou", "oo", "ie", "io", "ee", "y")
_CODAS = ("", "", "", "n", "r", "s", "t", "l", "m", "d", "nd", "st", "ng", "nt", "rt", "ck", "ll", "ss", "x", "ct", "rn")
_SUFFIXES = ("", "", "", "", "s", "s", "ed", "ing", "er", "ly", "tion", "ment", "al", "ive", "ness", "able", "ous", "ity")
_LEXICON_SIZE = 60_000


def _pseudo_word(rank: int) -> str:
    """The lexicon's word of ``rank`` past the common ones: one to three English syllables and a
    suffix, spelled from a hash of the rank (the same on every machine)."""
    h = int.from_bytes(hashlib.blake2b(rank.to_bytes(8, "little"), digest_size=16).digest(), "little")
    parts = []
    for _ in range(1 + h % 3 if rank > 2000 else 1 + h % 2):
        h //= 3
        for pool in (_ONSETS, _VOWELS, _CODAS):
            parts.append(pool[h % len(pool)])
            h //= len(pool)
    return "".join(parts) + _SUFFIXES[h % len(_SUFFIXES)]


def _lexicon() -> tuple[tuple[str, ...], list[float]]:
    """The lexicon (common words first) and its cumulative Zipf weights (1/rank), built once."""
    global _LEXICON
    if _LEXICON is None:
        words = _COMMON_WORDS + tuple(_pseudo_word(r) for r in range(len(_COMMON_WORDS), _LEXICON_SIZE))
        cumulative, total = [], 0.0
        for rank in range(1, len(words) + 1):
            total += 1.0 / rank
            cumulative.append(total)
        _LEXICON = (words, cumulative)
    return _LEXICON


_LEXICON: tuple[tuple[str, ...], list[float]] | None = None


def _sentence(u: Any, words: tuple[str, ...], cumulative: list[float]) -> str:
    """One sentence: 4..27 words drawn with Zipf's frequencies (rank r ~ 1/r), commas, now and then
    a number, a parenthesis or a quotation, a capital first and an end mark."""
    import bisect

    out = []
    for _ in range(4 + int(u() * 24)):
        r = u()
        if r < 0.03:
            out.append(str(int(u() * 2100)) if u() < 0.7 else f"{u() * 100:.1f}")
        else:
            out.append(words[min(bisect.bisect_left(cumulative, u() * cumulative[-1]), len(words) - 1)])
            if r > 0.93:
                out[-1] += ","
    if len(out) > 8 and u() < 0.1:
        i = int(u() * (len(out) - 3))
        left, right = ("(", ")") if u() < 0.5 else ("\u201c", "\u201d")
        out[i], out[i + 2] = left + out[i].rstrip(","), out[i + 2].rstrip(",") + right
    out[0] = out[0][:1].upper() + out[0][1:]
    end = u()
    return " ".join(out).rstrip(",") + ("." if end < 0.85 else "?" if end < 0.95 else "!")


def english_corpus(limit_chars: int = 2_000_000, seed: int = 0) -> list[str]:
    """English-like prose made offline from ``seed``: documents of paragraphs of sentences over a
    Zipf-distributed lexicon (300 common English words, then pseudo-words spelled from English
    syllables), with commas, numbers, quotations and roughly lognormal document lengths (median
    ~800 characters). Documents are added until ``limit_chars``; ``english_corpus(n)`` is a prefix
    of ``english_corpus(m)`` for ``n < m``.

    The same text on every machine and Python version: it draws only from
    ``random.Random(seed).random()`` (a sequence Python keeps across versions) and uses only
    correctly rounded arithmetic (no platform ``log``/``exp``)."""
    u = random.Random(seed).random
    words, cumulative = _lexicon()
    texts: list[str] = []
    total = 0
    while total < limit_chars:
        target = 500.0
        for _ in range(8):  # a product of independent factors: roughly lognormal
            target *= 0.6 + 0.9 * u()
        paragraphs, size = [], 0
        while size < target:
            para = " ".join(_sentence(u, words, cumulative) for _ in range(1 + int(u() * 5)))
            paragraphs.append(para)
            size += len(para) + 2
        doc = "\n\n".join(paragraphs)
        texts.append(doc)
        total += len(doc)
    return texts


def make_tokenizer(
    out_dir: str | Path,
    texts: Iterable[str] | None = None,
    vocab_size: int = 1000,
    template: str = QWEN_STYLE_TEMPLATE,
    pattern: str = QWEN2_PATTERN,
    special_tokens: list[str] | None = None,
    eos_token: str = "<|im_end|>",
    pad_token: str | None = "<|endoftext|>",
    bos_token: str | None = None,
) -> Path:
    """Train a byte-level BPE (NFC, special tokens, pre-split by ``pattern``: Qwen2's by default)
    on ``texts`` and save ``tokenizer.json`` + ``tokenizer_config.json`` (with ``template``) into
    ``out_dir``. The special tokens default to ChatML's; pass :data:`LLAMA3_SPECIAL_TOKENS` with
    :data:`LLAMA3_TEMPLATE` (``eos_token="<|eot_id|>"``, ``bos_token="<|begin_of_text|>"``) for a
    Llama-3-shaped tokenizer. ``vocab_size`` is an upper bound: training stops early when no pair is
    left to merge."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens or SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = list(texts) if texts is not None else english_corpus(300_000)
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "unk_token": None,
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "chat_template": template,
    }
    from dppo.artifacts import write_tokenizer_config

    write_tokenizer_config(out, config)  # what makes transformers' AutoTokenizer load tokenizer.json as it is
    return out


def tiny_qwen2(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 128, seed: int = 0) -> Any:
    """A Qwen2-architecture causal LM with random weights (fp32, CPU)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(cfg).eval()


def prompt_id(prompt: str) -> str:
    """UltraFeedback's prompt ids are the sha256 of the prompt text."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


_WORDS = (
    "the model answers a question about data with care and a short list of steps "
    "naïve café résumé Straße 東京 数据 😀 ١٢٣ — “quoted” it's THEY'LL don't 3.14159 x=42;\ttab\n"
).split(" ")


def _text(rng: random.Random, lo: int, hi: int) -> str:
    n = rng.randint(lo, hi)
    parts = [rng.choice(_WORDS) for _ in range(n)]
    if rng.random() < 0.2:
        parts.insert(rng.randrange(len(parts) + 1), "\n\n")
    return " ".join(parts).strip() or "ok"


def sft_rows(n: int, seed: int = 0, long_every: int = 7) -> list[dict[str, Any]]:
    """SmolTalk-schema rows (``messages``), some with a system turn, some multi-turn, some long."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        long = long_every and i % long_every == long_every - 1
        msgs = []
        if rng.random() < 0.3:
            msgs.append({"role": "system", "content": _text(rng, 3, 8)})
        msgs.append({"role": "user", "content": _text(rng, 3, 60 if long else 20)})
        msgs.append({"role": "assistant", "content": _text(rng, 5, 300 if long else 40)})
        if rng.random() < 0.3:
            msgs += [{"role": "user", "content": _text(rng, 2, 5)}, {"role": "assistant", "content": _text(rng, 2, 5)}]
        rows.append({"messages": msgs})
    return rows


def pair_rows(n: int, seed: int = 0, long_every: int = 7) -> list[dict[str, Any]]:
    """UltraFeedback-binarized-schema rows: prompt, prompt_id, chosen, rejected, messages, scores."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        long = long_every and i % long_every == long_every - 1
        prompt = _text(rng, 3, 80 if long else 25) + f" (#{i})"
        chosen = _text(rng, 3, 250 if long else 40)
        rejected = _text(rng, 3, 200 if long else 30)
        sc, sr = rng.choice([6.0, 7.5, 9.0, 10.0]), rng.choice([1.0, 2.5, 4.0, 5.5])
        user = {"role": "user", "content": prompt}
        rows.append(
            {
                "prompt": prompt,
                "prompt_id": prompt_id(prompt),
                "chosen": [user, {"role": "assistant", "content": chosen}],
                "rejected": [user, {"role": "assistant", "content": rejected}],
                "messages": [user, {"role": "assistant", "content": chosen}],
                "score_chosen": sc,
                "score_rejected": sr,
            }
        )
    return rows
