"""A deployment's credentials in what the upstream sends back: which values are secrets
(:func:`looks_secret`, :data:`CREDENTIAL_HEADER`), and cutting them (and any run of their
leading characters) out of text and bytes (:func:`scrub`, :func:`scrub_bytes`)."""

from __future__ import annotations

import re
from typing import Any

#: A run of at least this many leading characters of a secret is cut out like the whole of it
#: (an upstream quoting a key cut short or masked: ``sk-proj-abcd1234****``); a secret this
#: short or shorter only whole. Searching for this much costs what searching the whole did.
SCRUB_PREFIX = 12


#: Header names whose values are credentials (``Authorization``, Azure's ``api-key``,
#: ``x-api-key``, ``x-goog-api-key``, tokens, cookies, signatures).
CREDENTIAL_HEADER = re.compile(r"auth|key|token|secret|cookie|sign|pass|session", re.IGNORECASE)


def looks_secret(value: str) -> bool:
    """Whether ``value`` looks like a credential rather than a word an answer may contain: 16+
    characters, or 8+ mixing at least two of lower case, upper case and digits, without spaces
    (a ``Bearer <key>`` value is judged by its key)."""
    value = value.removeprefix("Bearer ").removeprefix("bearer ")
    if len(value) < 8 or " " in value:
        return False
    if len(value) >= 16:
        return True
    classes = (
        any(c.islower() for c in value)
        + any(c.isupper() for c in value)
        + any(c.isdigit() for c in value)
    )
    return classes >= 2


def marks(secrets: tuple[str, ...]) -> tuple[str, ...]:
    """What to search for, cheaply, before scrubbing: each secret's leading characters."""
    return tuple(dict.fromkeys(s[:SCRUB_PREFIX] for s in secrets))


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """``text`` with each of ``secrets`` (a deployment's key and header values) cut out, and
    any run of their first ``SCRUB_PREFIX`` or more characters."""
    for secret in secrets:
        if text.find(secret[:SCRUB_PREFIX]) != -1:
            text = _cut(text, secret, "[REDACTED]")
    return text


def scrub_bytes(data: bytes, secrets: tuple[bytes, ...]) -> bytes:
    """``scrub`` for UTF-8 bytes (``secrets``: the secrets' UTF-8)."""
    for secret in secrets:
        if data.find(secret[:SCRUB_PREFIX]) != -1:
            data = _cut(data, secret, b"[REDACTED]")
    return data


def _cut(text: Any, secret: Any, redacted: Any) -> Any:
    head = secret[:SCRUB_PREFIX]
    out: list[Any] = []
    done = 0
    at = text.find(head)
    while at != -1:
        end, n = at + len(head), len(head)
        while n < len(secret) and text[end : end + 1] == secret[n : n + 1]:
            end, n = end + 1, n + 1
        out += (text[done:at], redacted)
        done = end
        at = text.find(head, end)
    out.append(text[done:])
    return text[:0].join(out)
