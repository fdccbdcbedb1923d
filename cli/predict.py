"""`predict`: run a diff artifact locally (library mode) or ask a server (`--task`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cli.client import add_connection_args, client_from_args, fail, print_json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `predict` command."""
    p = subparsers.add_parser(
        "predict",
        help="predict texts with a diff artifact (FILE TEXT...) or a server task (--task NAME TEXT...)",
    )
    p.add_argument(
        "args",
        nargs="+",
        metavar="FILE_OR_TEXT",
        help="library mode: FILE TEXT...; with --task: TEXT...",
    )
    p.add_argument("--task", help="client mode: predict with this task on the server")
    p.add_argument("--version", type=int, help="client mode: task version (default: active)")
    p.add_argument("--base", help="library mode: base model path or name (default: the artifact's)")
    p.add_argument(
        "--pair-sep",
        dest="pair_sep",
        help="split each TEXT at this separator into a [text, text_pair] pair",
    )
    p.add_argument("--json", action="store_true")
    add_connection_args(p)
    p.set_defaults(func=cmd_predict)


def _inputs(texts: list[str], pair_sep: str | None) -> list[Any]:
    if not pair_sep:
        return texts
    pairs = []
    for text in texts:
        first, sep, second = text.partition(pair_sep)
        if not sep:
            raise ValueError(f"input {text!r} has no separator {pair_sep!r}")
        pairs.append([first, second])
    return pairs


def cmd_predict(args: argparse.Namespace) -> int:
    """Print one prediction per text (with --json: `{"predictions": [...]}`)."""
    try:
        if args.task:
            predictions = _predict_remote(args, _inputs(args.args, args.pair_sep))
        else:
            if len(args.args) < 2:
                return fail(ValueError("library mode needs FILE and at least one TEXT"))
            predictions = _predict_local(
                Path(args.args[0]), _inputs(args.args[1:], args.pair_sep), base=args.base
            )
    except Exception as exc:  # every failure ends as one readable line and a non-zero exit
        from cli.http_client import DiffbankError

        if isinstance(exc, DiffbankError | ValueError | OSError):
            return fail(exc)
        raise
    texts = args.args if args.task else args.args[1:]
    if args.json:
        print_json({"predictions": predictions})
        return 0
    for text, prediction in zip(texts, predictions, strict=True):
        if "value" in prediction and prediction["value"] is not None:
            print(f"{prediction['value']:.4f}\t{text}")
        else:
            print(f"{prediction['label']}\t{prediction['score']:.4f}\t{text}")
    return 0


def _predict_remote(args: argparse.Namespace, inputs: list[Any]) -> list[dict[str, Any]]:
    with client_from_args(args) as client:
        answer = client.predict(args.task, inputs, version=args.version)
    return [{k: v for k, v in p.items() if v is not None} for p in answer["predictions"]]


def _predict_local(path: Path, inputs: list[Any], *, base: str | None) -> list[dict[str, Any]]:
    """Apply the artifact to its base in this process and predict."""
    from diffs.read import loads_artifact
    from serving.engine import Predictor

    data = path.read_bytes()
    meta = loads_artifact(data).meta  # validates the file; says which base it needs
    base = base or meta.base_name
    predictor = Predictor(cache_size=1)
    try:
        predictor.base(base)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load base model {base!r} ({exc}); pass --base PATH") from exc
    print(f"base {base}, task type {meta.task_type}", file=sys.stderr)
    return predictor.predict_artifact(data, inputs, base=base)
