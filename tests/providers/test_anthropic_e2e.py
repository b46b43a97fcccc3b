"""The Anthropic provider end to end: openai SDK → gateway → fake Anthropic Messages API."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from tests.helpers import running_gateway

SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}}
TOOLS = [
    {"type": "function",
     "function": {"name": "lookup", "description": "Look up", "parameters": SCHEMA}}
]  # fmt: skip


def claude_config(url: str) -> dict[str, Any]:
    return {
        "models": [{"name": "claude", "deployments": [{
            "id": "claude-a", "provider": "anthropic", "model": "claude-up",
            "base_url": f"{url}/v1", "api_key": "sk-ant-CANARY-123", "max_output_tokens": 321,
        }]}],
        "pipeline": [],
        "logging": {"request_log": "none"},
    }  # fmt: skip


def header(request: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in request["headers"] if k.lower() == name]


def test_fake_speaks_real_anthropic_wire_format() -> None:
    """The fake is parsed by the official anthropic SDK, streamed and not."""
    with running_gateway(claude_config) as gw:
        client = anthropic.Anthropic(base_url=gw.upstream.url, api_key="k", max_retries=0)
        msg = client.messages.create(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "hi there"}]
        )
        assert msg.content[0].text == "Echo: hi there"  # type: ignore[union-attr]
        with client.messages.stream(
            model="m", max_tokens=10, tools=[{"name": "t", "input_schema": {"type": "object"}}],
            messages=[{"role": "user", "content": "please call tool"}],
        ) as stream:  # fmt: skip
            final = stream.get_final_message()
        assert final.stop_reason == "tool_use"
        assert final.content[0].input == {"text": "please call tool"}  # type: ignore[union-attr]


def test_non_streamed_with_system_and_headers() -> None:
    with running_gateway(claude_config) as gw:
        r = gw.openai().chat.completions.with_raw_response.create(
            model="claude",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello"},
            ],
            extra_headers={"anthropic-version": "1999-01-01", "x-api-key": "client-key"},
        )
        data = r.parse()
        assert data.choices[0].message.content == "Echo: hello"
        assert data.choices[0].finish_reason == "stop"
        assert data.usage is not None and data.usage.prompt_tokens == 3
        assert r.headers["x-gateway-provider"] == "anthropic"
        sent = gw.upstream_requests()[-1]
        assert sent["path"] == "/v1/messages"
        assert sent["body"]["system"] == "Be brief."
        assert sent["body"]["max_tokens"] == 321
        assert header(sent, "x-api-key") == ["sk-ant-CANARY-123"]  # never the client's
        assert header(sent, "anthropic-version") == ["2023-06-01"]
        assert header(sent, "authorization") == []


def test_streamed_answer_reads_as_ordinary_chunks_with_usage() -> None:
    with running_gateway(claude_config) as gw:
        chunks = list(gw.openai().chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "stream me please"}],
            stream=True, stream_options={"include_usage": True},
        ))  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Echo: stream me please"
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.prompt_tokens == 3 and chunks[-1].usage.completion_tokens == 4


def test_streamed_usage_chunk_dropped_when_not_asked() -> None:
    with running_gateway(claude_config) as gw:
        chunks = list(gw.openai().chat.completions.create(
            model="claude", messages=[{"role": "user", "content": "hi"}], stream=True
        ))  # fmt: skip
        assert all(c.choices for c in chunks)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(stream: bool) -> None:
    with running_gateway(claude_config) as gw:
        client = gw.openai()
        messages: list[dict[str, Any]] = [{"role": "user", "content": "please call tool"}]
        if stream:
            chunks = list(client.chat.completions.create(
                model="claude", messages=messages, tools=TOOLS, stream=True  # type: ignore[arg-type]
            ))  # fmt: skip
            calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
            call_id, name = calls[0].id, calls[0].function.name  # type: ignore[union-attr]
            args = "".join(tc.function.arguments or "" for tc in calls)  # type: ignore[union-attr]
            assert chunks[-1].choices[0].finish_reason == "tool_calls"
        else:
            r = client.chat.completions.create(model="claude", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
            assert r.choices[0].finish_reason == "tool_calls"
            call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
            call_id, name, args = call.id, call.function.name, call.function.arguments  # type: ignore[union-attr]
        assert name == "lookup" and args == '{"text":"please call tool"}'
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": args},
                    }
                ],
            }
        )
        messages.append({"role": "tool", "tool_call_id": call_id, "content": "42"})
        r = client.chat.completions.create(model="claude", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
        assert r.choices[0].message.content == "Tool said: 42"
        sent = gw.upstream_requests()[-1]["body"]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]
        assert sent[2]["content"][0]["type"] == "tool_result"


@pytest.mark.parametrize(
    ("status", "exc", "client_status"),
    [
        (529, openai.InternalServerError, 503),
        (429, openai.RateLimitError, 429),
        (400, openai.BadRequestError, 400),
        (401, openai.InternalServerError, 502),
    ],
)
def test_anthropic_errors_become_openai_errors(
    status: int, exc: type[Exception], client_status: int
) -> None:
    with running_gateway(claude_config) as gw:
        with pytest.raises(exc) as info:
            gw.openai().chat.completions.create(
                model="claude", messages=[{"role": "user", "content": "hi"}],
                extra_headers={"x-fake-status": str(status)},
            )  # fmt: skip
        assert info.value.status_code == client_status  # type: ignore[attr-defined]
        assert "sk-ant" not in str(info.value)


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_prompt_too_long_is_context_length_exceeded(stream: bool) -> None:
    with running_gateway(claude_config) as gw:
        with pytest.raises(openai.BadRequestError) as info:
            gw.openai().chat.completions.create(
                model="claude", messages=[{"role": "user", "content": "hi"}], stream=stream,
                extra_headers={"x-fake-status": "400",
                               "x-fake-error-code": "context_length_exceeded"},
            )  # fmt: skip
        assert (info.value.code, info.value.param) == ("context_length_exceeded", "messages")
        assert "prompt is too long" in info.value.message


def test_a_greeting_first_history_is_answered() -> None:
    """OpenAI takes a history that opens with the assistant; Anthropic (as its fake) refused it
    with "the first message must use the user role"."""
    with running_gateway(claude_config) as gw:
        r = gw.openai().chat.completions.create(
            model="claude",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "assistant", "content": "Hi! How can I help?"},
                {"role": "user", "content": "hello"},
            ],
        )
        assert r.choices[0].message.content == "Echo: hello"
        sent = gw.upstream_requests()[-1]["body"]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "user"]


def claude_then_openai(url: str) -> dict[str, Any]:
    """``claude`` (Anthropic) falls back to ``gpt`` (OpenAI), through the route plugin."""
    cfg = claude_config(url)
    cfg["models"][0]["fallbacks"] = ["gpt"]
    cfg["models"].append({"name": "gpt", "deployments": [{
        "id": "gpt-a", "provider": "openai", "model": "gpt-up", "base_url": f"{url}/v1",
        "api_key": "sk-provider-CANARY",
    }]})  # fmt: skip
    cfg["pipeline"] = [{"name": "route"}]
    return cfg


CUSTOM_TOOLS = [{"type": "custom", "custom": {"name": "code_exec", "description": "Run code"}}]
CUSTOM_HISTORY = [
    {"role": "user", "content": "run it"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "custom", "custom": {"name": "code_exec", "input": "print(1)"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "1"},
    {"role": "user", "content": "hello"},
]  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": CUSTOM_TOOLS},
        {"messages": CUSTOM_HISTORY},
        {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
        {"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {
            "mode": "required", "tools": [{"type": "function", "function": {"name": "lookup"}}]}}},
    ],
)  # fmt: skip
def test_what_anthropic_cannot_express_is_served_by_the_fallback(extra: dict[str, Any]) -> None:
    with running_gateway(claude_then_openai) as gw:
        body: dict[str, Any] = {"model": "claude", "messages": [{"role": "user", "content": "hi"}]}
        body.update(extra)
        r = gw.openai().chat.completions.with_raw_response.create(**body)
        assert r.parse().choices[0].message.content == f"Echo: {body['messages'][-1]['content']}"
        assert r.headers["x-gateway-deployment"] == "gpt-a"
        # Anthropic was never called: nothing was dropped or sent half-translated.
        assert [q["body"]["model"] for q in gw.upstream_requests()] == ["gpt-up"]
        sent = gw.upstream_requests()[-1]["body"]
        assert {k: sent[k] for k in extra} == extra


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_quoting_the_api_version_date_is_not_redacted(stream: bool) -> None:
    """``anthropic-version: 2023-06-01`` was scrubbed as if it were a credential: every answer
    mentioning that date came out with ``[REDACTED]`` in it. The key itself still is."""
    content = "Released on 2023-06-01; the key sk-ant-CANARY-123 stays home."

    def config(url: str) -> dict[str, Any]:
        # (The output guard finds the key spelt over many events; the relay alone only when
        # one event holds it whole.)
        guard = {"name": "guard", "config": {"semantic": {"enabled": False}}}
        return {**claude_config(url), "pipeline": [guard]}

    with running_gateway(config, fake={"content": content}) as gw:
        msgs = [{"role": "user", "content": "when?"}]
        client = gw.openai()
        if stream:
            text = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(model="claude", messages=msgs, stream=True)
                if c.choices
            )
        else:
            text = client.chat.completions.create(model="claude", messages=msgs).choices[0]
            text = text.message.content or ""
        assert text.startswith("Released on 2023-06-01; the key [REDACTED")
        assert "CANARY" not in text and text.endswith("] stays home.")
