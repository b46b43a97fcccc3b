"""Base model for config sections: unknown keys are an error that names the allowed keys."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    #: Fields the gateway fills itself: accepted, but never offered in an error message.
    internal_keys: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            allowed = set(cls.model_fields)
            allowed |= {f.alias for f in cls.model_fields.values() if f.alias}
            unknown = [k for k in data if k not in allowed]
            if unknown:
                shown = sorted(allowed - cls.internal_keys)
                raise ValueError(f"unknown key {unknown[0]!r}; allowed keys: {', '.join(shown)}")
        return data
