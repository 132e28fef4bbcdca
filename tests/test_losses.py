"""Tests for dppo.train.losses: every loss against method.md's formulas written out here, plus hand-computed cases.

The reference implementations below (``_ref_*``) deliberately use none of the library's helpers:
they spell out docs/method.md's formulas with plain torch ops and Python loops, so that a shared bug
cannot hide in both sides.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dppo.train.registry import BUILTIN as METHODS
from dppo.train.registry import loss_spec
from dppo.train.losses import (
    LOSSES,
    SQRT_WEIGHT_EPS,
    LogProbs,
    LossConfig,
    LossOutput,
    can_skip_ygen,
    per_example_sum,
    unlikelihood,
    vote,
    vote_weight,
)

DPPO = ("minll", "unll", "conll")
WEIGHTS = ("linear", "quadratic", "sqrt", "expectile")
LN2 = math.log(2.0)

# --------------------------------------------------------------------------------------------------
# Fixtures made in-process
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Batch:
    """Leaf tensors of one batch; the policy ones require grad."""

    policy_w: torch.Tensor
    policy_l: torch.Tensor
    ref_w: torch.Tensor
    ref_l: torch.Tensor
    n_w: torch.Tensor
    n_l: torch.Tensor
    tokens: torch.Tensor  # [N] policy log-probs of y_gen tokens
    index: torch.Tensor  # [N] example of each token
    ref_g: torch.Tensor  # [B] reference logp(y_gen)

    def logps(self) -> LogProbs:
        return LogProbs(
            policy_chosen=self.policy_w,
            n_chosen=self.n_w,
            policy_rejected=self.policy_l,
            n_rejected=self.n_l,
            ref_chosen=self.ref_w,
            ref_rejected=self.ref_l,
            ygen_token_logps=self.tokens,
            ygen_index=self.index,
            ref_ygen=self.ref_g,
            prompt_chosen=self.ref_w / 3,  # orpo's NLL covers the chosen prompt's tokens too
            n_prompt=self.n_w,
        )

    @property
    def policy_inputs(self) -> list[torch.Tensor]:
        return [self.policy_w, self.policy_l, self.tokens]


def make_batch(seed: int = 0, batch_size: int = 9, dtype: torch.dtype = torch.float64) -> Batch:
    """Random log-probs whose votes r = policy_w - policy_l and ref_w - ref_l span [-15, 15].

    With ``vote_clip = 8`` some votes fall beyond the clip; under both votes example 0 has r = 0
    exactly, example 1 r < 0 and example 2 r > 0. Some y_gen tokens have log p = 0 or -1e-9 (p = 1:
    UL's clamp); the tokens are stored in a shuffled order (packed rows need not be sorted).
    """
    g = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=dtype)

    policy_w, policy_l = uniform(-20, -5, batch_size), uniform(-20, -5, batch_size)
    ref_w, ref_l = uniform(-20, -5, batch_size), uniform(-20, -5, batch_size)
    policy_l[0], ref_l[0] = policy_w[0], ref_w[0]  # r = 0
    policy_l[1], ref_l[1] = policy_w[1] + 3, ref_w[1] + 3  # r = -3
    policy_l[2], ref_l[2] = policy_w[2] - 3, ref_w[2] - 3  # r = 3
    policy_w[3], policy_l[3], ref_w[3], ref_l[3] = -18.0, -6.0, -19.0, -6.0  # r = -12, -13: beyond the clip
    lengths = torch.randint(1, 6, (batch_size,), generator=g)
    index = torch.repeat_interleave(torch.arange(batch_size), lengths)
    tokens = uniform(-4, 0, int(lengths.sum()))
    tokens[0], tokens[2] = 0.0, -1e-9
    perm = torch.randperm(len(index), generator=g)
    index, tokens = index[perm], tokens[perm]
    ref_g = uniform(-15, -1, batch_size)
    n_w = torch.randint(1, 30, (batch_size,), generator=g)
    n_l = torch.randint(1, 30, (batch_size,), generator=g)
    return Batch(
        policy_w.requires_grad_(),
        policy_l.requires_grad_(),
        ref_w,
        ref_l,
        n_w,
        n_l,
        tokens.requires_grad_(),
        index,
        ref_g,
    )


def grads(loss: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Gradient of a randomly weighted sum of the per-example losses (catches example mix-ups)."""
    v = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=loss.dtype)
    return torch.autograd.grad((loss * v).sum(), inputs, allow_unused=True, materialize_grads=True)


# --------------------------------------------------------------------------------------------------
# Independent reference implementations of docs/method.md
# --------------------------------------------------------------------------------------------------


def _ref_dpo(b: Batch, beta: float) -> torch.Tensor:
    margin = (b.policy_w - b.ref_w) - (b.policy_l - b.ref_l)
    return -torch.log(torch.sigmoid(beta * margin))


