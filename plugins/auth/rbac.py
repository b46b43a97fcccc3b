"""Roles → what a caller may use: models (names and globs), endpoints, admin routes.

Grants are additive across a caller's roles; roles the config does not define grant nothing.
The combined grant of each distinct role set is compiled once and cached.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.errors import PermissionDeniedError
from plugins.auth.config import ENDPOINTS

if TYPE_CHECKING:
    from gateway.catalogue import Catalogue
    from gateway.context import Identity
    from plugins.auth.config import RoleConfig

_MAX_CACHED_ROLE_SETS = 4096


@dataclass(frozen=True, slots=True)
class Grant:
    endpoints: frozenset[str]
    admin: bool
    all_models: bool
    models: re.Pattern[str] | None

    def model_allowed(self, name: str) -> bool:
        if self.all_models:
            return True
        return self.models is not None and self.models.match(name) is not None


class Rbac:
    def __init__(self, roles: dict[str, RoleConfig]) -> None:
        self.roles = roles
        self.catalogue: Catalogue | None = None
        self._grants: dict[tuple[str, ...], Grant] = {}

    def grant(self, roles: tuple[str, ...]) -> Grant:
        cached = self._grants.get(roles)
        if cached is not None:
            return cached
        endpoints: set[str] = set()
        admin = False
        patterns: list[str] = []
        for name in roles:
            role = self.roles.get(name)
            if role is None:
                continue
            admin = admin or role.admin
            endpoints.update(ENDPOINTS if role.admin or "*" in role.endpoints else role.endpoints)
            patterns.extend(("*",) if role.admin else role.models)
        if admin:
            endpoints.add("admin")
        all_models = "*" in patterns
        regex = (
            re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
            if patterns and not all_models
            else None
        )
        grant = Grant(frozenset(endpoints), admin, all_models, regex)
        if len(self._grants) >= _MAX_CACHED_ROLE_SETS:
            # Role sets come from JWT claims too, so bound the cache against odd tokens.
            self._grants.clear()
        self._grants[roles] = grant
        return grant

    def names_of(self, model: str) -> tuple[str, ...]:
        """The name asked for and the catalogue name it resolves to (aliases are names too)."""
        if self.catalogue is not None:
            entry = self.catalogue.get(model)
            if entry is not None and entry.name != model:
                return (model, entry.name)
        return (model,)

    def model_allowed(self, identity: Identity, model: str) -> bool:
        grant = self.grant(identity.roles)
        return any(grant.model_allowed(n) for n in self.names_of(model))

    def authorize(self, identity: Identity, endpoint: str, model: str | None) -> None:
        """Raise :class:`PermissionDeniedError` unless ``identity`` may do this
        (``model=None``: the endpoint only, before the body naming the model is read)."""
        grant = self.grant(identity.roles)
        if endpoint not in grant.endpoints:
            if endpoint == "admin":
                raise PermissionDeniedError("this route requires an admin role")
            raise PermissionDeniedError(f"your credentials may not use the {endpoint} endpoint")
        if model is None:
            return
        if (
            endpoint in ("chat", "embeddings")
            and not grant.all_models  # the usual grant: no names to resolve
            and not any(grant.model_allowed(n) for n in self.names_of(model))
        ):
            raise PermissionDeniedError(
                f"you do not have access to model '{model[:100]}'", param="model"
            )

    def visible(self, identity: Identity | None, names: list[str]) -> list[str]:
        if identity is None:
            return []
        return [n for n in names if self.model_allowed(identity, n)]
