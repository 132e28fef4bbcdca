"""Offline building blocks for tests, benchmarks and the demo: a byte-level BPE tokenizer trained on
the spot with ChatML special tokens and a Qwen-style chat template, tiny Qwen2-shaped models with
random weights, and small files in the exact schemas of SmolTalk and UltraFeedback-binarized."""

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


def english_corpus(limit_chars: int = 2_000_000) -> list[str]:
    """English prose available offline: the docstrings of Python's standard library."""
    import importlib
    import inspect
    import pkgutil
    import warnings

    texts: list[str] = []
    total = 0
    names = sorted(m.name for m in pkgutil.iter_modules() if not m.name.startswith("_"))
    skip = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "test", "lib2to3", "ensurepip", "venv", "pydoc_data"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            if name in skip or total >= limit_chars:
                continue
            try:
                mod = importlib.import_module(name)
            except Exception:
                continue
            if not getattr(mod, "__file__", "") or "site-packages" in getattr(mod, "__file__", ""):
                continue
            for obj in [mod, *(v for _, v in inspect.getmembers(mod) if inspect.isclass(v) or inspect.isfunction(v))]:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 40:
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
