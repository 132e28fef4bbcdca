"""TRL's pair losses in dppo: each against its formula written out here, against TRL's own code
(DPOTrainer._compute_loss and ORPOTrainer.odds_ratio_loss driven with given per-token log-probs),
combinations, and the DPPO penalties on any pair loss (alpha = 0 is exactly the base loss).

Everything is float64 for the comparisons of gradients and float32 where the issue asks for it.
"""

from __future__ import annotations

import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dppo.train.losses import LOSSES, LogProbs, LossConfig
from dppo.train.losses_pairs import aot_context

TRL_TYPES = {  # dppo method -> TRL loss_type
    "dpo": "sigmoid", "ipo": "ipo", "hinge": "hinge", "robust": "robust", "exo_pair": "exo_pair",
    "nca_pair": "nca_pair", "bco_pair": "bco_pair", "sppo_hard": "sppo_hard", "aot": "aot",
    "aot_unpaired": "aot_unpaired", "apo_zero": "apo_zero", "apo_down": "apo_down", "discopop": "discopop",
    "sigmoid_norm": "sigmoid_norm",
}
PAIR_METHODS = list(TRL_TYPES)


class Tokens:
    """Per-token log-probs of B chosen and B rejected answers (random lengths), the leaves of every gradient."""

    def __init__(self, seed: int = 0, b: int = 6, t: int = 7, dtype: torch.dtype = torch.float64, scale: float = 1.0):
        g = torch.Generator().manual_seed(seed)
        self.b, self.t = b, t
        lengths = torch.randint(1, t + 1, (2 * b,), generator=g)
        self.mask = torch.arange(t)[None, :] < lengths[:, None]  # [2B, T], completion tokens first
        tok = -torch.rand(2 * b, t, generator=g, dtype=dtype) * 3 * scale - 0.01
        self.tok = (tok * self.mask).requires_grad_(True)
        self.ref = (-torch.rand(2 * b, generator=g, dtype=dtype) * 3 * t * scale).detach()
        self.ygen_tok = (-torch.rand(3 * b, generator=g, dtype=dtype) * 2).requires_grad_(True)
        self.ygen_index = torch.arange(b).repeat_interleave(3)
        # the chosen sequences' prompt tokens after the first (orpo's NLL covers them, as TRL's)
        plen = torch.randint(0, t + 1, (b,), generator=g)
        self.pmask = torch.arange(t)[None, :] < plen[:, None]
        ptok = -torch.rand(b, t, generator=g, dtype=dtype) * 3 * scale - 0.01
        self.ptok = (ptok * self.pmask).requires_grad_(True)

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = (self.tok * self.mask).sum(1)
        return s[: self.b], s[self.b :]

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.mask.sum(1)
        return n[: self.b], n[self.b :]

    def logps(self, with_ygen: bool = True) -> LogProbs:
        pc, pr = self.sums()
        nc, nr = self.counts()
        extra = {"ygen_token_logps": self.ygen_tok, "ygen_index": self.ygen_index} if with_ygen else {}
        return LogProbs(policy_chosen=pc, n_chosen=nc, policy_rejected=pr, n_rejected=nr,
                        ref_chosen=self.ref[: self.b], ref_rejected=self.ref[self.b :], **extra,
                        prompt_chosen=(self.ptok * self.pmask).sum(1), n_prompt=self.pmask.sum(1))

    def grad(self, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gt, gy, gp = torch.autograd.grad(loss, [self.tok, self.ygen_tok, self.ptok], allow_unused=True)
        return gt, (torch.zeros_like(self.ygen_tok) if gy is None else gy), (torch.zeros_like(self.ptok) if gp is None else gp)


def step_loss(method: str, cfg: LossConfig, logps: LogProbs) -> torch.Tensor:
    """A batch's loss as the trainer reduces a step: the registry entry's weights."""
    spec = LOSSES[method]
    out = spec(cfg, logps)
    n_chosen = logps.n_chosen.numpy().astype(np.float64)
    if spec.scores_prompt(cfg):  # the token part also counts the chosen prompts' tokens
        n_chosen = n_chosen + logps.n_prompt.numpy().astype(np.float64)
    w = torch.as_tensor(spec.step_weights(n_chosen), dtype=out.loss.dtype)
    return spec.weighted(out, w)


# --------------------------------------------------------------------------------------------------
# Independent formulas (plain PyTorch)
# --------------------------------------------------------------------------------------------------


def ls(x: torch.Tensor) -> torch.Tensor:
    return torch.log(torch.sigmoid(x))


def formula(method: str, tk: Tokens, beta: float, eps: float = 0.0, tau: float = 0.05,
            orpo_nll: str = "sequence") -> torch.Tensor:
    """The batch loss of ``method`` (mean over pairs), from the papers' formulas with TRL's choices."""
    pc, pr = tk.sums()
    nc, nr = (n.to(pc.dtype) for n in tk.counts())
    rc, rr = tk.ref[: tk.b], tk.ref[tk.b :]
    c, r = pc - rc, pr - rr
    d = c - r
    if method == "dpo":
        per = -(1 - eps) * ls(beta * d) - eps * ls(-beta * d)
    elif method == "ipo":
        per = ((c / nc - r / nr) - 1 / (2 * beta)) ** 2
    elif method == "hinge":
        per = torch.clamp(1 - beta * d, min=0)
    elif method == "robust":
        per = (-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps)
    elif method == "exo_pair":
        qw, ql = torch.sigmoid(beta * d), 1 - torch.sigmoid(beta * d)
        per = qw * torch.log(qw / (1 - eps)) + ql * torch.log(ql / eps)
    elif method == "nca_pair":
        per = -ls(beta * c) - 0.5 * ls(-beta * c) - 0.5 * ls(-beta * r)
    elif method == "bco_pair":
        per = -ls(beta * c) - ls(-beta * r)
    elif method == "sppo_hard":
        per = (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    elif method == "aot":
        delta = torch.sort(pc - pr).values - torch.sort(rc - rr).values
        per = -(1 - eps) * ls(beta * delta) - eps * ls(-beta * delta)
    elif method == "aot_unpaired":
        delta = torch.sort(c).values - torch.sort(r).values
        per = -(1 - eps) * ls(beta * delta) - eps * ls(-beta * delta)
    elif method == "apo_zero":
        per = (1 - torch.sigmoid(beta * c)) + torch.sigmoid(beta * r)
    elif method == "apo_down":
        per = torch.sigmoid(beta * c) + (1 - torch.sigmoid(beta * d))
    elif method == "discopop":
        x = beta * d
        m = torch.sigmoid(x / tau)
        per = (1 - m) * torch.log1p(torch.exp(-x)) + m * torch.exp(-x)
    elif method == "sigmoid_norm":
        per = -ls(beta * (c / nc - r / nr))
    elif method == "orpo":
        mw, ml = pc / nc, pr / nr
        log_odds = torch.log(torch.exp(mw) / (1 - torch.exp(mw))) - torch.log(torch.exp(ml) / (1 - torch.exp(ml)))
        nll = -(tk.tok[: tk.b] * tk.mask[: tk.b]).sum() / tk.mask[: tk.b].sum()
        if orpo_nll == "sequence":  # the chosen sequences' prompt tokens too: a mean over all of them
            nll = -((tk.tok[: tk.b] * tk.mask[: tk.b]).sum() + (tk.ptok * tk.pmask).sum()) / (
                tk.mask[: tk.b].sum() + tk.pmask.sum())
        return nll - beta * ls(log_odds).mean()
    elif method == "sft":
        return -(tk.tok[: tk.b] * tk.mask[: tk.b]).sum() / tk.mask[: tk.b].sum()
    else:
        raise AssertionError(method)
    return per.mean()


def _cfg(method: str, **kw: object) -> LossConfig:
    return LossConfig.defaults(method, **kw)


CASES = [(m, {}) for m in PAIR_METHODS] + [
    ("dpo", {"label_smoothing": 0.2}), ("robust", {"label_smoothing": 0.1}), ("robust", {"label_smoothing": 0.49}),
    ("exo_pair", {"label_smoothing": 0.3}), ("aot", {"label_smoothing": 0.25}), ("aot_unpaired", {"label_smoothing": 0.1}),
    ("discopop", {"discopop_tau": 1.0}), ("discopop", {"discopop_tau": 0.01}), ("ipo", {"beta": 0.5}),
    ("orpo", {}), ("orpo", {"beta": 0.5}), ("orpo", {"orpo_nll": "answer"}),
]


@pytest.mark.parametrize("method,kw", CASES, ids=[f"{m}-{kw}" for m, kw in CASES])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_each_loss_equals_its_formula_values_and_gradients(method, kw, dtype):
    beta = kw.pop("beta", 0.3)
    cfg = _cfg(method, beta=beta, **kw)
    tk = Tokens(seed=zlib.crc32(method.encode()) % 1000, dtype=dtype)
    ours = step_loss(method, cfg, tk.logps())
    want = formula(method, tk, beta, cfg.label_smoothing, cfg.discopop_tau, cfg.orpo_nll)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, want, **tol)
    for g_ours, g_want in zip(tk.grad(ours), tk.grad(want), strict=True):
        torch.testing.assert_close(g_ours, g_want, **tol)


def test_defaults_follow_trl():
    for m in PAIR_METHODS[1:] + ["orpo"]:
        assert _cfg(m).beta == 0.1, m  # DPOConfig.beta / ORPOConfig.beta
    assert _cfg("dpo").beta == 0.01  # the DPPO paper's DPO
    assert _cfg("robust").label_smoothing == 0.0 and _cfg("dpo").label_smoothing == 0.0
    assert _cfg("exo_pair").label_smoothing == 1e-3  # TRL refuses 0 for exo_pair, recommends 1e-3
    assert _cfg("discopop").discopop_tau == 0.05
    assert not LOSSES["orpo"].needs_reference
    assert all(LOSSES[m].needs_reference for m in PAIR_METHODS)


# --------------------------------------------------------------------------------------------------
# Edge cases the papers name
# --------------------------------------------------------------------------------------------------


def _hand(c: float, r: float, nc: int = 1, nr: int = 1) -> LogProbs:
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return LogProbs(policy_chosen=t(c), n_chosen=t(nc), policy_rejected=t(r), n_rejected=t(nr),
                    ref_chosen=t(0.0), ref_rejected=t(0.0))


def test_ipo_is_zero_at_its_target_margin_one_over_two_beta():
    for beta in (0.1, 0.5, 2.0):
        target = 1 / (2 * beta)
        # per-token mean log-ratios: chosen 3 tokens, rejected 2 tokens
        lp = _hand(3 * (0.7 + target), 2 * 0.7, 3, 2)
        pc = lp.policy_chosen.clone().requires_grad_(True)
        out = LOSSES["ipo"](_cfg("ipo", beta=beta), LogProbs(**{**lp.__dict__, "policy_chosen": pc}))
        assert out.loss.item() == pytest.approx(0.0, abs=1e-12)
        (g,) = torch.autograd.grad(out.loss.sum(), pc)
        assert g.abs().item() < 1e-10
        above = LOSSES["ipo"](_cfg("ipo", beta=beta), _hand(3 * (0.7 + target + 0.1), 2 * 0.7, 3, 2)).loss.item()
        assert above == pytest.approx(0.01)  # squared distance from the target, per token


def test_robust_label_smoothing_range_and_limits():
    lp = _hand(-1.0, -3.0)
    dpo = LOSSES["dpo"](_cfg("dpo", beta=0.5), lp).loss
    torch.testing.assert_close(LOSSES["robust"](_cfg("robust", beta=0.5), lp).loss, dpo)  # eps 0 = DPO
    for bad in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match="label_smoothing"):
            _cfg("robust", label_smoothing=bad)
    # unbiased: the expectation over a flipped label with probability eps is the clean DPO loss
    eps = 0.2
    cfg = _cfg("robust", beta=0.5, label_smoothing=eps)
    clean = LOSSES["robust"](cfg, lp).loss
    flipped = LOSSES["robust"](cfg, _hand(-3.0, -1.0)).loss
    torch.testing.assert_close((1 - eps) * clean + eps * flipped, dpo)


