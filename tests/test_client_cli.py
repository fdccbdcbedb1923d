"""The client CLI against a real uvicorn server (SQLite + file store + real Redis).

`submit --wait` runs against a real Celery worker process training the tiny BERT.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cli import main as diffbank
from registry import catalog
from registry.db import make_engine, make_session_factory, upgrade
from tests.api_support import SENTIMENT_ROWS, jsonl, random_artifact, register_base

pytestmark = pytest.mark.services


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def server(service_env, api_server, tiny_base_dir, tmp_path):
    """A real API server with a tenant key; returns (url, key, session_factory, store)."""
    from registry.stores import open_store
    from settings import Settings

    upgrade(service_env["DIFFBANK_DATABASE_URL"])
    sessions = make_session_factory(make_engine(service_env["DIFFBANK_DATABASE_URL"]))
    with sessions() as session:
        tenant = catalog.get_or_create_tenant(session, name="cli-tenant")
        _, key = catalog.create_api_key(session, tenant_id=tenant.id, scopes=["read", "submit"])
    process = api_server(service_env)
    store = open_store(
        service_env["DIFFBANK_STORE_URL"],
        Settings(**{"data_dir": service_env["DIFFBANK_DATA_DIR"]}),
    )
    return {
        "url": process.url,
        "key": key,
        "sessions": sessions,
        "store": store,
        "tenant_id": tenant.id,
        "env": service_env,
    }


def _publish(server, tiny_base_dir: Path, task: str, seed: int) -> None:
    from diffs.read import loads_artifact
    from registry.publish import publish_version

    data = random_artifact(
        tiny_base_dir, seed=seed, task_type="classification", labels=("neg", "pos"), density=0.02
    )
    diff = loads_artifact(data)
    base_row = register_base(server["sessions"], tiny_base_dir)
    with server["sessions"]() as session:
        task_row = catalog.get_or_create_task(
            session,
            tenant_id=server["tenant_id"],
            name=task,
            base_model_id=base_row.id,
            task_type="classification",
            label_names=["neg", "pos"],
        )
        publish_version(
            session,
            server["store"],
            task_id=task_row.id,
            diff_bytes=data,
            nnz=diff.nnz,
            density=diff.meta.density,
            metrics={},
            config={},
        )


def test_submit_queues_a_job_that_jobs_job_and_tasks_show_and_errors_exit_non_zero(
    server, tmp_path, monkeypatch, capsys, tiny_base_dir
):
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(SENTIMENT_ROWS))
    conn = ["--url", server["url"], "--key", server["key"]]
    assert (
        diffbank(
            [
                "submit",
                str(data),
                "--task",
                "cli-task",
                "--density",
                "0.01",
                "--epochs",
                "2",
                "--fix-lr",
                "0.004",
                "--json",
                *conn,
            ]
        )
        == 0
    )
    submitted = _last_json(capsys.readouterr().out)
    assert submitted["state"] == "queued" and submitted["task"] == "cli-task"
    assert submitted["version"] is None and submitted["metrics"] == {}
    assert diffbank(["jobs", "--json", *conn]) == 0
    listed = _last_json(capsys.readouterr().out)
    assert [j["id"] for j in listed["items"]] == [submitted["job_id"]]
    assert diffbank(["job", str(submitted["job_id"]), "--json", *conn]) == 0
    assert _last_json(capsys.readouterr().out)["params"] == {
        "density": 0.01,
        "epochs": 2,
        "fix_lr": 0.004,
    }

    # A directory submits train.* and validation.* as two datasets of one job.
    folder = tmp_path / "task-dir"
    folder.mkdir()
    (folder / "train.jsonl").write_bytes(jsonl(SENTIMENT_ROWS))
    (folder / "validation.jsonl").write_bytes(jsonl(SENTIMENT_ROWS[:4]))
    assert diffbank(["submit", str(folder), "--task", "dir-task", "--json", *conn]) == 0
    job = _last_json(capsys.readouterr().out)
    assert diffbank(["job", str(job["job_id"]), "--json", *conn]) == 0
    shown = _last_json(capsys.readouterr().out)
    assert shown["validation_dataset_id"] not in (None, shown["dataset_id"])

    # The server and key may come from DIFFBANK_URL / DIFFBANK_API_KEY instead.
    _publish(server, tiny_base_dir, "env-task", seed=3)
    monkeypatch.setenv("DIFFBANK_URL", server["url"])
    monkeypatch.setenv("DIFFBANK_API_KEY", server["key"])
    assert diffbank(["tasks", "--json"]) == 0
    tasks = _last_json(capsys.readouterr().out)["items"]
    assert [(t["name"], t["active_version"]) for t in tasks] == [("env-task", 1)]
    assert diffbank(["tasks"]) == 0
    assert "env-task" in capsys.readouterr().out
    monkeypatch.delenv("DIFFBANK_API_KEY")

    # Errors print the server's message on stderr and exit non-zero.
    assert diffbank(["job", "424242", *conn]) == 1
    assert "job 424242 not found" in capsys.readouterr().err
    assert diffbank(["tasks"]) == 1
    assert "API key is required" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(jsonl([{"text": "only one class", "label": "pos"}] * 3))
    assert diffbank(["submit", str(bad), "--task", "t", *conn]) == 1
    assert "single_class" in capsys.readouterr().err


def test_pull_writes_the_verified_artifact_and_predict_agrees_locally_and_remotely(
    server, tiny_base_dir, tmp_path, capsys
):
    _publish(server, tiny_base_dir, "pulled", seed=5)
    conn = ["--url", server["url"], "--key", server["key"]]
    out = tmp_path / "pulled.safetensors"
    out.write_bytes(b"mine")  # a user's file: replaced only with --force
    assert diffbank(["pull", "pulled", "-o", str(out), *conn]) == 1
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"mine"
    out.unlink()
    assert diffbank(["pull", "pulled", "-o", str(out), "--json", *conn]) == 0
    pulled = _last_json(capsys.readouterr().out)
    assert pulled["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert pulled["version"] == 1 and pulled["bytes"] == out.stat().st_size
    assert diffbank(["pull", "pulled", "-o", str(out), "--force", *conn]) == 0
    capsys.readouterr()

    texts = ["a wonderful film", "a waste of time"]
    assert diffbank(["predict", "--task", "pulled", *texts, "--json", *conn]) == 0
    remote = _last_json(capsys.readouterr().out)["predictions"]
    assert diffbank(["predict", str(out), *texts, "--base", str(tiny_base_dir), "--json"]) == 0
    local = _last_json(capsys.readouterr().out)["predictions"]
    assert [p["label"] for p in remote] == [p["label"] for p in local]
    assert [p["score"] for p in remote] == pytest.approx([p["score"] for p in local], abs=1e-6)
    assert set(remote[0]) == {"label", "score"}


def test_submit_wait_shows_progress_and_ends_with_the_published_version(
    server, celery_worker, tmp_path, capsys
):
    celery_worker(server["env"], queues="train")
    data = tmp_path / "train.jsonl"
    data.write_bytes(jsonl(SENTIMENT_ROWS * 2))
    assert (
        diffbank(
            [
                "submit",
                str(data),
                "--task",
                "waited",
                "--epochs",
                "1",
                "--fix-epochs",
                "1",
                "--batch-size",
                "8",
                "--max-length",
                "16",
                "--density",
                "0.01",
                "--wait",
                "--poll",
                "0.3",
                "--json",
                "--url",
                server["url"],
                "--key",
                server["key"],
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    result = _last_json(captured.out)
    assert result["state"] == "succeeded", result
    assert result["task"] == "waited" and result["version"] == 1
    assert "accuracy" in result["metrics"]
    assert f"job {result['job_id']}" in captured.err  # the tqdm bar on stderr
