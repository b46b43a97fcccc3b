"""``auth``: establishes who is calling (``ctx.identity``) and what they may use.

Runs on every route (``endpoints = {"*"}``) except the public probes ``/healthz`` and ``/readyz``.
Every refusal is the same 401 "invalid credentials": the reason goes to the log, without the
credential, so a caller learns nothing about which check failed.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, ClassVar

from gateway.errors import AuthenticationError, ServiceUnavailableError
from gateway.plugin import Plugin, StartupError
from gateway.redact import url_for_logs
from plugins.auth.config import DEMO_SECRET, AuthConfig
from plugins.auth.failure import AuthFailure
from plugins.auth.jwtauth import JwtVerifier
from plugins.auth.keys import KeyRecord, KeyTable, fingerprint, now
from plugins.auth.rbac import Rbac
from plugins.auth.store import RedisKeyStore, TTLCache

if TYPE_CHECKING:
    from starlette.responses import Response
    from starlette.routing import BaseRoute

    from gateway.context import Identity, RequestContext
    from gateway.state import Gateway

log = logging.getLogger("gateway.auth")

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
#: Longest Authorization / x-api-key header accepted; longer ones are refused unparsed.
MAX_CREDENTIAL_BYTES = 8192


def effective_endpoint(ctx: RequestContext) -> str:
    """The endpoint to authorize: the core's label, but any ``/admin`` or ``/metrics`` path
    counts as such whatever the label says (decided on the ASGI path, never the Host)."""
    path = ctx.path
    if "admin" not in path and "metrics" not in path:  # the proxied routes: nothing to split
        return ctx.endpoint
    first = path.lstrip("/").split("/", 1)[0]
    if first == "admin":
        return "admin"
    if first == "metrics":
        return "metrics"
    return ctx.endpoint


class AuthPlugin(Plugin):
    name = "auth"
    Config = AuthConfig
    endpoints: ClassVar[frozenset[str]] = frozenset({"*"})
    config: AuthConfig

    def __init__(self, config: AuthConfig) -> None:
        super().__init__(config)
        self.table = KeyTable(config.key_secret.encode(), config.keys)
        self.jwt = JwtVerifier(config.jwt) if config.jwt.enabled else None
        self.rbac = Rbac(config.roles)
        self.store: RedisKeyStore | None = None
        self.cache = TTLCache(config.store.cache_size, config.store.cache_ttl_s)

    async def startup(self, gateway: Gateway) -> None:
        self.rbac.catalogue = gateway.catalogue
        if self.config.key_secret == DEMO_SECRET:
            log.warning(
                "auth uses the demo key secret: local use only; set GATEWAY_KEY_SECRET",
                extra={"plugin": self.name},
            )
        await self.open(getattr(gateway, "session", None))

    async def open(self, session: object = None) -> None:
        """Connect the key store and load JWKS (``startup`` minus the gateway)."""
        if self.config.store.type == "redis":
            try:
                self.store = RedisKeyStore(self.config.store.url, self.config.store.prefix)
                await self.store.ping()
            except Exception as e:
                if self.store is not None:
                    await self.store.close()
                self.store = None
                raise StartupError(
                    "auth: cannot reach the key store at "
                    f"{url_for_logs(self.config.store.url)}: {type(e).__name__}"
                ) from None
        if self.jwt is not None:
            await self.jwt.start(session)  # type: ignore[arg-type]

    async def shutdown(self) -> None:
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self.jwt is not None:
            await self.jwt.close()

    async def on_headers(self, ctx: RequestContext) -> None:
        await self.identify(ctx)

    async def on_request(self, ctx: RequestContext) -> Response | None:
        if ctx.path in PUBLIC_PATHS:
            return None
        if ctx.identity is None:  # not already done by on_headers
            await self.identify(ctx)
        assert ctx.identity is not None
        self.rbac.authorize(ctx.identity, effective_endpoint(ctx), ctx.model)
        return None

    async def identify(self, ctx: RequestContext) -> None:
        """Authenticate and check the endpoint, but not the model: for the core to call on the
        headers alone, before it reads and validates a body, so anonymous callers get 401 rather
        than body or model errors. ``on_request`` later repeats it with the model."""
        if ctx.path in PUBLIC_PATHS:
            return
        try:
            identity = await self.authenticate(ctx)
        except AuthFailure as e:
            log.info(
                "authentication failed",
                extra={
                    "request_id": ctx.request_id,
                    "reason": e.reason,
                    "key_id": e.credential_id,
                    "path": ctx.path,
                    "client": ctx.client,
                },
            )
            raise AuthenticationError("invalid credentials") from None
        ctx.identity = identity
        self.rbac.authorize(identity, effective_endpoint(ctx), None)

    def visible_models(self, ctx: RequestContext, names: list[str]) -> list[str]:
        return self.rbac.visible(ctx.identity, names)

    def routes(self) -> list[BaseRoute]:
        """The key admin API, mounted by the app (``/admin/keys``; admin role only)."""
        from plugins.auth.admin import admin_routes

        return list(admin_routes(self))

    # -- credentials ----------------------------------------------------------------------------

    @staticmethod
    def credential(ctx: RequestContext) -> str:
        """The bearer token or API key from the headers (never the query string)."""
        auth = ctx.headers.get("authorization")
        xkey = ctx.headers.get("x-api-key")
        if auth is None and xkey is None:
            raise AuthFailure("no credentials")
        if len(auth or "") > MAX_CREDENTIAL_BYTES or len(xkey or "") > MAX_CREDENTIAL_BYTES:
            raise AuthFailure("credential header too large")
        if auth is None:
            assert xkey is not None
            token = xkey.strip()
        else:
            scheme, _, token = auth.strip().partition(" ")
            if scheme.lower() != "bearer":
                raise AuthFailure("authorization scheme is not Bearer")
            token = token.strip()
            if xkey is not None and not hmac.compare_digest(
                xkey.strip().encode("latin-1"), token.encode("latin-1")
            ):
                raise AuthFailure("authorization and x-api-key disagree")
        if not token:
            raise AuthFailure("empty credential")
        return token

    async def authenticate(self, ctx: RequestContext) -> Identity:
        token = self.credential(ctx)
        if self.jwt is not None and token.count(".") == 2:
            return await self.jwt.verify(token)
        record = await self.lookup(token)
        if record is None:
            raise AuthFailure("unknown key")
        if record.disabled or record.expires_at is not None:  # else nothing to refuse
            refusal = record.refusal(now())
            if refusal is not None:
                raise AuthFailure(refusal, record.id)
        return record.identity()

    async def lookup(self, key: str) -> KeyRecord | None:
        fp = fingerprint(key)
        digest = self.table.remembered(fp)
        known = digest is not None
        if digest is None:
            digest = self.table.digest(key)
        record = self.table.get(digest)
        if record is None and self.store is not None:
            record = await self.stored(digest)
        if record is not None and not known:
            self.table.remember(fp, digest)
        return record

    async def stored(self, digest: bytes) -> KeyRecord | None:
        hit, record = self.cache.get(digest)
        if hit:
            return record
        try:
            record = await self.store.get(digest)  # type: ignore[union-attr]
        except Exception as e:
            # Fail closed: without the store we cannot tell a revoked key from a valid one.
            log.error("key store unavailable", extra={"error": type(e).__name__})
            raise ServiceUnavailableError("authentication backend unavailable") from None
        self.cache.put(digest, record)
        return record
