"""FastAPI dependencies: settings, DB session, object store, predictor, API-key auth with scopes,
and the page parameters of list routes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.serving import Predictor
from registry.catalog.pagination import MAX_PAGE_SIZE
from registry.settings import Settings
from registry.stores import ObjectStore

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer KEY`.")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    """A registry session for one request (catalog functions own their transactions).

    GET and HEAD requests only read, so they get a session that takes no write lock.
    """
    if request.method in ("GET", "HEAD"):
        session = request.app.state.read_session_factory()
    else:
        session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.close()


def get_store(request: Request) -> ObjectStore:
    """The object store of the app."""
    return request.app.state.store


def get_predictor(request: Request) -> Predictor:
    """The app's one prediction server."""
    return request.app.state.predictor


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]

# The page parameters of list routes (cursor pagination, `registry.catalog.pagination`).
CursorQuery = Annotated[str | None, Query(max_length=200)]
PageLimitQuery = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's tenant and its scopes."""

    tenant_id: int
    tenant_name: str
    scopes: frozenset[str]

    def has_scope(self, scope: str) -> bool:
        """`admin` grants every scope; otherwise the scope must be on the key."""
        return scope in self.scopes or "admin" in self.scopes


def authenticate(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller of a request; 401 when the key is missing or unknown."""
    from registry import catalog

    if credentials is None or not credentials.credentials:
        raise ApiError(
            401,
            "missing_key",
            "an API key is required: send `Authorization: Bearer KEY`",
            field="Authorization",
            headers=_CHALLENGE,
        )
    found = catalog.authenticate_api_key(session, key=credentials.credentials)
    if found is None:
        raise ApiError(
            401,
            "invalid_key",
            "the API key is not valid (unknown or revoked)",
            field="Authorization",
            headers=_CHALLENGE,
        )
    tenant, scopes = found
    return Principal(tenant_id=tenant.id, tenant_name=tenant.name, scopes=frozenset(scopes))


def require_scope(scope: str):
    """A dependency answering 403 unless the caller's key has `scope`."""

    def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        if not principal.has_scope(scope):
            raise ApiError(
                403,
                "missing_scope",
                f"this API key lacks the {scope!r} scope",
                field="Authorization",
            )
        return principal

    check.__name__ = f"require_{scope}_scope"
    return check


ReadPrincipal = Annotated[Principal, Depends(require_scope("read"))]
SubmitPrincipal = Annotated[Principal, Depends(require_scope("submit"))]
AdminPrincipal = Annotated[Principal, Depends(require_scope("admin"))]
