"""`diffbank interference`: how task diffs overlap, agree and align, as tables and a heatmap.

    diffbank interference [--tasks a,b,c] [--base-model B] [--plot OUT.png] [--json]
    diffbank interference A.safetensors B.safetensors ... [--group-max-tasks N]
        [--group-alpha A] [--min-sign-agreement S] [--min-overlap-lift L] [--plot OUT.png] [--json]

Without files it asks the server (`GET /v1/interference`) about the caller's tasks (grouped by
the server's settings); with files it reads local artifacts, offline, and groups them by the
grouping options (defaults: those of the server's settings). It prints Jaccard, sign agreement
and cosine as task x task tables and the consolidation groups among the tasks; `--plot` draws
the three as heatmaps side by side. With `--json` the last stdout line is one JSON object
(`tasks`, `jaccard`, `sign_agreement`, `cosine`, `shared`, `support`, `groups`, ...; null where
undefined).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cli.client import add_connection_args, client_from_args, fail, print_json
from cli.outputs import OutputExistsError, add_force_flag, check_output_file
from settings import Settings

# option -> (Settings field whose default it takes, type, what it sets)
GROUP_OPTIONS = {
    "group_max_tasks": ("consolidation_group_max_tasks", int, "at most this many tasks in a group"),
    "group_alpha": ("consolidation_group_alpha", float, "family-wise significance level"),
    "min_sign_agreement": (
        "consolidation_group_min_sign_agreement",
        float,
        "least sign agreement of a grouped pair (0.5 = chance)",
    ),
    "min_overlap_lift": (
        "consolidation_group_min_overlap_lift",
        float,
        "least overlap of a grouped pair, in multiples of chance",
    ),
}
# (key, title, colour map, symmetric around the panel's neutral value, fixed range or None: the
# off-diagonal data's own range, since between tasks the values sit far below the diagonal's 1).
PANELS = (
    ("jaccard", "support overlap (Jaccard)", "viridis", None),
    ("sign_agreement", "sign agreement (shared positions; 0.5 = chance)", "RdBu", (0.0, 1.0)),
    ("cosine", "cosine", "RdBu", None),
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `interference` command."""
    p = subparsers.add_parser(
        "interference", help="support overlap, sign agreement and cosine between task diffs"
    )
    p.add_argument(
        "files", nargs="*", type=Path, help="local .safetensors diffs (default: the server's tasks)"
    )
    p.add_argument("--tasks", help="comma-separated server task names (default: all on the base)")
    p.add_argument(
        "--base-model", dest="base_model", help="the server's base (default: the tasks')"
    )
    for dest, (setting, kind, what) in GROUP_OPTIONS.items():
        default = Settings.model_fields[setting].default
        p.add_argument(
            "--" + dest.replace("_", "-"),
            dest=dest,
            type=kind,
            default=None,
            help=f"local files: {what} (default {default})",
        )
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="draw the matrices as heatmaps")
    add_force_flag(p)
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_connection_args(p)
    p.set_defaults(func=cmd_interference)


def group_options(args: argparse.Namespace) -> dict[str, Any]:
    """The grouping options given, Settings defaults for the rest; ValueError naming a bad one."""
    chosen = {}
    for dest, (setting, _, _) in GROUP_OPTIONS.items():
        value = getattr(args, dest, None)
        chosen[dest] = Settings.model_fields[setting].default if value is None else value
    if chosen["group_max_tasks"] < 1:
        raise ValueError("--group-max-tasks must be at least 1")
    if not 0.0 < chosen["group_alpha"] <= 1.0:
        raise ValueError("--group-alpha must be in (0, 1]")
    if not 0.0 <= chosen["min_sign_agreement"] <= 1.0:
        raise ValueError("--min-sign-agreement must be in [0, 1]")
    if chosen["min_overlap_lift"] < 0.0:
        raise ValueError("--min-overlap-lift must be non-negative")
    return chosen


