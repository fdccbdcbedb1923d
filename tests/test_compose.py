"""docker-compose.yml describes a runnable production deployment (checked statically: no engine here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cli import build_parser
from settings import Settings

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"
REQUIRED_SERVICES = {"api", "worker", "beat", "redis", "postgres", "minio", "flower"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _diffbank_commands(compose: dict) -> list[tuple[str, list[str]]]:
    found = []
    for name, service in compose["services"].items():
        command = service.get("command")
        if isinstance(command, list) and command and command[0] == "diffbank":
            found.append((name, command[1:]))
    return found


def test_compose_file_has_every_service_of_the_design(compose):
    assert REQUIRED_SERVICES <= set(compose["services"])


def test_every_diffbank_command_in_compose_is_a_real_cli_command(compose):
    commands = _diffbank_commands(compose)
    assert {name for name, _ in commands} >= {"api", "worker", "beat", "migrate"}
    parser = build_parser()
    for name, argv in commands:
        args = parser.parse_args(argv)  # exits (SystemExit) on an unknown command
        assert getattr(args, "func", None), (
            f"service {name}: `diffbank {' '.join(argv)}` runs nothing"
        )


def test_every_diffbank_variable_in_compose_is_a_settings_field(compose):
    fields = {name.upper() for name in Settings.model_fields}
    for name, service in compose["services"].items():
        for variable in service.get("environment") or {}:
            if variable.startswith("DIFFBANK_"):
                assert variable.removeprefix("DIFFBANK_") in fields, (
                    f"{name}: {variable} is no setting"
                )


def test_every_image_is_pinned(compose):
    for name, service in compose["services"].items():
        image = service.get("image")
        assert image, f"service {name} has no image"
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"service {name}: image {image!r} is not pinned"


def test_dependencies_wait_for_health_or_completion(compose):
    services = compose["services"]
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            condition = rule["condition"]
            assert condition in {"service_healthy", "service_completed_successfully"}, name
            if condition == "service_healthy":
                assert "healthcheck" in services[dependency], f"{dependency} has no healthcheck"


def test_migrations_run_before_api_and_worker(compose):
    migrate = compose["services"]["migrate"]["command"]
    assert migrate == ["diffbank", "db", "upgrade"]
    for name in ("api", "worker", "beat"):
        depends = compose["services"][name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully"


def test_worker_reserves_a_gpu(compose):
    devices = compose["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in device["capabilities"] for device in devices)
