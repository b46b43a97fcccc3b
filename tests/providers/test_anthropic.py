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
    UnsupportedByDeploymentError,
    UpstreamError,
)
from gateway.providers.anthropic_stream import StreamTranslator
from gateway.providers.anthropic_translate import (
    error_from_body,
    from_anthropic,
    to_anthropic,
    usage_of,
)

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
        # Valid JSON that is no object: Anthropic's tool_use input must be one.
        ({"messages": [{"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
        # The legacy form of tools was dropped silently (a text answer where a call was asked).
        ({"functions": [{"name": "lookup", "parameters": {"type": "object"}}]}, "functions"),
        ({"function_call": "auto"}, "function_call"),
        # An image type the Messages API does not take.
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AAAA"}}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages"),
    ],
)  # fmt: skip
def test_untranslatable_requests_are_400_naming_the_param(body: dict[str, Any], param: str) -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "x"}], **body}
    with pytest.raises(InvalidRequestError) as exc:
        to_anthropic(full, "up", 10)
    assert exc.value.param == param


FN_TOOL = {"type": "function", "function": {"name": "f"}}
CUSTOM_TOOL = {"type": "custom", "custom": {"name": "code_exec", "description": "Run code"}}
CUSTOM_CALL = {"id": "c1", "type": "custom", "custom": {"name": "code_exec", "input": "print(1)"}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # A custom tool (free-text input) became a function with an empty name.
        ({"tools": [FN_TOOL, CUSTOM_TOOL]}, "tools[1]"),
        ({"tools": [{"type": "web_search", "function": {"name": "s"}}]}, "tools[0]"),
        # ... and a custom tool's call replayed in the history.
        ({"messages": [{"role": "user", "content": "x"},
                       {"role": "assistant", "content": None, "tool_calls": [CUSTOM_CALL]},
                       {"role": "tool", "tool_call_id": "c1", "content": "1"}]},
         "messages[1].tool_calls[0]"),
        # Audio output was dropped: a text-only answer where audio was asked.
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        # Valid OpenAI tool_choice shapes with no Anthropic equivalent were a final 400.
        ({"tools": [FN_TOOL], "tool_choice": {"type": "allowed_tools", "allowed_tools": {
            "mode": "auto", "tools": [{"type": "function", "function": {"name": "f"}}]}}},
         "tool_choice"),
        ({"tools": [FN_TOOL], "tool_choice": {"type": "custom", "custom": {"name": "f"}}},
         "tool_choice"),
        # A web search asked for was dropped: an answer without it.
        ({"web_search_options": {}}, "web_search_options"),
    ],
)  # fmt: skip
def test_requests_another_deployment_may_serve_move_on_without_blame(
    body: dict[str, Any], param: str
) -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "x"}], **body}
    with pytest.raises(UnsupportedByDeploymentError) as exc:
        to_anthropic(full, "up", 10)
    assert exc.value.param == param
    assert exc.value.retryable and not exc.value.deployment_fault


def test_text_only_modalities_and_a_malformed_tool_choice_are_not_unsupported() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [FN_TOOL]}
    assert "messages" in to_anthropic({**base, "modalities": ["text"]}, "up", 10)
    with pytest.raises(InvalidRequestError) as exc:
        to_anthropic({**base, "tool_choice": "sometimes"}, "up", 10)
    assert not isinstance(exc.value, UnsupportedByDeploymentError)
    assert exc.value.param == "tool_choice"


def test_a_history_opening_with_the_assistant_gets_a_user_turn_first() -> None:
    """A greeting-first chat (OpenAI takes it): Anthropic refused it with "the first message
    must use the user role"."""
    body = {"model": "m", "messages": [
        {"role": "system", "content": "Be nice."},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
    ]}  # fmt: skip
    out = to_anthropic(body, "up", 10)
    assert out["system"] == "Be nice."
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi! How can I help?"}]},
        {"role": "user", "content": [{"type": "text", "text": "Tell me a joke"}]},
    ]
    # An assistant message with no content left (an empty greeting) is dropped, not opened for.
    body["messages"][1]["content"] = ""
    assert to_anthropic(body, "up", 10)["messages"][0]["role"] == "user"
    assert len(to_anthropic(body, "up", 10)["messages"]) == 1


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
    """Before any output they are the deployment's failure, retryable elsewhere (a 200 whose
    body is an error, from a proxy in front, say); once output went out, no longer."""
    with pytest.raises(UpstreamError) as first:
        StreamTranslator("m").feed(b"data: {nope\n\n")
    assert first.value.retryable
    for body in ({"type": "error"}, {"type": "error", "error": {"type": "overloaded_error"}}):
        with pytest.raises(UpstreamError) as plain:
            from_anthropic(body, "m")
        assert plain.value.retryable
    t = StreamTranslator("m")
    t.feed((DATA / "stream_tools.sse").read_bytes().split(b"event: content_block_stop")[0])
    with pytest.raises(UpstreamError) as later:
        t.feed(b"data: {nope\n\n")
    assert not later.value.retryable


