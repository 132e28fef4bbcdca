"""One micro-batch of examples -> the log-probabilities a loss consumes: the trainer's hard part.

A run's forwards share one :class:`StepInputs` (the model, the shards, the configured loss and its
registry entry, the cached reference log-probs, how to run the packed forward). For a micro-batch
of example ids, :func:`forward_logps` packs the examples' sequences into one row without padding
(SFT: prompt + response; pairs: prompt + chosen and prompt + rejected, plus prompt + y_gen where the
loss's y_gen term is not known to vanish) and returns :class:`~dppo.train.losses.LogProbs`.

Which y_gen sequences run is the loss's :class:`~dppo.train.registry.YgenPlan` applied by one
function, :func:`ygen_to_run`: all of them (no skipping possible or wanted); those whose weight
f(r) is nonzero by the reference's vote, exactly when the vote is the reference's (or alpha is 0);
or, with the policy's own vote, those the reference's vote predicts, followed after the forward by
a second, small row for the examples it mispredicted. Skipping changes no value: the losses zero
those terms anyway (``losses.can_skip_ygen``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dppo.data import Shards
from dppo.distributed import SINGLE, Dist, all_gather_objects, all_reduce_max, all_reduce_sum
from dppo.modeling import PackedBatch, SeqLogps, sequence_logps
from dppo.modeling.logprobs import segment_sums
from dppo.train.losses import LogProbs, LossConfig, LossOutput, LossSpec, can_skip_ygen, vote
from dppo.train.refcache import RefLogps
from dppo.train.registry import YgenPlan, ygen_plan

__all__ = ["StepInputs", "TokenCounts", "PolicyForward", "forward_logps", "ygen_to_run", "example_tokens",
           "counted_tokens", "eval_loss", "summarize", "step_context", "with_context"]


@dataclass
class TokenCounts:
    """Tokens a step pushed through the policy (for tokens/s and the MFU estimate)."""

    tokens: int = 0  # every position of every packed row
    counted: int = 0  # response positions (the only ones projected onto the vocabulary)
    attn: int = 0  # sum over sequences of length^2 (attention cost)

    def add(self, batch: PackedBatch) -> None:
        lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1]).long()
        self.tokens += batch.num_tokens
        self.counted += batch.target_pos.numel()
        self.attn += int((lengths * lengths).sum())

    def total(self, d: Dist) -> TokenCounts:
        """The counts summed over ranks."""
        t, c, a = all_reduce_sum(d, self.tokens, self.counted, self.attn)
        return TokenCounts(int(t), int(c), int(a))


@dataclass(frozen=True)
class StepInputs:
    """What every forward of a run shares.

    Attributes:
        model: the policy (packed attention registered, see :func:`dppo.modeling.load_model`).
        shards: the examples.
        loss_cfg: the configured loss; ``objective`` its registry entry.
        ref: the cached reference log-probs (None for a loss without a reference).
        device: where the model runs.
        ygen: which y_gen sequences run (:func:`~dppo.train.registry.ygen_plan`).
        chunk_size, kernel, keep_probs_bytes: how the packed forward runs (``dppo.modeling``).
        dist: this rank's place in the job.
        lockstep: every rank must run the same forwards (FSDP gathers parameters in each): the
            second y_gen row then runs on every rank, empty where a rank needs none.
    """

    model: torch.nn.Module
    shards: Shards
    loss_cfg: LossConfig
    objective: LossSpec
    ref: RefLogps | None
    device: torch.device
    ygen: YgenPlan
    chunk_size: int = 1024
    kernel: str = "auto"
    keep_probs_bytes: int = 0
    dist: Dist = SINGLE
    lockstep: bool = False

    @classmethod
    def of(cls, cfg: Any, model: torch.nn.Module, shards: Shards, loss_cfg: LossConfig, objective: LossSpec,
           ref: RefLogps | None, device: torch.device, dist: Dist = SINGLE, lockstep: bool = False) -> StepInputs:
        """From a :class:`~dppo.train.config.TrainConfig`'s speed knobs."""
        return cls(model, shards, loss_cfg, objective, ref, device, ygen_plan(loss_cfg, cfg.skip_ygen),
                   cfg.chunk_size, cfg.kernel, cfg.keep_probs_mb << 20, dist, lockstep)


