"""The long-lived state of one gateway process, created in the app lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from typing import TYPE_CHECKING, Any

from gateway import metrics, tokens
from gateway.catalogue import Catalogue
from gateway.config import ConfigError
from gateway.disconnect import WatchQueue
from gateway.ledger.metrics import UsageMetrics
from gateway.logs import RequestLog
from gateway.pipeline import Pipeline, build_pipeline
from gateway.providers import provider_class
from gateway.providers.base import TimeoutQueue, make_session
from gateway.validate import RequestLimits

if TYPE_CHECKING:
    import aiohttp

    from gateway.config import Settings
    from gateway.ledger import Ledger
    from gateway.providers.base import Provider
    from gateway.tracing import Tracing

log = logging.getLogger("gateway")

#: The gateway of this process once started (for the signal handler in ``gateway.cli``).
CURRENT: Gateway | None = None


class Gateway:
    """Settings, catalogue, pipeline, the one upstream client and the providers.

    Plugins receive it in ``startup`` to reach the catalogue, the shared HTTP session and their
    peers (``gateway.pipeline.find("guard")``).
    """

    def __init__(self, settings: Settings, registry: dict[str, Any] | None = None) -> None:
        self.settings = settings
        #: Settings read on every request, as plain values (a pydantic attribute read costs
        #: ~400 instructions; settings are frozen).
        self.request_limits = RequestLimits(settings.requests)
        #: The body-read deadline of every request, on one loop timer.
        self.body_deadline = TimeoutQueue(settings.requests.body_timeout_s)
        self.include_text = settings.logging.include_text
        self.catalogue = Catalogue(settings.models)
        self.pipeline = Pipeline(build_pipeline(settings, registry))
        try:
            self.request_log = RequestLog(settings.logging.request_log)
        except OSError as e:
            raise ConfigError(
                f"{settings.source}: logging.request_log: cannot open "
                f"{settings.logging.request_log!r}: {e.strerror}"
            ) from None
        self.session: aiohttp.ClientSession | None = None
        self._metrics_server: asyncio.Server | None = None
        self.providers: dict[str, Provider] = {}
        #: Called with (ctx, log record) once per request, after the request log line is built
        #: (the usage ledger, tracing). Must not block: hand work to a background task.
        self.observers: list[Any] = [UsageMetrics(settings.metrics)]
        #: The usage ledger (``ledger.url``) and the tracer (``tracing.enabled``), or None.
        self.ledger: Ledger | None = None
        self.tracer: Tracing | None = None
        self.ready = False
        self.draining = False
        self.in_flight = 0
        #: The delayed starts of the requests' disconnect watches (one loop timer for all).
        self.watches = WatchQueue()
        self._flusher: asyncio.Task[None] | None = None
        self._started: list[Any] = []

    async def startup(self) -> None:
        # Load the BPE tables the configured models count with now (~0.3 s of CPU each) rather
        # than on the first request that counts. Only those: o200k holds ~70 MB resident and
        # cl100k ~30 MB, and most catalogues need one of them.
        for name in sorted({tokens.encoding_name(m) for m in self.catalogue.model_names()}):
            await asyncio.to_thread(tokens.encoding, name)
        self.session = make_session(self.settings.upstream)
        for dep in self.catalogue.deployments():
            cls = provider_class(dep.provider)
            self.providers[dep.id] = cls(dep, self.session, self.settings.upstream)
        try:
            await self._start_observability()
            for plugin in self.pipeline.plugins:
                await plugin.startup(self)
                self._started.append(plugin)
            if self.settings.metrics.enabled and self.settings.metrics.port:
                from gateway import metrics_server

                self._metrics_server = await metrics_server.start(self.settings.metrics)
        except BaseException:
            await self.shutdown()
            raise
        self._flusher = asyncio.create_task(self._flush_logs())
        # What startup built (config, compiled rules, tokenizer tables, models: ~85k objects)
        # lives as long as the process: move it out of the collector's sight, so that the full
        # collections that request garbage triggers do not walk it again each time (~20k
        # instructions per request on average). Reference counting still frees these objects.
        gc.collect()
        gc.freeze()
        self.ready = True
        global CURRENT
        CURRENT = self
        log.info(
            "gateway ready",
            extra={
                "models": self.catalogue.names(),
                "pipeline": [p.name for p in self.pipeline.plugins],
            },
        )

    async def _start_observability(self) -> None:
        if self.settings.ledger.url != "none":
            from gateway.ledger import Ledger

            self.ledger = Ledger(self.settings.ledger)
            await self.ledger.start()
            self.observers.append(self.ledger.observe)
        if self.settings.tracing.enabled:
            from gateway.tracing import Tracing

            models = {d.id: d.model for d in self.catalogue.deployments()}
            self.tracer = Tracing(self.settings.tracing, models)
            self.observers.append(self.tracer)

    async def _flush_logs(self) -> None:
        """Every second: the request log's buffer to its file, and (worker processes) the
        metrics counted since to the files ``/metrics`` aggregates."""
        while True:
            await asyncio.sleep(1.0)
            self.request_log.flush()
            try:
                metrics.flush()
            except Exception:  # (a full disk, say: the next second tries again)
                log.exception("metrics flush failed")

    async def drain(self, timeout_s: float) -> None:
        """Turn ``/readyz`` to 503 and wait (up to ``timeout_s``) for in-flight requests."""
        self.draining = True
        self.ready = False
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        # Polled: the in-flight count is a plain integer on the hot path, no event to set.
        while self.in_flight > 0 and loop.time() < end:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def shutdown(self) -> None:
        self.ready = False
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        for plugin in reversed(self._started):
            try:
                await plugin.shutdown()
            except Exception:
                log.exception("plugin shutdown failed", extra={"plugin": plugin.name})
        self._started.clear()
        if self.session is not None:
            await self.session.close()
            self.session = None
        self.request_log.close()
        # After the plugins and the log: every request has been accounted by now.
        if self.ledger is not None:
            await self.ledger.close()
            self.ledger = None
        if self.tracer is not None:
            self.tracer.shutdown()
            self.tracer = None
        metrics.flush()  # (worker processes: the last counts, and no request in flight)
