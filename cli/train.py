"""`diffbank train DATA --out FILE`: learn a sparse diff for one task locally (library mode)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.client import print_json
from cli.flags import add_config_flags, given_flags
from cli.outputs import OutputExistsError, add_force_flag, check_output_file
from worker.diffprune.config import DiffPruneConfig
from worker.kit.config import cli_fields

TASK_TYPES = ("classification", "pair-classification", "regression")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train` command."""
    p = subparsers.add_parser("train", help="learn a sparse diff for a task and save the artifact")
    p.add_argument(
        "data",
        type=Path,
        help="a .jsonl/.csv/.parquet file, or a directory with train.* [validation.*]",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="where to write the .safetensors artifact"
    )
    p.add_argument("--base", help="base model path or name (default: DIFFBANK_BASE_MODEL)")
    add_config_flags(p, DiffPruneConfig, cli_fields(DiffPruneConfig))
    p.add_argument("--no-compile", action="store_true", help="run the gate kernels eagerly")
    p.add_argument("--text-field", default="text")
    p.add_argument("--text-pair-field")
    p.add_argument("--label-field", default="label")
    p.add_argument("--task-type", choices=TASK_TYPES, help="default: inferred from the labels")
    p.add_argument("--validation", type=Path, help="validation file (default: a seeded split)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_force_flag(p)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    """Load the data, train, save the artifact, report (a tqdm bar on stderr)."""
    from datasets_io.tabular import ColumnMapping, DatasetError
    from settings import get_settings
    from worker.data import load_task_data

    try:
        check_output_file(args.out, force=args.force, flag="--out")
    except OutputExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    overrides = given_flags(args, cli_fields(DiffPruneConfig))
    if args.no_compile:
        overrides["compile_gates"] = False
    try:
        config = DiffPruneConfig(**overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mapping = ColumnMapping(
        text_field=args.text_field,
        text_pair_field=args.text_pair_field,
        label_field=args.label_field,
    )
    try:
        data = load_task_data(
            args.data,
            mapping=mapping,
            task_type=args.task_type,
            validation_path=args.validation,
            seed=config.seed,
        )
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from diffs.basemodel import load_base
    from diffs.write import save_artifact
    from worker.diffprune.trainer import train_diff
    from worker.kit.progress import Progress

    base = load_base(args.base or get_settings().base_model)
    with tqdm(total=None, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:

        def report(p: Progress) -> None:
            """Move the progress bar to the run's step."""
            bar.total = p.total_steps
            bar.set_postfix(phase=p.phase, loss=f"{p.loss:.4f}", nnz=f"{p.expected_nnz:.3g}")
            bar.update(p.step - bar.n)

        result = train_diff(data, config, base=base, progress=report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    size = save_artifact(result.diff, args.out)
    meta = result.diff.meta
    summary = {
        "out": str(args.out),
        "task_type": meta.task_type,
        "metric_name": result.metrics["metric_name"],
        "metric": result.metrics["metric"],
        "metrics": result.metrics,
        "nnz": meta.nnz,
        "n_params": meta.n_params,
        "density": meta.density,
        "fix_lr": meta.config["fix_lr"],
        "prune_steps": result.prune_steps,
        "fix_steps": result.fix_steps,
        "gate_open_fraction": result.gate_open_fraction,
        "expected_nnz_at_projection": result.expected_nnz_at_projection,
        "bytes": size,
        "train_seconds": result.train_seconds,
        "peak_memory_bytes": result.peak_memory_bytes,
    }
    if "accuracy" in result.metrics:
        summary["accuracy"] = result.metrics["accuracy"]
    if args.json:
        print_json(summary)
    else:
        print(
            f"{args.out}: {meta.nnz} of {meta.n_params} parameters ({meta.density:.3%}), "
            f"{size} bytes; {summary['metric_name']} {summary['metric']:.4f}; "
            f"{result.prune_steps} gated + {result.fix_steps} fixed-mask steps; "
            f"{result.train_seconds:.1f} s"
        )
    return 0
