"""Consolidation runs end to end in process: registry, store, data, fit, judge, publish, report;
and the schedule policy that starts runs by itself.

Real parts: migrated SQLite registry, file object store, real Redis (policy enqueue), the tiny
random BERT. Current versions are the base with a head fitted on the base's features plus a
small random diff, published against a real (never run) training job, so the runner finds
each task's dataset the way it does in production.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from diffs.apply import apply_diff
from diffs.basemodel import load_base
from diffs.build import diff_from_dense
from diffs.read import loads_artifact
from diffs.types import ArtifactMeta
from diffs.write import dumps_artifact
from registry import catalog
from registry.db import get_session_factory
from registry.models import ConsolidationRun, Task, TaskVersion
from registry.publish import publish_version
from registry.stores import checkpoint_key, open_store
from settings import Settings
from tests.fixtures.services import seed_training_job
from worker.beat import consolidation_beat_schedule, parse_schedule
from worker.consolidation.job import run_consolidation
from worker.consolidation.policy import apply_consolidation_policy, total_stored_entries
from worker.lifecycle import SUCCEEDED, load_job_data

TENANT = "acme"
TASKS = {"reviews": 60, "fewshot": 30}  # the second one is low-resource
FAST = {"epochs": 0.5, "fix_epochs": 0.5, "batch_size": 16, "max_length": 8}
WORDS = {"pos": ("great", "lovely", "superb"), "neg": ("awful", "dreadful", "poor")}


def _write_task(path: Path, rows: int, seed: int) -> Path:
    """Rows whose label is carried by one repeated word: easy to fit on any base's features."""
    rng = random.Random(seed)
    lines = []
    for i in range(rows):
        label = "pos" if i % 2 == 0 else "neg"
        word = rng.choice(WORDS[label])
        lines.append(json.dumps({"text": f"{word} {word}", "label": label}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_base_dir, redis_server) -> Settings:
    root = tmp_path_factory.mktemp("consolidation-runner")
    return Settings(
        data_dir=root / "data",
        base_model=str(tiny_base_dir),
        redis_url=redis_server.url,
        checkpoint_every_steps=2,
        job_progress_interval_s=0.0,
        job_cancel_poll_s=0.0,
        job_heartbeat_interval_s=0.2,
        worker_device="cpu",
    )


def _fitted_head_diff(base, data, *, seed: int):
    """A current version: a head fitted (full batch, Adam) on the base's pooled features + a tiny diff."""
    from worker.kit.batching import encode_rows, label_tensor

    torch.manual_seed(seed)
    batch = encode_rows(base, data.train, list(range(data.train.rows)), 8, "cpu")
    with torch.no_grad():
        features = base.encoder(**batch).pooler_output
    labels = label_tensor(data.train, data.task_type)
    head = torch.nn.Linear(features.shape[1], data.num_labels)
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(200):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head(features), labels).backward()
        optimizer.step()
    generator = torch.Generator().manual_seed(seed)
    deltas = {
        name: (torch.rand(p.shape, generator=generator) < 0.002) * 1e-3
        for name, p in base.encoder.named_parameters()
    }
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type=data.task_type,
        label_names=list(data.label_names),
        max_length=8,
    )
    return diff_from_dense(
        deltas,
        {"classifier.weight": head.weight.detach(), "classifier.bias": head.bias.detach()},
        meta,
    )


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory, tiny_base_dir):
    """Two tasks of tenant acme on the tiny base, each with one published version."""
    base = load_base(str(tiny_base_dir))
    sessions = get_session_factory(settings)
    store = open_store(settings.store_url, settings)
    root = tmp_path_factory.mktemp("datasets")
    for i, (task, rows) in enumerate(TASKS.items()):
        path = _write_task(root / f"{task}.jsonl", rows, seed=i)
        job_id = seed_training_job(settings, path, task=task, tenant=TENANT)
        with sessions() as session:
            job = catalog.load_job(session, job_id=job_id)
            data = load_job_data(session, store, job, settings, seed=0)
            base_row = catalog.register_base_model(
                session,
                name=base.name,
                source=str(tiny_base_dir),
                fingerprint=base.fingerprint,
                n_params=base.n_params,
            )
            task_row = catalog.get_or_create_task(
                session,
                tenant_id=job.tenant_id,
                name=task,
                base_model_id=base_row.id,
                task_type=data.task_type,
                label_names=list(data.label_names),
            )
            diff = _fitted_head_diff(base, data, seed=i)
            publish_version(
                session,
                store,
                task_id=task_row.id,
                diff_bytes=dumps_artifact(diff),
                nnz=diff.nnz,
                density=diff.meta.density,
                metrics={},
                config={},
                source_job_id=job_id,
            )
    with sessions() as session:
        tenant_id = catalog.get_or_create_tenant(session, name=TENANT).id
    return {"base": base, "sessions": sessions, "store": store, "tenant_id": tenant_id}


