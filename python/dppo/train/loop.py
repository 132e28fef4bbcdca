"""The trainer: SFT, DPO, SimPO and the three DPPO objectives (minll, unll, conll) in one loop.

:func:`train` reads top to bottom, in the manner of nanoGPT's ``train.py``:

1. **setup**: the run folder, the device and precision, the shards, the order of the examples;
2. **reference**: logp_ref of every pair, computed once by a no-grad pass and cached beside the
   shards (:mod:`dppo.train.refcache`), so no reference model is held in memory while training;
3. **model and optimizer**, restored from the latest checkpoint with ``--resume``;
4. **the loop**, one optimizer step at a time: *data* (the step's ``batch_size x grad_accum``
   examples, grouped into micro-batches of at most ``batch_size`` examples and
   ``max_tokens_per_batch`` tokens by :func:`dppo.data.micro_batches`, each weighted by the loss's
   reduction), *forward* (:func:`dppo.train.step.forward_logps`: each micro-batch's sequences
   packed into one row, log-probabilities only where labels exist), *loss* (the registry's entry
   for ``--method``, a pure function of log-probabilities), *backward* per micro-batch, *step*
   (clip, schedule, update), *log* (``RUN/metrics.jsonl``), *eval*, *checkpoint*;
5. **the final model** in Hugging Face format with its tokenizer (``RUN/model``).

The loop never branches on the method's name: what a method needs (a reference, y_gen, pairs or
SFT data) and how its step is reduced come from its :class:`~dppo.train.registry.LossSpec`.
The helpers below the loop do one thing each: :func:`lr_at` is the learning-rate schedule,
:class:`DataOrder` says which examples a step uses, :func:`token_budget` sizes micro-batches.

Where speed comes from: sequences are packed without padding and attend only within themselves
(``dppo.modeling``); the vocabulary projection runs only on response positions, in chunks; the
reference log-probs are cached; and y_gen's forward is skipped for examples whose penalty weight
f(r) is exactly zero (``dppo.train.step``). Skipping changes no value: the losses zero those
terms anyway.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
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
    resolve_device,
    resolve_model,
    tokenizer_fingerprint,
    write_atomic,
    write_json,
)
from dppo.data import Shards, open_shards
from dppo.distributed import Dist, all_reduce_max, all_reduce_sum, barrier, launched, on_main
from dppo.distributed import setup as setup_distributed
from dppo.errors import ConfigError
from dppo.modeling import check_packed_forward, enable_activation_checkpointing, load_model
from dppo.train.lora import apply_lora, merge_adapter, save_adapter
from dppo.train.checkpoint import latest_checkpoint, load_checkpoint, read_state, remove_stale, save_checkpoint
from dppo.train.config import RUNTIME_OPTIONS, TrainConfig
from dppo.train.losses import LOSSES, LossOutput, LossSpec
from dppo.train.registry import ygen_free
from dppo.train.refcache import RefLogps, reference_logps
from dppo.train.parallel import full_state_dict, grad_norm, grad_sync, rank_micro_batches, reshard, resolve_parallel, wrap
from dppo.train.report import Reporter
from dppo.train.step import PolicyForward, StepInputs, TokenCounts, counted_tokens, eval_loss, example_tokens, summarize

__all__ = ["train", "lr_at", "alpha_at", "DataOrder", "token_budget", "make_optimizer", "activation_bytes_per_token"]

def train(cfg: TrainConfig, *, console: Console | None = None) -> Path:
    """Train ``cfg.method`` on ``cfg.data`` from ``cfg.init``; returns the folder of the final model.

    Writes ``RUN/config.json`` (resolved options and fingerprints), ``RUN/metrics.jsonl`` (one line
    per optimizer step), ``RUN/checkpoints/step_N/`` (every ``save_every`` steps) and ``RUN/model/``.
    Under torchrun every rank calls it; rank 0 writes the files and the log. Raises
    :class:`~dppo.errors.ConfigError` for anything the user can fix.
    """
    t_start = time.perf_counter()
    _quiet_transformers()

    # ---------------------------------------------------------------------------------------------
    # Setup: ranks, device and precision, data, run folder
    # ---------------------------------------------------------------------------------------------
    dist, device = setup_distributed(cfg.device, cfg.dist_timeout)
    parallel = resolve_parallel(cfg.parallel, dist, launched())
    console = console or Console(stderr=True)
    if not dist.main:  # one log: rank 0's
        console = Console(stderr=True, quiet=True)
    if cfg.deterministic:
        use_deterministic_kernels()
    # bf16 keeps fp32 master weights and runs the matmuls under bf16 autocast: at lr 1e-6 an update
    # is ~1e-4 of a weight, below bf16's resolution, so bf16 weights would not train at all.
    precision = "bf16" if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda") else "fp32"
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    objective = LOSSES[cfg.method]  # what the method needs and how a step reduces its loss
    loss_cfg = cfg.loss_config()

    shards = open_shards(cfg.data)
    _check_shards(cfg, objective, shards, "--data")
    n_examples = min(len(shards), cfg.max_samples or len(shards))
    order = DataOrder(n_examples, cfg.step_examples, cfg.epochs, cfg.max_steps, cfg.seed)
    eval_shards = open_shards(cfg.eval_data) if cfg.eval_data else None
    eval_objective, eval_cfg = objective, loss_cfg
    if eval_shards is not None:
        if objective.needs_ygen and not eval_shards.has_ygen:
            eval_cfg = ygen_free(loss_cfg)  # what the method's entry evaluates without y_gen
            eval_objective = LOSSES[eval_cfg.method]
            console.print(f"[yellow]note:[/] {cfg.eval_data} has no y_gen: evaluating the {eval_cfg.method} loss and rewards only")
        _check_shards(cfg, eval_objective, eval_shards, "--eval-data", ygen_required=False)
    n_eval = min(len(eval_shards), cfg.eval_samples or len(eval_shards)) if eval_shards is not None else 0

    init_dir = resolve_model(cfg.init)
    ref_dir = resolve_model(cfg.ref) if cfg.ref else None
    tok_dir = _find_tokenizer(cfg, init_dir, shards)
    run = Path(cfg.out)
    resume_from = on_main(dist, _prepare_run, cfg, run, console)
    fingerprints = _fingerprints(init_dir, ref_dir, shards, eval_shards)
    on_main(dist, _write_run_config, cfg, run, fingerprints, tok_dir, device, precision, order, n_examples,
            resume_from is not None, dist, parallel)
    seed_everything(cfg.seed)

    # ---------------------------------------------------------------------------------------------
    # The policy (sharded or replicated over the ranks), and the reference log-probs (one no-grad
    # pass, each rank its share, cached beside the shards)
    # ---------------------------------------------------------------------------------------------
    # fp32 master weights; with LoRA the frozen base may stay in bf16 on CUDA (only the adapters train)
    base_dtype = "bf16" if cfg.lora_r and precision == "bf16" else "fp32"
    policy = load_model(init_dir, dtype=base_dtype, device=device)  # eval mode: no dropout, as TRL does
    family_note = check_packed_forward(policy)  # a model whose packed rows would leak fails here, in one line
    if family_note and dist.main:
        console.print(f"[yellow]note:[/] {family_note}", highlight=False)
    adapter = None
    if cfg.lora_r:  # FSDP2 shards the frozen base and the adapters alike; DDP reduces the adapters' gradients
        adapter = apply_lora(cfg, policy, base=_base_name(cfg.init, init_dir))
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(policy)
    # every rank must form the same micro-batches: the smallest budget of any rank
    budget = cfg.max_tokens_per_batch or -int(all_reduce_max(dist, -token_budget(policy, device, precision))[0])
    if dist.main:
        _record_budget(run, budget)
    lockstep = parallel == "fsdp"
    # a scheduled alpha: plan the y_gen forwards for its largest value (a step at alpha 0 skips them all)
    plan_cfg = loss_cfg if cfg.alpha_schedule == "constant" else dataclasses.replace(
        loss_cfg, alpha=max(cfg.alpha, cfg.alpha_end))
    inputs = StepInputs.of(cfg, policy, shards, plan_cfg, objective, None, device, dist, lockstep)
    module = PolicyForward(inputs)  # the policy's whole forward of a micro-batch, one module call
    trained = wrap(module, policy, parallel, device, precision)  # what forward and backward go through
    optimizer = make_optimizer(cfg, module)  # on the (sharded) parameters that training updates
    ref = eval_ref = None
    t_ref = time.perf_counter()
    if objective.needs_reference or eval_objective.needs_reference:
        # The policy before its first update *is* the reference when --ref is --init: no second load.
        same = ref_dir is not None and ref_dir.resolve() == init_dir.resolve()
        load_ref = (lambda: _scorer(module)) if same else (lambda: _reference_scorer(ref_dir, cfg, device, dist, parallel, precision))
        ref_pass = partial(
            _reference_pass, cfg=cfg, ref_dir=ref_dir, load=load_ref, precision=precision, autocast=autocast,
            run=run, console=console, budget=budget, dist=dist, lockstep=lockstep,
        )
        if objective.needs_reference:
            ref = ref_pass(shards, np.arange(n_examples), need_ygen=objective.needs_ref_ygen, what="train")
        if eval_shards is not None and eval_objective.needs_reference:
            eval_ref = ref_pass(eval_shards, np.arange(n_eval), need_ygen=eval_objective.needs_ref_ygen, what="eval")
        reshard(module, parallel)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # peak_mem_gib: the training steps', not the reference pass's
    ref_seconds = time.perf_counter() - t_ref
    inputs = dataclasses.replace(inputs, ref=ref)
    module.inputs = inputs
    eval_inputs = (StepInputs.of(cfg, policy, eval_shards, eval_cfg, eval_objective, eval_ref, device, dist, lockstep)
                   if eval_shards else None)

    step = 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, module, optimizer, verify=False, dist=dist, trainable_only=adapter is not None)
        step = int(state["step"])
        console.print(f"resumed from {resume_from} (step {step} of {order.total_steps}, "
                      f"written by {state.get('world_size', 1)} rank(s), read by {dist.world})")
    if dist.main:
        _truncate_metrics(run / "metrics.jsonl", step)
    dims = ModelDims.of(policy)
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else _peak_flops(device, precision)
    params = [p for p in module.parameters() if p.requires_grad]
    lengths = shards.lengths()
    unit = "ex/s" if objective.data == "sft" else "pairs/s"
    # DDP and FSDP average gradients over ranks: each rank's share of the step's mean, times N
    scale = float(dist.world)

    # ---------------------------------------------------------------------------------------------
    # The loop
    # ---------------------------------------------------------------------------------------------
    bar_on = cfg.progress and console.is_terminal and dist.main
    progress = _progress_bar(console, enabled=bar_on)
    reporter = Reporter(run, cfg.report_to, enabled=dist.main, config=cfg.to_dict())
    with progress, reporter:
        task = progress.add_task(cfg.method, total=order.total_steps, completed=step, loss="-", speed="-")
        while step < order.total_steps:
            t0, cpu0 = time.perf_counter(), time.process_time()
            # -- data: this step's examples, this rank's share, each one's weight in the step's loss --
            ids = order.step_examples(step)
            alpha = alpha_at(cfg, step, order.total_steps)
            step_cfg = loss_cfg if alpha is None or alpha == loss_cfg.alpha else dataclasses.replace(loss_cfg, alpha=alpha)
            module.inputs = dataclasses.replace(module.inputs, loss_cfg=step_cfg)
            weights = objective.step_weights(counted_tokens(lengths, ids))  # the loss's reduction
            plan = rank_micro_batches(example_tokens(lengths, ids, objective), budget, cfg.batch_size, dist)
            outputs: list[LossOutput] = []
            work = TokenCounts()
            step_loss = torch.zeros((), device=device)
            for k, pos in enumerate(plan):
                empty = pos is None  # keeps the ranks in step; an example at weight 0
                pos = np.arange(1) if empty else pos
                w = torch.as_tensor(0.0 * weights[pos] if empty else weights[pos] * scale, dtype=torch.float32, device=device)
                with grad_sync(trained, parallel, sync=k == len(plan) - 1):
                    # -- forward: one packed row per micro-batch (two with a policy-vote y_gen skip) --
                    with autocast():
                        logps = trained(ids[pos], None if empty else work)
                    # -- loss, backward: each micro-batch's graph is freed right after its backward --
                    out = objective(step_cfg, logps)
                    loss = (out.loss * w).sum()
                    loss.backward()
                if not empty:
                    step_loss += loss.detach() / scale
                    outputs.append(out)

            # -- step: clip, schedule, update ---------------------------------------------------------
            if cfg.max_grad_norm > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            else:
                norm = grad_norm(params)
            lr = lr_at(cfg, step, order.total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            (step_loss,) = all_reduce_sum(dist, step_loss.item())  # waits for the device: the step is over
            seconds = time.perf_counter() - t0
            work = work.total(dist)  # tokens of every rank

            # -- log ------------------------------------------------------------------------------------
            record = {
                "step": step,
                "epoch": round(order.examples_seen(step) / n_examples, 4),
                "examples": len(ids),
                "loss": step_loss,
                **summarize(outputs, dist=dist),
                "lr": lr,
                **({"alpha": alpha} if alpha is not None else {}),
                "grad_norm": float(norm),
                "tokens": work.tokens,
                "tokens_per_s": work.tokens / seconds,
                "examples_per_s": len(ids) / seconds,
                "mfu": dims.flops(work) / seconds / (peak * dist.world) if peak else None,
                "step_s": seconds,
                "step_cpu_s": time.process_time() - cpu0,  # host CPU time, all threads (robust on a shared machine)
                "elapsed_s": time.perf_counter() - t_start,
                **({"peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30} if device.type == "cuda" else {}),
            }
            # -- eval -------------------------------------------------------------------------------------
            if eval_shards is not None and (step == order.total_steps or (cfg.eval_every and step % cfg.eval_every == 0)):
                with autocast():
                    now = eval_inputs
                    if alpha is not None and eval_cfg.alpha is not None and eval_cfg.alpha != alpha:
                        now = dataclasses.replace(eval_inputs, loss_cfg=dataclasses.replace(eval_cfg, alpha=alpha))
                    record.update(eval_loss(now, n_eval, budget, cfg.batch_size, module=_eval_module(module, now)))
                reshard(module, parallel)
                console.print(_eval_line(step, record), highlight=False)
            reporter.log(record)
            progress.update(task, advance=1, loss=f"{step_loss:.4f}", speed=f"{len(ids) / seconds:.2f} {unit}")
            if not bar_on and (step == order.total_steps or step % max(1, order.total_steps // 20) == 0):
                console.print(f"step {step}/{order.total_steps} loss {step_loss:.4f} {len(ids) / seconds:.2f} {unit}")

            # -- checkpoint -----------------------------------------------------------------------------
            if cfg.save_every and step % cfg.save_every == 0:
                state = {"epoch": order.epoch_of(step), "examples_seen": order.examples_seen(step), "lr_schedule": cfg.lr_schedule}
                save_checkpoint(run, step, module, optimizer, state, keep_last=cfg.keep_last, dist=dist,
                                trainable_only=adapter is not None)

    # ---------------------------------------------------------------------------------------------
    # The final model, in Hugging Face format with the tokenizer (rank 0, from the full state dict)
    # ---------------------------------------------------------------------------------------------
    if adapter is not None:
        model_dir = _save_lora(module, adapter, parallel, tok_dir, run, precision, dist, merge=cfg.merge)
    else:
        model_dir = _save_model(module, policy, parallel, tok_dir, run / "model", precision, dist)
    console.print(
        f"[green]done:[/] {order.total_steps} steps in {time.perf_counter() - t_start:.1f} s "
        f"(reference pass {ref_seconds:.1f} s; {dist.world} rank(s), {parallel}); model in {model_dir}",
        highlight=False,
    )
    barrier(dist)
    return model_dir


def _eval_module(module: PolicyForward, eval_inputs: StepInputs) -> Callable[[np.ndarray], Any]:
    """Evaluation through the policy's module (under FSDP its forward gathers the parameters)."""

    def run(ids: np.ndarray) -> Any:
        saved, module.inputs = module.inputs, eval_inputs
        try:
            return module(ids)
        finally:
            module.inputs = saved

    return run


