"""Hard-concrete gate math: range, deterministic values, expected L0, fused gradients."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.diffprune.gates import (
    FixedNoise,
    GateNoise,
    deterministic_gate,
    gate_forward_kernel,
    gated_delta,
    kernels,
    l0_shift,
    logistic_from_bits,
    prob_nonzero,
    sample_noise_bits,
    stochastic_gate,
)

LOWER, UPPER = -1.5, 1.5
finite_logits = st.floats(min_value=-30, max_value=30, allow_nan=False)
stretches = st.tuples(
    st.floats(min_value=-3.0, max_value=-0.01), st.floats(min_value=1.01, max_value=3.0)
)


@pytest.fixture(autouse=True)
def eager_kernels():
    """Gate math is checked on the eager kernels (the compiled ones are the same functions)."""
    kernels.use_compiled(False)


@given(alpha=finite_logits, seed=st.integers(0, 2**31 - 1), stretch=stretches)
@settings(max_examples=60, deadline=None)
def test_sampled_gate_lies_in_unit_interval(alpha, seed, stretch):
    lower, upper = stretch
    bits = sample_noise_bits(512, device="cpu", generator=torch.Generator().manual_seed(seed))
    z = stochastic_gate(torch.tensor(alpha), logistic_from_bits(bits), lower, upper)
    assert bool(((z >= 0) & (z <= 1)).all())
    assert bool(torch.isfinite(z).all())


def test_noise_bits_never_give_infinite_logistic_noise():
    extremes = torch.tensor([-(2**15), 2**15 - 1], dtype=torch.int16)
    noise = logistic_from_bits(extremes)
    assert bool(torch.isfinite(noise).all())
    assert noise[0] < -11 and noise[1] > 11


@given(alpha=finite_logits)
@settings(max_examples=100, deadline=None)
def test_deterministic_gate_is_the_clamped_stretched_sigmoid(alpha):
    z = float(deterministic_gate(torch.tensor(alpha, dtype=torch.float64), LOWER, UPPER))
    expected = min(1.0, max(0.0, 1 / (1 + math.exp(-alpha)) * (UPPER - LOWER) + LOWER))
    assert z == pytest.approx(expected, abs=1e-12)


def test_deterministic_gate_values_at_landmarks():
    alpha = torch.tensor([-5.0, 0.0, math.log(5.0), 5.0], dtype=torch.float64)
    z = deterministic_gate(alpha, LOWER, UPPER)
    # closed at α ≤ 0, fully open from σ(α) = 5/6 (α = log 5) on; α = 5 (the init) is open
    assert z.tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0], abs=1e-12)


@given(alpha=st.floats(min_value=-4, max_value=4), stretch=stretches)
@settings(max_examples=25, deadline=None)
def test_expected_l0_formula_matches_monte_carlo(alpha, stretch):
    lower, upper = stretch
    generator = torch.Generator().manual_seed(1234)
    u = torch.rand(200_000, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
    noise = torch.log(u) - torch.log1p(-u)
    z = stochastic_gate(torch.tensor(alpha, dtype=torch.float64), noise, lower, upper)
    observed = float((z != 0).double().mean())
    formula = float(prob_nonzero(torch.tensor(alpha, dtype=torch.float64), lower, upper))
    assert formula == pytest.approx(1 / (1 + math.exp(-(alpha - math.log(-lower / upper)))))
    assert abs(observed - formula) < 0.006  # > 5 standard errors of 200k draws


def test_expected_l0_of_symmetric_stretch_is_sigmoid_alpha():
    assert l0_shift(LOWER, UPPER) == 0.0
    alpha = torch.linspace(-6, 6, 13, dtype=torch.float64)
    assert torch.allclose(prob_nonzero(alpha, LOWER, UPPER), torch.sigmoid(alpha))


def off_boundary_inputs(seed: int, n: int = 24, lower: float = LOWER, upper: float = UPPER):
    """Double inputs whose pre-clamp gates stay clear of 0 and 1 (finite differences cross no kink)."""
    g = torch.Generator().manual_seed(seed)
    theta0 = torch.randn(n, generator=g, dtype=torch.float64)
    w = torch.randn(n, generator=g, dtype=torch.float64)
    alpha = torch.randn(n, generator=g, dtype=torch.float64) * 2
    bits = sample_noise_bits(n, device="cpu", generator=g)
    noise = logistic_from_bits(bits, torch.float64)
    pre = torch.sigmoid(noise + alpha) * (upper - lower) + lower
    near = (pre.abs() < 1e-3) | ((pre - 1).abs() < 1e-3)
    alpha = torch.where(near, alpha + 0.05, alpha)
    gate_scale = torch.rand((), generator=g, dtype=torch.float64) * 0.5 + 0.5
    return theta0, w, alpha, gate_scale, bits


@given(seed=st.integers(0, 10_000))
@settings(max_examples=15, deadline=None)
def test_fused_gate_passes_gradcheck_in_double(seed):
    theta0, w, alpha, gate_scale, bits = off_boundary_inputs(seed)
    w.requires_grad_(True)
    alpha.requires_grad_(True)
    gate_scale.requires_grad_(True)

    def fused(w, alpha, gate_scale):
        return gated_delta(theta0, w, alpha, gate_scale, FixedNoise(bits), LOWER, UPPER)

    assert torch.autograd.gradcheck(fused, (w, alpha, gate_scale), eps=1e-6, atol=1e-7)


@given(seed=st.integers(0, 10_000), stretch=stretches)
@settings(max_examples=15, deadline=None)
def test_fused_gate_matches_autograd_reference(seed, stretch):
    lower, upper = stretch
    theta0, w, alpha, gate_scale, bits = off_boundary_inputs(seed, lower=lower, upper=upper)
    weights = torch.randn(
        theta0.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )

    def objective(fn):
        leaves = [t.clone().requires_grad_(True) for t in (w, alpha, gate_scale)]
        theta, expected = fn(*leaves)
        (theta * weights).sum().add(0.3 * expected).backward()
        return theta.detach(), expected.detach(), [t.grad for t in leaves]

    def reference(w, alpha, gate_scale):
        z = stochastic_gate(alpha, logistic_from_bits(bits, torch.float64), lower, upper)
        return theta0 + z * gate_scale * w, prob_nonzero(alpha, lower, upper).sum()

    def fused(w, alpha, gate_scale):
        return gated_delta(theta0, w, alpha, gate_scale, FixedNoise(bits), lower, upper)

    got, want = objective(fused), objective(reference)
    assert torch.allclose(got[0], want[0], atol=1e-12)
    assert torch.allclose(got[1], want[1], atol=1e-12)
    for g_fused, g_ref in zip(got[2], want[2], strict=True):
        assert torch.allclose(g_fused, g_ref, atol=1e-10)


def test_forward_kernel_keeps_base_and_counts_expected_nonzeros():
    theta0 = torch.randn(1000)
    w = torch.zeros(1000)
    alpha = torch.full((1000,), 5.0)
    bits = sample_noise_bits(1000, device="cpu", generator=torch.Generator().manual_seed(0))
    theta, expected = gate_forward_kernel(
        theta0, w, alpha, torch.tensor(1.0), bits, LOWER, UPPER, 0.0
    )
    assert torch.equal(theta, theta0)  # w = 0: no change
    assert float(expected) == pytest.approx(1000 * (1 / (1 + math.exp(-5))), rel=1e-5)
    z = stochastic_gate(alpha, logistic_from_bits(bits), LOWER, UPPER)
    assert float((z == 1).float().mean()) > 0.9  # α = 5 (the init) leaves almost every gate open


def test_noise_draws_replay_the_same_values_without_disturbing_the_stream():
    generator = torch.Generator().manual_seed(7)
    noise = GateNoise(100, device="cpu", generator=generator)
    first = noise.draw(100)
    first_bits = first.bits().clone()
    second = noise.draw(60)
    second_bits = second.bits().clone()
    state_after = generator.get_state()
    assert torch.equal(first.bits(), first_bits)  # replayed from the saved state
    assert torch.equal(second.bits(), second_bits)
    assert torch.equal(generator.get_state(), state_after)
    assert bool(((first_bits >= -(2**15)) & (first_bits < 2**15)).all())
    assert first_bits.unique().numel() > 90  # 16-bit draws, not a constant
