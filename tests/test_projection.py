"""Global top-k projection: exactly k entries, the largest, ties broken by global index."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from diffs.basemodel import k_for_density
from worker.diffprune.projection import densify, global_topk, project_topk


@st.composite
def diffs_and_k(draw):
    """A few named tensors with few distinct magnitudes (many ties) and a k in [0, N]."""
    n_tensors = draw(st.integers(1, 4))
    levels = draw(
        st.lists(st.sampled_from([0.0, 0.5, -0.5, 1.0, -2.0, 3e-4]), min_size=1, max_size=4)
    )
    deltas = {}
    for i in range(n_tensors):
        shape = draw(st.sampled_from([(7,), (3, 4), (2, 2, 3), (1,)]))
        size = 1
        for dim in shape:
            size *= dim
        values = draw(st.lists(st.sampled_from(levels), min_size=size, max_size=size))
        deltas[f"t{draw(st.integers(0, 99))}.{i}"] = torch.tensor(values).reshape(shape)
    total = sum(t.numel() for t in deltas.values())
    return deltas, draw(st.integers(0, total))


def flat_in_name_order(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in sorted(tensors)])


@given(diffs_and_k())
@settings(max_examples=200, deadline=None)
def test_projection_keeps_exactly_k_sorted_unique_entries(case):
    deltas, k = case
    indices, values = project_topk(deltas, k)
    assert sum(int(i.numel()) for i in indices.values()) == k
    for name, idx in indices.items():
        assert idx.dtype == torch.int64
        assert bool((idx[1:] > idx[:-1]).all())
        assert torch.equal(values[name], deltas[name].reshape(-1)[idx])


@given(diffs_and_k())
@settings(max_examples=200, deadline=None)
def test_projection_keeps_the_largest_and_breaks_ties_by_global_index(case):
    deltas, k = case
    indices, _ = project_topk(deltas, k)
    mask = flat_in_name_order(
        {
            n: torch.zeros(t.numel(), dtype=torch.bool).index_fill_(0, indices[n], True)
            for n, t in deltas.items()
        }
    )
    magnitude = flat_in_name_order(deltas).abs()
    if 0 < k < magnitude.numel():
        assert float(magnitude[mask].min()) >= float(magnitude[~mask].max())
        threshold = float(magnitude[mask].min())
        tied = torch.nonzero(magnitude == threshold).squeeze(1)
        kept_tied = mask[tied]
        # among tied entries the kept ones come first in global order
        assert bool((kept_tied[:-1].int() >= kept_tied[1:].int()).all())


@given(diffs_and_k())
@settings(max_examples=100, deadline=None)
def test_densified_projection_is_zero_outside_the_binary_mask(case):
    deltas, k = case
    indices, values = project_topk(deltas, k)
    dense = densify(indices, values, {n: tuple(t.shape) for n, t in deltas.items()})
    for name, delta in deltas.items():
        mask = torch.zeros(delta.numel(), dtype=torch.bool)
        mask[indices[name]] = True
        flat = dense[name].reshape(-1)
        assert torch.equal(flat[mask], delta.reshape(-1)[mask])
        assert bool((flat[~mask] == 0).all())


def test_all_equal_magnitudes_keep_the_first_k_global_positions():
    deltas = {"b": torch.ones(5), "a": -torch.ones(3)}
    kept = global_topk({n: t.abs() for n, t in deltas.items()}, 4)
    assert kept["a"].tolist() == [0, 1, 2]
    assert kept["b"].tolist() == [0]


def test_k_for_density_rounds_and_rejects_out_of_range():
    assert k_for_density(0.005, 22_713_216) == round(0.005 * 22_713_216)
    assert k_for_density(1.0, 10) == 10
    with pytest.raises(ValueError, match="density"):
        k_for_density(1.5, 10)


def test_projection_rejects_non_finite_diffs():
    with pytest.raises(ValueError, match="NaN"):
        project_topk({"a": torch.tensor([1.0, float("nan")])}, 1)
