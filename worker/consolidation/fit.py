"""The consolidation fit: a multitask loop over shared + residual gated diffs, then artifacts.

Setup (`start_fit`): the shared set is dense and starts at zero; each task's residual is sparse,
on its current diff's positions plus gradient-picked candidates (`candidates`), built one task
at a time. Each step draws one task (temperature sampling), trains on its next seeded batch
with weights base + shared + that task's residual, and steps AdamW on values and heads (warmup
+ linear decay per phase) and plain SGD on gate logits (phase 1); only the shared set and the
drawn residual get gradients, so a step costs O(N + k) whatever the number of tasks. At the end
of phase 1 the sets are projected to the budget; phase 2 fine-tunes the kept values with the
masks fixed. `FitState` round-trips through checkpoints, residual supports included.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffs.basemodel import LoadedBase
from worker.consolidation import candidates, lowrank
from worker.consolidation.artifacts import build_result
from worker.consolidation.budget import project_to_budget
from worker.consolidation.config import (
    MERGE_STRATEGIES,
    ConsolidationConfig,
    ConsolidationError,
    ConsolidationResult,
    ConsolidationTask,
    validate_request,
)
from worker.consolidation.state import (
    SHARED,
    GatedDiffSet,
    current_entries,
    new_diff_set,
    sparse_diff_set,
)
from worker.kit.batching import encode_rows, epoch_batches, label_tensor
from worker.kit.checkpoint import CheckpointIO, load_checkpoint
from worker.kit.loop import LoopControl
from worker.kit.model import autocast_for, prepare_model, resolve_device
from worker.kit.optim import make_adamw
from worker.kit.progress import Progress
from worker.kit.schedule import linear_warmup_decay, set_learning_rates


def task_sampling_probabilities(sizes: Sequence[int], temperature: float) -> list[float]:
    """p_i proportional to n_i^(1/T)."""
    if temperature <= 0:
        raise ConsolidationError("temperature must be positive", field="temperature")
    weights = [max(n, 1) ** (1.0 / temperature) for n in sizes]
    total = sum(weights)
    return [w / total for w in weights]


@dataclass
class TaskModels:
    """One classification model per task sharing a single frozen encoder."""

    models: list[torch.nn.Module]
    prefix: str
    base_tensors: dict[str, Tensor]
    heads: list[dict[str, Tensor]]


def build_task_models(
    tasks: Sequence[ConsolidationTask], base: LoadedBase, device: torch.device
) -> TaskModels:
    """One model per task sharing one frozen encoder, heads copied from the current versions.

    On CPU the encoder is the cached base's own storage; the heads are trainable copies.
    """
    models: list[torch.nn.Module] = []
    heads: list[dict[str, Tensor]] = []
    shared_encoder = None
    prefix = ""
    for task in tasks:
        model = prepare_model(base, task.data, device, share_base=shared_encoder is None)
        prefix = model.base_model_prefix
        if shared_encoder is None:
            shared_encoder = model.base_model
        else:
            setattr(model, prefix, shared_encoder)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        head: dict[str, Tensor] = {}
        for name, parameter in model.named_parameters():
            if name.startswith(prefix + "."):
                continue
            start = task.current.head.get(name)
            if start is None or tuple(start.shape) != tuple(parameter.shape):
                raise ConsolidationError(
                    f"task {task.name!r}: current version has no head tensor {name!r} "
                    f"of shape {tuple(parameter.shape)}",
                    field="tasks",
                )
            head[name] = start.detach().float().to(device).clone().requires_grad_(True)
        models.append(model)
        heads.append(head)
    assert shared_encoder is not None
    base_tensors = {name: p.detach() for name, p in shared_encoder.named_parameters()}
    return TaskModels(models=models, prefix=prefix, base_tensors=base_tensors, heads=heads)


def task_loss(
    models: TaskModels,
    index: int,
    shared: GatedDiffSet,
    residual: GatedDiffSet,
    mode: str,
    batch: dict,
) -> Tensor:
    """Task `index`'s loss with encoder weights base + shared + residual."""
    params = {
        f"{models.prefix}.{name}": residual.added_to(name, shared.added_to(name, theta, mode), mode)
        for name, theta in models.base_tensors.items()
    }
    params.update(models.heads[index])
    model = models.models[index]
    model.train()
    outputs = torch.func.functional_call(model, params, args=(), kwargs=batch, strict=False)
    return outputs.loss


def phase_steps(sizes: Sequence[int], epochs: float, batch_size: int) -> int:
    """Steps of a phase: `epochs` passes over the summed training sets."""
    return max(1, math.ceil(epochs * sum(sizes) / batch_size)) if epochs > 0 else 0


