"""Prompt and completion text for the request log: opt-in (``logging.include_text``), redacted
before anything is written, and bounded.

Redaction runs on the whole text and only then is it cut, so a secret that straddles the cut
(a private key block, say) is recognised whole and never logged in part. The cost (a scan of
the prompt, at most ``requests.max_body_bytes``) is paid only by gateways that opt in.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from gateway.redact import find_secrets, redact

if TYPE_CHECKING:
    from gateway.config import LoggingConfig
    from gateway.context import RequestContext


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    parts.append(part["text"])
                elif isinstance(part.get("type"), str):
                    parts.append(f"[{part['type']}]")  # images, audio, files: never their data
        return " ".join(parts)
    return ""


def prompt_of(ctx: RequestContext) -> str:
    """The prompt as forwarded (after the pipeline: guard redaction, RAG context), one
    ``role: text`` line per message; for embeddings, the input texts."""
    body = ctx.body
    if ctx.endpoint == "embeddings":
        inp = body.get("input")
        items = inp if isinstance(inp, list) else [inp]
        return "\n".join(i if isinstance(i, str) else "[tokens]" for i in items if i is not None)
    lines = []
    for msg in body.get("messages") or ():
        if isinstance(msg, dict):
            lines.append(f"{msg.get('role', '?')}: {_content_text(msg.get('content'))}")
    return "\n".join(lines)


def completion_of(ctx: RequestContext) -> str | None:
    if ctx.stream:
        return ctx.completion_text
    if not isinstance(ctx.response, dict) or ctx.endpoint != "chat":
        return None
    texts = []
    for choice in ctx.response.get("choices") or ():
        msg = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(msg, dict):
            texts.append(_content_text(msg.get("content")))
    return "\n---\n".join(texts)


def _redacted(text: str, types: frozenset[str], found: Counter[str]) -> str:
    hits = find_secrets(text, types)
    for h in hits:
        found[h.type] += 1
    return redact(text, hits)


def keep_end(text: str, limit: int, types: frozenset[str], found: Counter[str]) -> str:
    """The last ``limit`` characters (the latest turn) of the redacted text."""
    text = _redacted(text, types, found)
    return text if len(text) <= limit else f"[...{len(text) - limit} chars] " + text[-limit:]


def keep_start(text: str, limit: int, types: frozenset[str], found: Counter[str]) -> str:
    """The first ``limit`` characters of the redacted text."""
    text = _redacted(text, types, found)
    return text if len(text) <= limit else text[:limit] + f" [...{len(text) - limit} chars]"


def text_fields(cfg: LoggingConfig, ctx: RequestContext) -> dict[str, Any]:
    """``prompt_text``, ``completion_text`` and ``text_redacted`` (counts by type, never the
    values) for the request log line."""
    types = frozenset(cfg.text_redact)
    found: Counter[str] = Counter()
    out: dict[str, Any] = {}
    prompt = prompt_of(ctx)
    if prompt:
        out["prompt_text"] = keep_end(prompt, cfg.text_max_chars, types, found)
    completion = completion_of(ctx)
    if completion:
        out["completion_text"] = keep_start(completion, cfg.text_max_chars, types, found)
    if found:
        out["text_redacted"] = dict(found)
    return out
