"""The Celery app's configuration and the device choice: what the job guarantees rest on."""

from __future__ import annotations

import subprocess
import sys

from settings import Settings
from worker.app import (
    CONSOLIDATE_QUEUE,
    MAINTENANCE_QUEUE,
    SWEEP_TASK,
    TRAIN_QUEUE,
    make_celery_app,
)
from worker.device import pin_visible_gpu, select_device


def test_importing_the_celery_app_does_not_import_torch():
    code = "import sys, worker.app, worker.celery_tasks; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_app_delivers_at_least_once_one_job_at_a_time_with_json_only(tmp_path):
    settings = Settings(
        data_dir=tmp_path,
        redis_url="redis://127.0.0.1:1/3",
        broker_visibility_timeout_s=777,
        job_soft_time_limit_s=60,
        job_hard_time_limit_s=90,
    )
    conf = make_celery_app(settings).conf

    assert conf.broker_url == "redis://127.0.0.1:1/3"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_concurrency == 1 and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] == 777
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (60, 90)
    assert conf.task_ignore_result is True
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"


def test_tasks_are_routed_to_their_queues_by_name(tmp_path):
    routes = make_celery_app(Settings(data_dir=tmp_path)).conf.task_routes

    assert routes["diffbank.train"] == {"queue": TRAIN_QUEUE}
    assert routes["diffbank.consolidate"] == {"queue": CONSOLIDATE_QUEUE}
    assert routes["diffbank.sweep"] == {"queue": MAINTENANCE_QUEUE}


def test_beat_runs_the_sweep_every_sweep_interval(tmp_path):
    schedule = make_celery_app(Settings(data_dir=tmp_path, sweep_interval_s=7.5)).conf.beat_schedule

    entry = schedule["sweep-lost-jobs"]
    assert entry["task"] == SWEEP_TASK and entry["schedule"] == 7.5
    assert entry["options"]["queue"] == MAINTENANCE_QUEUE


def test_worker_pinned_to_one_gpu_sees_it_as_cuda_0(tmp_path):
    environ: dict[str, str] = {}

    device = pin_visible_gpu(Settings(data_dir=tmp_path, worker_device="cuda:3"), environ)

    assert environ == {"CUDA_VISIBLE_DEVICES": "3"} and device == "cuda:0"


def test_operator_visible_devices_are_left_alone(tmp_path):
    environ = {"CUDA_VISIBLE_DEVICES": "2,3"}

    device = pin_visible_gpu(Settings(data_dir=tmp_path, worker_device="cuda:1"), environ)

    assert environ == {"CUDA_VISIBLE_DEVICES": "2,3"} and device == "cuda:1"


def test_cpu_or_default_device_is_not_pinned(tmp_path):
    environ: dict[str, str] = {}

    assert pin_visible_gpu(Settings(data_dir=tmp_path, worker_device="cpu"), environ) == "cpu"
    assert pin_visible_gpu(Settings(data_dir=tmp_path), environ) == ""
    assert environ == {}


def test_select_device_defaults_to_what_is_available(tmp_path):
    import torch

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device(Settings(data_dir=tmp_path)) == expected
    assert select_device(Settings(data_dir=tmp_path, worker_device="cpu")) == "cpu"


def test_requesting_cuda_without_a_visible_gpu_is_a_clear_error(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(RuntimeError, match="DIFFBANK_WORKER_DEVICE='cuda:0'"):
        select_device(Settings(data_dir=tmp_path, worker_device="cuda:0"))
