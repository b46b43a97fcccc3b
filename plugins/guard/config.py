"""The guard plugin's configuration (the ``config:`` block of ``- name: guard``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gateway.configbase import Strict
from gateway.plugin import PluginConfig
from plugins.guard.decode import DECODERS
from plugins.guard.output import OutputConfig
from plugins.guard.rules import RulesConfig
from plugins.guard.scanner import MAX_MIDDLE_SCORED
from plugins.guard.schema import InputConfig

SecretAction = Literal["block", "redact", "flag", "allow"]


class NormalizeConfig(Strict):
    #: Encodings decoded and scanned too (the original text is always scanned).
    decode: tuple[Literal["base64", "hex", "rot13", "url"], ...] = DECODERS  # type: ignore[assignment]


class SemanticConfig(Strict):
    enabled: bool = True
    #: Folder of the trained classifier; empty uses the one shipped with the package.
    model_path: str | None = None
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    action: Literal["block", "flag"] = "block"
    #: Roles (of ``scan_roles``) whose texts the classifier scores; the others get the rules
    #: and the secrets checks only. The classifier learnt from people's prompts: tool results
    #: (JSON, web pages, logs) are outside what it knows, and it took 22 of 25 realistic ones
    #: for injections.
    roles: tuple[
        Literal["system", "developer", "user", "assistant", "tool", "function", "definitions"],
        ...,
    ] = ("user",)
    #: Spans of a long text's middle (which the classifier's one window of its first and last
    #: 31 word pieces leaves out) scored as well, those holding the words injections are
    #: written with; each costs one forward pass more (~4-8 ms: 2 would put a 2,000-token
    #: prompt over the guard's 20 ms p99). 0 (the default, for that latency): the middle is
    #: read by the rules alone; 1 is the setting measured in docs/guard_eval.md.
    middle_windows: int = Field(0, ge=0, le=MAX_MIDDLE_SCORED)


class SecretsConfig(Strict):
    """Action per secret/PII type found in prompts: block, redact (before forwarding), flag,
    or allow (not looked for)."""

    api_key: SecretAction = "block"
    private_key: SecretAction = "block"
    jwt: SecretAction = "block"
    credit_card: SecretAction = "redact"
    email: SecretAction = "redact"
    iban: SecretAction = "redact"
    phone: SecretAction = "allow"


class GuardConfig(PluginConfig):
    #: ``enforce`` acts on verdicts; ``shadow`` only logs and counts them (input limits still
    #: apply).
    mode: Literal["enforce", "shadow"] = "enforce"
    input: InputConfig = InputConfig()
    normalize: NormalizeConfig = NormalizeConfig()
    rules: RulesConfig = RulesConfig()
    semantic: SemanticConfig = SemanticConfig()
    secrets: SecretsConfig = SecretsConfig()
    #: Message roles scanned for injection (``tool`` results carry indirect injection);
    #: ``definitions``: the descriptions in ``tools``, ``functions`` and a response format's
    #: schema.
    scan_roles: tuple[
        Literal["system", "developer", "user", "assistant", "tool", "function", "definitions"],
        ...,
    ] = (
        "user",
        "tool",
    )
    output: OutputConfig = OutputConfig()
    #: Prompts with more text than this are swept in a worker thread, off the event loop.
    offload_chars: int = Field(4096, ge=0)
