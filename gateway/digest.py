"""Fixed-size digests of texts, for memos that must not keep the texts themselves.

Token counts (``gateway.tokens``) and the guard classifier's scores are remembered per text
across requests (system prompts, earlier conversation turns and RAG chunks recur). Keyed by a
16-byte BLAKE2b digest, no prompt outlives its request in the gateway's memory.
"""

from __future__ import annotations

import hashlib


def text_digest(text: str, context: str = "") -> bytes:
    """16 bytes of BLAKE2b over ``context`` (what the text is digested for, e.g. an encoding
    name) and ``text``; lone surrogates are hashed as they are, never rejected."""
    h = hashlib.blake2b(context.encode(), digest_size=16)
    h.update(b"\0")
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.digest()
