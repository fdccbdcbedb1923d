"""The admin commands `db upgrade`, `keys create` and `gc`, run through the real CLI entry point."""

from __future__ import annotations

import hashlib
import json

import pytest

from cli import main
from registry import catalog
from registry.db import get_session_factory
from registry.stores import open_store
from settings import get_settings


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    """An embedded data directory for the CLI (SQLite + file store), settings re-read."""
    monkeypatch.setenv("DIFFBANK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DIFFBANK_DATABASE_URL", raising=False)
    monkeypatch.delenv("DIFFBANK_STORE_URL", raising=False)
    get_settings.cache_clear()
    yield get_settings()
    get_settings.cache_clear()


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_commands_refuse_a_database_that_was_never_upgraded(cli_env, capsys):
    code, _, err = run_cli(capsys, "keys", "create", "--tenant", "acme", "--json")
    assert code == 2
    assert "run `diffbank db upgrade`" in err


def test_keys_create_prints_a_working_key_as_json(cli_env, capsys):
    assert run_cli(capsys, "db", "upgrade")[0] == 0
    code, out, _ = run_cli(
        capsys, "keys", "create", "--tenant", "acme", "--scopes", "read,submit,admin", "--json"
    )
    assert code == 0
    printed = json.loads(out.strip().splitlines()[-1])
    assert set(printed) == {"key", "tenant", "scopes"}
    assert printed["tenant"] == "acme" and printed["scopes"] == ["admin", "read", "submit"]
    with get_session_factory(cli_env)() as session:
        tenant, scopes = catalog.authenticate_api_key(session, key=printed["key"])
    assert tenant.name == "acme" and scopes == ["admin", "read", "submit"]


def test_keys_create_with_an_unknown_scope_names_the_field(cli_env, capsys):
    run_cli(capsys, "db", "upgrade")
    code, out, err = run_cli(capsys, "keys", "create", "--tenant", "acme", "--scopes", "read,god")
    assert code == 2 and out == ""
    assert "scopes" in err and "god" in err


def test_gc_dry_run_reports_and_gc_deletes_orphans(cli_env, capsys):
    run_cli(capsys, "db", "upgrade")
    store = open_store(settings=cli_env)
    digest = hashlib.sha256(b"orphan").hexdigest()
    orphan = store.put(store.content_key("artifacts", digest, ".safetensors"), b"orphan").key
    code, out, _ = run_cli(capsys, "gc", "--dry-run", "--grace", "0", "--json")
    assert code == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["dry_run"] is True and report["deleted_blobs"] == [orphan]
    assert store.head(orphan) is not None
    code, out, _ = run_cli(capsys, "gc", "--grace", "0")
    assert code == 0 and f"deleted {orphan}" in out
    assert store.head(orphan) is None


def test_keys_list_shows_prefixes_and_revoke_stops_a_key(cli_env, capsys):
    run_cli(capsys, "db", "upgrade")
    key = json.loads(run_cli(capsys, "keys", "create", "--tenant", "acme", "--json")[1])["key"]
    run_cli(capsys, "keys", "create", "--tenant", "other", "--json")
    code, out, _ = run_cli(capsys, "keys", "list", "--tenant", "acme", "--json")
    assert code == 0
    [listed] = json.loads(out)["keys"]
    assert listed["prefix"] in key
    assert listed["tenant"] == "acme" and listed["revoked_at"] is None
    assert key not in out  # the key itself is never shown again
    assert len(json.loads(run_cli(capsys, "keys", "list", "--json")[1])["keys"]) == 2

    code, out, _ = run_cli(capsys, "keys", "revoke", str(listed["id"]))
    assert code == 0 and "revoked" in out
    with get_session_factory(cli_env)() as session:
        assert catalog.authenticate_api_key(session, key=key) is None
    code, _, err = run_cli(capsys, "keys", "revoke", "999999")
    assert code == 2 and "key_id" in err


def test_gc_removes_stale_upload_temp_files(cli_env, capsys):
    import os
    import time

    run_cli(capsys, "db", "upgrade")
    cli_env.upload_dir.mkdir(parents=True, exist_ok=True)
    stale = cli_env.upload_dir / "upload-crashed"
    stale.write_bytes(b"half a csv")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    code, out, _ = run_cli(capsys, "gc")
    assert code == 0 and f"deleted {stale}" in out
    assert not stale.exists()


def test_a_database_url_whose_driver_is_missing_is_one_line_naming_the_package(
    cli_env, capsys, monkeypatch
):
    from registry.db import engine_for_url

    monkeypatch.setenv("DIFFBANK_DATABASE_URL", "postgresql+pg8000://user@127.0.0.1/db")
    get_settings.cache_clear()
    engine_for_url.cache_clear()
    code, out, err = run_cli(capsys, "db", "upgrade")
    assert code == 2 and out == ""
    assert "pg8000" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
