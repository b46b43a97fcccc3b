"""Building and running the plugin pipeline, in ``config.yaml`` order and nothing else."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from gateway.config import ConfigError, Settings, format_validation_error
from gateway.plugin import CHUNK_HOOKS
from plugins import REGISTRY, plugin_class

if TYPE_CHECKING:
    from collections.abc import Awaitable

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
        # A disabled entry is validated too: its mistakes would otherwise wait for the day
        # someone enables it.
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
        if entry.enabled:
            plugins.append(cls(config))
    names = [p.name for p in plugins]
    for plugin in plugins:
        plugin.check(settings, names)
    return plugins


def hooked(plugins: list[Plugin], *hooks: str) -> list[Plugin]:
    """The plugins of ``plugins`` that use one of ``hooks`` (``Plugin.uses``), in order.
    Calling the base class's no-op hook still costs a coroutine per plugin per request, so the
    core skips it. The answer is kept on the plugin (plugins are fixed at startup)."""
    out = []
    for plugin in plugins:
        # (An attribute, not ``plugin.__dict__``: reading ``__dict__`` makes every later
        # attribute look-up on the plugin slower in CPython 3.11.)
        seen = plugin._hooks_used
        if seen is None:  # a plugin whose __init__ skipped Plugin's
            seen = plugin._hooks_used = {}
        has = seen.get(hooks)
        if has is None:
            has = seen[hooks] = any(plugin.uses(h) for h in hooks)
        if has:
            out.append(plugin)
    return out


class Pipeline:
    def __init__(self, plugins: list[Plugin]) -> None:
        self.plugins = plugins
        self.header_hooks = hooked(plugins, "on_headers")
        self.has_chunk_hooks = bool(hooked(plugins, *CHUNK_HOOKS))
        self.has_attempt_hooks = bool(hooked(plugins, "on_attempt"))
        self.has_response_hooks = bool(hooked(plugins, "on_response"))
        #: Plugins per endpoint, in order (what a plugin applies to is fixed once it is built).
        self._for: dict[str, list[Plugin]] = {}
        #: Per endpoint: the header hooks that apply, and each plugin with whether its
        #: ``on_request`` is called (``uses``: a call that does nothing still costs a coroutine).
        self._headers_for: dict[str, list[Plugin]] = {}
        self._steps_for: dict[str, list[tuple[Plugin, bool]]] = {}
        #: By (endpoint, how many plugins ``run_request`` reached): the response hooks.
        self._responses_for: dict[tuple[str, int], list[Plugin]] = {}

    def find(self, name: str) -> Plugin | None:
        return next((p for p in self.plugins if p.name == name), None)

    def for_endpoint(self, endpoint: str) -> list[Plugin]:
        plugins = self._for.get(endpoint)
        if plugins is None:
            plugins = self._for[endpoint] = [p for p in self.plugins if p.applies_to(endpoint)]
        return plugins

    async def run_headers(self, ctx: RequestContext) -> None:
        plugins = self._headers_for.get(ctx.endpoint)
        if plugins is None:
            plugins = [p for p in self.header_hooks if p.applies_to(ctx.endpoint)]
            self._headers_for[ctx.endpoint] = plugins
        for plugin in plugins:
            await plugin.on_headers(ctx)

    async def run_request(self, ctx: RequestContext, ran: list[Plugin]) -> Response | None:
        """Run ``on_request`` down the list; ``ran`` collects the plugins reached (also those
        whose ``on_request`` is not called: it has nothing to do, their ``uses`` says)."""
        steps = self._steps_for.get(ctx.endpoint)
        if steps is None:
            plugins = self.for_endpoint(ctx.endpoint)
            called = hooked(plugins, "on_request")
            steps = self._steps_for[ctx.endpoint] = [(p, p in called) for p in plugins]
        for plugin, call in steps:
            ran.append(plugin)
            if call:
                answer = await plugin.on_request(ctx)
                if answer is not None:
                    return answer
        return None

    def response_hooks(self, endpoint: str, ran: list[Plugin]) -> list[Plugin]:
        """The plugins of ``ran`` whose ``on_response`` runs, in the order it runs (reverse).
        ``ran`` is what ``run_request`` collected for ``endpoint``: the first ``len(ran)`` of
        ``for_endpoint(endpoint)``, so its length says which they are."""
        key = (endpoint, len(ran))
        hooks = self._responses_for.get(key)
        if hooks is None:
            hooks = self._responses_for[key] = hooked(ran, "on_response")[::-1]
        return hooks

    @staticmethod
    def run_chunks(
        ran: list[Plugin], ctx: RequestContext, chunks: list[Any]
    ) -> Awaitable[list[Any]]:
        """The chunks of one relay block through each plugin's ``on_chunks``, in reverse order:
        each plugin gets the whole list the one below it returned. (Not a coroutine itself: with
        one plugin, the usual case, its ``on_chunks`` is what the caller awaits.)"""
        if len(ran) == 1:
            return ran[0].on_chunks(ctx, chunks)
        return Pipeline._run_chunks(ran, ctx, chunks)

    @staticmethod
    async def _run_chunks(ran: list[Plugin], ctx: RequestContext, chunks: list[Any]) -> list[Any]:
        for plugin in reversed(ran):
            chunks = await plugin.on_chunks(ctx, chunks)
            if not chunks:
                break
        return chunks

    @staticmethod
    def run_stream_end(ran: list[Plugin], ctx: RequestContext) -> Awaitable[list[Any]]:
        """Each plugin's ``on_stream_end``, in reverse order; what one releases still passes
        through the ``on_chunks`` of the plugins above it. (Not a coroutine itself, as above.)"""
        if len(ran) == 1:
            return ran[0].on_stream_end(ctx)
        return Pipeline._run_stream_end(ran, ctx)

    @staticmethod
    async def _run_stream_end(ran: list[Plugin], ctx: RequestContext) -> list[Any]:
        pending: list[Any] = []
        for idx in range(len(ran) - 1, -1, -1):
            plugin = ran[idx]
            out = list(await plugin.on_chunks(ctx, pending)) if pending else []
            out.extend(await plugin.on_stream_end(ctx))
            pending = out
        return pending

    @staticmethod
    async def run_response(ran: list[Plugin], ctx: RequestContext) -> None:
        for plugin in reversed(ran):
            await plugin.on_response(ctx)
