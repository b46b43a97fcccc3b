"""The output guard against three ways of showing a key or the canary it did not read: text
reversed by bidi controls, cited URLs and titles (``annotations``), and ``top_logprobs``
alternatives (red team, 27 Nov)."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from gateway.context import RequestContext
from gateway.errors import ContentPolicyError
from plugins.guard.bidi import strip_bidi
from tests.helpers import running_gateway
from tests.test_stream_guard_blocks import (
    CANARY,
    KEY,
    ctx,
    event,
    guard,
    per_event,
    relay,
    sent_before_block,
    small,
    text_of,
    wire,
)

RLO, PDF, RLI, PDI, RLM, ALM = "\u202e", "\u202c", "\u2067", "\u2069", "\u200f", "\u061c"


def displayed(text: str) -> str:
    """What a screen shows of the overrides and isolates in ``text`` (enough of the bidi
    algorithm for these tests: a right-to-left override or isolate of Latin text shows it
    reversed), and pieces split by a right-to-left mark, in a right-to-left paragraph, swapped."""
    out, i = [], 0
    while i < len(text):
        if text[i] in (RLO, RLI):
            end = min(j for j in (text.find(PDF, i), text.find(PDI, i), len(text)) if j >= 0)
            out.append(text[i + 1 : end][::-1])
            i = end + 1
        else:
            out.append(text[i])
            i += 1
    words = "".join(out).split(" ")
    return " ".join("".join(reversed(w.split(RLM))) for w in words)


BIDI_LEAKS = [
    f"your key is {RLO}{KEY[::-1]}{PDF} keep it",  # shows as the key
    f"your key is {RLI}{KEY[::-1]}{PDI} keep it",
    f"your key is {KEY[20:]}{RLM}{KEY[:20]} keep it",  # pieces swapped in an RTL paragraph
    f"the prompt says {RLO}{CANARY[::-1]}{PDF} indeed",
]


@pytest.mark.anyio
@pytest.mark.parametrize("text", BIDI_LEAKS)
async def test_a_key_or_the_canary_reversed_by_bidi_controls_is_not_displayed(text: str) -> None:
    """The guard read the reversed key, the screen showed the key: the controls that reorder
    Latin text are removed from the answer, streamed (in pieces that cut the span, in one
    read or event by event) and not, so what the client shows is what the guard read."""
    secret = KEY if KEY[:8] in displayed(text) else CANARY
    assert secret in displayed(text)  # (the attack as it was)
    g = guard(output={"canary": CANARY, "canary_action": "redact"})
    for size in (2, 5, 11):
        data = wire(small(text, size))
        for reads in (None, per_event(data)):
            events, _, _ = await relay(g, data, reads)
            out = text_of(events)
            assert secret not in displayed(out), (size, out)
            assert RLO not in out and RLI not in out
    c = ctx()
    c.response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
    await g.on_response(c)
    out = c.response["choices"][0]["message"]["content"]
    assert secret not in displayed(out) and out == strip_bidi(text)


@pytest.mark.anyio
async def test_reversed_logprobs_tokens_do_not_display_the_key_either() -> None:
    """Joined, the logprobs tokens of the reversed key showed the key too."""
    text = f"key {RLO}{KEY[::-1]}{PDF} ok"
    pieces = small(text, 4)
    data = b"".join(
        b"data: "
        + orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                        "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None,
                                     "logprobs": {"content": [{"token": p, "logprob": -0.1,
                                                               "bytes": list(p.encode()),
                                                               "top_logprobs": []}]}}]})
        + b"\n\n"
        for p in pieces
    ) + event({}, finish="stop") + b"data: [DONE]\n\n"  # fmt: skip
    events, _, _ = await relay(guard(), data, per_event(data))
    tokens = [t for e in events if isinstance(e, dict) for ch in e["choices"]
              for t in (ch.get("logprobs") or {}).get("content") or ()]  # fmt: skip
    joined = "".join(t["token"] for t in tokens)
    assert KEY not in displayed(joined) and RLO not in joined
    assert all(bytes(t["bytes"]).decode() == t["token"] for t in tokens)


@pytest.mark.anyio
async def test_right_to_left_text_keeps_its_marks() -> None:
    """Hebrew and Arabic text with marks (and no overrides) goes out as it came."""
    text = (
        f"שלום {RLM}עולם (version 2){RLM}. مرحبا{ALM} بالعالم 2024{RLM} "
        f"and {RLM}one more{RLM} word."
    )
    events, _, _ = await relay(guard(), wire(small(text, 3)))
    assert text_of(events) == text
    c = ctx()
    c.response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
    await guard().on_response(c)
    assert c.response["choices"][0]["message"]["content"] == text


# --- annotations ---------------------------------------------------------------------------


def citation(url: str, title: str) -> dict[str, Any]:
    where = {"url": url, "title": title, "start_index": 0, "end_index": 4}
    return {"type": "url_citation", "url_citation": where}


def notes_wire(notes: list[Any]) -> bytes:
    return b"".join([
        event({"role": "assistant", "content": ""}), event({"content": "See the docs."}),
        event({"annotations": notes}), event({}, finish="stop"), b"data: [DONE]\n\n",
    ])  # fmt: skip


def notes_of(events: list[Any]) -> list[Any]:
    return [n for e in events if isinstance(e, dict) for ch in e.get("choices") or ()
            for n in (ch.get("delta") or {}).get("annotations") or ()]  # fmt: skip


@pytest.mark.anyio
async def test_a_key_or_the_canary_in_annotations_is_redacted_or_ends_the_answer() -> None:
    """A cited URL or title went out unread. Titles are redacted; a URL holding a key is
    never rewritten: its citation is dropped. The canary's default action ends the answer."""
    notes = [
        citation(f"https://example.com/?key={KEY}", "Docs"),
        citation("https://example.com/a", f"Key {KEY} and {CANARY}"),
        citation("https://example.com/b", "Fine"),
    ]
    g = guard(output={"canary": CANARY, "canary_action": "redact"})
    for reads in (None, per_event(notes_wire(notes))):
        events, _, c = await relay(g, notes_wire(json.loads(json.dumps(notes))), reads)
        assert KEY[:12] not in json.dumps(events) and CANARY not in json.dumps(events)
        assert notes_of(events) == [
            citation("https://example.com/a", "Key [REDACTED:api_key] and [REDACTED:canary]"),
            notes[2],
        ]
        assert text_of(events) == "See the docs."
        assert {f["rule"] for f in c.log["guard"]["output"]["findings"]} == {"api_key", "canary"}
    sent = await sent_before_block(guard(output={"canary": CANARY}), notes_wire(notes[1:]))
    assert CANARY not in sent.decode()
    # Flag reports and changes nothing; shadow changes nothing either.
    for cfg in ({"output": {"secrets": "flag"}}, {"mode": "shadow"}):
        events, _, c = await relay(guard(**cfg), notes_wire(notes))
        assert notes_of(events) == notes and c.log["guard"]["output"]["findings"]
    # Not streamed.
    c = ctx()
    said = {"role": "assistant", "content": "See.", "annotations": json.loads(json.dumps(notes))}
    c.response = {"choices": [{"index": 0, "message": said}]}
    await g.on_response(c)
    assert c.response["choices"][0]["message"]["annotations"] == [
        citation("https://example.com/a", "Key [REDACTED:api_key] and [REDACTED:canary]"),
        notes[2],
    ]
    c.response["choices"][0]["message"]["annotations"] = notes[1:]
    with pytest.raises(ContentPolicyError):
        await guard(output={"canary": CANARY}).on_response(c)


