"""Command-line flags made from a method config's fields: help, type and choices from the
config's field metadata (`worker.kit.config.option`)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

from worker.kit.config import MethodConfig


def add_config_flags(
    parser: argparse.ArgumentParser,
    config_class: type[MethodConfig],
    fields: Sequence[dataclasses.Field],
) -> None:
    """One flag per field (`--fix-lr` for `fix_lr`, None when not given); help and default
    from the config."""
    for spec in fields:
        text = spec.metadata["help"]
        if isinstance(spec.default, float):
            text += f" (default {spec.default:g})"
        elif spec.default not in (None, ""):
            text += f" (default {spec.default})"
        flag = "--" + spec.name.replace("_", "-")
        choices = spec.metadata.get("choices")
        parser.add_argument(
            flag,
            type=config_class.value_type(spec.name),
            choices=choices,
            help=text.replace("%", "%%"),
        )


def given_flags(args: argparse.Namespace, fields: Sequence[dataclasses.Field]) -> dict:
    """The values of the fields' flags that were given on the command line."""
    return {
        spec.name: getattr(args, spec.name)
        for spec in fields
        if getattr(args, spec.name) is not None
    }
