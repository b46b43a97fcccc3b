"""Anthropic's errors (``{"type": "error", "error": {...}}``, as a body or a stream event) as
the gateway's OpenAI-shaped ones."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gateway.errors import GatewayError
from gateway.providers.errors import error_for_status

#: Anthropic error ``type`` → the HTTP status it comes with (stream errors carry no status).
ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "billing_error": 402,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


def error_from_body(
    obj: Any, headers: Mapping[str, str], status: int | None = None
) -> GatewayError:
    """The gateway error for an Anthropic error (``{"type":"error","error":{...}}``).

    529 ``overloaded_error`` means what OpenAI's 503 means: retryable elsewhere.
    """
    err = obj.get("error") if isinstance(obj, dict) else None
    err = err if isinstance(err, dict) else {}
    if status is None:
        status = ERROR_STATUS.get(str(err.get("type")), 500)
    if status == 529:
        status = 503
    message = str(err.get("message") or "")[:500]
    code: str | None = None
    param: str | None = None
    if status == 400 and (
        message.startswith("prompt is too long") or "exceed context limit" in message
    ):
        # "prompt is too long: 208310 tokens > 200000 maximum", "input length and `max_tokens`
        # exceed context limit: ...": what OpenAI calls context_length_exceeded, which
        # clients test for to trim the history.
        code, param = "context_length_exceeded", "messages"
    return error_for_status(status, headers, message, "anthropic", code=code, param=param)
