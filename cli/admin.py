"""Administration commands: `db upgrade`, `gc [--dry-run] [--json]`, `keys create|list|revoke`."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the administration commands to the `diffbank` parser."""
    db = subparsers.add_parser("db", help="registry database administration")
    db_sub = db.add_subparsers(dest="db_command", metavar="DB_COMMAND", required=True)
    up = db_sub.add_parser("upgrade", help="apply the registry's migrations (creates the schema)")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    up.set_defaults(func=cmd_db_upgrade)
    current = db_sub.add_parser("current", help="print the schema revision of the database")
    current.set_defaults(func=cmd_db_current)

    gc = subparsers.add_parser("gc", help="remove blobs no registry row references")
    gc.add_argument("--dry-run", action="store_true", help="report what would go, delete nothing")
    gc.add_argument(
        "--grace",
        type=float,
        default=None,
        metavar="SECONDS",
        help="keep unreferenced blobs younger than this (default 3600: uploads in progress)",
    )
    gc.add_argument("--json", action="store_true", help="print one JSON object")
    gc.set_defaults(func=cmd_gc)

    keys = subparsers.add_parser("keys", help="API key administration")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="KEYS_COMMAND", required=True)
    create = keys_sub.add_parser("create", help="create an API key (printed once)")
    create.add_argument("--tenant", required=True, help="tenant name (created if new)")
    create.add_argument(
        "--scopes", default="read,submit", help="comma-separated: read,submit,admin"
    )
    create.add_argument("--json", action="store_true", help="print one JSON object")
    create.set_defaults(func=cmd_keys_create)
    listing = keys_sub.add_parser("list", help="list API keys (prefixes, never the keys)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(func=cmd_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke an API key by id (it stops working)")
    revoke.add_argument("key_id", type=int, help="the key's id, from `diffbank keys list`")
    revoke.set_defaults(func=cmd_keys_revoke)


def _schema_ready(settings: object) -> bool:
    """Whether the database schema is current; prints what to run when it is not."""
    from registry.db import SchemaNotCurrentError, check_schema_current, get_engine

    try:
        check_schema_current(get_engine(settings))
    except SchemaNotCurrentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    return True


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply migrations to the configured database."""
    from registry.db import current_revision, get_engine, upgrade
    from settings import get_settings

    settings = get_settings()
    engine = get_engine(settings)
    upgrade(engine, args.revision)
    print(
        f"database {engine.url.render_as_string(hide_password=True)} is at "
        f"{current_revision(engine)}"
    )
    return 0


def cmd_db_current(args: argparse.Namespace) -> int:
    """Print the schema revision of the configured database."""
    from registry.db import current_revision, get_engine, head_revision

    engine = get_engine()
    print(f"current: {current_revision(engine) or '(empty)'}  head: {head_revision()}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Remove orphan blobs and checkpoints of finished jobs."""
    from registry.db import get_session_factory
    from registry.gc import DEFAULT_GRACE_S, gc
    from registry.stores import open_store
    from settings import get_settings

    settings = get_settings()
    if not _schema_ready(settings):
        return 2
    session = get_session_factory(settings)()
    try:
        report = gc(
            session,
            open_store(settings=settings),
            dry_run=args.dry_run,
            grace_s=DEFAULT_GRACE_S if args.grace is None else args.grace,
            upload_dir=settings.upload_dir,
        )
    finally:
        session.close()
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    for key in report.deleted_blobs + report.deleted_checkpoints + report.deleted_uploads:
        print(f"{verb} {key}")
    print(
        f"{verb} {len(report.deleted_blobs)} blob(s), {len(report.deleted_checkpoints)} "
        f"checkpoint(s), {len(report.deleted_artifact_rows)} artifact row(s), "
        f"{len(report.deleted_uploads)} stale upload(s); kept "
        f"{len(report.kept_young_blobs)} young unreferenced blob(s); scanned {report.scanned}"
    )
    return 0


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create an API key for a tenant and print it (the only time it is shown)."""
    from registry import catalog
    from registry.db import get_session_factory
    from settings import get_settings

    settings = get_settings()
    if not _schema_ready(settings):
        return 2
    session = get_session_factory(settings)()
    try:
        try:
            tenant = catalog.get_or_create_tenant(session, name=args.tenant)
            row, plaintext = catalog.create_api_key(
                session, tenant_id=tenant.id, scopes=args.scopes.split(",")
            )
        except catalog.CatalogError as exc:
            print(f"error: {exc.field or 'input'}: {exc}", file=sys.stderr)
            return 2
    finally:
        session.close()
    if args.json:
        print(json.dumps({"key": plaintext, "tenant": tenant.name, "scopes": list(row.scopes)}))
    else:
        print(plaintext)
        print(
            f"tenant {tenant.name}, scopes {','.join(row.scopes)} (shown once: store it now)",
            file=sys.stderr,
        )
    return 0


def _key_record(row) -> dict:
    return {
        "id": row.id,
        "prefix": row.prefix,
        "tenant": row.tenant.name,
        "scopes": list(row.scopes),
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None,
    }


def cmd_keys_list(args: argparse.Namespace) -> int:
    """Print every API key (or one tenant's): id, prefix, tenant, scopes, revoked or not."""
    from registry import catalog
    from registry.db import get_session_factory
    from settings import get_settings

    settings = get_settings()
    if not _schema_ready(settings):
        return 2
    with get_session_factory(settings)() as session:
        tenant_id = None
        if args.tenant:
            tenant = catalog.find_tenant(session, name=args.tenant)
            if tenant is None:
                print(f"error: tenant: no tenant {args.tenant!r}", file=sys.stderr)
                return 2
            tenant_id = tenant.id
        records = [_key_record(row) for row in catalog.list_api_keys(session, tenant_id=tenant_id)]
    if args.json:
        print(json.dumps({"keys": records}))
        return 0
    for r in records:
        state = f"revoked {r['revoked_at']}" if r["revoked_at"] else "active"
        print(f"{r['id']}\t{r['prefix']}\t{r['tenant']}\t{','.join(r['scopes'])}\t{state}")
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke one API key by id (idempotent)."""
    from registry import catalog
    from registry.db import get_session_factory
    from settings import get_settings

    settings = get_settings()
    if not _schema_ready(settings):
        return 2
    with get_session_factory(settings)() as session:
        try:
            row = catalog.revoke_api_key(session, tenant_id=None, key_id=args.key_id)
        except catalog.CatalogError as exc:
            print(f"error: {exc.field or 'input'}: {exc}", file=sys.stderr)
            return 2
        print(f"revoked key {row.id} ({row.prefix}) of tenant {row.tenant.name}")
    return 0
