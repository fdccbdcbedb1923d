"""`diffbank train DATA --out FILE`: learn a sparse diff for one task locally (library mode)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from api.cli.client import print_json
from worker.config import (
    FIX_DENSITY_REFERENCE,
    FIX_LR_REFERENCE,
    FIX_STEPS_REFERENCE,
    DiffPruneConfig,
)

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
    d = DiffPruneConfig()
    p.add_argument(
        "--density", type=float, help=f"kept fraction of base parameters (default {d.density})"
    )
    p.add_argument("--epochs", type=int, help=f"epochs of gated diff training (default {d.epochs})")
    p.add_argument(
        "--fix-epochs",
        type=int,
        help=f"epochs fine-tuning the kept values (default {d.fix_epochs})",
    )
    p.add_argument("--batch-size", type=int, help=f"default {d.batch_size}")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument(
        "--max-length", type=int, help=f"tokens per example, truncated (default {d.max_length})"
    )
    p.add_argument("--lr", type=float, help=f"learning rate of the gated diff (default {d.lr:g})")
    p.add_argument(
        "--fix-lr",
        type=float,
        help=f"learning rate of the kept values, mask fixed (default: {FIX_LR_REFERENCE:g} at "
        f"density {FIX_DENSITY_REFERENCE:g} and {FIX_STEPS_REFERENCE} fixed-mask steps, "
        "scaled by 1/sqrt of density and steps)",
    )
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--no-compile", action="store_true", help="run the gate kernels eagerly")
    p.add_argument("--text-field", default="text")
    p.add_argument("--text-pair-field")
    p.add_argument("--label-field", default="label")
    p.add_argument("--task-type", choices=TASK_TYPES, help="default: inferred from the labels")
    p.add_argument("--validation", type=Path, help="validation file (default: a seeded split)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=cmd_train)


CONFIG_FLAGS = {
    "density": "density",
    "epochs": "epochs",
    "fix_epochs": "fix_epochs",
    "batch_size": "batch_size",
    "grad_accum": "grad_accum",
    "max_length": "max_length",
    "lr": "lr",
    "fix_lr": "fix_lr",
    "seed": "seed",
    "device": "device",
}


def cmd_train(args: argparse.Namespace) -> int:
    """Load the data, train, save the artifact, report (a tqdm bar on stderr)."""
    from registry.settings import get_settings
    from registry.tabular import ColumnMapping, DatasetError
    from worker.data import load_task_data

    overrides = {
        key: getattr(args, flag)
        for flag, key in CONFIG_FLAGS.items()
        if getattr(args, flag) is not None
    }
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

    from registry.artifact import save_artifact
    from registry.basemodel import load_base
    from worker.trainer import Progress, train_diff

    base = load_base(args.base or get_settings().base_model)
    with tqdm(total=None, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True) as bar:

        def report(p: Progress) -> None:
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
            f"{result.train_seconds:.1f} s"
        )
    return 0
