"""The Starlette app: routes and lifespan. The request path itself lives in ``proxy``."""

from __future__ import annotations

import hmac
import logging
import os
import sys
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway import metrics, proxy, usage
from gateway.config import ConfigError, Settings, load_settings
from gateway.errors import (
    AuthenticationError,
    GatewayError,
    MethodNotAllowedError,
    ModelNotFoundError,
    NotFoundError,
)
from gateway.logs import setup_logging
from gateway.plugin import StartupError
from gateway.responses import error_response, json_response
from gateway.state import Gateway

log = logging.getLogger("gateway")


class Endpoint:
    """A plain-ASGI endpoint for the proxied routes (no Request/Response objects)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        gw: Gateway = scope["app"].state.gateway
        await proxy.handle(gw, scope, receive, send, self.endpoint)


PROXIED: dict[str, str] = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/embeddings": "embeddings",
    "/embeddings": "embeddings",
}


class GatewayApp:
    """The ASGI entry point: the proxied paths go straight to ``proxy.handle``; everything else
    (and the lifespan) to the Starlette app.

    Starlette's middleware stack and router cost about a fifth of the gateway's CPU per proxied
    request (py-spy, concurrency 32), and ``proxy.handle`` already turns every exception into
    an OpenAI-shaped answer, so the hot path skips them. The match is on the exact ASGI
    ``scope["path"]``, the same value the auth plugin decides on.
    """

    def __init__(self, app: Starlette, gw: Gateway) -> None:
        self.app = app
        self.gateway = gw
        self.state = app.state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            endpoint = PROXIED.get(scope["path"])
            if endpoint is not None:
                await proxy.handle(self.gateway, scope, receive, send, endpoint)
                return
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)
            return
        await self.app(scope, receive, send)

    async def lifespan(self, receive: Any, send: Any) -> None:
        """The ASGI lifespan: startup, then drain and shutdown. A startup that fails on the
        configuration or on something it needs (a key store, a port) is reported as one line
        (the server logs the message and exits 3), not as a traceback."""
        gw = self.gateway
        await receive()  # lifespan.startup
        try:
            await gw.startup()
        except (ConfigError, StartupError) as e:
            await send({"type": "lifespan.startup.failed", "message": f"startup failed: {e}"})
            return
        except Exception:
            log.exception("startup failed")
            await send({"type": "lifespan.startup.failed", "message": "startup failed"})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        try:
            await gw.drain(gw.settings.server.drain_timeout_s)
            await gw.shutdown()
        except Exception:
            log.exception("shutdown failed")
            await send({"type": "lifespan.shutdown.failed", "message": "shutdown failed"})
            return
        await send({"type": "lifespan.shutdown.complete"})


async def authenticate(gw: Gateway, scope: proxy.Scope, endpoint: str) -> proxy.RequestContext:
    """Run the plugins that apply to a non-proxied route (the auth plugin) for this caller."""
    ctx = proxy.new_context(scope, endpoint)
    ran: list[Any] = []
    await gw.pipeline.run_request(ctx, ran)
    return ctx


def visible_models(gw: Gateway, ctx: proxy.RequestContext, names: list[str]) -> list[str]:
    """The ``names`` this caller may see (the plugins' filters, RBAC)."""
    for plugin in gw.pipeline.plugins:
        if plugin.applies_to("models"):
            names = plugin.visible_models(ctx, names)
    return names


def model_object(model_id: str, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owned_by}


async def models(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    try:
        ctx = await authenticate(gw, request.scope, "models")
    except GatewayError as err:
        return error_response(err)
    # Every name a request may use: aliases too (a grant may match an alias and not the name
    # it points to, and OpenAI lists its aliases beside the models they point to).
    ids = [(n, e.owned_by) for e in gw.catalogue.entries for n in (e.name, *e.aliases)]
    names = set(visible_models(gw, ctx, [n for n, _ in ids]))
    data = [model_object(n, owned_by) for n, owned_by in ids if n in names]
    return json_response({"object": "list", "data": data}, headers=ctx.response_headers or None)


async def model(request: Request) -> Response:
    """``GET /v1/models/{model}`` (the SDK's ``models.retrieve``): one model as the listing
    shows it; an alias answers under the name asked for. A model this caller may not see is
    404 like one that does not exist, so the answer reveals nothing about other models."""
    gw: Gateway = request.app.state.gateway
    name = request.path_params["model"]
    try:
        ctx = await authenticate(gw, request.scope, "models")
        entry = gw.catalogue.get(name)
        if entry is None or not visible_models(gw, ctx, [name]):
            raise ModelNotFoundError(
                f"The model '{name[:100]}' does not exist or you do not have access to it.",
                param="model",
            )
    except GatewayError as err:
        return error_response(err)
    return json_response(model_object(name, entry.owned_by), headers=ctx.response_headers or None)


async def healthz(request: Request) -> Response:
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """503 while draining (and "starting" before startup is done, which only an app driven
    without uvicorn can see: uvicorn accepts connections once the lifespan startup is over).
    Open circuit breakers are reported, not fatal: a provider's outage is no reason to take
    this replica out of the load balancer."""
    gw: Gateway = request.app.state.gateway
    if not gw.ready:
        reason = "draining" if gw.draining else "starting"
        return json_response({"status": reason}, status=503)
    body: dict[str, Any] = {"status": "ready"}
    route = gw.pipeline.find("route")
    health = getattr(route, "health", None)
    if callable(health):
        body["routing"] = health()
    return json_response(body)


async def metrics_endpoint(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    token = gw.settings.metrics.bearer_token
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if (
        not token
        or scheme.lower() != "bearer"  # (the scheme is case-insensitive, RFC 9110)
        or not hmac.compare_digest(given.strip().encode(), token.encode())
    ):
        # Not the scrape token: a key (or JWT) whose roles grant the metrics endpoint. With a
        # token set, only an authenticated caller: without an auth plugin, the token alone.
        if token and gw.pipeline.find("auth") is None:
            return error_response(AuthenticationError("invalid credentials"))
        try:
            ctx = await authenticate(gw, request.scope, "metrics")
        except GatewayError as err:
            return error_response(err)
        if token and ctx.identity is None:
            return error_response(AuthenticationError("invalid credentials"))
    body, ctype = metrics.render()
    return Response(body, headers={"content-type": ctype})


async def http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        # (Starlette's exception carries the route's Allow header, which RFC 9110 requires.)
        allow = (exc.headers or {}).get("Allow")
        return error_response(
            MethodNotAllowedError(
                f"method {request.method} not allowed", headers={"allow": allow} if allow else None
            )
        )
    if exc.status_code == 404:
        return error_response(NotFoundError(f"no route for {request.url.path[:200]}"))
    err = GatewayError(str(exc.detail))
    err.status = exc.status_code
    return error_response(err)


async def server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", exc_info=exc)
    return error_response(GatewayError("internal error"))


PROXIED_PATHS = frozenset(PROXIED)


class RequestIdMiddleware:
    """Puts ``X-Request-ID`` (the client's, if well-formed, else a new one) on every response.

    Plain ASGI, and skipped for the proxied paths, which set it themselves: no cost on the hot
    path (``BaseHTTPMiddleware`` would roughly halve throughput)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in PROXIED_PATHS:
            await self.app(scope, receive, send)
            return
        given = next(
            (v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None
        )
        rid = proxy.new_request_id(given).encode()

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                headers.append((b"x-request-id", rid))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


def build_routes(gw: Gateway) -> list[BaseRoute]:
    routes: list[BaseRoute] = [
        Route("/v1/chat/completions", Endpoint("chat")),
        Route("/chat/completions", Endpoint("chat")),
        Route("/v1/embeddings", Endpoint("embeddings")),
        Route("/embeddings", Endpoint("embeddings")),
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        # ``path``: model names may hold slashes ("meta-llama/Llama-3.1-8B-Instruct").
        Route("/v1/models/{model:path}", model, methods=["GET"]),
        Route("/models/{model:path}", model, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    if gw.settings.metrics.enabled and gw.settings.metrics.port == 0:
        routes.append(Route("/metrics", metrics_endpoint, methods=["GET"]))
    routes.extend(usage.routes())
    for plugin in gw.pipeline.plugins:
        extra = getattr(plugin, "routes", None)
        if callable(extra):
            routes.extend(extra())
    return routes


def create_app(settings: Settings, registry: dict[str, Any] | None = None) -> GatewayApp:
    """Build the app for ``settings``; ``registry`` adds plugin classes (tests use it)."""
    gw = Gateway(settings, registry)
    metrics.track_in_flight(gw)

    # (The lifespan is GatewayApp's: Starlette would log a failed startup as a traceback.)
    app = Starlette(
        routes=build_routes(gw),
        middleware=[Middleware(RequestIdMiddleware)],
        exception_handlers={HTTPException: http_exception, Exception: server_error},
    )
    # A path with a stray "/" is 404, not Starlette's 307 to the other spelling: that redirect
    # went to anonymous callers too, to a Location built from the client's Host header.
    app.router.redirect_slashes = False
    app.state.gateway = gw
    return GatewayApp(app, gw)


def app_from_env() -> GatewayApp:
    """Factory for ``uvicorn --factory`` (used by ``gateway serve --workers N``)."""
    try:
        settings = load_settings(os.environ.get("GATEWAY_CONFIG", "config.yaml"))
        setup_logging(settings.logging.level)
        return create_app(settings)
    except ConfigError as e:
        # A worker process: one line, and uvicorn's "failed to start" exit status.
        print(f"configuration error:\n{e}", file=sys.stderr)
        raise SystemExit(3) from None
