"""Which strings of a request the guard reads, and the role each counts as."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.context import RequestContext

#: Embedding inputs count as the user's text.
USER_ONLY = frozenset({"user"})

#: The pseudo-role of the text in tool and function definitions and in a response format's
#: schema: written by the application, or by whatever tool server it lists tools from.
DEFINITIONS = "definitions"

#: The pseudo-role of every other string the request carries upstream (schema values such as
#: ``enum`` or ``default``, tool names and call ids, ``metadata``, ``user``, ``stop`` ...): never
#: scanned for injection, but a secret in one leaves with the request like any other.
FIELDS = "fields"

#: The pseudo-role of a ``fields`` string that is a URL: its secrets are found (and blocked,
#: when that is the action) but never redacted in place: a rewritten URL breaks (a signed image
#: URL names its signer's e-mail, and its signature covers it).
URLS = "urls"


def _field_role(value: str) -> str:
    return URLS if value.startswith(("https://", "http://")) else FIELDS


def _inline_media(value: str) -> bool:
    """A base64 ``data:`` URL (an inline image, audio or file: often megabytes, no text)."""
    return value.startswith("data:") and ";base64," in value[:256]


# A text slot in the body: (container, key) with container[key] a str, and the message role.
Slot = tuple[Any, Any, str]

#: Top-level keys whose strings are collected elsewhere, or are no text (the model's name, and
#: the numbers and flags that make most bodies).
_COLLECTED = frozenset({
    "model", "messages", "tools", "functions", "response_format", "prediction",
    "stream", "stream_options", "max_tokens", "max_completion_tokens", "n", "temperature",
    "top_p", "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "seed",
    "parallel_tool_calls", "store", "logit_bias",
})  # fmt: skip
#: Top-level keys that hold no text at all: a body with only these has no slot outside its
#: messages (the usual chat body: model, messages, max_tokens, stream ...).
_NO_TEXT = _COLLECTED - {"tools", "functions", "response_format", "prediction"}
#: Message keys collected as the message's own text, and those that are no text.
_MESSAGE_TEXT = frozenset({"content", "name", "tool_calls", "function_call", "refusal", "role"})


def _text_parts(content: Any, role: str, out: list[Slot]) -> None:
    if isinstance(content, list):
        for p in content:
            if not isinstance(p, dict):
                continue
            if p.get("type") == "text" and isinstance(p.get("text"), str):
                out.append((p, "text", role))
            if len(p) > 2 or p.get("type") != "text":
                # An image's URL (its query string), a file's name, extra keys: sent upstream.
                _other_strings(p, ("type", "text"), out, media=True)


def _descriptions(schema: Any, out: list[Slot], depth: int = 0) -> None:
    """Every string of a JSON schema (tool definitions, response formats): its
    ``description``s are text the model reads as instructions (``definitions``), its other
    strings (``enum``, ``default``, ``title``, ``const``, names ...) reach the model too
    (``fields``). Bounded in depth; the body's size bounds the rest."""
    if depth > 32:
        return
    if isinstance(schema, dict):
        for key, value in schema.items():
            if isinstance(value, str):
                out.append((schema, key, DEFINITIONS if key == "description" else FIELDS))
            elif isinstance(value, (dict, list)):
                _descriptions(value, out, depth + 1)
    elif isinstance(schema, list):
        for i, value in enumerate(schema):
            if isinstance(value, str):
                out.append((schema, i, FIELDS))
            elif isinstance(value, (dict, list)):
                _descriptions(value, out, depth + 1)


def _strings(value: Any, role: str, out: list[Slot], depth: int = 0, media: bool = False) -> None:
    """Every string inside ``value`` (a dict or list), as slots of ``role`` (URLs as ``urls``
    when ``role`` is ``fields``). In a content part (``media``), a base64 ``data:`` URL is an
    inline image or file, not text anyone reads; anywhere else it is scanned like any string
    (a ``data:`` prefix must not hide a key)."""
    if depth > 32:
        return
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, v in items:
        _slot(value, key, v, role, out, depth + 1, media)


def _slot(
    container: Any, key: Any, v: Any, role: str, out: list[Slot], depth: int, media: bool
) -> None:
    """``container[key]`` (``v``) as a slot when a string, or the strings inside it."""
    if isinstance(v, str):
        if not (media and _inline_media(v)):
            out.append((container, key, _field_role(v) if role == FIELDS else role))
    elif isinstance(v, (dict, list)):
        _strings(v, role, out, depth, media)


