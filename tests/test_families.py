"""The decoder families dppo supports, each on a tiny config built here (random weights, fp32, CPU).

For every family of :data:`dppo.modeling.TESTED_MODEL_TYPES`:

* packed log-probs (values and gradients) equal each sequence's own forward through transformers'
  eager attention, full log-softmax (1e-5);
* one SGD step of ``dppo train --method dpo`` moves every weight by ``-lr x`` the gradient of the DPO
  loss written out in plain PyTorch over those eager forwards (``test_train.hand_loss``);
* ``dppo generate``'s decoder (the engine ``auto`` picks for the family) gives transformers' greedy
  ``generate`` of each prompt alone, token for token.

And for the chat template of a representative checkpoint of each family (``tests/templates/``, the
template strings of the checkpoints named in ``TEMPLATES``): the engine renders it as
``apply_chat_template`` does, and ``dppo prep`` stores the ids transformers' tokenization gives.
A model whose packed rows would leak (a state-space model) is refused at start in one line.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from dppo import engine
from dppo.data import open_shards
from dppo.data.prep import PrepConfig, prepare
from dppo.errors import ConfigError
from dppo.generate.decoding import Decoder, SamplingConfig
from dppo.modeling import TESTED_MODEL_TYPES, PackedBatch, check_packed_forward, load_model, sequence_logps
from dppo.train.config import load_config

from conftest import write_jsonl
from train_fixtures import hand_loss, load_plain
from train_fixtures import *  # noqa: F403
from train_fixtures import FAST, run_train

TEMPLATE_DIR = Path(__file__).parent / "templates"

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def family_config(family: str, vocab: int) -> transformers.PretrainedConfig:
    """A tiny config of each family, with the features that set it apart switched on."""
    c = dict(SMALL, vocab_size=vocab)
    if family == "qwen2":
        return transformers.Qwen2Config(**c, tie_word_embeddings=True)
    if family == "qwen3":  # q/k norms, explicit head_dim
        return transformers.Qwen3Config(**c, head_dim=16, tie_word_embeddings=True)
    if family == "llama":  # untied output projection, rope scaling of Llama 3.x
        return transformers.LlamaConfig(**c, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64})
    if family == "mistral":  # sliding-window attention on every layer
        return transformers.MistralConfig(**c, sliding_window=4)
    if family == "gemma2":  # attention and final logit soft-capping, alternating sliding windows
        return transformers.Gemma2Config(**c, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                                          attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    if family == "gemma3_text":  # q/k norms, local/global layers with two rope bases
        return transformers.Gemma3TextConfig(**c, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                                              layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":  # fused qkv and gate/up projections
        return transformers.Phi3Config(**c)
    if family == "olmo2":  # q/k norms over the whole projection, norms after the blocks
        return transformers.Olmo2Config(**c)
    raise AssertionError(family)


# -- packed log-probs ------------------------------------------------------------------------------
LENGTHS = [(5, 7), (1, 1), (9, 3), (3, 12), (2, 6)]


@pytest.mark.parametrize("family", TESTED_MODEL_TYPES)
def test_packed_logps_and_grads_equal_each_sequence_alone(family):
    config = family_config(family, 300)
    torch.manual_seed(0)
    model = load_model(config, dtype="fp32", device="cpu")
    plain = load_model(config, dtype="fp32", device="cpu", attn="eager")
    plain.load_state_dict(model.state_dict())
    assert check_packed_forward(model) is None
    rng = np.random.default_rng(1)
    seqs = [(rng.integers(3, 300, p), rng.integers(3, 300, r)) for p, r in LENGTHS]
    got = sequence_logps(model, PackedBatch.from_sequences(seqs)).sums
    want = []
    for prompt, response in seqs:
        ids = torch.from_numpy(np.concatenate([prompt, response]))[None]
        logp = torch.log_softmax(plain(ids).logits[0].float(), dim=-1)
        want.append(logp[len(prompt) - 1 : -1].gather(1, torch.from_numpy(response)[:, None]).sum())
    want = torch.stack(want)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    weights = torch.linspace(0.5, 1.5, len(seqs))
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    ours = dict(model.named_parameters())
    for name, p in plain.named_parameters():
        if p.grad is None:
            continue
        torch.testing.assert_close(ours[name].grad, p.grad, atol=1e-5, rtol=1e-4, msg=f"{family}: {name}")


# -- one DPO step through the trainer -------------------------------------------------------------
@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tok_dir, vocab_size) -> dict[str, Path]:
    out = {}
    for family in TESTED_MODEL_TYPES:
        torch.manual_seed(3)
        model = transformers.AutoModelForCausalLM.from_config(family_config(family, vocab_size))
        path = tmp_path_factory.mktemp(f"fam-{family}") / "model"
        model.save_pretrained(path)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok_dir / name, path / name)
        out[family] = path
    return out


@pytest.mark.parametrize("family", TESTED_MODEL_TYPES)
def test_one_dpo_step_equals_the_plain_pytorch_step(tmp_path, family, family_dirs, pair_shards):
    init = family_dirs[family]
    lr, extra = 1.0, {"beta": 0.5}
    run = run_train(tmp_path / "run", method="dpo", data=str(pair_shards), init=str(init), optimizer="sgd", lr=lr,
                    max_samples=4, max_steps=1, **extra)
    cfg = load_config(None, method="dpo", data=str(pair_shards), init=str(init), out="x", **{**FAST, **extra})
    policy, ref = load_plain(init), load_plain(init)
    hand_loss(cfg, open_shards(pair_shards), range(4), policy, ref).backward()
    got = load_file(run / "model" / "model.safetensors")
    moved = 0.0
    for name, param in policy.named_parameters():
        if name not in got:  # a tied output projection is stored once
            continue
        # float rounding: relative to the tensor's largest update, plus the weights' own ulp (norm weights are ~1)
        scale = float(param.grad.abs().max())
        ulp = 3e-7 * max(1.0, float(param.detach().abs().max()))
        torch.testing.assert_close(got[name] - param.detach(), -lr * param.grad, rtol=1e-4, atol=1e-5 * scale + ulp,
                                   msg=f"{family}: {name}")
        moved = max(moved, scale)
    assert moved > 1e-6, "the step did not move the weights"


# -- generation --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", TESTED_MODEL_TYPES)
def test_greedy_generation_equals_transformers_generate(family):
    config = family_config(family, 300)
    torch.manual_seed(5)
    model = load_model(config, dtype="fp32", device="cpu")
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 300, n).tolist() for n in (7, 3, 11, 5, 1, 9)]
    stop = [2]
    got = {}
    for batch in Decoder(model, stop, engine="auto").run(prompts, SamplingConfig(max_new_tokens=10), batch_size=4):
        for c in batch:
            got[c.index] = list(c.token_ids)
    plain = load_model(config, dtype="fp32", device="cpu", attn="eager")  # transformers' own attention
    plain.load_state_dict(model.state_dict())
    for i, p in enumerate(prompts):
        ids = torch.tensor([p])
        out = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                             eos_token_id=stop, pad_token_id=0)[0, len(p):].tolist()
        if 2 in out:
            out = out[: out.index(2)]
        assert got[i] == out, (family, i)


# -- chat templates ---------------------------------------------------------------------------------
TEMPLATES = {  # file in tests/templates: (checkpoint, bos, eos, special tokens)
    "qwen2.5": ("Qwen/Qwen2.5-0.5B-Instruct", None, "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    "qwen3": ("Qwen/Qwen3-0.6B", None, "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"]),
    "llama3.2": ("meta-llama/Llama-3.2-1B-Instruct", "<|begin_of_text|>", "<|eot_id|>",
                 ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
    "smollm2": ("HuggingFaceTB/SmolLM2-360M-Instruct", None, "<|im_end|>", ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
    "mistral": ("mistralai/Mistral-7B-Instruct-v0.3", "<s>", "</s>", ["<s>", "</s>", "[INST]", "[/INST]"]),
    "gemma2": ("google/gemma-2-2b-it", "<bos>", "<eos>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "gemma3": ("google/gemma-3-1b-it", "<bos>", "<eos>", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]),
    "phi3": ("microsoft/Phi-3-mini-4k-instruct", None, "<|endoftext|>",
             ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "olmo2": ("allenai/OLMo-2-1124-7B-Instruct", "<|endoftext|>", "<|endoftext|>",
              ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]),
}
NO_SYSTEM = {"gemma2"}  # its template raises on a system turn (as the engine must, too)
CONVERSATIONS = [
    [("user", "Hi there  ")],
    [("user", " What is 2+2?"), ("assistant", "It is 4. ")],
    [("system", "Be brief."), ("user", "Name a colour."), ("assistant", "Blue.")],
    [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "<think>\nhm\n</think>\n\nd")],
]


@pytest.fixture(scope="module")
def family_tokenizers(tmp_path_factory) -> dict[str, Path]:
    from dppo import synthetic

    out = {}
    corpus = synthetic.english_corpus(60_000)
    for name, (_, bos, eos, specials) in TEMPLATES.items():
        path = synthetic.make_tokenizer(tmp_path_factory.mktemp(f"tok-{name}"), corpus, vocab_size=400,
                                        template=(TEMPLATE_DIR / f"{name}.jinja").read_text(), special_tokens=specials,
                                        eos_token=eos, pad_token=specials[-1] if name != "llama3.2" else eos, bos_token=bos)
        out[name] = path
    return out


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_family_templates_render_like_apply_chat_template(name, family_tokenizers):
    from transformers import AutoTokenizer

    path = family_tokenizers[name]
    hf = AutoTokenizer.from_pretrained(str(path))
    for conv in CONVERSATIONS:
        for gen in (False, True):
            c = conv[:-1] if gen and conv[-1][0] == "assistant" else conv
            messages = [{"role": r, "content": t} for r, t in c]
            if name in NO_SYSTEM and c[0][0] == "system":
                with pytest.raises(Exception, match="System role not supported"):
                    hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                with pytest.raises(engine.TokenizerError, match="System role not supported"):
                    engine.render_chat(str(path), c, gen)
                continue
            want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert engine.render_chat(str(path), c, gen) == want, (name, gen, [r for r, _ in c])


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_prep_with_family_templates_stores_transformers_ids(tmp_path, name, family_tokenizers):
    from transformers import AutoTokenizer

    path = family_tokenizers[name]
    hf = AutoTokenizer.from_pretrained(str(path))
    rows = []
    for i in range(12):
        prompt = f"Question {i}: name {i % 5 + 1} things that are {'red' if i % 2 else 'round'}."
        chosen, rejected = f"Here are {i % 5 + 1}: apple, ball, sun.", f"I do not know about question {i}."
        rows.append({"prompt": prompt, "prompt_id": f"p{i}", "chosen": [{"role": "user", "content": prompt},
                     {"role": "assistant", "content": chosen}], "rejected": [{"role": "user", "content": prompt},
                     {"role": "assistant", "content": rejected}], "score_chosen": 8.0, "score_rejected": 2.0})
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    prepare(PrepConfig("prefs", str(data), str(path), tmp_path / "shards", max_len=4096), show_progress=False)
    shards = open_shards(tmp_path / "shards")
    assert len(shards) == len(rows)

    def ids(messages, gen):
        out = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen)
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    by_id = {r["prompt_id"]: r for r in rows}
    for k in range(len(shards)):
        ex = shards[k]
        row = by_id[ex["prompt_id"]]
        assert ex["prompt_ids"].tolist() == ids(row["chosen"][:1], True), name
        for side in ("chosen", "rejected"):
            full = ids(row[side], False)
            stored = ex["prompt_ids"].tolist() + ex[f"{side}_ids"].tolist()
            # the stored response ends where the rendered conversation does, or one end-of-turn earlier
            # (templates such as Phi-3's append an end-of-text after the last turn)
            assert full[: len(stored)] == stored and len(full) - len(stored) <= 1, (name, side, k)


# -- what cannot be supported ------------------------------------------------------------------------
def test_a_model_whose_packed_rows_leak_is_refused_in_one_line(tmp_path, pair_shards, tok_dir, vocab_size):
    config = transformers.MambaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, state_size=4,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    path = tmp_path / "mamba"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, path / name)
    with pytest.raises(ConfigError, match="mamba") as err:
        run_train(tmp_path / "run", method="dpo", data=str(pair_shards), init=str(path), max_steps=1)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run" / "checkpoints").exists()
