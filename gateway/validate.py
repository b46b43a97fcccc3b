"""Request body validation: the chat and embeddings schemas, checked once before any plugin.

A bad field is a 400 naming the ``param`` (``messages[2].content[0].type``). Fields that would
redirect the upstream or its credentials are refused outright, never forwarded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.config import RequestsConfig
from gateway.errors import InvalidRequestError


class RequestLimits:
    """A :class:`RequestsConfig`'s values as plain attributes, built once per gateway: the core
    reads them on every request, and reading a pydantic model's attribute costs ~400
    instructions."""

    __slots__ = (
        "body_timeout_s", "extra_params", "max_body_bytes", "max_messages", "max_n", "max_tokens"
    )  # fmt: skip

    def __init__(self, cfg: RequestsConfig) -> None:
        self.max_body_bytes = cfg.max_body_bytes
        self.body_timeout_s = cfg.body_timeout_s
        self.max_tokens = cfg.max_tokens
        self.max_n = cfg.max_n
        self.max_messages = cfg.max_messages
        self.extra_params = cfg.extra_params


#: Fields a client might use to steer the gateway's upstream or credentials (LiteLLM and other
#: SDKs accept several of these): always refused.
FORBIDDEN = frozenset(
    {
        "api_base",
        "base_url",
        "api_key",
        "api_version",
        "api_type",
        "extra_headers",
        "headers",
        "extra_query",
        "organization",
        "custom_llm_provider",
        "deployment_id",
        "azure_endpoint",
        "azure_ad_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_region_name",
        "vertex_credentials",
        "vertex_project",
        "proxy",
        "proxies",
        "http_client",
        "timeout",
        "url",
        "endpoint",
    }
)

CHAT_FIELDS = frozenset(
    {
        "model", "messages", "audio", "frequency_penalty", "function_call", "functions",
        "logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata",
        "modalities", "moderation", "n", "parallel_tool_calls", "prediction",
        "presence_penalty", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
        "reasoning_effort", "response_format", "safety_identifier", "seed",
        "service_tier", "stop", "store", "stream", "stream_options", "temperature",
        "tool_choice", "tools", "top_logprobs", "top_p", "user", "verbosity",
        "web_search_options",
    }
)  # fmt: skip

#: Gateway extension fields, consumed by plugins and removed before the upstream sees them.
EXTENSION_FIELDS = frozenset({"rag", "use_rag"})

EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions", "user"})

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
PART_TYPES = {
    "system": frozenset({"text"}),
    "developer": frozenset({"text"}),
    "user": frozenset({"text", "image_url", "input_audio", "file"}),
    "assistant": frozenset({"text", "refusal"}),
    "tool": frozenset({"text"}),
    "function": frozenset({"text"}),
}


_CHAT_ALLOWED = CHAT_FIELDS | EXTENSION_FIELDS
# The fast path of _check_fields (all keys known) relies on this.
assert FORBIDDEN.isdisjoint(_CHAT_ALLOWED | EMBEDDING_FIELDS)


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def _check_fields(body: dict[str, Any], allowed: frozenset[str], extra: tuple[str, ...]) -> None:
    if allowed.issuperset(body):  # the usual case: only standard fields, none forbidden
        return
    for key in body:
        if key in FORBIDDEN:
            raise InvalidRequestError(
                f"'{key}' is not allowed: the gateway decides where requests go and with which "
                "credentials",
                param=key,
                code="forbidden_parameter",
            )
        if key not in allowed and key not in extra:
            raise InvalidRequestError(
                f"Unrecognized request argument supplied: {key}", param=key,
                code="unknown_parameter",
            )  # fmt: skip


def _number(body: dict[str, Any], key: str, lo: float, hi: float) -> None:
    v = body.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise _bad(f"'{key}' must be a number between {lo:g} and {hi:g}", key)


def _int(body: dict[str, Any], key: str, lo: int, hi: int) -> None:
    v = body.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"'{key}' must be an integer between {lo} and {hi}", key)


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required and must be a non-empty string", "model")
    if len(model) > 256:
        raise _bad("'model' is too long", "model")
    return model


_PLAIN_ROLES = ROLES - {"tool"}


def _message(i: int, msg: Any) -> None:
    if not isinstance(msg, dict):
        raise _bad(f"'messages[{i}]' must be an object", f"messages[{i}]")
    role = msg.get("role")
    content = msg.get("content")
    # The usual message ({"role", "content": str}, not a tool answer): nothing more to check.
    if len(msg) == 2 and type(content) is str and type(role) is str and role in _PLAIN_ROLES:
        return
    _check_message(f"messages[{i}]", msg, role, content)


def _check_message(where: str, msg: dict[str, Any], role: Any, content: Any) -> None:
    # isinstance first: an unhashable role (a list, an object) would make ``in`` raise.
    if not isinstance(role, str) or role not in ROLES:
        raise _bad(f"'{where}.role' must be one of {', '.join(sorted(ROLES))}", f"{where}.role")
    if content is None:
        # An assistant's content may be null (a tool call, a refusal), and so may a legacy
        # function result's (the API reference and the SDK's types say "string or null").
        if role != "assistant" and role != "function":
            raise _bad(f"'{where}.content' is required", f"{where}.content")
    elif isinstance(content, list):
        allowed = PART_TYPES[role]
        for j, part in enumerate(content):
            pw = f"{where}.content[{j}]"
            if not isinstance(part, dict):
                raise _bad(f"'{pw}' must be an object", pw)
            ptype = part.get("type")
            if not isinstance(ptype, str) or ptype not in allowed:
                raise _bad(
                    f"'{pw}.type' must be one of {', '.join(sorted(allowed))} for role {role}",
                    f"{pw}.type",
                )
            if ptype == "text" and not isinstance(part.get("text"), str):
                raise _bad(f"'{pw}.text' must be a string", f"{pw}.text")
            if ptype == "image_url":
                img = part.get("image_url")
                if not isinstance(img, dict) or not isinstance(img.get("url"), str):
                    raise _bad(f"'{pw}.image_url.url' must be a string", f"{pw}.image_url")
    elif not isinstance(content, str):
        raise _bad(f"'{where}.content' must be a string or an array of parts", f"{where}.content")
    name = msg.get("name")
    if name is not None and not isinstance(name, str):
        raise _bad(f"'{where}.name' must be a string", f"{where}.name")
    if role == "tool" and not isinstance(msg.get("tool_call_id"), str):
        raise _bad(f"'{where}.tool_call_id' is required for tool messages", f"{where}.tool_call_id")
    calls = msg.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise _bad(f"'{where}.tool_calls' must be a list on an assistant message",
                       f"{where}.tool_calls")  # fmt: skip
        for j, call in enumerate(calls):
            cw = f"{where}.tool_calls[{j}]"
            if not isinstance(call, dict):
                raise _bad(f"'{cw}' is malformed", cw)
            if call.get("type") == "custom":
                # A custom tool's call replayed ({"name", "input": free text}), as OpenAI takes.
                custom = call.get("custom")
                if not (
                    isinstance(custom, dict)
                    and isinstance(custom.get("name"), str)
                    and isinstance(custom.get("input"), str)
                ):
                    raise _bad(f"'{cw}.custom' must be an object with string 'name' and "
                               "'input'", f"{cw}.custom")  # fmt: skip
            elif not isinstance(call.get("function"), dict):
                raise _bad(f"'{cw}' is malformed", cw)


def _stop(body: dict[str, Any], cfg: RequestLimits) -> None:
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str)
        or (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) for s in stop))
    ):
        raise _bad("'stop' must be a string or an array of up to 4 strings", "stop")


def _tools(body: dict[str, Any], cfg: RequestLimits) -> None:
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be an array", "tools")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("function", {}), dict):
                raise _bad(f"'tools[{i}]' must be an object", f"tools[{i}]")
            if tool.get("type", "function") == "function" and not isinstance(
                (tool.get("function") or {}).get("name"), str
            ):
                raise _bad(f"'tools[{i}].function.name' is required", f"tools[{i}].function.name")


def _response_format(body: dict[str, Any], cfg: RequestLimits) -> None:
    rf = body.get("response_format")
    if rf is not None and (not isinstance(rf, dict) or not isinstance(rf.get("type"), str)):
        raise _bad("'response_format' must be an object with a 'type'", "response_format")


def _typed(key: str, kind: type) -> Callable[[dict[str, Any], RequestLimits], None]:
    def check(body: dict[str, Any], cfg: RequestLimits) -> None:
        v = body.get(key)
        if v is not None and not isinstance(v, kind):
            raise _bad(f"'{key}' has the wrong type", key)

    return check


#: The checks of the optional chat fields, by field, in the order they run: a request with
#: several bad fields is told about the first of this order. Only the fields present are
#: looked at (a request carries a few of them; a check per known field cost ~5k instructions).
_CHAT_CHECKS: dict[str, Callable[[dict[str, Any], RequestLimits], None]] = {
    "temperature": lambda body, cfg: _number(body, "temperature", 0, 2),
    "top_p": lambda body, cfg: _number(body, "top_p", 0, 1),
    "frequency_penalty": lambda body, cfg: _number(body, "frequency_penalty", -2, 2),
    "presence_penalty": lambda body, cfg: _number(body, "presence_penalty", -2, 2),
    "max_tokens": lambda body, cfg: _int(body, "max_tokens", 1, cfg.max_tokens),
    "max_completion_tokens": lambda body, cfg: _int(
        body, "max_completion_tokens", 1, cfg.max_tokens
    ),
    "n": lambda body, cfg: _int(body, "n", 1, cfg.max_n),
    "top_logprobs": lambda body, cfg: _int(body, "top_logprobs", 0, 20),
    "seed": lambda body, cfg: _int(body, "seed", -(2**63), 2**63 - 1),
    "stop": _stop,
    "tools": _tools,
    "response_format": _response_format,
    "user": _typed("user", str),
    "metadata": _typed("metadata", dict),
    "logit_bias": lambda body, cfg: _logit_bias(body),
}
_CHAT_CHECKED = frozenset(_CHAT_CHECKS)


def _logit_bias(body: dict[str, Any]) -> None:
    """Token ids (as strings) to a bias from -100 to 100, as OpenAI takes it."""
    bias = body["logit_bias"]
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise _bad("'logit_bias' must be an object", "logit_bias")
    if len(bias) > 1024:
        raise _bad("'logit_bias' has more than 1024 entries", "logit_bias")
    for key, value in bias.items():
        if not key.isascii() or not key.isdigit():
            raise _bad(f"'logit_bias' keys must be token ids; got {key[:32]!r}", "logit_bias")
        if type(value) not in (int, float) or not -100 <= value <= 100:
            raise _bad("'logit_bias' values must be numbers from -100 to 100", "logit_bias")


def validate_chat(body: dict[str, Any], cfg: RequestLimits) -> str:
    """Validate a chat completion request in place; returns the model name."""
    if not _CHAT_ALLOWED.issuperset(body):
        _check_fields(body, _CHAT_ALLOWED, cfg.extra_params)
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array", "messages")
    if len(messages) > cfg.max_messages:
        raise _bad(f"'messages' has more than {cfg.max_messages} entries", "messages")
    for i, msg in enumerate(messages):
        # The usual message, as in _message, without a call per message.
        if type(msg) is dict and len(msg) == 2:
            role = msg.get("role")
            if type(role) is str and role in _PLAIN_ROLES and type(msg.get("content")) is str:
                continue
        _message(i, msg)
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        if not stream:
            raise _bad("'stream_options' is only allowed when 'stream' is true", "stream_options")
        usage = opts.get("include_usage")
        if usage is not None and type(usage) is not bool:
            raise _bad("'stream_options.include_usage' must be a boolean", "stream_options")
    present = _CHAT_CHECKED.intersection(body)
    if len(present) == 1:
        (key,) = present
        _CHAT_CHECKS[key](body, cfg)
    elif present:
        for key, check in _CHAT_CHECKS.items():
            if key in present:
                check(body, cfg)
    return model


def validate_embeddings(body: dict[str, Any], cfg: RequestLimits) -> str:
    _check_fields(body, EMBEDDING_FIELDS, cfg.extra_params)
    model = _model(body)
    value = body.get("input")
    ok = isinstance(value, str) or (
        isinstance(value, list)
        and value
        and (
            all(isinstance(v, str) for v in value)
            or all(_token_id(v) for v in value)
            or all(isinstance(v, list) and all(_token_id(t) for t in v) for v in value)
        )
    )
    if not ok:
        raise _bad("'input' must be a string, an array of strings, or token arrays", "input")
    # As OpenAI: nothing to embed is the client's mistake, not an upstream call.
    if not value or (type(value) is list and any(v == "" or v == [] for v in value)):
        raise _bad("'input' must not be empty (nor hold an empty string or token array)", "input")
    if isinstance(value, list) and len(value) > 2048:
        raise _bad("'input' has more than 2048 entries", "input")
    fmt = body.get("encoding_format")
    if fmt is not None and fmt not in ("float", "base64"):
        raise _bad("'encoding_format' must be 'float' or 'base64'", "encoding_format")
    _int(body, "dimensions", 1, 65536)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("'user' must be a string", "user")
    return model


def _token_id(v: Any) -> bool:
    """A token id: an int from 0 (no tokenizer has 2**31 tokens)."""
    return type(v) is int and 0 <= v < 2**31