class PolicyForward(torch.nn.Module):
    """The policy's forward as one module, so that DDP and FSDP2 see one forward per micro-batch
    (the y_gen rows included): ``module(inputs, ids)`` is :func:`forward_logps`, ``module(inputs,
    batch=b)`` scores a packed row (the reference pass with the policy as its own reference). The
    inputs travel with each call (a step's alpha, the evaluation's shards), never stored on the module."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, inputs: StepInputs, ids: np.ndarray | None = None, counts: TokenCounts | None = None,
                batch: PackedBatch | None = None) -> LogProbs | SeqLogps:
        if batch is not None:
            return _run(inputs, batch, counts)
        return forward_logps(inputs, ids, counts)


def example_tokens(lengths: dict[str, np.ndarray], ids: np.ndarray, objective: LossSpec) -> np.ndarray:
    """Tokens each example of ``ids`` puts through the policy: its sequences, the prompt once per
    sequence (prompt + response for SFT; prompt + chosen and prompt + rejected for pairs, plus
    prompt + y_gen where the loss has a y_gen term, counted even where it may be skipped)."""
    prompt = lengths["prompt"][ids]
    if "response" in lengths:
        return prompt + lengths["response"][ids]
    total = 2 * prompt + lengths["chosen"][ids] + lengths["rejected"][ids]
    if objective.needs_ygen and "ygen" in lengths:
        total = total + prompt + lengths["ygen"][ids]
    return total


def counted_tokens(lengths: dict[str, np.ndarray], ids: np.ndarray, prompt: bool = False) -> np.ndarray:
    """The counted (response) tokens of each example of ``ids``: a token-reduced loss's denominator.

    ``prompt``: the token part also covers the chosen sequence's prompt tokens after the first
    (:meth:`~dppo.train.registry.LossSpec.scores_prompt`)."""
    counted = lengths["response" if "response" in lengths else "chosen"][ids].astype(np.float64)
    if prompt:
        counted = counted + np.maximum(lengths["prompt"][ids].astype(np.float64) - 1, 0)
    return counted


def _run(inputs: StepInputs, seqs: list | PackedBatch, counts: TokenCounts | None) -> SeqLogps:
    batch = seqs if isinstance(seqs, PackedBatch) else PackedBatch.from_sequences(seqs)
    if counts is not None:
        counts.add(batch)
    return sequence_logps(inputs.model, batch.to(inputs.device, non_blocking=True), inputs.chunk_size, inputs.kernel,
                          inputs.keep_probs_bytes)


def ygen_to_run(plan: YgenPlan, loss_cfg: LossConfig, refs: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    """[n] bool: which examples' y_gen ride in the micro-batch's row before the policy's vote is known.

    Every one without skipping; otherwise those whose f(r) is nonzero under the reference's vote:
    exact when the vote is the reference's (``plan.known_before``), a prediction when it is the
    policy's (the policy starts as, and stays close to, the reference)."""
    if not plan.forward:
        return torch.zeros(n, dtype=torch.bool)
    if not plan.skip:
        return torch.ones(n, dtype=torch.bool)
    if not refs:  # a loss without a reference: no prediction; the second row runs exactly those needed
        return torch.zeros(n, dtype=torch.bool)
    probe = LogProbs(policy_chosen=refs["ref_chosen"], policy_rejected=refs["ref_rejected"], **refs)
    return ~can_skip_ygen(loss_cfg, vote(loss_cfg, probe)).cpu()


