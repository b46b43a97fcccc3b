"""The key admin API: ``POST/GET /admin/keys``, ``GET/DELETE /admin/keys/{id}``.

Each handler authenticates through the plugin itself (same checks as every route, endpoint
``admin``, so only roles with ``admin: true`` pass) and every change is logged and appended to the
store's audit list. A new key is shown once, in the creation response, and never again.
"""

from __future__ import annotations

import logging
import secrets
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import Field, ValidationError, field_validator, model_validator
from starlette.responses import Response
from starlette.routing import Route

from gateway.configbase import Strict
from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
)
from gateway.proxy import new_context
from gateway.responses import error_response, private_json
from plugins.auth.config import as_utc
from plugins.auth.keys import KeyRecord, hash_key, key_prefix, mint_key
from plugins.auth.store import KeyConflictError

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from starlette.requests import Request

    from gateway.context import Identity
    from plugins.auth.plugin import AuthPlugin

log = logging.getLogger("gateway.auth")
_MAX_BODY = 16_384


class NewKey(Strict):
    """Body of ``POST /admin/keys``."""

    id: str = Field("", pattern=r"^$|^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    user: str = Field(min_length=1, max_length=256)
    #: Defaults to the caller's tenant.
    tenant: str = ""
    roles: tuple[str, ...] = ("user",)
    tier: str = "default"
    expires_at: datetime | None = None
    #: At most ten years.
    expires_in_s: int | None = Field(None, gt=0, le=10 * 365 * 86400)
    #: Goes into the key (``sk-<label>-...``) so humans can tell keys apart.
    label: str = Field("gw", pattern=r"^[a-z0-9]{1,16}$")

    @field_validator("expires_at")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        v = as_utc(v)
        if v is not None and v.timestamp() <= time.time():
            raise ValueError("is in the past: the key would never work")
        return v

    @model_validator(mode="after")
    def _one_expiry(self) -> NewKey:
        if self.expires_at is not None and self.expires_in_s is not None:
            raise ValueError("give expires_at or expires_in_s, not both")
        return self


def _guarded(plugin: AuthPlugin, handler: Any) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        ctx = new_context(request.scope, "admin")
        try:
            await plugin.on_request(ctx)
            assert ctx.identity is not None
            return await handler(plugin, request, ctx.identity)  # type: ignore[no-any-return]
        except GatewayError as err:
            return error_response(err)

    return endpoint


async def _audit(plugin: AuthPlugin, action: str, actor: Identity, record: KeyRecord) -> None:
    event = {
        "event": f"auth.key_{action}",
        "actor": actor.user,
        "actor_key": actor.credential_id,
        "key_id": record.id,
        "key_user": record.user,
        "roles": list(record.roles),
        "at": time.time(),
    }
    log.info(f"key {action}", extra=event)
    if plugin.store is not None:
        try:
            await plugin.store.audit(event)
        except Exception as e:  # the change happened; a lost audit entry is logged, not fatal
            log.error("audit write failed", extra={"error": type(e).__name__, **event})


def _require_store(plugin: AuthPlugin) -> None:
    if plugin.store is None:
        raise InvalidRequestError(
            "no key store is configured (auth.store.type: redis); add keys to config.yaml instead"
        )


async def create_key(plugin: AuthPlugin, request: Request, actor: Identity) -> Response:
    _require_store(plugin)
    assert plugin.store is not None
    body = await request.body()
    if len(body) > _MAX_BODY:
        raise PayloadTooLargeError(f"request body is larger than {_MAX_BODY} bytes")
    try:
        spec = NewKey.model_validate(orjson.loads(body))
    except orjson.JSONDecodeError:
        raise InvalidRequestError("request body is not valid JSON") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequestError(f"{where}: {first['msg']}", param=where) from None
    for role in spec.roles:
        if role not in plugin.config.roles:
            raise InvalidRequestError(f"unknown role {role[:64]!r}", param="roles")
    missing = [r for r in spec.roles if r not in actor.roles]
    if missing:
        # Nobody hands out more than they hold.
        raise PermissionDeniedError("you may not grant roles you do not hold", param="roles")
    created = time.time()
    expires = spec.expires_at.timestamp() if spec.expires_at else None
    if spec.expires_in_s is not None:
        expires = created + spec.expires_in_s
    key = mint_key(spec.label)
    record = KeyRecord(
        id=spec.id or f"key-{secrets.token_hex(6)}",
        digest=hash_key(plugin.table.secret, key),
        user=spec.user,
        prefix=key_prefix(key),
        tenant=spec.tenant or actor.tenant,
        roles=spec.roles,
        tier=spec.tier,
        expires_at=expires,
        source="store",
        created_at=created,
        created_by=actor.user,
    )
    if record.id in plugin.table.by_id:
        raise InvalidRequestError(f"key id {record.id!r} is already used in config.yaml")
    try:
        await plugin.store.create(record)
    except KeyConflictError:
        raise InvalidRequestError(f"key id {record.id!r} already exists", param="id") from None
    plugin.cache.forget(record.digest)
    await _audit(plugin, "created", actor, record)
    return private_json({**record.public(), "key": key}, status=201)


async def list_keys(plugin: AuthPlugin, request: Request, actor: Identity) -> Response:
    records = list(plugin.table.by_id.values())
    if plugin.store is not None:
        records += await plugin.store.list()
    return private_json({"object": "list", "data": [r.public() for r in records]})


async def _find(plugin: AuthPlugin, key_id: str) -> KeyRecord:
    record = plugin.table.by_id.get(key_id)
    if record is None and plugin.store is not None:
        record = await plugin.store.get_by_id(key_id)
    if record is None:
        raise NotFoundError(f"no key with id {key_id[:64]!r}")
    return record


async def get_key(plugin: AuthPlugin, request: Request, actor: Identity) -> Response:
    return private_json((await _find(plugin, request.path_params["key_id"])).public())


async def delete_key(plugin: AuthPlugin, request: Request, actor: Identity) -> Response:
    key_id = request.path_params["key_id"]
    record = await _find(plugin, key_id)
    if record.source == "config":
        raise InvalidRequestError("this key is defined in config.yaml: remove or disable it there")
    assert plugin.store is not None
    deleted = await plugin.store.delete(key_id)
    if deleted is None:
        raise NotFoundError(f"no key with id {key_id[:64]!r}")
    # This replica forgets at once; the others within store.cache_ttl_s.
    plugin.cache.forget(deleted.digest)
    await _audit(plugin, "deleted", actor, deleted)
    return private_json({"id": key_id, "object": "key", "deleted": True})


def admin_routes(plugin: AuthPlugin) -> list[Route]:
    """Routes for the lead to mount; each authenticates through ``plugin`` (admin role)."""

    async def keys(request: Request) -> Response:
        handler = create_key if request.method == "POST" else list_keys
        return await _guarded(plugin, handler)(request)

    async def one_key(request: Request) -> Response:
        handler = delete_key if request.method == "DELETE" else get_key
        return await _guarded(plugin, handler)(request)

    return [
        Route("/admin/keys", keys, methods=["GET", "POST"]),
        Route("/admin/keys/{key_id}", one_key, methods=["GET", "DELETE"]),
    ]
