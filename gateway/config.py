"""Loading and validating ``config.yaml``.

Every mistake fails at startup with the file, the key path and what is allowed::

    config.yaml: pipeline[1].config.rpm: Input should be a valid integer (got 'ten')

Secrets come from the environment: ``${NAME}`` (required) or ``${NAME:-default}``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from gateway.catalogue import ModelEntry
from gateway.configbase import Strict
from gateway.redact import SECRET_TYPES


class ConfigError(Exception):
    """A mistake in the configuration; the message names the file and key."""


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=256)
    #: After SIGTERM, seconds ``/readyz`` answers 503 while still serving (in every worker), so
    #: load balancers stop sending new requests before the listener closes.
    drain_delay_s: float = Field(2.0, ge=0)
    #: Then, seconds in-flight requests (streams) get to finish before they are cut.
    drain_timeout_s: float = Field(10.0, ge=0)


class RequestsConfig(Strict):
    """Bounds on what a client may ask for; checked before any plugin runs."""

    max_body_bytes: int = Field(1_048_576, gt=0)
    #: Seconds a client gets to send its whole body once its headers are in: a body that
    #: stops midway held its connection and an in-flight slot until the client left.
    body_timeout_s: float = Field(30.0, gt=0)
    max_tokens: int = Field(32_768, gt=0)
    max_n: int = Field(4, ge=1)
    max_messages: int = Field(1_000, ge=1)
    #: Extra top-level request fields to accept and forward (e.g. vLLM's ``top_k``).
    extra_params: tuple[str, ...] = ()

    @field_validator("extra_params")
    @classmethod
    def _not_forbidden(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from gateway.validate import FORBIDDEN

        refused = sorted(set(v) & FORBIDDEN)
        if refused:
            raise ValueError(
                f"{refused[0]!r} is never accepted from clients (it could redirect the upstream "
                "or its credentials), so it cannot be an extra parameter"
            )
        return v


class UpstreamConfig(Strict):
    """The one shared upstream HTTP client."""

    connect_timeout_s: float = Field(5.0, gt=0)
    #: A streamed request: time until the upstream's response headers and first body bytes.
    first_byte_timeout_s: float = Field(60.0, gt=0)
    #: A plain (non-streamed) request, chat or embeddings: time until its response headers,
    #: which come when the whole answer is written (OpenAI's SDK waits up to 600 s for them).
    response_timeout_s: float = Field(600.0, gt=0)
    #: Longest silence between two reads of an answer once it began: a stream's chunks, a
    #: plain answer's body after its headers.
    read_timeout_s: float = Field(120.0, gt=0)
    #: Hard ceiling on a whole upstream exchange.
    total_timeout_s: float = Field(600.0, gt=0)
    max_connections: int = Field(1_000, ge=1)
    max_connections_per_host: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> UpstreamConfig:
        # A phase's timeout above the whole exchange's could never fire: a mistake in the
        # file (only timeouts set there are checked, so lowering total_timeout_s alone works).
        phases = (
            "connect_timeout_s",
            "first_byte_timeout_s",
            "response_timeout_s",
            "read_timeout_s",
        )
        for name in phases:
            value = getattr(self, name)
            if name in self.model_fields_set and value > self.total_timeout_s:
                raise ValueError(
                    f"{name} ({value:g}) is above total_timeout_s ({self.total_timeout_s:g}), "
                    "so it could never fire; lower it or raise total_timeout_s"
                )
        return self


class MetricsConfig(Strict):
    enabled: bool = True
    #: ``/metrics`` needs ``Authorization: Bearer <token>`` when set; when empty and ``port`` is
    #: 0, it needs a caller the auth plugin admits with the ``metrics`` or ``admin`` role.
    bearer_token: str = Field("", repr=False)
    #: Serve ``/metrics`` on a port of its own instead of the main one (0: on the main port).
    #: That listener needs ``bearer_token`` when one is set, and nothing otherwise: keep it
    #: on an interface only the scraper reaches.
    port: int = Field(0, ge=0, le=65535)
    #: The interface of that listener (``0.0.0.0`` for a scraper on another host).
    host: str = "127.0.0.1"
    #: Tenants that get their own ``tenant`` label value on the cost metrics; every other tenant
    #: is counted as ``other`` (label values come only from configuration).
    tenants: tuple[str, ...] = ()
    #: Users that get per-user series (``gateway_user_*``); empty (the default) means no per-user
    #: metrics at all. Users not listed are counted as ``other``.
    users: tuple[str, ...] = ()


class LoggingConfig(Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: Where the one-line-per-request JSON log goes: ``stdout``, ``stderr``, a file path, or
    #: ``none`` (off).
    request_log: str = "stdout"
    access_log: bool = False
    #: Prompt and completion text in the request log (``prompt_text``, ``completion_text``).
    #: Off by default. When on, the types in ``text_redact`` are replaced by
    #: ``[REDACTED:<type>]`` before anything is written.
    include_text: bool = False
    #: Longest text logged per field; the prompt keeps its end (the latest turn), the
    #: completion its beginning.
    text_max_chars: int = Field(2000, ge=1, le=1_000_000)
    #: What is redacted from logged text: any of the secret/PII types the guard also knows.
    text_redact: tuple[str, ...] = SECRET_TYPES

    @field_validator("text_redact")
    @classmethod
    def _redact_types(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [t for t in v if t not in SECRET_TYPES]
        if unknown:
            raise ValueError(f"unknown type {unknown[0]!r}; allowed: {', '.join(SECRET_TYPES)}")
        return v


class LedgerConfig(Strict):
    """The durable usage ledger (one row per request: tokens, cost, status, latency)."""

    #: ``none`` (off), ``sqlite:///relative/or/absolute/path.db`` or ``postgresql://...``.
    url: str = Field("none", repr=False)
    #: Prefix of the ledger's table names (lets several gateways, or test runs, share a database).
    table_prefix: str = Field("gateway_", pattern=r"^[a-z_][a-z0-9_]{0,40}$")
    #: Rows written per database round trip.
    batch_size: int = Field(200, ge=1, le=10_000)
    #: Longest a row waits in memory before it is written.
    flush_interval_s: float = Field(1.0, gt=0, le=60)
    #: Rows kept in memory while the database is unreachable; beyond that new rows are dropped
    #: (and counted in ``gateway_ledger_rows_dropped_total``).
    max_buffer: int = Field(100_000, ge=1)
    #: On shutdown, how long the last rows may take to reach the database.
    shutdown_timeout_s: float = Field(5.0, ge=0)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v == "none" or v.startswith(("sqlite:///", "postgresql://", "postgres://")):
            return v
        raise ValueError(
            "must be none, sqlite:///path/to/usage.db or postgresql://user@host:5432/db"
        )


class TracingConfig(Strict):
    """OpenTelemetry tracing (optional; needs ``opentelemetry-sdk``)."""

    enabled: bool = False
    #: ``otlp`` (gRPC to ``endpoint``), ``console`` (stderr) or ``memory`` (tests).
    exporter: Literal["otlp", "console", "memory"] = "otlp"
    endpoint: str = "http://127.0.0.1:4317"
    service_name: str = "secure-llm-gateway"
    #: Fraction of new traces sampled (a client's sampled ``traceparent`` is always followed).
    sample_ratio: float = Field(1.0, ge=0, le=1)


class DemoUpstreamConfig(Strict):
    """The built-in fake OpenAI-compatible upstream, started beside the gateway for demos."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9911, ge=1, le=65535)


