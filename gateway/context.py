"""Per-request state. Plugins hold no per-request state of their own: it all travels here."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from collections.abc import Callable

    from gateway.catalogue import Deployment, ModelEntry


@dataclass(slots=True, frozen=True)
class Identity:
    """Who is calling, as established by the ``auth`` plugin. Frozen: an API key's identity is
    one object shared by all of the key's requests."""

    user: str
    tenant: str = "default"
    roles: tuple[str, ...] = ()
    tier: str = "default"
    #: Id of the API key or JWT (``kid``/``jti``) the identity came from: never the secret.
    credential_id: str = ""
    method: str = "api_key"  # "api_key" | "jwt" | "anonymous"


@dataclass(slots=True)
class Usage:
    #: Every input token, cached ones included (OpenAI's ``prompt_tokens``).
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: True when a count is the gateway's (tiktoken): the upstream sent no usage, or a count in
    #: it was not a whole number of tokens.
    estimated: bool = False
    #: Of ``prompt_tokens``, those read from the provider's prompt cache (OpenAI's
    #: ``prompt_tokens_details.cached_tokens``, Anthropic's ``cache_read_input_tokens``) and
    #: those written to it (Anthropic's ``cache_creation_input_tokens``); priced apart.
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    #: Of ``cache_write_tokens``, those written to Anthropic's one-hour cache (priced higher).
    cache_write_1h_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


#: Larger counts are no real usage (a broken or hostile upstream); they would also overflow
#: the ledger's sums.
MAX_TOKENS = 10**12


def token_count(value: Any) -> int | None:
    """``value`` as a token count: a whole, non-negative number (``2000.0`` is 2000), else None
    (booleans, strings, fractions, negatives, NaN and infinities are no count)."""
    if type(value) is int:
        return value if 0 <= value <= MAX_TOKENS else None
    if type(value) is float and value.is_integer() and 0 <= value <= MAX_TOKENS:
        return int(value)
    return None


class ReportedUsage(NamedTuple):
    """An upstream's usage as reported: a count that was missing or invalid is None."""

    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int
    cache_write_tokens: int
    cache_write_1h_tokens: int = 0

    @property
    def complete(self) -> bool:
        return self.prompt_tokens is not None and self.completion_tokens is not None

    def usage(self, estimate: Callable[[], Usage] | None = None) -> Usage:
        """The usage, counts that were missing or invalid taken from ``estimate()`` (called
        only then) and marked estimated: never a silent 0."""
        prompt, completion = self.prompt_tokens, self.completion_tokens
        if not (self.cached_tokens or self.cache_write_tokens) and prompt is not None:
            if completion is not None:  # (the usual usage: nothing to estimate or cap)
                return Usage(prompt, completion)
        estimated = False
        if prompt is None or completion is None:
            guess = estimate() if estimate is not None else Usage()
            estimated = True
            if prompt is None:
                prompt = guess.prompt_tokens
            if completion is None:
                completion = guess.completion_tokens
        # The cache's share cannot exceed the prompt it is part of.
        cached = min(self.cached_tokens, prompt)
        write = min(self.cache_write_tokens, prompt - cached)
        write_1h = min(self.cache_write_1h_tokens, write)
        return Usage(prompt, completion, estimated, cached, write, write_1h)


#: No usage reported: every count is the gateway's estimate.
UNREPORTED = ReportedUsage(None, None, 0, 0)


def reported_usage(data: dict[str, Any]) -> ReportedUsage | None:
    """The ``usage`` of an OpenAI answer or stream event as the upstream reported it, if it has
    one with at least one valid count. A count that is no whole non-negative number (a broken
    or hostile upstream) is None: a negative one would credit budgets and token limits, and 0
    would make the request free."""
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    # (token_count inline for the usual whole counts: a call each costs ~1.5k instructions)
    if type(prompt) is not int or not 0 <= prompt <= MAX_TOKENS:
        prompt = token_count(prompt)
    if type(completion) is not int or not 0 <= completion <= MAX_TOKENS:
        completion = token_count(completion)
    if prompt is None and completion is None:
        return None
    details = usage.get("prompt_tokens_details")
    cached = write = write_1h = 0
    if isinstance(details, dict):
        cached = token_count(details.get("cached_tokens")) or 0
        write = token_count(details.get("cache_write_tokens")) or 0
        if write:
            write_1h = token_count(details.get("cache_write_1h_tokens")) or 0
    return ReportedUsage(prompt, completion, cached, write, write_1h)


def usage_from(data: dict[str, Any], estimate: Callable[[], Usage] | None = None) -> Usage | None:
    """The ``usage`` of an OpenAI answer or stream event, if it has one (see
    :func:`reported_usage`); a missing or invalid count comes from ``estimate()``."""
    usage = data.get("usage")
    if type(usage) is dict:
        # The usual usage (two whole counts in range, nothing read from or written to a prompt
        # cache): the Usage that reported_usage(data).usage() gives, without building either
        # (~10k instructions a request).
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens")
        if (
            type(prompt) is int
            and type(completion) is int
            and 0 <= prompt <= MAX_TOKENS
            and 0 <= completion <= MAX_TOKENS
        ):
            details = usage.get("prompt_tokens_details")
            if not isinstance(details, dict) or not (
                details.get("cached_tokens") or details.get("cache_write_tokens")
            ):
                return Usage(prompt, completion)
    reported = reported_usage(data)
    return reported.usage(estimate) if reported is not None else None


