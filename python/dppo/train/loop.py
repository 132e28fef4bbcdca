"""The trainer: SFT, DPO, SimPO and the three DPPO objectives (minll, unll, conll) in one loop.

:func:`train` reads top to bottom as the run's phases, one function each:

1. **setup** (:func:`_setup`): the ranks, the device and precision, the shards, the order of the
   examples, the tokenizer, the reporters: every check that needs no model;
2. **the policy** (:func:`_load_policy`): loaded and probed (a model whose weights cannot be read,
   or whose packed rows would see each other, fails here), LoRA and activation checkpointing on.
   Only then is the run folder claimed (:func:`_claim_run`: ``RUN/config.json``), so a run that
   fails a check leaves nothing behind; the token budget, the module every forward goes through
   and the optimizer follow (:func:`_build_step`);
3. **the reference pass** (:func:`_reference_pass`): logp_ref of every pair, computed once by a
   no-grad pass and cached beside the shards (:mod:`dppo.train.refcache`), so no reference model is
   held in memory while training;
4. **the steps** (:func:`_run_steps`), restored from the latest checkpoint with ``--resume``
   (:func:`_restore`), one optimizer step at a time (:func:`_train_step`): *data* (the step's
   ``batch_size x grad_accum`` examples, grouped into micro-batches of at most ``batch_size``
   examples and ``max_tokens_per_batch`` tokens by :func:`dppo.data.micro_batches`, each weighted by
   the loss's reduction), *forward* (:func:`dppo.train.step.forward_logps`: each micro-batch's
   sequences packed into one row, log-probabilities only where labels exist), *loss* (the registry's
   entry for ``--method``, a pure function of log-probabilities), *backward* per micro-batch,
   *update* (clip, schedule, optimizer); then the step's record (``RUN/metrics.jsonl``),
   *evaluation* (:func:`_evaluate`) and the *checkpoint*;
5. **save** (:func:`_save`): the final model in Hugging Face format with its tokenizer (``RUN/model``).

The loop never branches on the method's name: what a method needs (a reference, y_gen, pairs or
SFT data) and how its step is reduced come from its :class:`~dppo.train.registry.LossSpec`.
The helpers below the phases do one thing each: :func:`lr_at` is the learning-rate schedule,
:class:`DataOrder` says which examples a step uses, :func:`dppo.train.memory.token_budget` sizes
micro-batches.

Where speed comes from: sequences are packed without padding and attend only within themselves
(``dppo.modeling``); the vocabulary projection runs only on response positions, in chunks; the
reference log-probs are cached; and y_gen's forward is skipped for examples whose penalty weight
f(r) is exactly zero (``dppo.train.step``). Skipping changes no value: the losses zero those
terms anyway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dppo.artifacts import (
    atomic_folder,
    copy_tokenizer_files,
    model_fingerprint,
    resolve_model,
    tokenizer_fingerprint,
    write_atomic,
    write_json,
)
from dppo.data import Shards, open_shards
from dppo.distributed import Dist, all_reduce_max, all_reduce_sum, barrier, launched, on_main
from dppo.distributed import setup as setup_distributed
from dppo.console import esc, note
from dppo.errors import ConfigError
from dppo.modeling import check_packed_forward, enable_activation_checkpointing, load_model
from dppo.train.lora import apply_lora, merge_adapter, save_adapter
from dppo.train.checkpoint import latest_checkpoint, load_checkpoint, read_state, remove_stale, save_checkpoint
from dppo.train.config import RUNTIME_OPTIONS, TrainConfig
from dppo.train.losses import LOSSES, LossConfig, LossOutput, LossSpec
from dppo.train.memory import activation_bytes_per_token, token_budget
from dppo.train.precision import autocast_for, training_precision
from dppo.train.registry import ygen_free
from dppo.train.refcache import RefLogps, reference_logps
from dppo.train.parallel import full_state_dict, grad_norm, grad_sync, rank_micro_batches, reshard, resolve_parallel, wrap
from dppo.train.report import Reporter, require_reporters
from dppo.train.step import (PolicyForward, StepInputs, TokenCounts, counted_tokens, eval_loss, example_tokens, step_context,
                             summarize, with_context)

__all__ = ["train", "lr_at", "alpha_at", "DataOrder", "token_budget", "make_optimizer", "activation_bytes_per_token"]


def train(cfg: TrainConfig, *, console: Console | None = None) -> Path:
    """Train ``cfg.method`` on ``cfg.data`` from ``cfg.init``; returns the folder of the final model.

    Writes ``RUN/config.json`` (resolved options and fingerprints), ``RUN/metrics.jsonl`` (one line
    per optimizer step), ``RUN/checkpoints/step_N/`` (every ``save_every`` steps) and ``RUN/model/``.
    Under torchrun every rank calls it; rank 0 writes the files and the log. Raises
    :class:`~dppo.errors.ConfigError` for anything the user can fix, before the run folder is
    claimed wherever it can be checked without training.
    """
    _quiet_transformers()
    run = _setup(cfg, console)  # every check that needs no model
    lm, adapter = _load_policy(run)  # the model loaded and probed: unreadable weights fail here
    resume_from = _claim_run(run)  # only now RUN/ is written to
    policy = _build_step(run, lm, adapter)
    ref_seconds = _reference_pass(run, policy)
    run = _vote_scale(run, policy)
    step = _restore(run, policy, resume_from)
    _run_steps(run, policy, step)
    return _save(run, policy, ref_seconds)


# -------------------------------------------------------------------------------------------------
# The phases
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Run:
    """What every phase of a run reads, decided once by :func:`_setup`."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    parallel: str
    precision: str
    console: Console
    objective: LossSpec  # what the method needs and how a step reduces its loss
    loss_cfg: LossConfig
    shards: Shards
    order: DataOrder
    n_examples: int
    eval_shards: Shards | None
    eval_objective: LossSpec
    eval_cfg: LossConfig
    n_eval: int
    init_dir: Path
    ref_dir: Path | None
    tok_dir: Path
    out: Path
    t_start: float

    @property
    def autocast(self) -> Callable[[], contextlib.AbstractContextManager[Any]]:
        return autocast_for(self.precision, self.device)

    @property
    def lockstep(self) -> bool:
        """Every rank runs the same forwards (FSDP2 gathers parameters in each)."""
        return self.parallel == "fsdp"


