"""The object-store contract, run against the file store and an S3-protocol server (moto)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest

from registry.stores import (
    FileStore,
    InvalidObjectKey,
    ObjectConflictError,
    ObjectIntegrityError,
    ObjectNotFound,
    checkpoint_job_id,
    checkpoint_key,
    content_key,
    open_store,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_content(store, data: bytes, kind: str = "artifacts", suffix: str = ".bin") -> str:
    key = content_key(kind, sha(data), suffix)
    store.put(key, data, sha256=sha(data))
    return key


def test_content_key_is_sharded_by_sha256():
    digest = sha(b"x")
    assert content_key("artifacts", digest, ".safetensors") == (
        f"artifacts/{digest[:2]}/{digest[2:4]}/{digest}.safetensors"
    )
    with pytest.raises(ValueError):
        content_key("artifacts", "not-a-sha", "")
    with pytest.raises(ValueError):
        content_key("../etc", digest, "")


def test_checkpoint_keys_name_their_job():
    assert checkpoint_key(42) == "checkpoints/jobs/42/state.pt"
    assert checkpoint_job_id("checkpoints/jobs/42/state.pt") == 42
    assert checkpoint_job_id("checkpoints/other/file") is None


def test_put_then_get_round_trips_and_reports_size_and_sha(store):
    data = os.urandom(1000)
    key = content_key("artifacts", sha(data), ".bin")
    stored = store.put(key, data, sha256=sha(data))
    assert (stored.key, stored.sha256, stored.size) == (key, sha(data), 1000)
    assert store.get(key, sha256=sha(data)) == data
    head = store.head(key)
    assert head is not None and head.sha256 == sha(data) and head.size == 1000


def test_put_accepts_a_file_object(store):
    data = os.urandom(3000)
    key = content_key("datasets", sha(data), ".jsonl")
    stored = store.put(key, io.BytesIO(data))
    assert stored.sha256 == sha(data)
    assert store.get(key, sha256=sha(data)) == data


def test_put_with_wrong_sha256_is_refused_and_leaves_nothing(store):
    data = b"payload"
    key = content_key("artifacts", sha(data), ".bin")
    with pytest.raises(ObjectIntegrityError, match=key):
        store.put(key, data, sha256=sha(b"other"))
    assert store.head(key) is None
    assert list(store.list()) == []


def test_reputting_same_content_is_a_no_op(store):
    key = put_content(store, b"same bytes")
    store.put(key, b"same bytes", sha256=sha(b"same bytes"))
    assert list(store.list()) == [key]


def test_different_content_under_an_existing_key_is_a_conflict(store):
    key = put_content(store, b"original")
    with pytest.raises(ObjectConflictError, match=key):
        store.put(key, b"tampered")
    assert store.get(key, sha256=sha(b"original")) == b"original"


def test_get_with_wrong_expected_sha256_names_the_key(store):
    key = put_content(store, b"abc")
    with pytest.raises(ObjectIntegrityError, match=key):
        store.get(key, sha256=sha(b"abd"))


def test_full_stream_verifies_before_handing_out_any_byte(store):
    data = os.urandom(3 * 1024 * 1024 + 17)
    key = put_content(store, data)
    assert b"".join(store.open(key, sha256=sha(data))) == data
    with pytest.raises(ObjectIntegrityError, match=key):
        store.open(key, sha256=sha(b"wrong"))


def test_range_reads_return_the_exact_slice(store):
    data = bytes(range(256)) * 40
    key = put_content(store, data)
    assert b"".join(store.open(key, sha256=sha(data), start=10, end=20)) == data[10:20]
    assert b"".join(store.open(key, sha256=sha(data), start=10000)) == data[10000:]
    assert b"".join(store.open(key, sha256=sha(data), start=5, end=5)) == b""


def test_missing_object_is_not_found(store):
    digest = sha(b"nothing")
    key = content_key("artifacts", digest, "")
    assert store.head(key) is None
    with pytest.raises(ObjectNotFound, match=key):
        store.get(key, sha256=digest)
    store.delete(key)  # absent: fine


def test_delete_removes_only_that_object(store):
    a = put_content(store, b"a")
    b = put_content(store, b"b")
    store.delete(a)
    assert store.head(a) is None
    assert list(store.list()) == [b]


def test_list_and_scan_filter_by_prefix(store):
    a = put_content(store, b"a", kind="artifacts")
    d = put_content(store, b"d", kind="datasets")
    assert sorted(store.list()) == sorted([a, d])
    assert list(store.list("datasets/")) == [d]
    scanned = {o.key: o for o in store.scan()}
    assert set(scanned) == {a, d}
    assert scanned[a].size == 1 and scanned[a].modified_at is not None


@pytest.mark.parametrize(
    "key",
    [
        "../escape",
        "a/../../etc/passwd",
        "/abs/path",
        "a\\b",
        "nul\x00byte",
        "a//b",
        "./a",
        "",
        "a/.",
    ],
)
def test_keys_that_could_escape_the_store_are_rejected(store, key):
    with pytest.raises(InvalidObjectKey):
        store.put(key, b"x")
    with pytest.raises(InvalidObjectKey):
        store.head(key)
    with pytest.raises(InvalidObjectKey):
        store.delete(key)


def test_mutable_checkpoints_can_be_overwritten(store):
    key = checkpoint_key(7)
    assert store.get_mutable(key) is None
    store.put_mutable(key, b"step 1")
    store.put_mutable(key, b"step 2")
    assert store.get_mutable(key) == b"step 2"


def test_mutable_writes_outside_checkpoints_are_refused(store):
    with pytest.raises(InvalidObjectKey, match="checkpoints/"):
        store.put_mutable("artifacts/x", b"data")


def test_presign_gives_a_url_on_s3_and_none_on_files(store, store_backend):
    data = b"downloadable"
    key = put_content(store, data)
    url = store.presign(key, 60)
    if store_backend == "file":
        assert url is None
        return
    import httpx

    assert url is not None and "Signature" in url
    assert httpx.get(url).content == data


def test_tampered_file_on_disk_is_detected_on_read(tmp_path):
    store = FileStore(tmp_path / "objects")
    data = b"genuine bytes"
    key = put_content(store, data)
    path = tmp_path / "objects" / key
    os.chmod(path, 0o644)
    path.write_bytes(b"evil bytes!!!")
    with pytest.raises(ObjectIntegrityError, match=key):
        store.get(key, sha256=sha(data))
    with pytest.raises(ObjectIntegrityError, match=key):
        store.open(key, sha256=sha(data))


def test_file_store_leaves_no_temp_files_and_hides_its_temp_dir(tmp_path):
    store = FileStore(tmp_path / "objects")
    key = put_content(store, b"abc")
    with pytest.raises(ObjectIntegrityError):
        store.put(content_key("artifacts", sha(b"zzz"), ""), b"zzz", sha256=sha(b"yyy"))
    assert list((tmp_path / "objects" / ".tmp").iterdir()) == []
    assert list(store.list()) == [key]


def test_file_store_refuses_a_symlink_escape(tmp_path):
    root = tmp_path / "objects"
    store = FileStore(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "artifacts").symlink_to(outside)
    with pytest.raises(ValueError, match="escapes"):
        store.put("artifacts/x", b"data")
    assert list(outside.iterdir()) == []


@pytest.mark.services
def test_tampered_s3_object_is_detected_on_read(s3_store):
    store = s3_store
    data = b"genuine"
    key = put_content(store, data)
    store.client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=b"corrupt")
    with pytest.raises(ObjectIntegrityError, match=key):
        store.get(key, sha256=sha(data))
    with pytest.raises(ObjectIntegrityError, match=key):
        store.open(key, sha256=sha(data))


@pytest.mark.services
def test_large_s3_uploads_go_multipart_and_read_back(s3_store):
    store = s3_store
    data = os.urandom(6 * 1024 * 1024)  # threshold is 5 MiB in the fixture
    key = put_content(store, data)
    head = store.client.head_object(Bucket=store.bucket, Key=store.prefix + key)
    assert "-" in head["ETag"]  # multipart ETags end in -<parts>
    assert store.get(key, sha256=sha(data)) == data


@pytest.mark.services
def test_s3_client_has_explicit_retries_and_lenient_checksums(s3_store):
    config = s3_store.client.meta.config
    # botocore counts the first try too: max_attempts=2 retries -> 3 attempts in total.
    assert config.retries["mode"] == "standard"
    assert config.retries["total_max_attempts"] == 3
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"


def test_open_store_picks_the_backend_by_scheme(tmp_path):
    assert isinstance(open_store((tmp_path / "o").as_uri()), FileStore)
    with pytest.raises(ValueError, match="unsupported"):
        open_store("ftp://host/x")
    assert Path(open_store((tmp_path / "o").as_uri()).root) == (tmp_path / "o").resolve()
