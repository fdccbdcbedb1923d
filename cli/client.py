"""Client commands talking to a diffbank server: submit, jobs, job, tasks, pull."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cli.flags import add_config_flags, given_flags
from cli.outputs import add_force_flag
from worker.diffprune.config import DiffPruneConfig


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """`--url` and `--key` (defaults from DIFFBANK_URL / DIFFBANK_API_KEY)."""
    parser.add_argument("--url", help="server URL (default: $DIFFBANK_URL)")
    parser.add_argument("--key", help="API key (default: $DIFFBANK_API_KEY)")


def client_from_args(args: argparse.Namespace):
    """A `DiffbankClient` for the server and key given on the command line or in the env."""
    from cli.http_client import DiffbankClient
    from settings import Settings

    settings = Settings()
    url = args.url or settings.url
    key = args.key or (settings.api_key.get_secret_value() if settings.api_key else None)
    return DiffbankClient(url, key)


def print_json(obj: Any) -> None:
    """One JSON object on one stdout line (the last line a `--json` command prints)."""
    print(json.dumps(obj, sort_keys=True, default=str))


def fail(exc: Exception) -> int:
    """Print the server's error message to stderr; the exit status of a failed command."""
    print(f"error: {exc}", file=sys.stderr)
    return 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the client commands to the `diffbank` parser."""
    p = subparsers.add_parser("submit", help="upload a dataset and queue a training job")
    p.add_argument(
        "data", help="a .jsonl/.csv/.parquet file, or a directory with train.* [validation.*]"
    )
    p.add_argument("--task", required=True, help="task name")
    add_config_flags(p, DiffPruneConfig, DiffPruneConfig.api_fields())
    p.add_argument("--base-model", dest="base_model")
    p.add_argument("--text-field", dest="text_field")
    p.add_argument("--text-pair-field", dest="text_pair_field")
    p.add_argument("--label-field", dest="label_field")
    p.add_argument(
        "--task-type",
        dest="task_type",
        choices=["classification", "pair-classification", "regression"],
    )
    p.add_argument("--wait", action="store_true", help="show progress until the job finishes")
    p.add_argument("--poll", type=float, default=1.0, help="seconds between polls with --wait")
    p.add_argument("--json", action="store_true")
    add_connection_args(p)
    p.set_defaults(func=cmd_submit)

    p = subparsers.add_parser("jobs", help="list jobs")
    p.add_argument("--state")
    p.add_argument("--task")
    p.add_argument("--kind")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    add_connection_args(p)
    p.set_defaults(func=cmd_jobs)

    p = subparsers.add_parser("job", help="show one job")
    p.add_argument("id", type=int)
    p.add_argument("--json", action="store_true")
    add_connection_args(p)
    p.set_defaults(func=cmd_job)

    p = subparsers.add_parser("tasks", help="list tasks")
    p.add_argument("--json", action="store_true")
    add_connection_args(p)
    p.set_defaults(func=cmd_tasks)

    p = subparsers.add_parser("pull", help="download a task's diff artifact")
    p.add_argument("task")
    p.add_argument("-o", "--output", help="file to write (default: TASK-vN.safetensors)")
    p.add_argument("--version", type=int)
    p.add_argument("--json", action="store_true")
    add_force_flag(p)
    add_connection_args(p)
    p.set_defaults(func=cmd_pull)


def _dataset_files(data: Path) -> tuple[Path, Path | None]:
    """The training file and the optional validation file of a file or a directory."""
    if not data.is_dir():
        return data, None
    train = sorted(data.glob("train.*"))
    validation = sorted(data.glob("validation.*"))
    if len(train) != 1:
        raise FileNotFoundError(f"{data}: expected exactly one train.* file, found {len(train)}")
    return train[0], (validation[0] if validation else None)


def cmd_submit(args: argparse.Namespace) -> int:
    """Upload the data, create the job, optionally wait for it."""
    from cli.http_client import DiffbankError

    try:
        train_path, validation_path = _dataset_files(Path(args.data))
    except FileNotFoundError as exc:
        return fail(exc)
    mapping = {
        "text_field": args.text_field,
        "text_pair_field": args.text_pair_field,
        "label_field": args.label_field,
        "task_type": args.task_type,
    }
    knobs = given_flags(args, DiffPruneConfig.api_fields())
    with client_from_args(args) as client:
        try:
            dataset = client.upload_dataset(train_path, **mapping)
            validation_id = None
            if validation_path is not None:
                validation_id = client.upload_dataset(validation_path, **mapping)["id"]
            job = client.create_job(
                args.task,
                dataset["id"],
                validation_dataset_id=validation_id,
                base_model=args.base_model,
                **knobs,
            )
            if not args.json:
                print(
                    f"job {job['id']} queued: task {args.task}, dataset {dataset['id']} "
                    f"({dataset['rows']} rows, {dataset['task_type']})"
                )
            if not args.wait:
                if args.json:
                    print_json(_job_summary(job))
                return 0
            job = wait_with_progress(client, job["id"], poll_s=args.poll)
        except DiffbankError as exc:
            return fail(exc)
    if args.json:
        print_json(_job_summary(job))
    else:
        _print_job(job)
    return 0 if job["state"] == "succeeded" else 1


def advance_bar(bar: Any, progress: dict[str, Any]) -> None:
    """Move a tqdm bar to the step (and total) a job or run reports."""
    total = progress.get("total_steps") or 0
    if total and bar.total != total:
        bar.total = total
    step = progress.get("step") or 0
    if step > bar.n:
        bar.update(step - bar.n)


def wait_with_progress(client, job_id: int, *, poll_s: float) -> dict[str, Any]:
    """Poll the job, drawing a tqdm bar on stderr from its progress."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc=f"job {job_id}", unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(job: dict[str, Any]) -> None:
        progress = job.get("progress") or {}
        advance_bar(bar, progress)
        postfix = {"state": job["state"]}
        if progress.get("loss") is not None:
            postfix["loss"] = f"{progress['loss']:.4f}"
        if progress.get("expected_nnz") is not None:
            postfix["nnz"] = f"{progress['expected_nnz']:.3g}"
        bar.set_postfix(postfix, refresh=True)

    try:
        return client.wait_job(job_id, poll_s=poll_s, on_update=update)
    finally:
        bar.close()