def _ref_weight(cfg: LossConfig, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_n, f(r_n)) exactly as method.md's table, by elementwise torch.where."""
    r = b.policy_w - b.policy_l if cfg.vote == "policy" else b.ref_w - b.ref_l
    c = cfg.vote_clip
    rn = torch.clamp(r, -c, c) / c if cfg.vote_norm == "clip" else torch.tanh(r / c)
    zero = torch.zeros_like(rn)
    if cfg.weight == "linear":
        f = torch.where(rn < 0, -rn, zero)
    elif cfg.weight == "quadratic":
        f = torch.where(rn < 0, rn**2, zero)
    elif cfg.weight == "sqrt":
        f = torch.where(rn < 0, torch.sqrt(torch.clamp(-rn, min=SQRT_WEIGHT_EPS)), zero)
    else:
        f = torch.where(rn < 0, 1.0 - cfg.zeta, -cfg.zeta) * rn**2
    return rn, (f.detach() if cfg.detach_weight else f)


def _ref_penalty(cfg: LossConfig, b: Batch) -> torch.Tensor:
    """Per-example y_gen term before alpha and f, by a Python loop over examples."""
    out = []
    for i in range(len(b.policy_w)):
        tok = b.tokens[b.index == i]
        if cfg.method == "minll":
            out.append(tok.mean() if cfg.penalty_norm == "mean" else tok.sum())
        elif cfg.method == "unll":
            clamped = torch.clamp(tok, max=math.log(1 - 1e-5))  # 1 - p >= 1e-5
            out.append((-torch.log(-torch.expm1(clamped))).mean())
        else:
            out.append(tok.sum() - b.ref_g[i])
    return torch.stack(out)


def _ref_loss(cfg: LossConfig, b: Batch) -> torch.Tensor:
    _, f = _ref_weight(cfg, b)
    pen = _ref_penalty(cfg, b)
    if cfg.method == "conll":
        margin = (b.policy_w - b.ref_w) - (b.policy_l - b.ref_l)
        return -torch.log(torch.sigmoid(cfg.beta * margin - cfg.alpha * cfg.beta * f * pen))
    return _ref_dpo(b, cfg.beta) + cfg.alpha * f * pen


def _cfg(method: str, **kw: object) -> LossConfig:
    # Non-default values everywhere, so that a swapped or ignored option shows.
    base: dict[str, object] = {"beta": 0.3, "alpha": 0.7, "zeta": 0.3, "vote_clip": 8.0}
    return LossConfig.defaults(method, **{**base, **kw})


# --------------------------------------------------------------------------------------------------
# Each DPPO loss against the written-out formula: values, gradients, statistics
# --------------------------------------------------------------------------------------------------

_DPPO_CASES = [
    (method, weight, vote_src, norm, detach, pnorm)
    for method, weight, vote_src, norm, detach in itertools.product(
        DPPO, WEIGHTS, ("policy", "ref"), ("clip", "tanh"), (False, True)
    )
    for pnorm in (("mean", "sum") if method == "minll" else ("mean",))
]


@pytest.mark.parametrize(("method", "weight", "vote_src", "norm", "detach", "pnorm"), _DPPO_CASES)
def test_dppo_matches_formula(method: str, weight: str, vote_src: str, norm: str, detach: bool, pnorm: str) -> None:
    cfg = _cfg(method, weight=weight, vote=vote_src, vote_norm=norm, detach_weight=detach, penalty_norm=pnorm)
    b = make_batch(seed=_DPPO_CASES.index((method, weight, vote_src, norm, detach, pnorm)))
    out = LOSSES[method](cfg, b.logps())
    expected = _ref_loss(cfg, b)

    torch.testing.assert_close(out.loss, expected)
    for got, want in zip(grads(out.loss, b.policy_inputs), grads(expected, b.policy_inputs)):
        torch.testing.assert_close(got, want)

    rn, f = _ref_weight(cfg, b)
    assert out.r_norm is not None and out.weight is not None and out.penalty is not None
    torch.testing.assert_close(out.r_norm, rn.detach())
    torch.testing.assert_close(out.weight, f.detach())
    active = out.penalized.bool()  # type: ignore[union-attr]
    pen = _ref_penalty(cfg, b).detach()
    torch.testing.assert_close(out.penalty, torch.where(active, pen, torch.zeros_like(pen)))
    torch.testing.assert_close(out.dpo_loss, _ref_dpo(b, cfg.beta).detach())
    torch.testing.assert_close(out.margins, cfg.beta * ((b.policy_w - b.ref_w) - (b.policy_l - b.ref_l)).detach())
    # The fixtures always hold votes of both signs, so both regimes of f are exercised.
    assert (rn < 0).any() and (rn > 0).any()


