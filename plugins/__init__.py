"""The plugin registry: one mapping from plugin type name to its class.

Entries are ``module:Class`` strings imported on first use, so a gateway that does not enable
``rag`` never imports chromadb. ``gateway.pipeline.build_pipeline`` is the one builder.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.plugin import Plugin

REGISTRY: dict[str, str] = {
    "auth": "plugins.auth:AuthPlugin",
    "limit": "plugins.limit:LimitPlugin",
    "guard": "plugins.guard:GuardPlugin",
    "rag": "plugins.rag:RagPlugin",
    "route": "plugins.route:RoutePlugin",
    "headers": "plugins.headers:HeadersPlugin",
    "cache": "plugins.cache:CachePlugin",
}


def plugin_class(name: str) -> type[Plugin]:
    target = REGISTRY[name]
    module, _, attr = target.partition(":")
    cls: type[Plugin] = getattr(importlib.import_module(module), attr)
    return cls
