"""`dppo train --plan`: the planned memory of each kind against what a run allocates on this CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dppo.train.memory import param_counts, plan_memory

MEASURE = r"""
import gc, json, os, torch, numpy as np
from transformers import Qwen2Config
from dppo.modeling import enable_activation_checkpointing, load_model, PackedBatch, sequence_logps
torch.set_num_threads(1)
def rss():
    d = {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(('VmRSS', 'VmHWM'))}
    return d['VmRSS'], d['VmHWM']
H, I, L, V, T = 512, 1408, 4, 8192, 4096
cfg = Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=8,
                  num_key_value_heads=2, tie_word_embeddings=True)
rng = np.random.default_rng(0)
b = PackedBatch.from_sequences([(rng.integers(0, V, 128), rng.integers(0, V, 384)) for _ in range(T // 512)])
m = load_model(cfg, dtype="fp32", device="cpu")
if os.environ.get("CKPT") == "1":
    enable_activation_checkpointing(m)
opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
sequence_logps(m, b, keep_probs_bytes=1 << 30).sums.sum().backward()
opt.step()
gc.collect()
nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
weights = nbytes(m.parameters())
grads = nbytes(p.grad for p in m.parameters())
optim = nbytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1)
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak resident size
base, _ = rss()
sequence_logps(m, b, keep_probs_bytes=1 << 30).sums.sum().backward()
_, peak = rss()
print(json.dumps({"weights": weights, "grads": grads, "optim": optim, "act": peak - base, "tokens": b.num_tokens}))
"""


def measure(checkpointing: bool) -> dict:
    import os

    # a fixed mmap threshold: freed tensors leave the resident set, so the peak is what was live (with
    # glibc's adaptive threshold the same run measured anywhere from 115 to 245 MB)
    env = {**os.environ, "CKPT": "1" if checkpointing else "0", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, check=True, timeout=300, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the resident size")
def test_the_plan_matches_what_a_run_allocates_within_20_percent():
    from transformers import Qwen2Config

    checkpointing = False
    got = measure(checkpointing)
    cfg = Qwen2Config(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    plan = plan_memory(param_counts(cfg), tokens=got["tokens"], precision="fp32", optimizer="adamw",
                       keep_probs_bytes=1 << 30, checkpointing=checkpointing).rows
    act = f"activations ({got['tokens']:,} tokens{', checkpointed' if checkpointing else ''})"
    pairs = {"weights (fp32)": "weights", "gradients (fp32)": "grads", "optimizer state (adamw)": "optim", act: "act"}
    for row, key in pairs.items():
        assert abs(plan[row] - got[key]) <= 0.2 * got[key], (row, plan[row], got[key])
    total = sum(got[k] for k in pairs.values())
    assert abs(sum(plan.values()) - total) <= 0.2 * total


def test_fsdp_shards_the_states_and_gathers_layers():
    from transformers import Qwen2Config

    shape = param_counts(Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                     num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True))
    assert 0.49e9 < shape.params < 0.50e9  # Qwen2.5-0.5B
    one = plan_memory(shape, world=1, parallel="none", precision="bf16", tokens=8192)
    eight = plan_memory(shape, world=8, parallel="fsdp", precision="bf16", tokens=8192)
    for k in ("weights (fp32)", "gradients (fp32)", "optimizer state (adamw)"):
        assert eight.rows[k] == pytest.approx(one.rows[k] / 8, rel=1e-6)
    assert "gathered parameters (fsdp)" in eight.rows and one.rows[k] == 2 * one.rows["weights (fp32)"]
    ddp = plan_memory(shape, world=8, parallel="ddp", precision="bf16", tokens=8192)
    assert ddp.rows == one.rows


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the resident size")
def test_checkpointing_lowers_the_measured_activations_and_the_plan_bounds_them():
    from transformers import Qwen2Config

    plain, ckpt = measure(False), measure(True)
    cfg = Qwen2Config(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    plan = plan_memory(param_counts(cfg), tokens=ckpt["tokens"], precision="fp32", keep_probs_bytes=1 << 30,
                       checkpointing=True).rows[f"activations ({ckpt['tokens']:,} tokens, checkpointed)"]
    assert ckpt["act"] < 0.5 * plain["act"], (ckpt["act"], plain["act"])  # 4 layers: ~3x less measured
    assert abs(plan - ckpt["act"]) <= 0.2 * ckpt["act"], (ckpt["act"], plan)


def test_checkpointing_and_lora_shrink_the_plan():
    from transformers import Qwen2Config

    from dppo.train.lora import lora_param_count

    cfg = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False)  # Qwen2.5-7B
    shape = param_counts(cfg)
    full = plan_memory(shape, precision="bf16", tokens=8192)
    ckpt = plan_memory(shape, precision="bf16", tokens=8192, checkpointing=True)
    lora = lora_param_count(cfg, 16)
    assert 35e6 < lora < 45e6  # r = 16 on every linear layer of Qwen2.5-7B: ~40M
    small = plan_memory(shape, precision="bf16", tokens=8192, checkpointing=True, lora_params=lora, base_bytes=2)
    act = lambda p: next(v for k, v in p.rows.items() if k.startswith("activations"))  # noqa: E731
    assert act(ckpt) < act(full) / 4
    assert small.total < 0.2 * full.total and small.rows["base weights (frozen, bf16)"] == shape.params * 2