class PipelineEntry(Strict):
    #: Plugin type, from the registry in ``plugins/__init__.py``.
    name: str
    #: The plugin's own settings, validated by its ``Config`` model.
    config: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True


class Settings(Strict):
    server: ServerConfig = ServerConfig()
    requests: RequestsConfig = RequestsConfig()
    upstream: UpstreamConfig = UpstreamConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    demo_upstream: DemoUpstreamConfig = DemoUpstreamConfig()
    ledger: LedgerConfig = LedgerConfig()
    tracing: TracingConfig = TracingConfig()
    models: tuple[ModelEntry, ...] = Field(min_length=1)
    pipeline: tuple[PipelineEntry, ...] = ()
    #: The file this came from, for error messages.
    source: str = "<memory>"
    internal_keys: ClassVar[frozenset[str]] = frozenset({"source"})


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: YAML would keep the
    last one silently (a second ``pipeline:`` further down the file would drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            line = key_node.start_mark.line + 1
            if key in seen:
                raise _DuplicateKey(f"line {line}: key {key!r} appears twice in one mapping "
                                    f"(first on line {seen[key]})")  # fmt: skip
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


class _DuplicateKey(Exception):
    pass


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _substitute(node: Any, loc: tuple[Any, ...], source: str, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, (*loc, k), source, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, (*loc, i), source, env) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        if "${" in _VAR.sub("", node):
            raise ConfigError(
                f"{source}: {_path(loc)}: malformed environment reference (write ${{NAME}} or "
                "${NAME:-default}; NAME is letters, digits and _, not starting with a digit)"
            )

        def repl(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{source}: {_path(loc)}: environment variable {name} is not set "
                f"(set it, or write ${{{name}:-default}})"
            )

        return _VAR.sub(repl, node)
    return node


def format_validation_error(source: str, err: ValidationError, prefix: tuple[Any, ...] = ()) -> str:
    lines = []
    errors = err.errors()
    for e in errors:
        loc = (*prefix, *e["loc"])
        if e["type"] == "too_short" and any(
            len(o["loc"]) > len(e["loc"]) and o["loc"][: len(e["loc"])] == e["loc"] for o in errors
        ):
            # pydantic's echo of an error inside the list ("at least 1 item after validation,
            # not 0"): the inner error is the one to fix.
            continue
        msg = e["msg"].removeprefix("Value error, ")
        if (
            e["type"] not in ("missing", "value_error")
            and "input" in e
            and not isinstance(e["input"], (dict, list))
        ):
            msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {_path(loc)}: {msg}")
    return "\n".join(lines)


def parse_settings(
    raw: Any, source: str = "<memory>", env: dict[str, str] | None = None
) -> Settings:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    if "source" in raw:
        raise ConfigError(f"{source}: source: unknown key (set by the gateway, not the file)")
    data = _substitute(raw, (), source, dict(os.environ) if env is None else env)
    data["source"] = source
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None
    seen: dict[str, str] = {}
    ids: dict[str, str] = {}  # deployment id -> where it was first given
    for i, entry in enumerate(settings.models):
        for name in (entry.name, *entry.aliases):
            if name in seen:
                raise ConfigError(
                    f"{source}: models[{i}]: model name {name!r} is already used by {seen[name]!r}"
                )
            seen[name] = entry.name
        for j, dep in enumerate(entry.deployments):
            # (the id the catalogue gives a deployment without one)
            dep_id, where = dep.id or f"{entry.name}/{j}", f"models[{i}].deployments[{j}]"
            if dep_id in ids:
                # Providers, breakers and routing are keyed by id: one would take the other's
                # upstream and key.
                raise ConfigError(
                    f"{source}: {where}.id: {dep_id!r} is already the id of {ids[dep_id]}"
                )
            ids[dep_id] = where
    for i, entry in enumerate(settings.models):
        for fb in entry.fallbacks:
            if fb not in seen:
                raise ConfigError(f"{source}: models[{i}].fallbacks: unknown model {fb!r}")
    return settings


def load_settings(path: str | os.PathLike[str], env: dict[str, str] | None = None) -> Settings:
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file: {e.strerror}") from None
    except UnicodeDecodeError as e:
        line = e.object[: e.start].count(b"\n") + 1
        raise ConfigError(f"{p}: line {line}: the file is not valid UTF-8") from None
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from None
    except _DuplicateKey as e:
        raise ConfigError(f"{p}: {e}") from None
    return parse_settings(raw, str(p), env)
