"""Upstream error statuses and bodies, as the client sees them (every provider maps here)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, NamedTuple

import orjson

from gateway.errors import (
    GatewayError,
    InvalidRequestError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
    UpstreamTimeoutError,
)


def retry_after(headers: Mapping[str, str]) -> str | None:
    """The upstream's wait as whole seconds (what ``Retry-After`` carries to the client):
    ``Retry-After`` in seconds (a decimal rounded up) or as an HTTP date, else OpenAI's
    ``retry-after-ms``; never negative (a date already past is 0). None: none given."""
    value = headers.get("retry-after")
    if value is not None:
        seconds = _seconds(value.strip())
        if seconds is None:
            seconds = _date_seconds(value)
    else:
        ms = _seconds(headers.get("retry-after-ms") or "")
        seconds = None if ms is None else ms / 1000
    return None if seconds is None else str(max(0, math.ceil(seconds)))


def _seconds(value: str) -> float | None:
    if not value.replace(".", "", 1).isdigit():  # (digits and one point: no sign, no "nan")
        return None
    return float(value)


def _date_seconds(value: str) -> float | None:
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # (an HTTP date is GMT; "-0000" parses without a zone)
        when = when.replace(tzinfo=UTC)
    return (when - datetime.now(UTC)).total_seconds()


#: What an upstream's error ``code`` or ``param`` may be to reach the client: an identifier or
#: a field path (``context_length_exceeded``, ``messages[2].content``), nothing longer.
_ERROR_FIELD = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,100}")


class UpstreamErrorBody(NamedTuple):
    """The parts of an upstream's error body that may reach the client."""

    message: str = ""
    code: str | None = None
    param: str | None = None


def _error_field(value: Any) -> str | None:
    return value if isinstance(value, str) and _ERROR_FIELD.fullmatch(value) else None


def upstream_error(body: bytes) -> UpstreamErrorBody:
    """Message, code and param of an OpenAI-style error body (``{"error": {...}}``)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return UpstreamErrorBody()
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return UpstreamErrorBody(
            str(err.get("message") or "")[:500],
            _error_field(err.get("code")),
            _error_field(err.get("param")),
        )
    if isinstance(err, str):
        return UpstreamErrorBody(err[:500])
    return UpstreamErrorBody()


#: What tells OpenAI's SDKs not to retry an error they would otherwise retry (a 5xx).
NO_CLIENT_RETRY = {"x-should-retry": "false"}


def error_for_status(
    status: int,
    headers: Mapping[str, str],
    message: str,
    provider: str,
    *,
    code: str | None = None,
    param: str | None = None,
) -> GatewayError:
    """Map an upstream error status to what the client sees.

    Errors caused by the request itself keep their status, message, ``code`` and ``param``
    (``context_length_exceeded`` on ``messages``: what SDK users and frameworks test for), and
    are never retried elsewhere. Problems with the gateway's own credentials or configuration
    become 502, so a client is never told *its* key is wrong, and the upstream's text (which
    may quote part of the provider key) is not shown.
    """
    if status in (400, 413, 422):
        err = InvalidRequestError(
            message or f"the upstream rejected the request ({status})", code=code, param=param
        )
        err.status = status
        return err
    # (Another deployment may be tried: ``retryable``. The client's SDK should not send the
    # same request again: the gateway's credentials or model table will not have changed a
    # second later, and the openai SDK retried these 502s twice. ``x-should-retry`` is the
    # header OpenAI's SDKs obey.)
    if status in (401, 403):
        return UpstreamError(
            f"the {provider} upstream rejected the gateway's credentials", retryable=True,
            headers=NO_CLIENT_RETRY,
        )  # fmt: skip
    if status == 404:
        return UpstreamError(
            f"the {provider} upstream does not know this model", retryable=True,
            headers=NO_CLIENT_RETRY,
        )  # fmt: skip
    if status in (408, 504):
        return UpstreamTimeoutError(f"the {provider} upstream timed out", retryable=True)
    if status == 429:
        ra = retry_after(headers)
        return RateLimitError(
            f"the {provider} upstream is rate limiting: retry later",
            code="upstream_rate_limited",
            headers={"retry-after": ra} if ra else None,
            retryable=True,
        )
    if status == 503:
        ra = retry_after(headers)
        return ServiceUnavailableError(
            f"the {provider} upstream is unavailable",
            headers={"retry-after": ra} if ra else None,
            retryable=True,
        )
    return UpstreamError(f"the {provider} upstream failed with status {status}", retryable=True)