def test_requests_real_claude_models_would_refuse_are_made_acceptable() -> None:
    """Found against the Messages API's rules: each of these was a 400 from Anthropic."""
    base = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    # temperature and top_p together: only temperature goes (current models refuse both).
    out = to_anthropic({**base, "temperature": 0.7, "top_p": 0.9}, "up", 10)
    assert out["temperature"] == 0.7 and "top_p" not in out
    assert to_anthropic({**base, "top_p": 0.9}, "up", 10)["top_p"] == 0.9
    # Stop sequences of only whitespace ("\n" is a common OpenAI one) are left out.
    assert to_anthropic({**base, "stop": ["\n", " ", "END"]}, "up", 10)["stop_sequences"] == ["END"]
    assert "stop_sequences" not in to_anthropic({**base, "stop": "\n"}, "up", 10)
    # Only a system message: it becomes the one user turn the Messages API needs.
    only = to_anthropic({"messages": [{"role": "system", "content": "Say hi"}]}, "up", 10)
    assert only["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}]
    assert "system" not in only
    # image/jpg (what many clients write) is image/jpeg.
    jpg = {"type": "image_url", "image_url": {"url": "data:image/jpg;base64,AAAA"}}
    out = to_anthropic({"messages": [{"role": "user", "content": [jpg]}]}, "up", 10)
    assert out["messages"][0]["content"][0]["source"]["media_type"] == "image/jpeg"


def test_a_cut_off_answer_is_length_and_new_error_types_map() -> None:
    data = {"id": "msg", "type": "message", "content": [{"type": "text", "text": "abc"}],
            "stop_reason": "model_context_window_exceeded", "usage": {}}  # fmt: skip
    assert from_anthropic(data, "m", 1)["choices"][0]["finish_reason"] == "length"
    message = "input length and `max_tokens` exceed context limit: 197000 + 8192 > 200000"
    over = error_from_body(
        {"type": "error", "error": {"type": "invalid_request_error", "message": message}}, {}, 400
    )
    assert (over.code, over.param) == ("context_length_exceeded", "messages")
    billing = error_from_body({"type": "error", "error": {"type": "billing_error"}}, {})
    timeout = error_from_body({"type": "error", "error": {"type": "timeout_error"}}, {})
    assert billing.status != timeout.status and timeout.status == 504


def test_a_crlf_split_between_two_reads() -> None:
    source = (DATA / "stream_tools.sse").read_bytes().replace(b"\n", b"\r\n")
    expected = (DATA / "stream_tools.openai.sse").read_bytes()
    for size in (1, 2, 3, 5, 11, 13):
        t = StreamTranslator("claude-up", CREATED)
        out = b"".join(t.feed(source[i : i + size]) for i in range(0, len(source), size))
        assert out == expected and t.done, size


def test_stream_usage_left_null_in_message_delta_keeps_the_message_start_counts() -> None:
    def sse(kind: str, data: dict[str, Any]) -> bytes:
        return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

    source = b"".join([
        sse("message_start", {"message": {"id": "m1", "usage": {"input_tokens": 1000,
                                                               "output_tokens": 1}}}),
        sse("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        sse("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Hi"}}),
        sse("message_delta", {"delta": {"stop_reason": "end_turn"},
                              "usage": {"input_tokens": None, "output_tokens": 2}}),
        sse("message_stop", {}),
    ])  # fmt: skip
    t = StreamTranslator("claude-up", CREATED)
    out = t.feed(source).decode()
    usage = [json.loads(e[6:]) for e in out.split("\n\n") if '"usage"' in e]
    assert usage[-1]["usage"]["prompt_tokens"] == 1000
    assert usage[-1]["usage"]["completion_tokens"] == 2


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n"
        for e in events
    )


def _args_of(out: bytes) -> dict[int, str]:
    """Each tool call's arguments, as the SDK accumulates them from the OpenAI chunks."""
    args: dict[int, str] = {}
    for line in out.split(b"\n\n"):
        if not line.startswith(b"data: {"):
            continue
        for choice in json.loads(line[6:])["choices"]:
            for call in choice["delta"].get("tool_calls") or ():
                piece = call.get("function", {}).get("arguments", "")
                args[call["index"]] = args.get(call["index"], "") + piece
    return args


def test_a_streamed_call_without_arguments_has_the_json_of_no_arguments() -> None:
    """Anthropic opens every call's JSON with an empty input_json_delta; a call without
    arguments gets nothing more, and its arguments came out as "" (no JSON: json.loads fails)."""
    start = {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 5}}}
    source = _sse(
        start,
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "tool_use", "id": "t1", "name": "weather", "input": {}}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "input_json_delta", "partial_json": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "input_json_delta", "partial_json": '{"city": "Paris"}'}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1,
         "content_block": {"type": "tool_use", "id": "t2", "name": "now", "input": {}}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": ""}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
         "usage": {"output_tokens": 9}},
        {"type": "message_stop"},
    )  # fmt: skip
    for size in (1, 9, len(source)):
        t = StreamTranslator("m", CREATED)
        out = b"".join(t.feed(source[i : i + size]) for i in range(0, len(source), size))
        assert {i: json.loads(a) for i, a in _args_of(out).items()} == {
            0: {"city": "Paris"},
            1: {},
        }


