"""Tests for dppo.modeling: packed, chunked log-probabilities against the plain computation.

The reference ("plain way") runs each sequence alone through an independent copy of the model
using transformers' eager attention, takes the full ``log_softmax(logits)`` and picks the response
tokens. Everything runs on the CPU with tiny random-weight Qwen2 models.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tiny_models as tm
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from dppo.modeling import attention
from dppo.data import micro_batches
from dppo.modeling import (
    PACKED_ATTN,
    PackedBatch,
    chunked_target_logps,
    load_model,
    sequence_logps,
    SeqLogps,
    token_logps,
    use_packed_attention,
)

VOCAB = 512
# (prompt length, response length): varied, with length-1 prompts and responses
LENGTHS = [(5, 7), (1, 1), (9, 1), (3, 12), (1, 6), (14, 2)]


def tiny_config(**overrides) -> transformers.Qwen2Config:
    """transformers' own defaults (initialisation, positions) on the tiny shape."""
    fields = dict(tie_word_embeddings=True, max_position_embeddings=32768, initializer_range=0.02)
    return tm.qwen2_config(VOCAB, **{**fields, **overrides})


def model_pair(config=None, seed=0):
    """The packed model under test and an eager-attention twin with the same weights."""
    config = config or tiny_config()
    torch.manual_seed(seed)
    model = load_model(config, dtype="fp32", device="cpu")
    reference = load_model(config, dtype="fp32", device="cpu", attn="eager")
    reference.load_state_dict(model.state_dict())
    return model, reference


def random_seqs(lengths=LENGTHS, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, VOCAB, p), rng.integers(0, VOCAB, r)) for p, r in lengths]


def plain_logps(model, seqs) -> list[torch.Tensor]:
    """Per-token log-probs of each response, one ordinary forward per sequence, full logits."""
    out = []
    for prompt, response in seqs:
        ids = torch.from_numpy(np.concatenate([prompt, response]))[None]
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        targets = torch.from_numpy(response)
        out.append(logp[len(prompt) - 1 : -1].gather(1, targets[:, None])[:, 0])
    return out


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------------
# PackedBatch and packing
# --------------------------------------------------------------------------------------------------


def test_packed_batch_fields_by_hand():
    batch = PackedBatch.from_sequences([([5, 6], [7]), (np.array([8]), [9, 10]), ([11, 12, 13], [])])
    assert batch.input_ids.tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert batch.position_ids.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert batch.cu_seqlens.tolist() == [0, 3, 6, 9] and batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 3
    # prompt tokens never count; the first response token (7 at 2) is predicted from position 1
    assert batch.target_pos.tolist() == [2, 4, 5]
    assert batch.target_seq.tolist() == [0, 1, 1]
    assert batch.labels.tolist() == [-100, -100, 7, -100, 9, 10, -100, -100, -100]


def test_packed_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="prompt is empty"):
        PackedBatch.from_sequences([([], [1, 2])])
    with pytest.raises(ValueError, match="first token"):
        PackedBatch.from_token_masks([([1, 2], [True, True])])
    with pytest.raises(TypeError):
        PackedBatch.from_sequences([([1.5], [2])])


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
            st.lists(st.integers(0, VOCAB - 1), max_size=8),
        ),
        min_size=1,
        max_size=10,
    )
)
def test_packed_batch_invariants(seqs):
    batch = PackedBatch.from_sequences(seqs)
    assert batch.input_ids.tolist() == [t for p, r in seqs for t in p + r]
    starts = batch.cu_seqlens[:-1].long()
    assert (batch.position_ids[starts] == 0).all()
    assert batch.target_seq.tolist() == [s for s, (_, r) in enumerate(seqs) for _ in r]
    assert batch.input_ids[batch.target_pos].tolist() == [t for _, r in seqs for t in r]
    # the predicting position is inside the same sequence
    assert (batch.position_ids[batch.target_pos] >= 1).all()


# --------------------------------------------------------------------------------------------------
# Chunked log-softmax
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 20, 64])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_matches_full_log_softmax(chunk_size, with_bias):
    torch.manual_seed(0)
    n, h, v = 20, 16, 50
    hidden = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (n,))
    upstream = torch.randn(n, dtype=torch.float64)  # arbitrary per-token weights, as a loss gives

    got = chunked_target_logps(hidden, weight, bias, targets, chunk_size)
    got_grads = torch.autograd.grad((got * upstream).sum(), [t for t in (hidden, weight, bias) if t is not None])
    full = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias), dim=-1)
    want = full.gather(1, targets[:, None])[:, 0]
    want_grads = torch.autograd.grad((want * upstream).sum(), [t for t in (hidden, weight, bias) if t is not None])

    assert got.dtype == torch.float64  # never narrower than the inputs (fp32 for bf16/fp32)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-12)


