"""`DiffPruneConfig`: every hyperparameter of one diff-pruning run, saved as sorted JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from worker.kit.config import MethodConfig, option

# The stretch interval (l, r) of the hard-concrete gate; consolidation uses the same gates.
GATE_LOWER, GATE_UPPER = -1.5, 1.5

# The phase-2 step size `fix_lr_for` scales from, tuned at this density and phase-2 length
# (docs/benchmarks.md).
FIX_LR_REFERENCE = 5e-3
FIX_STEPS_REFERENCE = 32
FIX_DENSITY_REFERENCE = 0.005
FIX_LR_BOUNDS = (1e-3, 2e-2)


# Run length "auto": epochs per phase, bounded in optimizer steps so that a job on a large
# data set stays at a few thousand steps (`run_steps`; the choice: docs/benchmarks.md).
AUTO_PRUNE_EPOCHS = 1
AUTO_FIX_EPOCHS = 5
AUTO_MAX_PRUNE_STEPS = 2_000
AUTO_MAX_FIX_STEPS = 4_000
AUTO_MIN_FIX_STEPS = 1
# AdamW's epsilon on the gate logits (the reference code's adam_epsilon).
ALPHA_ADAM_EPS = 1e-8

ALPHA_OPTIMIZERS = ("sign", "adamw", "sgd")
MASK_METHODS = ("l0", "dense", "grad", "random")


@dataclass(kw_only=True)
class DiffPruneConfig(MethodConfig):
    """Hyperparameters of structured diff pruning (phase 1: L0-gated diff; phase 2: fixed mask).

    Run length: explicit `prune_steps` / `fix_steps`, else explicit `epochs` / `fix_epochs`
    (honoured exactly), else "auto" from the training set's size (`run_steps`). Projection to
    `density`, then fine-tuning the kept values with a large step (chosen per run from the
    density and the phase-2 length unless `fix_lr` is set).
    """

    resumable_changes: ClassVar[frozenset[str]] = MethodConfig.resumable_changes | {"compile_gates"}

    epochs: int | None = option(
        None,
        "epochs of gated diff training, phase 1 (default auto: from the data size)",
        cli=True,
        api={"ge": 1, "le": 100},
    )
    fix_epochs: int | None = option(
        None,
        "epochs fine-tuning the kept values, mask fixed (default auto: from the data size)",
        cli=True,
        api={"ge": 0, "le": 100},
    )
    prune_steps: int | None = option(
        None, "optimizer steps of phase 1; wins over epochs (default: from epochs or auto)"
    )
    fix_steps: int | None = option(
        None, "optimizer steps of phase 2; wins over fix_epochs (default: from fix_epochs or auto)"
    )
    batch_size: int = option(32, "rows per micro-batch", cli=True, api={"ge": 1, "le": 1024})
    grad_accum: int = option(1, "micro-batches per optimizer step", cli=True)
    max_length: int = option(
        128, "tokens per example, truncated", cli=True, api={"ge": 8, "le": 512}
    )
    fix_lr: float | None = option(
        None,
        "learning rate of the kept values, mask fixed (default: "
        f"{FIX_LR_REFERENCE:g} at density {FIX_DENSITY_REFERENCE:g} and {FIX_STEPS_REFERENCE} "
        "fixed-mask steps, scaled by 1/sqrt of density and steps)",
        cli=True,
        api={"gt": 0.0, "le": 1.0},
    )
    head_lr: float = option(3e-3, "learning rate of the dense task head, both phases")
    mask_method: str = option(
        "l0",
        "how phase 1 chooses the kept positions: l0 (hard-concrete gates + L0 penalty, then "
        "top-k of the gated diff), dense (ungated diff, then top-k of |diff|), grad (head only, "
        "top-k of accumulated |gradient|, as in SIFT), random (head only, seeded random "
        "positions, as in SHiRA); dense/grad/random are ablations",
        cli=True,
        choices=MASK_METHODS,
    )
    # sgd is the default: the gates ablation in docs/benchmarks.md.
    alpha_optimizer: str = option(
        "sgd",
        "update of the gate logits: sgd (plain; too small to close a gate at the paper's "
        "penalty, so the magnitude projection picks the mask), sign (step * sign(gradient), no "
        "state; the step is alpha_lr or less, spreading the travel from alpha_init to a closed "
        "gate over the gated phase), adamw (the reference code's, 2 fp32 copies of state)",
        cli=True,
        choices=ALPHA_OPTIMIZERS,
    )
    alpha_lr: float = option(0.1, "learning rate of the gate logits (constant; alpha_optimizer)")
    structured: bool = option(True, "per-tensor scalar gate z_g on top of the entry gates")
    gate_lower: float = option(GATE_LOWER, "lower end l of the gate's stretch interval")
    gate_upper: float = option(GATE_UPPER, "upper end r of the gate's stretch interval")
    density: float = option(
        0.005,
        "kept fraction of the base parameters after projection",
        cli=True,
        api={"gt": 0.0, "lt": 1.0},
    )
    weight_decay: float = option(0.0, "AdamW weight decay of the head (the diff has L0)")
    compile_gates: bool = option(True, "torch.compile the fused gate kernels (eager fallback)")

    def validate(self) -> None:
        """Raise ValueError naming the first field with an impossible value."""
        super().validate()
        for name in ("batch_size", "grad_accum", "max_length"):
            if int(getattr(self, name)) < 1:
                self.fail(name, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "fix_epochs", "prune_steps", "fix_steps"):
            value = getattr(self, name)
            if value is not None and int(value) < 0:
                self.fail(name, f"{name} must be >= 0 (or None for auto), got {value}")
        explicit = [
            self.prune_steps if self.prune_steps is not None else self.epochs,
            self.fix_steps if self.fix_steps is not None else self.fix_epochs,
        ]
        if None not in explicit and sum(explicit) < 1:
            self.fail("epochs", "epochs + fix_epochs (or the steps) must be at least 1")
        if not 0.0 < self.density <= 1.0:
            self.fail("density", f"density must be in (0, 1], got {self.density}")
        for name in ("head_lr", "weight_decay"):
            if getattr(self, name) < 0:
                self.fail(name, f"{name} must be >= 0, got {getattr(self, name)}")
        if self.fix_lr is not None and not self.fix_lr > 0:
            self.fail("fix_lr", f"fix_lr must be > 0 (or None to choose it), got {self.fix_lr}")
        if not self.gate_lower < 0.0 < 1.0 < self.gate_upper:
            self.fail(
                "gate_lower", "gate_lower < 0 and gate_upper > 1 are required (stretched gate)"
            )


def closed_logit(config: DiffPruneConfig) -> float:
    """The gate logit at and below which the deterministic gate is exactly 0: logit(−l/(r−l))."""
    p = -config.gate_lower / (config.gate_upper - config.gate_lower)
    return math.log(p / (1.0 - p))


def gate_closing_steps(config: DiffPruneConfig) -> int:
    """Steps a gate that feels only the penalty needs to close from `alpha_init`.

    sign (and sgd, whose run length the ablation keeps): at most alpha_lr per step. adamw: on a steady
    gradient g the step is alpha_lr·g/(g + ε) with g = λ·σ'(α − β log(−l/r)), so the count is
    ∫ (1 + ε/g(α)) dα / alpha_lr from the closed logit to alpha_init, in closed form with
    ∫ dx/σ'(x) = eˣ + 2x − e⁻ˣ. 0 when the gates cannot move (alpha_lr or λ is 0).
    """
    low, high = closed_logit(config), config.alpha_init
    if config.alpha_lr <= 0 or config.l0_lambda <= 0 or high <= low:
        return 0
    distance = high - low
    if config.alpha_optimizer == "adamw":
        shift = math.log(-config.gate_lower / config.gate_upper)

        def antiderivative(x: float) -> float:
            return math.exp(x) + 2 * x - math.exp(-x)

        inverse_slope = antiderivative(high - shift) - antiderivative(low - shift)
        distance += ALPHA_ADAM_EPS / config.l0_lambda * inverse_slope
    return math.ceil(distance / config.alpha_lr)


def min_prune_steps(config: DiffPruneConfig) -> int:
    """The shortest auto gated phase: one in which a gate only the penalty acts on can close."""
    return gate_closing_steps(config)


def sign_step_size(config: DiffPruneConfig, prune_steps: int) -> float:
    """The sign step's size: alpha_lr, or less, so that a gate only the penalty acts on ends
    the gated phase exactly at the closed logit instead of far below it.

    Every sign step moves a logit by the same amount, and the task's gradient reaches α only
    while the sampled gate is strictly between 0 and 1 (at most about 38% of draws), so on
    most steps a gate sees the penalty alone; over a long phase a fixed step would close every
    gate, needed or not. Spending exactly the distance (alpha_init − closed logit) over the
    phase closes the gates the task does not hold open and leaves the others open, whatever
    the phase's length.
    """
    distance = config.alpha_init - closed_logit(config)
    if prune_steps < 1 or distance <= 0:
        return config.alpha_lr
    return min(config.alpha_lr, distance / prune_steps)


def run_steps(rows: int, config: DiffPruneConfig) -> tuple[int, int]:
    """(phase-1 steps, phase-2 steps) of `config` on a training table of `rows` rows.

    Explicit steps win, then explicit epochs (exactly `epochs` passes); otherwise "auto":
    AUTO_PRUNE_EPOCHS passes but at least `min_prune_steps` and at most AUTO_MAX_PRUNE_STEPS
    (or the minimum, if larger), and AUTO_FIX_EPOCHS passes within
    [AUTO_MIN_FIX_STEPS, AUTO_MAX_FIX_STEPS].
    """
    per_epoch = steps_per_epoch(rows, config)
    if config.prune_steps is not None:
        prune = config.prune_steps
    elif config.epochs is not None:
        prune = per_epoch * config.epochs
    else:
        least = 0 if config.alpha_optimizer == "sgd" else min_prune_steps(config)
        prune = max(least, min(per_epoch * AUTO_PRUNE_EPOCHS, AUTO_MAX_PRUNE_STEPS))
    if config.fix_steps is not None:
        fix = config.fix_steps
    elif config.fix_epochs is not None:
        fix = per_epoch * config.fix_epochs
    else:
        fix = min(AUTO_MAX_FIX_STEPS, max(AUTO_MIN_FIX_STEPS, per_epoch * AUTO_FIX_EPOCHS))
    if prune + fix < 1:
        raise ValueError("the run has no step: set epochs or fix_epochs to at least 1")
    return prune, fix


def steps_per_epoch(rows: int, config: DiffPruneConfig) -> int:
    """Optimizer steps in one epoch (the last step of an epoch may have fewer micro-batches)."""
    return math.ceil(math.ceil(rows / config.batch_size) / config.grad_accum)


def fix_lr_for(config: DiffPruneConfig, fix_steps: int) -> float:
    """The phase-2 step size: `config.fix_lr`, else the reference scaled to density and length.

    Fewer kept entries each carry more of the change, so the step grows as 1/sqrt(density)
    from the reference; a phase 2 shorter than the reference length must move them as far in
    fewer steps, so the step also grows as 1/sqrt(steps) below it. Longer runs keep the
    reference step (docs/benchmarks.md). Clamped to FIX_LR_BOUNDS.
    """
    if config.fix_lr is not None:
        return config.fix_lr
    shortness = max(1.0, FIX_STEPS_REFERENCE / max(1, fix_steps))
    scale = math.sqrt(shortness * FIX_DENSITY_REFERENCE / config.density)
    low, high = FIX_LR_BOUNDS
    return min(high, max(low, FIX_LR_REFERENCE * scale))


# A job's params key for what "auto" chose, written at publish beside what was asked.
RESOLVED_PARAM = "resolved"


def config_from_job_params(params: dict[str, Any] | None, **knobs: Any) -> DiffPruneConfig:
    """The config a training job's params ask for (plus worker `knobs`), unknown keys refused."""
    asked = {k: v for k, v in (params or {}).items() if k != RESOLVED_PARAM}
    return DiffPruneConfig.from_dict({**asked, **knobs})