def test_exo_pair_needs_positive_smoothing_and_is_a_kl():
    with pytest.raises(ValueError, match="exo_pair"):
        _cfg("exo_pair", label_smoothing=0.0)
    eps = 0.1
    # KL(q || p) = 0 when q = p: beta d = log((1 - eps) / eps)
    d = math.log((1 - eps) / eps)
    out = LOSSES["exo_pair"](_cfg("exo_pair", beta=1.0, label_smoothing=eps), _hand(d, 0.0))
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)


def test_discopop_tau_shapes_the_blend():
    # at beta d = 0 the modulation is 1/2 for any tau: (log 2 + 1) / 2
    for tau in (0.01, 0.05, 1.0):
        out = LOSSES["discopop"](_cfg("discopop", discopop_tau=tau), _hand(0.0, 0.0))
        assert out.loss.item() == pytest.approx((math.log(2) + 1) / 2)
    # small tau: a hard switch between the logistic loss (x < 0) and the exponential (x > 0)
    x = 0.5  # beta d with beta 0.1, d 5
    lo = LOSSES["discopop"](_cfg("discopop", discopop_tau=1e-3), _hand(5.0, 0.0)).loss.item()
    assert lo == pytest.approx(math.exp(-x), rel=1e-6)
    lo = LOSSES["discopop"](_cfg("discopop", discopop_tau=1e-3), _hand(0.0, 5.0)).loss.item()
    assert lo == pytest.approx(math.log1p(math.exp(x)), rel=1e-6)
    with pytest.raises(ValueError, match="discopop_tau"):
        _cfg("discopop", discopop_tau=0.0)


