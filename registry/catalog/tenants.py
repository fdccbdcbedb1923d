"""Base models, tenants and API keys."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry import keys as keylib
from registry.catalog._ids import get_row
from registry.catalog._tx import get_or_create, transaction
from registry.catalog.epoch import bump_change_epoch
from registry.catalog.errors import ConflictError, InvalidInputError, NotFoundError
from registry.models import API_SCOPES, ApiKey, BaseModel, Tenant, utcnow


def register_base_model(
    session: Session, *, name: str, source: str, fingerprint: str, n_params: int
) -> BaseModel:
    """The base model row for `name`, created on first use; a different fingerprint is refused."""
    row = get_or_create(
        session,
        lambda: session.scalar(select(BaseModel).where(BaseModel.name == name)),
        lambda: BaseModel(name=name, source=source, fingerprint=fingerprint, n_params=n_params),
    )
    if row.fingerprint != fingerprint:
        raise ConflictError(
            f"base model {name!r} is registered with fingerprint {row.fingerprint}, "
            f"not {fingerprint}",
            field="base_model",
            code="base_model_mismatch",
        )
    return row


def get_base_model(session: Session, *, name: str) -> BaseModel:
    """The base model called `name`, or NotFoundError."""
    with transaction(session):
        row = session.scalar(select(BaseModel).where(BaseModel.name == name))
    if row is None:
        raise NotFoundError(f"base model {name!r} is not registered", field="base_model")
    return row


def get_or_create_tenant(session: Session, *, name: str) -> Tenant:
    """The tenant called `name`, created on first use."""
    name = (name or "").strip()
    if not name or len(name) > 255:
        raise InvalidInputError("tenant name must be 1..255 characters", field="tenant")
    return get_or_create(
        session,
        lambda: session.scalar(select(Tenant).where(Tenant.name == name)),
        lambda: Tenant(name=name),
    )


def get_tenant(session: Session, *, tenant_id: int) -> Tenant:
    """The tenant with `tenant_id`, or NotFoundError."""
    with transaction(session):
        row = get_row(session, Tenant, tenant_id)
    if row is None:
        raise NotFoundError(f"tenant {tenant_id} not found", field="tenant")
    return row


def find_tenant(session: Session, *, name: str) -> Tenant | None:
    """The tenant called `name`, or None."""
    with transaction(session):
        return session.scalar(select(Tenant).where(Tenant.name == name))


def check_scopes(scopes: Iterable[str]) -> list[str]:
    """Sorted unique scopes, or InvalidInputError(field="scopes") naming an unknown one."""
    result = sorted({s.strip() for s in scopes if s.strip()})
    if not result:
        raise InvalidInputError("at least one scope is required", field="scopes")
    unknown = [s for s in result if s not in API_SCOPES]
    if unknown:
        raise InvalidInputError(
            f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(API_SCOPES)}",
            field="scopes",
        )
    return result


def create_api_key(
    session: Session, *, tenant_id: int, scopes: Iterable[str]
) -> tuple[ApiKey, str]:
    """A new key for a tenant: the row and the plaintext, which is never stored or shown again."""
    scope_list = check_scopes(scopes)
    new = keylib.generate_key()
    with transaction(session):
        if get_row(session, Tenant, tenant_id) is None:
            raise NotFoundError(f"tenant {tenant_id} not found", field="tenant")
        row = ApiKey(
            tenant_id=tenant_id, prefix=new.prefix, key_hash=new.key_hash, scopes=scope_list
        )
        session.add(row)
        session.flush()
        session.refresh(row)
    return row, new.plaintext


def authenticate_api_key(session: Session, *, key: str) -> tuple[Tenant, list[str]] | None:
    """The tenant and scopes of a valid, unrevoked key; None for anything else."""
    prefix = keylib.parse_prefix(key or "")
    if prefix is None:
        return None
    with transaction(session):
        row = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        if row is None or row.revoked_at is not None or not keylib.key_matches(key, row.key_hash):
            return None
        return row.tenant, list(row.scopes)


def list_api_keys(session: Session, *, tenant_id: int | None = None) -> list[ApiKey]:
    """API keys in id order, of one tenant or (None, for operators) of every tenant."""
    with transaction(session):
        query = select(ApiKey).order_by(ApiKey.id)
        if tenant_id is not None:
            query = query.where(ApiKey.tenant_id == tenant_id)
        return list(session.scalars(query))


def revoke_api_key(session: Session, *, tenant_id: int | None, key_id: int) -> ApiKey:
    """Mark a key revoked from now on (idempotent); `tenant_id` None: any tenant's key."""
    with transaction(session):
        row = get_row(session, ApiKey, key_id)
        if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
            raise NotFoundError(f"API key {key_id} not found", field="key_id")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            bump_change_epoch(session)
    return row
