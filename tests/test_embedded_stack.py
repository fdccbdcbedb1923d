"""`diffbank up` and `diffbank demo` run the embedded stack and clean up after themselves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cli.embedded import free_port

pytestmark = [pytest.mark.services, pytest.mark.slow]


def _stack_env(data_dir: Path, base_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFBANK_")}
    env.update(
        DIFFBANK_DATA_DIR=str(data_dir),
        DIFFBANK_BASE_MODEL=str(base_dir),
        DIFFBANK_API_PORT=str(port),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def _processes_using(data_dir: Path) -> list[int]:
    """Pids whose environment names `data_dir` (children of the stack)."""
    marker = f"DIFFBANK_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _wait_until_gone(data_dir: Path, timeout_s: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = _processes_using(data_dir)
        if not left:
            return []
        time.sleep(0.5)
    return _processes_using(data_dir)


def _start_up(env: dict[str, str], *, sigint_ignored: bool = False) -> subprocess.Popen:
    # A background job of a non-interactive shell starts with SIGINT ignored.
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "up", "--no-beat"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=ignore,
    )


def _read_until(proc: subprocess.Popen, needle: str, timeout_s: float = 120.0) -> str:
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"{needle!r} never printed; output:\n{''.join(seen)}")


def test_up_serves_the_api_prints_a_key_once_and_ctrl_c_or_sigterm_stops_every_process(
    tmp_path, tiny_base_dir
):
    data_dir, port = tmp_path / "data", free_port()
    env = _stack_env(data_dir, tiny_base_dir, port)
    up = _start_up(env)
    try:
        out = _read_until(up, "Ctrl-C stops every process")
        assert f"http://127.0.0.1:{port}" in out and str(data_dir) in out
        key = (data_dir / "admin.key").read_text().strip()
        assert key in out  # shown on first start
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        tasks = httpx.get(
            f"http://127.0.0.1:{port}/v1/tasks",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert tasks.status_code == 200
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(60)
    assert _wait_until_gone(data_dir) == []

    again = _start_up(env)
    try:
        out = _read_until(again, "Ctrl-C stops every process")
        assert key not in out and "admin.key" in out  # the same key, not shown again
        tasks = httpx.get(
            f"http://127.0.0.1:{port}/v1/tasks",
            headers={"Authorization": f"Bearer {key}"},
            timeout=10,
        )
        assert tasks.status_code == 200
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(60)
    assert _wait_until_gone(data_dir) == []

    background = _start_up(env, sigint_ignored=True)
    try:
        _read_until(background, "Ctrl-C stops every process")
    finally:
        background.send_signal(signal.SIGINT)
        assert background.wait(60) == 0
    assert _wait_until_gone(data_dir) == []


def test_demo_trains_a_sample_task_end_to_end_and_saves_the_picture(tmp_path, tiny_base_dir):
    data_dir = tmp_path / "data"
    env = _stack_env(data_dir, tiny_base_dir, free_port())
    plot = tmp_path / "nonzeros.png"
    done = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--plot", str(plot)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "accuracy on the validation split" in done.stdout
    assert "nonzeros in the diff" in done.stdout and "smaller" in done.stdout
    assert done.stdout.count("positive") + done.stdout.count("negative") >= 3
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((data_dir / "demo").glob("*.safetensors"))
    assert _wait_until_gone(data_dir) == []
