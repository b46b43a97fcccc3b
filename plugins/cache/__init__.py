"""Response cache plugin: exact (and optionally semantic) per-tenant answer cache."""

from __future__ import annotations

from .config import CacheConfig
from .plugin import CachePlugin

__all__ = ["CacheConfig", "CachePlugin"]
