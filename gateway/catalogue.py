"""The model catalogue: public model names (and aliases) → deployments."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from gateway.configbase import Strict

if TYPE_CHECKING:
    from gateway.context import Usage


class Price(Strict):
    """USD per million tokens. ``input_per_mtok`` prices every input token the provider's
    prompt cache played no part in; cached prompts are priced apart when configured (left
    out, they cost the input price: nothing changes for a table that does not set them)."""

    input_per_mtok: float = Field(0.0, ge=0)
    output_per_mtok: float = Field(0.0, ge=0)
    #: Input tokens read from the prompt cache (OpenAI ``cached_tokens``: 0.1-0.5x the input
    #: price by model; Anthropic ``cache_read_input_tokens``: 0.1x). Unset: the input price.
    cached_input_per_mtok: float | None = Field(None, ge=0)
    #: Input tokens written to the prompt cache (Anthropic ``cache_creation_input_tokens``:
    #: 1.25x the input price for the 5-minute cache, 2x for the hour). Unset: the input price.
    cache_write_per_mtok: float | None = Field(None, ge=0)
    #: Those of them written to Anthropic's one-hour cache (``cache_creation``'s
    #: ``ephemeral_1h_input_tokens``: 2x the input price). Unset: ``cache_write_per_mtok``.
    cache_write_1h_per_mtok: float | None = Field(None, ge=0)

    @property
    def rates(self) -> Rates:
        """Every rate resolved: a cache price left out is the input price (the one-hour cache's,
        the write price)."""
        base = self.input_per_mtok
        cached, write, hour = (
            self.cached_input_per_mtok,
            self.cache_write_per_mtok,
            self.cache_write_1h_per_mtok,
        )
        write_rate = base if write is None else write
        return Rates(
            base, base if cached is None else cached, write_rate,
            write_rate if hour is None else hour, self.output_per_mtok,
        )  # fmt: skip

    @property
    def max_input_rate(self) -> float:
        """The highest price an input token may cost (what a worst-case estimate charges)."""
        return max(self.rates[:4])

    def cost(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
        cache_write_tokens: int = 0, cache_write_1h_tokens: int = 0,
    ) -> float:  # fmt: skip
        """USD for a request (see :meth:`Rates.cost`)."""
        return self.rates.cost(
            prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens,
            cache_write_1h_tokens,
        )  # fmt: skip

    def cost_of(self, usage: Usage) -> float:
        return self.rates.cost_of(usage)


class Rates(NamedTuple):
    """A :class:`Price`'s USD per million tokens, each resolved: plain values, cheap to read on
    every request (a pydantic model's attribute read costs ~10x a tuple's)."""

    input: float
    cached: float
    write: float
    write_1h: float
    output: float

    def cost(
        self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
        cache_write_tokens: int = 0, cache_write_1h_tokens: int = 0,
    ) -> float:  # fmt: skip
        """USD for a request; ``prompt_tokens`` includes the cached and cache-write ones,
        ``cache_write_tokens`` the one-hour cache's."""
        per_mtok = (
            (prompt_tokens - cached_tokens - cache_write_tokens) * self.input
            + cached_tokens * self.cached
            + (cache_write_tokens - cache_write_1h_tokens) * self.write
            + cache_write_1h_tokens * self.write_1h
            + completion_tokens * self.output
        )
        return per_mtok / 1e6

    def cost_of(self, usage: Usage) -> float:
        return self.cost(
            usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens,
            usage.cache_write_tokens, usage.cache_write_1h_tokens,
        )  # fmt: skip


#: No price: every token free.
FREE = Rates(0.0, 0.0, 0.0, 0.0, 0.0)


Capability = Literal["tools", "vision", "json", "streaming", "embeddings"]


class Deployment(Strict):
    """One place that can serve a model: a provider, its upstream model name and base URL."""

    #: Unique id (defaults to ``<model name>/<index>``); used in metrics, logs and headers.
    id: str = ""
    provider: str = "openai"
    #: Model name sent upstream.
    model: str
    base_url: str
    #: Provider key, normally ``${OPENAI_API_KEY}``; empty sends no credentials (local servers).
    api_key: str = Field("", repr=False)
    price: Price = Price()
    context_window: int = Field(128_000, gt=0)
    #: Cap on ``max_tokens`` for this deployment, and the value filled in when a provider needs one.
    max_output_tokens: int = Field(4096, gt=0)
    capabilities: tuple[Capability, ...] = ("tools", "vision", "json", "streaming")
    weight: float = Field(1.0, gt=0)
    #: Extra headers sent upstream (e.g. ``OpenAI-Organization``); values may use ``${ENV}``.
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    #: Ask OpenAI-compatible upstreams for ``stream_options.include_usage`` (most support it).
    stream_usage: bool = True

    @field_validator("provider")
    @classmethod
    def _provider(cls, v: str) -> str:
        from gateway.providers import PROVIDERS

        if v not in PROVIDERS:
            raise ValueError(f"unknown provider {v!r}; allowed: {', '.join(sorted(PROVIDERS))}")
        return v

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018  (raises on a port out of range or not a number)
        except ValueError as e:
            if "@" in v:  # the parser's message quotes a piece of the password
                raise ValueError(
                    "is not a valid URL (percent-encode '/', '?', '#' and '@' in its user and "
                    "password)"
                ) from None
            raise ValueError(f"is not a valid URL: {e}") from None
        if not parts.hostname or any(c.isspace() for c in v):
            raise ValueError("is not a valid URL: it needs a host name and no spaces")
        return v.rstrip("/")


class ModelEntry(Strict):
    """A public model name clients ask for."""

    name: str = Field(min_length=1)
    aliases: tuple[str, ...] = ()
    #: ``chat`` or ``embeddings``: which endpoint this model serves.
    kind: Literal["chat", "embeddings"] = "chat"
    deployments: tuple[Deployment, ...] = Field(min_length=1)
    #: Models to try, in order, when every deployment of this one fails (routing issue).
    fallbacks: tuple[str, ...] = ()
    owned_by: str = "gateway"


class Catalogue:
    def __init__(self, entries: tuple[ModelEntry, ...]) -> None:
        self.entries = entries
        self._by_name: dict[str, ModelEntry] = {}
        for entry in entries:
            for i, dep in enumerate(entry.deployments):
                if not dep.id:
                    object.__setattr__(dep, "id", f"{entry.name}/{i}")
            for name in (entry.name, *entry.aliases):
                self._by_name[name] = entry

    def get(self, name: str) -> ModelEntry | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def deployments(self) -> list[Deployment]:
        return [d for e in self.entries for d in e.deployments]

    def model_names(self) -> set[str]:
        """Every model name a request can carry (names, aliases) or an upstream is asked for."""
        return {*self._by_name, *(d.model for d in self.deployments())}
