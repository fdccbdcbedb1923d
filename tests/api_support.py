"""Shared setup of the API tests: a real app over SQLite + file store + a real Redis broker.

`ApiWorld` holds the app, a TestClient, tenants with keys of different scopes, and helpers
to publish task versions (random sparse diffs on the tiny BERT) and to count what is stored.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from registry import catalog
from settings import Settings


@dataclass
class ApiWorld:
    """A running app and everything a test needs to talk to it and look behind it."""

    app: Any
    client: TestClient
    settings: Settings
    base_dir: Path
    redis_url: str
    keys: dict[str, str] = field(default_factory=dict)  # "alice", "bob", "reader", ...
    tenant_ids: dict[str, int] = field(default_factory=dict)

    def headers(self, who: str) -> dict[str, str]:
        """The Authorization header of a named key."""
        return {"Authorization": f"Bearer {self.keys[who]}"}

    @property
    def session_factory(self):
        return self.app.state.session_factory

    @property
    def store(self):
        return self.app.state.store

    def counts(self) -> dict[str, int]:
        """Rows per table, stored objects, and messages waiting in the `train` queue."""
        import redis

        from registry.models import Artifact, Dataset, Job, JobEvent, Task, TaskVersion

        result = {}
        with self.session_factory() as session:
            for model in (Artifact, Dataset, Job, JobEvent, Task, TaskVersion):
                result[model.__tablename__] = session.scalar(
                    select(func.count()).select_from(model)
                )
        result["objects"] = len(list(self.store.list("")))
        result["upload_temp_files"] = len(list(Path(self.app.state.upload_dir).iterdir()))
        client = redis.Redis.from_url(self.redis_url)
        try:
            result["train_queue"] = client.llen("train")
        finally:
            client.close()
        return result

    def upload(self, who: str, name: str, data: bytes, **form: str):
        """POST a dataset file; the raw response."""
        return self.client.post(
            "/v1/datasets",
            headers=self.headers(who),
            files={"file": (name, io.BytesIO(data))},
            data=form,
        )

    def upload_ok(self, who: str, rows: list[dict], name: str = "train.jsonl", **form) -> dict:
        """Upload rows as JSONL and return the dataset (asserting success)."""
        response = self.upload(who, name, jsonl(rows), **form)
        assert response.status_code == 201, response.text
        return response.json()

    def publish_version(
        self,
        who: str,
        task: str,
        *,
        seed: int,
        task_type: str = "classification",
        labels: tuple[str, ...] = ("neg", "pos"),
        density: float = 0.02,
    ) -> int:
        """Publish a random sparse diff with a random head as the next version of `task`."""
        data = random_artifact(
            self.base_dir, seed=seed, task_type=task_type, labels=labels, density=density
        )
        return publish_artifact(self, who, task, data, task_type=task_type, labels=list(labels))


def jsonl(rows: list[dict]) -> bytes:
    """Rows as JSONL bytes."""
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


SENTIMENT_ROWS = [
    {"text": t, "label": lab}
    for t, lab in [
        ("a wonderful, warm film", "pos"),
        ("dull and far too long", "neg"),
        ("I loved every minute", "pos"),
        ("a waste of time", "neg"),
        ("great acting and a clever plot", "pos"),
        ("the worst script this year", "neg"),
        ("charming and funny", "pos"),
        ("boring, flat, forgettable", "neg"),
    ]
]


def random_artifact(
    base_dir: Path, *, seed: int, task_type: str, labels: tuple[str, ...], density: float
) -> bytes:
    """Artifact bytes of a random sparse diff (given density) and random head on the base."""
    import torch

    from diffs.basemodel import build_model, load_base
    from diffs.build import diff_from_dense
    from diffs.types import ArtifactMeta
    from diffs.write import dumps_artifact

    base = load_base(str(base_dir))
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, param in base.encoder.named_parameters():
        mask = torch.rand(param.shape, generator=generator) < density
        deltas[name] = torch.randn(param.shape, generator=generator) * 0.5 * mask
    num_labels = 1 if task_type == "regression" else len(labels)
    model = build_model(base, task_type=task_type, num_labels=num_labels)
    encoder_ids = {id(p) for p in model.base_model.parameters()}
    head = {
        name: torch.randn(p.shape, generator=generator)
        for name, p in model.named_parameters()
        if id(p) not in encoder_ids
    }
    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type=task_type,
        label_names=[] if task_type == "regression" else list(labels),
        max_length=64,
        text_pair_field="text_pair" if task_type == "pair-classification" else None,
    )
    return dumps_artifact(diff_from_dense(deltas, head, meta))


def register_base(session_factory, base_dir: Path):
    """Register the tiny BERT as a base model (what the worker does on first publish)."""
    from diffs.basemodel import load_base

    base = load_base(str(base_dir))
    with session_factory() as session:
        return catalog.register_base_model(
            session,
            name=base.name,
            source=str(base_dir),
            fingerprint=base.fingerprint,
            n_params=base.n_params,
        )


def publish_artifact(
    world: ApiWorld, who: str, task: str, data: bytes, *, task_type: str, labels: list[str]
) -> int:
    """Blob -> verify -> task version row, as the worker publishes; the new version number."""
    from diffs.read import loads_artifact
    from registry.publish import publish_version

    diff = loads_artifact(data)
    base_row = register_base(world.session_factory, world.base_dir)
    with world.session_factory() as session:
        task_row = catalog.get_or_create_task(
            session,
            tenant_id=world.tenant_ids[who],
            name=task,
            base_model_id=base_row.id,
            task_type=task_type,
            label_names=labels,
        )
        version = publish_version(
            session,
            world.store,
            task_id=task_row.id,
            diff_bytes=data,
            nnz=diff.nnz,
            density=diff.meta.density,
            metrics={"accuracy": 0.5},
            config={"seed": 0},
        )
    return version.number


def make_world(tmp_path: Path, redis_url: str, base_dir: Path, **overrides: Any) -> ApiWorld:
    """A migrated SQLite DB, a file store, the tiny base as default, and keys for tenants."""
    from api.app import create_app
    from registry.db import upgrade

    data_dir = tmp_path / "data"
    fields: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": f"sqlite:///{data_dir / 'diffbank.db'}",
        "store_url": (data_dir / "objects").resolve().as_uri(),
        "redis_url": redis_url,
        "base_model": str(base_dir),
    }
    settings = Settings(**{**fields, **overrides})
    upgrade(settings.database_url)
    app = create_app(settings)
    world = ApiWorld(
        app=app, client=TestClient(app), settings=settings, base_dir=base_dir, redis_url=redis_url
    )
    scopes = {
        "alice": ["read", "submit"],
        "bob": ["read", "submit"],
        "reader": ["read"],
        "admin": ["admin"],
    }
    with app.state.session_factory() as session:
        for who, key_scopes in scopes.items():
            tenant_name = "carol" if who in ("reader", "admin") else who
            tenant = catalog.get_or_create_tenant(session, name=tenant_name)
            _, key = catalog.create_api_key(session, tenant_id=tenant.id, scopes=key_scopes)
            world.keys[who] = key
            world.tenant_ids[who] = tenant.id
    return world


@pytest.fixture(scope="module")
def world(tmp_path_factory, redis_server, tiny_base_dir) -> ApiWorld:
    """One app per test module (tests count rows before/after rather than needing a fresh DB)."""
    return make_world(tmp_path_factory.mktemp("api"), redis_server.url, tiny_base_dir)


def dense_artifact(
    base, deltas, head, *, task_type="classification", labels=("neg", "pos")
) -> bytes:
    """Artifact bytes (fp32 values) of dense `deltas` and `head` on a loaded base."""
    from diffs.build import diff_from_dense
    from diffs.types import ArtifactMeta
    from diffs.write import dumps_artifact

    meta = ArtifactMeta(
        base_name=base.name,
        base_fingerprint=base.fingerprint,
        n_params=base.n_params,
        task_type=task_type,
        label_names=list(labels),
        max_length=32,
    )
    return dumps_artifact(diff_from_dense(deltas, head, meta, "float32"))


def random_deltas(base, *, seed: int, density: float) -> dict:
    """Random dense deltas with about `density` of each encoder tensor nonzero."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=generator)
        * 0.3
        * (torch.rand(p.shape, generator=generator) < density)
        for name, p in base.encoder.named_parameters()
    }