class Decoded(dict[str, str]):
    """The text of token ids a client sent (embedding inputs as token arrays), as a slot's
    container: scanned like the text, but nothing can be redacted in it (the ids go upstream
    as they came), so a redact action blocks instead."""


def _token_texts(ctx: RequestContext, value: list[Any]) -> list[Slot]:
    """Embedding inputs given as token ids (one array, or arrays), decoded with the
    deployment's tokenizer: a secret or an instruction sent as tokens is still one."""
    from gateway.tokens import encoding_for_model

    arrays = [value] if isinstance(value[0], int) else value
    enc = encoding_for_model(ctx.deployment.model if ctx.deployment else ctx.model)
    out: list[Slot] = []
    for ids in arrays:
        try:
            text = enc.decode_bytes(ids).decode("utf-8", "replace")
        except (KeyError, ValueError, TypeError):  # ids past the vocabulary: no text to read
            continue
        out.append((Decoded(text=text), "text", "user"))
    return out


def request_slots(ctx: RequestContext) -> list[Slot]:
    """Every string of the request the model reads, with the role it counts as: messages'
    text, names and tool-call arguments, tool and response-format definitions, predicted
    output. Secrets are looked for in all of them; injection in the scanned roles'."""
    body = ctx.body
    out: list[Slot] = []
    if ctx.endpoint == "embeddings":
        value = body.get("input")
        if isinstance(value, str):
            out.append((body, "input", "user"))
        elif isinstance(value, list):
            out.extend((value, i, "user") for i, v in enumerate(value) if isinstance(v, str))
            if value and not isinstance(value[0], str):
                out.extend(_token_texts(ctx, value))
        return out
    for msg in body.get("messages") or ():
        role = msg.get("role", "")
        content = msg.get("content")
        if isinstance(content, str):
            out.append((msg, "content", role))
        else:
            _text_parts(content, role, out)
        if len(msg) > 2 or "content" not in msg:  # the usual one is {"role", "content"}
            for key in ("name", "refusal"):
                if isinstance(msg.get(key), str):
                    out.append((msg, key, role))
            calls = msg.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                if not isinstance(call, dict):
                    continue
                fn = call.get("function")
                if isinstance(fn, dict):
                    _call(fn, role, out)
                custom = call.get("custom")
                if isinstance(custom, dict):
                    # A custom tool's free-text input is the message's text like arguments.
                    if isinstance(custom.get("input"), str):
                        out.append((custom, "input", role))
                    _other_strings(custom, ("input",), out)
                _other_strings(call, ("function", "custom"), out)
            fn = msg.get("function_call")
            if isinstance(fn, dict):
                _call(fn, role, out)
            # Any other key (tool_call_id, reasoning_content, audio ...) goes upstream too.
            _other_strings(msg, _MESSAGE_TEXT, out)
    if len(body) > 2 and not body.keys() <= _NO_TEXT:  # beyond {"model", "messages"}
        for key in ("tools", "functions"):
            if body.get(key):
                _descriptions(body[key], out)
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            _descriptions(fmt.get("json_schema"), out)
        prediction = body.get("prediction")
        if isinstance(prediction, dict):
            # The output the caller expects (a file to edit, say): the caller's text.
            if isinstance(prediction.get("content"), str):
                out.append((prediction, "content", "user"))
            else:
                _text_parts(prediction.get("content"), "user", out)
        # user, stop, metadata, tool_choice ...: strings the provider receives (and may keep).
        if not body.keys() <= _COLLECTED:
            _other_strings(body, _COLLECTED, out)
    return out


def _call(fn: dict[str, Any], role: str, out: list[Slot]) -> None:
    """A tool call's (or legacy function call's) arguments as the message's text, its name and
    anything else as ``fields`` (arguments sent as an object, not a JSON string, too)."""
    if isinstance(fn.get("arguments"), str):
        out.append((fn, "arguments", role))
        _other_strings(fn, ("arguments",), out)
    else:
        _other_strings(fn, (), out)


def _other_strings(
    container: dict[str, Any], skip: Any, out: list[Slot], media: bool = False
) -> None:
    """The strings of ``container`` outside the keys in ``skip``, as ``fields`` slots (inline
    media skipped in a content part: ``media``, as in :func:`_strings`)."""
    for key, v in container.items():
        if key not in skip:
            _slot(container, key, v, FIELDS, out, 0, media)