def local_report(files: list[Path], options: dict[str, Any]) -> dict[str, Any]:
    """The interference report of local artifact files, named by file stem, grouped by `options`."""
    from diffs.interference import consolidation_groups, pairwise_interference
    from diffs.read import load_artifact

    stems = [path.stem for path in files]
    names = stems if len(set(stems)) == len(stems) else [str(path) for path in files]
    matrix = pairwise_interference([load_artifact(path) for path in files], names)
    groups = consolidation_groups(
        matrix,
        max_size=options["group_max_tasks"],
        alpha=options["group_alpha"],
        min_sign_agreement=options["min_sign_agreement"],
        min_overlap_lift=options["min_overlap_lift"],
    )
    return {"base_model": None, **matrix.to_json(), "groups": groups}


def format_report(report: dict[str, Any]) -> str:
    """The three matrices as aligned tables, then the groups."""
    names = report["tasks"]
    width = max([len(n) for n in names] + [6])
    column = max(min(width, 12), 6)
    lines = []
    for key, title, *_ in PANELS:
        lines.append(title)
        lines.append(" " * width + "".join(f"  {n[:column]:>{column}}" for n in names))
        for name, row in zip(names, report[key], strict=True):
            cells = "".join(f"  {_cell(x):>{column}}" for x in row)
            lines.append(f"{name:<{width}}{cells}")
        lines.append("")
    groups = report.get("groups") or []
    lines.append("consolidation groups: " + ("; ".join(", ".join(g) for g in groups) or "none"))
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _data_range(grid: Any, *, symmetric: bool) -> tuple[float, float]:
    """Colour limits from the finite values: [0, max] or, when symmetric, [-max|x|, max|x|]."""
    import numpy as np

    finite = grid[np.isfinite(grid)]
    top = float(np.abs(finite).max()) if finite.size else 1.0
    top = top or 1.0
    return (-top, top) if symmetric else (0.0, top)


def plot_interference(report: dict[str, Any], out: Path) -> None:
    """Save the Jaccard, sign-agreement and cosine matrices as three heatmaps (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = report["tasks"]
    side = max(3.5, 0.3 * len(names) + 2.0)
    fontsize = max(4.0, min(9.0, 240.0 / max(len(names), 1)))
    fig, axes = plt.subplots(1, len(PANELS), figsize=(side * len(PANELS) + 1.5, side))
    for ax, (key, title, cmap, fixed) in zip(axes, PANELS, strict=True):
        grid = np.array([[np.nan if x is None else x for x in row] for row in report[key]], float)
        np.fill_diagonal(grid, np.nan)  # a task against itself: 1 by definition, left blank
        low, high = fixed or _data_range(grid, symmetric=key == "cosine")
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=low, vmax=high)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=fontsize)
        ax.set_yticks(range(len(names)), names, fontsize=fontsize)
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    base = report.get("base_model")
    fig.suptitle(f"interference of {len(names)} task diffs" + (f" on {base}" if base else ""))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def cmd_interference(args: argparse.Namespace) -> int:
    """Print (and optionally plot) the interference of local files or of the server's tasks."""
    if args.plot:
        try:
            check_output_file(args.plot, force=args.force, flag="--plot")
        except OutputExistsError as exc:
            return fail(exc)
    if args.files:
        if args.tasks or args.base_model:
            return fail(ValueError("--tasks and --base-model name server tasks; not with files"))
        try:
            report = local_report(args.files, group_options(args))
        except ValueError as exc:  # ArtifactError, InterferenceError, a bad grouping option
            return fail(exc)
    else:
        given = [d for d in GROUP_OPTIONS if getattr(args, d, None) is not None]
        if given:
            flags = ", ".join("--" + d.replace("_", "-") for d in given)
            return fail(
                ValueError(f"{flags}: for local files; the server's settings group its tasks")
            )
        from cli.http_client import DiffbankError

        tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
        with client_from_args(args) as client:
            try:
                report = client.interference(tasks, base_model=args.base_model)
            except DiffbankError as exc:
                return fail(exc)
    if args.plot:
        try:
            plot_interference(report, args.plot)
        except OSError as exc:
            return fail(exc)
        report["plot"] = str(args.plot)
    if args.json:
        print_json(report)
        return 0
    print(format_report(report))
    if args.plot:
        print(f"\nplot written to {args.plot}")
    return 0
