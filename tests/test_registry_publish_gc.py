"""Write order (upload -> verify -> one transaction) under failures at every step, and gc.

Whatever fails, no row points at a missing blob; gc removes the orphans and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import event, select

from registry import catalog
from registry.gc import gc
from registry.models import Artifact, TaskVersion
from registry.publish import publish_version
from registry.stores import FileStore, ObjectIntegrityError, StoredObject, checkpoint_key

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def objects(tmp_path):
    return FileStore(tmp_path / "objects")


@pytest.fixture
def task(session):
    tenant = catalog.get_or_create_tenant(session, name="acme")
    base = catalog.register_base_model(
        session, name="tiny", source="/m", fingerprint="f" * 64, n_params=10
    )
    return catalog.get_or_create_task(
        session,
        tenant_id=tenant.id,
        name="sst",
        base_model_id=base.id,
        task_type="classification",
        label_names=["a", "b"],
    )


def publish(session, store, task_id, payload: bytes, **fields):
    return publish_version(
        session,
        store,
        task_id=task_id,
        diff_bytes=payload,
        nnz=1,
        density=0.5,
        metrics={"accuracy": 1.0},
        config={},
        **fields,
    )


def content_key_of(store, payload: bytes) -> str:
    return store.content_key("artifacts", hashlib.sha256(payload).hexdigest(), ".safetensors")


def assert_every_row_has_its_blob(session, store) -> None:
    with catalog.transaction(session):
        artifacts = list(session.scalars(select(Artifact)))
    for artifact in artifacts:
        assert store.get(artifact.object_key, sha256=artifact.sha256)  # present and intact


def version_count(session) -> int:
    with catalog.transaction(session):
        return len(list(session.scalars(select(TaskVersion.id))))


def test_upload_failure_leaves_no_row_and_no_blob(session, objects, task, monkeypatch):
    def broken_put(key, data, *, sha256=None):
        raise OSError("disk full")

    monkeypatch.setattr(objects, "put", broken_put)
    with pytest.raises(OSError, match="disk full"):
        publish(session, objects, task.id, b"diff")
    assert version_count(session) == 0
    assert list(objects.list()) == []


def test_verify_failure_leaves_no_row_and_gc_removes_the_blob(session, objects, task, monkeypatch):
    real_head = objects.head

    def corrupt_head(key):
        found = real_head(key)
        return StoredObject(key=key, sha256="0" * 64, size=found.size)  # read back wrong

    monkeypatch.setattr(objects, "head", corrupt_head)
    with pytest.raises(ObjectIntegrityError, match="artifacts/"):
        publish(session, objects, task.id, b"diff")
    monkeypatch.undo()
    assert version_count(session) == 0
    orphan = content_key_of(objects, b"diff")
    assert list(objects.list()) == [orphan]
    report = gc(session, objects, grace_s=0)
    assert report.deleted_blobs == [orphan]
    assert list(objects.list()) == []


def test_commit_failure_leaves_no_row_and_gc_removes_the_blob(session, objects, task):
    kept = publish(session, objects, task.id, b"published")

    def fail_commit(_session):
        raise RuntimeError("database went away at commit")

    event.listen(session, "before_commit", fail_commit)
    try:
        with pytest.raises(RuntimeError, match="went away"):
            publish(session, objects, task.id, b"orphan")
    finally:
        event.remove(session, "before_commit", fail_commit)
    assert version_count(session) == 1
    assert_every_row_has_its_blob(session, objects)
    report = gc(session, objects, grace_s=0)
    assert report.deleted_blobs == [content_key_of(objects, b"orphan")]
    assert list(objects.list()) == [kept.artifact.object_key]
    assert_every_row_has_its_blob(session, objects)


KILLED_PUBLISHER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from sqlalchemy import event, func, select
    from sqlalchemy.orm import Session
    from registry.db import make_engine, make_session_factory
    from registry.models import TaskVersion
    from registry.publish import publish_version
    from registry.stores import FileStore

    db_url, store_root, task_id, marker = sys.argv[1:5]

    @event.listens_for(Session, "before_commit")
    def stall_inside_the_transaction(session):
        # Blob uploaded and verified, version row inserted but not committed: die here.
        inserted = session.scalar(select(func.count()).select_from(TaskVersion))
        Path(marker + ".tmp").write_text(f"uploaded, {inserted} uncommitted version row(s)")
        Path(marker + ".tmp").rename(marker)
        time.sleep(600)

    session = make_session_factory(make_engine(db_url))()
    publish_version(session, FileStore(store_root), task_id=int(task_id), diff_bytes=b"killed",
                    nnz=1, density=0.5, metrics={}, config={})
    """
)