def _scorer(module: torch.nn.Module) -> Callable[[Any], torch.Tensor]:
    """Sums of log-probs of a packed batch through a policy module (one forward)."""
    return lambda batch: module(batch=batch).sums


def _reference_scorer(ref_dir: Path, cfg: TrainConfig, device: torch.device, dist: Dist, parallel: str,
                      precision: str) -> Callable[[Any], torch.Tensor]:
    """A reference other than --init, loaded on every rank (sharded with FSDP2 when the policy is)."""
    lm = load_model(ref_dir, dtype="fp32", device=device)
    module = PolicyForward(StepInputs.of(cfg, lm, None, cfg.loss_config(), LOSSES[cfg.method], None, device, dist,
                                         parallel == "fsdp"))
    if parallel == "fsdp":
        wrap(module, lm, "fsdp", device, precision)
    return _scorer(module)


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


# -------------------------------------------------------------------------------------------------
# Micro-batches: which examples share a forward pass
# -------------------------------------------------------------------------------------------------


_BUDGET_MIN, _BUDGET_MAX, _BUDGET_CPU_FRACTION, _BUDGET_GPU_FRACTION = 2048, 65536, 0.25, 0.6


def activation_bytes_per_token(model: torch.nn.Module, precision: str) -> int:
    """Activation memory per token of a forward + backward pass (:mod:`dppo.train.memory`'s estimate)."""
    from dppo.train.memory import ACT_BF16, ACT_FP32

    c = model.config
    inter = getattr(c, "intermediate_size", None) or 4 * c.hidden_size
    a, b = ACT_BF16 if precision == "bf16" else ACT_FP32
    return int(c.num_hidden_layers * (a * c.hidden_size + b * inter))


