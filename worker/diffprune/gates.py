"""Stretched hard-concrete gates (Louizos et al. 2018) and the fused gated-diff operation.

A gate with logit α draws logistic noise L = log u − log(1−u), u ~ U(0,1), and opens to
    s = σ((L + α)/β),  z = clamp(s·(r − l) + l, 0, 1)        (β = 1 here).
Expected L0 (the probability that the gate is not exactly zero): z = 0 iff
s ≤ −l/(r − l), i.e. iff L ≤ β·logit(−l/(r − l)) − α = β·log(−l/r) − α, so
    P(z ≠ 0) = σ(α − β·log(−l/r)),
which is σ(α) for the symmetric stretch l = −r used by default.
The deterministic gate used at projection time is z = clamp(σ(α)·(r − l) + l, 0, 1).

Noise: u is drawn on a 2⁻¹⁶ grid, u = (b + 32768.5)/65536 for a uniform 16-bit integer b,
so four gates share one 64-bit random draw (the random generator is the most expensive
part of a gate on CPU) and L is always finite (|L| ≤ 11.8). z is strictly between 0 and
1 only for L + α ∈ (0, log 5), where the grid moves L by at most 10⁻⁴.
The kernels compute σ(L + α) as u / (u + (1 − u)·e^(−α)) and P(z ≠ 0) as
1 / (1 + e^(−α)·e^(β log(−l/r))): one exponential per gate instead of four transcendentals.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

BETA = 1.0
_U_OFFSET = 32768.5
_U_SCALE = 1.0 / 65536.0


def l0_shift(lower: float, upper: float) -> float:
    """β·log(−l/r): the logit offset of P(z ≠ 0)."""
    return BETA * math.log(-lower / upper)


def sample_noise_bits(
    numel: int, *, device: torch.device | str, generator: torch.Generator | None = None
) -> Tensor:
    """`numel` uniform 16-bit integers (int16), four per 64-bit draw of `generator`."""
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2**63), 2**63 - 1, generator=generator)
    return words.view(torch.int16)[:numel]


def logistic_from_bits(bits: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Logistic noise log u − log(1 − u) for u = (bits + 32768.5)/65536 ∈ (0, 1)."""
    u = (bits.to(dtype) + _U_OFFSET) * _U_SCALE
    return torch.log(u) - torch.log1p(-u)


