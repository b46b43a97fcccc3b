"""The usage API and the cost dashboard, served from the ledger.

- ``GET /v1/usage``: the caller's own usage by day and model (any caller that may list models);
  admins may pass ``tenant`` / ``user`` to see anyone's. ``?format=csv`` exports it.
- ``GET /admin/usage/summary``: totals, time series, top tenants / users / models, error and
  block rates, latency percentiles (admin).
- ``GET /admin/usage/export``: the raw rows as CSV, in pages (``after``: the cursor in the
  previous page's ``x-next-after`` header) (admin).
- ``GET /admin/dashboard``: the cost dashboard page, drawing ``/admin/usage/summary`` (admin).

Every route authenticates through the pipeline's auth plugin (for ``/admin/*`` the plugin
requires the admin role, decided on the ASGI path); without an auth plugin they refuse everyone,
since nobody's usage could be told apart.
"""

from __future__ import annotations

import csv
import io
import time
from datetime import UTC, datetime, timedelta
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.responses import Response
from starlette.routing import Route

from gateway import proxy
from gateway.errors import (
    AuthenticationError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
)
from gateway.ledger import COLUMNS, Filter
from gateway.responses import NO_STORE, error_response, private_json

if TYPE_CHECKING:
    from starlette.requests import Request

    from gateway.context import Identity
    from gateway.ledger import Ledger
    from gateway.state import Gateway

_DAY = 86_400
_DEFAULT_DAYS = 30
_MAX_DAYS = 400
_CSV_DANGEROUS = ("=", "+", "-", "@", "\t", "\r")
_USAGE_FIELDS = (
    "day", "model", "requests", "prompt_tokens", "completion_tokens", "cost_usd", "errors",
    "blocked", "limited", "error_rate", "block_rate", "cached_tokens", "cache_write_tokens",
)  # fmt: skip


async def _identify(request: Request, endpoint: str) -> tuple[Gateway, Identity, bool]:
    gw: Gateway = request.app.state.gateway
    ctx = proxy.new_context(dict(request.scope), endpoint)
    await gw.pipeline.run_request(ctx, [])
    if ctx.identity is None:
        raise AuthenticationError("invalid credentials")
    auth = gw.pipeline.find("auth")
    rbac = getattr(auth, "rbac", None)
    admin = bool(rbac is not None and rbac.grant(ctx.identity.roles).admin)
    return gw, ctx.identity, admin


def _ledger(gw: Gateway) -> Ledger:
    if gw.ledger is None:
        raise NotFoundError("the usage ledger is off (set ledger.url in config.yaml)")
    return gw.ledger


#: Times past this are a client's mistake (a day is still added to a bare ``end`` date, and the
#: answer prints the window as dates: year 10000 has none).
_LAST_TIME = datetime(9000, 1, 1, tzinfo=UTC).timestamp()