def test_aot_with_the_steps_context_is_exact_for_any_split():
    """aot sorts over the batch; given the whole step's context, micro-batches sum to the step's loss."""
    for method in ("aot", "aot_unpaired"):
        cfg = _cfg(method, beta=0.3, label_smoothing=0.1)
        tk = Tokens(seed=5, b=8)
        whole = step_loss(method, cfg, tk.logps())
        lp = tk.logps()
        ctx = aot_context(cfg, lp)
        total = 0.0
        for part in (torch.arange(0, 3), torch.arange(3, 4), torch.arange(4, 8)):
            sub = LogProbs(**{k: (v[part] if k not in ("ygen_token_logps", "ygen_index") else v)
                              for k, v in lp.__dict__.items() if v is not None and k != "context"},
                           context={k: v[part] for k, v in ctx.items()})
            total = total + LOSSES[method](cfg, sub).loss.sum() / 8
        torch.testing.assert_close(total, whole)
        for a, b in zip(tk.grad(total), tk.grad(whole), strict=True):
            torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------
# TRL's own code as the judge
# --------------------------------------------------------------------------------------------------


class _FakeOutputs(SimpleNamespace):
    pass


def trl_dpo_loss(tk: Tokens, loss_types: list[str], beta: float, weights: list[float] | None = None,
                 eps: float = 0.0, tau: float = 0.05) -> torch.Tensor:
    """TRL's DPOTrainer._compute_loss on ``tk``'s per-token log-probs (a stand-in model returns them)."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    b2, t = tk.tok.shape
    # TRL's layout: [2B, T + 1] ids, prompt of one token, completion after it; log_probs [2B, T]
    completion = torch.cat([torch.zeros(b2, 1, dtype=torch.long), tk.mask.long()], dim=1)
    zeros = torch.zeros(b2, t, dtype=tk.tok.dtype)

    class Model:
        training = True

        def __call__(self, **kw):
            return _FakeOutputs(log_probs=tk.tok * tk.mask, entropy=zeros, mean_logits=zeros,
                                is_top1=torch.zeros(b2, t, dtype=torch.bool), log_sum_sq_probs=zeros, aux_loss=None)

    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    metrics: dict = {}
    fake = SimpleNamespace(
        model=Model(), accelerator=acc, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=loss_types, loss_weights=weights or [1.0] * len(loss_types),
        beta=beta, label_smoothing=eps, args=SimpleNamespace(discopop_tau=tau), use_weighting=False,
        _metrics={"train": _Metrics(metrics)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros(b2, t + 1, dtype=torch.long), "attention_mask": torch.ones(b2, t + 1, dtype=torch.long),
              "completion_mask": completion, "ref_chosen_logps": tk.ref[: tk.b], "ref_rejected_logps": tk.ref[tk.b :]}
    return trl_dpo.DPOTrainer._compute_loss(fake, fake.model, inputs, False)


class _Metrics(dict):
    def __init__(self, store: dict):
        super().__init__()

    def __missing__(self, key):
        self[key] = []
        return self[key]


TRL_CASES = [(m, {}) for m in PAIR_METHODS if m != "exo_pair"] + [
    ("exo_pair", {"label_smoothing": 1e-3}), ("exo_pair", {"label_smoothing": 0.2}),
    ("robust", {"label_smoothing": 0.1}), ("aot", {"label_smoothing": 0.2}), ("aot_unpaired", {"label_smoothing": 0.2}),
    ("discopop", {"discopop_tau": 0.5}),
]


@pytest.mark.parametrize("method,kw", TRL_CASES, ids=[f"{m}-{kw}" for m, kw in TRL_CASES])
def test_each_loss_equals_trls_dpo_trainer(method, kw):
    cfg = _cfg(method, beta=0.2, **kw)
    tk = Tokens(seed=11)
    ours = step_loss(method, cfg, tk.logps())
    theirs = trl_dpo_loss(tk, [TRL_TYPES[method]], 0.2, eps=cfg.label_smoothing, tau=cfg.discopop_tau)
    # TRL takes log(eps) of exo_pair in float32; everything else agrees to float64 rounding
    tol = dict(rtol=1e-7, atol=1e-9) if method == "exo_pair" else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, theirs, **tol)
    for a, b in zip(tk.grad(ours), tk.grad(theirs), strict=True):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("combo,types,weights", [
    ("dpo+sft", ["sigmoid", "sft"], None),  # RPO
    ("dpo+bco_pair+sft", ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
    ("ipo+hinge", ["ipo", "hinge"], [0.5, 2.0]),
    ("sft+aot", ["sft", "aot"], [0.3, 1.0]),
])
def test_combinations_equal_trls_weighted_loss_types(combo, types, weights):
    kw = {"loss_weights": ",".join(map(str, weights))} if weights else {}
    cfg = _cfg(combo, beta=0.2, **kw)
    tk = Tokens(seed=3)
    ours = step_loss(combo, cfg, tk.logps())
    theirs = trl_dpo_loss(tk, types, 0.2, weights=weights)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(tk.grad(ours), tk.grad(theirs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and each term's logged value
    out = LOSSES[combo](cfg, tk.logps())
    n = tk.logps().n_chosen.double()
    parts = {k: v.mean() for k, v in out.terms.items()}
    parts.update({k: v.sum() / n.sum() for k, v in (out.token_terms or {}).items()})
    w = [float(x) for x in cfg.loss_weights.split(",")]
    total = sum(wk * parts[f"loss/{name}"] for wk, name in zip(w, combo.split("+"), strict=True))
    torch.testing.assert_close(total, ours.detach())


def test_orpo_equals_trls_odds_ratio_loss_plus_the_chosen_nll():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    tk = Tokens(seed=4, scale=0.2)
    cfg = _cfg("orpo", beta=0.25)
    ours = step_loss("orpo", cfg, tk.logps())
    pc, pr = tk.sums()
    nc, nr = tk.counts()
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, *_ = orpo.ORPOTrainer.odds_ratio_loss(fake, pc / nc, pr / nr)
    # CrossEntropyLoss's token mean over the chosen sequences: prompt tokens (but the first) and answer
    nll = -((tk.tok[: tk.b] * tk.mask[: tk.b]).sum() + (tk.ptok * tk.pmask).sum()) / (tk.mask[: tk.b].sum() + tk.pmask.sum())
    theirs = nll - losses.mean()
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-6, atol=1e-7)  # TRL computes in float32
    assert not LOSSES["orpo"].needs_reference


class _Pairs(list):
    kind = "pairs"
    has_ygen = False


def _random_pairs(vocab: int, n: int, seed: int) -> _Pairs:
    g = np.random.default_rng(seed)
    ids = lambda k: g.integers(1, vocab, size=k).astype(np.int64)  # noqa: E731
    return _Pairs({"prompt_ids": ids(int(g.integers(1, 9))), "chosen_ids": ids(int(g.integers(1, 8))),
                   "rejected_ids": ids(int(g.integers(1, 8)))} for _ in range(n))


def _trl_pair_batch(pairs: _Pairs) -> dict[str, torch.Tensor]:
    """ORPOTrainer's and CPOTrainer's collated batch: prompt + answer ids right-padded, labels -100
    on the prompt and padding."""
    batch: dict[str, torch.Tensor] = {}
    for side in ("chosen", "rejected"):
        seqs = [np.concatenate([ex["prompt_ids"], ex[f"{side}_ids"]]) for ex in pairs]
        width = max(len(x) for x in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (ex, x) in enumerate(zip(pairs, seqs, strict=True)):
            ids[i, : len(x)] = torch.from_numpy(x)
            mask[i, : len(x)] = 1
            labels[i, len(ex["prompt_ids"]) : len(x)] = torch.from_numpy(ex[f"{side}_ids"])
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    return batch


def _packed_step(model, pairs: _Pairs, cfg: LossConfig):
    """One step's loss of ``pairs`` as the trainer computes it: the packed forward, the registry
    entry's loss and its step weights (a token part over the step's counted tokens)."""
    from dppo.train.registry import ygen_plan
    from dppo.train.step import StepInputs, counted_tokens, forward_logps

    spec = LOSSES[cfg.method]
    inputs = StepInputs(model, pairs, cfg, spec, None, torch.device("cpu"), ygen_plan(cfg), chunk_size=16)
    ids = np.arange(len(pairs))
    out = spec(cfg, forward_logps(inputs, ids))
    lengths = {k: np.array([len(ex[f"{k}_ids"]) for ex in pairs]) for k in ("prompt", "chosen", "rejected")}
    w = torch.as_tensor(spec.step_weights(counted_tokens(lengths, ids, spec.scores_prompt(cfg))), dtype=out.loss.dtype)
    return spec.weighted(out, w), out


def _twin_models(vocab: int, seed: int):
    """The same tiny model twice: eager attention for TRL's padded batches, packed attention for dppo."""
    import copy

    from tiny_models import causal_lm

    from dppo.modeling import use_packed_attention

    theirs = causal_lm(vocab, seed=seed, attn_implementation="eager")
    return theirs, use_packed_attention(copy.deepcopy(theirs))


