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

# A text slot in the body: (container, key) with container[key] a str, and the message role.
Slot = tuple[Any, Any, str]


def _text_parts(content: Any, role: str, out: list[Slot]) -> None:
    if isinstance(content, list):
        out.extend(
            (p, "text", role)
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )


def _descriptions(schema: Any, out: list[Slot], depth: int = 0) -> None:
    """Every ``description`` string of a JSON schema (tool parameters, response formats): text
    the model reads. Bounded in depth; the body's size bounds the rest."""
    if depth > 32:
        return
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "description" and isinstance(value, str):
                out.append((schema, key, DEFINITIONS))
            elif isinstance(value, (dict, list)):
                _descriptions(value, out, depth + 1)
    elif isinstance(schema, list):
        for value in schema:
            if isinstance(value, (dict, list)):
                _descriptions(value, out, depth + 1)


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
        return out
    for msg in body.get("messages") or ():
        role = msg.get("role", "")
        content = msg.get("content")
        if isinstance(content, str):
            out.append((msg, "content", role))
        else:
            _text_parts(content, role, out)
        if len(msg) > 2 or "content" not in msg:  # the usual one is {"role", "content"}
            if isinstance(msg.get("name"), str):
                out.append((msg, "name", role))
            calls = msg.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    out.append((fn, "arguments", role))
            fn = msg.get("function_call")
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                out.append((fn, "arguments", role))
    if len(body) > 2:  # beyond {"model", "messages"}
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
    return out