@dataclass
class _Policy:
    """The trained model and what its steps go through."""

    lm: torch.nn.Module  # the causal LM (with LoRA: the peft model)
    adapter: Any  # the peft model with LoRA, else None
    module: PolicyForward  # the policy's whole forward of a micro-batch, one module call
    trained: torch.nn.Module  # what forward and backward go through (DDP's wrapper, or the module)
    optimizer: torch.optim.Optimizer  # on the (sharded) parameters that training updates
    budget: int  # tokens per micro-batch, the same on every rank
    inputs: StepInputs  # what a training forward reads (the reference log-probs once computed)
    eval_inputs: StepInputs | None = None
    loss_state: dict[str, Any] = field(default_factory=dict)  # a stateful loss's (bco_pair's running mean), checkpointed


def _setup(cfg: TrainConfig, console: Console | None) -> _Run:
    """Ranks, device and precision, data, tokenizer and reporters: checked before anything is written."""
    t_start = time.perf_counter()
    dist, device = setup_distributed(cfg.device, cfg.dist_timeout)
    parallel = resolve_parallel(cfg.parallel, dist, launched())
    console = console or Console(stderr=True)
    if not dist.main:  # one log: rank 0's
        console = Console(stderr=True, quiet=True)
    if cfg.deterministic:
        use_deterministic_kernels()
    if dist.main:
        require_reporters(cfg.report_to)  # a tracker that is not installed fails now, not after the reference pass
    objective, loss_cfg = LOSSES[cfg.method], cfg.loss_config()

    shards = open_shards(cfg.data)
    _check_shards(cfg, objective, shards, "--data")
    n_examples = min(len(shards), cfg.max_samples or len(shards))
    eval_shards = open_shards(cfg.eval_data) if cfg.eval_data else None
    eval_objective, eval_cfg = objective, loss_cfg
    if eval_shards is not None:
        if objective.needs_ygen and not eval_shards.has_ygen:
            eval_cfg = ygen_free(loss_cfg)  # what the method's entry evaluates without y_gen
            eval_objective = LOSSES[eval_cfg.method]
            note(console, f"{cfg.eval_data} has no y_gen: evaluating the {eval_cfg.method} loss and rewards only")
        _check_shards(cfg, eval_objective, eval_shards, "--eval-data", ygen_required=False)
    n_eval = min(len(eval_shards), cfg.eval_samples or len(eval_shards)) if eval_shards is not None else 0
    init_dir = resolve_model(cfg.init)
    return _Run(
        cfg=cfg, dist=dist, device=device, parallel=parallel, precision=training_precision(cfg.dtype, device),
        console=console, objective=objective, loss_cfg=loss_cfg, shards=shards,
        order=DataOrder(n_examples, cfg.step_examples, cfg.epochs, cfg.max_steps, cfg.seed), n_examples=n_examples,
        eval_shards=eval_shards, eval_objective=eval_objective, eval_cfg=eval_cfg, n_eval=n_eval, init_dir=init_dir,
        ref_dir=resolve_model(cfg.ref) if cfg.ref else None, tok_dir=_find_tokenizer(cfg, init_dir, shards),
        out=Path(cfg.out), t_start=t_start,
    )


def _load_policy(run: _Run) -> tuple[torch.nn.Module, Any]:
    """The policy in fp32 master weights (with LoRA the frozen base may stay in bf16 on CUDA: only the
    adapters train), probed for packed rows, with its adapters and activation checkpointing."""
    cfg = run.cfg
    seed_everything(cfg.seed)  # LoRA's initial adapters are drawn here
    base_dtype = "bf16" if cfg.lora_r and run.precision == "bf16" else "fp32"
    lm = load_model(run.init_dir, dtype=base_dtype, device=run.device)  # eval mode: no dropout, as TRL does
    family_note = check_packed_forward(lm)  # a model whose packed rows would leak fails here, in one line
    if family_note and run.dist.main:
        note(run.console, family_note)
    adapter = None
    if cfg.lora_r:  # FSDP2 shards the frozen base and the adapters alike; DDP reduces the adapters' gradients
        adapter = apply_lora(cfg, lm, base=_base_name(cfg.init, run.init_dir))
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(lm)
    return lm, adapter


def _claim_run(run: _Run) -> Path | None:
    """The run folder, claimed (``RUN/config.json``); with ``--resume`` the checkpoint to continue from."""
    dist = run.dist
    resume_from = on_main(dist, _prepare_run, run.cfg, run.out, run.console)
    fingerprints = _fingerprints(run.init_dir, run.ref_dir, run.shards, run.eval_shards)
    on_main(dist, _write_run_config, run.cfg, run.out, fingerprints, run.tok_dir, run.device, run.precision, run.order,
            run.n_examples, resume_from is not None, dist, run.parallel)
    return resume_from


