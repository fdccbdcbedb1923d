"""Where commands write: never over a user's existing file or into a non-empty directory
unless `--force` says so. Checked before any work, so a refusal costs nothing."""

from __future__ import annotations

import argparse
from pathlib import Path

FORCE_HELP = "replace an existing output (a file, or the files of a non-empty directory)"


class OutputExistsError(ValueError):
    """The output is there already and `--force` was not given."""


def add_force_flag(parser: argparse.ArgumentParser) -> None:
    """The `--force` flag of a command that writes files."""
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)


def check_output_file(path: Path, *, force: bool, flag: str) -> None:
    """Refuse an output file that exists (unless `force`) or that is a directory."""
    if path.is_dir():
        raise OutputExistsError(f"{flag} {path} is a directory; name a file")
    if path.exists() and not force:
        raise OutputExistsError(f"{flag} {path} exists; pass --force to replace it")


def check_output_dir(path: Path, *, force: bool) -> None:
    """Refuse an output directory that is a file, or non-empty (unless `force`)."""
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not force:
        raise OutputExistsError(
            f"{path} is not empty; pass --force to write into it (files of the same names "
            "are replaced)"
        )