def test_process_killed_after_upload_leaves_only_an_orphan_blob(
    session, objects, task, db_url, tmp_path
):
    marker = tmp_path / "uploaded.marker"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            KILLED_PUBLISHER,
            db_url,
            str(objects.root),
            str(task.id),
            str(marker),
        ],
        cwd=REPO_ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "publisher died before uploading"
            assert time.monotonic() < deadline, "publisher never uploaded"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert marker.read_text() == "uploaded, 1 uncommitted version row(s)"
    orphan = content_key_of(objects, b"killed")
    assert objects.head(orphan) is not None
    assert version_count(session) == 0
    assert gc(session, objects, grace_s=3600).deleted_blobs == []  # too young: maybe in flight
    assert gc(session, objects, grace_s=0).deleted_blobs == [orphan]
    assert list(objects.list()) == []


def test_gc_touches_only_orphan_blobs_and_finished_jobs_checkpoints(session, objects, task):
    tenant_id = task.tenant_id
    version = publish(session, objects, task.id, b"referenced")
    running = catalog.create_job(
        session, tenant_id=tenant_id, kind="train", base_model="tiny", params={}
    )
    catalog.claim_job(session, job_id=running.id, worker_id="w")
    finished = catalog.create_job(
        session, tenant_id=tenant_id, kind="train", base_model="tiny", params={}
    )
    catalog.request_cancel(session, tenant_id=tenant_id, job_id=finished.id)
    objects.put_mutable(checkpoint_key(running.id), b"resume me")
    objects.put_mutable(checkpoint_key(finished.id), b"stale")
    objects.put_mutable(checkpoint_key(99999), b"job never existed")
    objects.put_mutable("checkpoints/manual/keep.bin", b"not a job checkpoint")
    objects.put("notes/readme.txt", b"someone else's file")
    orphan = objects.put(content_key_of(objects, b"orphan"), b"orphan").key

    dry = gc(session, objects, dry_run=True, grace_s=0)
    assert dry.deleted_blobs == [orphan]
    assert sorted(dry.deleted_checkpoints) == sorted(
        [checkpoint_key(finished.id), checkpoint_key(99999)]
    )
    assert objects.head(orphan) is not None  # dry run deletes nothing

    report = gc(session, objects, grace_s=0)
    assert report.deleted_blobs == [orphan]
    assert sorted(objects.list()) == sorted(
        [
            version.artifact.object_key,
            checkpoint_key(running.id),
            "checkpoints/manual/keep.bin",
            "notes/readme.txt",
        ]
    )
    assert_every_row_has_its_blob(session, objects)
    assert gc(session, objects, grace_s=0).deleted_blobs == []  # idempotent


def test_gc_keeps_blobs_shared_by_a_remaining_row(session, objects, task):
    publish(session, objects, task.id, b"same")
    publish(session, objects, task.id, b"same")
    catalog.delete_task_version(session, objects, tenant_id=task.tenant_id, name="sst", number=1)
    assert gc(session, objects, grace_s=0).deleted_blobs == []
    assert_every_row_has_its_blob(session, objects)
    catalog.delete_task_version(session, objects, tenant_id=task.tenant_id, name="sst", number=2)
    assert list(objects.list()) == []


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
def test_gc_on_each_store_kind(session, store, task):
    kept = publish(session, store, task.id, b"kept")
    orphan = store.put(content_key_of(store, b"lost"), b"lost").key
    assert gc(session, store, grace_s=3600).deleted_blobs == []
    assert gc(session, store, grace_s=0).deleted_blobs == [orphan]
    assert list(store.list()) == [kept.artifact.object_key]


def test_delete_racing_an_identical_publish_leaves_the_new_version_its_blob(
    session, objects, task, monkeypatch
):
    publish(session, objects, task.id, b"same")
    real_head = objects.head
    raced: list[str] = []

    def head_then_delete_v1(key):
        found = real_head(key)
        if not raced:  # after the publisher's upload and read-back, before its commit
            raced.append(key)
            catalog.delete_task_version(
                session, objects, tenant_id=task.tenant_id, name="sst", number=1
            )
        return found

    monkeypatch.setattr(objects, "head", head_then_delete_v1)
    v2 = publish(session, objects, task.id, b"same")
    monkeypatch.undo()
    assert raced == [content_key_of(objects, b"same")]
    assert v2.number == 2
    assert_every_row_has_its_blob(session, objects)


@pytest.mark.parametrize("db_backend", ["sqlite"], indirect=True)
def test_gc_removes_upload_temp_files_a_crash_left_and_keeps_uploads_in_flight(
    session, objects, tmp_path
):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    stale, in_flight, other = (uploads / "upload-stale", uploads / "upload-now", uploads / "x")
    for path in (stale, in_flight, other):
        path.write_bytes(b"partial csv")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    os.utime(other, (old, old))

    dry = gc(session, objects, dry_run=True, grace_s=3600, upload_dir=uploads)
    assert dry.deleted_uploads == [str(stale)] and stale.exists()
    report = gc(session, objects, grace_s=3600, upload_dir=uploads)
    assert report.deleted_uploads == [str(stale)]
    assert sorted(p.name for p in uploads.iterdir()) == ["upload-now", "x"]
