"""Anthropic translation: golden request/response pairs and the stream translator."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import (
    InvalidRequestError,
    RateLimitError,
    ServiceUnavailableError,
    UpstreamError,
)
from gateway.providers.anthropic_stream import StreamTranslator
from gateway.providers.anthropic_translate import error_from_body, from_anthropic, to_anthropic

DATA = Path(__file__).resolve().parent.parent / "data" / "anthropic"
GOLDEN = ["text", "system", "tools"]
CREATED = 1700000000


def golden(name: str) -> dict[str, Any]:
    return dict(json.loads((DATA / f"{name}.json").read_text()))


@pytest.mark.parametrize("name", GOLDEN)
def test_request_translation_matches_golden(name: str) -> None:
    case = golden(name)
    original = json.loads(json.dumps(case["openai_request"]))
    assert to_anthropic(case["openai_request"], "claude-up", 1024) == case["anthropic_request"]
    assert case["openai_request"] == original  # the input is not modified


@pytest.mark.parametrize("name", GOLDEN)
def test_response_translation_matches_golden(name: str) -> None:
    case = golden(name)
    got = from_anthropic(case["anthropic_response"], "claude-up", CREATED)
    assert got == case["openai_response"]


def test_stream_translation_matches_golden_byte_for_byte_whatever_the_chunking() -> None:
    source = (DATA / "stream_tools.sse").read_bytes()
    expected = (DATA / "stream_tools.openai.sse").read_bytes()
    for size in (1, 7, 64, len(source)):
        t = StreamTranslator("claude-up", CREATED)
        out = b"".join(t.feed(source[i : i + size]) for i in range(0, len(source), size))
        assert out == expected
        assert t.done


def test_stream_with_crlf_line_endings() -> None:
    source = (DATA / "stream_tools.sse").read_bytes().replace(b"\n", b"\r\n")
    t = StreamTranslator("claude-up", CREATED)
    assert t.feed(source) == (DATA / "stream_tools.openai.sse").read_bytes()


def test_max_tokens_filled_from_deployment_when_absent() -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert to_anthropic(body, "up", 777)["max_tokens"] == 777
    body["max_tokens"] = 50
    assert to_anthropic(body, "up", 777)["max_tokens"] == 50


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
    ],
)
def test_tool_choice_strings(choice: str, expected: dict[str, Any]) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": choice,
    }
    assert to_anthropic(body, "up", 10)["tool_choice"] == expected


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
    ],
)  # fmt: skip
def test_untranslatable_requests_are_400_naming_the_param(body: dict[str, Any], param: str) -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "x"}], **body}
    with pytest.raises(InvalidRequestError) as exc:
        to_anthropic(full, "up", 10)
    assert exc.value.param == param


def test_errors_map_to_openai_meaning() -> None:
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
    err = error_from_body(overloaded, {}, 529)
    assert isinstance(err, ServiceUnavailableError) and err.status == 503 and err.retryable
    limited = error_from_body(
        {"type": "error", "error": {"type": "rate_limit_error", "message": "slow"}},
        {"retry-after": "7"}, 429,
    )  # fmt: skip
    assert isinstance(limited, RateLimitError) and limited.headers == {"retry-after": "7"}
    bad = error_from_body(
        {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: bad"}},
        {}, 400,
    )  # fmt: skip
    assert bad.status == 400 and not bad.retryable and bad.message == "max_tokens: bad"
    # The upstream's words about the gateway's own key never reach the client.
    auth = error_from_body(
        {"type": "error", "error": {"type": "authentication_error", "message": "key sk-ant-x"}},
        {}, 401,
    )  # fmt: skip
    assert auth.status == 502 and "sk-ant" not in auth.message
    assert error_from_body(b"not json", {}, 500).status == 502


def test_stream_error_event_is_retryable_only_before_output() -> None:
    err = (
        b"event: error\n"
        b'data: {"type":"error","error":{"type":"overloaded_error","message":"x"}}\n\n'
    )
    with pytest.raises(ServiceUnavailableError) as first:
        StreamTranslator("m").feed(err)
    assert first.value.retryable
    t = StreamTranslator("m")
    t.feed((DATA / "stream_tools.sse").read_bytes().split(b"event: content_block_stop")[0])
    with pytest.raises(ServiceUnavailableError) as later:
        t.feed(err)
    assert not later.value.retryable


def test_malformed_stream_and_body_are_upstream_errors() -> None:
    with pytest.raises(UpstreamError):
        StreamTranslator("m").feed(b"data: {nope\n\n")
    with pytest.raises(UpstreamError):
        from_anthropic({"type": "error"}, "m")
