"""Provider registry: ``provider:`` names in the catalogue → classes."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.providers.base import Provider

PROVIDERS: dict[str, str] = {
    "openai": "gateway.providers.openai:OpenAIProvider",
    "anthropic": "gateway.providers.anthropic:AnthropicProvider",
}


def provider_class(name: str) -> type[Provider]:
    module, _, attr = PROVIDERS[name].partition(":")
    cls: type[Provider] = getattr(importlib.import_module(module), attr)
    return cls