def _build_step(run: _Run, lm: torch.nn.Module, adapter: Any) -> _Policy:
    """The token budget, the module every forward goes through (wrapped for FSDP2 or DDP) and the optimizer."""
    cfg, dist = run.cfg, run.dist
    # every rank must form the same micro-batches: the smallest budget of any rank
    budget = cfg.max_tokens_per_batch or -int(all_reduce_max(dist, -token_budget(lm, run.device, run.precision))[0])
    if dist.main:
        _record_budget(run.out, budget)
    # a scheduled alpha: plan the y_gen forwards for its largest value (a step at alpha 0 skips them all)
    plan_cfg = run.loss_cfg if cfg.alpha_schedule == "constant" else dataclasses.replace(
        run.loss_cfg, alpha=max(cfg.alpha, cfg.alpha_end))
    inputs = StepInputs.of(cfg, lm, run.shards, plan_cfg, run.objective, None, run.device, dist, run.lockstep)
    module = PolicyForward(lm)
    trained = wrap(module, lm, run.parallel, run.device, run.precision)
    return _Policy(lm=lm, adapter=adapter, module=module, trained=trained, optimizer=make_optimizer(cfg, module),
                   budget=budget, inputs=inputs)


def _reference_pass(run: _Run, policy: _Policy) -> float:
    """The reference log-probs of the training (and evaluation) pairs: one no-grad pass, each rank its
    share, cached beside the shards; returns its seconds. The policy before its first update *is*
    the reference when --ref is --init: no second load."""
    cfg, t_ref = run.cfg, time.perf_counter()
    ref = eval_ref = None
    if run.objective.needs_reference or run.eval_objective.needs_reference:
        same = run.ref_dir is not None and run.ref_dir.resolve() == run.init_dir.resolve()
        if same:
            inputs = policy.inputs
            load_ref = lambda: _scorer(policy.module, inputs)  # noqa: E731
        else:
            load_ref = partial(_reference_scorer, run)
        if run.objective.needs_reference:
            ref = _score_with_progress(run, policy.budget, run.shards, np.arange(run.n_examples), load_ref,
                                       need_ygen=run.objective.needs_ref_ygen, what="train")
        if run.eval_shards is not None and run.eval_objective.needs_reference:
            eval_ref = _score_with_progress(run, policy.budget, run.eval_shards, np.arange(run.n_eval), load_ref,
                                            need_ygen=run.eval_objective.needs_ref_ygen, what="eval")
        reshard(policy.module, run.parallel)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)  # peak_mem_gib: the training steps', not the reference pass's
    policy.inputs = dataclasses.replace(policy.inputs, ref=ref)
    if run.eval_shards is not None:
        policy.eval_inputs = StepInputs.of(cfg, policy.lm, run.eval_shards, run.eval_cfg, run.eval_objective, eval_ref,
                                           run.device, run.dist, run.lockstep)
    return time.perf_counter() - t_ref


VOTE_CLIP_PERCENTILE = 95.0
"""``--vote-clip auto``: C is this percentile of |r| = |logp_ref(y_w) - logp_ref(y_l)| over the training pairs."""
INERT_WEIGHT, INERT_STEPS = 1e-3, 10
"""The penalty is called inert when |f(r)| < INERT_WEIGHT on every example of the first INERT_STEPS steps."""


def _vote_scale(run: _Run, policy: _Policy) -> _Run:
    """``--vote-clip auto`` resolved from the reference pass (C = the ``VOTE_CLIP_PERCENTILE``-th
    percentile of |r| under the reference on the training pairs, recorded in ``RUN/config.json`` as
    ``vote_clip_auto``), and one warning when the penalty weight f(r) of the reference's votes is
    below ``INERT_WEIGHT`` on every example of the first ``INERT_STEPS`` steps (the policy's own
    votes at step 0 when --ref is --init): the penalty would then be inert at this vote clip."""
    from dppo.train.losses import normalize_vote, vote_weight

    cfg, ref = run.loss_cfg, policy.inputs.ref
    if "vote_clip" not in cfg.values:
        return run
    if cfg.vote_clip == "auto":
        if ref is None:
            raise ConfigError(f"--vote-clip auto needs the reference log-probs of the pairs; --method {cfg.method} computes none")
        r = np.abs(ref.chosen[: run.n_examples].astype(np.float64) - ref.rejected[: run.n_examples])
        r = r[np.isfinite(r)]
        c = float(np.percentile(r, VOTE_CLIP_PERCENTILE)) if r.size else 0.0
        if not c > 0:  # every vote is 0: any C gives f = 0
            c = 1.0
        loss_cfg = dataclasses.replace(cfg, vote_clip=c)
        eval_cfg = run.eval_cfg
        if eval_cfg.values.get("vote_clip") == "auto":
            eval_cfg = dataclasses.replace(eval_cfg, vote_clip=c)
        run = dataclasses.replace(run, loss_cfg=loss_cfg, eval_cfg=eval_cfg)
        policy.inputs = dataclasses.replace(policy.inputs, loss_cfg=loss_cfg)
        if policy.eval_inputs is not None:
            policy.eval_inputs = dataclasses.replace(policy.eval_inputs, loss_cfg=eval_cfg)
        auto = {"value": c, "percentile": VOTE_CLIP_PERCENTILE, "pairs": int(r.size)}
        if run.dist.main:
            path = run.out / "config.json"
            record = json.loads(path.read_text())
            record["vote_clip_auto"] = auto
            write_json(path, record)
        run.console.print(f"--vote-clip auto: C = {c:.4g}, the {VOTE_CLIP_PERCENTILE:g}th percentile of |r| under the "
                          f"reference over {r.size:,} pairs", highlight=False)
    alpha = alpha_at(run.cfg, 0, run.order.total_steps)
    if ref is not None and (alpha if alpha is not None else run.loss_cfg.values.get("alpha", 0.0)):
        steps = min(INERT_STEPS, run.order.total_steps)
        ids = np.unique(np.concatenate([run.order.step_examples(s) for s in range(steps)])) if steps else np.arange(0)
        r = torch.from_numpy(ref.chosen[ids].astype(np.float64) - ref.rejected[ids].astype(np.float64))
        r = r[torch.isfinite(r)]
        if r.numel():
            f = vote_weight(run.loss_cfg, normalize_vote(run.loss_cfg, r)).abs()
            if float(f.max()) < INERT_WEIGHT:
                run.console.print(
                    f"[yellow]warning:[/] the penalty is inert at this vote clip: f(r) < {INERT_WEIGHT:g} on every "
                    f"example of the first {steps} steps (vote clip {run.loss_cfg.vote_clip:g}, |r| at most "
                    f"{float(r.abs().max()):.3g}); try --vote-clip auto", highlight=False)
    return run


