"""First-start setup of the embedded stack: schema, the default tenant and its admin key."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from settings import Settings

DEFAULT_TENANT = "default"
ADMIN_KEY_FILE = "admin.key"


@dataclass(frozen=True)
class Bootstrap:
    """What `bootstrap_embedded` found or made."""

    admin_key: str
    admin_key_path: Path
    new_admin_key: str | None  # set only on the start that created it


def bootstrap_embedded(settings: Settings) -> Bootstrap:
    """Apply migrations and make sure an admin key for the default tenant exists on disk."""
    from registry import catalog
    from registry.db import get_engine, get_session_factory, upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(get_engine(settings))
    key_path = settings.data_dir / ADMIN_KEY_FILE
    session = get_session_factory(settings)()
    try:
        if key_path.exists():
            key = key_path.read_text().strip()
            if catalog.authenticate_api_key(session, key=key) is not None:
                return Bootstrap(admin_key=key, admin_key_path=key_path, new_admin_key=None)
        tenant = catalog.get_or_create_tenant(session, name=DEFAULT_TENANT)
        _, key = catalog.create_api_key(
            session, tenant_id=tenant.id, scopes=["read", "submit", "admin"]
        )
    finally:
        session.close()
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return Bootstrap(admin_key=key, admin_key_path=key_path, new_admin_key=key)
