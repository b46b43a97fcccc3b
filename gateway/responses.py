"""JSON responses for the gateway's own (non-proxied) routes: health, models, usage, admin."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

from gateway.errors import GatewayError

#: For answers about one caller or the gateway's state (usage, keys, admin): never cached.
NO_STORE = {"cache-control": "no-store"}


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status, headers=headers, media_type="application/json")


def private_json(data: Any, status: int = 200) -> Response:
    """``json_response`` marked ``cache-control: no-store``."""
    return json_response(data, status, NO_STORE)


def error_response(err: GatewayError, request_id: str | None = None) -> Response:
    """The OpenAI-shaped error body with its status and headers (``Retry-After``...)."""
    headers = dict(err.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return Response(err.body(), err.status, headers=headers, media_type="application/json")
