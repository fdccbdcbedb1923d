"""Consolidation, the algorithm: budgets met exactly, composed = shared + residual, resume, refusals,
residuals that live on sparse supports (current positions + gradient-picked candidates).

Real parts: the tiny random BERT, the trainer's gates/projection/evaluate, the artifact format.
Current versions are random sparse diffs with random heads (the algorithm only needs a diff).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch

from diffs.apply import apply_diff
from diffs.basemodel import load_base
from diffs.build import diff_from_dense, make_meta_consistent
from diffs.read import loads_artifact
from diffs.types import ArtifactMeta
from diffs.write import dumps_artifact
from worker.consolidation import lowrank
from worker.consolidation.artifacts import evaluate_diff
from worker.consolidation.budget import knapsack_topk, project_to_budget
from worker.consolidation.candidates import (
    accumulated_gradient_magnitudes,
    candidate_count,
    pick_candidates,
)
from worker.consolidation.config import (
    ConsolidationConfig,
    ConsolidationError,
    ConsolidationTask,
    accept,
)
from worker.consolidation.fit import consolidate, start_fit, task_sampling_probabilities
from worker.consolidation.state import SHARED, GatedDiffSet, current_entries, gate_deterministic
from worker.data import load_task_data
from worker.kit.checkpoint import load_checkpoint, save_checkpoint
from worker.kit.progress import TrainingCancelled

WORDS = {"a": ("bad", "good"), "b": ("awful", "great"), "c": ("sad", "happy")}
SIZES = {"a": 40, "b": 40, "c": 16}  # task c is the low-resource one


def _task_data(root: Path, name: str, rows: int):
    rng = random.Random(name)
    directory = root / name
    directory.mkdir()
    lines = []
    for _ in range(rows):
        label = rng.randrange(2)
        lines.append(
            json.dumps(
                {
                    "text": f"{WORDS[name][label]} item {rng.randrange(50)}",
                    "label": ["neg", "pos"][label],
                }
            )
        )
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    return load_task_data(directory, validation_fraction=0.25)


def _random_current(base, data, *, seed: int, entries: int):
    generator = torch.Generator().manual_seed(seed)
    flat_sizes = {n: p.numel() for n, p in base.encoder.named_parameters()}
    deltas = {}
    for name, param in base.encoder.named_parameters():
        count = max(1, entries * flat_sizes[name] // base.n_params)
        dense = torch.zeros(param.numel())
        dense[torch.randperm(param.numel(), generator=generator)[:count]] = (
            torch.randn(count, generator=generator) * 0.05
        )
        deltas[name] = dense.view(param.shape)
    hidden = base.config.hidden_size
    head = {
        "classifier.weight": torch.randn(2, hidden, generator=generator) * 0.1,
        "classifier.bias": torch.zeros(2),
    }
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type=data.task_type,
        label_names=list(data.label_names),
        max_length=16,
    )
    return diff_from_dense(deltas, head, meta, "float32")


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return load_base(str(tiny_base_dir))


@pytest.fixture(scope="module")
def tasks(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("consolidation-tasks")
    out = []
    for i, name in enumerate(SIZES):
        data = _task_data(root, name, SIZES[name])
        out.append(ConsolidationTask(name, data, _random_current(base, data, seed=i, entries=1500)))
    return out


def _config(**overrides) -> ConsolidationConfig:
    values = dict(
        budget=2000,
        epochs=0.5,
        fix_epochs=0.5,
        batch_size=16,
        max_length=16,
        value_dtype="float32",
        rank=2,
        device="cpu",
        lr=1e-3,
    )
    values.update(overrides)
    return ConsolidationConfig(**values)


@pytest.fixture(scope="module")
def elementwise_result(tasks, base):
    return consolidate(tasks, _config(strategy="elementwise"), base=base, run_id=7)


@pytest.fixture(scope="module")
def rank_result(tasks, base):
    return consolidate(tasks, _config(strategy="rank", budget=3000), base=base, run_id=8)


def test_elementwise_budget_is_met_exactly_with_the_shared_part_counted_once(elementwise_result):
    result = elementwise_result
    assert result.total_nnz == 2000
    assert result.shared_nnz + sum(t.nnz for t in result.tasks) == 2000
    # element-wise: stored entries are exactly the artifacts' entries
    assert result.shared.nnz == result.shared_nnz
    for outcome in result.tasks:
        assert outcome.residual.nnz == outcome.nnz
        # the composed diff holds the union of shared and residual positions
        assert max(outcome.nnz, result.shared_nnz) <= outcome.composed.nnz
        assert outcome.composed.nnz <= outcome.nnz + result.shared_nnz


def test_rank_budget_counts_factor_entries_and_is_met_exactly(rank_result, base):
    result = rank_result
    assert result.total_nnz == 3000
    extra = [t.residual.meta.extra["consolidation"] for t in result.tasks]
    assert sum(e["stored_entries"] for e in extra) + result.shared_nnz == 3000
    # a kept component of an m x n matrix is stored as its m + n factor entries
    shapes = base.shapes
    for outcome in result.tasks:
        assert not [n for n in outcome.residual.indices if lowrank.is_factored(n, shapes[n])]
        for name, (u, v) in outcome.residual.factors.items():
            assert (u.shape[0], v.shape[0]) == shapes[name] and u.shape[1] == v.shape[1]


@pytest.mark.parametrize("which", ["elementwise", "rank"])
def test_composed_diff_equals_shared_then_residual_applied_in_turn(
    which, elementwise_result, rank_result, base
):
    result = elementwise_result if which == "elementwise" else rank_result
    for outcome in result.tasks:
        in_turn = copy.deepcopy(base.encoder)
        apply_diff(in_turn, result.shared)
        apply_diff(in_turn, outcome.residual)
        composed = copy.deepcopy(base.encoder)
        apply_diff(composed, outcome.composed)
        for (name, a), (_, b) in zip(
            in_turn.named_parameters(), composed.named_parameters(), strict=True
        ):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_artifacts_round_trip_with_lineage_and_config(elementwise_result, base):
    outcome = elementwise_result.tasks[0]
    loaded = loads_artifact(
        dumps_artifact(outcome.composed),
        expected_fingerprint=base.fingerprint,
        base_shapes=base.shapes,
    )
    lineage = loaded.meta.extra["consolidation"]
    assert lineage["run_id"] == 7 and lineage["role"] == "composed" and lineage["task"] == "a"
    assert loaded.meta.config["budget"] == 2000 and loaded.meta.config["strategy"] == "elementwise"
    assert set(loaded.head) == {"classifier.weight", "classifier.bias"}
    shared = loads_artifact(dumps_artifact(elementwise_result.shared))
    assert shared.meta.extra["consolidation"]["role"] == "shared" and not shared.head


def test_consolidated_tasks_are_evaluated_on_their_own_validation_split(
    elementwise_result, tasks, base
):
    for task, outcome in zip(tasks, elementwise_result.tasks, strict=True):
        metrics = evaluate_diff(outcome.composed, task.data, base=base, config=_config())
        assert metrics["metric_name"] == "accuracy" and 0.0 <= metrics["metric"] <= 1.0


def test_projection_keeps_exactly_the_budget_over_shared_and_residuals_with_deterministic_ties():
    def uniform_set(value: float) -> GatedDiffSet:
        s = GatedDiffSet()
        s.w["x"] = torch.full((4, 5), value)
        s.alpha["x"] = torch.full((4, 5), 5.0)
        return s

    sets = {SHARED: uniform_set(1.0), "t1": uniform_set(1.0), "t2": uniform_set(0.5)}
    kept = project_to_budget(sets, 27)
    assert kept == 27
    assert int(sets[SHARED].mask["x"].sum()) + int(sets["t1"].mask["x"].sum()) == 27
    assert int(sets["t2"].mask["x"].sum()) == 0
    # ties at equal magnitude go to the earlier set in the fixed order (shared first)
    assert bool(sets[SHARED].mask["x"].all())
    # values outside the mask are zero after projection
    assert bool((sets["t1"].w["x"][~sets["t1"].mask["x"]] == 0).all())


def test_balanced_projection_does_not_starve_a_task_whose_values_are_small():
    def set_of(values: torch.Tensor) -> GatedDiffSet:
        s = GatedDiffSet()
        s.w["x"] = values.clone()
        s.alpha["x"] = torch.full(values.shape, 5.0)
        return s

    ramp = torch.linspace(0.1, 2.0, 20).view(4, 5)
    plain = {"big": set_of(ramp), "small": set_of(ramp * 0.01)}
    balanced = {"big": set_of(ramp), "small": set_of(ramp * 0.01)}
    assert project_to_budget(plain, 20) == 20
    assert int(plain["small"].mask["x"].sum()) == 0  # global magnitudes: all go to "big"
    assert project_to_budget(balanced, 20, balance_roles=True) == 20
    assert int(balanced["big"].mask["x"].sum()) == int(balanced["small"].mask["x"].sum()) == 10


def test_knapsack_fills_the_budget_exactly_with_cost_one_items():
    scores = torch.tensor([9.0, 8.0, 7.0, 1.0, 1.0, 1.0, 1.0, 0.5])
    costs = torch.tensor([10, 1, 10, 1, 1, 1, 1, 1])
    keep = knapsack_topk(scores, costs, 15)
    assert int(costs[keep].sum()) == 15
    assert keep.tolist() == [True, True, False, True, True, True, True, False]


def test_knapsack_never_exceeds_the_budget_on_random_inputs():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 40, (1,), generator=generator))
        scores = torch.rand(n, generator=generator)
        costs = torch.randint(1, 12, (n,), generator=generator)
        budget = int(torch.randint(1, 60, (1,), generator=generator))
        keep = knapsack_topk(scores, costs, budget)
        used = int(costs[keep].sum())
        assert used <= budget
        ones_left = int(((costs == 1) & ~keep).sum())
        assert used == budget or ones_left == 0


def test_config_refuses_unknown_keys_and_impossible_values_by_name():
    with pytest.raises(ConsolidationError, match="bogus") as caught:
        ConsolidationConfig.from_dict({"bogus": 1})
    assert caught.value.field == "bogus"
    with pytest.raises(ConsolidationError) as caught:
        ConsolidationConfig(rank=0)
    assert caught.value.field == "rank"
    config = ConsolidationConfig(budget=5, rank=2)
    assert ConsolidationConfig.from_json(config.to_json()) == config


def test_temperature_sampling_upsamples_small_tasks():
    p = task_sampling_probabilities([900, 100], temperature=2.0)
    assert p[0] == pytest.approx(30 / 40) and p[1] == pytest.approx(10 / 40)
    assert task_sampling_probabilities([900, 100], temperature=1.0) == pytest.approx([0.9, 0.1])


def test_acceptance_uses_points_of_the_primary_metric():
    assert accept(0.900, 0.896, 0.5)
    assert not accept(0.900, 0.890, 0.5)
    assert accept(0.80, 0.95, 0.0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"budget": 0}, "budget"), ({"budget": 10**9}, "budget"), ({"strategy": "magic"}, "strategy")],
)
def test_invalid_runs_are_refused_before_any_work(tasks, base, overrides, field):
    with pytest.raises(ConsolidationError) as caught:
        consolidate(tasks, _config(**overrides), base=base)
    assert caught.value.field == field


def test_a_task_on_another_base_is_refused(tasks, base):
    other = copy.deepcopy(tasks[0].current)
    other.meta.base_fingerprint = "0" * 64
    with pytest.raises(ConsolidationError) as caught:
        consolidate([tasks[1], ConsolidationTask("x", tasks[0].data, other)], _config(), base=base)
    assert caught.value.field == "tasks"


class MemoryCheckpoint:
    def __init__(self) -> None:
        self.data: bytes | None = None

    def load(self) -> bytes | None:
        return self.data

    def save(self, data: bytes) -> None:
        self.data = data


@pytest.mark.parametrize(
    ("strategy", "stop_after", "phase"),
    [("elementwise", 2, "prune"), ("elementwise", 4, "fix"), ("rank", 4, "fix")],
)
def test_an_interrupted_run_resumes_to_the_same_result(
    tasks, base, elementwise_result, rank_result, strategy, stop_after, phase
):
    budget = 2000 if strategy == "elementwise" else 3000
    uninterrupted = elementwise_result if strategy == "elementwise" else rank_result
    config = _config(strategy=strategy, budget=budget, checkpoint_every=2)
    checkpoint = MemoryCheckpoint()
    steps = []

    def stop() -> bool:
        return len(steps) >= stop_after

    with pytest.raises(TrainingCancelled):
        consolidate(
            tasks,
            config,
            base=base,
            run_id=7,
            checkpoint=checkpoint,
            progress=steps.append,
            should_stop=stop,
        )
    assert checkpoint.data is not None
    assert steps[-1].phase == phase and steps[-1].step < steps[-1].total_steps
    resumed = consolidate(tasks, config, base=base, run_id=7, checkpoint=checkpoint)
    assert resumed.total_nnz == uninterrupted.total_nnz
    for a, b in zip(resumed.tasks, uninterrupted.tasks, strict=True):
        assert a.composed.indices.keys() == b.composed.indices.keys()
        for name in a.composed.indices:
            assert torch.equal(a.composed.indices[name], b.composed.indices[name])
            torch.testing.assert_close(a.composed.values[name], b.composed.values[name])
        assert a.residual.factors.keys() == b.residual.factors.keys()
        for name, (u, v) in a.residual.factors.items():
            torch.testing.assert_close(u, b.residual.factors[name][0])
            torch.testing.assert_close(v, b.residual.factors[name][1])


# ---------------------------------------------------------------- sparse residual state


@pytest.fixture(scope="module")
def started_fit(tasks, base):
    return start_fit(tasks, _config(strategy="elementwise", candidate_ratio=1.0), base=base)


def _current_count(task, names) -> int:
    return sum(int(current_entries(task.current, name)[0].numel()) for name in names)


def test_a_residual_holds_only_its_current_positions_plus_bounded_candidates(
    started_fit, tasks, base
):
    for task in tasks:
        residual = started_fit.state.sets[task.name]
        names = residual.entry_names()
        current = _current_count(task, names)
        support = sum(int(residual.positions[n].numel()) for n in names)
        # candidates lie outside the current diff, and there are at most ratio x current of them
        assert current < support <= current + candidate_count(current, 1.0)
        for name in names:
            positions = residual.positions[name]
            assert residual.w[name].shape == residual.alpha[name].shape == positions.shape
            assert bool((positions[1:] > positions[:-1]).all())  # sorted, no duplicates
            assert bool(torch.isin(current_entries(task.current, name)[0], positions).all())
        # values, logits and positions: 3 per support entry, whatever the base size
        assert residual.state_numel() == 3 * support < base.n_params / 50
    assert started_fit.state.sets[SHARED].state_numel() == 2 * base.n_params  # dense: w, alpha


def test_a_step_trains_only_the_drawn_residual_and_its_optimizer_state_covers_its_support(
    started_fit, tasks
):
    fit = started_fit
    drawn = tasks[int(fit.plan.choices[fit.state.step])].name
    fit.advance()
    adam = fit.state.optimizers[0]
    for task in tasks:
        residual = fit.state.sets[task.name]
        for name in residual.entry_names():
            state = adam.state.get(residual.w[name], {})
            if task.name == drawn:
                assert state["exp_avg"].shape == residual.positions[name].shape
            else:
                assert not state
    with torch.no_grad():
        fresh = sum(float(s.expected_l0()) for s in fit.state.sets.values())
    assert fit.state.expected_nnz() == pytest.approx(fresh, rel=1e-6)


def test_without_candidates_a_residual_stays_on_its_current_positions(tasks, base):
    fit = start_fit(tasks, _config(candidate_ratio=0.0), base=base)
    for task in tasks:
        residual = fit.state.sets[task.name]
        for name in residual.entry_names():
            assert torch.equal(residual.positions[name], current_entries(task.current, name)[0])
            torch.testing.assert_close(
                residual.w[name].detach(), current_entries(task.current, name)[1]
            )


def test_a_rank_residual_has_small_factors_and_sparse_entry_tensors(tasks, base):
    fit = start_fit(tasks, _config(strategy="rank"), base=base)
    residual = fit.state.sets[tasks[0].name]
    assert residual.factor_names() and residual.entry_names()
    for name in residual.factor_names():
        m, n = base.shapes[name]
        assert residual.u[name].shape == (m, 2) and residual.v[name].shape == (n, 2)
        assert name not in residual.w
    assert all(residual.is_sparse(name) for name in residual.entry_names())
    current = _current_count(tasks[0], residual.entry_names())
    support = sum(int(residual.positions[n].numel()) for n in residual.entry_names())
    assert support <= current + candidate_count(current, 1.0)


def _rank_version(diff, base, *, rank: int, seed: int):
    """`diff` plus random rank-`rank` factors on every factored matrix (a rank run's version)."""
    generator = torch.Generator().manual_seed(seed)
    factors = {
        name: (
            torch.randn(shape[0], rank, generator=generator) * 0.05,
            torch.randn(shape[1], rank, generator=generator) * 0.05,
        )
        for name, shape in base.shapes.items()
        if lowrank.is_factored(name, shape)
    }
    shapes = {**diff.shapes, **{name: base.shapes[name] for name in factors}}
    return make_meta_consistent(dataclasses.replace(diff, factors=factors, shapes=shapes))


@pytest.mark.parametrize("strategy", ["elementwise", "rank"])
def test_a_residual_started_from_a_rank_version_holds_its_stored_entries_plus_candidates(
    strategy, tasks, base
):
    rank_tasks = [
        ConsolidationTask(task.name, task.data, _rank_version(task.current, base, rank=2, seed=i))
        for i, task in enumerate(tasks)
    ]
    fit = start_fit(rank_tasks, _config(strategy=strategy, candidate_ratio=1.0), base=base)
    for task in rank_tasks:
        current = task.current
        whole = sum(math.prod(base.shapes[name]) for name in current.factors)
        for name, (u, v) in current.factors.items():
            assert int(torch.count_nonzero(current.dense(name))) == math.prod(base.shapes[name])
            own = int(current.indices[name].numel()) if name in current.indices else 0
            stored = u.shape[1] * (u.shape[0] + v.shape[0]) + own
            assert current_entries(current, name)[0].numel() <= stored
        residual = fit.state.sets[task.name]
        support = sum(int(residual.positions[n].numel()) for n in residual.entry_names())
        assert support <= current.nnz + candidate_count(current.nnz, 1.0)
        if strategy == "elementwise":
            assert support < whole  # the factored matrices are not taken whole


def test_candidates_are_the_largest_gradient_magnitudes_outside_the_current_diff():
    def scores():
        return {
            "a": torch.tensor([0.9, 0.1, 0.0, 0.5]),
            "b": torch.tensor([[0.7, 0.2], [0.0, 0.95]]),
        }

    current = {"a": torch.tensor([0]), "b": torch.tensor([3])}
    picked = pick_candidates(scores(), current, 3)
    assert picked["a"].tolist() == [3] and picked["b"].tolist() == [0, 1]
    # never a position already in the diff, nor one whose gradient is zero
    picked = pick_candidates(scores(), current, 100)
    assert picked["a"].tolist() == [1, 3] and picked["b"].tolist() == [0, 1]
    assert candidate_count(1517, 1.0) == 1517 and candidate_count(10, 0.25) == 3
    assert candidate_count(10, 0.0) == 0


def test_gradient_magnitudes_are_summed_in_absolute_value_over_the_batches():
    weights = {"x": torch.tensor([1.0, -2.0, 3.0])}

    def loss_of(leaves, batch):
        return (leaves["x"] * batch).sum()

    batches = [torch.tensor([1.0, -1.0, 0.0]), torch.tensor([-1.0, -3.0, 0.0])]
    magnitudes = accumulated_gradient_magnitudes(weights, loss_of, batches)
    assert magnitudes["x"].tolist() == [2.0, 4.0, 0.0]  # |1| + |-1|, not |1 - 1|


def _sparse_set(positions: list[int], values: list[float], shape=(2, 3)) -> GatedDiffSet:
    diff_set = GatedDiffSet(positions={"x": torch.tensor(positions)}, shapes={"x": shape})
    diff_set.w["x"] = torch.tensor(values, requires_grad=True)
    diff_set.alpha["x"] = torch.full((len(values),), 5.0, requires_grad=True)
    return diff_set


def test_a_sparse_residual_adds_its_gated_values_at_its_positions_differentiably():
    theta = torch.randn(2, 3)
    residual = _sparse_set([1, 4, 5], [0.5, -1.0, 2.0])
    gate = gate_deterministic(residual.alpha["x"]).detach()
    expected = theta.clone().reshape(-1)
    expected[torch.tensor([1, 4, 5])] += residual.w["x"].detach() * gate
    out = residual.added_to("x", theta, "deterministic")
    torch.testing.assert_close(out, expected.view(2, 3))
    torch.testing.assert_close(residual.delta("x", "deterministic"), expected.view(2, 3) - theta)
    (out * torch.arange(6.0).view(2, 3)).sum().backward()
    torch.testing.assert_close(residual.w["x"].grad, torch.tensor([1.0, 4.0, 5.0]) * gate)


def test_projection_ranks_dense_shared_and_sparse_residual_magnitudes_together():
    shared = GatedDiffSet()
    shared.w["x"] = torch.tensor([[0.1, 3.0, 0.0], [0.2, 0.0, 0.0]])
    shared.alpha["x"] = torch.full((2, 3), 5.0)
    sets = {
        SHARED: shared,
        "t1": _sparse_set([0, 2, 5], [2.0, 1.0, 0.05]),
        "t2": _sparse_set([4], [0.5]),
    }
    gate = float(gate_deterministic(torch.tensor(5.0)))
    assert project_to_budget(sets, 4) == 4
    positions, values = sets["t1"].kept_entries("x")
    assert positions.tolist() == [0, 2]
    torch.testing.assert_close(values, torch.tensor([2.0, 1.0]) * gate)
    assert sets[SHARED].kept_entries("x")[0].tolist() == [1]
    assert sets["t2"].kept_entries("x")[0].tolist() == [4]
    assert sum(s.stored_entries() for s in sets.values()) == 4


def test_balanced_projection_treats_a_sparse_residual_like_a_dense_one():
    ramp = torch.linspace(0.1, 2.0, 6)
    dense = GatedDiffSet()
    dense.w["x"] = ramp.view(2, 3).clone()
    dense.alpha["x"] = torch.full((2, 3), 5.0)
    sets = {"big": dense, "small": _sparse_set(list(range(6)), (ramp * 0.01).tolist())}
    assert project_to_budget(sets, 6, balance_roles=True) == 6
    assert sets["big"].stored_entries() == sets["small"].stored_entries() == 3


def test_the_rank_knapsack_fills_the_budget_exactly_with_sparse_residual_entries():
    shared = GatedDiffSet()
    shared.u["m"] = torch.full((4, 1), 2.0)
    shared.v["m"] = torch.full((4, 1), 2.0)
    shared.beta["m"] = torch.full((1,), 5.0)
    sets = {SHARED: shared, "t1": _sparse_set([0, 3, 5], [3.0, 0.2, 0.1])}
    assert project_to_budget(sets, 10) == 10  # one component (4 + 4) and two entries
    assert shared.kept_factors("m")[0].shape == (4, 1)
    assert sets["t1"].kept_entries("x")[0].tolist() == [0, 3]


def test_checkpoints_round_trip_sparse_supports(started_fit, tasks):
    checkpoint = MemoryCheckpoint()
    config = started_fit.state.config
    save_checkpoint(checkpoint, started_fit.state.state_dict(), config)
    saved = load_checkpoint(checkpoint, config)
    for role, diff_set in started_fit.state.sets.items():
        restored = GatedDiffSet.from_state_dict(saved["sets"][role])
        assert restored.shapes == diff_set.shapes
        assert restored.entry_names() == diff_set.entry_names()
        for key in ("w", "alpha", "positions", "u", "v", "beta"):
            for name, tensor in getattr(diff_set, key).items():
                assert torch.equal(getattr(restored, key)[name], tensor.detach()), (key, name)
        assert all(t.requires_grad for t in restored.value_tensors())
