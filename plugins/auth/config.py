"""Config models of the ``auth`` plugin: every mistake fails at startup with the key path."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from gateway.configbase import Strict
from gateway.plugin import PluginConfig

#: Endpoint names a role may grant (``admin`` is granted only by ``admin: true``).
ENDPOINTS = frozenset({"chat", "embeddings", "models", "metrics"})
HMAC_ALGS = frozenset({"HS256", "HS384", "HS512"})
ASYM_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
DEMO_SECRET = "demo-secret-change-me"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def as_utc(v: datetime | None) -> datetime | None:
    """Naive timestamps in config mean UTC, so an operator's ``2026-01-01`` is unambiguous."""
    if v is not None and v.tzinfo is None:
        return v.replace(tzinfo=UTC)
    return v


class KeyEntry(Strict):
    """One API key, stored only as ``HMAC-SHA256(key_secret, key)`` in hex."""

    id: str
    #: Hex HMAC-SHA256 of the key under ``key_secret`` (``gateway keys create`` prints it).
    hash: str = Field(repr=False)
    #: The key's first characters, shown to humans in listings and logs; never used to match.
    prefix: str = ""
    user: str = Field(min_length=1)
    tenant: str = "default"
    roles: tuple[str, ...] = ("user",)
    tier: str = "default"
    expires_at: datetime | None = None
    disabled: bool = False

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError("must be 1-64 letters, digits, '.', '_' or '-'")
        return v

    @field_validator("hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        v = v.strip().lower()
        if not _HEX64.match(v):
            raise ValueError("must be 64 hex characters (HMAC-SHA256 from `gateway keys create`)")
        return v

    @field_validator("expires_at")
    @classmethod
    def _utc(cls, v: datetime | None) -> datetime | None:
        return as_utc(v)


class StoreConfig(Strict):
    """Where keys created at runtime (admin API) live, shared by every replica."""

    type: Literal["none", "redis"] = "none"
    url: str = Field("redis://127.0.0.1:6379/0", repr=False)
    #: Prefix of every Redis key this store writes (lets several gateways share one Redis).
    prefix: str = Field("gw:keys:", min_length=1)
    #: How long a key lookup is cached in memory: also how long a revocation takes to reach
    #: the other replicas (the replica that revoked forgets it at once).
    cache_ttl_s: float = Field(5.0, ge=0, le=300)
    cache_size: int = Field(10_000, ge=1)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v


class ClaimsConfig(Strict):
    """Which JWT claims become the identity; dotted names reach into objects
    (``realm_access.roles``)."""

    user: str = "sub"
    tenant: str = "tenant"
    roles: str = "roles"
    tier: str = "tier"


class JwtConfig(Strict):
    enabled: bool = False
    #: Fixed by config, never taken from the token; HMAC and public-key algorithms may not mix.
    algorithms: tuple[str, ...] = ("RS256",)
    #: Shared secret for HS256/384/512 (at least 32 bytes).
    secret: str = Field("", repr=False)
    #: Public keys for RS/PS/ES/EdDSA: one PEM file, a JWKS file, or a JWKS URL.
    public_key_file: str = ""
    jwks_file: str = ""
    jwks_url: str = ""
    #: A JWKS URL is fetched again on an unknown ``kid``, at most this often.
    jwks_min_refresh_s: float = Field(30.0, ge=1)
    #: ... and every this many seconds regardless, so that a key the issuer removed (rotated
    #: out, or revoked after a leak) stops verifying tokens; 0 turns it off.
    jwks_refresh_s: float = Field(300.0, ge=0)
    jwks_timeout_s: float = Field(5.0, gt=0, le=60)
    issuer: str = ""
    audience: str = ""
    #: Claims every token must carry.
    require: tuple[str, ...] = ("exp", "iss", "aud", "sub")
    #: Clock skew allowed on ``exp``/``nbf``/``iat``.
    leeway_s: float = Field(30.0, ge=0, le=300)
    claims: ClaimsConfig = Field(default_factory=lambda: ClaimsConfig.model_validate({}))
    default_tenant: str = "default"
    #: Roles for tokens without a roles claim (none by default: such tokens reach nothing).
    default_roles: tuple[str, ...] = ()
    default_tier: str = "default"

    @field_validator("algorithms")
    @classmethod
    def _algs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("list at least one algorithm")
        for alg in v:
            if alg not in HMAC_ALGS | ASYM_ALGS:
                allowed = ", ".join(sorted(HMAC_ALGS | ASYM_ALGS))
                raise ValueError(f"algorithm {alg!r} is not allowed; allowed: {allowed}")
        if set(v) & HMAC_ALGS and set(v) & ASYM_ALGS:
            # A shared secret and a public key interpreted by the wrong algorithm family is the
            # classic key-confusion attack; one family per gateway removes it by construction.
            raise ValueError("do not mix HMAC (HS*) and public-key algorithms")
        return v

    @field_validator("jwks_url")
    @classmethod
    def _jwks_url(cls, v: str) -> str:
        if not v:
            return v
        parts = urlsplit(v)
        loopback = parts.hostname in ("127.0.0.1", "localhost", "::1")
        if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
            raise ValueError("must be an https:// URL (http:// only on loopback)")
        return v

    @model_validator(mode="after")
    def _sources(self) -> JwtConfig:
        if not self.enabled:
            return self
        hmac_algs = bool(set(self.algorithms) & HMAC_ALGS)
        sources = [s for s in (self.public_key_file, self.jwks_file, self.jwks_url) if s]
        if hmac_algs:
            if len(self.secret.encode()) < 32:
                raise ValueError("jwt.secret must be at least 32 bytes for HS* algorithms")
            if sources:
                raise ValueError("HS* algorithms use jwt.secret only; remove the public keys")
        else:
            if len(sources) != 1:
                raise ValueError(
                    "set exactly one of jwt.public_key_file, jwt.jwks_file, jwt.jwks_url"
                )
            for f in (self.public_key_file, self.jwks_file):
                if f and not Path(f).is_file():
                    raise ValueError(f"file not found: {f}")
        if "iss" in self.require and not self.issuer:
            raise ValueError("jwt.issuer is required while 'iss' is in jwt.require")
        if "aud" in self.require and not self.audience:
            raise ValueError("jwt.audience is required while 'aud' is in jwt.require")
        return self


class RoleConfig(Strict):
    #: Public model names or glob patterns (``gpt-*``) the role may use.
    models: tuple[str, ...] = ()
    #: chat, embeddings, models, metrics, or "*" for all of them.
    endpoints: tuple[str, ...] = ()
    #: Grants the admin routes (key management) and every endpoint and model.
    admin: bool = False

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for e in v:
            if e != "*" and e not in ENDPOINTS:
                allowed = ", ".join(sorted(ENDPOINTS))
                raise ValueError(
                    f"unknown endpoint {e!r}; allowed: {allowed}, * (admin: true "
                    "grants the admin routes)"
                )
        return v


def _default_roles() -> dict[str, RoleConfig]:
    return {
        "user": RoleConfig(models=("*",), endpoints=("chat", "embeddings", "models")),
        "admin": RoleConfig(models=("*",), endpoints=("*",), admin=True),
    }


class AuthConfig(PluginConfig):
    #: Server secret keying the API-key hashes: ``${GATEWAY_KEY_SECRET}``. Changing it
    #: invalidates every stored hash.
    key_secret: str = Field("", repr=False)
    keys: tuple[KeyEntry, ...] = ()
    store: StoreConfig = Field(default_factory=lambda: StoreConfig.model_validate({}))
    jwt: JwtConfig = Field(default_factory=lambda: JwtConfig.model_validate({}))
    roles: dict[str, RoleConfig] = Field(default_factory=_default_roles)

    @model_validator(mode="after")
    def _consistent(self) -> AuthConfig:
        uses_keys = bool(self.keys) or self.store.type != "none"
        if uses_keys and len(self.key_secret.encode()) < 16:
            raise ValueError("key_secret must be at least 16 bytes (use ${GATEWAY_KEY_SECRET})")
        if not uses_keys and not self.jwt.enabled:
            raise ValueError("no credentials configured: add keys, a store, or enable jwt")
        ids: set[str] = set()
        hashes: set[str] = set()
        for i, key in enumerate(self.keys):
            if key.id in ids:
                raise ValueError(f"keys[{i}]: duplicate id {key.id!r}")
            if key.hash in hashes:
                raise ValueError(f"keys[{i}]: the same key hash is listed twice")
            ids.add(key.id)
            hashes.add(key.hash)
            for role in key.roles:
                if role not in self.roles:
                    raise ValueError(
                        f"keys[{i}] ({key.id}): unknown role {role!r}; defined roles: "
                        f"{', '.join(sorted(self.roles))}"
                    )
        for role in self.jwt.default_roles:
            if role not in self.roles:
                raise ValueError(f"jwt.default_roles: unknown role {role!r}")
        return self