def _new_run(world, settings, *, budget: int, tolerance: float, params: dict) -> ConsolidationRun:
    with world["sessions"]() as session:
        return catalog.create_consolidation_run(
            session,
            tenant_id=world["tenant_id"],
            base_model=world["base"].name,
            budget=budget,
            task_names=list(TASKS),
            tolerance=tolerance,
            params=params,
        )


def _versions(world, name: str) -> list[TaskVersion]:
    with world["sessions"]() as session:
        return catalog.list_task_versions(session, tenant_id=world["tenant_id"], name=name)


def test_rejected_tasks_keep_their_current_version_untouched(world, settings):
    """A destructive re-fit (huge learning rates) loses accuracy; with tolerance 0 it is refused."""
    current = {name: _versions(world, name)[-1] for name in TASKS}
    destructive = {**FAST, "lr": 1.0, "fix_lr": 1.0, "head_lr": 1.0}
    run = _new_run(world, settings, budget=2000, tolerance=0.0, params=destructive)
    assert run_consolidation(run.id, settings=settings) == SUCCEEDED
    with world["sessions"]() as session:
        run = catalog.load_consolidation_run(session, run_id=run.id)
    rejected = [row for row in run.report["tasks"] if not row["accepted"]]
    assert rejected, run.report["tasks"]
    for row in rejected:
        assert row["metric_after"] < row["metric_before"]
        versions = _versions(world, row["task"])
        assert versions[-1].id == current[row["task"]].id
        assert all(v.consolidation_run_id != run.id for v in versions)
        old = current[row["task"]].artifact
        assert world["store"].get(old.object_key, sha256=old.sha256)
        with world["sessions"]() as session:
            task = catalog.get_task(session, tenant_id=world["tenant_id"], name=row["task"])
            assert task.active_version == current[row["task"]].number
    if len(rejected) == len(TASKS):
        assert run.shared_artifact_id is None
        assert run.total_nnz_after == run.total_nnz_before


@pytest.fixture(scope="module")
def accepted_run(world, settings):
    """A run every task accepts (tolerance 100 points)."""
    before = {name: _versions(world, name)[-1] for name in TASKS}
    run = _new_run(world, settings, budget=3000, tolerance=100.0, params=FAST)
    outcome = run_consolidation(run.id, settings=settings)
    with world["sessions"]() as session:
        run = catalog.load_consolidation_run(session, run_id=run.id)
    return outcome, run, before


def test_run_publishes_accepted_versions_with_lineage_and_a_report(accepted_run, world, settings):
    outcome, run, before = accepted_run
    assert outcome == SUCCEEDED and run.job.state == "succeeded"
    report = run.report
    assert [row["task"] for row in report["tasks"]] == list(TASKS)
    for row in report["tasks"]:
        assert row["accepted"] is True
        assert row["version_after"] == before[row["task"]].number + 1
        assert 0.0 <= row["metric_before"] <= 1.0 and 0.0 <= row["metric_after"] <= 1.0
        assert row["bytes"] > 0 and row["nnz"] >= 0
    # shared + residuals fill the budget exactly; nothing else stays stored for these tasks
    assert report["shared_nnz"] + sum(r["nnz"] for r in report["tasks"]) == 3000
    assert run.total_nnz_after == 3000
    assert run.total_nnz_before == total_stored_entries(list(before.values()))
    assert run.shared_artifact_id is not None
    for name in TASKS:
        new = _versions(world, name)[-1]
        assert new.number == before[name].number + 1 and new.consolidation_run_id == run.id
        assert new.parent_version_id == before[name].id
        assert new.shared_artifact_id == run.shared_artifact_id
        assert new.residual_artifact_id is not None and new.source_job_id is None
        # the version stores its residual only: one blob, the composed diff built on request
        assert new.artifact_id == new.residual_artifact_id
        with world["sessions"]() as session:
            task = catalog.get_task(session, tenant_id=world["tenant_id"], name=name)
            assert task.active_version == new.number
    assert world["store"].get_mutable(checkpoint_key(run.job_id)) is None


