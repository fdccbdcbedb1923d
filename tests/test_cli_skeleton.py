"""The `diffbank` command exists and answers --help."""

import subprocess
import sys


def test_diffbank_help_lists_commands():
    out = subprocess.run(
        [sys.executable, "-m", "cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "diffbank" in out.stdout


def test_settings_refuse_placeholder_secret_in_production(monkeypatch):
    import pytest

    from settings import Settings

    monkeypatch.setenv("DIFFBANK_ENV", "production")
    with pytest.raises(ValueError, match="DIFFBANK_SECRET_KEY"):
        Settings()
