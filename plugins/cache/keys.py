"""Which requests are cacheable, and the cache key: tenant + canonical request body."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

#: Fields that change nothing in the answer's content and are left out of the key.
_IGNORED = frozenset({"user", "metadata", "store"})


def deterministic(body: dict[str, Any]) -> bool:
    """``temperature: 0`` or an integer ``seed``: the caller asked for a reproducible answer."""
    temperature = body.get("temperature")
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool):
        if temperature == 0:
            return True
    seed = body.get("seed")
    return isinstance(seed, int) and not isinstance(seed, bool)


def _canonical(value: dict[str, Any]) -> bytes:
    # Sorted keys make {"a":1,"b":2} and {"b":2,"a":1} one key; orjson refuses NaN-free floats
    # differently from json, but validated bodies come from orjson.loads, so they round-trip.
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


class HeaderFilter:
    """Which forwarded request headers are part of the key: all but the ignored names and
    prefixes (``CacheConfig.ignore_headers``)."""

    def __init__(self, ignored: tuple[str, ...]) -> None:
        self.names = frozenset(n for n in ignored if not n.endswith("*"))
        self.prefixes = tuple(n[:-1] for n in ignored if n.endswith("*"))

    def key_headers(self, forwarded: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (name, value) pairs of ``forwarded`` that the key includes, sorted (header order
        and the repetition order of distinct names change nothing upstream)."""
        names, prefixes = self.names, self.prefixes
        return sorted((n, v) for n, v in forwarded if n not in names and not n.startswith(prefixes))


#: Forwarded request headers, as ``HeaderFilter.key_headers`` gives them.
KeyHeaders = list[tuple[str, str]] | None


def request_key(
    tenant: str, model: str, body: dict[str, Any], stream: bool, headers: KeyHeaders = None
) -> str:
    """Hex digest over tenant, public model, stream mode, the canonical body and the forwarded
    headers that may change the answer (``HeaderFilter.key_headers``; none leaves the digest as
    it was before headers were part of it)."""
    fields = {k: v for k, v in body.items() if k not in _IGNORED and k != "model"}
    fields["stream"] = stream
    h = hashlib.sha256()
    h.update(orjson.dumps([tenant, model]))
    h.update(b"\0")
    h.update(_canonical(fields))
    if headers:
        h.update(b"\0")
        h.update(orjson.dumps(headers))
    return h.hexdigest()


def shape_key(
    tenant: str, model: str, body: dict[str, Any], stream: bool, headers: KeyHeaders = None
) -> str:
    """Like ``request_key`` without the text of the last user turn: semantic matches only
    within one shape (same tenant, model, tools, temperature, max_tokens ...) and one
    conversation before that turn (system prompt and earlier turns, exactly)."""
    messages = body.get("messages") or ()
    rest = {k: v for k, v in body.items() if k != "messages"}
    last = _last_user(messages)
    rest["messages_before"] = list(messages[:last]) if last >= 0 else list(messages)
    rest["messages_after"] = list(messages[last + 1 :]) if last >= 0 else []
    # What the embedded text leaves out must match exactly: images, audio and file parts,
    # names (the same question about another picture is another question).
    rest["last_beyond_text"] = _beyond_text([messages[last]]) if last >= 0 else []
    return request_key(tenant, model, rest, stream, headers)


def _last_user(messages: Any) -> int:
    """The index of the last user message, or -1."""
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if isinstance(m, dict) and m.get("role") == "user":
            return i
    return -1


def _beyond_text(messages: Any) -> list[Any]:
    """Every message's fields other than its role and text (and its non-text parts)."""
    out: list[Any] = []
    for m in messages:
        if not isinstance(m, dict):
            out.append(m)
            continue
        extra = {k: v for k, v in m.items() if k not in ("role", "content")}
        content = m.get("content")
        if isinstance(content, list):
            extra["parts"] = [
                p for p in content if not (isinstance(p, dict) and p.get("type") == "text")
            ]
        out.append(extra)
    return out


def prompt_text(body: dict[str, Any]) -> str:
    """The text of the last user turn, for embedding (semantic mode): the rest of the
    conversation is in the shape key, exactly. (Embedding the whole conversation let a long
    system prompt fill the model's 256 tokens, so the question itself was never seen and
    every question matched.)"""
    messages = body.get("messages") or ()
    last = _last_user(messages)
    if last < 0:
        return ""
    content = messages[last].get("content")
    if isinstance(content, list):
        content = " ".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return content if isinstance(content, str) else ""