@pytest.mark.parametrize("vote_src", ["policy", "ref"])
def test_detach_weight_changes_only_the_weight_path(vote_src: str) -> None:
    """With vote "policy" f(r) sends gradient into logp(y_w), logp(y_l) unless detached; with "ref" it never does."""
    b = make_batch(seed=3)
    attached = LOSSES["unll"](_cfg("unll", vote=vote_src), b.logps())
    detached = LOSSES["unll"](_cfg("unll", vote=vote_src, detach_weight=True), b.logps())
    torch.testing.assert_close(attached.loss, detached.loss, rtol=0, atol=0)
    g_att, g_det = grads(attached.loss, b.policy_inputs), grads(detached.loss, b.policy_inputs)
    torch.testing.assert_close(g_att[2], g_det[2], rtol=0, atol=0)  # y_gen tokens: same either way
    same = torch.equal(g_att[0], g_det[0])
    assert same == (vote_src == "ref")


# --------------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------------


def _hand_batch(pw: float, pl: float, rw: float, rl: float, tokens: list[float], ref_g: float = 0.0) -> Batch:
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    return Batch(
        t(pw).requires_grad_(),
        t(pl).requires_grad_(),
        t(rw),
        t(rl),
        torch.tensor([10]),
        torch.tensor([10]),
        torch.tensor(tokens, dtype=torch.float64).requires_grad_(),
        torch.zeros(len(tokens), dtype=torch.long),
        t(ref_g),
    )


def test_dpo_hand_computed() -> None:
    """beta 0.1, equal log-ratios: margin 0, loss -log sigmoid(0) = log 2, dL/dlogp_pi(y_w) = -beta/2 = -0.05.

    beta 0.5 and log-ratios 2 (chosen) and 0 (rejected): loss -log sigmoid(1) = log(1 + e^-1) = 0.31326,
    dL/dlogp_pi(y_w) = -beta * sigmoid(-1) = -0.5 * 0.26894 = -0.13447.
    """
    b = _hand_batch(-10.0, -12.0, -10.0, -12.0, [-1.0])
    out = LOSSES["dpo"](LossConfig.defaults("dpo", beta=0.1), b.logps())
    torch.testing.assert_close(out.loss, torch.tensor([LN2], dtype=torch.float64))
    gw, gl = torch.autograd.grad(out.loss.sum(), [b.policy_w, b.policy_l])
    torch.testing.assert_close(gw, torch.tensor([-0.05], dtype=torch.float64))
    torch.testing.assert_close(gl, torch.tensor([0.05], dtype=torch.float64))
    assert out.accuracies.item() == 0.0  # type: ignore[union-attr]  # equal rewards are not a win

    b = _hand_batch(-8.0, -12.0, -10.0, -12.0, [-1.0])
    out = LOSSES["dpo"](LossConfig.defaults("dpo", beta=0.5), b.logps())
    torch.testing.assert_close(out.loss.item(), 0.31326168751822286)
    (gw,) = torch.autograd.grad(out.loss.sum(), [b.policy_w])
    torch.testing.assert_close(gw.item(), -0.5 * 0.2689414213699951)
    assert out.chosen_rewards.item() == pytest.approx(1.0)  # type: ignore[union-attr]
    assert out.accuracies.item() == 1.0  # type: ignore[union-attr]


def test_unll_quadratic_hand_computed() -> None:
    """unll, quadratic weight, beta 0.1, alpha 0.1, C = 4.

    logp_pi(y_w) = -10, logp_pi(y_l) = -8, reference equal to the policy: DPO margin 0, L_dpo = log 2.
    Vote r = -10 - (-8) = -2, r_n = -2/4 = -0.5, f = r_n^2 = 0.25. y_gen has two tokens of p = 1/2:
    UL = mean of -log(1 - 1/2) = log 2. Loss = log 2 + 0.1 * 0.25 * log 2 = 1.025 log 2 = 0.710476.

    Gradients: each token: alpha * f / 2 * p / (1 - p) = 0.1 * 0.25 / 2 * 1 = 0.0125.
    logp_pi(y_w): DPO -beta/2 = -0.05, plus the weight path alpha * UL * df/dr = 0.1 * log 2 * 2 r_n / C
    = 0.1 * log 2 * (-0.25) = -0.017329, total -0.067329; logp_pi(y_l) the opposite. With
    detach_weight only the DPO part -0.05 remains.
    """
    b = _hand_batch(-10.0, -8.0, -10.0, -8.0, [math.log(0.5), math.log(0.5)])
    cfg = LossConfig.defaults("unll", beta=0.1, alpha=0.1, vote_clip=4.0)
    out = LOSSES["unll"](cfg, b.logps())
    torch.testing.assert_close(out.loss.item(), 1.025 * LN2)
    assert (out.r.item(), out.r_norm.item(), out.weight.item()) == (-2.0, -0.5, 0.25)  # type: ignore[union-attr]
    torch.testing.assert_close(out.penalty.item(), LN2)  # type: ignore[union-attr]
    gw, gl, gt = torch.autograd.grad(out.loss.sum(), b.policy_inputs)
    torch.testing.assert_close(gt, torch.tensor([0.0125, 0.0125], dtype=torch.float64))
    torch.testing.assert_close(gw.item(), -0.05 - 0.025 * LN2)
    torch.testing.assert_close(gl.item(), 0.05 + 0.025 * LN2)

    out = LOSSES["unll"](dataclasses.replace(cfg, detach_weight=True), b.logps())
    (gw,) = torch.autograd.grad(out.loss.sum(), [b.policy_w])
    torch.testing.assert_close(gw.item(), -0.05)


