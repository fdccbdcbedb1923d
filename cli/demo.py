"""`diffbank demo`: one shipped sample task trained end to end on the embedded stack."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import worker
from settings import Settings, get_settings

SAMPLES_DIR = Path(worker.__file__).resolve().parent / "samples"
DEFAULT_DEMO_TASK = "movie-sentiment"
# Small enough to finish in a few minutes on 2 CPU cores with all-MiniLM-L6-v2: a balanced
# slice of the training rows, short sequences, one gated epoch and two fixed-mask epochs.
DEMO_TRAIN_ROWS = 640
DEMO_TRAINING = {"density": 0.005, "epochs": 1, "fix_epochs": 2, "max_length": 48}
DEMO_SENTENCES = {
    "movie-sentiment": [
        "A warm, funny and beautifully acted film.",
        "Two hours of my life I will never get back.",
        "The plot is thin, but the performances are wonderful.",
    ],
}


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _demo_settings() -> Settings:
    """The configured settings, moved to a free API port when the configured one is taken."""
    from cli.embedded import free_port

    settings = get_settings()
    if _port_is_free(settings.api_port):
        return settings
    port = free_port()
    return settings.model_copy(update={"api_port": port, "url": f"http://127.0.0.1:{port}"})


def balanced_slice(source: Path, dest: Path, *, rows: int, label_field: str) -> Path:
    """Write the first rows of each label of a JSONL file, interleaved, `rows` in all."""
    by_label: dict[str, list[str]] = {}
    for line in source.read_text(encoding="utf-8").splitlines():
        if line.strip():
            by_label.setdefault(str(json.loads(line)[label_field]), []).append(line)
    per_label = max(1, rows // len(by_label))
    columns = [lines[:per_label] for _, lines in sorted(by_label.items())]
    picked = [line for group in zip(*columns, strict=False) for line in group]
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text("\n".join(picked) + "\n", encoding="utf-8")
    return dest


def run_demo(*, task: str | None, plot_path: str) -> int:
    """Start the stack, upload a sample task, train it as a job, show results, stop."""
    from cli.bootstrap import bootstrap_embedded
    from cli.client import wait_with_progress
    from cli.embedded import EmbeddedStack
    from cli.http_client import DiffbankClient

    manifest = json.loads((SAMPLES_DIR / "manifest.json").read_text())
    task = task or DEFAULT_DEMO_TASK
    if task not in manifest:
        print(
            f"error: no sample task {task!r}; choose from {', '.join(sorted(manifest))}",
            file=sys.stderr,
        )
        return 2
    sample = manifest[task]
    settings = _demo_settings()
    print(f"diffbank demo: data in {settings.data_dir}", flush=True)
    boot = bootstrap_embedded(settings)
    stack = EmbeddedStack(settings)
    try:
        print("starting the embedded stack (Redis, Celery worker, API)...", flush=True)
        stack.start(beat=False)
        client = DiffbankClient(settings.url, boot.admin_key, timeout_s=120)
        print(f"\ntask {task!r}: {sample['description']}")
        mapping = {k: sample[k] for k in ("text_field", "text_pair_field", "label_field")}
        train_file = balanced_slice(
            SAMPLES_DIR / task / "train.jsonl",
            settings.data_dir / "demo" / f"{task}-train.jsonl",
            rows=DEMO_TRAIN_ROWS,
            label_field=sample["label_field"],
        )
        train = client.upload_dataset(
            train_file, task_type=sample["task_type"], **{k: v for k, v in mapping.items() if v}
        )
        validation = client.upload_dataset(
            SAMPLES_DIR / task / "validation.jsonl",
            task_type=sample["task_type"],
            **{k: v for k, v in mapping.items() if v},
        )
        print(f"uploaded {train['rows']} training and {validation['rows']} validation rows")
        job = client.create_job(
            task, train["id"], validation_dataset_id=validation["id"], **DEMO_TRAINING
        )
        print(
            f"training job {job['id']} queued: learning a sparse diff at "
            f"density {DEMO_TRAINING['density']:.1%} of the base encoder's parameters"
        )
        started = time.monotonic()
        job = wait_with_progress(client, job["id"], poll_s=1.0)
        if job["state"] != "succeeded":
            print(
                f"job {job['id']} {job['state']}: {job.get('error_message') or ''}", file=sys.stderr
            )
            return 1
        _report(client, task, job, started, plot_path, settings)
        return 0
    finally:
        stack.stop()


def _report(
    client, task: str, job: dict, started: float, plot_path: str, settings: Settings
) -> None:
    """Print the metric, the diff's size beside a full copy, predictions; save the picture."""
    versions = client.task_versions(task)
    version = versions[-1]
    metrics = job.get("metrics") or version.get("metrics") or {}
    artifact = settings.data_dir / "demo" / f"{task}-v{version['number']}.safetensors"
    artifact.parent.mkdir(parents=True, exist_ok=True)
    client.download_diff(task, version=version["number"], dest=artifact)
    nnz = int(version.get("nnz") or 0)
    density = float(version.get("density") or 0.0)
    n_params = round(nnz / density) if density else 0
    size = artifact.stat().st_size
    metric_name = metrics.get("metric_name", "accuracy")
    print(f"\ndone in {time.monotonic() - started:.0f} s")
    print(f"  {metric_name} on the validation split: {metrics.get(metric_name, float('nan')):.4f}")
    if n_params:
        print(
            f"  nonzeros in the diff: {nnz:,} of {n_params:,} base parameters "
            f"({nnz / n_params:.2%})"
        )
        print(
            f"  diff artifact: {size / 1e6:.2f} MB  vs  a full finetuned fp32 copy: "
            f"{4 * n_params / 1e6:.1f} MB  ({4 * n_params / size:.0f}x smaller)"
        )
    else:
        print(f"  nonzeros in the diff: {nnz:,}; artifact {size / 1e6:.2f} MB")
    sentences = DEMO_SENTENCES.get(task) or []
    if sentences:
        predictions = client.predict(task, sentences)["predictions"]
        print("\npredictions served from the pristine shared base plus this task's sparse diff:")
        for text, prediction in zip(sentences, predictions, strict=True):
            shown = prediction.get("label", prediction.get("value"))
            score = prediction.get("score")
            print(f"  {shown!s:>9} {'' if score is None else f'({score:.2f})'}  {text}")
    subprocess.run(
        [sys.executable, "-m", "cli", "inspect", str(artifact), "--plot", plot_path, "--force"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(f"\nwhere the nonzeros sit (layer x module): {Path(plot_path).resolve()}")
    print(f"the diff itself: {artifact}")
    url = get_settings().url  # where `diffbank up` will listen
    print("\nnext:")
    print("  diffbank up                                  # keep the stack running")
    print(f"  export DIFFBANK_URL={url} DIFFBANK_API_KEY=$(cat {settings.data_dir}/admin.key)")
    print("  diffbank submit your.jsonl --task my-task --wait   # your own data (text,label)")
    print(f"  API docs: {url}/docs")
