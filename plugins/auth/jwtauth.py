"""JWT bearer tokens, verified with PyJWT against keys the operator configured.

What the token may not decide: its algorithm (fixed by config), where its key comes from
(``jku``/``x5u``/``jwk``/``x5c`` headers are refused, never fetched), or which extensions the
verifier must understand (``crit`` is refused: none are supported).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.context import Identity
from gateway.redact import url_for_logs
from plugins.auth.config import HMAC_ALGS
from plugins.auth.failure import AuthFailure

if TYPE_CHECKING:
    from plugins.auth.config import JwtConfig

log = logging.getLogger("gateway.auth")

_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c", "crit")
#: A kid is an opaque name; anything else (paths, SQL, URLs) is refused before any lookup, so it
#: cannot even trigger a JWKS refresh.
_KID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  # fullmatch: "$" passes "k1\n"
_MAX_JWKS_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class JwkKey:
    key: Any
    #: The ``alg`` the JWK declares, if any: a token must then use exactly that one.
    alg: str | None


def parse_jwks(data: Any) -> dict[str | None, JwkKey]:
    """``{kid: key}`` of the signing keys in a JWKS document; unusable keys are skipped."""
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ValueError("JWKS must be a JSON object with a 'keys' list")
    keys: dict[str | None, JwkKey] = {}
    for jwk in jwt.PyJWKSet.from_dict(data).keys:
        if jwk.public_key_use not in (None, "sig"):
            continue
        same_kid = (k for k in data["keys"] if isinstance(k, dict) and k.get("kid") == jwk.key_id)
        declared = next((k.get("alg") for k in same_kid), None)
        keys[jwk.key_id] = JwkKey(jwk.key, declared if isinstance(declared, str) else None)
    if not keys:
        raise ValueError("JWKS has no signing keys")
    return keys


def _claim(payload: dict[str, Any], path: str) -> Any:
    node: Any = payload
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


class JwtVerifier:
    def __init__(self, config: JwtConfig) -> None:
        self.config = config
        self.algorithms = list(config.algorithms)
        self.hmac = bool(set(config.algorithms) & HMAC_ALGS)
        self.keys: dict[str | None, Any] = {}
        self.session: aiohttp.ClientSession | None = None
        self._own_session = False
        self._last_fetch = float("-inf")
        self._fetching: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        if config.public_key_file:
            self.keys = {None: load_pem_public_key(Path(config.public_key_file).read_bytes())}
        elif config.jwks_file:
            self.keys = parse_jwks(json.loads(Path(config.jwks_file).read_text()))
        self.options: dict[str, Any] = {
            "require": list(config.require),
            "verify_aud": bool(config.audience),
            "verify_iss": bool(config.issuer),
        }

    # -- JWKS URL -------------------------------------------------------------------------------

    async def start(self, session: aiohttp.ClientSession | None) -> None:
        if not self.config.jwks_url:
            return
        if session is None:
            session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
            self._own_session = True
        self.session = session
        await self.refresh()
        if not self.keys:
            # The issuer may be down at boot; tokens fail (401) until a refresh succeeds.
            log.warning(
                "jwks not loaded at startup", extra={"jwks_url": url_for_logs(self.config.jwks_url)}
            )
        if self.config.jwks_refresh_s > 0:
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        """Fetch the JWKS every ``jwks_refresh_s``: without it a key removed from the JWKS
        (revoked) kept verifying tokens until an unknown kid or a restart caused a fetch."""
        while True:
            await asyncio.sleep(self.config.jwks_refresh_s)
            try:
                await self.refresh(force=True)
            except Exception:  # (never ends the loop: the next period tries again)
                log.exception("jwks refresh failed")

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            self._refresher = None
        if self._fetching is not None:
            self._fetching.cancel()
        if self._own_session and self.session is not None:
            await self.session.close()
        self.session = None

    async def refresh(self, force: bool = False) -> None:
        """Fetch the JWKS unless one was fetched less than ``jwks_min_refresh_s`` ago (or
        ``force``: the periodic refresh).

        Concurrent callers share one fetch; it runs on the event loop's own I/O, so waiting for
        it never blocks other requests."""
        if self._fetching is not None:
            await asyncio.shield(self._fetching)
            return
        if not force and time.monotonic() - self._last_fetch < self.config.jwks_min_refresh_s:
            return
        self._last_fetch = time.monotonic()
        self._fetching = asyncio.create_task(self._fetch())
        try:
            await asyncio.shield(self._fetching)
        finally:
            self._fetching = None

    async def _fetch(self) -> None:
        assert self.session is not None
        url = self.config.jwks_url
        try:
            timeout = aiohttp.ClientTimeout(total=self.config.jwks_timeout_s)
            async with self.session.get(url, timeout=timeout, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                # Read to the end: read(n) returns what has arrived so far, which cut a JWKS
                # sent in several segments (TLS records, chunks) and failed every token.
                body = bytearray()
                async for piece in resp.content.iter_chunked(64 * 1024):
                    body += piece
                    if len(body) > _MAX_JWKS_BYTES:
                        raise ValueError("JWKS larger than 1 MiB")
            keys = parse_jwks(json.loads(body))
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWTError) as e:
            # Keep the keys we had: an issuer hiccup must not lock everybody out.
            log.warning(
                "jwks fetch failed", extra={"jwks_url": url_for_logs(url), "error": str(e)[:200]}
            )
            return
        self.keys = keys
        log.info(
            "jwks loaded", extra={"jwks_url": url_for_logs(url), "kids": [k for k in keys if k]}
        )

    # -- verification ---------------------------------------------------------------------------

    async def _key_for(self, header: dict[str, Any]) -> Any:
        if self.hmac:
            return self.config.secret.encode()
        kid = header.get("kid")
        if len(self.keys) == 1 and (kid is None or None in self.keys):
            # One PEM key (or a single kid-less JWK): the token's kid names nothing to choose.
            return next(iter(self.keys.values()))
        if not isinstance(kid, str):
            raise AuthFailure("kid required")
        key = self.keys.get(kid)
        if key is None and self.config.jwks_url:
            await self.refresh()
            key = self.keys.get(kid)
        if key is None:
            raise AuthFailure("unknown kid")
        return key

    async def verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthFailure("malformed token") from None
        alg = header.get("alg")
        # The token names its algorithm, but only the configured list is ever accepted
        # ("none" in any case, or HS256 against an RS256 config, fails here).
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthFailure("algorithm not allowed")
        for name in _FORBIDDEN_HEADERS:
            if name in header:
                raise AuthFailure(f"forbidden header {name}")
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not _KID.fullmatch(kid)):
            raise AuthFailure("malformed kid")
        key = await self._key_for(header)
        if isinstance(key, JwkKey):
            if key.alg is not None and key.alg != alg:
                raise AuthFailure("token alg does not match the key's alg")
            key = key.key
        cfg = self.config
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                options=self.options,  # type: ignore[arg-type]
                audience=cfg.audience or None,
                issuer=cfg.issuer or None,
                leeway=cfg.leeway_s,
            )
        except jwt.ExpiredSignatureError:
            raise AuthFailure("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthFailure("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthFailure("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise AuthFailure("wrong issuer") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthFailure(f"missing claim {e.claim}") from None
        except jwt.InvalidSignatureError:
            raise AuthFailure("bad signature") from None
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            raise AuthFailure(f"invalid token ({type(e).__name__})") from None
        for name in ("exp", "nbf", "iat"):
            # NumericDate (RFC 7519); PyJWT would take "99999999999", a string, through int().
            value = payload.get(name)
            if value is not None and (type(value) not in (int, float)):
                raise AuthFailure(f"claim {name} is not a number")
        return self.identity(payload, kid)

    def identity(self, payload: dict[str, Any], kid: str | None) -> Identity:
        cfg = self.config
        user = _claim(payload, cfg.claims.user)
        if not isinstance(user, str) or not user.strip():
            raise AuthFailure("user claim missing")
        tenant = _claim(payload, cfg.claims.tenant)
        tier = _claim(payload, cfg.claims.tier)
        raw_roles = _claim(payload, cfg.claims.roles)
        roles: tuple[str, ...]
        if isinstance(raw_roles, str):
            roles = tuple(r for r in re.split(r"[\s,]+", raw_roles) if r)
        elif isinstance(raw_roles, list):
            roles = tuple(r for r in raw_roles if isinstance(r, str))
        else:
            roles = cfg.default_roles
        jti = payload.get("jti")
        return Identity(
            user=user,
            tenant=tenant if isinstance(tenant, str) and tenant else cfg.default_tenant,
            roles=roles,
            tier=tier if isinstance(tier, str) and tier else cfg.default_tier,
            credential_id=f"jwt:{jti}" if isinstance(jti, str) else f"jwt:{kid or 'token'}",
            method="jwt",
        )