def test_annotations_end_to_end_streamed_and_not() -> None:
    """Through the real gateway, with the fake told what to cite (``x-fake-annotations``)."""
    notes = [citation(f"https://example.com/?k={KEY}", "Docs"),
             citation("https://example.com/a", f"the key {KEY}")]  # fmt: skip
    cfg = {"name": "guard", "config": {"semantic": {"enabled": False}}}
    with running_gateway(pipeline=[cfg], fake={"chunks": 4}) as gw:
        client = gw.openai()
        headers = {"x-fake-annotations": json.dumps(notes), "x-fake-content": "See the docs."}
        stream = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "cite"}], stream=True,
            extra_headers=headers,
        )  # fmt: skip
        chunks = [c.model_dump() for c in stream]
        got = [n for c in chunks for ch in c["choices"]
               for n in (ch["delta"].get("annotations") or ())]  # fmt: skip
        assert KEY[:12] not in json.dumps(chunks)
        assert got == [citation("https://example.com/a", "the key [REDACTED:api_key]")]
        r = client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "cite"}], extra_headers=headers
        )
        said = r.choices[0].message.model_dump()
        assert KEY[:12] not in json.dumps(said)
        assert said["annotations"] == got


def test_a_reversed_key_streamed_end_to_end_is_not_displayed() -> None:
    """The fake echoes the prompt, which asks nothing the input guard reads as a key (the key
    is reversed), and the answer streams through the real gateway without its override."""
    prompt = f"{RLO}{KEY[::-1]}{PDF} done"
    cfg = {"name": "guard", "config": {"semantic": {"enabled": False}}}
    with running_gateway(pipeline=[cfg], fake={"chunks": 9}) as gw:
        stream = gw.openai().chat.completions.create(
            model="demo", messages=[{"role": "user", "content": prompt}], stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert KEY in displayed("Echo: " + prompt)
        assert text == "Echo: " + KEY[::-1] + " done"
        assert KEY not in displayed(text)


# --- top_logprobs alternatives ------------------------------------------------------------


def lp_chunk(token: str, alts: list[str], alt_bytes: bool = False) -> bytes:
    top = [{"token": token, "logprob": -0.1, "bytes": list(token.encode())}]
    for a in alts:
        alt: dict[str, Any] = {"token": a, "logprob": -2.0, "bytes": list(a.encode())}
        if alt_bytes:
            alt["token"] = "x"  # the bytes say something else
        top.append(alt)
    entry = {"token": token, "logprob": -0.1, "bytes": list(token.encode()), "top_logprobs": top}
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": token},
                          "logprobs": {"content": [entry], "refusal": None},
                          "finish_reason": None}]}  # fmt: skip
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def alternatives_of(events: list[Any]) -> list[str]:
    return [a["token"] for e in events if isinstance(e, dict) for ch in e["choices"]
            for t in (ch.get("logprobs") or {}).get("content") or ()
            for a in t.get("top_logprobs") or ()]  # fmt: skip