def test_chunked_never_saves_full_logits():
    n, h, v, chunk = 64, 8, 256, 8
    hidden = torch.randn(n, h, requires_grad=True)
    weight = torch.randn(v, h, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps = chunked_target_logps(hidden, weight, None, torch.randint(0, v, (n,)), chunk)
    assert max(saved) <= max(n * h, v * h)  # inputs and [N] normalisers only, never [N, V]
    logps.sum().backward()
    assert hidden.grad.shape == (n, h) and weight.grad.shape == (v, h)


def test_chunked_bf16_close_to_fp32():
    torch.manual_seed(0)
    hidden, weight = torch.randn(30, 32), torch.randn(100, 32) / 4
    targets = torch.randint(0, 100, (30,))
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = chunked_target_logps(ref_h, ref_w, None, targets, 7)
    ref.sum().backward()
    h16, w16 = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    got = chunked_target_logps(h16, w16, None, targets, 7)
    got.sum().backward()
    assert got.dtype == torch.float32 and w16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, atol=0.15, rtol=0.02)
    torch.testing.assert_close(w16.grad.float(), ref_w.grad, atol=0.1, rtol=0.05)


# --------------------------------------------------------------------------------------------------
# Packed model log-probs against the plain way
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["auto", "sdpa_loop", "dense"])
def test_packed_matches_plain_values_and_grads(kernel):
    model, reference = model_pair()
    seqs = random_seqs()
    batch = PackedBatch.from_sequences(seqs)

    out = sequence_logps(model, batch, chunk_size=5, kernel=kernel)
    out.sums.sum().backward()
    want = plain_logps(reference, seqs)
    torch.stack([w.sum() for w in want]).sum().backward()

    torch.testing.assert_close(out.token_logps, torch.cat(want), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.sums, torch.stack([w.sum() for w in want]), atol=1e-5, rtol=0)
    assert out.counts.tolist() == [r for _, r in LENGTHS]
    for s in range(len(seqs)):
        torch.testing.assert_close(out.tokens_of(s), want[s], atol=1e-5, rtol=0)
    got_grads, want_grads = grads(model), grads(reference)
    assert got_grads.keys() == want_grads.keys() and "model.embed_tokens.weight" in got_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-5, msg=name)


def test_sequence_sums_are_accumulated_in_float64():
    """A sequence's log-prob is its fp32 token log-probs summed in float64, then rounded once: a
    float32 running sum of hundreds of terms drifts by ~1e-5, which losses with a sharp curvature
    (discopop at TRL's tau 0.05) turn into gradient errors of ~1e-4."""
    model, _ = model_pair()
    rng = np.random.default_rng(7)
    seqs = [(rng.integers(0, 60, 3), rng.integers(0, 60, n)) for n in (700, 5, 900)]
    out = sequence_logps(model, PackedBatch.from_sequences(seqs), chunk_size=64)
    want = torch.stack([out.tokens_of(s).double().sum() for s in range(len(seqs))]).float()
    assert torch.equal(out.sums, want)
    assert out.sums.dtype == torch.float32


def test_packed_matches_padded_batch():
    """The other plain way: one right-padded batch with an attention mask."""
    model, reference = model_pair()
    seqs = random_seqs()
    longest = max(len(p) + len(r) for p, r in seqs)
    ids = torch.zeros(len(seqs), longest, dtype=torch.long)
    mask = torch.zeros(len(seqs), longest, dtype=torch.long)
    for i, (p, r) in enumerate(seqs):
        ids[i, : len(p) + len(r)] = torch.from_numpy(np.concatenate([p, r]))
        mask[i, : len(p) + len(r)] = 1
    logp = torch.log_softmax(reference(ids, attention_mask=mask).logits.float(), dim=-1)
    want = torch.stack([
        logp[i, len(p) - 1 : len(p) + len(r) - 1].gather(1, torch.from_numpy(r)[:, None]).sum()
        for i, (p, r) in enumerate(seqs)
    ])
    got = sequence_logps(model, PackedBatch.from_sequences(seqs)).sums
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_first_response_token_predicted_from_last_prompt_token():
    model, reference = model_pair()
    prompt, response = np.array([3, 1, 4, 1, 5]), np.array([9, 2, 6])
    got = token_logps(model, PackedBatch.from_sequences([(prompt, response)]))
    logits = reference(torch.from_numpy(np.concatenate([prompt, response]))[None]).logits[0]
    first = torch.log_softmax(logits[len(prompt) - 1], dim=-1)[response[0]]
    assert got.shape == (len(response),)  # prompt tokens never count
    torch.testing.assert_close(got[0], first, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["sdpa_loop", "dense"])
