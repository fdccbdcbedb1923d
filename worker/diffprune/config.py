"""`DiffPruneConfig`: every hyperparameter of one diff-pruning run, saved as sorted JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from worker.kit.config import MethodConfig, option

# The stretch interval (l, r) of the hard-concrete gate; consolidation uses the same gates.
GATE_LOWER, GATE_UPPER = -1.5, 1.5

# The phase-2 step size `fix_lr_for` scales from: the best measured at this density and
# phase-2 length on all-MiniLM-L6-v2 (see README, Accuracy; bench/accuracy.py --diff-fix-lrs).
FIX_LR_REFERENCE = 5e-3
FIX_STEPS_REFERENCE = 32
FIX_DENSITY_REFERENCE = 0.005
FIX_LR_BOUNDS = (1e-3, 2e-2)


@dataclass(kw_only=True)
class DiffPruneConfig(MethodConfig):
    """Hyperparameters of structured diff pruning (phase 1: L0-gated diff; phase 2: fixed mask).

    Defaults are chosen for all-MiniLM-L6-v2 on small tasks (a few thousand rows): one epoch
    of gated training, projection to `density`, then five epochs fine-tuning the kept values
    with a large step (most of the accuracy is won in phase 2; see bench/accuracy.py). That
    step is chosen per run from the density and the phase-2 length unless `fix_lr` is set.
    """

    resumable_changes: ClassVar[frozenset[str]] = MethodConfig.resumable_changes | {"compile_gates"}

    epochs: int = option(1, "epochs of gated diff training (phase 1)", cli=True)
    # Phase 2 needs enough steps for a sparse diff to fit its training rows
    # (see README, Accuracy; bench/accuracy.py --train-metric).
    fix_epochs: int = option(5, "epochs fine-tuning the kept values, mask fixed", cli=True)
    batch_size: int = option(32, "rows per micro-batch", cli=True)
    grad_accum: int = option(1, "micro-batches per optimizer step", cli=True)
    max_length: int = option(128, "tokens per example, truncated", cli=True)
    fix_lr: float | None = option(
        None,
        "learning rate of the kept values, mask fixed (default: "
        f"{FIX_LR_REFERENCE:g} at density {FIX_DENSITY_REFERENCE:g} and {FIX_STEPS_REFERENCE} "
        "fixed-mask steps, scaled by 1/sqrt of density and steps)",
        cli=True,
    )
    head_lr: float = option(3e-3, "learning rate of the dense task head, both phases")
    structured: bool = option(True, "per-tensor scalar gate z_g on top of the entry gates")
    gate_lower: float = option(GATE_LOWER, "lower end l of the gate's stretch interval")
    gate_upper: float = option(GATE_UPPER, "upper end r of the gate's stretch interval")
    density: float = option(
        0.005, "kept fraction of the base parameters after projection", cli=True
    )
    weight_decay: float = option(0.0, "AdamW weight decay of the head (the diff has L0)")
    compile_gates: bool = option(True, "torch.compile the fused gate kernels (eager fallback)")

    def validate(self) -> None:
        """Raise ValueError naming the first field with an impossible value."""
        super().validate()
        for name in ("batch_size", "grad_accum", "max_length"):
            if int(getattr(self, name)) < 1:
                self.fail(name, f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("epochs", "fix_epochs"):
            if int(getattr(self, name)) < 0:
                self.fail(name, f"{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs + self.fix_epochs < 1:
            self.fail("epochs", "epochs + fix_epochs must be at least 1")
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


def fix_lr_for(config: DiffPruneConfig, fix_steps: int) -> float:
    """The phase-2 step size: `config.fix_lr`, else the reference scaled to density and length.

    Fewer kept entries each carry more of the change, so the step grows as 1/sqrt(density)
    from the reference; a phase 2 shorter than the reference length must move them as far in
    fewer steps, so the step also grows as 1/sqrt(steps) below it. Longer runs keep the
    reference step (it beat the smaller steps a 1/sqrt(steps) decay gives them; see README,
    Accuracy; bench/accuracy.py --diff-fix-lrs). Clamped to FIX_LR_BOUNDS.
    """
    if config.fix_lr is not None:
        return config.fix_lr
    shortness = max(1.0, FIX_STEPS_REFERENCE / max(1, fix_steps))
    scale = math.sqrt(shortness * FIX_DENSITY_REFERENCE / config.density)
    low, high = FIX_LR_BOUNDS
    return min(high, max(low, FIX_LR_REFERENCE * scale))
