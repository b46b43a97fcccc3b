"""Prompt and completion text in the request log: off by default; when on, redacted before it is
written (canary secrets never appear), bounded, and equal to what the client received."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gateway.config import ConfigError, LoggingConfig, parse_settings
from gateway.context import RequestContext
from gateway.logtext import keep_end, keep_start, text_fields
from gateway.redact import SECRET_TYPES
from tests.helpers import build_config, running_gateway

API_KEY = "sk-proj-CanaryKeyZZ9QvX2mL7tR4wP0nB5cY8dH3jK6"
EMAIL = "jane.canary@example.com"
PEM = ("-----BEGIN PRIVATE KEY-----\n"
       + "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n" * 40
       + "-----END PRIVATE KEY-----")  # fmt: skip
ALL = frozenset(SECRET_TYPES)


def ctx_for(body: dict[str, Any], **over: Any) -> RequestContext:
    ctx = RequestContext(request_id="r", endpoint="chat", path="/v1/chat/completions",
                         method="POST", headers={}, raw_headers=[], body=body)  # fmt: skip
    for k, v in over.items():
        setattr(ctx, k, v)
    return ctx


def test_cut_never_splits_a_secret_into_a_logged_fragment() -> None:
    """A private key block straddling the cut is redacted whole before the text is cut."""
    text = "intro " * 10 + PEM + " tail question?"
    found: Counter[str] = Counter()
    kept = keep_end(text, 40, ALL, found)
    assert "MIIEv" not in kept and kept.endswith("tail question?")
    assert kept.startswith("[...")
    assert found == {"private_key": 1}
    head = keep_start(PEM + " after", 30, ALL, Counter())
    assert head.startswith("[REDACTED:private_key]") and "MIIEv" not in head


def test_text_fields_redact_prompt_and_completion_and_count_by_type() -> None:
    cfg = LoggingConfig(include_text=True, text_max_chars=500)
    body = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": f"my key is {API_KEY}"},
                                     {"type": "image_url", "image_url": {"url": "data:x"}}]},
    ]}  # fmt: skip
    ctx = ctx_for(body, response={"choices": [{"message": {"content": f"write to {EMAIL}"}}]})
    out = text_fields(cfg, ctx)
    assert out["prompt_text"] == "system: Be brief.\nuser: my key is [REDACTED:api_key] [image_url]"
    assert out["completion_text"] == "write to [REDACTED:email]"
    assert out["text_redacted"] == {"api_key": 1, "email": 1}
    only_keys = LoggingConfig(include_text=True, text_redact=("api_key",))
    assert EMAIL in text_fields(only_keys, ctx)["completion_text"]


def test_embeddings_input_is_logged_as_text() -> None:
    ctx = ctx_for({"input": ["alpha", [1, 2, 3], f"beta {EMAIL}"]}, endpoint="embeddings")
    out = text_fields(LoggingConfig(include_text=True), ctx)
    assert out["prompt_text"] == "alpha\n[tokens]\nbeta [REDACTED:email]"
    assert "completion_text" not in out


def test_unknown_redaction_type_fails_at_startup_naming_the_key() -> None:
    raw = build_config(
        "http://127.0.0.1:1", logging={"include_text": True, "text_redact": ["api_key", "ssn"]}
    )
    with pytest.raises(ConfigError) as e:
        parse_settings(raw, "c.yaml")
    assert "c.yaml: logging.text_redact" in str(e.value) and "'ssn'" in str(e.value)
    assert "api_key" in str(e.value)  # the allowed values are listed


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("pipeline", [[], [{"name": "headers", "config": {}}]],
                         ids=["fast-relay", "with-plugins"])  # fmt: skip
def test_logged_text_is_redacted_and_matches_what_the_client_got(
    tmp_path: Path, pipeline: list[dict[str, Any]]
) -> None:
    log_file = tmp_path / "requests.log"
    logging = {"request_log": str(log_file), "include_text": True, "text_max_chars": 300}
    prompt = f"Summarise this. Contact {EMAIL}, token {API_KEY}."
    with running_gateway(pipeline=pipeline, logging=logging) as gw:
        client = gw.openai()
        plain = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": prompt}]
        )
        plain_text = plain.choices[0].message.content or ""
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="demo", messages=[{"role": "user", "content": "hello there"}], stream=True)
            if c.choices
        )  # fmt: skip
        secret_out = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-fake-content": f"the key is {API_KEY}"},
        )
        assert API_KEY in (secret_out.choices[0].message.content or "")  # the client gets it
    raw = log_file.read_text()
    assert API_KEY not in raw and EMAIL not in raw
    first, second, third = read_log(log_file)
    assert first["prompt_text"].startswith("user: Summarise this. Contact [REDACTED:email]")
    assert "[REDACTED:api_key]" in first["prompt_text"]
    assert first["text_redacted"]["email"] >= 1 and first["text_redacted"]["api_key"] >= 1
    # The fake echoes the prompt: the completion holds the canaries too.
    assert API_KEY in plain_text
    assert first["completion_text"] == keep_start(plain_text, 300, ALL, Counter())
    assert "[REDACTED:api_key]" in first["completion_text"]
    assert second["stream"] is True and streamed
    assert second["completion_text"] == keep_start(streamed, 300, ALL, Counter())
    assert second["prompt_text"] == "user: hello there"
    assert third["completion_text"] == "the key is [REDACTED:api_key]"


def test_text_is_off_by_default(tmp_path: Path) -> None:
    log_file = tmp_path / "requests.log"
    with running_gateway(logging={"request_log": str(log_file)}) as gw:
        gw.openai().chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "a very private prompt"}]
        )
    [line] = read_log(log_file)
    assert "prompt_text" not in line and "completion_text" not in line
    assert "private prompt" not in log_file.read_text()
