"""Config of the ``route`` plugin: rules, load balancing, breakers, retries and the deadline."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway.configbase import Strict
from gateway.plugin import PluginConfig


class Match(Strict):
    """Conditions of a rule; all given ones must hold (an empty ``when`` always matches)."""

    #: Public model names (or aliases) the rule applies to; empty: any model.
    models: tuple[str, ...] = ()
    #: Caller tiers (``Identity.tier``); a request without an identity matches none.
    tiers: tuple[str, ...] = ()
    #: Caller roles; matches when the caller has any of them.
    roles: tuple[str, ...] = ()
    #: The request defines ``tools`` (true) or not (false).
    tools: bool | None = None
    #: Some message carries an ``image_url`` part.
    images: bool | None = None
    #: ``response_format`` asks for JSON (``json_object`` or ``json_schema``).
    json_mode: bool | None = None
    stream: bool | None = None
    #: Prompt tokens (gateway count) at least this many.
    min_prompt_tokens: int | None = Field(None, ge=0)


class Rule(Strict):
    """First matching rule wins. It names where to go: ``deployments`` (ids, balanced among
    them), a target ``model`` (its deployments and its fallbacks), and/or ``cheapest``."""

    name: str = ""
    when: Match = Match()
    model: str | None = None
    deployments: tuple[str, ...] = ()
    #: Order the eligible deployments by estimated price instead of load balancing.
    cheapest: bool = False
    #: Append the model's ``fallbacks`` chain after the chosen deployments.
    fallbacks: bool = True

    @model_validator(mode="after")
    def _has_action(self) -> Rule:
        if not (self.model or self.deployments or self.cheapest):
            raise ValueError("a rule needs at least one of 'model', 'deployments', 'cheapest'")
        return self


class BreakerConfig(Strict):
    #: Consecutive failed attempts (connect error, timeout, 429, 5xx) that open the breaker.
    failures: int = Field(5, ge=1)
    #: Seconds an open breaker waits before letting one probe request through (half-open).
    cooldown_s: float = Field(30.0, gt=0)


class RetryBudgetConfig(Strict):
    """A token bucket: every request adds ``ratio`` tokens, a retry spends one."""

    ratio: float = Field(0.2, ge=0, le=1)
    #: Tokens added per second regardless of traffic, so a quiet gateway can still retry.
    floor_per_s: float = Field(1.0, ge=0)
    #: Bucket size (also its starting content).
    burst: float = Field(10.0, ge=1)


class RouteConfig(PluginConfig):
    #: Evaluated in order; the first whose ``when`` matches decides.
    rules: tuple[Rule, ...] = ()
    #: Load balancing across the deployments of one model.
    balance: Literal["weighted", "least_busy", "latency"] = "weighted"
    #: A streamed request's deadline: all attempts and waits until its answer begins; no
    #: attempt starts after it, the one in flight is cut at it.
    deadline_s: float = Field(60.0, gt=0)
    #: The same for a plain (non-streamed) request, chat or embeddings, whose answer arrives
    #: whole: so it bounds the whole answer (OpenAI's SDK waits up to 600 s for one).
    plain_deadline_s: float = Field(600.0, gt=0)
    breaker: BreakerConfig = BreakerConfig()
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    #: Longest upstream ``Retry-After`` the gateway waits out when no other deployment is left
    #: (longer ones fail at once with the upstream's Retry-After passed on).
    max_retry_wait_s: float = Field(2.0, ge=0)
    #: Cap on how long a ``Retry-After`` keeps a deployment out of rotation.
    max_retry_after_s: float = Field(300.0, gt=0)
    #: Header naming a deployment id to pin the request to; honoured for ``pin_roles`` only.
    pin_header: str = "x-gateway-deployment"
    pin_roles: tuple[str, ...] = ("admin",)
    #: Add ``x-gateway-deployment`` (the deployment id that answered) to responses.
    expose_deployment: bool = True

    @field_validator("pin_header")
    @classmethod
    def _lower(cls, v: str) -> str:
        if not v or not v.replace("-", "").isalnum():
            raise ValueError("must be a header name (letters, digits and '-')")
        return v.lower()

    #: Weight of the newest sample in the latency moving average (``balance: latency``).
    latency_alpha: float = Field(0.3, gt=0, le=1)
