"""`inspect FILE` (metadata, nonzeros per tensor, a density heatmap) and `export FILE OUTDIR`."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.client import fail, print_json
from cli.outputs import OutputExistsError, add_force_flag, check_output_dir, check_output_file

if TYPE_CHECKING:
    import numpy as np

    from diffs.types import SparseDiff


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `inspect` and `export` commands."""
    p = subparsers.add_parser("inspect", help="show a diff artifact's metadata and nonzeros")
    p.add_argument("file", type=Path, help="a .safetensors diff artifact")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="draw a layer x module heatmap")
    add_force_flag(p)
    p.set_defaults(func=cmd_inspect)

    p = subparsers.add_parser(
        "export", help="write a standard transformers model directory (base + diff + head)"
    )
    p.add_argument("file", type=Path, help="a .safetensors diff artifact")
    p.add_argument("outdir", type=Path, help="directory to write the model into")
    p.add_argument("--base", help="base model path or name (default: the artifact's base name)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    add_force_flag(p)
    p.set_defaults(func=cmd_export)


def tensor_rows(diff: SparseDiff) -> list[dict[str, Any]]:
    """One row per changed tensor: name, shape, stored values (nnz), density, factor rank."""
    from diffs.diffstats import factor_ranks, stored_values_of

    stored = stored_values_of(diff)
    ranks = factor_ranks(diff)
    rows = []
    for name in diff.tensor_names:
        numel = math.prod(diff.shapes[name])
        nnz = stored[name]
        row = {"name": name, "shape": list(diff.shapes[name]), "nnz": nnz, "density": nnz / numel}
        if name in ranks:
            row["rank"] = ranks[name]
        rows.append(row)
    return rows


def summary(diff: SparseDiff, file_bytes: int) -> dict[str, Any]:
    """Everything `inspect` reports, as one JSON-ready object."""
    from dataclasses import asdict

    from diffs.diffstats import nonzeros_per_layer

    head_bytes = sum(t.numel() * t.element_size() for t in diff.head.values())
    return {
        "meta": asdict(diff.meta),
        "entries": diff.entry_count,
        "factor_values": diff.factor_values,
        "file_bytes": file_bytes,
        "head_bytes": head_bytes,
        "bytes_per_nnz": file_bytes / diff.nnz if diff.nnz else None,
        "tensors": tensor_rows(diff),
        "layers": nonzeros_per_layer(diff),
        "head": {name: list(t.shape) for name, t in sorted(diff.head.items())},
    }


def _layer_order(layer: str) -> tuple[int, int, str]:
    """Embeddings first, then encoder layers by number, then the rest (pooler)."""
    if layer == "embeddings":
        return (0, 0, layer)
    if layer.startswith("layer "):
        return (1, int(layer.split()[1]), layer)
    return (2, 0, layer)


def density_grid(diff: SparseDiff) -> tuple[list[str], list[str], np.ndarray]:
    """Density of nonzeros per (layer, module), weights and biases together; NaN where absent."""
    import numpy as np

    from diffs.diffstats import layer_module_of, stored_values_of

    nnz: dict[tuple[str, str], int] = {}
    numel: dict[tuple[str, str], int] = {}
    for name, stored in stored_values_of(diff).items():
        cell = layer_module_of(name)
        nnz[cell] = nnz.get(cell, 0) + stored
        numel[cell] = numel.get(cell, 0) + math.prod(diff.shapes[name])
    layers = sorted({layer for layer, _ in nnz}, key=_layer_order)
    first_row = {}
    for layer, module in nnz:  # columns grouped by the first layer they appear in
        row = layers.index(layer)
        first_row[module] = min(row, first_row.get(module, row))
    modules = sorted(first_row, key=lambda module: (first_row[module], module))
    grid = np.full((len(layers), len(modules)), np.nan)
    for (layer, module), count in nnz.items():
        grid[layers.index(layer), modules.index(module)] = count / numel[(layer, module)]
    return layers, modules, grid


def plot_density(diff: SparseDiff, out: Path) -> None:
    """Save a layer x module heatmap of the diff's density to `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers, modules, grid = density_grid(diff)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(modules) + 2), 0.5 * len(layers) + 2))
    image = ax.imshow(np.ma.masked_invalid(grid * 100), cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(modules)), modules, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), layers, fontsize=8)
    ax.set_title(f"{diff.meta.nnz} nonzeros ({diff.meta.density:.3%} of {diff.meta.n_params})")
    fig.colorbar(image, ax=ax, label="nonzeros (% of tensor)")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print an artifact's metadata and nonzeros per tensor; optionally plot them."""
    from diffs.read import load_artifact
    from diffs.types import ArtifactError
    from diffs.validation import check_artifact

    try:
        if args.plot:
            check_output_file(args.plot, force=args.force, flag="--plot")
        diff = load_artifact(args.file)
        check_artifact(diff)
    except (ArtifactError, OutputExistsError) as exc:
        return fail(exc)
    info = summary(diff, args.file.stat().st_size)
    if args.plot:
        try:
            plot_density(diff, args.plot)
        except OSError as exc:
            return fail(exc)
        info["plot"] = str(args.plot)
    if args.json:
        print_json(info)
        return 0
    meta = info["meta"]
    for key in ("base_name", "base_fingerprint", "task_type", "label_names", "max_length"):
        print(f"{key:<18}{meta[key]}")
    print(f"{'nnz':<18}{meta['nnz']} of {meta['n_params']} ({meta['density']:.4%})")
    if info["factor_values"]:
        print(f"{'stored as':<18}{info['entries']} entries + {info['factor_values']} factor values")
    print(f"{'values':<18}{meta['value_dtype']}")
    per_nnz = f" ({info['bytes_per_nnz']:.3f} B/nnz)" if info["bytes_per_nnz"] else ""
    print(f"{'file':<18}{info['file_bytes']} bytes{per_nnz}, head {info['head_bytes']} bytes")
    for key in ("metrics", "config", "extra"):
        if meta[key]:
            print(f"{key:<18}{json.dumps(meta[key], sort_keys=True)}")
    width = max([len(row["name"]) for row in info["tensors"]] + [6])
    print(f"\n{'tensor':<{width}}  {'shape':>14}  {'nnz':>9}  {'density':>8}  {'rank':>4}")
    for row in info["tensors"]:
        shape = "x".join(map(str, row["shape"]))
        rank = str(row.get("rank", ""))
        line = f"{row['name']:<{width}}  {shape:>14}  {row['nnz']:>9}  {row['density']:>8.3%}"
        print(f"{line}  {rank:>4}".rstrip())
    if args.plot:
        print(f"\nplot written to {args.plot}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Merge base + diff + head into a model directory `from_pretrained` can load."""
    from diffs.apply import build_task_model
    from diffs.basemodel import load_base
    from diffs.read import load_artifact
    from diffs.types import ArtifactError

    try:
        check_output_dir(args.outdir, force=args.force)
        diff = load_artifact(args.file)
    except (ArtifactError, OutputExistsError) as exc:
        return fail(exc)
    base_name = args.base or diff.meta.base_name
    try:
        base = load_base(base_name)
    except (OSError, ValueError) as exc:
        return fail(ValueError(f"cannot load base {base_name!r} ({exc}); pass --base PATH"))
    try:
        model = build_task_model(base, diff)  # checks the fingerprint and the shapes
    except ArtifactError as exc:
        return fail(exc)
    try:
        args.outdir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(args.outdir)
        base.tokenizer.save_pretrained(args.outdir)
        (args.outdir / "diffbank_artifact.json").write_text(diff.meta.to_json() + "\n")
    except OSError as exc:
        return fail(exc)
    info = {"outdir": str(args.outdir), "base": base.name, "nnz": diff.nnz}
    if args.json:
        print_json(info)
    else:
        print(f"exported {args.file} on base {base.name} ({diff.nnz} nonzeros) to {args.outdir}")
    return 0