class GateNoise:
    """16-bit gate noise from one generator, staged in reusable scratch buffers.

    `draw(numel)` takes the next `numel` draws and returns a `NoiseDraw` that can hand
    the same values out again later (backward replays the generator instead of keeping
    the noise or the gates), so no per-step, per-gate tensor is kept between forward and
    backward.
    """

    def __init__(self, max_numel: int, *, device: torch.device | str, generator: torch.Generator):
        self.generator = generator
        self._words = torch.empty((max_numel + 3) // 4, dtype=torch.int64, device=device)
        self._values = torch.empty(max_numel, dtype=torch.float32, device=device)
        self._holder: NoiseDraw | None = None

    def draw(self, numel: int) -> NoiseDraw:
        """The next `numel` draws (they sit in the scratch buffer until the next draw)."""
        state = self.generator.get_state()
        self._fill(numel)
        self._holder = NoiseDraw(self, state, numel)
        return self._holder

    def _fill(self, numel: int) -> Tensor:
        words = self._words[: (numel + 3) // 4]
        words.random_(-(2**63), 2**63 - 1, generator=self.generator)
        values = self._values[:numel]
        values.copy_(words.view(torch.int16)[:numel])
        return values

    def _replay(self, draw: NoiseDraw) -> Tensor:
        if self._holder is draw:
            return self._values[: draw.numel]
        current = self.generator.get_state()
        self.generator.set_state(draw.state)
        values = self._fill(draw.numel)
        self.generator.set_state(current)
        self._holder = draw
        return values


class NoiseDraw:
    """One tensor's gate noise: `bits()` gives the same 16-bit values (as float32) every call."""

    def __init__(self, source: GateNoise, state: Tensor, numel: int) -> None:
        self.source, self.state, self.numel = source, state, numel

    def bits(self) -> Tensor:
        """The draws, valid until the next draw or replay of the same source."""
        return self.source._replay(self)


class FixedNoise:
    """Noise given as a tensor of 16-bit values (tests, reference computations)."""

    def __init__(self, bits: Tensor) -> None:
        self._bits = bits

    @property
    def numel(self) -> int:
        """Number of gates the noise covers."""
        return self._bits.numel()

    def bits(self) -> Tensor:
        """The given values."""
        return self._bits


def stochastic_gate(alpha: Tensor, noise: Tensor, lower: float, upper: float) -> Tensor:
    """Differentiable sampled gate z = clamp(σ(noise + α)·(r − l) + l, 0, 1) (reference form)."""
    return (torch.sigmoid(noise + alpha) * (upper - lower) + lower).clamp(0.0, 1.0)


def deterministic_gate(alpha: Tensor, lower: float, upper: float) -> Tensor:
    """Noise-free gate z = clamp(σ(α)·(r − l) + l, 0, 1), used for projection."""
    return (torch.sigmoid(alpha) * (upper - lower) + lower).clamp(0.0, 1.0)


def prob_nonzero(alpha: Tensor, lower: float, upper: float) -> Tensor:
    """P(z ≠ 0) = σ(α − β·log(−l/r)) for each gate logit."""
    return torch.sigmoid(alpha - l0_shift(lower, upper))


# ---------------------------------------------------------------- fused kernels
# Pure element-wise functions on flat tensors, so `torch.compile` can turn each into one
# loop over memory (one graph for every tensor size, `dynamic=True`).


def gate_forward_kernel(
    theta0: Tensor,
    w: Tensor,
    alpha: Tensor,
    gate_scale: Tensor,
    bits: Tensor,
    lower: float,
    upper: float,
    shift: float,
) -> tuple[Tensor, Tensor]:
    """(θ₀ + z·g·w, Σ P(z ≠ 0)) with z the gate sampled from 16-bit `bits` (any dtype)."""
    u = (bits.to(alpha.dtype) + _U_OFFSET) * _U_SCALE
    e = torch.exp(-alpha)
    s = u / (u + (1.0 - u) * e)  # σ(log u − log(1 − u) + α)
    z = torch.clamp(s * (upper - lower) + lower, 0.0, 1.0)
    theta = theta0 + z * gate_scale * w
    expected = (1.0 / (1.0 + e * math.exp(shift))).sum()
    return theta, expected


def gate_backward_kernel(
    grad: Tensor,
    grad_expected: Tensor,
    w: Tensor,
    alpha: Tensor,
    gate_scale: Tensor,
    bits: Tensor,
    lower: float,
    upper: float,
    shift: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (w, α, g), recomputing z from the replayed `bits` and α.

    dz/dα = (r − l)·s·(1 − s) where the stretched s lies strictly inside (0, 1), else 0.
    """
    u = (bits.to(alpha.dtype) + _U_OFFSET) * _U_SCALE
    e = torch.exp(-alpha)
    s = u / (u + (1.0 - u) * e)
    stretched = s * (upper - lower) + lower
    z = torch.clamp(stretched, 0.0, 1.0)
    slope = torch.where((stretched > 0.0) & (stretched < 1.0), (upper - lower) * s * (1.0 - s), 0.0)
    grad_z = grad * z
    grad_scale = (grad_z * w).sum()
    grad_w = grad_z * gate_scale
    p = 1.0 / (1.0 + e * math.exp(shift))  # σ(α − shift)
    grad_alpha = grad * w * gate_scale * slope + grad_expected * (p * (1.0 - p))
    return grad_w, grad_alpha, grad_scale


class _Kernels:
    """The kernels in use: eager, or compiled once per process on first use."""

    def __init__(self) -> None:
        self.forward: Callable = gate_forward_kernel
        self.backward: Callable = gate_backward_kernel
        self.compiled = False

    def use_compiled(self, enabled: bool) -> bool:
        """Switch to torch.compile'd kernels (True) or eager ones; returns whether compiled."""
        if not enabled:
            self.forward, self.backward, self.compiled = (
                gate_forward_kernel,
                gate_backward_kernel,
                False,
            )
            return False
        if not self.compiled:
            try:
                self.forward = torch.compile(gate_forward_kernel, dynamic=True)
                self.backward = torch.compile(gate_backward_kernel, dynamic=True)
                self.compiled = True
            except Exception as exc:  # no compiler toolchain: stay correct, just slower
                log.warning("torch.compile unavailable for the gate kernels (%s); using eager", exc)
                self.use_compiled(False)
        return self.compiled

    def run_forward(self, *args):
        """Forward kernel, falling back to eager for good if compilation fails at first call."""
        try:
            return self.forward(*args)
        except Exception as exc:
            if not self.compiled:
                raise
            log.warning("compiled gate kernel failed (%s); falling back to eager", exc)
            self.use_compiled(False)
            return self.forward(*args)


kernels = _Kernels()


class GatedDelta(torch.autograd.Function):
    """(θ = θ₀ + z ⊙ g ⊙ w, Σ P(z ≠ 0)) for one base tensor, in one autograd node.

    Inputs: theta0 (frozen base), w (diff weights), alpha (gate logits), gate_scale (0-d:
    the structured gate z_g, or 1), noise (a `NoiseDraw` or `FixedNoise`), lower, upper.
    Saves nothing but references to the leaves w and α: backward replays the noise and
    recomputes z, where autograd would keep five full-size intermediates per tensor.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        theta0: Tensor,
        w: Tensor,
        alpha: Tensor,
        gate_scale: Tensor,
        noise: NoiseDraw | FixedNoise,
        lower: float,
        upper: float,
    ) -> tuple[Tensor, Tensor]:
        """(θ₀ + z ⊙ g ⊙ w, Σ P(z ≠ 0)), keeping only w, α, g and the noise handle."""
        shift = l0_shift(lower, upper)
        theta, expected = kernels.run_forward(
            theta0.reshape(-1),
            w.reshape(-1),
            alpha.reshape(-1),
            gate_scale,
            noise.bits().reshape(-1),
            lower,
            upper,
            shift,
        )
        ctx.save_for_backward(w, alpha, gate_scale)
        ctx.noise = noise
        ctx.bounds = (lower, upper, shift)
        return theta.view(theta0.shape), expected

    @staticmethod
    def backward(ctx, grad: Tensor, grad_expected: Tensor):  # type: ignore[override]
        """Gradients of w, α and g from the replayed noise (none for θ₀ and the constants)."""
        w, alpha, gate_scale = ctx.saved_tensors
        lower, upper, shift = ctx.bounds
        grad_w, grad_alpha, grad_scale = kernels.backward(
            grad.reshape(-1),
            grad_expected,
            w.reshape(-1),
            alpha.reshape(-1),
            gate_scale,
            ctx.noise.bits().reshape(-1),
            lower,
            upper,
            shift,
        )
        return (
            None,
            grad_w.view(w.shape),
            grad_alpha.view(alpha.shape),
            grad_scale.reshape(gate_scale.shape),
            None,
            None,
            None,
        )


def gated_delta(
    theta0: Tensor,
    w: Tensor,
    alpha: Tensor,
    gate_scale: Tensor,
    noise: NoiseDraw | FixedNoise,
    lower: float,
    upper: float,
) -> tuple[Tensor, Tensor]:
    """(θ₀ + z·gate_scale·w, Σ P(z ≠ 0)) with z sampled from `noise`; fused (see `GatedDelta`)."""
    return GatedDelta.apply(theta0, w, alpha, gate_scale, noise, lower, upper)