def _read(world, artifact):
    base = world["base"]
    return loads_artifact(
        world["store"].get(artifact.object_key, sha256=artifact.sha256),
        expected_fingerprint=base.fingerprint,
        base_shapes=base.shapes,
    )


def test_published_version_composes_to_shared_plus_residual(accepted_run, world):
    from registry.layouts import version_diff

    _, run, _ = accepted_run
    base = world["base"]
    new = _versions(world, "fewshot")[-1]
    residual = _read(world, new.artifact)
    with world["sessions"]() as session, session.begin():
        shared = _read(world, session.get(type(new.artifact), new.shared_artifact_id))
    composed = version_diff(world["store"], new, expected_fingerprint=base.fingerprint)
    assert residual.meta.extra["consolidation"]["role"] == "residual" and residual.head
    assert composed.meta.extra["consolidation"]["role"] == "composed"
    assert composed.meta.extra["consolidation"]["run_id"] == run.id
    in_turn, merged = copy.deepcopy(base.encoder), copy.deepcopy(base.encoder)
    apply_diff(in_turn, shared)
    apply_diff(in_turn, residual)
    apply_diff(merged, composed)
    for (name, a), (_, b) in zip(
        in_turn.named_parameters(), merged.named_parameters(), strict=True
    ):
        # fp16 values: fp16(s) + fp16(r) vs fp16(s + r)
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5, msg=name)


def test_blobs_a_run_publishes_hold_at_most_the_budget_with_the_shared_part_stored_once(
    accepted_run, world
):
    from registry.models import Artifact

    _, run, _ = accepted_run
    versions = [
        v for name in TASKS for v in _versions(world, name) if v.consolidation_run_id == run.id
    ]
    assert len(versions) == len(TASKS)
    assert {v.shared_artifact_id for v in versions} == {run.shared_artifact_id}
    published = {run.shared_artifact_id} | {v.artifact_id for v in versions}
    published |= {v.residual_artifact_id for v in versions}
    assert len(published) == 1 + len(TASKS)  # the shared blob once, one residual per task
    with world["sessions"]() as session, session.begin():
        rows = [session.get(Artifact, artifact_id) for artifact_id in sorted(published)]
    stored = sum(_read(world, row).nnz for row in rows)
    assert stored <= run.report["budget_entries"] == 3000
    assert stored == run.report["published_entries"]
    assert run.report["published_bytes"] == sum(row.size_bytes for row in rows)
    shared_row = next(row for row in rows if row.id == run.shared_artifact_id)
    assert run.report["shared_bytes"] == shared_row.size_bytes
    for version, row in zip(versions, run.report["tasks"], strict=True):
        assert row["bytes"] == version.artifact.size_bytes  # what the task stores: its residual


def test_a_published_version_records_the_sha256_and_size_its_download_returns(accepted_run, world):
    from registry.layouts import download_digest, version_diff_bytes

    for name in TASKS:  # each accepted by the run
        new = _versions(world, name)[-1]
        data = version_diff_bytes(world["store"], new)  # composed from the stored parts
        assert download_digest(new) == (hashlib.sha256(data).hexdigest(), len(data))
        assert download_digest(new).sha256 != new.artifact.sha256  # not the residual's


def test_gc_keeps_the_shared_and_residual_blobs_a_version_references(accepted_run, world):
    from registry.gc import gc
    from registry.layouts import version_diff_bytes

    _, run, _ = accepted_run
    with world["sessions"]() as session:
        report = gc(session, world["store"], grace_s=0.0)
    new = _versions(world, "reviews")[-1]
    kept = {new.artifact.object_key, new.shared_artifact.object_key}
    assert not kept & set(report.deleted_blobs)
    assert loads_artifact(version_diff_bytes(world["store"], new)).nnz > 0