def test_minll_expectile_hand_computed() -> None:
    """minll, expectile zeta 0.5 (the default), alpha 10, beta 0.1, C = 4, detached weight.

    Vote r = -8 - (-10) = 2 > 0, r_n = 0.5, f = (0 - 0.5) * 0.25 = -0.125: the policy votes right, so
    y_gen is *rewarded*. y_gen tokens log p = -1, -3: mean_logp = -2. DPO margin 0.
    Loss = log 2 + 10 * (-0.125) * (-2) = log 2 + 2.5; each token's gradient 10 * (-0.125) / 2 = -0.625
    (descent raises y_gen's likelihood). With penalty_norm "sum": log 2 + 10 * (-0.125) * (-4) = log 2 + 5.
    """
    b = _hand_batch(-8.0, -10.0, -8.0, -10.0, [-1.0, -3.0])
    cfg = LossConfig.defaults("minll", beta=0.1, vote_clip=4.0, detach_weight=True)
    assert (cfg.alpha, cfg.weight, cfg.zeta) == (10.0, "expectile", 0.5)
    out = LOSSES["minll"](cfg, b.logps())
    torch.testing.assert_close(out.loss.item(), LN2 + 2.5)
    (gt,) = torch.autograd.grad(out.loss.sum(), [b.tokens])
    torch.testing.assert_close(gt, torch.tensor([-0.625, -0.625], dtype=torch.float64))
    out = LOSSES["minll"](dataclasses.replace(cfg, penalty_norm="sum"), b.logps())
    torch.testing.assert_close(out.loss.item(), LN2 + 5.0)


def test_conll_hand_computed() -> None:
    """conll, quadratic, beta 0.1, alpha 0.1, C = 4: DPO margin 0, r = -2 so f = 0.25.

    logp_pi(y_gen) = -1 + -2 = -3, logp_ref(y_gen) = -5: log-ratio 2. Sigmoid argument
    0 - 0.1 * 0.1 * 0.25 * 2 = -0.005; loss = -log sigmoid(-0.005) = log(1 + e^0.005) = 0.695650.
    """
    b = _hand_batch(-10.0, -8.0, -10.0, -8.0, [-1.0, -2.0], ref_g=-5.0)
    out = LOSSES["conll"](LossConfig.defaults("conll", beta=0.1, alpha=0.1, vote_clip=4.0), b.logps())
    torch.testing.assert_close(out.loss.item(), math.log1p(math.exp(0.005)))
    assert out.penalty.item() == 2.0  # type: ignore[union-attr]
    torch.testing.assert_close(out.dpo_loss.item(), LN2)  # type: ignore[union-attr]


def test_simpo_hand_computed() -> None:
    """SimPO defaults beta 2.5, gamma 1: mean_logp(y_w) = -10/10 = -1, mean_logp(y_l) = -14/10 = -1.4.

    Argument 2.5 * 0.4 - 1 = 0: loss log 2; dL/dlogp_pi(y_w) = -beta / 2 / |y_w| = -0.125. The
    reference log-probs are not read (set to NaN here).
    """
    nan = float("nan")
    b = _hand_batch(-10.0, -14.0, nan, nan, [nan])
    cfg = LossConfig.defaults("simpo")
    assert (cfg.beta, cfg.gamma) == (2.5, 1.0)
    out = LOSSES["simpo"](cfg, b.logps())
    torch.testing.assert_close(out.loss.item(), LN2)
    (gw,) = torch.autograd.grad(out.loss.sum(), [b.policy_w])
    torch.testing.assert_close(gw.item(), -0.125)
    torch.testing.assert_close(out.margins.item(), 1.0)  # type: ignore[union-attr]


def test_simpo_matches_formula() -> None:
    b = make_batch(seed=5)
    cfg = LossConfig.defaults("simpo", beta=2.0, gamma=0.5)
    out = LOSSES["simpo"](cfg, b.logps())
    expected = -torch.log(torch.sigmoid(cfg.beta * (b.policy_w / b.n_w - b.policy_l / b.n_l) - cfg.gamma))
    torch.testing.assert_close(out.loss, expected)
    for got, want in zip(grads(out.loss, b.policy_inputs[:2]), grads(expected, b.policy_inputs[:2])):
        torch.testing.assert_close(got, want)