def _restore(run: _Run, policy: _Policy, resume_from: Path | None) -> int:
    """The step to start from: the checkpoint's with --resume (its weights, optimizer and RNG loaded), else 0."""
    step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, policy.module, policy.optimizer, verify=False, dist=run.dist,
                                trainable_only=policy.adapter is not None)
        step = int(state["step"])
        policy.loss_state = dict(state.get("loss_state") or {})
        run.console.print(f"resumed from {esc(resume_from)} (step {step} of {run.order.total_steps}, "
                          f"written by {state.get('world_size', 1)} rank(s), read by {run.dist.world})")
    if run.dist.main:
        _truncate_metrics(run.out / "metrics.jsonl", step)
    return step


def _run_steps(run: _Run, policy: _Policy, step: int) -> None:
    """Optimizer steps until the last one: each logged, evaluated and checkpointed on its schedule."""
    cfg, order, dist = run.cfg, run.order, run.dist
    meter = _Meter.of(run, policy)
    bar_on = cfg.progress and run.console.is_terminal and dist.main
    progress = _progress_bar(run.console, enabled=bar_on)
    reporter = Reporter(run.out, cfg.report_to, enabled=dist.main, config=cfg.to_dict())
    with progress, reporter:
        task = progress.add_task(esc(cfg.method), total=order.total_steps, completed=step, loss="-", speed="-")
        while step < order.total_steps:
            record = _train_step(run, policy, step, meter)
            step = record["step"]
            alpha = record.get("alpha")
            if run.eval_shards is not None and (step == order.total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                record.update(_evaluate(run, policy, alpha))
                run.console.print(_eval_line(step, record), highlight=False)
            reporter.log(record)
            rate = f"{record['examples'] / record['step_s']:.2f} {meter.unit}"
            progress.update(task, advance=1, loss=f"{record['loss']:.4f}", speed=rate)
            if not bar_on and (step == order.total_steps or step % max(1, order.total_steps // 20) == 0):
                run.console.print(f"step {step}/{order.total_steps} loss {record['loss']:.4f} {rate}")
            if cfg.save_every and step % cfg.save_every == 0:
                state = {"epoch": order.epoch_of(step), "examples_seen": order.examples_seen(step), "lr_schedule": cfg.lr_schedule,
                         "loss_state": policy.loss_state}
                save_checkpoint(run.out, step, policy.module, policy.optimizer, state, keep_last=cfg.keep_last,
                                dist=dist, trainable_only=policy.adapter is not None)


@dataclass(frozen=True)
class _Meter:
    """What a step's record needs beyond the step: FLOPs per token, the device's peak, the unit."""

    dims: ModelDims
    peak: float | None
    params: list[torch.nn.Parameter]  # the trained parameters (clipped, their norm logged)
    lengths: dict[str, np.ndarray]
    unit: str

    @classmethod
    def of(cls, run: _Run, policy: _Policy) -> _Meter:
        peak = run.cfg.peak_tflops * 1e12 if run.cfg.peak_tflops else _peak_flops(run.device, run.precision)
        return cls(ModelDims.of(policy.lm), peak, [p for p in policy.module.parameters() if p.requires_grad],
                   run.shards.lengths(), "ex/s" if run.objective.data == "sft" else "pairs/s")


def _train_step(run: _Run, policy: _Policy, step: int, meter: _Meter) -> dict[str, Any]:
    """Update ``step`` (0-based): forward and backward of each micro-batch, clip, schedule, update;
    returns the step's record (``step`` is the number of updates done)."""
    cfg, dist, device, objective = run.cfg, run.dist, run.device, run.objective
    t0, cpu0 = time.perf_counter(), time.process_time()
    # -- data: this step's examples, this rank's share, each one's weight in the step's loss --
    ids = run.order.step_examples(step)
    alpha = alpha_at(cfg, step, run.order.total_steps)
    step_cfg = run.loss_cfg if alpha is None or alpha == run.loss_cfg.alpha else dataclasses.replace(run.loss_cfg, alpha=alpha)
    inputs = dataclasses.replace(policy.inputs, loss_cfg=step_cfg)
    weights = objective.step_weights(counted_tokens(meter.lengths, ids, objective.scores_prompt(step_cfg)))  # the loss's reduction
    plan = rank_micro_batches(example_tokens(meter.lengths, ids, objective), policy.budget, cfg.batch_size, dist)
    # a loss that compares each example with its whole step (aot) or keeps a state (bco_pair's
    # running mean): a no-grad pass over the step first; nothing for the others
    context, next_state = step_context(partial(_no_grad_forward, policy.trained, inputs, run.autocast), objective,
                                       step_cfg, ids, plan, dist, policy.loss_state)
    outputs: list[LossOutput] = []
    work = TokenCounts()
    step_loss = torch.zeros((), device=device)
    scale = float(dist.world)  # DDP and FSDP average gradients over ranks: each rank's share of the step's mean, times N
    for k, pos in enumerate(plan):
        empty = pos is None  # keeps the ranks in step; an example at weight 0
        pos = np.arange(1) if empty else pos
        w = torch.as_tensor(0.0 * weights[pos] if empty else weights[pos] * scale, dtype=torch.float32, device=device)
        with grad_sync(policy.trained, run.parallel, sync=k == len(plan) - 1):
            # -- forward: one packed row per micro-batch (two with a policy-vote y_gen skip) --
            with run.autocast():
                logps = policy.trained(inputs, ids[pos], None if empty else work)
            # -- loss, backward: each micro-batch's graph is freed right after its backward --
            out = objective(step_cfg, with_context(logps, context, None if empty else pos))
            loss = objective.weighted(out, w)
            loss.backward()
        if not empty:
            step_loss += loss.detach() / scale
            outputs.append(out)

    # -- update: clip, schedule, optimizer ------------------------------------------------------------
    if cfg.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(meter.params, cfg.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    else:
        norm = grad_norm(meter.params)
    lr = lr_at(cfg, step, run.order.total_steps)
    for group in policy.optimizer.param_groups:
        group["lr"] = lr
    policy.optimizer.step()
    policy.optimizer.zero_grad(set_to_none=True)
    policy.loss_state = next_state
    (step_loss,) = all_reduce_sum(dist, step_loss.item())  # waits for the device: the step is over
    seconds = time.perf_counter() - t0
    work = work.total(dist)  # tokens of every rank
    return {
        "step": step + 1,
        "epoch": round(run.order.examples_seen(step + 1) / run.n_examples, 4),
        "examples": len(ids),
        "loss": step_loss,
        **summarize(outputs, dist=dist),
        "lr": lr,
        **({"alpha": alpha} if alpha is not None else {}),
        "grad_norm": float(norm),
        "tokens": work.tokens,
        "tokens_per_s": work.tokens / seconds,
        "examples_per_s": len(ids) / seconds,
        "mfu": meter.dims.flops(work) / seconds / (meter.peak * dist.world) if meter.peak else None,
        "step_s": seconds,
        "step_cpu_s": time.process_time() - cpu0,  # host CPU time, all threads (robust on a shared machine)
        "elapsed_s": time.perf_counter() - run.t_start,
        **({"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}),
    }


def _evaluate(run: _Run, policy: _Policy, alpha: float | None) -> dict[str, float]:
    """``eval/*``: the loss and statistics of the held-out pairs, at this step's alpha, through the
    policy's module (under FSDP2 its forward gathers the parameters)."""
    now = policy.eval_inputs
    if alpha is not None and run.eval_cfg.alpha is not None and run.eval_cfg.alpha != alpha:
        now = dataclasses.replace(now, loss_cfg=dataclasses.replace(run.eval_cfg, alpha=alpha))
    with run.autocast():
        out = eval_loss(now, run.n_eval, policy.budget, run.cfg.batch_size, module=partial(policy.module, now),
                        state=policy.loss_state)
    reshard(policy.module, run.parallel)
    return out


def _save(run: _Run, policy: _Policy, ref_seconds: float) -> Path:
    """The final model, in Hugging Face format with the tokenizer (rank 0, from the full state dict)."""
    if policy.adapter is not None:
        model_dir = _save_lora(policy.module, policy.adapter, run.parallel, run.tok_dir, run.out, run.precision,
                               run.dist, merge=run.cfg.merge)
    else:
        model_dir = _save_model(policy.module, policy.lm, run.parallel, run.tok_dir, run.out / "model", run.precision,
                                run.dist)
    run.console.print(
        f"[green]done:[/] {run.order.total_steps} steps in {time.perf_counter() - run.t_start:.1f} s "
        f"(reference pass {ref_seconds:.1f} s; {run.dist.world} rank(s), {run.parallel}); model in {esc(model_dir)}",
        highlight=False,
    )
    barrier(run.dist)
    return model_dir


def _scorer(module: torch.nn.Module, inputs: StepInputs) -> Callable[[Any], torch.Tensor]:
    """Sums of log-probs of a packed batch through a policy module (one forward)."""
    return lambda batch: module(inputs, batch=batch).sums


def _reference_scorer(run: _Run) -> Callable[[Any], torch.Tensor]:
    """A reference other than --init, loaded on every rank (sharded with FSDP2 when the policy is)."""
    cfg = run.cfg
    lm = load_model(run.ref_dir, dtype="fp32", device=run.device)
    module = PolicyForward(lm)
    inputs = StepInputs.of(cfg, lm, None, run.loss_cfg, run.objective, None, run.device, run.dist, run.lockstep)
    if run.parallel == "fsdp":
        wrap(module, lm, "fsdp", run.device, run.precision)
    return _scorer(module, inputs)


# -------------------------------------------------------------------------------------------------
# Data order
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataOrder:
    """Which examples each optimizer step uses: a fresh permutation per epoch, from (seed, epoch) alone.

    The order is a pure function of the step number, so a resumed run needs no saved iterator. The
    last step of an epoch takes the remaining examples (fewer when they do not divide evenly).
    ``max_steps`` overrides ``epochs`` (continuing into further epochs when larger).
    """

    n: int
    per_step: int
    epochs: int
    max_steps: int | None
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.per_step)

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def step_examples(self, step: int) -> np.ndarray:
        epoch, k = divmod(step, self.steps_per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
        return perm[k * self.per_step : (k + 1) * self.per_step]

    def examples_seen(self, step: int) -> int:
        epoch, k = divmod(step, self.steps_per_epoch)
        return epoch * self.n + min(k * self.per_step, self.n)


def _record_budget(run: Path, budget: int) -> None:
    """Add the resolved token budget to RUN/config.json."""
    path = run / "config.json"
    record = json.loads(path.read_text())
    record["max_tokens_per_batch"] = budget
    write_json(path, record)


def _eval_line(step: int, record: dict[str, Any]) -> str:
    parts = [f"eval @ step {step}: loss {record['eval/loss']:.4f}"]
    if "eval/rewards/accuracies" in record:
        parts.append(f"reward accuracy {record['eval/rewards/accuracies']:.3f}")
        parts.append(f"margin {record['eval/rewards/margins']:.4f}")
    return ", ".join(parts)


# -------------------------------------------------------------------------------------------------
# Optimizer and learning-rate schedule
# -------------------------------------------------------------------------------------------------


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW, RMSprop or SGD with torch's defaults; weight decay on matrices only (not biases, norms)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        fused = next(model.parameters()).is_cuda  # one kernel for all tensors on CUDA
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused or None)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr)


def alpha_at(cfg: TrainConfig, step: int, total_steps: int) -> float | None:
    """Penalty strength of update ``step`` (0-based) of ``total_steps`` under ``--alpha-schedule``.

    linear: alpha + (end - alpha) s / (S - 1); cosine: end + (alpha - end) (1 + cos(pi s / (S - 1))) / 2;
    step: alpha moves by (end - alpha) / K at each of the K ``--alpha-steps`` (s >= index); S = 1: alpha.
    None for a method without alpha.
    """
    a, end = cfg.alpha, cfg.alpha_end
    if a is None or cfg.alpha_schedule == "constant":
        return a
    if cfg.alpha_schedule == "step":
        marks = [int(x) for x in cfg.alpha_steps.split(",") if x.strip()]
        return a + (end - a) * sum(step >= m for m in marks) / len(marks)
    if total_steps <= 1:
        return a
    t = step / (total_steps - 1)
    if cfg.alpha_schedule == "linear":
        return a + (end - a) * t
    return end + (a - end) * (1 + math.cos(math.pi * t)) / 2


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate of update ``step`` (0-based): linear warm-up, then constant, linear or cosine decay.

    Warm-up: lr * (step + 1) / warmup_steps for step < warmup_steps (the first update is not wasted
    at lr 0). Decay: progress p = (step - warmup) / (total - warmup) in [0, 1); linear 1 - p, cosine
    (1 + cos(pi p)) / 2.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    p = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - p)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * p))


def _no_grad_forward(trained: torch.nn.Module, inputs: StepInputs, autocast: Callable[[], Any], ids: np.ndarray) -> Any:
    with torch.no_grad(), autocast():
        return trained(inputs, ids)


def use_deterministic_kernels() -> None:
    """Deterministic kernels where torch has them (a warning, not an error, where it has none)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -------------------------------------------------------------------------------------------------
# FLOPs and MFU
# -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelDims:
    """What the FLOPs estimate needs: 6 FLOPs per parameter per token (forward + backward) for the
    body, the vocabulary projection on response positions only, and causal attention."""

    body_params: int  # parameters used once per token, outside the embedding and the output projection
    vocab_flops: int  # hidden * vocab
    attn_dim: int  # layers * query heads * head dim

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelDims:
        c = model.config
        embed = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        total = sum(p.numel() for p in model.parameters())  # tied tensors counted once
        body = total - embed.numel() - (0 if head is embed else head.numel())
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(body, head.numel(), c.num_hidden_layers * c.num_attention_heads * head_dim)

    def flops(self, work: TokenCounts) -> float:
        # causal attention: QK^T and AV cost 2 * L^2 * d per head forward (half of the square), x3 with backward
        return 6.0 * (self.body_params * work.tokens + self.vocab_flops * work.counted + self.attn_dim * work.attn)


_PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "H800": 989, "GH200": 989, "B200": 2250, "A100": 312, "A800": 312,
                     "L40S": 362, "L40": 181, "L4": 121, "A10G": 70, "A10": 125, "RTX 4090": 165, "RTX 3090": 71}


def _peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense bf16 peak of known GPUs (None elsewhere: pass --peak-tflops for an MFU figure)."""
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


# -------------------------------------------------------------------------------------------------
# Checks, run folder, reference pass, saving
# -------------------------------------------------------------------------------------------------


def _check_shards(cfg: TrainConfig, objective: LossSpec, shards: Shards, option: str, ygen_required: bool = True) -> None:
    want = objective.data
    if shards.kind != want:
        how = "dppo prep sft" if want == "sft" else "dppo prep prefs"
        have = "SFT" if shards.kind == "sft" else "preference"
        raise ConfigError(f"{option} {shards.path}: --method {cfg.method} trains on {want} shards (`{how}`), these are {have} shards")
    if len(shards) == 0:
        raise ConfigError(f"{option} {shards.path}: no examples")
    if ygen_required and objective.needs_ygen and not shards.has_ygen:
        conf = shards.meta.get("config", {})
        data = conf.get("data", "SRC")
        split = f" --split {conf['split']}" if conf.get("split") else ""
        tok = shards.meta.get("tokenizer_source", "TOKENIZER")
        model = cfg.ref or cfg.init
        raise ConfigError(
            f"--method {cfg.method} needs y_gen (the reference model's greedy responses) and {shards.path} has none: "
            f"run `dppo generate --model {model} --data {data}{split} --out ygen.parquet`, then "
            f"`dppo prep prefs --data {data}{split} --tokenizer {tok} --ygen ygen.parquet --out {shards.path} --overwrite`"
        )


def _find_tokenizer(cfg: TrainConfig, init_dir: Path, shards: Shards) -> Path:
    """The tokenizer saved with the model: --tokenizer, else --init's, else the one prep used; it must
    be the tokenizer the shards were made with (same fingerprint)."""
    candidates = [Path(cfg.tokenizer)] if cfg.tokenizer else [init_dir, Path(str(shards.meta.get("tokenizer_source", "")))]
    tok_dir = next((p for p in candidates if str(p) and (p / "tokenizer.json").is_file()), None)
    if tok_dir is None:
        where = cfg.tokenizer or f"{cfg.init} (nor {shards.meta.get('tokenizer_source')}, where the shards' tokenizer came from)"
        raise ConfigError(f"no tokenizer.json in {where}: pass --tokenizer DIR, the folder `dppo prep` used")
    want = shards.meta.get("tokenizer", {}).get("fingerprint")
    have = tokenizer_fingerprint(tok_dir)
    if want and have != want:
        raise ConfigError(
            f"the tokenizer in {tok_dir} (fingerprint {have}) is not the one {shards.path} was prepared with "
            f"({want}): pass --tokenizer with the folder `dppo prep` used ({shards.meta.get('tokenizer_source')})"
        )
    return tok_dir


def _fingerprints(init_dir: Path, ref_dir: Path | None, shards: Shards, eval_shards: Shards | None) -> dict[str, Any]:
    init_fp = model_fingerprint(init_dir)
    out: dict[str, Any] = {
        "data": {"path": str(shards.path), "fingerprint": shards.fingerprint(), "examples": len(shards),
                 "has_ygen": shards.has_ygen, "tokenizer_fingerprint": shards.meta.get("tokenizer", {}).get("fingerprint")},
        "init": {"path": str(init_dir), "fingerprint": init_fp},
        "ref": None,
        "eval_data": None,
    }
    if ref_dir is not None:
        same = ref_dir.resolve() == init_dir.resolve()
        out["ref"] = {"path": str(ref_dir), "fingerprint": init_fp if same else model_fingerprint(ref_dir)}
    if eval_shards is not None:
        out["eval_data"] = {"path": str(eval_shards.path), "fingerprint": eval_shards.fingerprint(), "examples": len(eval_shards)}
    return out


def _prepare_run(cfg: TrainConfig, run: Path, console: Console) -> Path | None:
    """Check the run folder; with --resume return the checkpoint to continue from (None: start over)."""
    markers = [run / "config.json", run / "metrics.jsonl", run / "checkpoints", run / "model", run / "adapter"]
    if cfg.resume:
        # job scripts on preemptible machines always pass --resume: a run not started yet starts here
        run.mkdir(parents=True, exist_ok=True)
        remove_stale(run)
        saved_path = run / "config.json"
        if saved_path.is_file():
            try:
                saved = json.loads(saved_path.read_text())["config"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{saved_path}: unreadable ({e}); cannot check that --resume continues the same run") from None
            now = cfg.to_dict()
            diff = [k for k in now if k not in RUNTIME_OPTIONS and saved.get(k) != now[k]]
            if diff:
                changes = ", ".join(f"--{k.replace('_', '-')} {saved.get(k)!r} -> {now[k]!r}" for k in diff)
                raise ConfigError(f"--resume: the run in {run} was started with other options ({changes})")
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            note(console, f"no checkpoint in {run}; starting from step 0")
        else:
            read_state(ckpt)  # verify it now, before the reference pass: a damaged checkpoint fails fast
        return ckpt
    if any(p.exists() for p in markers):
        if not cfg.overwrite and _did_a_step(run):
            raise ConfigError(f"{run} already holds a run: pass --resume to continue it or --overwrite to replace it")
        if not cfg.overwrite:  # a run that failed before its first step left nothing worth keeping
            note(console, f"{run} holds a run that ended before its first step; starting it again")
        for p in markers:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    run.mkdir(parents=True, exist_ok=True)
    return None


def _did_a_step(run: Path) -> bool:
    """Whether the run in ``run`` got anywhere: a step logged, a checkpoint or a saved model."""
    if (run / "model").exists() or (run / "adapter").exists() or latest_checkpoint(run) is not None:
        return True
    metrics = run / "metrics.jsonl"
    try:
        return metrics.is_file() and bool(metrics.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return True  # unreadable: leave it to --overwrite


def _write_run_config(
    cfg: TrainConfig, run: Path, fingerprints: dict[str, Any], tok_dir: Path, device: torch.device, precision: str,
    order: DataOrder, n_examples: int, resuming: bool, dist: Dist, parallel: str,
) -> None:
    import transformers

    import dppo

    path = run / "config.json"
    if resuming and path.is_file():
        saved = json.loads(path.read_text())
        for key in ("data", "init", "ref"):
            old = (saved.get(key) or {}).get("fingerprint")
            new = (fingerprints.get(key) or {}).get("fingerprint")
            if old != new:
                raise ConfigError(f"--resume: {key} changed since the run started (fingerprint {old} -> {new})")
    record = {
        "config": cfg.to_dict(),
        **fingerprints,
        "tokenizer": {"path": str(tok_dir), "fingerprint": fingerprints["data"]["tokenizer_fingerprint"]},
        "examples_used": n_examples,
        "steps": order.total_steps,
        "steps_per_epoch": order.steps_per_epoch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "precision": precision,
        "distributed": {"world_size": dist.world, "backend": dist.backend, "parallel": parallel},
        "versions": {"dppo": getattr(dppo, "__version__", None), "torch": torch.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version()},
    }
    write_json(path, record)


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps <= ``step`` (a resumed run rewrites the steps after its checkpoint)."""
    if not path.exists():
        path.touch()
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            break  # a line cut by a kill: everything after it is gone too
    write_atomic(path, "".join(kept))


def _score_with_progress(run: _Run, budget: int, shards: Shards, ids: np.ndarray, load: Callable[[], Any], *,
                         need_ygen: bool, what: str) -> RefLogps:
    """:func:`reference_logps` of examples ``ids`` with a progress bar, and a line saying whether they were cached."""
    cfg, console, dist = run.cfg, run.console, run.dist
    progress = _progress_bar(console, enabled=cfg.progress and console.is_terminal and dist.main, rate=False)
    with progress:
        task = progress.add_task(esc(f"reference log-probs ({what})"), total=None, loss="", speed="")
        result = reference_logps(
            run.ref_dir, shards, ids, load=load, need_ygen=need_ygen, precision=run.precision, autocast=run.autocast,
            batch_tokens=budget, fallback_dir=run.out / "refcache", dist=dist, lockstep=run.lockstep,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    status = "reused" if result.hit else "computed"
    console.print(f"reference log-probs ({what}, {len(ids)} pairs) {status}: {esc(result.cache_dir)}", highlight=False)
    return result


def _base_name(given: str, resolved: Path) -> str:
    """What an adapter records as its base: the absolute folder for a local model, else the hub id."""
    return str(resolved.resolve()) if Path(given).expanduser().exists() else str(given)


def _save_lora(module: torch.nn.Module, adapter: Any, parallel: str, tok_dir: Path, run: Path, precision: str, dist: Dist,
               merge: bool) -> Path:
    """RUN/adapter/ (peft's format, with the tokenizer) and, with ``merge``, RUN/model/ (the base with
    the adapters merged): by rank 0, from the full state dict under FSDP2."""
    state = None
    if parallel == "fsdp":
        state = {"base_model.model." + k.removeprefix("lm."): v for k, v in full_state_dict(module, parallel).items()}
    out = run / "adapter"
    if dist.main:
        with atomic_folder(out) as work:
            save_adapter(adapter, work, state)
            copy_tokenizer_files(tok_dir, work)
        if merge:
            merge_adapter(out, run / "model", torch.bfloat16 if precision == "bf16" else torch.float32, tok_dir)
    barrier(dist)
    return run / "model" if merge else out


def _save_model(module: torch.nn.Module, lm: torch.nn.Module, parallel: str, tok_dir: Path, out: Path, precision: str,
                dist: Dist) -> Path:
    """``out`` in Hugging Face format (safetensors, bf16 when trained in bf16) plus the tokenizer files,
    written beside and renamed into place, by rank 0 from the full state dict."""
    if parallel == "none":
        state = None  # the model itself holds its full parameters
    else:
        state = {k.removeprefix("lm."): v for k, v in full_state_dict(module, parallel).items()}
    if dist.main:
        if precision == "bf16":
            state = {k: v.to(torch.bfloat16) for k, v in (state or lm.state_dict()).items()}
        if state is not None:  # a tied output projection is stored once, as transformers does
            head = lm.get_output_embeddings().weight
            tied = [k for k, v in lm.state_dict(keep_vars=True).items() if v is head]
            for k in tied[1:] if head is lm.get_input_embeddings().weight else []:
                state.pop(k, None)
        with atomic_folder(out) as work:
            if state is None:
                lm.save_pretrained(work, safe_serialization=True)
            else:
                lm.save_pretrained(work, safe_serialization=True, state_dict=state)
            copy_tokenizer_files(tok_dir, work)
    barrier(dist)
    return out


def _progress_bar(console: Console, enabled: bool, rate: bool = True) -> Progress:
    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    if rate:
        columns += [TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]}")]
    columns += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=not enabled, transient=not rate)


def _quiet_transformers() -> None:
    """transformers' own progress bars (loading, saving weights) would break the trainer's."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
