"""Serving many tasks at once: closed-loop clients against a real uvicorn server, four ways.

    python -m bench.serving                              # T = 1, 8, 64, 1000 at 16 clients
    python -m bench.serving --tasks 1,8 --seconds 5      # a smoke
    python -m bench.serving --device cuda                # the server (and PEFT) on a GPU
    python -m bench.serving --kernels                    # the sparse-kernel choice of api/mixed.py
    python -m bench.serving --forward                    # one batch in-process: mixed vs merged
    python -m bench.serving --stages --tasks 8           # per-request CPU/wall time by stage

Each request is one 40-word text (`--shape sentences`: 1-4 short sentences) for a task drawn
uniformly from T tasks on all-MiniLM-L6-v2;
tasks are RANDOM 0.5% sparse diffs with random heads (timing does not depend on the values).
Rows, side by side:
  (a) apply/revert: every request applies its task's diff to the base, runs, reverts, one
      request at a time (the serving path before mixed batches);
  (b) mixed: requests gathered by the dynamic batcher into one mixed-task forward;
  (c) merged: one task whose diff is merged (no corrections) behind the same batcher, the
      physical target;
  (d) PEFT: T LoRA r=8 adapters (all linear layers, per-adapter heads) in-process, batches of
      the same shape (16 requests of 1-4 sentences, tasks drawn the same way) through
      `adapter_names`; latency is the batch's time.
Resident memory is the serving process's RSS after the run (GPU: also its allocated bytes).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import emit_result, mib, percentile, print_table, run_isolated
from bench.service import MACHINE_NOTE, SENTENCES

DENSITY = 0.005
DISTINCT_DIFFS = (
    8  # tasks reuse these diffs with their own heads: distinct artifacts, cheap to make
)


# ---------------------------------------------------------------- artifacts


def make_artifacts(base: Any, count: int, *, seed: int, empty: bool = False) -> list[bytes]:
    """`count` distinct random task artifacts (0.5% diffs, or none when `empty`) on `base`."""
    import torch

    from diffs.build import make_meta_consistent
    from diffs.types import ArtifactMeta, SparseDiff
    from diffs.write import dumps_artifact

    generator = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in range(0 if empty else DISTINCT_DIFFS):
        indices, values, shapes = {}, {}, {}
        for name, param in base.encoder.named_parameters():
            k = max(1, round(DENSITY * param.numel()))
            idx = torch.unique(torch.randint(0, param.numel(), (k,), generator=generator))
            indices[name], shapes[name] = idx, tuple(param.shape)
            values[name] = (torch.randn(len(idx), generator=generator) * 0.01).half()
        diffs.append((indices, values, shapes))
    hidden = base.config.hidden_size
    artifacts = []
    for i in range(count):
        indices, values, shapes = diffs[i % len(diffs)] if diffs else ({}, {}, {})
        head = {
            "classifier.weight": torch.randn(2, hidden, generator=generator) * 0.1,
            "classifier.bias": torch.randn(2, generator=generator) * 0.1,
        }
        meta = ArtifactMeta(
            base_name=base.name,
            base_fingerprint=base.fingerprint,
            n_params=base.n_params,
            task_type="classification",
            label_names=["neg", "pos"],
            max_length=64,
        )
        diff = make_meta_consistent(SparseDiff(indices, values, shapes, head, meta))
        artifacts.append(dumps_artifact(diff))
    return artifacts


def publish(settings: Any, tenant: str, artifacts: list[bytes], prefix: str) -> list[str]:
    """Publish each artifact as version 1 of task `<prefix><i>`; the task names."""
    from diffs.read import loads_artifact
    from registry import catalog
    from registry.db import get_session_factory
    from registry.publish import publish_version
    from registry.stores import open_store

    store = open_store(settings.store_url, settings)
    factory = get_session_factory(settings)
    first = loads_artifact(artifacts[0])
    names = []
    with factory() as session:
        base_row = catalog.register_base_model(
            session,
            name=first.meta.base_name,
            source=settings.base_model,
            fingerprint=first.meta.base_fingerprint,
            n_params=first.meta.n_params,
        )
        tenant_row = catalog.get_or_create_tenant(session, name=tenant)
        for i, data in enumerate(artifacts):
            diff = loads_artifact(data)
            task = catalog.get_or_create_task(
                session,
                tenant_id=tenant_row.id,
                name=f"{prefix}{i}",
                base_model_id=base_row.id,
                task_type="classification",
                label_names=["neg", "pos"],
            )
            publish_version(
                session,
                store,
                task_id=task.id,
                diff_bytes=data,
                nnz=diff.nnz,
                density=diff.meta.density,
                metrics={},
                config={},
            )
            names.append(f"{prefix}{i}")
    return names


# ---------------------------------------------------------------- the server


def apply_revert_app():
    """The API app serving every request by apply -> forward -> revert, one at a time."""
    from api.app import create_app
    from serving.batcher import DynamicBatcher
    from serving.engine import Predictor, ResidentDiff

    class ApplyRevertPredictor(Predictor):
        """Keeps each diff as a SparseDiff, so every request applies and reverts it."""

        def _decode(self, held, data):
            from diffs.read import loads_artifact

            resident = super()._decode(held, data)
            diff = loads_artifact(data, expected_fingerprint=held.loaded.fingerprint)
            return ResidentDiff(resident.meta, None, resident.head, diff, resident.nbytes)

    app = create_app()
    settings = app.state.settings
    app.state.predictor = ApplyRevertPredictor(
        cache_size=settings.serving_cache_size,
        cache_bytes=settings.serving_cache_bytes,
        device=settings.serving_device,
    )
    app.state.batcher = DynamicBatcher(
        app.state.predictor, max_requests=1, max_queue=settings.serving_queue_size
    )
    return app


def start_server(env: dict[str, str], log_dir: Path, factory: str, threads: int):
    """uvicorn for `factory` on a free port (one worker, `threads` math threads)."""
    from tests.fixtures.services import start_api_server

    threads_env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return start_api_server({**env, **threads_env}, log_dir, factory=factory, timeout_s=120)


def request_texts(rng: random.Random, shape: str) -> list[str]:
    """One request's inputs: one 40-word text, or 1-4 short sample sentences."""
    if shape == "40-words":
        words = " ".join(SENTENCES).split()
        return [" ".join(rng.choice(words) for _ in range(40))]
    return [rng.choice(SENTENCES) for _ in range(rng.randint(1, 4))]