def test_text_in_the_same_read_as_an_error_event_goes_out_before_the_error() -> None:
    start = {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 5}}}
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    t = StreamTranslator("m", CREATED)
    t.feed(_sse(start, block))
    out = t.feed(
        _sse({"type": "content_block_delta", "index": 0,
              "delta": {"type": "text_delta", "text": " LOST-TEXT"}},
             {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    )  # fmt: skip
    assert b"LOST-TEXT" in out
    with pytest.raises(ServiceUnavailableError) as info:
        t.raise_pending()
    assert not info.value.retryable


@pytest.mark.anyio
async def test_the_reader_raises_the_error_after_the_text_that_came_with_it() -> None:
    from gateway.providers.anthropic import AnthropicResponse

    start = {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 5}}}
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    reads = [
        _sse(start, block),
        _sse({"type": "content_block_delta", "index": 0,
              "delta": {"type": "text_delta", "text": " LOST-TEXT"}},
             {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    ]  # fmt: skip

    class Content:
        total_bytes = 0

        async def iter_any(self) -> Any:
            for r in reads:
                yield r

    class Resp:
        status, headers, content = 200, {}, Content()

    got = b""
    with pytest.raises(ServiceUnavailableError):
        async for data in AnthropicResponse(Resp(), "m").iter_bytes():  # type: ignore[arg-type]
            got += data
    assert b"LOST-TEXT" in got


def test_an_error_right_after_message_start_can_still_fail_over() -> None:
    """Anthropic sends message_start at once and an overloaded_error after it: the role chunk
    made the stream 'started', so the error could not move to another deployment."""
    start = {"type": "message_start", "message": {"id": "msg_1", "usage": {"input_tokens": 5}}}
    t = StreamTranslator("m", CREATED)
    assert t.feed(_sse(start, {"type": "ping"})) == b""  # the role chunk waits for output
    with pytest.raises(ServiceUnavailableError) as info:
        t.feed(_sse({"type": "error", "error": {"type": "overloaded_error", "message": "x"}}))
    assert info.value.retryable
    # With output, the role chunk goes first, as before.
    t = StreamTranslator("m", CREATED)
    t.feed(_sse(start))
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    out = t.feed(_sse(block, {"type": "content_block_delta", "index": 0,
                              "delta": {"type": "text_delta", "text": "Hi"}}))  # fmt: skip
    first = json.loads(out.split(b"\n\n")[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert b'"content":"Hi"' in out


def test_cache_reads_are_reported_where_openai_reports_them() -> None:
    usage = usage_of({"input_tokens": 10, "cache_read_input_tokens": 2000, "output_tokens": 5})
    assert usage["prompt_tokens"] == 2010
    assert usage["prompt_tokens_details"] == {"cached_tokens": 2000}


def test_cache_writes_are_counted_and_reported_apart() -> None:
    """Cache writes are input tokens too (``prompt_tokens``), billed at their own price: the
    OpenAI usage carries them in ``prompt_tokens_details.cache_write_tokens``."""
    usage = usage_of({"input_tokens": 10, "cache_creation_input_tokens": 300,
                      "cache_read_input_tokens": 2000, "output_tokens": 5})  # fmt: skip
    assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (
        2310, 5, 2315)  # fmt: skip
    assert usage["prompt_tokens_details"] == {"cached_tokens": 2000, "cache_write_tokens": 300}
    assert usage_of({"input_tokens": 10, "cache_creation_input_tokens": 300, "output_tokens": 5})[
        "prompt_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 300}  # fmt: skip


def test_invalid_counts_are_left_out_for_an_estimate_never_taken_as_zero() -> None:
    assert usage_of({"input_tokens": 10.0, "output_tokens": 5.0}) == {
        "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}  # fmt: skip
    assert usage_of({"input_tokens": 10, "output_tokens": True}) == {"prompt_tokens": 10}
    assert usage_of({"input_tokens": "10", "output_tokens": 5}) == {"completion_tokens": 5}
    assert usage_of({"input_tokens": -3, "output_tokens": 2.5}) == {}
    assert usage_of(None) == {}


def test_streamed_cache_counts_reach_the_usage_chunk() -> None:
    t = StreamTranslator("claude-up", CREATED)
    start = {"type": "message_start", "message": {"id": "msg_1", "usage": {
        "input_tokens": 10, "cache_read_input_tokens": 800, "cache_creation_input_tokens": 90,
        "output_tokens": 1}}}  # fmt: skip
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
             "usage": {"output_tokens": 7}}  # fmt: skip
    out = t.feed(_sse(start, delta, {"type": "message_stop"}))
    usage = json.loads(out.split(b"\n\n")[-3][6:])["usage"]
    assert usage == {
        "prompt_tokens": 900,
        "completion_tokens": 7,
        "total_tokens": 907,
        "prompt_tokens_details": {"cached_tokens": 800, "cache_write_tokens": 90},
    }