def _parse_time(value: str, param: str) -> float:
    try:
        if not value.isascii():  # (str.isdigit and float take other scripts' digits)
            raise ValueError(value)
        if value.isdigit():
            ts = float(value)
        else:
            dt = datetime.fromisoformat(value)
            ts = (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp()
    except (ValueError, OverflowError):
        raise InvalidRequestError(
            f"{param} must be a date (2025-01-31), an ISO 8601 time or epoch seconds", param=param
        ) from None
    if not 0 <= ts < _LAST_TIME:
        raise InvalidRequestError(f"{param} is out of range (1970 to 8999)", param=param)
    return ts


def _text_param(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return None
    if len(value) > 256:
        raise InvalidRequestError(f"{name} is too long", param=name)
    return value


def _filter(request: Request, identity: Identity, admin: bool) -> Filter:
    """The rows this caller asked for and may see. ``end`` as a bare date includes that day."""
    q = request.query_params
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    end = today.timestamp() + _DAY
    if q.get("end"):
        end = _parse_time(q["end"], "end")
        if len(q["end"]) == 10 and not q["end"].isdigit():  # YYYY-MM-DD: through that day
            end += _DAY
    if q.get("start"):
        start = _parse_time(q["start"], "start")
    else:
        start = end - _DEFAULT_DAYS * _DAY
        if start < 0:
            raise InvalidRequestError(
                f"the default start ({_DEFAULT_DAYS} days before end) is before 1970: give start",
                param="start",
            )
    if start >= end:
        raise InvalidRequestError("start must be before end", param="start")
    if end - start > _MAX_DAYS * _DAY:
        raise InvalidRequestError(f"the range may span at most {_MAX_DAYS} days", param="start")
    tenant, user = _text_param(request, "tenant"), _text_param(request, "user")
    if not admin:
        # Only one's own usage: the filter is forced, and asking for someone else's is refused
        # rather than silently narrowed, so a caller never mistakes their own figures for a
        # tenant's.
        if (tenant is not None and tenant != identity.tenant) or (
            user is not None and user != identity.user
        ):
            raise PermissionDeniedError("only admins may see other users' or tenants' usage")
        tenant, user = identity.tenant, identity.user
    return Filter(start=start, end=end, tenant=tenant, user=user)


def _cell(value: Any) -> Any:
    # Neutralise spreadsheet formulas in user- or tenant-supplied strings (CSV injection).
    # (Spreadsheets skip leading whitespace before looking for a formula.)
    if isinstance(value, str) and value.lstrip(" \n").startswith(_CSV_DANGEROUS):
        return "'" + value
    return value


def _csv(
    header: tuple[str, ...], rows: list[Any], filename: str, extra: dict[str, str] | None = None
) -> Response:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([_cell(v) for v in row])
    return Response(
        buf.getvalue(),
        media_type="text/csv; charset=utf-8",
        headers={
            **NO_STORE,
            "content-disposition": f'attachment; filename="{filename}"',
            **(extra or {}),
        },
    )


def _window(flt: Filter) -> dict[str, Any]:
    def iso(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")

    return {"start": iso(flt.start), "end": iso(flt.end), "tenant": flt.tenant, "user": flt.user}


async def usage(request: Request) -> Response:
    try:
        gw, identity, admin = await _identify(request, "models")
        fmt = request.query_params.get("format", "json")
        if fmt not in ("json", "csv"):
            raise InvalidRequestError("format must be json or csv", param="format")
        ledger = _ledger(gw)
        flt = _filter(request, identity, admin)
        data = await ledger.usage(flt)
    except GatewayError as err:
        return error_response(err)
    if fmt == "csv":
        rows = [[item[f] for f in _USAGE_FIELDS] for item in data]
        return _csv(_USAGE_FIELDS, rows, "usage.csv", _TRUNCATED if data.truncated else None)
    return private_json(
        {"object": "list", **_window(flt), "truncated": data.truncated, "data": list(data)}
    )


async def summary(request: Request) -> Response:
    try:
        gw, identity, admin = await _identify(request, "admin")
        ledger = _ledger(gw)
        flt = _filter(request, identity, admin)
        asked = request.query_params.get("bucket")
        bucket = asked or ("hour" if flt.end - flt.start <= 3 * _DAY else "day")
        if bucket not in ("hour", "day"):
            raise InvalidRequestError("bucket must be hour or day", param="bucket")
        # An hourly series asked for that one answer cannot hold is refused, not cut.
        hourly = bucket == "hour"
        data = await ledger.summary(flt, 3600 if hourly else _DAY, strict=hourly and bool(asked))
    except GatewayError as err:
        return error_response(err)
    return private_json({**_window(flt), "bucket": bucket, "generated_at": time.time(), **data})


async def export(request: Request) -> Response:
    try:
        gw, identity, admin = await _identify(request, "admin")
        ledger = _ledger(gw)
        flt = _filter(request, identity, admin)
        after = _cursor(request.query_params.get("after"))
        rows, more = await ledger.rows(flt, after)
    except GatewayError as err:
        return error_response(err)
    # Pages of ROW_LIMIT rows, oldest first; past one, the headers give the next page's cursor.
    extra = {**_TRUNCATED, "x-next-after": f"{more[0]!r}:{more[1]}"} if more else None
    return _csv(COLUMNS, rows, "usage-requests.csv", extra)


_TRUNCATED = {"x-truncated": "true"}


def _cursor(value: str | None) -> tuple[float, str] | None:
    """An export cursor (``x-next-after``: ``<ts>:<row id>``), checked."""
    if not value:
        return None
    ts, _, row_id = value.partition(":")
    try:
        if not value.isascii() or len(value) > 128 or (row_id and not row_id.isalnum()):
            raise ValueError(value)
        at = float(ts)
        if not 0 <= at < _LAST_TIME:  # (NaN too)
            raise ValueError(value)
    except ValueError:
        raise InvalidRequestError(
            "after must be the x-next-after header of the previous page", param="after"
        ) from None
    return at, row_id


@cache
def dashboard_html() -> bytes:
    return resources.files("gateway.dashboard").joinpath("index.html").read_bytes()


#: The page's script and styles are inline (no CDN, nothing fetched but the summary JSON).
_PAGE_HEADERS = {
    **NO_STORE,
    "content-security-policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


async def dashboard(request: Request) -> Response:
    try:
        await _identify(request, "admin")
    except GatewayError as err:
        return error_response(err)
    return Response(dashboard_html(), media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


def routes() -> list[Route]:
    return [
        Route("/v1/usage", usage, methods=["GET"]),
        Route("/admin/usage/summary", summary, methods=["GET"]),
        Route("/admin/usage/export", export, methods=["GET"]),
        Route("/admin/dashboard", dashboard, methods=["GET"]),
    ]


def days_ago(days: int) -> str:
    """``YYYY-MM-DD`` of ``days`` days ago (UTC), for docs and tests."""
    return (datetime.now(UTC) - timedelta(days=days)).strftime("%Y-%m-%d")