def _job_summary(job: dict[str, Any]) -> dict[str, Any]:
    """The `submit --json` object: job_id, state, task, version, metrics (+ error)."""
    summary = {
        "job_id": job["id"],
        "state": job["state"],
        "task": job.get("task"),
        "version": job.get("version"),
        "metrics": job.get("metrics") or {},
    }
    if job.get("error"):
        summary["error"] = job["error"]
    return summary


def _print_job(job: dict[str, Any]) -> None:
    progress = job.get("progress") or {}
    print(f"job {job['id']}  {job['kind']}  task={job.get('task')}  state={job['state']}")
    if progress.get("total_steps"):
        print(
            f"  progress: step {progress.get('step')}/{progress.get('total_steps')}"
            f"  loss={progress.get('loss')}  expected_nnz={progress.get('expected_nnz')}"
        )
    if job.get("version") is not None:
        print(f"  version: {job['version']}")
    for name, value in sorted((job.get("metrics") or {}).items()):
        print(f"  {name}: {value}")
    if job.get("error"):
        print(f"  error: {job['error'].get('code')}: {job['error'].get('message')}")


def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs, newest first."""
    from cli.http_client import DiffbankError

    with client_from_args(args) as client:
        try:
            page = client.list_jobs(
                state=args.state, task=args.task, kind=args.kind, limit=args.limit
            )
        except DiffbankError as exc:
            return fail(exc)
    if args.json:
        print_json(page)
        return 0
    print(f"{'id':>6}  {'kind':<11}  {'state':<9}  {'task':<24}  version")
    for job in page["items"]:
        version = "" if job.get("version") is None else str(job["version"])
        print(
            f"{job['id']:>6}  {job['kind']:<11}  {job['state']:<9}  "
            f"{(job.get('task') or ''):<24}  {version}"
        )
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    """Show one job."""
    from cli.http_client import DiffbankError

    with client_from_args(args) as client:
        try:
            job = client.get_job(args.id)
        except DiffbankError as exc:
            return fail(exc)
    if args.json:
        print_json(job)
    else:
        _print_job(job)
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    """List tasks."""
    from cli.http_client import DiffbankError

    with client_from_args(args) as client:
        try:
            items, cursor = [], None
            while True:
                page = client.list_tasks(cursor=cursor)
                items.extend(page["items"])
                cursor = page.get("next_cursor")
                if not cursor:
                    break
        except DiffbankError as exc:
            return fail(exc)
    if args.json:
        print_json({"items": items})
        return 0
    print(f"{'task':<24}  {'type':<19}  {'base':<24}  active")
    for task in items:
        active = "" if task.get("active_version") is None else str(task["active_version"])
        print(f"{task['name']:<24}  {task['task_type']:<19}  {task['base_model']:<24}  {active}")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """Download a task version's diff, verified against the server's sha256."""
    import hashlib

    from cli.http_client import DiffbankError
    from cli.outputs import OutputExistsError, check_output_file

    with client_from_args(args) as client:
        try:
            version = args.version
            if version is None:
                version = client.get_task(args.task).get("active_version")
            out = Path(args.output or f"{args.task}-v{version}.safetensors")
            check_output_file(out, force=args.force, flag="-o")
            data = client.download_diff(args.task, version=version, dest=out)
        except (DiffbankError, OutputExistsError) as exc:
            return fail(exc)
    result = {
        "task": args.task,
        "version": version,
        "path": str(out),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    if args.json:
        print_json(result)
    else:
        print(f"wrote {out} ({len(data)} bytes, sha256 {result['sha256']})")
    return 0
