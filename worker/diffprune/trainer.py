"""Structured diff pruning of the shared base encoder for one task: the training loop.

Phase 1 ("prune") learns δ = z ⊙ z_g ⊙ w on top of the frozen base θ₀ with stretched
hard-concrete gates (worker/diffprune/gates.py) and the penalty λ·Σ_g P(z_g≠0)·Σ P(z≠0).
Projection keeps exactly k = round(density·N) entries of the deterministic δ
(worker/diffprune/projection.py). Phase 2 ("fix") fine-tunes the kept values with the mask
fixed. The dense head is trained throughout. `mask_method` swaps the gates for an ablation
(a dense diff, a gradient-magnitude mask, a random mask) with the same run length and phase 2.

Where the memory goes (N = base parameters, fp32):
- θ₀ is the loaded base's own storage, shared with the process-wide cache, never written;
- per step each base tensor is materialised once as θ = θ₀ + δ (`GatedDelta`, which saves
  only z for backward), so the model runs on `functional_call` with no second base copy;
- w (AdamW) and α (`alpha_optimizer`: by default step·sign(g), no state) are updated inside
  backward by post-accumulate-grad hooks (`InBackwardSteps`), so their gradients never exist
  for all tensors at once;
- phase 2 trains only the k kept values (`index_add` into θ₀, out of place).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from diffs.basemodel import LoadedBase, k_for_density
from diffs.build import make_meta_consistent
from diffs.types import VALUE_DTYPES, ArtifactMeta, SparseDiff
from worker.data import TaskData
from worker.diffprune.config import (
    DiffPruneConfig,
    fix_lr_for,
    run_steps,
    sign_step_size,
    steps_per_epoch,
)
from worker.diffprune.gates import GateNoise, kernels
from worker.diffprune.state import DiffPruneState, InBackwardSteps, step_logits
from worker.kit.batching import encode_rows, epoch_batches, label_tensor
from worker.kit.checkpoint import CheckpointIO, load_checkpoint
from worker.kit.evaluate import evaluate
from worker.kit.loop import LoopControl
from worker.kit.model import autocast_for, peak_memory_bytes, prepare_model, resolve_device
from worker.kit.progress import Progress
from worker.kit.schedule import linear_warmup_decay, set_learning_rates


@dataclass
class TrainResult:
    """A finished run: the projected sparse diff, validation metrics and costs."""

    diff: SparseDiff
    metrics: dict[str, Any]
    train_seconds: float
    peak_memory_bytes: int
    prune_steps: int = 0
    fix_steps: int = 0
    # Of the k kept positions, the fraction whose deterministic gate was open at projection
    # (None without gates), and the expected nonzeros of phase 1's diff just before it.
    gate_open_fraction: float | None = None
    expected_nnz_at_projection: float | None = None


# ---------------------------------------------------------------- run length and batches


@dataclass(frozen=True)
class RunLength:
    """Optimizer steps of each phase and the phase-2 step size they imply."""

    prune_steps: int
    fix_steps: int
    fix_lr: float

    @classmethod
    def of(cls, rows: int, config: DiffPruneConfig) -> RunLength:
        """The run length of `config` on a training table of `rows` rows (see `run_steps`)."""
        prune_steps, fix_steps = run_steps(rows, config)
        return cls(prune_steps, fix_steps, fix_lr_for(config, fix_steps))

    @property
    def total_steps(self) -> int:
        """Steps of both phases."""
        return self.prune_steps + self.fix_steps

    def within_phase(self, step: int, projected: bool) -> tuple[int, int]:
        """(step within its phase, steps of that phase) for a run-wide step."""
        if projected:
            return step - self.prune_steps, self.fix_steps
        return step, self.prune_steps


def micro_batches(rows: int, step_in_phase: int, config: DiffPruneConfig) -> list[Tensor]:
    """Row indices of the micro-batches of one optimizer step; the order is seeded per epoch."""
    epoch, position = divmod(step_in_phase, steps_per_epoch(rows, config))
    batches = epoch_batches(rows, config.batch_size, config.seed * 100_003 + epoch)
    return batches[position * config.grad_accum : (position + 1) * config.grad_accum]


def resolved_config(config: DiffPruneConfig, length: RunLength) -> dict[str, Any]:
    """The config as run: the chosen phase lengths (in steps) and fixed-mask step filled in."""
    return {
        **config.to_dict(),
        "prune_steps": length.prune_steps,
        "fix_steps": length.fix_steps,
        "fix_lr": length.fix_lr,
    }


# ---------------------------------------------------------------- one optimizer step


def set_step_learning_rates(state: DiffPruneState, factor: float) -> None:
    """The scheduled lr of every optimizer of the current phase."""
    set_learning_rates(state.opt_head, [state.config.head_lr], factor)
    if state.projected:
        set_learning_rates(state.opt_kept, [state.fix_lr], factor)
    else:
        for opt in state.opt_w.values():
            set_learning_rates(opt, [state.config.lr], factor)


def accumulate_micro_batch(
    state: DiffPruneState,
    model: nn.Module,
    batch: dict[str, Tensor],
    noise: GateNoise | None,
    micro_batches_in_step: int,
    autocast: contextlib.AbstractContextManager,
) -> tuple[float, float | None]:
    """Forward and backward of one micro-batch; (its task loss, expected L0 with gates)."""
    if state.projected:
        params, l0 = state.fixed_params(state.kept_val), None
    else:
        params, l0 = state.phase1_params(noise)
    with autocast:
        task_loss = functional_call(model, params, args=(), kwargs=batch).loss
    params.clear()  # autograd keeps the θ tensors it needs (not the embeddings')
    loss = task_loss.float()
    expected_nnz = None
    if l0 is not None:
        expected_nnz = float(l0.detach())
        loss = loss + state.config.l0_lambda * l0
    (loss / micro_batches_in_step).backward()
    del params, l0, loss
    return float(task_loss.detach()), expected_nnz


def finish_step(state: DiffPruneState) -> None:
    """The updates that wait for the whole step: head, then kept values (phase 2) or α_g."""
    state.opt_head.step()
    state.opt_head.zero_grad(set_to_none=True)
    if state.projected:
        state.opt_kept.step()
        state.opt_kept.zero_grad(set_to_none=True)
    elif state.gated and state.config.structured:
        logits = [a for a in state.alpha_g.values() if a.grad is not None]
        if state.opt_alpha_g is not None:
            if logits:
                state.opt_alpha_g.step()
                state.opt_alpha_g.zero_grad(set_to_none=True)
        else:
            for a in logits:
                step_logits(state, a, None)


# ---------------------------------------------------------------- the trainer


def train_diff(
    data: TaskData,
    config: DiffPruneConfig,
    *,
    base: LoadedBase,
    progress: Callable[[Progress], None] | None = None,
    checkpoint: CheckpointIO | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Learn a sparse diff with exactly round(density·N) entries for one task."""
    started = time.perf_counter()
    config.validate()
    device = resolve_device(config.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    kernels.use_compiled(config.compile_gates)
    torch.manual_seed(config.seed)
    model = prepare_model(base, data, device, share_base=True)
    model.train()
    rows = data.train.rows
    labels = label_tensor(data.train, data.task_type).to(device)
    length = RunLength.of(rows, config)
    state = DiffPruneState(model, config, fix_lr=length.fix_lr, device=device)
    state.sign_step = sign_step_size(config, length.prune_steps)
    k = k_for_density(config.density, state.n_params)

    control = LoopControl(config, length.total_steps, progress, checkpoint, should_stop)
    saved = load_checkpoint(checkpoint, config, map_location=device)
    if saved is not None:
        state.load_state_dict(saved)
        del saved
        control.report(state)  # where the resumed run stands (it may have no step left)

    in_backward = InBackwardSteps(state)
    noise = (
        GateNoise(
            max(p.numel() for p in state.theta0.values()), device=device, generator=state.gate_rng
        )
        if state.gated
        else None
    )
    autocast = autocast_for(device)
    while state.step < length.total_steps:
        if state.step >= length.prune_steps and not state.projected:
            in_backward.remove()
            state.project(k)
        control.check_stop(f"stopped at step {state.step} of {length.total_steps}")
        phase_step, phase_total = length.within_phase(state.step, state.projected)
        set_step_learning_rates(state, linear_warmup_decay(phase_step, phase_total, config.warmup))
        # Each phase starts the seeded shuffles from its own first epoch: the fixed-mask phase
        # replays the gated epochs' order (docs/benchmarks.md).
        batches = micro_batches(rows, phase_step, config)
        loss_sum = 0.0
        expected_nnz = float(k) if state.projected else float(state.phase1_nnz)
        for i, batch_rows in enumerate(batches):
            in_backward.armed = i == len(batches) - 1
            batch = encode_rows(base, data.train, batch_rows, config.max_length, device)
            batch["labels"] = labels[batch_rows.to(device)]
            task_loss, expected = accumulate_micro_batch(
                state, model, batch, noise, len(batches), autocast
            )
            loss_sum += task_loss
            if expected is not None:
                expected_nnz = expected
        finish_step(state)
        state.step += 1
        state.loss, state.expected_nnz = loss_sum / len(batches), expected_nnz
        control.step_done(state)

    if not state.projected:
        in_backward.remove()
        state.project(k)
    diff, metrics = export_diff(state, model, data, base, length)
    return TrainResult(
        diff=diff,
        metrics=metrics,
        train_seconds=time.perf_counter() - started,
        peak_memory_bytes=peak_memory_bytes(device),
        prune_steps=length.prune_steps,
        fix_steps=length.fix_steps,
        gate_open_fraction=state.gate_open_fraction,
        expected_nnz_at_projection=state.expected_nnz_at_projection,
    )


def export_diff(
    state: DiffPruneState, model: nn.Module, data: TaskData, base: LoadedBase, length: RunLength
) -> tuple[SparseDiff, dict[str, Any]]:
    """The artifact of a projected run: values rounded to the stored dtype, evaluated as stored.

    Its config records the run length and fixed-mask step actually used; its metrics add what
    the projection saw (open fraction of the kept gates, expected nonzeros before it).
    """
    config = state.config
    value_dtype = VALUE_DTYPES[config.value_dtype]
    stored = {n: v.detach().to(value_dtype) for n, v in state.kept_val.items()}
    with torch.no_grad():
        final_params = state.fixed_params({n: v.float() for n, v in stored.items()})
    metrics = evaluate(
        model,
        data.validation,
        base=base,
        task_type=data.task_type,
        num_labels=data.num_labels,
        max_length=config.max_length,
        batch_size=config.eval_batch_size,
        params=final_params,
    )
    del final_params
    metrics = {
        **metrics,
        "gate_open_fraction": state.gate_open_fraction,
        "expected_nnz_at_projection": state.expected_nnz_at_projection,
    }
    mapping = data.train.mapping
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=state.n_params,
        task_type=data.task_type,
        label_names=list(data.label_names) if data.task_type != "regression" else [],
        max_length=config.max_length,
        text_field=mapping.text_field,
        text_pair_field=mapping.text_pair_field,
        value_dtype=config.value_dtype,
        config=resolved_config(config, length),
        metrics=dict(metrics),
    )
    diff = SparseDiff(
        indices={n: idx.cpu() for n, idx in state.kept_idx.items()},
        values={n: v.cpu() for n, v in stored.items()},
        shapes={n: tuple(state.theta0[n].shape) for n in state.kept_idx},
        head={n: p.detach().cpu().clone() for n, p in state.head.items()},
        meta=meta,
    )
    make_meta_consistent(diff)
    return diff, metrics