def test_schedule_policy_fires_only_above_the_threshold(
    accepted_run, world, settings, redis_server
):
    import redis

    def runs() -> int:
        with world["sessions"]() as session, session.begin():
            return session.scalar(select(func.count()).select_from(ConsolidationRun))

    with world["sessions"]() as session, session.begin():
        active = (
            session.execute(
                select(TaskVersion)
                .join(Task, TaskVersion.task_id == Task.id)
                .where(TaskVersion.number == Task.active_version)
            )
            .scalars()
            .unique()
            .all()
        )
    total = total_stored_entries(list(active))
    queue = redis.Redis.from_url(redis_server.url)
    queue.delete("consolidate")
    before = runs()

    at_threshold = settings.model_copy(update={"consolidation_budget_nnz": total})
    assert apply_consolidation_policy(at_threshold) == []
    assert runs() == before and queue.llen("consolidate") == 0

    # Grouping as permissive as it gets (any shared position groups), so only the threshold decides;
    # tests/test_interference.py specifies which tasks group.
    below = settings.model_copy(
        update={
            "consolidation_budget_nnz": total - 1,
            "consolidation_group_alpha": 1.0,
            "consolidation_group_min_sign_agreement": 0.0,
            "consolidation_group_min_overlap_lift": 0.0,
        }
    )
    started = apply_consolidation_policy(below)
    assert len(started) == 1 and runs() == before + 1
    assert queue.llen("consolidate") == 1
    with world["sessions"]() as session:
        run = catalog.load_consolidation_run(session, run_id=started[0])
    assert run.trigger == "schedule" and run.budget == total - 1
    assert sorted(run.task_names) == sorted(TASKS)
    # while that run is queued, the next tick starts nothing
    assert apply_consolidation_policy(below) == []
    assert runs() == before + 1 and queue.llen("consolidate") == 1
    queue.delete("consolidate")


def test_schedule_setting_parses_every_and_cron_and_rejects_garbage(settings):
    from celery.schedules import crontab

    assert parse_schedule("") is None
    assert parse_schedule("every 3600") == 3600.0
    assert isinstance(parse_schedule("0 3 * * 0"), crontab)
    for bad in ("every -1", "hourly", "0 3 * *", "99 3 * * *"):
        with pytest.raises(ValueError):
            parse_schedule(bad)
    on = settings.model_copy(
        update={"consolidation_schedule": "every 60", "consolidation_budget_nnz": 10}
    )
    entry = consolidation_beat_schedule(on)["consolidation-policy"]
    assert entry["task"] == "diffbank.consolidation_policy" and entry["schedule"] == 60.0
    assert consolidation_beat_schedule(settings) == {}


def test_unknown_run_is_not_claimed(settings, world):
    from worker.lifecycle import NOT_CLAIMED

    assert run_consolidation(999_999, settings=settings) == NOT_CLAIMED


def test_finished_run_reads_back_through_the_api_and_renders_in_the_cli(
    accepted_run, world, settings
):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from cli.consolidate import format_table, summary

    _, run, _ = accepted_run
    with world["sessions"]() as session:
        _, key = catalog.create_api_key(session, tenant_id=world["tenant_id"], scopes=["admin"])
    client = TestClient(create_app(settings))
    body = client.get(f"/v1/consolidations/{run.id}", headers={"Authorization": f"Bearer {key}"})
    assert body.status_code == 200, body.text
    view = body.json()
    assert view["state"] == "succeeded" and view["total_nnz_after"] == 3000
    assert [t["task"] for t in view["tasks"]] == list(TASKS)
    printed = summary(view)
    assert printed["tasks"][0].keys() >= {
        "task",
        "metric_before",
        "metric_after",
        "nnz",
        "accepted",
    }
    table = format_table(view)
    assert "reviews" in table and "fewshot" in table and "-> 3000" in table


def test_a_run_over_consolidated_versions_starts_from_their_composed_diffs(
    accepted_run, world, settings
):
    """The current diff of a version that stores only its residual is shared + residual."""
    _, first, _ = accepted_run
    previous = {row["task"]: row for row in first.report["tasks"]}
    current = {name: _versions(world, name)[-1] for name in TASKS}
    with world["sessions"]() as session:  # the policy test left a run queued
        for job, _ in catalog.active_jobs(session, tenant_id=world["tenant_id"]):
            catalog.request_cancel(session, tenant_id=world["tenant_id"], job_id=job.id)
    run = _new_run(world, settings, budget=3000, tolerance=100.0, params=FAST)
    assert run_consolidation(run.id, settings=settings) == SUCCEEDED
    with world["sessions"]() as session:
        run = catalog.load_consolidation_run(session, run_id=run.id)
    for row in run.report["tasks"]:
        # scored on the composed diff the first run accepted, not on its residual alone
        assert row["metric_before"] == pytest.approx(previous[row["task"]]["metric_after"])
        assert row["nnz_before"] == previous[row["task"]]["nnz"]
        assert row["bytes_before"] == current[row["task"]].artifact.size_bytes
    assert run.total_nnz_before == first.total_nnz_after == 3000