def _assert_same_grads(loss, model, theirs_grads) -> None:
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), grads, theirs_grads, strict=True):
        # fp32 forwards through two attention kernels (packed, padded eager) and two log-softmaxes
        # (dppo's chunked fp32 one, TRL's): measured up to ~4e-6 of the largest entry
        atol = 1e-5 * max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_orpo_through_the_packed_forward_equals_trls_orpo_trainer(beta):
    """dppo's orpo step (packed forward, the entry's token weights) against ORPOTrainer's own
    get_batch_loss_metrics on the same tiny model and pairs: the loss, its NLL and the gradient of
    every weight. TRL's NLL covers the chosen sequences' prompt tokens (its labels are the input ids
    wherever the attention mask is 1), so dppo's default does; orpo_nll "answer" does not match."""
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    theirs_model, ours_model = _twin_models(53, seed=2)
    pairs = _random_pairs(53, 5, seed=int(beta * 10))

    trainer = orpo.ORPOTrainer.__new__(orpo.ORPOTrainer)  # its loss code, without building a run
    trainer.__dict__.update(is_encoder_decoder=False, padding_value=0, aux_loss_enabled=False, beta=beta,
                            accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x))
    theirs, metrics = orpo.ORPOTrainer.get_batch_loss_metrics(trainer, theirs_model, _trl_pair_batch(pairs))
    theirs_grads = torch.autograd.grad(theirs, list(theirs_model.parameters()))

    def ours(orpo_nll: str) -> tuple[torch.Tensor, dict]:
        loss, out = _packed_step(ours_model, pairs, _cfg("orpo", beta=beta, orpo_nll=orpo_nll))
        nll = (out.token_terms["nll_loss"].sum() / out.n_tokens.sum()).item()
        return loss, {"nll_loss": nll, "rewards/chosen": out.chosen_rewards.mean().item(),
                      "rewards/rejected": out.rejected_rewards.mean().item()}

    loss, record = ours("sequence")
    torch.testing.assert_close(loss, theirs, rtol=2e-6, atol=1e-6)
    for k, v in record.items():
        assert v == pytest.approx(metrics[k], rel=2e-6, abs=1e-6), k
    _assert_same_grads(loss, ours_model, theirs_grads)
    # the answer-only reading is another loss: the prompt tokens change the NLL
    answer, record = ours("answer")
    assert abs(answer.item() - theirs.item()) > 1e-3
    assert abs(record["nll_loss"] - metrics["nll_loss"]) > 1e-3