@dataclass(slots=True, init=False)
class RequestContext:
    """Everything known about one request, from parsing to the final log line.

    ``body`` is the parsed, validated JSON body; plugins may rewrite it (the guard redacts, RAG
    injects context) and the provider sends what is there when the pipeline ends.

    ``__init__`` is written out (a field added here must be added there too): the generated one
    calls a factory for each of the six containers and ``perf_counter`` through a default
    factory, ~2k instructions more per request (callgrind).
    """

    request_id: str
    endpoint: str  # "chat" | "embeddings" | "models"
    path: str
    method: str
    headers: dict[str, str]  # lower-cased names; repeated headers joined by ", "
    #: The client's headers as received (pairs, repeats kept), for the upstream header rewrite.
    raw_headers: list[tuple[str, str]]
    body: dict[str, Any]
    client: str = ""
    started: float = field(default_factory=time.perf_counter)
    stream: bool = False
    #: Public model name asked for, and the catalogue entry it resolved to.
    model: str = ""
    model_entry: ModelEntry | None = None
    #: Chosen by the ``route`` plugin (or the first deployment when no route plugin runs).
    deployment: Deployment | None = None
    #: The attempt plan: deployments the core tries in order, moving on only on a retryable
    #: error before the first byte reached the client. The ``route`` plugin fills it; without
    #: one it is the model's first deployment.
    candidates: list[Deployment] = field(default_factory=list)
    #: ``time.perf_counter()`` value after which no further attempt starts (None: no deadline).
    deadline: float | None = None
    #: One entry per upstream attempt: {"deployment", "provider", "status", "error", "ms"}.
    attempt_log: list[dict[str, Any]] = field(default_factory=list)
    identity: Identity | None = None
    #: Prompt tokens as counted by the gateway (filled lazily by ``gateway.tokens``).
    prompt_tokens_estimate: int | None = None
    usage: Usage | None = None
    #: Non-streamed response body (parsed) after the upstream answered; plugins may mutate it.
    response: dict[str, Any] | None = None
    #: A streamed completion's text as the client received it; kept only when
    #: ``logging.include_text`` is on.
    completion_text: str | None = None
    status: int = 0
    error_type: str | None = None
    upstream_started: float | None = None
    upstream_first_byte: float | None = None
    finished: float | None = None
    client_disconnected: bool = False
    #: The upstream failed after its answer began (a stream cut or stalled midway, or ended by
    #: an error event): the routing plugin counts it against the deployment that served.
    upstream_failed: bool = False
    attempts: int = 0
    #: Headers added to the client's response (rate-limit headers, sources, ...).
    response_headers: dict[str, str] = field(default_factory=dict)
    #: Extra headers for the upstream request (never credentials: providers add those).
    upstream_headers: dict[str, str] = field(default_factory=dict)
    #: One scratch dict per plugin name, for data a plugin needs again in its response hooks.
    scratch: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Fields for the request log line that plugins contribute (guard verdict, limit decision, ...).
    log: dict[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        request_id: str,
        endpoint: str,
        path: str,
        method: str,
        headers: dict[str, str],
        raw_headers: list[tuple[str, str]],
        body: dict[str, Any],
        client: str = "",
        started: float | None = None,
        stream: bool = False,
        model: str = "",
        model_entry: ModelEntry | None = None,
        deployment: Deployment | None = None,
        candidates: list[Deployment] | None = None,
        deadline: float | None = None,
        attempt_log: list[dict[str, Any]] | None = None,
        identity: Identity | None = None,
        prompt_tokens_estimate: int | None = None,
        usage: Usage | None = None,
        response: dict[str, Any] | None = None,
        completion_text: str | None = None,
        status: int = 0,
        error_type: str | None = None,
        upstream_started: float | None = None,
        upstream_first_byte: float | None = None,
        finished: float | None = None,
        client_disconnected: bool = False,
        upstream_failed: bool = False,
        attempts: int = 0,
        response_headers: dict[str, str] | None = None,
        upstream_headers: dict[str, str] | None = None,
        scratch: dict[str, dict[str, Any]] | None = None,
        log: dict[str, Any] | None = None,
    ) -> None:
        self.request_id = request_id
        self.endpoint = endpoint
        self.path = path
        self.method = method
        self.headers = headers
        self.raw_headers = raw_headers
        self.body = body
        self.client = client
        self.started = time.perf_counter() if started is None else started
        self.stream = stream
        self.model = model
        self.model_entry = model_entry
        self.deployment = deployment
        self.candidates = [] if candidates is None else candidates
        self.deadline = deadline
        self.attempt_log = [] if attempt_log is None else attempt_log
        self.identity = identity
        self.prompt_tokens_estimate = prompt_tokens_estimate
        self.usage = usage
        self.response = response
        self.completion_text = completion_text
        self.status = status
        self.error_type = error_type
        self.upstream_started = upstream_started
        self.upstream_first_byte = upstream_first_byte
        self.finished = finished
        self.client_disconnected = client_disconnected
        self.upstream_failed = upstream_failed
        self.attempts = attempts
        self.response_headers = {} if response_headers is None else response_headers
        self.upstream_headers = {} if upstream_headers is None else upstream_headers
        self.scratch = {} if scratch is None else scratch
        self.log = {} if log is None else log

    def scratch_for(self, plugin: str) -> dict[str, Any]:
        data = self.scratch.get(plugin)
        if data is None:
            data = self.scratch[plugin] = {}
        return data
