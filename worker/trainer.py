"""Structured diff pruning of the shared base encoder for one task: a flat training loop.

Phase 1 ("prune") learns δ = z ⊙ z_g ⊙ w on top of the frozen base θ₀ with stretched
hard-concrete gates (worker/gates.py) and the penalty λ·Σ_g P(z_g≠0)·Σ P(z≠0).
Projection keeps exactly k = round(density·N) entries of the deterministic δ
(worker/projection.py). Phase 2 ("fix") fine-tunes the kept values with the mask fixed.
The dense head is trained throughout.

Where the memory goes (N = base parameters, fp32):
- θ₀ is the loaded base's own storage, shared with the process-wide cache, never written;
- per step each base tensor is materialised once as θ = θ₀ + δ (`GatedDelta`, which saves
  only z for backward), so the model runs on `functional_call` with no second base copy;
- w (AdamW) and α (plain SGD, no state) are updated inside backward by
  post-accumulate-grad hooks, so their gradients never exist for all tensors at once;
- phase 2 trains only the k kept values (`index_add` into θ₀, out of place).
"""

from __future__ import annotations

import contextlib
import io
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call

from registry.artifact import VALUE_DTYPES, ArtifactMeta, SparseDiff, make_meta_consistent
from registry.basemodel import LoadedBase, build_model
from registry.tabular import Table
from worker.config import DiffPruneConfig, fix_lr_for
from worker.data import TaskData
from worker.gates import (
    GateNoise,
    deterministic_gate,
    gated_delta,
    kernels,
    logistic_from_bits,
    prob_nonzero,
    stochastic_gate,
)
from worker.metrics import task_metrics
from worker.projection import k_for_density, project_topk

CHECKPOINT_VERSION = 1
# Config fields that may differ between a run and its resumption.
RESUMABLE_CHANGES = {"device", "checkpoint_every", "eval_batch_size", "compile_gates"}


@dataclass
class Progress:
    """Where a training run is: optimizer step (1-based, over both phases) and loss."""

    step: int
    total_steps: int
    loss: float
    expected_nnz: float
    phase: str  # "prune" (gated diff) or "fix" (mask fixed)


class CheckpointIO(Protocol):
    """Where the trainer keeps its resumable state (object store, file, memory)."""

    def load(self) -> bytes | None:
        """The last saved state, or None when there is none."""

    def save(self, data: bytes) -> None:
        """Replace the saved state."""


class TrainingCancelled(Exception):
    """Raised when `should_stop()` turns true; nothing is returned or published."""


@dataclass
class TrainResult:
    """A finished run: the projected sparse diff, validation metrics and costs."""

    diff: SparseDiff
    metrics: dict[str, Any]
    train_seconds: float
    peak_memory_bytes: int


# ---------------------------------------------------------------- small helpers


def resolve_device(requested: str) -> torch.device:
    """The configured device, or cuda when available, else cpu."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing on CPU (fp32)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_adamw(params: list[Tensor], *, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    """AdamW, fused where this torch build supports it for the device (same for every method)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def lr_at(step: int, total: int, base_lr: float, warmup: float) -> float:
    """Linear warmup over `warmup`·total steps, then linear decay to zero at `total`."""
    warmup_steps = int(warmup * total)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * max(0.0, (total - step) / max(1, total - warmup_steps))


def steps_per_epoch(rows: int, config: DiffPruneConfig) -> int:
    """Optimizer steps in one epoch (the last step of an epoch may have fewer micro-batches)."""
    return math.ceil(math.ceil(rows / config.batch_size) / config.grad_accum)


def micro_batches(rows: int, step_in_phase: int, config: DiffPruneConfig) -> list[Tensor]:
    """Row indices of the micro-batches of one optimizer step; the order is seeded per epoch."""
    per_epoch = steps_per_epoch(rows, config)
    epoch, position = divmod(step_in_phase, per_epoch)
    order = torch.randperm(
        rows, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    )
    batches = list(order.split(config.batch_size))
    return batches[position * config.grad_accum : (position + 1) * config.grad_accum]


def encode_rows(
    tokenizer: Any, table: Table, rows: Tensor | list[int], max_length: int, device: torch.device
) -> dict[str, Tensor]:
    """Tokenise some rows of a table (pairs when the table has them), padded to the longest."""
    rows = [int(i) for i in rows]
    texts = [table.texts[i] for i in rows]
    pairs = None if table.text_pairs is None else [table.text_pairs[i] for i in rows]
    encoded = tokenizer(
        texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )
    return {key: value.to(device) for key, value in encoded.items()}