def forward_logps(inputs: StepInputs, ids: np.ndarray, counts: TokenCounts | None = None) -> LogProbs:
    """Policy (and cached reference) log-probabilities of examples ``ids``, as :class:`LogProbs`.

    SFT: one sequence per example, its label spans counted. Pairs: (prompt, chosen) and (prompt, rejected)
    of every example in one packed row, plus (prompt, y_gen) of the examples :func:`ygen_to_run`
    picks, and after the forward a second row for those the policy's vote needs beyond them.
    Differentiable when grad is enabled.
    """
    shards = inputs.shards
    examples = [shards[int(i)] for i in ids]
    if shards.kind == "sft":
        # every label span of the example counts (each assistant turn of a whole conversation)
        out = _run(inputs, PackedBatch.from_token_masks([(ex["input_ids"], ex["labels"] != -100) for ex in examples]), counts)
        return LogProbs(policy_chosen=out.sums.clone(), n_chosen=out.counts.clone())

    b = len(examples)
    seqs = [s for ex in examples for s in ((ex["prompt_ids"], ex["chosen_ids"]), (ex["prompt_ids"], ex["rejected_ids"]))]
    with_prompt = inputs.objective.scores_prompt(inputs.loss_cfg)
    refs = inputs.ref.batch(ids, inputs.device) if inputs.ref is not None else {}
    need = ygen_to_run(inputs.ygen, inputs.loss_cfg, refs, b)

    def ygen_seqs(mask: torch.Tensor) -> list:
        return [(ex["prompt_ids"], ex["ygen_ids"]) for ex, m in zip(examples, mask.tolist(), strict=True) if m]

    prompt_fields: dict[str, torch.Tensor] = {}
    if with_prompt:  # the chosen sequences' prompt tokens count too (all but the first), summed apart
        out, prompt_fields = _run_with_prompts(inputs, seqs + ygen_seqs(need), b, counts)
    else:
        out = _run(inputs, seqs + ygen_seqs(need), counts)
    chosen, rejected = out.sums[0 : 2 * b : 2], out.sums[1 : 2 * b : 2]
    # y_gen token log-probs and the example each belongs to, from one or two rows
    ygen: list[tuple[SeqLogps, torch.Tensor]] = []
    if need.any():
        ygen.append((out.select(range(2 * b, 2 * b + int(need.sum()))), need))
    if inputs.ygen.skip and not inputs.ygen.known_before:
        # The policy's vote is known now: the examples whose f(r) != 0 (the same test the loss
        # applies, on the same fp32 values, so the two agree) and whose y_gen was not in the row.
        probe = LogProbs(policy_chosen=chosen.detach(), policy_rejected=rejected.detach(), **refs)
        missing = ~can_skip_ygen(inputs.loss_cfg, vote(inputs.loss_cfg, probe)).cpu() & ~need
        anywhere = bool(missing.any())
        if inputs.lockstep:  # every rank runs the second row if any rank needs one
            anywhere = all_reduce_max(inputs.dist, float(anywhere))[0] > 0
        if anywhere and missing.any():
            ygen.append((_run(inputs, ygen_seqs(missing), counts), missing))
        elif anywhere:  # a row of one example at weight 0: this rank needs none, the others do
            pad = _run(inputs, [(examples[0]["prompt_ids"], examples[0]["ygen_ids"][:1])], None).sums.sum()
            chosen = chosen + 0.0 * pad

    fields: dict[str, torch.Tensor] = {}
    if inputs.objective.needs_ygen:
        fields["ygen_token_logps"] = torch.cat([chosen.new_zeros(0)] + [s.token_logps for s, _ in ygen])
        owners = [torch.nonzero(mask)[:, 0].to(chosen.device)[s.token_seq] for s, mask in ygen]  # example of each token
        fields["ygen_index"] = torch.cat([torch.zeros(0, dtype=torch.long, device=chosen.device)] + owners)
    # copies, not views of the row's results: FSDP2 hooks the outputs of a sharded module's forward
    return LogProbs(
        policy_chosen=chosen.clone(),
        n_chosen=out.counts[0 : 2 * b : 2].clone(),
        policy_rejected=rejected.clone(),
        n_rejected=out.counts[1 : 2 * b : 2].clone(),
        **refs,
        **fields,
        **prompt_fields,
    )


