"""The diff-pruning trainer on the tiny random BERT: it learns, projects exactly, resumes, stops."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from datasets_io.tabular import ColumnMapping
from diffs.apply import build_task_model
from diffs.basemodel import k_for_density, load_base
from diffs.read import loads_artifact
from diffs.write import dumps_artifact
from worker.data import load_task_data
from worker.diffprune.config import (
    AUTO_MAX_FIX_STEPS,
    AUTO_MAX_PRUNE_STEPS,
    AUTO_MIN_FIX_STEPS,
    FIX_LR_BOUNDS,
    FIX_LR_REFERENCE,
    DiffPruneConfig,
    fix_lr_for,
    gate_closing_steps,
    min_prune_steps,
    run_steps,
    sign_step_size,
)
from worker.diffprune.trainer import steps_per_epoch, train_diff
from worker.kit.evaluate import evaluate
from worker.kit.progress import Progress, TrainingCancelled

pytestmark = pytest.mark.usefixtures("one_torch_thread")

POSITIVE = ["good", "great", "excellent", "wonderful", "fine"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "horrible"]
FILLER = ["the", "a", "movie", "was", "it", "plot", "very"]


def write_sentiment_task(path: Path, rows: int, seed: int) -> Path:
    """A separable task: the label is which word list the one sentiment word comes from."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for i in range(rows):
            positive = i % 2 == 0
            words = [rng.choice(POSITIVE if positive else NEGATIVE)]
            words += [rng.choice(FILLER) for _ in range(4)]
            rng.shuffle(words)
            out.write(
                json.dumps({"text": " ".join(words), "label": "pos" if positive else "neg"}) + "\n"
            )
    return path


def write_counting_task(path: Path, rows: int, seed: int) -> Path:
    """A regression task: the label is the share of "good" among four words."""
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(rows):
            n = rng.randint(0, 4)
            text = " ".join(["good"] * n + ["movie"] * (4 - n))
            out.write(json.dumps({"text": text, "label": n / 4}) + "\n")
    return path


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sentiment")
    write_sentiment_task(directory / "train.jsonl", 320, seed=0)
    write_sentiment_task(directory / "validation.jsonl", 80, seed=1)
    return load_task_data(directory, mapping=ColumnMapping())


@pytest.fixture(scope="module")
def small_sentiment(tmp_path_factory):
    directory = tmp_path_factory.mktemp("small")
    write_sentiment_task(directory / "train.jsonl", 48, seed=2)
    write_sentiment_task(directory / "validation.jsonl", 16, seed=3)
    return load_task_data(directory, mapping=ColumnMapping())


def fast_config(**changes) -> DiffPruneConfig:
    """Large learning rates and short sequences: the tiny random BERT learns in seconds."""
    values = dict(
        epochs=3,
        fix_epochs=2,
        batch_size=16,
        max_length=16,
        lr=1e-2,
        fix_lr=1e-2,
        head_lr=1e-2,
        density=0.05,
        compile_gates=False,
        eval_batch_size=32,
    )
    values.update(changes)
    return DiffPruneConfig(**values)


class MemoryCheckpoint:
    """A CheckpointIO keeping the last state in memory, counting saves."""

    def __init__(self) -> None:
        self.data: bytes | None = None
        self.saves = 0

    def load(self) -> bytes | None:
        return self.data

    def save(self, data: bytes) -> None:
        self.data = data
        self.saves += 1


def assert_same_diff(a, b) -> None:
    assert sorted(a.indices) == sorted(b.indices)
    for name in a.indices:
        assert torch.equal(a.indices[name], b.indices[name]), name
        assert torch.equal(a.values[name], b.values[name]), name
    for name in a.head:
        assert torch.equal(a.head[name], b.head[name]), name


