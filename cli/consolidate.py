"""`diffbank consolidate`: start a multitask re-prune under one budget, optionally wait and report.

    diffbank consolidate [--tasks a,b,c] --budget N [--budget-kind nnz|bytes]
        [--strategy elementwise|rank] [--tolerance 0.5] [--wait] [--json]

With `--wait` a progress bar goes to stderr and a before/after table to stdout; with `--json`
the last stdout line is `{"id", "state", "budget", "total_nnz_before", "total_nnz_after",
"tasks": [{"task", "metric_before", "metric_after", "nnz", "accepted"}]}` (plus more fields).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from cli.client import (
    add_connection_args,
    advance_bar,
    client_from_args,
    fail,
    print_json,
)
from registry.catalog.consolidation import STRATEGIES

FINISHED = ("succeeded", "failed", "cancelled")
KNOBS = ("epochs", "fix_epochs", "batch_size", "max_length", "lr", "temperature", "rank", "seed")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `consolidate` command."""
    p = subparsers.add_parser(
        "consolidate", help="re-fit several tasks together under one parameter budget"
    )
    p.add_argument("--tasks", help="comma-separated task names (default: every task on the base)")
    p.add_argument(
        "--budget",
        type=int,
        required=True,
        help="total stored nonzeros (or bytes) for the set, shared part counted once",
    )
    p.add_argument("--budget-kind", dest="budget_kind", choices=["nnz", "bytes"], default="nnz")
    p.add_argument("--strategy", choices=STRATEGIES, default="elementwise")
    p.add_argument(
        "--tolerance",
        type=float,
        help="accuracy points a task may lose and still get the new version",
    )
    p.add_argument("--base-model", dest="base_model")
    for knob, kind in (
        ("epochs", float),
        ("fix-epochs", float),
        ("batch-size", int),
        ("max-length", int),
        ("lr", float),
        ("temperature", float),
        ("rank", int),
        ("seed", int),
    ):
        p.add_argument(f"--{knob}", dest=knob.replace("-", "_"), type=kind)
    p.add_argument("--wait", action="store_true", help="show progress until the run finishes")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls with --wait")
    p.add_argument("--json", action="store_true")
    add_connection_args(p)
    p.set_defaults(func=cmd_consolidate)


def request_body(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON body of `POST /v1/consolidations` from the command line."""
    body: dict[str, Any] = {
        "budget": args.budget,
        "budget_kind": args.budget_kind,
        "strategy": args.strategy,
    }
    if args.tasks:
        body["tasks"] = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.tolerance is not None:
        body["tolerance"] = args.tolerance
    if args.base_model:
        body["base_model"] = args.base_model
    for knob in KNOBS:
        value = getattr(args, knob, None)
        if value is not None:
            body[knob] = value
    return body


def summary(run: dict[str, Any]) -> dict[str, Any]:
    """The `--json` object of a run."""
    out = {
        "id": run["id"],
        "state": run["state"],
        "budget": run["budget"],
        "budget_kind": run["budget_kind"],
        "strategy": run["strategy"],
        "total_nnz_before": run.get("total_nnz_before"),
        "total_nnz_after": run.get("total_nnz_after"),
        "shared_nnz": run.get("shared_nnz"),
        "tasks": [
            {
                "task": row["task"],
                "metric_before": row.get("metric_before"),
                "metric_after": row.get("metric_after"),
                "nnz": row.get("nnz"),
                "bytes": row.get("bytes"),
                "accepted": row.get("accepted"),
                "version": row.get("version_after"),
            }
            for row in run.get("tasks") or []
        ],
    }
    if run.get("error"):
        out["error"] = run["error"]
    return out


def format_table(run: dict[str, Any]) -> str:
    """A before/after table of a finished run."""
    lines = [
        f"consolidation {run['id']}: {run['state']}  strategy={run['strategy']}  "
        f"budget={run['budget']} {run['budget_kind']}",
    ]
    rows = run.get("tasks") or []
    if rows:
        header = f"{'task':<28} {'before':>8} {'after':>8} {'nnz':>10} {'bytes':>10}  accepted"
        lines += [header, "-" * len(header)]
        for row in rows:
            lines.append(
                f"{row['task']:<28} {_num(row.get('metric_before')):>8} "
                f"{_num(row.get('metric_after')):>8} {row.get('nnz') or 0:>10} "
                f"{row.get('bytes') or 0:>10}  {'yes' if row.get('accepted') else 'no'}"
            )
        lines.append(
            f"shared nnz {run.get('shared_nnz')}; total stored nnz "
            f"{run.get('total_nnz_before')} -> {run.get('total_nnz_after')}"
        )
    if run.get("error"):
        lines.append(f"error: {run['error'].get('code')}: {run['error'].get('message')}")
    return "\n".join(lines)


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):.4f}"


def wait_for_run(client: Any, run_id: int, *, poll_s: float, show_progress: bool = True) -> dict:
    """Poll a run until it finishes, drawing its job progress on stderr."""
    from tqdm import tqdm

    bar = tqdm(
        total=0,
        desc=f"consolidation {run_id}",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not show_progress,
    )
    try:
        while True:
            run = client.get_consolidation(run_id)
            progress = run.get("progress") or {}
            advance_bar(bar, progress)
            bar.set_postfix({"state": run["state"], "phase": progress.get("phase")}, refresh=True)
            if run["state"] in FINISHED:
                return run
            time.sleep(poll_s)
    finally:
        bar.close()


def cmd_consolidate(args: argparse.Namespace) -> int:
    """Create the run, optionally wait for it, print the table or the JSON summary."""
    from cli.http_client import DiffbankError

    with client_from_args(args) as client:
        try:
            run = client.create_consolidation(**request_body(args))
            if not args.json:
                print(f"consolidation {run['id']} queued: tasks {', '.join(run['task_names'])}")
            if args.wait:
                run = wait_for_run(client, run["id"], poll_s=args.poll)
        except DiffbankError as exc:
            return fail(exc)
    if args.json:
        print_json(summary(run))
    elif args.wait:
        print(format_table(run))
    return 0 if run["state"] in ("succeeded", "queued", "running") else 1