def _run_with_prompts(inputs: StepInputs, seqs: list, b: int, counts: TokenCounts | None) -> tuple[SeqLogps, dict]:
    """The row of ``seqs`` (prompt, response) with the prompt tokens of the chosen sequences (0, 2,
    .., 2b - 2) counted as well, but the first: the answers' sums and counts as :func:`_run` gives
    them, and ``prompt_chosen`` / ``n_prompt`` [b], the prompts' sums and counts."""
    pieces, prompt_flags = [], []
    for k, (prompt, response) in enumerate(seqs):
        prompt, response = np.asarray(prompt), np.asarray(response)
        mask = np.zeros(len(prompt) + len(response), dtype=bool)
        mask[len(prompt):] = True
        if k < 2 * b and k % 2 == 0:
            mask[1:len(prompt)] = True
        pieces.append((np.concatenate([prompt, response]), mask))
        prompt_flags.append(np.arange(len(prompt) + len(response))[mask] < len(prompt))
    out = _run(inputs, PackedBatch.from_token_masks(pieces), counts)
    flag = torch.from_numpy(np.concatenate(prompt_flags)).to(out.token_logps.device)
    n = len(seqs)
    answer, prompt_part = ~flag, flag
    def sums_of(keep: torch.Tensor) -> torch.Tensor:
        return segment_sums(out.token_logps[keep], out.token_seq[keep], n)

    sums = sums_of(answer)
    answer_counts = torch.bincount(out.token_seq[answer], minlength=n)
    prompt_sums = sums_of(prompt_part)
    prompt_counts = torch.bincount(out.token_seq[prompt_part], minlength=n)
    answers = SeqLogps(sums=sums, counts=answer_counts, token_logps=out.token_logps[answer], token_seq=out.token_seq[answer])
    return answers, {"prompt_chosen": prompt_sums[0 : 2 * b : 2].clone(), "n_prompt": prompt_counts[0 : 2 * b : 2].clone()}


# -------------------------------------------------------------------------------------------------
# Losses that compare an example with the rest of its step (aot sorts over the step)
# -------------------------------------------------------------------------------------------------

_CONTEXT_FIELDS = ("policy_chosen", "n_chosen", "policy_rejected", "n_rejected", "ref_chosen", "ref_rejected")


@torch.no_grad()
def step_context(run: Any, objective: LossSpec, loss_cfg: LossConfig, ids: np.ndarray, plan: list,
                 dist: Dist = SINGLE, state: dict | None = None) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """The per-example context of a step for a loss whose entry uses one, and the loss's state after
    the step (``(None, state)`` for the others: no extra forward).

    One no-grad forward of this rank's micro-batches (``plan``, positions in ``ids``; every rank
    runs one per entry of the plan, so sharded models stay in step), every rank's log-probs
    gathered, and the entry's function applied to the whole step: [len(ids)] tensors in step order,
    the same on every rank and for any split of the step. ``run(ids)`` is the policy's forward.
    """
    state = dict(state or {})
    fn = objective.context_function()
    if fn is None or not objective.uses_context(loss_cfg):
        return None, state
    parts: dict[int, dict[str, torch.Tensor]] = {}
    for pos in plan:
        logps = run(ids[pos if pos is not None else slice(0, 1)])
        if pos is None:
            continue
        for j, p in enumerate(pos.tolist()):
            parts[p] = {k: getattr(logps, k)[j].detach().double().cpu() for k in _CONTEXT_FIELDS if getattr(logps, k) is not None}
    merged: dict[int, dict[str, torch.Tensor]] = {}
    for part in all_gather_objects(dist, parts):
        merged.update(part)
    order = sorted(merged)
    if order != list(range(len(ids))):
        raise RuntimeError(f"step context: got log-probs of {len(order)} of the step's {len(ids)} examples")
    step = LogProbs(**{k: torch.stack([merged[p][k] for p in order]) for k in merged[order[0]]})
    context, state = fn(loss_cfg, step, state)
    return {k: v.detach() for k, v in context.items()}, state


def with_context(logps: LogProbs, context: dict[str, torch.Tensor] | None, pos: np.ndarray | None) -> LogProbs:
    """``logps`` with the step context's values of its examples (positions ``pos`` in the step)."""
    if context is None or pos is None:
        return logps
    index = torch.as_tensor(pos, dtype=torch.long)
    device = logps.policy_chosen.device
    return dataclasses.replace(logps, context={k: v[index].to(device) for k, v in context.items()})


# -------------------------------------------------------------------------------------------------
# Statistics, and the loss on held-out data
# -------------------------------------------------------------------------------------------------