@pytest.mark.parametrize("beta,gamma,cpo_alpha", [(2.5, 1.0, 0.0), (0.3, 0.2, 0.0), (2.5, 1.0, 0.7)])
def test_simpo_equals_trls_cpo_trainer_with_loss_type_simpo(beta, gamma, cpo_alpha):
    """dppo's simpo is CPOTrainer(loss_type="simpo", cpo_alpha=0) at the same beta and gamma (TRL's
    simpo_gamma is the same absolute margin: it divides it by beta inside the sigmoid's beta);
    CPOTrainer's cpo_alpha adds its NLL over the chosen answers, dppo's simpo+sft term. Loss,
    rewards and every weight's gradient, through dppo's packed forward and TRL's own loss code."""
    cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    theirs_model, ours_model = _twin_models(47, seed=3)
    pairs = _random_pairs(47, 6, seed=int(beta * 100 + cpo_alpha * 10))
    trainer = cpo.CPOTrainer.__new__(cpo.CPOTrainer)
    trainer.__dict__.update(is_encoder_decoder=False, pad_token_id=0, aux_loss_enabled=False, beta=beta, alpha=0.0,
                            loss_type="simpo", simpo_gamma=gamma, label_smoothing=0.0, cpo_alpha=cpo_alpha,
                            accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x))
    theirs, metrics = cpo.CPOTrainer.get_batch_loss_metrics(trainer, theirs_model, _trl_pair_batch(pairs))
    theirs_grads = torch.autograd.grad(theirs, list(theirs_model.parameters()))
    method, extra = ("simpo", {}) if cpo_alpha == 0 else ("simpo+sft", {"loss_weights": f"1,{cpo_alpha}"})
    loss, out = _packed_step(ours_model, pairs, _cfg(method, beta=beta, gamma=gamma, **extra))
    torch.testing.assert_close(loss, theirs, rtol=2e-6, atol=1e-6)
    assert out.chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"], rel=2e-6, abs=1e-6)
    assert out.rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"], rel=2e-6, abs=1e-6)
    _assert_same_grads(loss, ours_model, theirs_grads)