def test_sft_is_the_response_nll_reduced_over_the_steps_tokens() -> None:
    """Responses with logp -6 (3 tokens) and -1 (4 tokens): per-example losses 6 and 1 (sums), and
    the registry's "token" reduction makes the step's loss (6 + 1) / 7 tokens: the mean NLL per token."""
    pw = torch.tensor([-6.0, -1.0], dtype=torch.float64, requires_grad=True)
    spec = LOSSES["sft"]
    out = spec(LossConfig.defaults("sft"), LogProbs(policy_chosen=pw, n_chosen=torch.tensor([3, 4])))
    torch.testing.assert_close(out.loss, torch.tensor([6.0, 1.0], dtype=torch.float64))
    assert spec.reduction == "token"
    w = torch.from_numpy(spec.step_weights(np.array([3.0, 4.0])))
    step = (out.loss * w).sum()
    torch.testing.assert_close(step, torch.tensor(1.0, dtype=torch.float64))
    (g,) = torch.autograd.grad(step, [pw])
    torch.testing.assert_close(g, torch.tensor([-1 / 7, -1 / 7], dtype=torch.float64))
    # split into two "micro-batches", the same weights give the same step loss
    halves = (out.loss[:1] * w[:1]).sum().detach() + (out.loss[1:] * w[1:]).sum().detach()
    assert float(halves) == pytest.approx(1.0)
    assert out.stats() == {}
    # the preference losses reduce by the mean over the step's examples
    np.testing.assert_allclose(LOSSES["dpo"].step_weights(np.array([3.0, 4.0, 9.0])), [1 / 3] * 3)


# --------------------------------------------------------------------------------------------------
# alpha = 0 is exactly DPO
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "weight", "vote_src"), list(itertools.product(DPPO, WEIGHTS, ("policy", "ref"))))
def test_alpha_zero_is_exactly_dpo(method: str, weight: str, vote_src: str) -> None:
    b = make_batch(seed=7)
    out = LOSSES[method](_cfg(method, alpha=0.0, weight=weight, vote=vote_src), b.logps())
    dpo = LOSSES["dpo"](LossConfig.defaults("dpo", beta=0.3), b.logps())
    torch.testing.assert_close(out.loss, dpo.loss, rtol=0, atol=0)
    g_out, g_dpo = grads(out.loss, b.policy_inputs), grads(dpo.loss, b.policy_inputs)
    for got, want in zip(g_out, g_dpo):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not g_out[2].any()
    assert not out.penalized.any()  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------
# Numerical stability
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_unlikelihood_stable_at_extremes(dtype: torch.dtype) -> None:
    """p = 1 (log p = 0) gives the clamped -log(1e-5) = 11.513 with a finite (zero) gradient; log p = -100 gives ~0."""
    logp = torch.tensor([0.0, -0.0, -1e-9, -100.0, -1e4], dtype=dtype, requires_grad=True)
    ul = unlikelihood(logp)
    assert ul.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (g,) = torch.autograd.grad(ul.sum(), [logp])
    assert torch.isfinite(ul).all() and torch.isfinite(g).all()
    clamp_value = -math.log(1e-5)
    torch.testing.assert_close(ul[:2].double(), torch.full((2,), clamp_value, dtype=torch.float64), rtol=1e-4, atol=0)
    assert ul[3].item() < 1e-40 and ul[4].item() == 0.0


def test_unlikelihood_accurate_in_float32() -> None:
    """fp32 agrees with fp64 to float32 precision across the whole range, near p = 1 and near p = 0."""
    logp = (-torch.logspace(-4, 1.9, 200, dtype=torch.float64)).float()  # down to -80: e^-80 is a normal float32
    want = -torch.log1p(-torch.exp(logp.double()))  # float64 keeps ~1e-12 relative accuracy on this range
    got = unlikelihood(logp).double()
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


def test_unll_with_certain_tokens_is_finite() -> None:
    """A y_gen made only of p = 1 tokens: finite loss, finite gradients."""
    b = make_batch(seed=11, dtype=torch.float32)
    with torch.no_grad():
        b.tokens.zero_()
    out = LOSSES["unll"](_cfg("unll"), b.logps())
    assert torch.isfinite(out.loss).all()
    assert all(torch.isfinite(g).all() for g in grads(out.loss, b.policy_inputs))


