"""Input schema and size limits: messages, content length, roles, part types, prompt tokens.

The core's validator already rejects malformed bodies; these are the operator's tighter limits.
Every failure is a 400 naming the limit and the ``param``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from gateway import tokens
from gateway.configbase import Strict
from gateway.errors import ContextLengthError, InvalidRequestError

if TYPE_CHECKING:
    from gateway.context import RequestContext


class InputConfig(Strict):
    max_messages: int = Field(200, ge=1)
    #: Characters of text over all messages (or embedding inputs) of one request.
    max_content_chars: int = Field(200_000, ge=1)
    #: Prompt tokens (gateway count); the target model's context window applies as well.
    max_prompt_tokens: int = Field(100_000, ge=1)
    roles: tuple[str, ...] = ("system", "developer", "user", "assistant", "tool")
    part_types: tuple[str, ...] = ("text", "image_url")


def _chars(content: Any) -> int:
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return 0


def _embedding_chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_embedding_chars(v) for v in value if not isinstance(v, int))
    return 0


def context_window(ctx: RequestContext) -> int | None:
    if ctx.deployment is not None:
        return ctx.deployment.context_window
    if ctx.model_entry is not None and ctx.model_entry.deployments:
        return ctx.model_entry.deployments[0].context_window
    return None


class InputLimits:
    """An :class:`InputConfig`'s values as plain attributes, built once per plugin: reading a
    pydantic model's attribute costs ~450 instructions, and :func:`check_input` runs on every
    request."""

    __slots__ = (
        "_part_set",
        "max_content_chars",
        "max_messages",
        "max_prompt_tokens",
        "part_types",
        "role_set",
        "roles",
    )  # fmt: skip

    def __init__(self, cfg: InputConfig) -> None:
        self.max_messages = cfg.max_messages
        self.max_content_chars = cfg.max_content_chars
        self.max_prompt_tokens = cfg.max_prompt_tokens
        self.roles = cfg.roles
        self.part_types = cfg.part_types
        #: ``role in role_set`` for a role that is a string (an unhashable role would raise).
        self.role_set = frozenset(cfg.roles)
        self._part_set = frozenset(cfg.part_types)

    def part_ok(self, ptype: Any) -> bool:
        return type(ptype) is str and ptype in self._part_set


def check_input(limits: InputLimits, ctx: RequestContext) -> None:
    """Raise ``InvalidRequestError``/``ContextLengthError`` when a limit is exceeded."""
    body = ctx.body
    window = context_window(ctx)
    if ctx.endpoint == "embeddings":
        chars = _embedding_chars(body.get("input"))
        if chars > limits.max_content_chars:
            raise InvalidRequestError(
                f"input is {chars} characters; the limit is {limits.max_content_chars}",
                param="input",
                code="content_too_long",
            )
    else:
        messages = body.get("messages") or []
        if len(messages) > limits.max_messages:
            raise InvalidRequestError(
                f"{len(messages)} messages; the limit is {limits.max_messages}",
                param="messages",
                code="too_many_messages",
            )
        chars = 0
        # Every message a plain {"role", "content": str} (see the token bound below).
        plain = True
        role_set = limits.role_set
        for i, msg in enumerate(messages):
            role = msg.get("role")
            if type(role) is not str or role not in role_set:
                raise InvalidRequestError(
                    f"role {role!r} is not allowed here; allowed: {', '.join(limits.roles)}",
                    param=f"messages[{i}].role",
                )
            content = msg.get("content")
            if type(content) is str:  # the usual message
                chars += len(content)
                if len(msg) != 2:
                    plain = False
                continue
            plain = False
            if isinstance(content, list):
                for j, part in enumerate(content):
                    ptype = part.get("type") if isinstance(part, dict) else None
                    if not limits.part_ok(ptype):
                        raise InvalidRequestError(
                            f"content part type {ptype!r} is not allowed here; "
                            f"allowed: {', '.join(limits.part_types)}",
                            param=f"messages[{i}].content[{j}].type",
                        )
            chars += _chars(content)
        if chars > limits.max_content_chars:
            raise InvalidRequestError(
                f"messages hold {chars} characters; the limit is {limits.max_content_chars}",
                param="messages",
                code="content_too_long",
            )
        if plain and ctx.prompt_tokens_estimate is None and not body.get("tools"):
            # The bound below is then 3 + 3 per message + each text's UTF-8 bytes, at most 4
            # per character: a prompt under both limits by that much passes both checks, and
            # the bound (a second pass over the messages) is not needed.
            most = 3 + 3 * len(messages) + 4 * chars
            if most <= limits.max_prompt_tokens and (window is None or most <= window):
                return
    n = ctx.prompt_tokens_estimate
    if n is None:  # not counted yet (by the limit plugin, for one)
        # A prompt whose byte count is under both limits is under them in tokens too: only a
        # prompt near a limit is tokenized, so that the error can give its exact count.
        n = tokens.prompt_tokens_bound(ctx)
        if n > limits.max_prompt_tokens or (window is not None and n > window):
            n = tokens.prompt_tokens(ctx)
    if window is not None and n > window:
        raise ContextLengthError(
            f"this model's maximum context length is {window} tokens; the prompt has {n} tokens",
            param="input" if ctx.endpoint == "embeddings" else "messages",
        )
    if n > limits.max_prompt_tokens:
        raise ContextLengthError(
            f"the prompt has {n} tokens; the gateway's limit is {limits.max_prompt_tokens}",
            param="input" if ctx.endpoint == "embeddings" else "messages",
        )
