"""``metrics.port``: ``GET /metrics`` on a listener of its own, so that the main port (the one
clients reach) does not serve it and a scraper on an internal network needs no API key.

One request per connection (``connection: close``), which is how Prometheus scrapes. With
several workers each binds the port with ``SO_REUSEPORT`` and any of them answers: the worker
metrics are aggregated through files, so every answer is the whole gateway's.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from functools import partial
from typing import TYPE_CHECKING

import orjson

from gateway import metrics
from gateway.plugin import StartupError

if TYPE_CHECKING:
    from gateway.config import MetricsConfig

log = logging.getLogger("gateway.metrics")

#: Longest wait for a request's head, and its largest size.
_HEAD_TIMEOUT_S = 5.0
_HEAD_LIMIT = 16 * 1024


async def start(cfg: MetricsConfig) -> asyncio.Server:
    """Listen on ``cfg.host:cfg.port``; a port that cannot be bound stops the startup."""
    try:
        server = await asyncio.start_server(
            partial(_serve, cfg.bearer_token),
            cfg.host,
            cfg.port,
            reuse_port=True,
            limit=_HEAD_LIMIT,
        )
    except OSError as e:
        raise StartupError(
            f"metrics.port: cannot listen on {cfg.host}:{cfg.port}: {e.strerror}"
        ) from None
    log.info("metrics listener started", extra={"host": cfg.host, "port": cfg.port})
    return server


def _response(status: str, body: bytes, ctype: str, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    ).encode("latin-1") + body


def _error(status: str, message: str, type_: str, extra: str = "") -> bytes:
    body = orjson.dumps({"error": {"message": message, "type": type_, "param": None,
                                   "code": type_}})  # fmt: skip
    return _response(status, body, "application/json", extra)


def answer(head: bytes, token: str) -> bytes:
    """The whole HTTP response to a request whose head (request line and headers) is ``head``."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return _error("400 Bad Request", "malformed request", "invalid_request_error")
    method, target = parts[0], parts[1]
    if target.split("?", 1)[0] != "/metrics":
        return _error("404 Not Found", "only /metrics is served on this port", "not_found_error")
    if method not in ("GET", "HEAD"):
        return _error(
            "405 Method Not Allowed",
            f"method {method[:20]} not allowed",
            "invalid_request_error",
            "allow: GET\r\n",
        )
    if token:
        given = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "authorization":
                given = value.strip()
        scheme, _, credential = given.partition(" ")
        # (the scheme is case-insensitive, RFC 9110)
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            credential.strip().encode(), token.encode()
        ):
            realm = 'www-authenticate: Bearer realm="metrics"\r\n'
            return _error("401 Unauthorized", "invalid credentials", "authentication_error", realm)
    body, ctype = metrics.render()
    out = _response("200 OK", body, ctype)
    return out[: len(out) - len(body)] if method == "HEAD" else out


async def _serve(token: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT_S)
        writer.write(answer(head[:-4], token))
        await writer.drain()
    except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
        pass  # a scraper that went away or never sent a request: nothing to answer
    finally:
        writer.close()
