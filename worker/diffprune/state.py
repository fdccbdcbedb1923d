"""The state of a diff-pruning run: gated diff or kept values, head, optimizers, RNGs.

`DiffPruneState` holds what a run changes and round-trips through `state_dict()` /
`load_state_dict()` for checkpoints; `InBackwardSteps` updates w and α inside backward.
What phase 1 holds depends on `mask_method`: l0 (w, α, α_g), dense (w), grad (a zero probe w
and the accumulated |gradient|), random (nothing but the head).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from diffs.basemodel import head_parameters
from worker.diffprune.config import ALPHA_ADAM_EPS, DiffPruneConfig
from worker.diffprune.gates import (
    GateNoise,
    deterministic_gate,
    gated_delta,
    logistic_from_bits,
    prob_nonzero,
    stochastic_gate,
)
from worker.diffprune.projection import global_topk, project_topk
from worker.kit.optim import make_adamw
from worker.kit.progress import Progress


class DiffPruneState:
    """Everything a diff-pruning run changes, with `state_dict()` / `load_state_dict()`.

    Its step, phase 1's tensors (the gated diff w, α, α_g; or the dense diff; or the gradient
    score) or, after projection, the kept values; the head, their optimizers and the random
    generators; what the projection saw (`gate_open_fraction`, `expected_nnz_at_projection`).
    """

    def __init__(
        self, model: nn.Module, config: DiffPruneConfig, *, fix_lr: float, device: torch.device
    ) -> None:
        self.config, self.fix_lr, self.device = config, fix_lr, device
        self.method = config.mask_method
        self.prefix = model.base_model_prefix + "."
        self.theta0 = {n: p for n, p in model.base_model.named_parameters()}
        self.names = sorted(self.theta0)
        self.head = head_parameters(model)
        self.n_params = sum(p.numel() for p in self.theta0.values())
        self.gate_rng = torch.Generator(device=device).manual_seed(config.seed + 1)
        self.w: dict[str, Tensor] = {}
        self.alpha: dict[str, Tensor] = {}
        self.alpha_g: dict[str, Tensor] = {}
        self.score: dict[str, Tensor] = {}
        self.opt_w: dict[str, torch.optim.Optimizer] = {}
        self.opt_alpha: dict[str, torch.optim.Optimizer] = {}
        self.opt_alpha_g: torch.optim.Optimizer | None = None
        if self.method in ("l0", "dense", "grad"):
            self.w = {
                n: torch.zeros_like(self.theta0[n], dtype=torch.float32, requires_grad=True)
                for n in self.names
            }
        if self.method in ("l0", "dense"):
            self.opt_w = {n: make_adamw([self.w[n]], lr=config.lr) for n in self.names}
        if self.method == "grad":
            self.score = {n: torch.zeros_like(self.w[n]) for n in self.names}
        if self.gated:
            self.alpha = {
                n: torch.full_like(
                    self.theta0[n], config.alpha_init, dtype=torch.float32, requires_grad=True
                )
                for n in self.names
            }
            self.alpha_g = {
                n: torch.full((), config.alpha_init, device=device, requires_grad=config.structured)
                for n in self.names
            }
            if config.alpha_optimizer == "adamw":
                self.opt_alpha = {n: self._alpha_adamw([self.alpha[n]]) for n in self.names}
                if config.structured:
                    self.opt_alpha_g = self._alpha_adamw(list(self.alpha_g.values()))
        self.opt_head = make_adamw(
            list(self.head.values()), lr=config.head_lr, weight_decay=config.weight_decay
        )
        self.kept_idx: dict[str, Tensor] = {}
        self.kept_val: dict[str, Tensor] = {}
        self.opt_kept: torch.optim.Optimizer | None = None
        self.projected = False
        self.step = 0
        self.loss = 0.0  # of the last finished step
        self.expected_nnz = float(self.phase1_nnz)  # of the last finished step
        self.gate_open_fraction: float | None = None
        self.expected_nnz_at_projection: float | None = None
        self.sign_step = config.alpha_lr  # set by the trainer from the gated phase's length

    def _alpha_adamw(self, params: list[Tensor]) -> torch.optim.Optimizer:
        """The reference code's optimizer of the gate logits: AdamW, no weight decay."""
        return torch.optim.AdamW(
            params, lr=self.config.alpha_lr, weight_decay=0.0, eps=ALPHA_ADAM_EPS
        )

    @property
    def gated(self) -> bool:
        """Whether phase 1 learns hard-concrete gates (mask_method l0)."""
        return self.method == "l0"

    @property
    def phase1_nnz(self) -> int:
        """Nonzeros phase 1 reports without gates: N for a dense diff, 0 when only the head trains."""
        return self.n_params if self.method == "dense" else 0

    @property
    def phase(self) -> str:
        """'prune' before projection, 'fix' after."""
        return "fix" if self.projected else "prune"

    def progress(self, total_steps: int) -> Progress:
        """Where the run stands after its last finished step."""
        return Progress(self.step, total_steps, self.loss, self.expected_nnz, self.phase)

    def phase1_params(self, noise: GateNoise | None) -> tuple[dict[str, Tensor], Tensor | None]:
        """The base tensors phase 1 substitutes, and the expected L0 of the gates (l0 only)."""
        if self.gated:
            return self.gated_params(noise)
        # dense: θ₀ + w; grad: θ₀ + 0 with w a probe of ∂L/∂θ; random: θ₀ itself (head only)
        return {self.prefix + n: self.theta0[n] + w for n, w in self.w.items()}, None

    def gated_params(self, noise: GateNoise) -> tuple[dict[str, Tensor], Tensor]:
        """θ = θ₀ + z ⊙ z_g ⊙ w for every base tensor, and the expected L0 of the gates."""
        lower, upper = self.config.gate_lower, self.config.gate_upper
        params, l0 = {}, torch.zeros((), device=self.device)
        for n in self.names:
            if self.config.structured:
                bits = noise.draw(1).bits()
                z_g = stochastic_gate(self.alpha_g[n], logistic_from_bits(bits)[0], lower, upper)
                p_g = prob_nonzero(self.alpha_g[n], lower, upper)
            else:
                z_g = p_g = torch.ones((), device=self.device)
            draw = noise.draw(self.theta0[n].numel())
            theta, expected = gated_delta(
                self.theta0[n], self.w[n], self.alpha[n], z_g, draw, lower, upper
            )
            params[self.prefix + n] = theta
            l0 = l0 + p_g * expected
        return params, l0

    def fixed_params(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        """θ₀ with the kept values added at the kept positions (out of place)."""
        return {
            self.prefix + n: self.theta0[n]
            .reshape(-1)
            .index_add(0, self.kept_idx[n], v)
            .view_as(self.theta0[n])
            for n, v in values.items()
        }

    @torch.no_grad()
    def expected_l0(self) -> float:
        """Σ_g P(z_g ≠ 0)·Σ P(z ≠ 0) of the current gate logits (no noise)."""
        lower, upper = self.config.gate_lower, self.config.gate_upper
        total = 0.0
        for n in self.names:
            p = prob_nonzero(self.alpha[n], lower, upper).sum()
            if self.config.structured:
                p = p * prob_nonzero(self.alpha_g[n], lower, upper)
            total += float(p)
        return total

    def project(self, k: int) -> None:
        """Phase 1's diff or scores → exactly k kept positions; phase 2 starts from their values.

        l0: the k largest |δ| of the deterministic-gate diff; positions whose gate is closed
        rank below every open one, by |w| among themselves, and start at 0. dense: top-k |w|.
        grad: top-k accumulated |gradient|, values 0. random: k seeded random positions, 0.
        """
        self.opt_w, self.opt_alpha, self.opt_alpha_g = {}, {}, None  # free optimizer state
        with torch.no_grad():
            if self.gated:
                kept_idx, values = self._project_gated(k)
            elif self.method == "dense":
                self.expected_nnz_at_projection = float(
                    sum(int(torch.count_nonzero(w)) for w in self.w.values())
                )
                kept_idx, values = project_topk(self.w, k)
            else:
                if self.method == "grad":
                    scores = self.score
                else:
                    rng = torch.Generator(device=self.device).manual_seed(self.config.seed + 2)
                    scores = {
                        n: torch.rand(self.theta0[n].shape, generator=rng, device=self.device)
                        for n in self.names
                    }
                kept_idx = global_topk(scores, k)
                values = {
                    n: torch.zeros(idx.numel(), device=self.device) for n, idx in kept_idx.items()
                }
                self.expected_nnz_at_projection = 0.0
                del scores
        self.w, self.alpha, self.alpha_g, self.score = {}, {}, {}, {}
        self.kept_idx = {n: idx for n, idx in kept_idx.items() if idx.numel()}
        self.kept_val = {n: values[n].clone().requires_grad_(True) for n in self.kept_idx}
        self.opt_kept = make_adamw(list(self.kept_val.values()), lr=self.fix_lr)
        self.projected = True

    def _project_gated(self, k: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Top-k of the deterministic-gate δ; records the open fraction and E[L0] it saw."""
        lower, upper = self.config.gate_lower, self.config.gate_upper
        self.expected_nnz_at_projection = self.expected_l0()
        deltas, scores = {}, {}
        for n in self.names:
            gate = deterministic_gate(self.alpha[n], lower, upper)
            if self.config.structured:
                gate.mul_(deterministic_gate(self.alpha_g[n], lower, upper))
            w = self.w[n].detach()
            open_ = gate > 0
            deltas[n] = gate.mul_(w)
            # closed gates score in [-1, 0): below every open entry, larger |w| first
            scores[n] = torch.where(open_, deltas[n].abs(), -1.0 / (1.0 + w.abs()))
            del open_, w
            self.w[n] = self.alpha[n] = None  # type: ignore[assignment]
        kept_idx = global_topk(scores, k)
        kept_open = sum(int((scores[n].reshape(-1)[idx] >= 0).sum()) for n, idx in kept_idx.items())
        self.gate_open_fraction = kept_open / k if k else 1.0
        del scores
        values = {n: deltas[n].reshape(-1)[idx].float() for n, idx in kept_idx.items()}
        return kept_idx, values

    def state_dict(self) -> dict[str, Any]:
        """Every tensor and counter needed to resume, including the torch RNG states."""
        state: dict[str, Any] = {
            "step": self.step,
            "projected": self.projected,
            "head": {n: p.detach() for n, p in self.head.items()},
            "opt_head": self.opt_head.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "gate_rng": self.gate_rng.get_state(),
            "loss": self.loss,
            "expected_nnz": self.expected_nnz,
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.projected:
            state["kept_idx"] = self.kept_idx
            state["kept_val"] = {n: v.detach() for n, v in self.kept_val.items()}
            state["opt_kept"] = self.opt_kept.state_dict()
            state["projection"] = {
                "gate_open_fraction": self.gate_open_fraction,
                "expected_nnz_at_projection": self.expected_nnz_at_projection,
            }
        else:
            state["w"] = {n: t.detach() for n, t in self.w.items()}
            state["alpha"] = {n: t.detach() for n, t in self.alpha.items()}
            state["alpha_g"] = {n: t.detach() for n, t in self.alpha_g.items()}
            state["score"] = dict(self.score)
            state["opt_w"] = {n: opt.state_dict() for n, opt in self.opt_w.items()}
            state["opt_alpha"] = {n: opt.state_dict() for n, opt in self.opt_alpha.items()}
            if self.opt_alpha_g is not None:
                state["opt_alpha_g"] = self.opt_alpha_g.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` (tensors on this run's device), in place where they exist."""
        self.step = int(state["step"])
        with torch.no_grad():
            for n, p in self.head.items():
                p.copy_(state["head"][n])
        self.opt_head.load_state_dict(state["opt_head"])
        torch.set_rng_state(state["rng_cpu"].cpu())
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        self.gate_rng.set_state(state["gate_rng"].cpu())
        self.loss = float(state.get("loss", 0.0))
        self.expected_nnz = float(state.get("expected_nnz", self.phase1_nnz))
        if state["projected"]:
            self.projected = True
            self.w, self.alpha, self.alpha_g, self.score = {}, {}, {}, {}
            self.opt_w, self.opt_alpha, self.opt_alpha_g = {}, {}, None
            self.kept_idx = {n: t.to(self.device) for n, t in state["kept_idx"].items()}
            self.kept_val = {
                n: t.to(self.device).requires_grad_(True) for n, t in state["kept_val"].items()
            }
            self.opt_kept = make_adamw(list(self.kept_val.values()), lr=self.fix_lr)
            self.opt_kept.load_state_dict(state["opt_kept"])
            stats = state.get("projection", {})
            self.gate_open_fraction = stats.get("gate_open_fraction")
            self.expected_nnz_at_projection = stats.get("expected_nnz_at_projection")
        else:
            with torch.no_grad():
                for group in ("w", "alpha", "alpha_g", "score"):
                    for n, t in getattr(self, group).items():
                        t.copy_(state[group][n])
            for n, opt in self.opt_w.items():
                opt.load_state_dict(state["opt_w"][n])
            for n, opt in self.opt_alpha.items():
                opt.load_state_dict(state["opt_alpha"][n])
            if self.opt_alpha_g is not None:
                self.opt_alpha_g.load_state_dict(state["opt_alpha_g"])


def step_logits(state: DiffPruneState, param: Tensor, optimizer: torch.optim.Optimizer | None):
    """One update of gate logits from their gradient: sgd, sign, or the given AdamW."""
    if optimizer is not None:
        optimizer.step()
    else:
        with torch.no_grad():
            if state.config.alpha_optimizer == "sign":
                param.sub_(param.grad.sign(), alpha=state.sign_step)
            else:
                param.sub_(param.grad, alpha=state.config.alpha_lr)
    param.grad = None


class InBackwardSteps:
    """Steps w (AdamW) and α (`alpha_optimizer`) inside backward, as each gradient completes.

    Only on the micro-batch that ends an optimizer step (`armed`); earlier micro-batches only
    accumulate. The gradient score (mask_method grad) accumulates on every micro-batch.
    Registered only while the run is in phase 1.
    """

    def __init__(self, state: DiffPruneState) -> None:
        self.state = state
        self.armed = False
        self.handles = []
        if state.projected:
            return
        for n in state.names:
            if n in state.score:
                hook = functools.partial(self._add_score, n)
            elif n in state.opt_w:
                hook = functools.partial(self._step_w, n)
            else:
                continue
            self.handles.append(state.w[n].register_post_accumulate_grad_hook(hook))
        self.handles += [
            state.alpha[n].register_post_accumulate_grad_hook(
                functools.partial(self._step_alpha, n)
            )
            for n in state.alpha
        ]

    def _step_w(self, name: str, param: Tensor) -> None:
        if self.armed:
            self.state.opt_w[name].step()
            param.grad = None

    def _add_score(self, name: str, param: Tensor) -> None:
        self.state.score[name].add_(param.grad.abs())
        param.grad = None

    def _step_alpha(self, name: str, param: Tensor) -> None:
        if self.armed:
            step_logits(self.state, param, self.state.opt_alpha.get(name))

    def remove(self) -> None:
        """Unregister the hooks (before projection)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
