"""Tiny random models saved as Hugging Face folders, for the generation, judge and evaluation tests.

The weights are drawn with a large initializer range so that greedy decoding wanders over the
vocabulary instead of repeating one token, and a model can be made to end its turns: its
``<|im_end|>`` output row becomes a scaled copy of the row of a token it often predicts, so
``<|im_end|>`` wins wherever that token would have (responses of varied lengths, some cut at the
token budget).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def vocab_size(tok_dir: Path) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()


def qwen2_config(vocab: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, **kw):
    """A tiny Qwen2 config (MLP width twice the hidden size); any Qwen2Config field in ``kw`` overrides."""
    from transformers import Qwen2Config

    fields = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                  tie_word_embeddings=False, initializer_range=0.3)
    return Qwen2Config(**{**fields, **kw})


def causal_lm(vocab: int, seed: int = 0, **kw):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(qwen2_config(vocab, **kw)).eval()


def make_it_stop(model, end_id: int, often: int, scale: float = 1.05) -> None:
    """``end_id`` takes over wherever ``often`` would be the greedy choice."""
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[end_id] = head[often] * scale


def frequent_token(model, prompts: list[list[int]], new: int = 24, skip: int = 3) -> int:
    """The token greedy decoding produces most often after the first ``skip`` steps."""
    from collections import Counter

    counts: Counter[int] = Counter()
    with torch.no_grad():
        for p in prompts:
            out = model.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
            counts.update(out[0, len(p) + skip :].tolist())
    return counts.most_common(1)[0][0]


def save(model, out: Path, tok_dir: Path) -> Path:
    """``model`` with the tokenizer files beside it, as a loadable folder."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, out / name)
    return out


def reward_model(vocab: int, pad_id: int, seed: int = 0, num_labels: int = 1, **kw):
    """A ``Qwen2ForSequenceClassification`` with random weights (score = logit 0)."""
    from transformers import Qwen2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = qwen2_config(vocab, pad_token_id=pad_id, num_labels=num_labels, **kw)
    return Qwen2ForSequenceClassification(cfg).eval()
