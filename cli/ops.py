"""Operations commands: `up`, `demo`, `api`, `worker`, `beat`."""

from __future__ import annotations

import argparse
import os
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the operations commands to the `diffbank` parser."""
    up = subparsers.add_parser("up", help="run the embedded stack: Redis, worker, beat and the API")
    up.add_argument("--no-beat", action="store_true", help="do not start the beat scheduler")
    up.set_defaults(func=cmd_up)

    demo = subparsers.add_parser("demo", help="train a shipped sample task end to end, then stop")
    demo.add_argument(
        "--task", default=None, help="sample task to train (default: the sentiment one)"
    )
    demo.add_argument(
        "--plot", default="diffbank-demo-nonzeros.png", help="where to save the picture"
    )
    demo.set_defaults(func=cmd_demo)

    api = subparsers.add_parser("api", help="serve the HTTP API with uvicorn")
    api.add_argument("--host", default=None)
    api.add_argument("--port", type=int, default=None)
    api.set_defaults(func=cmd_api)

    worker = subparsers.add_parser("worker", help="run a Celery worker (one job at a time)")
    worker.add_argument("--queues", default="train,consolidate,maintenance")
    worker.add_argument("--device", default=None, help="pin a device, e.g. cuda:1 or cpu")
    worker.add_argument("--loglevel", default="info")
    worker.set_defaults(func=cmd_worker)

    beat = subparsers.add_parser(
        "beat", help="run the Celery beat scheduler (sweep, consolidation)"
    )
    beat.add_argument("--loglevel", default="info")
    beat.set_defaults(func=cmd_beat)


def cmd_api(args: argparse.Namespace) -> int:
    """Serve the API (refuses to start on a schema that is behind)."""
    import uvicorn

    from settings import get_settings

    settings = get_settings()
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        http="api.http_protocol:GuardedH11Protocol",  # 414/431/408, slow-client time limits
        log_level="info",
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Replace this process by a Celery worker: concurrency 1, prefetch 1."""
    if args.device:
        os.environ["DIFFBANK_WORKER_DEVICE"] = args.device
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "worker",
        "-Q",
        args.queues,
        "-c",
        "1",
        "--prefetch-multiplier",
        "1",
        "-l",
        args.loglevel,
        "-n",
        f"diffbank-{os.getpid()}@%h",
    ]
    os.execv(sys.executable, argv)
    return 0  # not reached


def cmd_beat(args: argparse.Namespace) -> int:
    """Replace this process by Celery beat, its schedule state under the data directory."""
    from settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.app",
        "beat",
        "-l",
        args.loglevel,
        "-s",
        str(settings.data_dir / "celerybeat-schedule"),
    ]
    os.execv(sys.executable, argv)
    return 0  # not reached


def cmd_up(args: argparse.Namespace) -> int:
    """Run the embedded stack in the foreground until Ctrl-C."""
    from cli.bootstrap import bootstrap_embedded
    from cli.embedded import EmbeddedStack
    from settings import get_settings

    settings = get_settings()
    boot = bootstrap_embedded(settings)
    stack = EmbeddedStack(settings)
    try:
        stack.start(beat=not args.no_beat)
        print(f"diffbank is up at {settings.url}  (API docs: {settings.url}/docs)")
        print(f"data directory: {settings.data_dir}")
        if boot.new_admin_key:
            print(f"admin API key (shown once, also saved to {boot.admin_key_path}):")
            print(f"  {boot.new_admin_key}")
        else:
            print(f"admin API key: in {boot.admin_key_path}")
        print("Ctrl-C stops every process.", flush=True)
        while True:
            dead = stack.supervise()
            if dead:
                print(f"stopping: {', '.join(dead)} exited (logs in {settings.data_dir / 'logs'})")
                return 1
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\nstopping...", file=sys.stderr)
        return 0
    finally:
        stack.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    """Train a shipped sample task on the embedded stack and show what came out."""
    from cli.demo import run_demo

    return run_demo(task=args.task, plot_path=args.plot)
