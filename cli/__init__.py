"""The `diffbank` console script (also `python -m cli`): one argparse tree, a module per group."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Each module defines `register(subparsers)` adding its commands; a command sets
# `func=callable(args) -> int` with `set_defaults`. Modules import heavy code lazily,
# inside their command functions, so `diffbank --help` stays fast.
COMMAND_MODULES = [
    "cli.train",  # train
    "cli.inspect",  # inspect, export
    "cli.predict",  # predict FILE TEXT... | predict --task NAME TEXT...
    "cli.ops",  # up, demo, api, worker, beat
    "cli.admin",  # db upgrade, gc, keys create
    "cli.client",  # submit, jobs, job, tasks, pull
    "cli.consolidate",  # consolidate
    "cli.interference",  # interference
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser of the `diffbank` command."""
    parser = argparse.ArgumentParser(
        prog="diffbank",
        description="Continual task adaptation as sparse diffs against one shared encoder.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `diffbank` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from registry.db import DatabaseDriverMissingError

    try:
        return int(args.func(args) or 0)
    except DatabaseDriverMissingError as exc:  # a configuration error: one line, no traceback
        print(f"error: DIFFBANK_DATABASE_URL: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`diffbank inspect FILE | head`): stop quietly, like cat does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