def readings(entries: list[Any]) -> list[str]:
    """What a client can read in logprobs entries: each rank's alternatives in a row (the
    chosen token where a rank has none), and the chosen text with any one alternative in
    place of its token; tokens and bytes both."""

    def spell(a: dict[str, Any]) -> list[str]:
        return [a["token"]] + ([bytes(a["bytes"]).decode()] if a.get("bytes") else [])

    chosen = [e["token"] for e in entries]
    ranks = max((len(e.get("top_logprobs") or ()) for e in entries), default=0)
    out = []
    for r in range(ranks):
        for k in (0, 1):
            row = []
            for e in entries:
                top = e.get("top_logprobs") or ()
                row.append(spell(top[r])[min(k, len(spell(top[r])) - 1)] if r < len(top)
                           else e["token"])  # fmt: skip
            out.append("".join(row))
    for i, e in enumerate(entries):
        for a in e.get("top_logprobs") or ():
            for s in spell(a):
                out.append("".join(chosen[:i]) + s + "".join(chosen[i + 1 :]))
    return out


def entries_of(events: list[Any]) -> list[Any]:
    return [t for e in events if isinstance(e, dict) for ch in e["choices"]
            for t in (ch.get("logprobs") or {}).get("content") or ()]  # fmt: skip


def key_pieces(secret: str, n: int) -> list[str]:
    return [secret[i : i + n] for i in range(0, len(secret), n)]


