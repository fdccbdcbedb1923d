"""API keys of the caller's tenant: list them, revoke one (admin keys only)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from api.deps import Principal, SessionDep, require
from api.errors import ApiError
from api.schemas import ROUTE_ERRORS, ApiKeyPublic, ApiKeysPublic
from registry import catalog

router = APIRouter(prefix="/keys", tags=["keys"])

KeyAdmin = Annotated[Principal, Depends(require("keys.manage"))]


@router.get("", response_model=ApiKeysPublic, responses=ROUTE_ERRORS, summary="List API keys")
def list_keys(principal: KeyAdmin, session: SessionDep) -> ApiKeysPublic:
    """Every key of the caller's tenant (prefix, scopes, when made and revoked)."""
    rows = catalog.list_api_keys(session, tenant_id=principal.tenant_id)
    return ApiKeysPublic(items=[ApiKeyPublic.model_validate(row) for row in rows])


@router.post(
    "/{key_id}/revoke",
    response_model=ApiKeyPublic,
    responses=ROUTE_ERRORS,
    summary="Revoke an API key",
)
def revoke_key(key_id: int, principal: KeyAdmin, session: SessionDep) -> ApiKeyPublic:
    """The key stops working at once; revoking a revoked key changes nothing.

    The tenant's last working admin key is kept (409): nothing over HTTP could make another.
    """
    keys = catalog.list_api_keys(session, tenant_id=principal.tenant_id)
    admins = [k.id for k in keys if "admin" in k.scopes and k.revoked_at is None]
    if admins == [key_id]:
        raise ApiError(
            409,
            "last_admin_key",
            "this is the tenant's last working admin key; create another "
            "(`diffbank keys create --scopes admin`) before revoking it",
            field="key_id",
        )
    row = catalog.revoke_api_key(session, tenant_id=principal.tenant_id, key_id=key_id)
    return ApiKeyPublic.model_validate(row)
