"""Headers are rewritten in exactly one place: here."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)

#: Client credentials and identity headers that must never travel upstream.
CLIENT_CREDENTIALS = frozenset(
    {
        "authorization",
        "x-api-key",
        "api-key",
        "cookie",
        "openai-organization",
        "openai-project",
        "anthropic-version",
        "anthropic-beta",
        "x-goog-api-key",
    }
)

#: Set by the gateway or the HTTP client itself, never copied from the client. The body sent
#: upstream is the one the gateway parsed and re-serialised: the client's ``content-encoding``
#: does not describe it (an upstream that believed it failed with a 5xx, which counted against
#: the deployment's circuit breaker for every caller).
MANAGED = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "accept-encoding",
        "expect",
        "x-request-id",
    }
)

#: Headers some servers and proxies act on: claimed client addresses and the request's "real"
#: method or path. The upstream's client is the gateway; none of these come from it.
OVERRIDES = frozenset(
    {
        "via",
        "x-real-ip",
        "true-client-ip",
        "cf-connecting-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method",
        "x-http-method-override",
        "x-method-override",
    }
)


#: Client headers never copied upstream (checked once per header, in one set).
_DROP = HOP_BY_HOP | CLIENT_CREDENTIALS | MANAGED | OVERRIDES | {"forwarded"}
_DROP_PREFIXES = ("x-forwarded-", "proxy-", "x-gateway-")


def forwarded_headers(client_headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The client's headers that go upstream, names lower-cased, as a list of pairs (repeated
    headers stay repeated).

    Drops hop-by-hop headers (and any the client's ``Connection`` header names), the client's
    credentials and cookies, the gateway's own control headers (``x-gateway-*``), claimed client
    addresses and overrides, and headers the client library manages.
    """
    out: list[tuple[str, str]] = []
    named_by_connection: set[str] | None = None
    for name, value in client_headers:
        # parse_headers' names are lower case already (and their hashes cached): most dropped
        # headers are dropped on this first look, without lower() and a new string to hash.
        if name in _DROP:
            low = name
        else:
            low = name.lower()
            if low not in _DROP and not low.startswith(_DROP_PREFIXES):
                out.append((low, value))
                continue
        if low == "connection":
            if named_by_connection is None:
                named_by_connection = set()
            named_by_connection.update(t.strip().lower() for t in value.split(","))
    if named_by_connection:
        out = [(n, v) for n, v in out if n not in named_by_connection]
    return out


def upstream_request_headers(
    client_headers: Iterable[tuple[str, str]],
    provider_headers: Mapping[str, str],
    extra: Mapping[str, str],
    request_id: str,
) -> list[tuple[str, str]]:
    """The headers sent upstream, as a list of pairs: the client's that may go
    (:func:`forwarded_headers`), the configured extra headers, the provider's credentials, the
    content type and our request id."""
    out = forwarded_headers(client_headers)
    if extra:
        for name, value in extra.items():
            out.append((name.lower(), value))
    if provider_headers:
        for name, value in provider_headers.items():
            out.append((name.lower(), value))
    out.append(("content-type", "application/json"))
    out.append(("x-request-id", request_id))
    return out


#: Upstream response headers worth passing on (renamed so they cannot be confused with ours).
_PASS_UPSTREAM = {
    "x-request-id": "x-upstream-request-id",
    "openai-processing-ms": "openai-processing-ms",
}


#: The same, with the names as sent already encoded.
_PASS_UPSTREAM_RAW = tuple((name, renamed.encode()) for name, renamed in _PASS_UPSTREAM.items())


#: What a request id or a duration looks like (OpenAI: "req_" and 32 hex digits). Anything else
#: (a server echoing the request's Authorization into its request id, say) is not passed on.
_PLAIN_VALUE = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def client_response_headers(
    upstream: Mapping[str, str], secrets: tuple[str, ...] = ()
) -> list[tuple[bytes, bytes]]:
    """The upstream headers passed on: values that look like an id, holding none of the
    deployment's ``secrets`` (a server may echo the request's credentials into them; given
    as their leading characters, ``providers.base.marks``, a key cut short counts too)."""
    out = []
    for name, renamed in _PASS_UPSTREAM_RAW:
        value = upstream.get(name)
        if value is None or not _PLAIN_VALUE.fullmatch(value) or "sk-" in value:
            continue
        for secret in secrets:  # (a loop: any() over a generator costs ~2k more)
            if secret in value:
                break
        else:
            out.append((renamed, value.encode()))
    return out
