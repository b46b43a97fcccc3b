"""Reading a request's body: its size bound, its content type, its nesting (before it is
parsed or forwarded anywhere)."""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

from gateway.errors import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

if TYPE_CHECKING:
    from gateway.context import RequestContext


#: Deepest nesting of a request body. orjson parses up to 1,024 levels but serialises only
#: about 254: a deeper body parsed, then failed every later dumps (the upstream request, the
#: cache key, the token count) as a 500.
MAX_JSON_DEPTH = 128


def check_depth(body: Any) -> None:
    """Raise a 400 when ``body`` nests deeper than :data:`MAX_JSON_DEPTH`."""
    level: list[Any] = [body]
    for _ in range(MAX_JSON_DEPTH):
        nxt: list[Any] = []
        for node in level:
            if type(node) is dict:
                nxt.extend(v for v in node.values() if type(v) in (dict, list))
            else:
                nxt.extend(v for v in node if type(v) in (dict, list))
        if not nxt:
            return
        level = nxt
    raise InvalidRequestError(f"request body nests deeper than {MAX_JSON_DEPTH} levels")


async def read_body(receive: Any, ctx: RequestContext, limit: int) -> bytes:
    declared = ctx.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise InvalidRequestError("invalid Content-Length header")
        if int(declared) > limit:
            raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
    message = await receive()
    if message["type"] != "http.disconnect" and not message.get("more_body", False):
        # The whole body in one message (the usual case): no list to join.
        body: bytes = message.get("body", b"")
        if len(body) > limit:
            raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
        return body
    chunks: list[bytes] = []
    size = 0
    while True:
        if message["type"] == "http.disconnect":
            ctx.client_disconnected = True
            raise InvalidRequestError("client disconnected while sending the body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
        message = await receive()
    return b"".join(chunks)


def check_content_type(ctx: RequestContext) -> None:
    ctype = ctx.headers.get("content-type", "")
    if ctype != "application/json" and ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise UnsupportedMediaTypeError("Content-Type must be application/json")


#: Content codings a request body may be sent in (gzip, or deflate: the zlib format, RFC 9110).
_CODINGS = frozenset({"gzip", "x-gzip", "deflate"})


def decode_body(ctx: RequestContext, raw: bytes, limit: int) -> bytes:
    """``raw`` decoded as its ``Content-Encoding`` says: gzip and deflate are decompressed, at
    most ``limit`` bytes of them (413 past it: a small compressed body may expand a
    thousandfold); another coding is a 415 naming it. A body that is already a JSON object is
    taken as it is, whatever the header says (clients that label a plain body were served
    before compressed ones were)."""
    codings = [
        c for c in (t.strip().lower() for t in ctx.headers["content-encoding"].split(","))
        if c and c != "identity"
    ]  # fmt: skip
    if not codings or raw.lstrip()[:1] == b"{":
        return raw
    if len(codings) > 1 or codings[0] not in _CODINGS:
        raise UnsupportedMediaTypeError(
            f"Content-Encoding {', '.join(codings)[:60]!r} is not supported; send the body "
            "uncompressed, or compressed with gzip or deflate",
            headers={"accept-encoding": "gzip, deflate"},
        )
    out = b""
    rest = raw
    try:
        while rest:  # (gzip members may follow one another: each is decoded in turn)
            d = zlib.decompressobj(32 + zlib.MAX_WBITS)  # a gzip or zlib header, either
            out += d.decompress(rest, limit + 1 - len(out))
            if len(out) > limit:
                raise PayloadTooLargeError(f"request body is larger than {limit} bytes decoded")
            if not d.eof:
                raise zlib.error("truncated")
            rest = d.unused_data
    except zlib.error:
        raise InvalidRequestError(
            f"request body is not valid {codings[0]} (Content-Encoding: {codings[0]})"
        ) from None
    return out