def test_sequences_in_a_row_do_not_see_each_other(kernel):
    model, _ = model_pair()
    a, b, c = random_seqs([(6, 5), (4, 7), (3, 3)])
    a_changed = ((a[0] + 1) % VOCAB, (a[1] + 7) % VOCAB)
    with torch.no_grad():
        before = sequence_logps(model, PackedBatch.from_sequences([a, b, c]), kernel=kernel)
        after = sequence_logps(model, PackedBatch.from_sequences([a_changed, b, c]), kernel=kernel)
    assert not torch.allclose(before.tokens_of(0), after.tokens_of(0))
    torch.testing.assert_close(after.tokens_of(1), before.tokens_of(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(after.tokens_of(2), before.tokens_of(2), atol=1e-6, rtol=0)


def test_restarting_positions_alone_do_leak_under_sdpa():
    """Why the packed attention exists: sdpa with restarting position_ids (default use_cache)
    mixes the sequences, and the isolation test above would catch it."""
    _, reference = model_pair()
    reference.set_attn_implementation("sdpa")
    a, b = random_seqs([(6, 5), (4, 7)])
    ids = torch.from_numpy(np.concatenate([*a, *b]))[None]
    positions = torch.cat([torch.arange(11), torch.arange(11)])[None]
    with torch.no_grad():
        packed = reference(ids, position_ids=positions).logits[0, 11:]
        alone = reference(ids[:, 11:]).logits[0]
    assert (packed - alone).abs().max() > 1e-3


def test_sliding_window_layers():
    config = tiny_config(use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert config.layer_types == ["full_attention", "sliding_attention"]
    model, reference = model_pair(config)
    seqs = random_seqs([(3, 6), (2, 1), (5, 4)])
    want = torch.stack([w.sum() for w in plain_logps(reference, seqs)])
    for kernel in ("sdpa_loop", "dense"):
        got = sequence_logps(model, PackedBatch.from_sequences(seqs), kernel=kernel).sums
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_gradient_checkpointing_gives_same_grads():
    model, _ = model_pair()
    batch = PackedBatch.from_sequences(random_seqs())
    sequence_logps(model, batch).sums.sum().backward()
    want = grads(model)
    model.zero_grad()
    model.activation_checkpointing_enable()
    model.train()
    sequence_logps(model, batch).sums.sum().backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(g, want[name], atol=1e-6, rtol=1e-6, msg=name)


def test_lm_head_bias_and_untied_weights():
    config = tiny_config(tie_word_embeddings=False)
    model, reference = model_pair(config)
    for m in (model, reference):
        head = torch.nn.Linear(64, VOCAB, bias=True)
        with torch.no_grad():
            head.weight.copy_(model.lm_head.weight)
            torch.manual_seed(3)
            head.bias.normal_()
        m.lm_head = head
    seqs = random_seqs()
    sequence_logps(model, PackedBatch.from_sequences(seqs), chunk_size=4).sums.sum().backward()
    want = plain_logps(reference, seqs)
    torch.stack([w.sum() for w in want]).sum().backward()
    torch.testing.assert_close(model.lm_head.bias.grad, reference.lm_head.bias.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.lm_head.weight.grad, reference.lm_head.weight.grad, atol=1e-5, rtol=1e-5)


def _logps_in_rows(model, seqs, max_tokens):
    """``sequence_logps`` of many pairs, packed into rows of <= ``max_tokens`` by the trainer's
    packing (``dppo.data.micro_batches``), put back in the order of ``seqs``."""
    rows = micro_batches([len(p) + len(r) for p, r in seqs], max_tokens)
    parts = [sequence_logps(model, PackedBatch.from_sequences([seqs[i] for i in row])) for row in rows]
    placed = torch.from_numpy(np.concatenate(rows))  # placed[k]: original index of the k-th sequence
    offsets = np.cumsum([0] + [len(row) for row in rows[:-1]])
    token_seq = placed[torch.cat([p.token_seq + int(o) for p, o in zip(parts, offsets, strict=True)])]
    order = torch.argsort(token_seq, stable=True)
    inverse = torch.argsort(placed)
    return SeqLogps(sums=torch.cat([p.sums for p in parts])[inverse], counts=torch.cat([p.counts for p in parts])[inverse],
                    token_logps=torch.cat([p.token_logps for p in parts])[order], token_seq=token_seq[order])


def test_rows_return_results_in_original_order():
    model, _ = model_pair()
    seqs = random_seqs([(4, 3), (9, 8), (1, 1), (6, 2), (2, 10), (3, 3)])
    with torch.no_grad():
        whole = sequence_logps(model, PackedBatch.from_sequences(seqs))
        rows = _logps_in_rows(model, seqs, max_tokens=14)
    assert len(micro_batches([len(p) + len(r) for p, r in seqs], 14)) > 2
    torch.testing.assert_close(rows.sums, whole.sums, atol=1e-5, rtol=0)
    assert rows.counts.tolist() == whole.counts.tolist()
    assert rows.token_seq.tolist() == whole.token_seq.tolist()
    torch.testing.assert_close(rows.token_logps, whole.token_logps, atol=1e-5, rtol=0)


def test_select_renumbers_sequences():
    model, _ = model_pair()
    seqs = random_seqs([(2, 3), (4, 1), (3, 2), (1, 4), (2, 2), (5, 3)])  # [c0, r0, g0, c1, r1, g1]
    with torch.no_grad():
        out = sequence_logps(model, PackedBatch.from_sequences(seqs))
    ygen = out.select(range(2, 6, 3))
    assert ygen.token_seq.tolist() == [0, 0, 1, 1, 1]
    torch.testing.assert_close(ygen.token_logps, torch.cat([out.tokens_of(2), out.tokens_of(5)]))
    torch.testing.assert_close(ygen.sums, out.sums[[2, 5]])
    assert out.select([3, 0]).token_seq.tolist() == [0] * 4 + [1] * 3


def test_multi_turn_masks_count_every_assistant_token():
    model, reference = model_pair()
    rng = np.random.default_rng(5)
    ids = rng.integers(0, VOCAB, 12)
    counted = np.array([0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1], dtype=bool)  # two assistant turns
    loss = -token_logps(model, PackedBatch.from_token_masks([(ids, counted), (ids[:4], counted[:4])])).mean()
    logp = torch.log_softmax(reference(torch.from_numpy(ids)[None]).logits[0], dim=-1)
    per_token = -logp[:-1].gather(1, torch.from_numpy(ids[1:])[:, None])[:, 0]
    want = torch.cat([per_token[counted[1:]], per_token[:3][counted[1:4]]]).mean()
    torch.testing.assert_close(loss, want, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# Attention plumbing
# --------------------------------------------------------------------------------------------------


def test_packed_forward_builds_no_dense_mask(monkeypatch):
    model, _ = model_pair()
    calls = []
    real = transformers.masking_utils.sdpa_mask
    monkeypatch.setattr(transformers.masking_utils, "sdpa_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    token_logps(model, PackedBatch.from_sequences(random_seqs()))
    assert calls == []
    model(torch.tensor([[1, 2, 3]]))  # outside packed calls the model behaves as under sdpa
    assert calls


def test_ordinary_forward_and_generate_behave_as_sdpa():
    model, reference = model_pair()
    reference.set_attn_implementation("sdpa")
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # left padding, as for generation
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)
        kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert model.generate(ids, **kwargs).tolist() == reference.generate(ids, **kwargs).tolist()


def test_model_without_packed_attention_is_refused():
    _, reference = model_pair()
    batch = PackedBatch.from_sequences(random_seqs())
    with pytest.raises(ValueError, match="use_packed_attention"):
        token_logps(reference, batch)
    use_packed_attention(reference)
    assert reference.config._attn_implementation == PACKED_ATTN
    token_logps(reference, batch)


def fake_varlen_attn(
    query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False
):
    """CPU stand-in with torch 2.15's varlen_attn signature: [T, H, D] in and out."""
    assert query.shape[1] == key.shape[1] or enable_gqa
    assert cu_seq_q.dtype == torch.int32 and isinstance(max_q, int) and tuple(window_size) == (-1, 0)
    out = []
    for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist(), strict=True):
        q, k, v = (t[a:b].transpose(0, 1)[None] for t in (query, key, value))
        sdpa = torch.nn.functional.scaled_dot_product_attention
        out.append(sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa))
    return torch.cat(out, dim=2)[0].transpose(0, 1)


@pytest.mark.parametrize("params", [("scale", "window_size", "enable_gqa"), ("scale", "window_size")])
def test_varlen_path_plumbing(monkeypatch, params):
    """The CUDA path's layout, GQA handling and arguments, run through a CPU stand-in kernel."""
    model, reference = model_pair()
    monkeypatch.setattr(attention, "_varlen_fn", lambda: (fake_varlen_attn, frozenset(params)))
    monkeypatch.setattr(attention, "_varlen_device_ok", lambda q: True)
    seqs = random_seqs()
    got = sequence_logps(model, PackedBatch.from_sequences(seqs), kernel="auto").sums
    want = torch.stack([w.sum() for w in plain_logps(reference, seqs)])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_varlen_kernel_runs_under_autocast_with_fp32_weights(monkeypatch):
    """Training's configuration (fp32 master weights, bf16 autocast): RoPE hands the attention fp32
    queries and keys beside bf16 values, which must still reach the varlen kernel (in bf16), not fall
    back to one SDPA call per sequence; the result equals the per-sequence path under the same autocast."""
    model, _ = model_pair()
    seen = []

    def spy(query, key, value, *args, **kwargs):
        seen.append((query.dtype, key.dtype, value.dtype))
        return fake_varlen_attn(query, key, value, *args, **kwargs)

    params = frozenset(("scale", "window_size", "enable_gqa"))
    monkeypatch.setattr(attention, "_varlen_fn", lambda: (spy, params))
    # the device check as on CUDA (bf16/fp16 only), whatever the device
    monkeypatch.setattr(attention, "_varlen_device_ok", lambda q: q.dtype in (torch.bfloat16, torch.float16))
    batch = PackedBatch.from_sequences(random_seqs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = sequence_logps(model, batch, kernel="auto").sums
        want = sequence_logps(model, batch, kernel="sdpa_loop").sums
    assert seen and set(seen) == {(torch.bfloat16,) * 3}
    assert len(seen) == model.config.num_hidden_layers  # every layer, no fallback
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.01)


def test_varlen_kwargs_across_torch_signatures():
    d = 64**-0.5
    old = frozenset({"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal", "return_aux"})
    mid = frozenset({"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "scale", "window_size"})
    new = mid | {"enable_gqa"}
    assert attention._varlen_kwargs(old, 64, d, None) == {"is_causal": True}
    assert attention._varlen_kwargs(old, 64, 0.1, None) is None  # no `scale` to pass
    assert attention._varlen_kwargs(old, 64, d, 8) is None  # no sliding window
    assert attention._varlen_kwargs(mid, 64, d, None) == {"window_size": (-1, 0), "scale": d}
    assert attention._varlen_kwargs(new, 64, d, 8) == {"window_size": (7, 0), "scale": d, "enable_gqa": True}


def test_cpu_never_picks_varlen():
    q = torch.randn(1, 4, 5, 16, dtype=torch.bfloat16)
    assert attention._varlen_options(q, 0.25, None) is None


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def test_load_model_dtypes_and_config_untouched():
    config = tiny_config()
    model = load_model(config, device="cpu")
    assert model.dtype == torch.float32 and model.config._attn_implementation == PACKED_ATTN
    assert not model.training
    assert config._attn_implementation != PACKED_ATTN
    model16 = load_model(config, dtype="bf16", device="cpu")
    assert model16.dtype == torch.bfloat16
    logps = token_logps(model16, PackedBatch.from_sequences(random_seqs()))
    assert logps.dtype == torch.float32 and torch.isfinite(logps).all()
    with pytest.raises(ValueError, match="dtype"):
        load_model(config, dtype="fp8", device="cpu")


def test_load_model_from_saved_checkpoint(tmp_path):
    model, _ = model_pair()
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")
    batch = PackedBatch.from_sequences(random_seqs())
    with torch.no_grad():
        torch.testing.assert_close(token_logps(loaded, batch), token_logps(model, batch), atol=0, rtol=0)
