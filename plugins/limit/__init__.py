"""The ``limit`` plugin: rpm, tpm, concurrency and budgets per identity; see docs/limits.md."""

from __future__ import annotations

from .config import LimitConfig
from .plugin import LimitPlugin

__all__ = ["LimitConfig", "LimitPlugin"]
