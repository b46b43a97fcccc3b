"""The plugin contract: one shape for every plugin.

A plugin is one class with a ``name``, a ``Config`` model (unknown keys rejected, every field
documented) and ``async def on_request(ctx) -> Response | None``:

* return ``None`` to continue down the pipeline;
* return a Starlette ``Response`` to answer instead of the upstream (a cache hit);
* raise a :class:`gateway.errors.GatewayError` subclass to deny (401, 403, 429, 400 ...).

Either of the last two stops the pipeline; the upstream is never called. Plugins never build
error JSON themselves.

``on_headers(ctx)`` runs first, for every plugin that has it, before the body is read.

After the upstream answers, the plugins that ran are asked about the response in reverse order:

* ``on_chunk(ctx, chunk) -> list[chunk]`` for each streamed ``chat.completion.chunk`` (a dict).
  Return the chunks to pass on: ``[chunk]`` unchanged, ``[]`` to hold text back (for matching
  across chunk boundaries), several to release held text. Raise a ``GatewayError`` to end the
  stream with a final SSE error event.
* ``on_chunks(ctx, chunks) -> list[chunk]``: what the core actually calls, once per relay
  block: the chunks of the complete events of one upstream read, in order (on a fast upstream
  often the whole answer; on a slow one, usually a single chunk). The default calls
  ``on_chunk`` on each and concatenates the results. A plugin may override it to work on the
  block as a whole (the output guard scans a block's text once, and passes it on as one chunk
  per choice instead of one per event): it returns the chunks to pass on, in order, and may
  merge, drop, rewrite (in place is fine: the core re-serialises every chunk) or add chunks,
  as long as the client-visible text of each choice stays in order. With several plugins, each
  gets the whole block the one below it returned, so the order of calls across plugins is per
  block, not per chunk.
* ``on_stream_end(ctx) -> list[chunk]`` once the upstream stream is over: release held chunks.
* ``text_chunks = True`` (a class attribute) says ``on_chunks`` also takes, and may return, a
  :class:`gateway.envelope.TextChunk`: a run of text-only events of one choice that share one
  envelope, as its text alone (``index``, ``text``; set ``text`` to change it). The relay then
  skips building the run's dict and writes its text straight back into the envelope's bytes.
  Only used when every plugin with a chunk hook sets it; a plugin without it only sees dicts.
* ``on_attempt(ctx, deployment, error, elapsed_s)`` after each upstream attempt, for health
  tracking and circuit breakers (the route plugin).
* ``on_response(ctx)`` once, at the end, streamed or not, success or failure: ``ctx.usage``,
  ``ctx.status`` and (non-streamed) ``ctx.response`` are set. For a non-streamed answer it runs
  before the body is sent and may rewrite ``ctx.response`` or raise; for a stream it runs after
  the last byte, so it only accounts (reconcile limits, cost, logs).

The core only parses streamed chunks when some plugin in the pipeline overrides ``on_chunk``,
``on_chunks`` or ``on_stream_end``: otherwise upstream bytes are relayed as they arrive. A
plugin whose configuration leaves such a hook nothing to do says so in ``uses(hook)`` (asked
once, after ``__init__``): the guard with its output guard off does, so its streams are not
parsed (about 10% less CPU per streamed request in the benchmark's pipeline).

``startup(gateway)``/``shutdown()`` run in the app lifespan; long-lived resources (pools, compiled
rules, models) are created there, never per request. Plugins keep no per-request state on
``self``: use ``ctx.scratch_for(self.name)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from gateway.configbase import Strict

if TYPE_CHECKING:
    from starlette.responses import Response

    from gateway.catalogue import Deployment
    from gateway.config import Settings
    from gateway.context import RequestContext
    from gateway.errors import GatewayError
    from gateway.state import Gateway


class StartupError(RuntimeError):
    """Something a plugin needs at startup is missing or unreachable (a key store, a model
    file): reported as one line and the gateway does not start."""


#: The hooks that make the core parse streamed chunks (see above).
CHUNK_HOOKS = ("on_chunk", "on_chunks", "on_stream_end")


class PluginConfig(Strict):
    """Base of every plugin's ``Config``: unknown keys are an error, values are immutable."""


class Plugin:
    name: ClassVar[str] = ""
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    #: Endpoints this plugin runs on: "chat", "embeddings", "models", "admin", or "*" for all
    #: authenticated routes (the auth plugin).
    endpoints: ClassVar[frozenset[str]] = frozenset({"chat", "embeddings"})
    #: Whether ``on_chunks`` takes ``TextChunk`` items as well as dicts (see above).
    text_chunks: ClassVar[bool] = False

    #: ``hooked``'s answers for this plugin, per hook group.
    _hooks_used: dict[tuple[str, ...], bool] | None = None

    def __init__(self, config: Any) -> None:
        self.config = config
        self._hooks_used = {}

    def check(self, settings: Settings, pipeline: list[str]) -> None:
        """Checks that need the rest of the configuration (``pipeline``: the plugin names in
        order), without I/O: they run in ``gateway check-config`` as well as before serving.
        Raise ``ConfigError`` naming the key."""

    async def startup(self, gateway: Gateway) -> None:
        """Create long-lived resources. ``gateway`` gives the catalogue, settings and peers."""

    async def shutdown(self) -> None:
        """Release what ``startup`` created."""

    async def on_headers(self, ctx: RequestContext) -> None:
        """Before the body is read: only the path, method and headers are known. Raise to deny
        (the auth plugin does, so an anonymous caller learns nothing from body or model errors
        and cannot make the gateway parse a large body)."""
        return None

    async def on_request(self, ctx: RequestContext) -> Response | None:
        return None

    async def on_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        return [chunk]

    async def on_chunks(
        self, ctx: RequestContext, chunks: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        if len(chunks) == 1:
            return await self.on_chunk(ctx, chunks[0])
        out: list[dict[str, Any]] = []
        for chunk in chunks:
            out.extend(await self.on_chunk(ctx, chunk))
        return out

    async def on_stream_end(self, ctx: RequestContext) -> list[dict[str, Any]]:
        return []

    async def on_response(self, ctx: RequestContext) -> None:
        return None

    async def on_attempt(
        self,
        ctx: RequestContext,
        deployment: Deployment,
        error: GatewayError | None,
        elapsed_s: float,
    ) -> None:
        """After each upstream attempt (before any byte reached the client): health, breakers.

        May reorder or trim ``ctx.candidates`` (the attempts still to come)."""
        return None

    def visible_models(self, ctx: RequestContext, names: list[str]) -> list[str]:
        """Filter ``GET /v1/models`` for this caller (RBAC)."""
        return names

    def applies_to(self, endpoint: str) -> bool:
        return "*" in self.endpoints or endpoint in self.endpoints

    @classmethod
    def overrides(cls, hook: str) -> bool:
        return getattr(cls, hook) is not getattr(Plugin, hook)

    def uses(self, hook: str) -> bool:
        """Whether the core should call ``hook`` on this plugin: by default, if its class
        overrides it. A plugin whose configuration switches a hook's work off says False, so
        the core skips it (for the chunk hooks: the stream is relayed without being parsed).
        Asked once per plugin and hook group, after ``__init__``."""
        return self.overrides(hook)
