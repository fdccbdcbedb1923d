"""FastAPI dependencies: settings, DB session, object store, predictor, API-key auth with scopes,
and the page parameters of list routes.

Dependencies that do no I/O are `async def`: FastAPI runs plain `def` ones in its thread pool,
a hop per dependency per request that the predict path cannot afford.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.cache import EpochCache
from api.errors import ApiError
from api.guard import MISSING_KEY, Principal
from registry.catalog.pagination import MAX_PAGE_SIZE
from registry.keys import hash_key
from registry.stores import ObjectStore
from serving.engine import Predictor
from settings import Settings

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer KEY`.")
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def get_app_settings(request: Request) -> Settings:
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


async def get_store(request: Request) -> ObjectStore:
    """The object store of the app."""
    return request.app.state.store


async def get_predictor(request: Request) -> Predictor:
    """The app's one prediction server."""
    return request.app.state.predictor


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ObjectStore, Depends(get_store)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]

# The page parameters of list routes (cursor pagination, `registry.catalog.pagination`).
CursorQuery = Annotated[str | None, Query(max_length=200)]
PageLimitQuery = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]


# The scope each action needs: the one table every route that reaches an action asks.
ACTION_SCOPES = {
    "datasets.read": "read",
    "datasets.upload": "submit",
    "datasets.delete": "submit",
    "jobs.read": "read",
    "jobs.submit": "submit",
    "jobs.cancel": "submit",
    "tasks.read": "read",
    "tasks.predict": "read",
    "versions.delete": "submit",
    "versions.activate": "submit",
    "consolidations.read": "read",
    "consolidations.create": "admin",
    "consolidations.cancel": "admin",
    "interference.read": "read",
    "keys.manage": "admin",
    "metrics.read": "admin",
}
# A job's cancel is its kind's cancel: a consolidation's job is cancelled as a consolidation.
CANCEL_ACTION_OF_KIND = {"train": "jobs.cancel", "consolidate": "consolidations.cancel"}


async def authenticate(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller, as `api.guard.RequestGuard` authenticated it before the body was read."""
    principal = getattr(request.state, "principal", None)
    if principal is None:  # only a route outside the guarded prefixes can get here
        raise ApiError(401, "missing_key", MISSING_KEY, field="Authorization", headers=_CHALLENGE)
    return principal


def authorize(principal: Principal, action: str) -> Principal:
    """The principal, if its key may do `action`; 403 naming the missing scope otherwise."""
    scope = ACTION_SCOPES[action]
    if not principal.has_scope(scope):
        raise ApiError(
            403,
            "missing_scope",
            f"this API key lacks the {scope!r} scope ({action})",
            field="Authorization",
        )
    return principal


def require(action: str):
    """A dependency answering 403 unless the caller's key may do `action`."""

    async def check(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        return authorize(principal, action)

    check.__name__ = f"require_{action.replace('.', '_')}"
    return check


def lookup_principal(session_factory) -> Callable[[str], Principal | None]:
    """A key -> Principal lookup on `session_factory` (None for an unknown or revoked key)."""
    from registry import catalog

    def lookup(key: str) -> Principal | None:
        with session_factory() as session:
            found = catalog.authenticate_api_key(session, key=key)
            if found is None:
                return None
            tenant, scopes = found
            return Principal(tenant_id=tenant.id, tenant_name=tenant.name, scopes=frozenset(scopes))

    return lookup


def cached_principals(
    cache: EpochCache[str, Principal], lookup: Callable[[str], Principal | None]
) -> tuple[Callable[[str], Principal | None], Callable[[str], Principal | None]]:
    """(peek, lookup) over `cache`, keyed by the key's sha256: `peek` never touches the DB."""

    def peek(key: str) -> Principal | None:
        return cache.peek(hash_key(key))

    def cached_lookup(key: str) -> Principal | None:
        return cache.get(hash_key(key), lambda: lookup(key))

    return peek, cached_lookup