@pytest.mark.parametrize("detach", [False, True])
def test_sqrt_weight_gradient_finite_at_zero_vote(detach: bool) -> None:
    """sqrt(-r) has an infinite slope at r = 0; sqrt(max(-r, eps)) keeps the gradient finite."""
    rn = torch.tensor([0.0, -0.0, -1e-30, -1e-7, -1e-3, 0.5], dtype=torch.float64, requires_grad=True)
    f = vote_weight(LossConfig.defaults("unll", weight="sqrt"), rn)
    (g,) = torch.autograd.grad(f.sum(), [rn])
    assert torch.isfinite(g).all()
    assert f[0].item() == 0.0 and f[5].item() == 0.0
    assert g.abs().max().item() <= 0.5 / math.sqrt(SQRT_WEIGHT_EPS)

    b = make_batch(seed=13)
    with torch.no_grad():
        b.policy_l.copy_(b.policy_w)  # r = 0 for every example
        b.policy_l[1] += 1e-12  # and r slightly negative for one
    out = LOSSES["unll"](_cfg("unll", weight="sqrt", detach_weight=detach), b.logps())
    assert all(torch.isfinite(g).all() for g in grads(out.loss, b.policy_inputs))


# --------------------------------------------------------------------------------------------------
# Skipping y_gen's forward pass
# --------------------------------------------------------------------------------------------------

_SKIP_CASES = [
    (method, weight, zeta, vote_src)
    for method, weight, vote_src in itertools.product(DPPO, WEIGHTS, ("policy", "ref"))
    for zeta in ((0.0, 0.5, 1.0) if weight == "expectile" else (0.5,))
]


@pytest.mark.parametrize(("method", "weight", "zeta", "vote_src"), _SKIP_CASES)
def test_skipping_ygen_gives_identical_results(method: str, weight: str, zeta: float, vote_src: str) -> None:
    """Dropping skippable examples' y_gen tokens (and poisoning their ref_ygen with NaN) changes nothing."""
    b = make_batch(seed=17)
    cfg = _cfg(method, weight=weight, zeta=zeta, vote=vote_src)
    full = LOSSES[method](cfg, b.logps())

    skip = can_skip_ygen(cfg, vote(cfg, b.logps()))
    assert skip[0]  # r == 0: skippable under every weight
    assert skip.any() and (weight == "expectile" and zeta == 0.5) == (skip.sum() == 1)
    keep = ~skip[b.index]
    reduced = dataclasses.replace(
        b.logps(),
        ygen_token_logps=b.tokens[keep],
        ygen_index=b.index[keep],
        ref_ygen=torch.where(skip, float("nan"), b.ref_g),
    )
    part = LOSSES[method](cfg, reduced)

    torch.testing.assert_close(part.loss, full.loss, rtol=0, atol=0)
    g_full = grads(full.loss, b.policy_inputs)
    g_part = grads(part.loss, b.policy_inputs)
    for got, want in zip(g_part, g_full):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not g_full[2][~keep].any()  # skipped tokens never had a gradient
    for name, value in full.stats().items():
        torch.testing.assert_close(part.stats()[name], value, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(full.penalized, (~skip).double())  # type: ignore[arg-type]


def test_can_skip_ygen_semantics() -> None:
    r = torch.tensor([-3.0, -0.0, 0.0, 2.0])
    gated = LossConfig.defaults("unll")
    assert can_skip_ygen(gated, r).tolist() == [False, True, True, True]
    expectile = LossConfig.defaults("minll")  # zeta 0.5: rewards y_gen for r > 0
    assert can_skip_ygen(expectile, r).tolist() == [False, True, True, False]
    assert can_skip_ygen(dataclasses.replace(expectile, zeta=0.0), r).tolist() == [False, True, True, True]
    assert can_skip_ygen(dataclasses.replace(expectile, zeta=1.0), r).tolist() == [True, True, True, False]
    assert can_skip_ygen(dataclasses.replace(gated, alpha=0.0), r).all()
    for method in ("sft", "dpo", "simpo"):
        assert can_skip_ygen(LossConfig.defaults(method), r).all()


# --------------------------------------------------------------------------------------------------
# Properties (hypothesis)
# --------------------------------------------------------------------------------------------------

_logp = st.floats(min_value=-1e4, max_value=0.0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None, database=None)
@given(
    method=st.sampled_from(("dpo", "simpo") + DPPO),
    weight=st.sampled_from(WEIGHTS),
    vote_src=st.sampled_from(("policy", "ref")),
    norm=st.sampled_from(("clip", "tanh")),
    detach=st.booleans(),
    rows=st.lists(
        st.tuples(_logp, _logp, _logp, _logp, _logp, st.lists(_logp, max_size=4)), min_size=1, max_size=5
    ),
)
def test_losses_finite_for_any_log_probs(
    method: str, weight: str, vote_src: str, norm: str, detach: bool, rows: list[tuple]
) -> None:
    """Any log-probs in [-1e4, 0] (p = 1 tokens, empty y_gen, huge votes) give finite losses and gradients."""
    cols = list(zip(*rows))
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    pw, pl = t(cols[0]).requires_grad_(), t(cols[1]).requires_grad_()
    tokens = t([x for row in cols[5] for x in row]).requires_grad_()
    index = torch.tensor([i for i, row in enumerate(cols[5]) for _ in row], dtype=torch.long)
    logps = LogProbs(
        policy_chosen=pw,
        n_chosen=torch.full((len(rows),), 7),
        policy_rejected=pl,
        n_rejected=torch.full((len(rows),), 3),
        ref_chosen=t(cols[2]),
        ref_rejected=t(cols[3]),
        ygen_token_logps=tokens,
        ygen_index=index,
        ref_ygen=t(cols[4]),
    )
    cfg = LossConfig.defaults(method, weight=weight, vote=vote_src, vote_norm=norm, detach_weight=detach)
    out = LOSSES[method](cfg, logps)
    assert torch.isfinite(out.loss).all()
    g = torch.autograd.grad(out.loss.sum(), [pw, pl, tokens], allow_unused=True, materialize_grads=True)
    assert all(torch.isfinite(x).all() for x in g)
    assert all(torch.isfinite(v).all() for v in out.stats().values())


@settings(max_examples=200, deadline=None, database=None)
@given(
    rn=st.floats(min_value=-1.0, max_value=1.0, allow_nan=False),
    weight=st.sampled_from(WEIGHTS),
    zeta=st.floats(min_value=0.0, max_value=1.0),
)
def test_weight_properties(rn: float, weight: str, zeta: float) -> None:
    """Gated weights are 0 for r >= 0 and in (0, 1] for r < 0 (barring underflow).

    Expectile lies in [-zeta, 1 - zeta] and equals (1{r<0} - zeta) r^2.
    """
    cfg = LossConfig.defaults("unll", weight=weight, zeta=zeta)
    f = vote_weight(cfg, torch.tensor([rn], dtype=torch.float64)).item()
    if weight == "expectile":
        assert -zeta - 1e-12 <= f <= 1.0 - zeta + 1e-12
        assert f == pytest.approx(((rn < 0) - zeta) * rn * rn, abs=1e-15)
    elif rn >= 0:
        assert f == 0.0
    else:
        assert 0.0 <= f <= 1.0 and (f > 0.0 or rn * rn == 0.0)  # quadratic may underflow to 0


@settings(max_examples=50, deadline=None, database=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.floats(-100, 0, width=32)), max_size=20))
def test_per_example_sum_matches_loop(pairs: list[tuple[int, float]]) -> None:
    index = torch.tensor([i for i, _ in pairs], dtype=torch.long)
    values = torch.tensor([v for _, v in pairs], dtype=torch.float64)
    got = per_example_sum(values, index, 4)
    want = torch.tensor([sum(v for i, v in pairs if i == b) for b in range(4)], dtype=torch.float64)
    torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------------------------------