# --------------------------------------------------------------------------------------------------
# Combinations and the DPPO penalties on any pair loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["ipo", "hinge", "orpo", "sigmoid_norm", "dpo+sft", "aot"])
@pytest.mark.parametrize("pen", ["unll", "minll"])
def test_a_penalty_at_alpha_zero_is_exactly_the_base_loss(base, pen):
    tk = Tokens(seed=7)
    base_loss = step_loss(base, _cfg(base, beta=0.3), tk.logps())
    combo = f"{base}+{pen}"
    with_pen = step_loss(combo, _cfg(combo, beta=0.3, alpha=0.0), tk.logps())
    assert torch.equal(with_pen, base_loss)
    for a, b in zip(tk.grad(with_pen), tk.grad(base_loss), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pen", ["unll", "minll"])
def test_dpo_plus_a_penalty_term_is_the_dppo_method(pen):
    tk = Tokens(seed=8)
    kw = dict(beta=0.2, alpha=0.7, weight="linear", vote_clip=5.0)
    dppo = step_loss(pen, _cfg(pen, **kw), tk.logps())
    combo = step_loss(f"dpo+{pen}", _cfg(f"dpo+{pen}", **kw), tk.logps())
    torch.testing.assert_close(combo, dppo, rtol=1e-12, atol=1e-12)
    for a, b in zip(tk.grad(combo), tk.grad(dppo), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ipo_plus_unll_is_ipo_plus_the_weighted_unlikelihood():
    tk = Tokens(seed=9)
    cfg = _cfg("ipo+unll", beta=0.3, alpha=0.5, weight="linear", vote_clip=4.0)
    ours = step_loss("ipo+unll", cfg, tk.logps())
    pc, pr = tk.sums()
    r_n = torch.clamp(pc - pr, -4.0, 4.0) / 4.0
    f = -(r_n < 0).double() * r_n
    p = torch.exp(tk.ygen_tok)
    ul = torch.zeros(tk.b, dtype=torch.float64).index_add(0, tk.ygen_index, -torch.log(1 - p)) / 3
    want = formula("ipo", tk, 0.3) + (0.5 * f * ul).mean()
    torch.testing.assert_close(ours, want)
    for a, b in zip(tk.grad(ours), tk.grad(want), strict=True):
        torch.testing.assert_close(a, b)


def test_combination_errors_name_the_problem():
    for bad, match in (("ipo+conll", "conll"), ("ipo+ipo", "twice"), ("ipo+nope", "nope"),
                       ("unll+minll", "preference loss"), ("ipo+", "combination")):
        with pytest.raises(ValueError, match=match):
            LossConfig.defaults(bad)
    with pytest.raises(ValueError, match="one weight per term"):
        _cfg("ipo+sft", loss_weights="1,2,3")
    with pytest.raises(ValueError, match="loss_weights"):
        _cfg("ipo+sft", loss_weights="1,-2")
    assert "ipo+sft" in LOSSES and "ipo+nope" not in LOSSES
    assert "ipo+sft" not in list(LOSSES)  # combinations are built on use, not listed


def test_combination_defaults_come_from_the_first_term_that_reads_them():
    assert _cfg("dpo+bco_pair+sft").beta == 0.01  # dpo's
    assert _cfg("bco_pair+dpo").beta == 0.1
    c = _cfg("ipo+unll")
    assert (c.alpha, c.weight, c.vote_clip) == (0.1, "quadratic", 2000.0)
    assert _cfg("ipo+minll").weight == "expectile" and _cfg("ipo+minll").alpha == 10.0
    assert not LOSSES["orpo+unll"].needs_reference and LOSSES["orpo+unll"].needs_ygen
    assert LOSSES["dpo+sft"].token_part and not LOSSES["dpo+hinge"].token_part


def test_bco_pair_running_mean_shifts_the_rewards_by_the_running_mean():
    from dppo.train.losses_pairs import pair_context

    beta = 0.4
    cfg = _cfg("bco_pair", beta=beta, bco_running_mean=True)
    state: dict = {}
    seen = []
    for seed in range(3):  # three steps: delta is the mean of the steps' mean rewards, this one included
        tk = Tokens(seed=20 + seed)
        lp = tk.logps()
        ctx, state = pair_context(cfg, lp, state)
        pc, pr = tk.sums()
        c, r = pc - tk.ref[: tk.b], pr - tk.ref[tk.b :]
        seen.append(torch.cat([beta * c, beta * r]).mean().item())
        delta = sum(seen) / len(seen)
        assert state == {"bco_mean": pytest.approx(delta), "bco_steps": seed + 1}
        ours = step_loss("bco_pair", cfg, LogProbs(**{**lp.__dict__, "context": ctx}))
        want = (-ls(beta * c - delta) - ls(-(beta * r - delta))).mean()
        torch.testing.assert_close(ours, want)
        for a, b in zip(tk.grad(ours), tk.grad(want), strict=True):
            torch.testing.assert_close(a, b)
    # off (TRL 1.16's default): no shift, no state
    assert pair_context(_cfg("bco_pair"), Tokens().logps(), {}) == ({}, {})
    assert not LOSSES["bco_pair"].uses_context(_cfg("bco_pair")) and LOSSES["bco_pair"].uses_context(cfg)
    assert LOSSES["dpo+bco_pair+sft"].uses_context(_cfg("dpo+bco_pair+sft", bco_running_mean=True))
    assert not LOSSES["dpo+bco_pair+sft"].uses_context(_cfg("dpo+bco_pair+sft"))
    assert LOSSES["aot+bco_pair"].uses_context(_cfg("aot+bco_pair"))