def label_tensor(table: Table, task_type: str) -> Tensor:
    """All labels of a table: class ids (int64) or regression targets (float32)."""
    if task_type == "regression":
        return torch.tensor([float(x) for x in table.labels], dtype=torch.float32)
    return torch.tensor(table.label_ids(), dtype=torch.int64)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: max allocated bytes since the last reset. CPU: this process's RSS high-water mark."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def head_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The task head: every parameter of the model outside its base encoder."""
    prefix = model.base_model_prefix + "."
    return {n: p for n, p in model.named_parameters() if not n.startswith(prefix)}


def prepare_model(
    base: LoadedBase, data: TaskData, device: torch.device, *, share_base: bool
) -> nn.Module:
    """A classification model on `device` with a seeded fresh head and the base weights.

    With `share_base` (CPU only) the encoder's tensors are the cached base's own storage,
    frozen, so training holds one copy of θ₀, not two.
    """
    model = build_model(
        base,
        task_type=data.task_type,
        num_labels=data.num_labels,
        label_names=None if data.task_type == "regression" else data.label_names,
    )
    if share_base and device.type == "cpu":
        model.base_model.load_state_dict(base.encoder.state_dict(), assign=True)
    model.base_model.requires_grad_(not share_base)
    return model.to(device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    table: Table,
    *,
    tokenizer: Any,
    task_type: str,
    num_labels: int,
    max_length: int,
    batch_size: int = 64,
    params: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """Metrics of `model` (with `params` substituted, if given) on a table; restores the mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    predictions: list = []
    try:
        for start in range(0, table.rows, batch_size):
            rows = list(range(start, min(start + batch_size, table.rows)))
            batch = encode_rows(tokenizer, table, rows, max_length, device)
            with autocast_for(device):
                if params is None:
                    logits = model(**batch).logits
                else:
                    logits = functional_call(model, params, args=(), kwargs=batch).logits
            logits = logits.float()
            if task_type == "regression":
                predictions.extend(logits.squeeze(-1).cpu().tolist())
            else:
                predictions.extend(logits.argmax(-1).cpu().tolist())
    finally:
        model.train(was_training)
    labels = label_tensor(table, task_type).tolist()
    return task_metrics(task_type, predictions, labels, num_labels)


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
    prefix = model.base_model_prefix + "."
    theta0 = {n: p for n, p in model.base_model.named_parameters()}
    names = sorted(theta0)
    head = head_parameters(model)
    n_params = sum(p.numel() for p in theta0.values())
    k = k_for_density(config.density, n_params)
    lower, upper = config.gate_lower, config.gate_upper
    labels = label_tensor(data.train, data.task_type).to(device)
    rows = data.train.rows

    # -- run length: phase 1 steps, then phase 2 steps
    per_epoch = steps_per_epoch(rows, config)
    prune_steps = per_epoch * config.epochs
    fix_steps = per_epoch * config.fix_epochs
    total_steps = prune_steps + fix_steps
    fix_lr = fix_lr_for(config, fix_steps)

    # -- state of both phases
    gate_rng = torch.Generator(device=device).manual_seed(config.seed + 1)
    w = {n: torch.zeros_like(theta0[n], dtype=torch.float32, requires_grad=True) for n in names}
    alpha = {
        n: torch.full_like(theta0[n], config.alpha_init, dtype=torch.float32, requires_grad=True)
        for n in names
    }
    alpha_g = {
        n: torch.full((), config.alpha_init, device=device, requires_grad=config.structured)
        for n in names
    }
    opt_w = {n: make_adamw([w[n]], lr=config.lr) for n in names}
    opt_head = make_adamw(list(head.values()), lr=config.head_lr, weight_decay=config.weight_decay)
    kept_idx: dict[str, Tensor] = {}
    kept_val: dict[str, Tensor] = {}
    opt_kept: torch.optim.Optimizer | None = None
    projected = False
    step = 0
    last_report = (0.0, float(n_params))  # (loss, expected nnz) of the last finished step

    # -- resume
    saved = checkpoint.load() if checkpoint is not None else None
    resumed = saved is not None
    if saved is not None:
        state = torch.load(io.BytesIO(saved), map_location=device, weights_only=True)
        check_resumable(state, config)
        step = int(state["step"])
        with torch.no_grad():
            for n, p in head.items():
                p.copy_(state["head"][n])
        opt_head.load_state_dict(state["opt_head"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), device)
        gate_rng.set_state(state["gate_rng"].cpu())
        last_report = (float(state.get("loss", 0.0)), float(state.get("expected_nnz", n_params)))
        if state["projected"]:
            projected = True
            w, alpha, alpha_g, opt_w = {}, {}, {}, {}
            kept_idx = {n: t.to(device) for n, t in state["kept_idx"].items()}
            kept_val = {n: t.to(device).requires_grad_(True) for n, t in state["kept_val"].items()}
            opt_kept = make_adamw(list(kept_val.values()), lr=fix_lr)
            opt_kept.load_state_dict(state["opt_kept"])
        else:
            with torch.no_grad():
                for n in names:
                    w[n].copy_(state["w"][n])
                    alpha[n].copy_(state["alpha"][n])
                    alpha_g[n].copy_(state["alpha_g"][n])
                    opt_w[n].load_state_dict(state["opt_w"][n])
        del state, saved

    if resumed and progress is not None:
        # Say where the resumed run stands before its first step (it may have none left).
        progress(Progress(step, total_steps, *last_report, "fix" if projected else "prune"))

    # -- w and α step inside backward, as soon as each tensor's gradient is complete
    update_now = [False]

    def step_w(name: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            if update_now[0]:
                opt_w[name].step()
                param.grad = None

        return hook

    def step_alpha(param: Tensor) -> None:
        if update_now[0]:
            with torch.no_grad():
                param.add_(param.grad, alpha=-config.alpha_lr)
            param.grad = None

    hooks = []
    if not projected:
        hooks = [w[n].register_post_accumulate_grad_hook(step_w(n)) for n in names]
        hooks += [alpha[n].register_post_accumulate_grad_hook(step_alpha) for n in names]

    noise = GateNoise(max(p.numel() for p in theta0.values()), device=device, generator=gate_rng)

    def gated_params() -> tuple[dict[str, Tensor], Tensor]:
        """θ = θ₀ + z ⊙ z_g ⊙ w for every base tensor, and the expected L0 of the gates."""
        params, l0 = {}, torch.zeros((), device=device)
        for n in names:
            if config.structured:
                bits = noise.draw(1).bits()
                z_g = stochastic_gate(alpha_g[n], logistic_from_bits(bits)[0], lower, upper)
                p_g = prob_nonzero(alpha_g[n], lower, upper)
            else:
                z_g = p_g = torch.ones((), device=device)
            draw = noise.draw(theta0[n].numel())
            theta, expected = gated_delta(theta0[n], w[n], alpha[n], z_g, draw, lower, upper)
            params[prefix + n] = theta
            l0 = l0 + p_g * expected
        return params, l0

    def fixed_params(values: dict[str, Tensor]) -> dict[str, Tensor]:
        """θ₀ with the kept values added at the kept positions (out of place)."""
        return {
            prefix + n: theta0[n].reshape(-1).index_add(0, kept_idx[n], v).view_as(theta0[n])
            for n, v in values.items()
        }

    def save_checkpoint() -> None:
        state: dict[str, Any] = {
            "version": CHECKPOINT_VERSION,
            "config": config.to_dict(),
            "step": step,
            "projected": projected,
            "head": {n: p.detach() for n, p in head.items()},
            "opt_head": opt_head.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "gate_rng": gate_rng.get_state(),
            "loss": last_report[0],
            "expected_nnz": last_report[1],
        }
        if device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(device)
        if projected:
            state["kept_idx"] = kept_idx
            state["kept_val"] = {n: v.detach() for n, v in kept_val.items()}
            state["opt_kept"] = opt_kept.state_dict()
        else:
            state["w"] = {n: t.detach() for n, t in w.items()}
            state["alpha"] = {n: t.detach() for n, t in alpha.items()}
            state["alpha_g"] = {n: t.detach() for n, t in alpha_g.items()}
            state["opt_w"] = {n: opt.state_dict() for n, opt in opt_w.items()}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        checkpoint.save(buffer.getvalue())

    def project() -> None:
        """Deterministic-gate δ → exactly k kept entries; phase 2 starts from their values."""
        nonlocal projected, opt_kept, kept_idx, kept_val, w, alpha, alpha_g, opt_w
        for handle in hooks:
            handle.remove()
        opt_w = {}  # frees AdamW's two copies before the dense δ is formed
        with torch.no_grad():
            deltas = {}
            for n in names:
                gate = deterministic_gate(alpha[n], lower, upper)
                if config.structured:
                    gate.mul_(deterministic_gate(alpha_g[n], lower, upper))
                deltas[n] = gate.mul_(w[n])
                w[n] = alpha[n] = None  # type: ignore[assignment]
        w, alpha, alpha_g = {}, {}, {}
        kept_idx, values = project_topk(deltas, k)
        del deltas
        kept_idx = {n: idx for n, idx in kept_idx.items() if idx.numel()}
        kept_val = {n: values[n].clone().requires_grad_(True) for n in kept_idx}
        opt_kept = make_adamw(list(kept_val.values()), lr=fix_lr)
        projected = True

    # -- the loop
    autocast = autocast_for(device)
    while step < total_steps:
        if step >= prune_steps and not projected:
            project()
        if should_stop is not None and should_stop():
            raise TrainingCancelled(f"stopped at step {step} of {total_steps}")
        phase = "fix" if projected else "prune"
        phase_step = step - prune_steps if projected else step
        phase_total = fix_steps if projected else prune_steps
        schedule = lr_at(phase_step, phase_total, 1.0, config.warmup)
        for group in opt_head.param_groups:
            group["lr"] = config.head_lr * schedule
        if projected:
            for group in opt_kept.param_groups:
                group["lr"] = fix_lr * schedule
        else:
            for opt in opt_w.values():
                opt.param_groups[0]["lr"] = config.lr * schedule

        # Each phase starts the seeded shuffles from its own first epoch: the fixed-mask
        # phase replays the gated epoch's order first. Measured (bench/accuracy.py, 4 seeds):
        # 0.8584 against 0.8494 when the shuffles run on across the phases.
        batches = micro_batches(rows, phase_step, config)
        loss_sum, expected_nnz = 0.0, float(k)
        for i, batch_rows in enumerate(batches):
            update_now[0] = i == len(batches) - 1
            batch = encode_rows(base.tokenizer, data.train, batch_rows, config.max_length, device)
            batch["labels"] = labels[batch_rows.to(device)]
            if projected:
                params, l0 = fixed_params(kept_val), None
            else:
                params, l0 = gated_params()
            with autocast:
                task_loss = functional_call(model, params, args=(), kwargs=batch).loss
            params.clear()  # autograd keeps the θ tensors it needs (not the embeddings')
            loss = task_loss.float()
            if l0 is not None:
                expected_nnz = float(l0.detach())
                loss = loss + config.l0_lambda * l0
            (loss / len(batches)).backward()
            del params, l0, loss
            loss_sum += float(task_loss.detach())
        opt_head.step()
        opt_head.zero_grad(set_to_none=True)
        if projected:
            opt_kept.step()
            opt_kept.zero_grad(set_to_none=True)
        elif config.structured:
            with torch.no_grad():
                for a in alpha_g.values():
                    if a.grad is not None:
                        a.add_(a.grad, alpha=-config.alpha_lr)
                        a.grad = None
        step += 1
        last_report = (loss_sum / len(batches), expected_nnz)
        if progress is not None:
            progress(Progress(step, total_steps, *last_report, phase))
        if checkpoint is not None and (step % config.checkpoint_every == 0 or step == total_steps):
            save_checkpoint()

    if not projected:
        project()

    # -- the artifact: values rounded to the stored dtype, evaluated as stored
    value_dtype = VALUE_DTYPES[config.value_dtype]
    stored = {n: v.detach().to(value_dtype) for n, v in kept_val.items()}
    with torch.no_grad():
        final_params = fixed_params({n: v.float() for n, v in stored.items()})
    metrics = evaluate(
        model,
        data.validation,
        tokenizer=base.tokenizer,
        task_type=data.task_type,
        num_labels=data.num_labels,
        max_length=config.max_length,
        batch_size=config.eval_batch_size,
        params=final_params,
    )
    del final_params
    mapping = data.train.mapping
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=n_params,
        task_type=data.task_type,
        label_names=list(data.label_names) if data.task_type != "regression" else [],
        max_length=config.max_length,
        text_field=mapping.text_field,
        text_pair_field=mapping.text_pair_field,
        value_dtype=config.value_dtype,
        config={**config.to_dict(), "fix_lr": fix_lr},  # the step actually used
        metrics=dict(metrics),
    )
    diff = SparseDiff(
        indices={n: idx.cpu() for n, idx in kept_idx.items()},
        values={n: v.cpu() for n, v in stored.items()},
        shapes={n: tuple(theta0[n].shape) for n in kept_idx},
        head={n: p.detach().cpu().clone() for n, p in head.items()},
        meta=meta,
    )
    make_meta_consistent(diff)
    return TrainResult(
        diff=diff,
        metrics=metrics,
        train_seconds=time.perf_counter() - started,
        peak_memory_bytes=peak_memory_bytes(device),
    )


def check_resumable(state: dict[str, Any], config: DiffPruneConfig) -> None:
    """Refuse a checkpoint written by a different trainer version or configuration."""
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint version {state.get('version')!r} is not {CHECKPOINT_VERSION}")
    saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE_CHANGES}
    current = {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES}
    changed = sorted(k for k in current if saved.get(k) != current[k])
    if changed:
        raise ValueError(f"checkpoint was written with a different config: {', '.join(changed)}")
