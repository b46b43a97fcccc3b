"""Secrets and PII detection lives in the core (``gateway.redact``): the request log's text
redaction uses it too. Re-exported here for the guard's modules."""

from gateway.redact import (
    SECRET_TYPES,
    SecretHit,
    find_secrets,
    luhn_ok,
    placeholder,
    redact,
)

__all__ = ["SECRET_TYPES", "SecretHit", "find_secrets", "luhn_ok", "placeholder", "redact"]
