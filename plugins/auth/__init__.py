"""``auth``: API keys, JWTs and roles. See docs/auth.md."""

from __future__ import annotations

from plugins.auth.plugin import AuthPlugin

__all__ = ["AuthPlugin"]