def token_budget(model: torch.nn.Module, device: torch.device, precision: str) -> int:
    """The default ``--max-tokens-per-batch``: the tokens whose activations fit in the memory left.

    On CUDA: 60% of the free memory after the weights, less the gradients and AdamW's two moments
    still to come (3 fp32 copies of the parameters); on the CPU: 25% of the available RAM. Divided
    by :func:`activation_bytes_per_token`, clamped to [2048, 65536], rounded down to a multiple of 256.
    """
    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        spare = _BUDGET_GPU_FRACTION * (free - 3 * params)
    else:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 8 << 30
        spare = _BUDGET_CPU_FRACTION * (available - 3 * params)
    tokens = int(spare // max(1, activation_bytes_per_token(model, precision)))
    return max(_BUDGET_MIN, min(_BUDGET_MAX, tokens)) // 256 * 256


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
            console.print(f"[yellow]note:[/] no checkpoint in {run}; starting from step 0")
        else:
            read_state(ckpt)  # verify it now, before the reference pass: a damaged checkpoint fails fast
        return ckpt
    if any(p.exists() for p in markers):
        if not cfg.overwrite:
            raise ConfigError(f"{run} already holds a run: pass --resume to continue it or --overwrite to replace it")
        for p in markers:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    run.mkdir(parents=True, exist_ok=True)
    return None


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


def _reference_pass(
    shards: Shards, ids: np.ndarray, *, need_ygen: bool, what: str, cfg: TrainConfig, ref_dir: Path,
    load: Callable[[], Callable[[Any], torch.Tensor]], precision: str, autocast: Callable[[], Any], run: Path,
    console: Console, budget: int, dist: Dist, lockstep: bool,
) -> RefLogps:
    progress = _progress_bar(console, enabled=cfg.progress and console.is_terminal and dist.main, rate=False)
    with progress:
        task = progress.add_task(f"reference log-probs ({what})", total=None, loss="", speed="")
        result = reference_logps(
            ref_dir, shards, ids, load=load, need_ygen=need_ygen, precision=precision, autocast=autocast,
            batch_tokens=budget, fallback_dir=run / "refcache", dist=dist, lockstep=lockstep,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    status = "reused" if result.hit else "computed"
    console.print(f"reference log-probs ({what}, {len(ids)} pairs) {status}: {result.cache_dir}", highlight=False)
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