_TOKENS = "\0tokens"  # the token counts a token term is reduced over


def _stats(outputs: Sequence[LossOutput]) -> dict[str, torch.Tensor]:
    stats: dict[str, list[torch.Tensor]] = {}
    for out in outputs:
        for k, v in out.stats().items():
            stats.setdefault(k, []).append(v.detach().float().cpu())
        for k, v in (out.terms or {}).items():  # a combination's terms: means over examples
            stats.setdefault("\1" + k, []).append(v.detach().double().cpu())
        for k, v in (out.token_terms or {}).items():  # means over tokens: sums here, divided in summarize
            stats.setdefault("\0" + k, []).append(v.detach().double().cpu())
        if out.token_terms and out.n_tokens is not None:
            stats.setdefault(_TOKENS, []).append(out.n_tokens.detach().double().cpu())
    return {k: torch.cat(v) for k, v in stats.items()}


def summarize(outputs: Sequence[LossOutput], prefix: str = "", dist: Dist = SINGLE) -> dict[str, float]:
    """Mean statistics of a step's (or an evaluation's) examples, over every rank's: loss parts,
    rewards, the vote r (mean and spread), mean f(r), the fraction of examples penalized."""
    names = {
        "dpo_loss": "dpo_loss",
        "penalty": "penalty",
        "chosen_rewards": "rewards/chosen",
        "rejected_rewards": "rewards/rejected",
        "margins": "rewards/margins",
        "accuracies": "rewards/accuracies",
        "weight": "weight/mean",
        "penalized": "penalized",
    }
    gathered = all_gather_objects(dist, _stats(outputs))
    stats: dict[str, list[torch.Tensor]] = {}
    for part in gathered:
        for k, v in part.items():
            stats.setdefault(k, []).append(v)
    record: dict[str, float] = {}
    for k, values in stats.items():
        v = torch.cat(values)
        if k == _TOKENS:
            continue
        if k.startswith("\0"):  # a term reduced over tokens
            record[prefix + k[1:]] = (v.sum() / torch.cat(stats[_TOKENS]).sum().clamp(min=1)).item()
        elif k.startswith("\1"):  # a term, a mean over examples
            record[prefix + k[1:]] = v.mean().item()
        elif k == "r":
            record[prefix + "r/mean"] = v.mean().item()
            record[prefix + "r/std"] = v.std(correction=0).item()
        elif k in names:
            record[prefix + names[k]] = v.mean().item()
    return record


@torch.no_grad()
def eval_loss(inputs: StepInputs, n: int, budget: int, max_items: int, module: torch.nn.Module | None = None,
              state: dict | None = None) -> dict[str, float]:
    """The loss and statistics of the first ``n`` examples (no gradients), as ``eval/*``: the same
    reduction the loss's registry entry gives a training step, over all ``n`` examples, the
    examples dealt to the ranks as a step's are. ``module``: the (sharded) policy to run."""
    from dppo.train.parallel import rank_micro_batches

    lengths = inputs.shards.lengths()
    everything = np.arange(n)
    weights = inputs.objective.step_weights(counted_tokens(lengths, everything, inputs.objective.scores_prompt(inputs.loss_cfg)))
    run = module if module is not None else (lambda ids: forward_logps(inputs, ids))
    outputs, total = [], 0.0
    plan = rank_micro_batches(example_tokens(lengths, everything, inputs.objective), budget, max_items, inputs.dist)
    # the held-out set is one step; a stateful loss evaluates with the training state, unchanged
    context, _ = step_context(run, inputs.objective, inputs.loss_cfg, everything, plan, inputs.dist, state)
    for pos in plan:
        logps = run(everything[pos if pos is not None else slice(0, 1)])
        if pos is None:
            continue
        out = inputs.objective(inputs.loss_cfg, with_context(logps, context, pos))
        w = torch.from_numpy(weights[pos]).to(out.loss.device, torch.float64)
        total += float(inputs.objective.weighted(out, w).double().cpu())
        outputs.append(out)
    (total,) = all_reduce_sum(inputs.dist, total)
    return {"eval/loss": total, **summarize(outputs, prefix="eval/", dist=inputs.dist)}
