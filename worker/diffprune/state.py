"""The state of a diff-pruning run: gated diff or kept values, head, optimizers, RNGs.

`DiffPruneState` holds what a run changes and round-trips through `state_dict()` /
`load_state_dict()` for checkpoints; `InBackwardSteps` updates w and α inside backward.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor, nn

from worker.diffprune.config import DiffPruneConfig
from worker.diffprune.gates import (
    GateNoise,
    deterministic_gate,
    gated_delta,
    logistic_from_bits,
    prob_nonzero,
    stochastic_gate,
)
from worker.diffprune.projection import project_topk
from worker.kit.model import head_parameters
from worker.kit.optim import make_adamw
from worker.kit.progress import Progress


class DiffPruneState:
    """Everything a diff-pruning run changes, with `state_dict()` / `load_state_dict()`.

    Its step, the gated diff (w, α, α_g) or, after projection, the kept values; the head,
    their optimizers and the random generators.
    """

    def __init__(
        self, model: nn.Module, config: DiffPruneConfig, *, fix_lr: float, device: torch.device
    ) -> None:
        self.config, self.fix_lr, self.device = config, fix_lr, device
        self.prefix = model.base_model_prefix + "."
        self.theta0 = {n: p for n, p in model.base_model.named_parameters()}
        self.names = sorted(self.theta0)
        self.head = head_parameters(model)
        self.n_params = sum(p.numel() for p in self.theta0.values())
        self.gate_rng = torch.Generator(device=device).manual_seed(config.seed + 1)
        self.w = {
            n: torch.zeros_like(self.theta0[n], dtype=torch.float32, requires_grad=True)
            for n in self.names
        }
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
        self.opt_w = {n: make_adamw([self.w[n]], lr=config.lr) for n in self.names}
        self.opt_head = make_adamw(
            list(self.head.values()), lr=config.head_lr, weight_decay=config.weight_decay
        )
        self.kept_idx: dict[str, Tensor] = {}
        self.kept_val: dict[str, Tensor] = {}
        self.opt_kept: torch.optim.Optimizer | None = None
        self.projected = False
        self.step = 0
        self.loss = 0.0  # of the last finished step
        self.expected_nnz = float(self.n_params)  # of the last finished step

    @property
    def phase(self) -> str:
        """'prune' before projection, 'fix' after."""
        return "fix" if self.projected else "prune"

    def progress(self, total_steps: int) -> Progress:
        """Where the run stands after its last finished step."""
        return Progress(self.step, total_steps, self.loss, self.expected_nnz, self.phase)

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

    def project(self, k: int) -> None:
        """Deterministic-gate δ → exactly k kept entries; phase 2 starts from their values."""
        lower, upper = self.config.gate_lower, self.config.gate_upper
        self.opt_w = {}  # frees AdamW's two copies before the dense δ is formed
        with torch.no_grad():
            deltas = {}
            for n in self.names:
                gate = deterministic_gate(self.alpha[n], lower, upper)
                if self.config.structured:
                    gate.mul_(deterministic_gate(self.alpha_g[n], lower, upper))
                deltas[n] = gate.mul_(self.w[n])
                self.w[n] = self.alpha[n] = None  # type: ignore[assignment]
        self.w, self.alpha, self.alpha_g = {}, {}, {}
        kept_idx, values = project_topk(deltas, k)
        del deltas
        self.kept_idx = {n: idx for n, idx in kept_idx.items() if idx.numel()}
        self.kept_val = {n: values[n].clone().requires_grad_(True) for n in self.kept_idx}
        self.opt_kept = make_adamw(list(self.kept_val.values()), lr=self.fix_lr)
        self.projected = True

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
        else:
            state["w"] = {n: t.detach() for n, t in self.w.items()}
            state["alpha"] = {n: t.detach() for n, t in self.alpha.items()}
            state["alpha_g"] = {n: t.detach() for n, t in self.alpha_g.items()}
            state["opt_w"] = {n: opt.state_dict() for n, opt in self.opt_w.items()}
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
        self.expected_nnz = float(state.get("expected_nnz", self.n_params))
        if state["projected"]:
            self.projected = True
            self.w, self.alpha, self.alpha_g, self.opt_w = {}, {}, {}, {}
            self.kept_idx = {n: t.to(self.device) for n, t in state["kept_idx"].items()}
            self.kept_val = {
                n: t.to(self.device).requires_grad_(True) for n, t in state["kept_val"].items()
            }
            self.opt_kept = make_adamw(list(self.kept_val.values()), lr=self.fix_lr)
            self.opt_kept.load_state_dict(state["opt_kept"])
        else:
            with torch.no_grad():
                for n in self.names:
                    self.w[n].copy_(state["w"][n])
                    self.alpha[n].copy_(state["alpha"][n])
                    self.alpha_g[n].copy_(state["alpha_g"][n])
                    self.opt_w[n].load_state_dict(state["opt_w"][n])


class InBackwardSteps:
    """Steps w (AdamW) and α (plain SGD) inside backward, as each tensor's gradient completes.

    Only on the micro-batch that ends an optimizer step (`armed`); earlier micro-batches only
    accumulate. Registered only while the run is gated (phase 1).
    """

    def __init__(self, state: DiffPruneState) -> None:
        self.state = state
        self.armed = False
        self.handles = []
        if not state.projected:
            self.handles = [
                state.w[n].register_post_accumulate_grad_hook(functools.partial(self._step_w, n))
                for n in state.names
            ]
            self.handles += [
                state.alpha[n].register_post_accumulate_grad_hook(self._step_alpha)
                for n in state.names
            ]

    def _step_w(self, name: str, param: Tensor) -> None:
        if self.armed:
            self.state.opt_w[name].step()
            param.grad = None

    def _step_alpha(self, param: Tensor) -> None:
        if self.armed:
            with torch.no_grad():
                param.add_(param.grad, alpha=-self.state.config.alpha_lr)
            param.grad = None

    def remove(self) -> None:
        """Unregister the hooks (before projection)."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