# Configuration, registry, inputs, dtypes
# --------------------------------------------------------------------------------------------------


def test_registry_and_requirements() -> None:
    assert tuple(LOSSES)[:6] == METHODS[:6] == ("sft", "dpo", "simpo", "minll", "unll", "conll")
    assert [LOSSES[m].needs_reference for m in METHODS[:6]] == [False, True, False, True, True, True]
    assert [LOSSES[m].needs_ygen for m in METHODS[:6]] == [False, False, False, True, True, True]
    with pytest.raises(ValueError, match="method"):
        loss_spec("ppo")


def test_defaults_follow_method_md() -> None:
    d = {m: LossConfig.defaults(m) for m in METHODS}
    assert all(d[m].beta == 0.01 for m in ("sft", "dpo", "minll", "unll", "conll"))
    assert (d["minll"].alpha, d["unll"].alpha, d["conll"].alpha) == (10.0, 0.1, 0.1)
    assert (d["minll"].weight, d["minll"].zeta) == ("expectile", 0.5)
    assert d["unll"].weight == d["conll"].weight == "quadratic"
    assert (d["minll"].vote_clip, d["unll"].vote_clip, d["conll"].vote_clip) == (2000.0, 2000.0, 700.0)
    for cfg in d.values():
        assert (cfg.vote, cfg.vote_norm, cfg.detach_weight, cfg.penalty_norm) == ("policy", "clip", False, "mean")
    alpha = LossConfig.defaults("unll", alpha=1).alpha  # ints are stored as floats
    assert alpha == 1.0 and isinstance(alpha, float)


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("beta", 0.0),
        ("beta", -1.0),
        ("beta", float("nan")),
        ("beta", "0.1"),
        ("gamma", -0.5),
        ("alpha", -0.1),
        ("alpha", float("inf")),
        ("alpha", True),
        ("zeta", 1.5),
        ("zeta", -0.1),
        ("vote_clip", 0.0),
        ("weight", "cubic"),
        ("vote", "judge"),
        ("vote_norm", "softsign"),
        ("penalty_norm", "max"),
        ("detach_weight", "yes"),
    ],
)
def test_invalid_config_raises_naming_the_option(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        LossConfig.defaults("unll", **{option: value})


def test_invalid_method_and_unknown_option() -> None:
    with pytest.raises(ValueError, match="method"):
        LossConfig.defaults("ppo")
    with pytest.raises(ValueError, match="method"):
        dataclasses.replace(LossConfig.defaults("dpo"), method="ppo")
    with pytest.raises(ValueError, match="temperature"):
        LossConfig.defaults("dpo", temperature=1.0)


@pytest.mark.parametrize(
    ("method", "missing"),
    [
        ("dpo", "ref_chosen"),
        ("simpo", "n_rejected"),
        ("unll", "ygen_token_logps"),
        ("minll", "ygen_index"),
        ("conll", "ref_ygen"),
    ],
)
def test_missing_inputs_raise_naming_the_field(method: str, missing: str) -> None:
    logps = dataclasses.replace(make_batch(seed=23).logps(), **{missing: None})
    with pytest.raises(ValueError, match=missing):
        LOSSES[method](LossConfig.defaults(method), logps)


@pytest.mark.parametrize("method", METHODS)
def test_registry_flags_say_what_each_loss_reads(method: str) -> None:
    """The trainer decides what to compute from the flags alone: each flag must match the inputs."""
    spec, full = LOSSES[method], make_batch(seed=31).logps()
    cfg = LossConfig.defaults(method)
    for field, needed in (("ref_ygen", spec.needs_ref_ygen), ("ygen_token_logps", spec.needs_ygen),
                          ("ref_chosen", spec.needs_reference), ("policy_rejected", spec.needs_rejected)):
        without = dataclasses.replace(full, **{field: None})
        if needed:
            with pytest.raises(ValueError, match=field):
                spec(cfg, without)
        else:
            spec(cfg, without)  # runs without it


def test_malformed_inputs_raise() -> None:
    logps = make_batch(seed=29).logps()
    cfg = LossConfig.defaults("unll")
    with pytest.raises(ValueError, match="ref_rejected"):
        LOSSES["unll"](cfg, dataclasses.replace(logps, ref_rejected=logps.ref_rejected[:-1]))  # type: ignore[index]
    with pytest.raises(ValueError, match="ygen_index"):
        index = logps.ygen_index.double()  # type: ignore[union-attr]
        LOSSES["unll"](cfg, dataclasses.replace(logps, ygen_index=index))
    with pytest.raises(ValueError, match="ygen_index"):
        LOSSES["unll"](cfg, dataclasses.replace(logps, ygen_index=logps.ygen_index[:-1]))  # type: ignore[index]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    ("dtype", "compute"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ],
)
def test_computes_in_float32_at_least(method: str, dtype: torch.dtype, compute: torch.dtype) -> None:
    b = make_batch(seed=31)
    low = {
        f.name: (v.detach().to(dtype).requires_grad_() if v.is_floating_point() else v)
        for f in dataclasses.fields(LogProbs)
        if (v := getattr(b.logps(), f.name)) is not None
    }
    out = LOSSES[method](LossConfig.defaults(method), LogProbs(**low))
    assert out.loss.dtype == compute and out.loss.shape == (9,)
    for name, value in out.stats().items():
        assert value.dtype == compute and value.shape == (9,) and not value.requires_grad, name
    # A half-precision caller still gets gradients in its own dtype.
    (g,) = torch.autograd.grad(out.loss.sum(), [low["policy_chosen"]])
    assert g.dtype == dtype and torch.isfinite(g).all()


@pytest.mark.parametrize("method", METHODS)
def test_outputs_are_per_example_and_detached(method: str) -> None:
    out = LOSSES[method](LossConfig.defaults(method), make_batch(seed=37).logps())
    assert isinstance(out, LossOutput) and out.loss.requires_grad
    expected = {
        "sft": set(),
        "dpo": {"dpo_loss", "chosen_rewards", "rejected_rewards", "margins", "accuracies"},
        "simpo": {"dpo_loss", "chosen_rewards", "rejected_rewards", "margins", "accuracies"},
    }.get(method, {f.name for f in dataclasses.fields(LossOutput)}
          - {"loss", "token_loss", "terms", "token_terms", "n_tokens"})
    if method not in ("sft", "dpo", "simpo", "minll", "unll", "conll"):  # TRL's pair losses
        expected = {"chosen_rewards", "rejected_rewards", "margins", "accuracies"}
    assert set(out.stats()) == expected
    assert all(v.shape == out.loss.shape and not v.requires_grad for v in out.stats().values())