def closed_loop(
    url: str,
    key: str,
    names: list[str],
    *,
    clients: int,
    seconds: float,
    seed: int,
    shape: str = "40-words",
) -> dict[str, float]:
    """`clients` threads post back to back for `seconds`; sentences/s and latency percentiles."""
    import httpx

    latencies: list[float] = []
    sentences = [0]
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        own, count = [], 0
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120
        ) as http:
            barrier.wait()
            while time.perf_counter() < stop_at[0]:
                task = rng.choice(names)
                texts = request_texts(rng, shape)
                start = time.perf_counter()
                response = http.post(f"/v1/tasks/{task}/predict", json={"inputs": texts})
                own.append(time.perf_counter() - start)
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:200]}")
                    continue
                count += len(texts)
        with lock:
            latencies.extend(own)
            sentences[0] += count

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return {
        "sentences_per_s": sentences[0] / wall,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
    }


def warm(url: str, key: str, names: list[str], clients: int) -> None:
    """One request per task, spread over `clients` threads, so every task is resident."""
    import httpx

    def loop(part: list[str]) -> None:
        with httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300
        ) as http:
            for task in part:
                response = http.post(f"/v1/tasks/{task}/predict", json={"inputs": SENTENCES[:2]})
                response.raise_for_status()

    threads = [threading.Thread(target=loop, args=(names[i::clients],)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def server_memory(server) -> float:
    """Resident MiB of the server process."""
    import psutil

    return mib(psutil.Process(server.process.pid).memory_info().rss)


def bench_server_rows(args: argparse.Namespace, counts: list[int]) -> list[list[Any]]:
    """Rows (a), (b), (c) for every T, each against a fresh uvicorn server."""
    from diffs.basemodel import load_base, resolve_base_path
    from tests.fixtures.services import (
        RedisServer,
        prepare_registry,
        service_env_for,
        settings_from_env,
    )

    base_path = Path(resolve_base_path("all-MiniLM-L6-v2"))
    base = load_base(str(base_path))
    work = Path(tempfile.mkdtemp(prefix="diffbank-bench-serving-"))
    redis_server = RedisServer(work / "redis")
    redis_server.start()
    rows = []
    try:
        for count in counts:
            env = service_env_for(work / f"data-{count}", redis_server.url, base_path)
            env["DIFFBANK_SERVING_DEVICE"] = args.device
            env["DIFFBANK_SERVING_QUEUE_SIZE"] = str(max(256, 4 * args.clients))
            settings = settings_from_env(env)
            key = prepare_registry(settings)
            tasks = publish(settings, "acme", make_artifacts(base, count, seed=count), "t")
            merged = publish(settings, "acme", make_artifacts(base, 1, seed=0, empty=True), "m")
            plans = [
                ("(a) apply/revert", "bench.serving:apply_revert_app", tasks),
                ("(b) mixed", "api.app:create_app", tasks),
                ("(c) merged, batched", "api.app:create_app", merged),
            ][1 if args.skip_apply else 0 :]
            for label, factory, names in plans:
                server = start_server(env, work, factory, args.threads)
                try:
                    warm(server.url, key, names, args.clients)
                    result = closed_loop(
                        server.url,
                        key,
                        names,
                        clients=args.clients,
                        seconds=args.seconds,
                        seed=count,
                        shape=args.shape,
                    )
                    rows.append(
                        [
                            count,
                            label,
                            result["sentences_per_s"],
                            result["p50_ms"],
                            result["p99_ms"],
                            server_memory(server),
                        ]
                    )
                    print(rows[-1], flush=True)
                finally:
                    server.stop()
    finally:
        redis_server.stop()
    return rows


# ---------------------------------------------------------------- stages


def scrape_stages(url: str, key: str) -> dict[str, list[float]]:
    """From /metrics (admin key): stage -> [requests, CPU s, wall s], and the predict route's
    HTTP [requests, wall s] under `"total"`."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"})
    response.raise_for_status()
    found: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if family.name.startswith("diffbank_predict_stage_"):
                kind = 1 if "_cpu_" in family.name else 2
                row = found.setdefault(sample.labels["stage"], [0.0, 0.0, 0.0])
                if sample.name.endswith("_count"):
                    row[0] = sample.value
                elif sample.name.endswith("_sum"):
                    row[kind] = sample.value
            elif (
                family.name == "diffbank_http_request_duration_seconds"
                and sample.labels.get("method") == "POST"
                # the template reads /v1/{name}/predict today (the nested /tasks prefix is lost)
                and sample.labels.get("route", "").endswith("{name}/predict")
            ):
                row = found.setdefault("total", [0.0, 0.0, 0.0])
                if sample.name.endswith("_count"):
                    row[0] = sample.value
                elif sample.name.endswith("_sum"):
                    row[2] = sample.value
    return found


def stage_rows(before: dict[str, list[float]], after: dict[str, list[float]]) -> list[list[Any]]:
    """Per stage over the run: requests, mean CPU µs and mean wall µs per request."""
    from serving.stages import STAGES

    rows = []
    for stage in (*STAGES, "total"):
        n, cpu, wall = (
            a - b
            for a, b in zip(after.get(stage, [0.0] * 3), before.get(stage, [0.0] * 3), strict=True)
        )
        if n <= 0:
            rows.append([stage, 0, "-", "-"])
            continue
        cpu_us = "-" if stage in ("queue_wait", "total") else cpu / n * 1e6
        rows.append([stage, int(n), cpu_us, wall / n * 1e6])
    return rows


def bench_stages(args: argparse.Namespace) -> None:
    """The mixed path (b) against one uvicorn server: per-request time by stage from /metrics."""
    from diffs.basemodel import load_base, resolve_base_path
    from tests.fixtures.services import (
        RedisServer,
        prepare_registry,
        service_env_for,
        settings_from_env,
    )

    count = int(args.tasks.split(",")[0])
    base_path = Path(resolve_base_path("all-MiniLM-L6-v2"))
    base = load_base(str(base_path))
    work = Path(tempfile.mkdtemp(prefix="diffbank-bench-stages-"))
    redis_server = RedisServer(work / "redis")
    redis_server.start()
    try:
        env = service_env_for(work / "data", redis_server.url, base_path)
        env["DIFFBANK_SERVING_DEVICE"] = args.device
        env["DIFFBANK_SERVING_QUEUE_SIZE"] = str(max(256, 4 * args.clients))
        settings = settings_from_env(env)
        key = prepare_registry(settings)  # read, submit and admin: it may read /metrics
        names = publish(settings, "acme", make_artifacts(base, count, seed=count), "t")
        server = start_server(env, work, "api.app:create_app", args.threads)
        try:
            warm(server.url, key, names, args.clients)
            before = scrape_stages(server.url, key)
            result = closed_loop(
                server.url, key, names, clients=args.clients, seconds=args.seconds, seed=count
            )
            after = scrape_stages(server.url, key)
        finally:
            server.stop()
    finally:
        redis_server.stop()
    note = MACHINE_NOTE if args.device == "cpu" else f"device {args.device}"
    print_table(
        f"Predict path by stage, T={count}, {args.clients} closed-loop clients, "
        f"{result['sentences_per_s']:.0f} sentences/s, {args.threads} torch thread(s) ({note}); "
        "forward/heads: each request's share of its batch; queue_wait and total: wall only",
        ["stage", "requests", "CPU µs/request", "wall µs/request"],
        stage_rows(before, after),
    )


# ---------------------------------------------------------------- PEFT


def peft_worker(args: argparse.Namespace) -> None:
    """(d) in a fresh process: T LoRA r=8 adapters through `adapter_names` mixed batches."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bench.common import rss_bytes
    from diffs.basemodel import quiet_transformers, resolve_base_path

    torch.set_num_threads(args.threads)
    path = resolve_base_path("all-MiniLM-L6-v2")
    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["query", "key", "value", "dense"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    names = [f"t{i}" for i in range(args.peft_tasks)]
    model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    model.to(args.device).eval()
    rng = random.Random(args.peft_tasks)
    latencies, sentences = [], 0
    started = time.perf_counter()
    warmed = False
    while time.perf_counter() - started < args.seconds or not warmed:
        texts, adapters = [], []
        for _ in range(args.clients):
            task = rng.choice(names)
            for _ in range(rng.randint(1, 4)):
                texts.append(rng.choice(SENTENCES))
                adapters.append(task)
        begin = time.perf_counter()
        encoded = tokenizer(
            texts, truncation=True, max_length=64, padding=True, return_tensors="pt"
        ).to(args.device)
        with torch.inference_mode():
            model(**encoded, adapter_names=adapters).logits.float().cpu()
        if not warmed:  # the first batch pays one-off costs
            warmed, started = True, time.perf_counter()
            continue
        latencies.append(time.perf_counter() - begin)
        sentences += len(texts)
    wall = time.perf_counter() - started
    memory = mib(rss_bytes())
    if args.device.startswith("cuda"):
        memory += mib(torch.cuda.memory_allocated())
    emit_result(
        {
            "sentences_per_s": sentences / wall,
            "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": percentile(latencies, 99) * 1000,
            "memory_mib": memory,
        }
    )


# ---------------------------------------------------------------- kernels


def mean_call_seconds(fn: Any, device: str, *, reps: int) -> float:
    """Mean wall seconds of `reps` calls of `fn` after one warm-up call, CUDA work included."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    fn()
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - start) / reps


def bench_kernels(args: argparse.Namespace) -> None:
    """x·Δᵀ for one task's rows on MiniLM's matrix shapes: CSR vs COO sparse.mm vs gathers."""
    import warnings

    import torch

    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    device = args.device

    def timed(fn) -> float:
        return mean_call_seconds(fn, device, reps=100) * 1e6

    rows = [
        _kernel_row(out_f, in_f, tokens, device, timed)
        for out_f, in_f in [(384, 384), (1536, 384), (384, 1536)]
        for tokens in (32, 128)
    ]
    print_table(
        f"x·Δᵀ at density {DENSITY}, µs per call, {args.threads} thread(s), {device}",
        [
            "Δ shape",
            "rows",
            "dense base",
            "CSR int32",
            "CSR int64",
            "COO",
            "gather+index_add_",
            "CSR rows as embedding_bag",
        ],
        rows,
    )


def _kernel_row(out_f: int, in_f: int, tokens: int, device: str, timed) -> list[Any]:
    """One shape's timings: dense base product, CSR (int32, int64), COO, gather + index_add_,
    and the CSR rows as `embedding_bag` sums over the columns of xᵀ."""
    import torch

    nnz = int(DENSITY * out_f * in_f)
    flat = torch.randperm(out_f * in_f)[:nnz].sort().values
    r, c = flat // in_f, flat % in_f
    v = torch.randn(nnz)
    coo = torch.sparse_coo_tensor(torch.stack([r, c]), v, (out_f, in_f)).coalesce()
    csr = coo.to_sparse_csr()
    csr32 = torch.sparse_csr_tensor(
        csr.crow_indices().int(), csr.col_indices().int(), csr.values(), (out_f, in_f)
    )
    coo, csr, csr32 = coo.to(device), csr.to(device), csr32.to(device)
    r, c, v = r.to(device), c.to(device), v.to(device)
    x = torch.randn(tokens, in_f, device=device)
    weight = torch.randn(out_f, in_f, device=device)
    return [
        f"{out_f}x{in_f}",
        tokens,
        timed(lambda: torch.nn.functional.linear(x, weight)),
        timed(lambda: torch.sparse.mm(csr32, x.t()).t()),
        timed(lambda: torch.sparse.mm(csr, x.t()).t()),
        timed(lambda: torch.sparse.mm(coo, x.t()).t()),
        timed(lambda: torch.zeros(tokens, out_f, device=device).index_add_(1, r, x[:, c] * v)),
        timed(
            lambda: torch.nn.functional.embedding_bag(
                csr.col_indices(),
                x.t().contiguous(),
                csr.crow_indices()[:-1],
                mode="sum",
                per_sample_weights=csr.values(),
            ).t()
        ),
    ]


def bench_forward(args: argparse.Namespace) -> None:
    """One batch of 16 requests (1-4 sentences) in-process: merged forward vs mixed forward over
    G distinct tasks, median ms; what the corrections cost without HTTP or batching."""
    import torch

    from diffs.basemodel import build_model, load_base, resolve_base_path
    from diffs.read import loads_artifact
    from serving.mixed import MixedEncoder, Segment

    torch.set_num_threads(args.threads)
    base = load_base(str(resolve_base_path("all-MiniLM-L6-v2")))
    model = build_model(base, task_type="classification", num_labels=2).to(args.device).eval()
    model.requires_grad_(False)
    probe = {
        k: v.to(args.device) for k, v in base.encode(SENTENCES[:2], None, max_length=16).items()
    }
    mixed = MixedEncoder(model.base_model, probe_inputs=probe)
    decoded = [mixed.decode(loads_artifact(a)) for a in make_artifacts(base, 16, seed=1)]
    rng = random.Random(0)
    requests = [[rng.choice(SENTENCES) for _ in range(rng.randint(1, 4))] for _ in range(16)]
    encoded = base.encode([t for r in requests for t in r], None, max_length=64)
    inputs = {k: v.to(args.device) for k, v in encoded.items()}

    def median_ms(segments: list[Any]) -> float:
        def run() -> None:
            mixed.forward(inputs, segments)

        return (
            statistics.median(mean_call_seconds(run, args.device, reps=1) for _ in range(9)) * 1e3
        )

    merged = median_ms([])
    rows = []
    for distinct in (1, 4, 16):
        segments, start = [], 0
        for i, request in enumerate(requests):  # requests of one task are adjacent, as served
            task = i * distinct // len(requests)
            if segments and segments[-1].diff is decoded[task]:
                segments[-1].stop += len(request)
            else:
                segments.append(Segment(decoded[task], start, start + len(request)))
            start += len(request)
        ms = median_ms(segments)
        rows.append([distinct, merged, ms, merged / ms])
    print_table(
        f"One batch of 16 requests ({inputs['input_ids'].shape[0]} sentences, "
        f"{inputs['input_ids'].shape[1]} tokens) in-process, {args.threads} thread(s), "
        f"{args.device}: merged vs mixed forward",
        ["distinct tasks", "merged ms", "mixed ms", "merged / mixed"],
        rows,
    )


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    """Print the serving table (or the kernel table with --kernels)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="1,8,64,1000", help="comma-separated T values")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--kernels", action="store_true")
    parser.add_argument("--forward", action="store_true")
    parser.add_argument(
        "--stages", action="store_true", help="per-request CPU time by stage (first of --tasks)"
    )
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--skip-apply", action="store_true", help="leave out row (a)")
    parser.add_argument(
        "--shape",
        default="40-words",
        choices=["40-words", "sentences"],
        help="each request: one 40-word text, or 1-4 short sentences",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peft-tasks", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available")
    if args.worker:
        peft_worker(args)
        return
    if args.kernels:
        bench_kernels(args)
        return
    if args.forward:
        bench_forward(args)
        return
    if args.stages:
        bench_stages(args)
        return
    counts = [int(t) for t in args.tasks.split(",") if t]
    rows = bench_server_rows(args, counts)
    if not args.skip_peft:
        for count in counts:
            result = run_isolated(
                "serving",
                [
                    "--peft-tasks",
                    str(count),
                    "--seconds",
                    str(args.seconds),
                    "--clients",
                    str(args.clients),
                    "--device",
                    args.device,
                ],
                threads=args.threads,
            )
            rows.append(
                [
                    count,
                    "(d) PEFT LoRA r=8",
                    result["sentences_per_s"],
                    result["p50_ms"],
                    result["p99_ms"],
                    result["memory_mib"],
                ]
            )
    rows.sort(key=lambda row: (row[0], row[1]))
    note = MACHINE_NOTE if args.device == "cpu" else f"device {args.device}"
    print_table(
        f"Serving T tasks on all-MiniLM-L6-v2, {args.clients} closed-loop clients, "
        f"{'one 40-word text' if args.shape == '40-words' else '1-4 sentences'} per request, {args.seconds:g} s per row, {args.threads} torch thread(s) ({note})",
        ["T", "path", "sentences/s", "p50 ms", "p99 ms", "resident MiB"],
        rows,
    )


if __name__ == "__main__":
    main()