def test_training_learns_a_separable_task_with_exactly_k_entries(sentiment, tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    before = {n: p.detach().clone() for n, p in base.encoder.named_parameters()}
    seen: list[Progress] = []
    result = train_diff(sentiment, fast_config(), base=base, progress=seen.append)

    assert result.metrics["metric_name"] == "accuracy"
    assert result.metrics["accuracy"] >= 0.9  # chance is 0.5
    assert 0.0 <= result.metrics["macro_f1"] <= 1.0
    diff = result.diff
    assert diff.nnz == k_for_density(0.05, base.n_params) == diff.meta.nnz
    assert diff.meta.n_params == base.n_params
    assert diff.meta.config == {**fast_config().to_dict(), "prune_steps": 60, "fix_steps": 40}
    assert set(diff.head) == {"classifier.weight", "classifier.bias"}
    # the shared base is untouched, bit for bit
    for name, param in base.encoder.named_parameters():
        assert torch.equal(param, before[name]), name
    # progress: every optimizer step once, prune phase then fix phase
    assert [p.step for p in seen] == list(range(1, seen[-1].total_steps + 1))
    assert [p.phase for p in seen] == ["prune"] * 60 + ["fix"] * 40
    assert seen[-1].expected_nnz == diff.nnz
    assert result.train_seconds > 0 and result.peak_memory_bytes > 0

    # the stored artifact reproduces the reported metric
    loaded = loads_artifact(dumps_artifact(diff), expected_fingerprint=base.fingerprint)
    model = build_task_model(base, loaded)
    again = evaluate(
        model,
        sentiment.validation,
        base=base,
        task_type="classification",
        num_labels=2,
        max_length=16,
    )
    assert again["accuracy"] == pytest.approx(result.metrics["accuracy"])


def test_resumed_run_ends_exactly_like_an_uninterrupted_one(small_sentiment, tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    config = fast_config(epochs=2, fix_epochs=2, batch_size=8, grad_accum=2, checkpoint_every=2)
    # 48 rows, 6 micro-batches of 8, 2 per optimizer step: 3 steps/epoch, 12 steps in all
    reference = train_diff(small_sentiment, config, base=base)

    store = MemoryCheckpoint()
    for stop_at in (5, 9):  # once in the prune phase, once in the fix phase
        steps: list[int] = []
        with pytest.raises(TrainingCancelled):
            train_diff(
                small_sentiment,
                config,
                base=base,
                checkpoint=store,
                progress=lambda p, steps=steps: steps.append(p.step),
                should_stop=lambda steps=steps, stop_at=stop_at: (
                    bool(steps) and steps[-1] >= stop_at
                ),
            )
    resumed = train_diff(small_sentiment, config, base=base, checkpoint=store)
    assert store.saves == 2 + 2 + 2  # (2, 4) (6, 8) (10, 12)
    assert_same_diff(resumed.diff, reference.diff)
    assert resumed.metrics == reference.metrics


def test_checkpoint_from_another_config_is_refused(small_sentiment, tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    store = MemoryCheckpoint()
    train_diff(small_sentiment, fast_config(epochs=1, fix_epochs=0), base=base, checkpoint=store)
    with pytest.raises(ValueError, match="lr"):
        train_diff(
            small_sentiment,
            fast_config(epochs=1, fix_epochs=0, lr=0.5),
            base=base,
            checkpoint=store,
        )


def test_should_stop_cancels_before_any_step(small_sentiment, tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    seen: list[Progress] = []
    with pytest.raises(TrainingCancelled):
        train_diff(
            small_sentiment,
            fast_config(),
            base=base,
            progress=seen.append,
            should_stop=lambda: True,
        )
    assert seen == []


def test_regression_task_reports_correlations(tmp_path, tiny_base_dir):
    write_counting_task(tmp_path / "train.jsonl", 64, seed=0)
    data = load_task_data(tmp_path, mapping=ColumnMapping(), task_type="regression")
    base = load_base(str(tiny_base_dir))
    result = train_diff(data, fast_config(epochs=2, fix_epochs=1, structured=False), base=base)
    assert result.metrics["metric_name"] == "pearson"
    assert {"pearson", "spearman"} <= set(result.metrics)
    assert result.diff.meta.task_type == "regression" and result.diff.meta.label_names == []
    assert result.diff.head["classifier.weight"].shape == (1, 32)


def test_config_is_sorted_json_and_rejects_bad_values():
    config = DiffPruneConfig(density=0.001, epochs=2)
    text = config.to_json()
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert DiffPruneConfig.from_json(text) == config
    with pytest.raises(ValueError, match="density"):
        DiffPruneConfig(density=0.0)
    with pytest.raises(ValueError, match="bogus"):
        DiffPruneConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="fix_lr"):
        DiffPruneConfig(fix_lr=0.0)


def test_fixed_mask_step_is_the_reference_at_half_a_percent_and_32_steps():
    assert fix_lr_for(DiffPruneConfig(), 32) == pytest.approx(FIX_LR_REFERENCE)


def test_fixed_mask_step_grows_for_sparser_diffs_and_shorter_runs_within_bounds():
    config = DiffPruneConfig()
    assert fix_lr_for(config, 8) == pytest.approx(2 * FIX_LR_REFERENCE)  # 4x fewer steps
    assert fix_lr_for(DiffPruneConfig(density=0.005 / 4), 32) == pytest.approx(2 * FIX_LR_REFERENCE)
    assert fix_lr_for(DiffPruneConfig(density=0.0001), 1) == FIX_LR_BOUNDS[1]
    assert fix_lr_for(DiffPruneConfig(density=1.0), 10_000) == FIX_LR_BOUNDS[0]


def test_a_phase_two_longer_than_the_reference_keeps_the_reference_step():
    assert fix_lr_for(DiffPruneConfig(), 80) == pytest.approx(FIX_LR_REFERENCE)
    assert fix_lr_for(DiffPruneConfig(), 1_000) == pytest.approx(FIX_LR_REFERENCE)
    assert fix_lr_for(DiffPruneConfig(density=0.005 / 4), 500) == pytest.approx(
        2 * FIX_LR_REFERENCE
    )


def test_an_explicit_fixed_mask_step_is_used_as_given():
    assert fix_lr_for(DiffPruneConfig(fix_lr=0.004, density=0.0001), 1) == 0.004


def test_artifact_records_the_fixed_mask_step_the_run_used(small_sentiment, tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    config = fast_config(fix_lr=None, epochs=1, fix_epochs=1)
    result = train_diff(small_sentiment, config, base=base)
    fix_steps = steps_per_epoch(small_sentiment.train.rows, config) * config.fix_epochs
    assert result.diff.meta.config["fix_lr"] == pytest.approx(fix_lr_for(config, fix_steps))
    assert result.diff.meta.config == {
        **config.to_dict(),
        "fix_lr": fix_lr_for(config, fix_steps),
        "prune_steps": fix_steps,
        "fix_steps": fix_steps,
    }


def test_with_nothing_pruned_and_no_gated_epoch_the_trainer_is_plain_full_finetuning(
    tmp_path, tiny_base_dir
):
    from bench.common import train_dense  # the accuracy benchmark's full-finetuning baseline

    write_counting_task(tmp_path / "train.jsonl", 64, seed=1)
    write_counting_task(tmp_path / "validation.jsonl", 32, seed=2)
    data = load_task_data(tmp_path, mapping=ColumnMapping(), task_type="regression")
    base = load_base(str(tiny_base_dir))
    config = fast_config(
        epochs=0, fix_epochs=2, density=1.0, lr=1e-3, fix_lr=1e-3, value_dtype="float32"
    )
    diff_metrics = train_diff(data, config, base=base).metrics
    full_config = fast_config(epochs=2, fix_epochs=0, lr=1e-3)
    full_metrics = train_dense(data, full_config, base=base, method="full").metrics
    # θ₀ + δ and θ take the same AdamW steps; only float rounding differs (measured: mse
    # 3e-9 apart, while a 20% larger step moves it by 1e-2)
    assert diff_metrics["mse"] == pytest.approx(full_metrics["mse"], abs=2e-5)
    assert diff_metrics["pearson"] == pytest.approx(full_metrics["pearson"], abs=1e-4)


# ---------------------------------------------------------------- gates that close, ablations


def gate_config(**changes) -> DiffPruneConfig:
    """`fast_config` with a gated phase long enough for sign steps on α to close gates."""
    values = dict(
        prune_steps=30, fix_steps=4, batch_size=16, checkpoint_every=100, alpha_optimizer="sign"
    )
    values.update(changes)
    return fast_config(**values)


def test_sign_steps_close_gates_before_projection_and_progress_reports_it(
    small_sentiment, tiny_base_dir
):
    base = load_base(str(tiny_base_dir))
    seen: list[Progress] = []
    result = train_diff(small_sentiment, gate_config(), base=base, progress=seen.append)
    n = base.n_params
    pruning = [p.expected_nnz for p in seen if p.phase == "prune"]
    assert len(pruning) == 30 and pruning[0] > 0.95 * n
    # each step moves α by alpha_lr: 30 steps take the gates from σ(5)² ≈ 0.99 to ≈ σ(2)² ≈ 0.78
    assert pruning[-1] < 0.85 * n
    assert all(b <= a + 1e-3 * n for a, b in zip(pruning, pruning[1:], strict=False))
    assert result.expected_nnz_at_projection < 0.85 * n
    assert (
        result.expected_nnz_at_projection == result.diff.meta.metrics["expected_nnz_at_projection"]
    )
    assert 0.0 <= result.gate_open_fraction <= 1.0
    assert result.gate_open_fraction == result.diff.meta.metrics["gate_open_fraction"]
    assert result.diff.nnz == k_for_density(0.05, n)
    assert (result.prune_steps, result.fix_steps) == (30, 4)


def test_gates_with_plain_sgd_barely_move_and_adamw_moves_them(small_sentiment, tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    n = base.n_params
    sgd = train_diff(small_sentiment, gate_config(alpha_optimizer="sgd"), base=base)
    adamw = train_diff(small_sentiment, gate_config(alpha_optimizer="adamw"), base=base)
    at_init = n * torch.sigmoid(torch.tensor(5.0)).item() ** 2
    assert sgd.expected_nnz_at_projection == pytest.approx(at_init, rel=1e-4)
    assert adamw.expected_nnz_at_projection < at_init * (1 - 1e-3)
    for result in (sgd, adamw):
        assert result.diff.nnz == k_for_density(0.05, n)


def test_a_closed_gate_ranks_below_every_open_entry_at_projection(small_sentiment, tiny_base_dir):
    # alpha_init 0.5: the gates the task leaves alone end at the closed logit 0 (P(z ≠ 0) =
    # 1/2), so fewer than k = N/2 entries stay open and closed ones fill the rest
    base = load_base(str(tiny_base_dir))
    config = gate_config(alpha_init=0.5, structured=False, density=0.5)
    result = train_diff(small_sentiment, config, base=base)
    k = k_for_density(0.5, base.n_params)
    assert result.diff.nnz == k
    assert result.gate_open_fraction < 0.5
    assert result.expected_nnz_at_projection < 0.55 * base.n_params


@pytest.mark.parametrize("method", ["l0", "dense", "grad", "random"])
def test_every_mask_method_trains_and_projects_to_exactly_k(method, sentiment, tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    seen: list[Progress] = []
    config = fast_config(mask_method=method, epochs=2, fix_epochs=2)
    result = train_diff(sentiment, config, base=base, progress=seen.append)
    k = k_for_density(0.05, base.n_params)
    assert result.diff.nnz == k == result.diff.meta.nnz
    assert [p.phase for p in seen] == ["prune"] * 40 + ["fix"] * 40
    assert seen[-1].expected_nnz == k
    assert result.diff.meta.config["mask_method"] == method
    if method == "l0":
        assert 0.0 <= result.gate_open_fraction <= 1.0
    else:
        assert result.gate_open_fraction is None
        expected = base.n_params if method == "dense" else 0
        assert seen[0].expected_nnz == expected
    if method != "random":  # k random positions of a tiny random BERT may not carry the task
        assert result.metrics["accuracy"] >= 0.6  # chance is 0.5


def test_random_and_gradient_masks_depend_on_their_seed_and_scores(small_sentiment, tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    runs = {
        (method, seed): train_diff(
            small_sentiment,
            fast_config(mask_method=method, epochs=1, fix_epochs=1, seed=seed),
            base=base,
        ).diff
        for method in ("grad", "random")
        for seed in (0, 1)
    }

    def positions(diff):
        return {(n, int(i)) for n, idx in diff.indices.items() for i in idx}

    assert positions(runs["random", 0]) != positions(runs["random", 1])
    assert positions(runs["grad", 0]) != positions(runs["random", 0])


# ---------------------------------------------------------------- run length


def test_auto_run_length_follows_the_data_size_within_bounds():
    default = DiffPruneConfig()  # batch 32, gates on plain SGD: the measured 1 + 5 epochs
    assert run_steps(500, default) == (16, 80)
    assert run_steps(40, default) == (2, 10)
    assert run_steps(32 * 1_000, default) == (1_000, 4_000)
    assert run_steps(32 * 10_000, default) == (AUTO_MAX_PRUNE_STEPS, AUTO_MAX_FIX_STEPS)
    config = DiffPruneConfig(alpha_optimizer="sign")  # gates that close need their steps
    assert gate_closing_steps(config) == 50  # from α = 5 to the closed logit 0 at 0.1 per step
    assert min_prune_steps(config) == 50
    assert run_steps(500, config) == (50, 80)  # 16 steps/epoch: the gated minimum, 5 epochs
    assert run_steps(40, config) == (50, max(AUTO_MIN_FIX_STEPS, 10))
    assert run_steps(32 * 10_000, config) == (AUTO_MAX_PRUNE_STEPS, AUTO_MAX_FIX_STEPS)
    sign = {"alpha_optimizer": "sign"}
    assert run_steps(500, DiffPruneConfig(alpha_init=2.0, alpha_lr=0.4, **sign)) == (16, 80)
    assert run_steps(500, DiffPruneConfig(alpha_init=2.0, alpha_lr=0.1, **sign)) == (20, 80)
    # AdamW's step on the tiny steady penalty is below alpha_lr: its gates need longer
    assert min_prune_steps(DiffPruneConfig(alpha_optimizer="adamw")) > min_prune_steps(config)


def test_explicit_epochs_and_steps_win_over_auto_exactly():
    assert run_steps(500, DiffPruneConfig(epochs=1, fix_epochs=5)) == (16, 80)
    assert run_steps(500, DiffPruneConfig(epochs=2)) == (32, 80)  # the other phase stays auto
    assert run_steps(500, DiffPruneConfig(epochs=0, fix_epochs=1)) == (0, 16)
    assert run_steps(500, DiffPruneConfig(epochs=1, prune_steps=7, fix_steps=3)) == (7, 3)
    with pytest.raises(ValueError, match="epochs"):
        DiffPruneConfig(epochs=0, fix_epochs=0)


def test_auto_run_length_is_used_and_recorded(small_sentiment, tiny_base_dir):
    base = load_base(str(tiny_base_dir))
    config = fast_config(  # sign gates from α = 1: a gated minimum of 10 steps
        epochs=None, fix_epochs=None, alpha_init=1.0, alpha_optimizer="sign"
    )
    fix = max(AUTO_MIN_FIX_STEPS, 5 * steps_per_epoch(small_sentiment.train.rows, config))
    seen: list[Progress] = []
    result = train_diff(small_sentiment, config, base=base, progress=seen.append)
    assert (result.prune_steps, result.fix_steps) == (10, fix)
    assert [p.phase for p in seen] == ["prune"] * 10 + ["fix"] * fix
    assert result.diff.meta.config["prune_steps"] == 10
    assert result.diff.meta.config["fix_steps"] == fix
    assert result.diff.meta.config["epochs"] is None


@pytest.mark.parametrize(
    "changes",
    [{"alpha_optimizer": "adamw"}, {"mask_method": "grad"}, {"mask_method": "dense"}],
    ids=["adamw", "grad", "dense"],
)
def test_resume_reproduces_every_alpha_optimizer_and_mask_method(
    changes, small_sentiment, tiny_base_dir
):
    base = load_base(str(tiny_base_dir))
    config = fast_config(epochs=2, fix_epochs=2, batch_size=8, grad_accum=2, checkpoint_every=2)
    config = DiffPruneConfig.from_dict({**config.to_dict(), **changes})
    reference = train_diff(small_sentiment, config, base=base)
    store = MemoryCheckpoint()
    steps: list[int] = []
    with pytest.raises(TrainingCancelled):
        train_diff(
            small_sentiment,
            config,
            base=base,
            checkpoint=store,
            progress=lambda p: steps.append(p.step),
            should_stop=lambda: bool(steps) and steps[-1] >= 5,
        )
    resumed = train_diff(small_sentiment, config, base=base, checkpoint=store)
    assert_same_diff(resumed.diff, reference.diff)
    assert resumed.metrics == reference.metrics


def test_the_sign_step_spreads_the_closing_distance_over_a_long_gated_phase():
    config = DiffPruneConfig()  # α from 5 to the closed logit 0
    assert sign_step_size(config, 50) == pytest.approx(0.1)  # alpha_lr: closes exactly at 50
    assert sign_step_size(config, 20) == pytest.approx(0.1)  # never above alpha_lr
    assert sign_step_size(config, 500) == pytest.approx(0.01)
    assert sign_step_size(config, 0) == pytest.approx(0.1)
