"""Building and running the plugin pipeline, in ``config.yaml`` order and nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from gateway.config import ConfigError, Settings, format_validation_error
from plugins import REGISTRY, plugin_class

if TYPE_CHECKING:
    from starlette.responses import Response

    from gateway.context import RequestContext
    from gateway.plugin import Plugin


def build_pipeline(settings: Settings, registry: dict[str, Any] | None = None) -> list[Plugin]:
    """Create the configured plugins; an unknown type or key fails naming what is allowed.

    ``registry`` may map extra names to classes (tests register probe plugins this way).
    """
    extra = registry or {}
    plugins: list[Plugin] = []
    for i, entry in enumerate(settings.pipeline):
        if not entry.enabled:
            continue
        if entry.name in extra:
            cls = extra[entry.name]
        elif entry.name in REGISTRY:
            cls = plugin_class(entry.name)
        else:
            allowed = ", ".join(sorted({*REGISTRY, *extra}))
            raise ConfigError(
                f"{settings.source}: pipeline[{i}].name: unknown plugin {entry.name!r}; "
                f"allowed: {allowed}"
            )
        try:
            config = cls.Config.model_validate(entry.config)
        except ValidationError as e:
            raise ConfigError(
                format_validation_error(settings.source, e, ("pipeline", i, "config"))
            ) from None
        plugins.append(cls(config))
    return plugins


class Pipeline:
    def __init__(self, plugins: list[Plugin]) -> None:
        self.plugins = plugins
        self.header_hooks = [p for p in plugins if p.overrides("on_headers")]
        self.has_chunk_hooks = any(
            p.overrides("on_chunk") or p.overrides("on_stream_end") for p in plugins
        )

    def find(self, name: str) -> Plugin | None:
        return next((p for p in self.plugins if p.name == name), None)

    async def run_headers(self, ctx: RequestContext) -> None:
        for plugin in self.header_hooks:
            if plugin.applies_to(ctx.endpoint):
                await plugin.on_headers(ctx)

    async def run_request(self, ctx: RequestContext, ran: list[Plugin]) -> Response | None:
        """Run ``on_request`` down the list; ``ran`` collects the plugins reached."""
        for plugin in self.plugins:
            if not plugin.applies_to(ctx.endpoint):
                continue
            ran.append(plugin)
            answer = await plugin.on_request(ctx)
            if answer is not None:
                return answer
        return None

    @staticmethod
    async def run_chunk(
        ran: list[Plugin], ctx: RequestContext, chunk: dict[str, Any]
    ) -> list[dict[str, Any]]:
        chunks = [chunk]
        for plugin in reversed(ran):
            out: list[dict[str, Any]] = []
            for c in chunks:
                out.extend(await plugin.on_chunk(ctx, c))
            chunks = out
            if not chunks:
                break
        return chunks

    @staticmethod
    async def run_stream_end(ran: list[Plugin], ctx: RequestContext) -> list[dict[str, Any]]:
        # A plugin's released chunks still pass through the plugins above it.
        pending: list[dict[str, Any]] = []
        for idx in range(len(ran) - 1, -1, -1):
            plugin = ran[idx]
            out: list[dict[str, Any]] = []
            for c in pending:
                out.extend(await plugin.on_chunk(ctx, c))
            out.extend(await plugin.on_stream_end(ctx))
            pending = out
        return pending

    @staticmethod
    async def run_response(ran: list[Plugin], ctx: RequestContext) -> None:
        for plugin in reversed(ran):
            await plugin.on_response(ctx)