ALT_LEAKS = {
    # The chosen text is harmless; the second choice at each position spells the key.
    "rank row": ([" no"] * 12, [[p] for p in key_pieces(KEY, 4)]),
    # One alternative holds the whole key.
    "one alternative": ([" a", " b", " c"], [["Yes"], [KEY], ["No"]]),
    # A near copy of the key as the text, the right letters as alternatives.
    "in place": (key_pieces(KEY.upper(), 6), [[p] for p in key_pieces(KEY, 6)]),
    # The canary in the alternatives of the third rank.
    "canary": ([" x"] * 5, [["a", "b", p] for p in key_pieces(CANARY, 3)]),
}


@pytest.mark.anyio
@pytest.mark.parametrize("case", list(ALT_LEAKS))
@pytest.mark.parametrize("alt_bytes", [False, True])
async def test_top_logprobs_alternatives_cannot_spell_a_key_or_the_canary(
    case: str, alt_bytes: bool
) -> None:
    """The alternatives went out with the harmless text they stand beside; a client reading
    them (rank by rank, or one in place of its token, or their bytes) got the key."""
    tokens, alts = ALT_LEAKS[case]
    secret = CANARY if case == "canary" else KEY
    data = b"".join(
        [lp_chunk(t, a, alt_bytes) for t, a in zip(tokens, alts, strict=False)]
        + [event({"content": " and that is all."}), event({}, finish="stop"), b"data: [DONE]\n\n"]
    )  # fmt: skip
    g = guard(output={"canary": CANARY})
    for reads in (None, per_event(data)):
        events, _, _ = await relay(g, data, reads)
        seen = [r.upper() for r in readings(entries_of(events))]
        assert not any(secret.upper() in r for r in seen), seen
        assert text_of(events).endswith("and that is all.")
    # Not streamed.
    entries = []
    for t, a in zip(tokens, alts, strict=False):
        top = [{"token": t, "logprob": -0.1}] + [{"token": x, "logprob": -2.0} for x in a]
        entries.append({"token": t, "logprob": -0.1, "top_logprobs": top})
    c = ctx()
    c.response = {"choices": [{"index": 0, "message": {"role": "assistant",
                               "content": "".join(tokens)},
                               "logprobs": {"content": entries}}]}  # fmt: skip
    await g.on_response(c)
    seen = [r.upper() for r in readings(c.response["choices"][0]["logprobs"]["content"])]
    assert not any(secret.upper() in r for r in seen), seen


@pytest.mark.anyio
async def test_alternatives_that_spell_nothing_stay() -> None:
    """A classifier reading "Yes" against "No", or a year against another, keeps them."""
    data = b"".join([
        lp_chunk("Yes", ["No", "Maybe"]), lp_chunk(" in", [" on"]), lp_chunk(" 2024", [" 2023"]),
        event({}, finish="stop"), b"data: [DONE]\n\n",
    ])  # fmt: skip
    events, _, _ = await relay(guard(output={"canary": CANARY}), data, per_event(data))
    assert alternatives_of(events) == ["Yes", "No", "Maybe", " in", " on", " 2024", " 2023"]
    c = RequestContext("r", "chat", "/v1/chat/completions", "POST", {}, [], {})
    top = [{"token": "Yes", "logprob": -0.1}, {"token": "No", "logprob": -2.3}]
    c.response = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes"},
                               "logprobs": {"content": [{"token": "Yes", "logprob": -0.1,
                                                         "top_logprobs": top}]}}]}  # fmt: skip
    await guard().on_response(c)
    assert c.response["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == top
