"""Configuration of the ``limit`` plugin: rules by scope, the store and its failure mode."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from gateway.configbase import Strict
from gateway.plugin import PluginConfig

ScopeName = Literal["user", "tenant", "key", "model", "global"]


class BudgetConfig(Strict):
    """USD that a scope may spend per UTC day and/or per UTC calendar month."""

    day: float | None = Field(None, gt=0)
    month: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _some(self) -> BudgetConfig:
        if self.day is None and self.month is None:
            raise ValueError("budget_usd needs 'day' and/or 'month'")
        return self


class RuleConfig(Strict):
    """One rule: who it counts together (``scope``), whom it applies to, and its limits."""

    #: What is counted together: each user, each tenant, each API key / JWT id, each model
    #: (all callers of it together), or everything (``global``).
    scope: ScopeName
    #: Apply only to identities of this tier (``anonymous`` for callers without an identity).
    tier: str | None = None
    #: Apply only to requests for this public model name; the rule then counts that model apart.
    model: str | None = None
    #: Requests per minute (moving window).
    rpm: int | None = Field(None, gt=0)
    #: Tokens per minute (prompt + max_tokens reserved at admission, reconciled at the end).
    tpm: int | None = Field(None, gt=0)
    #: Requests in flight at once.
    max_parallel: int | None = Field(None, gt=0)
    #: Spend per UTC day / month, from the deployment's price table.
    budget_usd: BudgetConfig | None = None

    @model_validator(mode="after")
    def _has_limit(self) -> RuleConfig:
        if (
            self.rpm is None
            and self.tpm is None
            and self.max_parallel is None
            and self.budget_usd is None
        ):
            raise ValueError(
                "a rule needs at least one limit: rpm, tpm, max_parallel or budget_usd"
            )
        return self


class LimitConfig(PluginConfig):
    #: ``memory`` (one process) or a Redis URL (``redis://host:port/db``, ``rediss://``,
    #: ``unix://``; the ``limits`` library's ``async+redis://`` form is accepted too) so that
    #: several replicas share the counters.
    store: str = "memory"
    #: What to do when the Redis store cannot be reached: admit (and log + count the error)
    #: or answer 503.
    on_store_error: Literal["fail_open", "fail_closed"] = "fail_open"
    #: Completion tokens reserved when a request sets neither ``max_tokens`` nor
    #: ``max_completion_tokens``.
    default_max_tokens: int = Field(4096, gt=0)
    #: Prefix of every Redis key, so several gateways (or tests) can share one Redis.
    key_prefix: str = Field("gwlimit", min_length=1)
    #: Redis socket connect/read timeout: a hung Redis costs a request at most about this.
    socket_timeout_s: float = Field(0.25, gt=0, le=5)
    #: After a store error, requests skip the store (apply ``on_store_error``) for this long,
    #: then the next one tries again: recovery is automatic.
    retry_store_after_s: float = Field(1.0, ge=0)
    #: Safety expiry of a concurrency slot, so a crashed replica cannot hold slots forever.
    #: Keep it above the longest request (``upstream.total_timeout_s``).
    parallel_slot_ttl_s: float = Field(900.0, gt=0)
    rules: tuple[RuleConfig, ...] = Field(min_length=1)

    @field_validator("store")
    @classmethod
    def _store(cls, v: str) -> str:
        if v == "memory":
            return v
        v = v.removeprefix("async+")
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("store must be 'memory' or a redis://, rediss:// or unix:// URL")
        return v
