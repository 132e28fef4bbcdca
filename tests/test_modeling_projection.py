"""The vocabulary projection options the trainer uses: kept probabilities and bf16 autocast.

``chunked_target_logps`` with ``keep_probs_bytes`` keeps the [N, V] softmax for backward instead of
recomputing the logits; values and gradients must equal the recomputing path and the plain
``log_softmax`` of full logits. Under bf16 autocast the projection must run in bf16 in both passes.
"""

from __future__ import annotations

import pytest
import torch

from dppo.modeling import chunked_target_logps


def _inputs(n=37, h=16, v=300, bias=False, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(v, generator=g, dtype=dtype, requires_grad=True) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=dtype)
    return hidden, weight, b, targets, upstream


def _value_and_grads(fn, hidden, weight, bias, targets, upstream):
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    out = fn(hidden, weight, bias, targets)
    (out * upstream).sum().backward()
    return out.detach(), [t.grad.clone() for t in (hidden, weight, bias) if t is not None]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 8, 64])
def test_kept_probabilities_equal_recomputation_and_full_logits(bias, chunk):
    inputs = _inputs(bias=bias)
    full = lambda h, w, b, y: torch.log_softmax(torch.nn.functional.linear(h, w, b), -1).gather(1, y[:, None])[:, 0]  # noqa: E731
    want, want_g = _value_and_grads(full, *inputs)
    for budget in (0, 1 << 30):
        got, got_g = _value_and_grads(lambda h, w, b, y, k=budget: chunked_target_logps(h, w, b, y, chunk, k), *inputs)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        for a, b in zip(got_g, want_g, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_kept_probabilities_only_within_budget_and_with_grad():
    hidden, weight, _, targets, _ = _inputs(n=10, v=100, dtype=torch.float32)
    out = chunked_target_logps(hidden, weight, None, targets, 4, keep_probs_bytes=10 * 100 * 4)
    assert len(out.grad_fn.saved_tensors) == 6  # the softmax is kept
    out = chunked_target_logps(hidden, weight, None, targets, 4, keep_probs_bytes=10 * 100 * 4 - 1)
    assert len(out.grad_fn.saved_tensors) == 5
    with torch.no_grad():
        assert chunked_target_logps(hidden, weight, None, targets, 4, keep_probs_bytes=1 << 30).grad_fn is None
    out = chunked_target_logps(hidden, weight, None, targets, 4, keep_probs_bytes=1 << 30)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):  # not silently wrong
        out.sum().backward()


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_autocast_projects_in_bf16_in_both_passes(budget):
    hidden, weight, _, targets, upstream = _inputs(n=12, h=32, v=64, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_g = _value_and_grads(lambda h, w, b, y: chunked_target_logps(h, w, b, y, 5, budget),
                                      hidden, weight, None, targets, upstream)
    assert got.dtype == torch.float32 and got_g[0].dtype == got_g[1].dtype == torch.float32
    # the same computation done by hand: bf16 projection, fp32 softmax and gradients
    h16, w16 = hidden.detach().bfloat16(), weight.detach().bfloat16()
    logits = (h16 @ w16.T).float()
    logp = torch.log_softmax(logits, -1)
    torch.testing.assert_close(got, logp.gather(1, targets[:, None])[:, 0], rtol=0, atol=1e-6)
    dlogits = -upstream[:, None] * logp.exp()
    dlogits[torch.arange(12), targets] += upstream
    torch.testing.assert_close(got_g[0], (dlogits.bfloat16() @ w16).float(), rtol=0, atol=1e-6)
    # the weight gradient: each chunk's bf16 product, accumulated in fp32
    grad_w = sum((dlogits[s : s + 5].bfloat16().T @ h16[s : s + 5]).float() for s in range(0, 12, 5))
    torch.testing.assert_close(got_g[1], grad_w, rtol=0, atol=1e-6)