def rows_for_draw(n: int, draw: int, batch_size: int, seed: int, task_index: int) -> Tensor:
    """Rows of a task's `draw`-th batch: the batches of a seeded per-pass permutation, in turn."""
    pass_index, slot = divmod(draw, max(1, math.ceil(n / batch_size)))
    return epoch_batches(n, batch_size, seed * 1_000_003 + task_index * 7_919 + pass_index)[slot]


@dataclass
class PhasePlan:
    """Steps of both phases and the per-step task choices (drawn once, seeded)."""

    fit_steps: int
    fix_steps: int
    choices: Tensor

    @property
    def total_steps(self) -> int:
        """Steps of both phases."""
        return self.fit_steps + self.fix_steps


class FitState:
    """What a fit changes: step, phase, batches drawn per task, diff sets, heads, optimizers."""

    def __init__(
        self,
        sets: dict[str, GatedDiffSet],
        heads: list[dict[str, Tensor]],
        config: ConsolidationConfig,
    ) -> None:
        self.sets, self.heads, self.config = sets, heads, config
        self.step = 0
        self.phase = "prune"
        self.draws = [0] * len(heads)
        self.loss = 0.0  # task loss of the last finished step
        self.optimizers = make_optimizers(sets, heads, config, self.phase)
        self._entries: dict[str, float] = {}  # per role: expected (phase 1) or stored entries

    def learning_rates(self) -> list[float]:
        """Base learning rates of the main optimizer's groups (values, heads) in this phase."""
        value_lr = self.config.lr if self.phase == "prune" else self.config.fix_lr
        return [value_lr, self.config.head_lr]

    def project(self) -> None:
        """Project every set to the budget and start phase 2 with fresh optimizers."""
        project_to_budget(self.sets, self.config.budget, balance_roles=self.config.balance_roles)
        self.phase = "fix"
        self._entries.clear()
        self.optimizers = make_optimizers(self.sets, self.heads, self.config, self.phase)

    def trained(self, *roles: str) -> None:
        """Note that a step changed these roles' gates (phase 1: their counts are recomputed)."""
        if self.phase == "prune":
            for role in roles:
                self._entries.pop(role, None)

    def expected_nnz(self) -> float:
        """Expected stored entries under the gates (phase 1) or the stored entries (phase 2).

        Counts are cached per role and recomputed only for the roles a step trained.
        """
        with torch.no_grad():
            for role, diff_set in self.sets.items():
                if role not in self._entries:
                    self._entries[role] = (
                        float(diff_set.expected_l0())
                        if self.phase == "prune"
                        else float(diff_set.stored_entries())
                    )
        return float(sum(self._entries.values()))

    def progress(self, total_steps: int) -> Progress:
        """Where the fit is: step, loss, expected (or stored) entries, phase."""
        return Progress(self.step, total_steps, self.loss, self.expected_nnz(), self.phase)

    def state_dict(self) -> dict[str, Any]:
        """Every tensor and counter needed to resume, including the torch RNG state."""
        return {
            "step": self.step,
            "phase": self.phase,
            "draws": list(self.draws),
            "sets": {role: s.state_dict() for role, s in self.sets.items()},
            "heads": [{n: t.detach().clone() for n, t in head.items()} for head in self.heads],
            "optimizers": [o.state_dict() for o in self.optimizers],
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`: sets (supports included) replaced, heads in place, optimizers rebuilt."""
        for role, diff_set in self.sets.items():
            diff_set.load_state_dict(state["sets"][role])
        for head, saved in zip(self.heads, state["heads"], strict=True):
            with torch.no_grad():
                for name, tensor in head.items():
                    tensor.copy_(saved[name])
        self.step, self.phase = int(state["step"]), str(state["phase"])
        self.draws = [int(d) for d in state["draws"]]
        self._entries.clear()
        torch.set_rng_state(state["torch_rng"].cpu())
        self.optimizers = make_optimizers(self.sets, self.heads, self.config, self.phase)
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)


def make_optimizers(
    sets: dict[str, GatedDiffSet],
    heads: list[dict[str, Tensor]],
    config: ConsolidationConfig,
    phase: str,
) -> list[torch.optim.Optimizer]:
    """AdamW on values + heads (scheduled per step); plain SGD on gate logits in phase 1."""
    values = [t for s in sets.values() for t in s.value_tensors()]
    head_tensors = [t for head in heads for t in head.values()]
    value_lr = config.lr if phase == "prune" else config.fix_lr
    # Unfused: the fused kernel's other rounding would pick another support at the projection.
    main = make_adamw(
        [{"params": values, "lr": value_lr}, {"params": head_tensors, "lr": config.head_lr}],
        lr=value_lr,
        fused=False,
    )
    optimizers: list[torch.optim.Optimizer] = [main]
    if phase == "prune":
        logits = [t for s in sets.values() for t in s.logit_tensors()]
        optimizers.append(torch.optim.SGD(logits, lr=config.alpha_lr))
    return optimizers


def candidate_positions(
    task: ConsolidationTask,
    index: int,
    models: TaskModels,
    config: ConsolidationConfig,
    size: int,
    *,
    base: LoadedBase,
    device: torch.device,
) -> dict[str, Tensor]:
    """Candidates of one task's residual: largest accumulated |gradient| at its current version.

    The gradient is of the task's loss (dropout off) w.r.t. its element-wise encoder tensors,
    over its first `candidate_batches` training batches; at most `candidate_ratio` times its
    current element-wise entries.
    """
    current = task.current
    shapes = {name: tuple(t.shape) for name, t in models.base_tensors.items()}
    entry_names = [
        name
        for name in models.base_tensors
        if not (config.strategy == "rank" and lowrank.is_factored(name, shapes[name]))
    ]
    taken = {name: current_entries(current, name)[0] for name in entry_names}
    count = candidates.candidate_count(
        sum(int(t.numel()) for t in taken.values()), config.candidate_ratio
    )
    if count == 0 or config.candidate_batches == 0:
        return {}

    def at_current(name: str) -> Tensor:
        theta = models.base_tensors[name]
        if name not in current.tensor_names:
            return theta
        return theta + current.dense(name).to(device=theta.device, dtype=theta.dtype)

    fixed = {
        f"{models.prefix}.{name}": at_current(name)
        for name in models.base_tensors
        if name not in taken
    }
    fixed.update({name: t.detach() for name, t in models.heads[index].items()})
    model = models.models[index]
    labels = label_tensor(task.data.train, task.data.task_type)

    def loss_of(weights: dict[str, Tensor], rows: Tensor) -> Tensor:
        """The task's loss on some rows with these element-wise weights (dropout off)."""
        batch = encode_rows(base, task.data.train, rows, config.max_length, device)
        batch["labels"] = labels[rows].to(device)
        params = {f"{models.prefix}.{name}": w for name, w in weights.items()}
        model.eval()
        with autocast_for(device):
            outputs = torch.func.functional_call(
                model, {**fixed, **params}, args=(), kwargs=batch, strict=False
            )
        return outputs.loss.float()

    draws = range(min(config.candidate_batches, max(1, math.ceil(size / config.batch_size))))
    scores = candidates.accumulated_gradient_magnitudes(
        {name: at_current(name) for name in entry_names},
        loss_of,
        (rows_for_draw(size, d, config.batch_size, config.seed, index) for d in draws),
    )
    return candidates.pick_candidates(scores, taken, count)


def new_diff_sets(
    tasks: Sequence[ConsolidationTask],
    models: TaskModels,
    config: ConsolidationConfig,
    generator: torch.Generator,
    sizes: Sequence[int],
    *,
    base: LoadedBase,
    device: torch.device,
) -> dict[str, GatedDiffSet]:
    """The shared set (dense, zero) and one sparse residual per task (its current diff plus
    candidates), in that order; residuals are built one task at a time."""
    sets = {
        SHARED: new_diff_set(
            models.base_tensors,
            strategy=config.strategy,
            rank=config.rank,
            alpha_init=config.alpha_init,
            init=None,
            generator=generator,
        )
    }
    for index, task in enumerate(tasks):
        picked = candidate_positions(
            task, index, models, config, sizes[index], base=base, device=device
        )
        sets[task.name] = sparse_diff_set(
            models.base_tensors,
            strategy=config.strategy,
            rank=config.rank,
            alpha_init=config.alpha_init,
            current=task.current,
            candidates=picked,
            generator=generator,
        )
    return sets


@dataclass
class Fit:
    """A consolidation fit ready to step: its tasks, models, labels, plan and state."""

    tasks: Sequence[ConsolidationTask]
    models: TaskModels
    labels: list[Tensor]
    sizes: list[int]
    plan: PhasePlan
    state: FitState
    base: LoadedBase
    device: torch.device

    def advance(self) -> float:
        """One step (projecting first when phase 1 is over); the step's task loss."""
        state = self.state
        if state.phase == "prune" and state.step >= self.plan.fit_steps:
            state.project()
        loss = fit_step(
            state,
            self.plan,
            self.tasks,
            self.models,
            self.labels,
            self.sizes,
            base=self.base,
            device=self.device,
        )
        state.step += 1
        state.loss = loss
        return loss


def start_fit(
    tasks: Sequence[ConsolidationTask],
    config: ConsolidationConfig,
    *,
    base: LoadedBase,
    checkpoint: CheckpointIO | None = None,
) -> Fit:
    """Models, plan and state of a fit: from `checkpoint` when it holds one, else new sets."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    device = resolve_device(config.device)
    models = build_task_models(tasks, base, device)
    sizes = [len(t.data.train.texts) for t in tasks]
    if config.max_train_examples:
        sizes = [min(n, config.max_train_examples) for n in sizes]
    labels = [label_tensor(t.data.train, t.data.task_type) for t in tasks]
    probabilities = torch.tensor(task_sampling_probabilities(sizes, config.temperature))
    fit_steps = phase_steps(sizes, config.epochs, config.batch_size)
    fix_steps = phase_steps(sizes, config.fix_epochs, config.batch_size)
    # Drawn before the sets, so a resumed run (sets from the checkpoint) draws the same plan.
    choices = torch.multinomial(
        probabilities, max(1, fit_steps + fix_steps), replacement=True, generator=generator
    )
    plan = PhasePlan(fit_steps, fix_steps, choices)
    saved = load_checkpoint(checkpoint, config, map_location=device)
    if saved is None:
        sets = new_diff_sets(tasks, models, config, generator, sizes, base=base, device=device)
    else:
        sets = {role: GatedDiffSet.from_state_dict(s) for role, s in saved["sets"].items()}
    state = FitState(sets, models.heads, config)
    if saved is not None:
        state.load_state_dict(saved)
        del saved
    return Fit(tasks, models, labels, sizes, plan, state, base, device)


def consolidate(
    tasks: Sequence[ConsolidationTask],
    config: ConsolidationConfig,
    *,
    base: LoadedBase,
    run_id: int | None = None,
    progress: Callable[[Progress], None] | None = None,
    checkpoint: CheckpointIO | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> ConsolidationResult:
    """Re-fit `tasks` as shared + residual gated diffs under `config.budget` and build their artifacts.

    `checkpoint` keeps the fit state (worker.kit.checkpoint); `should_stop` turning true raises
    `TrainingCancelled`. Evaluation is left to `artifacts.evaluate_diff`.
    """
    validate_request(tasks, config, base=base)
    if config.strategy in MERGE_STRATEGIES:  # training-free: no fit, no checkpoint
        from worker.consolidation.merge import merge_consolidate

        return merge_consolidate(tasks, config, base=base, run_id=run_id)
    started = time.monotonic()
    fit = start_fit(tasks, config, base=base, checkpoint=checkpoint)
    state, plan = fit.state, fit.plan
    control = LoopControl(config, plan.total_steps, progress, checkpoint, should_stop)
    while state.step < plan.total_steps:
        control.check_stop(f"consolidation run {run_id} cancelled at step {state.step}")
        fit.advance()
        control.step_done(state)
    if state.phase == "prune":  # no phase 2 configured
        project_to_budget(state.sets, config.budget, balance_roles=config.balance_roles)
    return build_result(
        tasks,
        state.sets,
        fit.models.heads,
        fit.models.base_tensors,
        config,
        run_id=run_id,
        started=started,
        steps=plan.total_steps,
    )


def fit_step(
    state: FitState,
    plan: PhasePlan,
    tasks: Sequence[ConsolidationTask],
    models: TaskModels,
    labels: list[Tensor],
    sizes: list[int],
    *,
    base: LoadedBase,
    device: torch.device,
) -> float:
    """One optimizer step on the next batch of the task drawn for this step; its task loss."""
    config = state.config
    index = int(plan.choices[state.step])
    rows = rows_for_draw(sizes[index], state.draws[index], config.batch_size, config.seed, index)
    state.draws[index] += 1
    batch = encode_rows(base, tasks[index].data.train, rows, config.max_length, device)
    batch["labels"] = labels[index][rows].to(device)
    shared, residual = state.sets[SHARED], state.sets[tasks[index].name]
    mode = "sample" if state.phase == "prune" else "masked"
    with autocast_for(device):
        loss = task_loss(models, index, shared, residual, mode, batch).float()
    total = loss
    if state.phase == "prune":
        total = loss + config.l0_lambda * (shared.expected_l0() + residual.expected_l0())
    phase_step = state.step if state.phase == "prune" else state.step - plan.fit_steps
    phase_total = plan.fit_steps if state.phase == "prune" else plan.fix_steps
    factor = linear_warmup_decay(phase_step, max(1, phase_total), config.warmup)
    set_learning_rates(state.optimizers[0], state.learning_rates(), factor)
    total.backward()
    for optimizer in state.optimizers:
        optimizer.step()
    for optimizer in state.optimizers:  # freed now, not held through the next forward
        optimizer.zero_grad(set_to_none=True)
    state.trained(SHARED, tasks[index].name)
    return float(loss.detach())
