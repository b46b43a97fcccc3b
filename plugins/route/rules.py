"""What a request needs, and which rule matches it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway import tokens

if TYPE_CHECKING:
    from gateway.catalogue import Deployment
    from gateway.context import RequestContext
    from plugins.route.config import Match, Rule


#: Answer length assumed for cost ranking when the request sets no ``max_tokens``.
ASSUMED_OUTPUT_TOKENS = 256


@dataclass(slots=True)
class Needs:
    tools: bool
    images: bool
    json_mode: bool
    stream: bool
    #: Tokens requested for the answer (``max_completion_tokens``/``max_tokens``, else 0).
    output_tokens: int
    #: An upper bound on prompt tokens that needs no tokenizer (every token is ≥ 1 byte).
    prompt_bound: int

    def capabilities(self) -> set[str]:
        caps = set()
        if self.tools:
            caps.add("tools")
        if self.images:
            caps.add("vision")
        if self.json_mode:
            caps.add("json")
        if self.stream:
            caps.add("streaming")
        return caps


def _chars(content: Any) -> tuple[int, int]:
    if isinstance(content, str):
        return len(content), 0
    chars = images = 0
    for part in content if isinstance(content, list) else ():
        if isinstance(part, dict):
            if part.get("type") == "image_url":
                images += 1
            chars += len(str(part.get("text") or ""))
    return chars, images


def needs_of(ctx: RequestContext) -> Needs:
    if ctx.endpoint != "chat":
        return Needs(False, False, False, False, 0, 0)
    body = ctx.body
    chars = images = 0
    messages = body.get("messages") or []
    for msg in messages:
        c, i = _chars(msg.get("content"))
        chars += c + len(str(msg.get("tool_calls") or ""))
        images += i
    tools = bool(body.get("tools") or body.get("functions"))
    if tools:
        chars += len(str(body.get("tools") or body.get("functions")))
    fmt = body.get("response_format") or {}
    out = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return Needs(
        tools=tools,
        images=images > 0,
        json_mode=fmt.get("type") in ("json_object", "json_schema"),
        stream=ctx.stream,
        output_tokens=int(out),
        # UTF-8 is at most 4 bytes a character; framing and images as gateway.tokens counts them.
        prompt_bound=4 * chars + 8 * len(messages) + 85 * images + 8,
    )


def prompt_tokens(ctx: RequestContext) -> int:
    return tokens.prompt_tokens(ctx)


#: Each provider's ``output_tokens`` by its name (looked up once).
_OUTPUT_TOKENS: dict[str, Callable[[Deployment, int], int]] = {}


def output_tokens(dep: Deployment, asked: int) -> int:
    """The answer length ``dep``'s provider will ask for (Anthropic's API needs one: without
    the client's, it sends the deployment's ``max_output_tokens``)."""
    fn = _OUTPUT_TOKENS.get(dep.provider)
    if fn is None:
        from gateway.providers import provider_class

        fn = _OUTPUT_TOKENS[dep.provider] = provider_class(dep.provider).output_tokens
    return fn(dep, asked)


def fits(ctx: RequestContext, needs: Needs, dep: Deployment) -> bool:
    """Whether prompt + the output the provider will ask for fit the deployment's context
    window; counts tokens only when the cheap bound says it might not."""
    window = dep.context_window
    out = output_tokens(dep, needs.output_tokens)
    if needs.prompt_bound + out <= window:
        return True
    return prompt_tokens(ctx) + out <= window


def matches(rule: Rule, ctx: RequestContext, needs: Needs) -> bool:
    m: Match = rule.when
    if m.models:
        names = {ctx.model}
        if ctx.model_entry is not None:
            names.add(ctx.model_entry.name)
        if not names & set(m.models):
            return False
    ident = ctx.identity
    if m.tiers and (ident is None or ident.tier not in m.tiers):
        return False
    if m.roles and (ident is None or not set(ident.roles) & set(m.roles)):
        return False
    for flag in ("tools", "images", "json_mode", "stream"):
        want = getattr(m, flag)
        if want is not None and want != getattr(needs, flag):
            return False
    return not (m.min_prompt_tokens is not None and prompt_tokens(ctx) < m.min_prompt_tokens)


def first_match(
    rules: tuple[Rule, ...], ctx: RequestContext, needs: Needs
) -> tuple[int, Rule | None]:
    for i, rule in enumerate(rules):
        if matches(rule, ctx, needs):
            return i, rule
    return -1, None


def estimated_cost(ctx: RequestContext, needs: Needs, dep: Deployment) -> float:
    """Price of this request on ``dep`` (prompt tokens + requested or assumed output)."""
    prompt = prompt_tokens(ctx)
    output = needs.output_tokens or ASSUMED_OUTPUT_TOKENS
    return dep.price.cost(prompt, output)
