"""Merging a stream's text events for the parsed relay (``gateway.stream``).

Upstreams send every text event of a choice in the same envelope: only the string after
``"content":`` changes. When a plugin parses streamed chunks (the output guard), the events of
one upstream read that share the envelope can be handed to it as one chunk with their joined
text instead of one parsed dict per event. :class:`Envelope` learns the envelope from the
stream's first text-only event, checks it, and parses a block of events with it; anything else
goes event by event.
"""

from __future__ import annotations

from typing import Any

import orjson

_SEP = b"\n\ndata: "
_CONTENT_KEY = b'"content"'


def _text_only(obj: Any) -> bool:
    """Whether the parsed chunk ``obj`` only adds text to one choice (no role, finish_reason,
    logprobs, tool calls ...): the kind of chunk a run of can become one."""
    choices = obj.get("choices") if type(obj) is dict else None
    if type(choices) is not list or len(choices) != 1 or type(choices[0]) is not dict:
        return False
    choice = choices[0]
    delta = choice.get("delta")
    return (
        type(delta) is dict
        and len(delta) == 1
        and type(delta.get("content")) is str
        and choice.get("finish_reason") is None
        and not choice.get("logprobs")
    )


def _string_end(data: bytes, start: int) -> int:
    """Where the JSON string opening at ``data[start]`` ends (after its closing quote), or -1."""
    k = start + 1
    while True:
        k = data.find(b'"', k)
        if k == -1:
            return -1
        j = k - 1
        while data[j] == 0x5C:  # a backslash: the quote is escaped if there is an odd number
            j -= 1
        if (k - 1 - j) % 2 == 0:
            return k + 1
        k += 1


class Envelope:
    """The bytes around the text of a stream's content-only events.

    Upstreams send every text event of a choice in the same envelope: only the string after
    ``"content":`` changes. Learnt from the first such event (and checked: the envelope around
    another string parses to the same chunk with that string), it lets a run of those events be
    parsed as their strings alone and handed to the hooks as one chunk with the run's text,
    instead of one dict per event."""

    __slots__ = ("pre", "suf", "tries")

    def __init__(self) -> None:
        self.pre = b""
        self.suf = b""
        #: Content-only events left to learn the envelope from (few: it is then not there).
        self.tries = 3

    def learn(self, payload: bytes, obj: dict[str, Any]) -> None:
        """Take the envelope of ``payload`` (parsed: ``obj``) if it is a content-only event."""
        if not _text_only(obj):
            return
        self.tries -= 1
        i = payload.find(_CONTENT_KEY)
        if i == -1 or payload.find(_CONTENT_KEY, i + 1) != -1:
            return
        a = i + len(_CONTENT_KEY)
        n = len(payload)
        while a < n and payload[a] == 0x20:
            a += 1
        if payload[a : a + 1] != b":":
            return
        a += 1
        while a < n and payload[a] == 0x20:
            a += 1
        if payload[a : a + 1] != b'"':
            return
        b = _string_end(payload, a)
        if b == -1:
            return
        pre, suf = payload[:a], payload[b:]
        try:
            probe = orjson.loads(pre + b'"\\u0001"' + suf)
        except orjson.JSONDecodeError:
            return
        if not _text_only(probe) or probe["choices"][0]["delta"]["content"] != "\x01":
            return
        probe["choices"][0]["delta"]["content"] = obj["choices"][0]["delta"]["content"]
        if probe == obj and pre.find(b"\n") == -1 and suf.find(b"\n") == -1:
            self.pre, self.suf = pre, suf

    def merge(self, run: list[bytes]) -> dict[str, Any]:
        """One chunk for a run of payloads in this envelope: the envelope, their joined text.
        Raises ValueError or TypeError if the run is not that after all."""
        lp, ls = len(self.pre), len(self.suf)
        strings = b",".join([p[lp : len(p) - ls] for p in run])
        texts = orjson.loads(b"[" + strings + b"]")
        if len(texts) != len(run) or strings.find(b"\n") != -1:
            raise ValueError("not one string per one-line event")
        chunk = orjson.loads(self.pre + b'""' + self.suf)
        chunk["choices"][0]["delta"]["content"] = "".join(texts)  # TypeError if not all str
        return chunk  # type: ignore[no-any-return]

    def parse(self, complete: bytes) -> list[Any] | None:
        """The parsed payloads of ``complete`` when it is only one-line ``data: `` events (what
        OpenAI-style upstreams send), each run of two or more events in this envelope as one
        chunk; None otherwise, and the caller goes event by event (which also reports a
        malformed event)."""
        if not complete.startswith(b"data: "):
            return None
        objs: list[Any] = []
        run: list[bytes] = []
        pre, suf = self.pre, self.suf
        least = len(pre) + len(suf)
        try:
            for part in complete[6:-2].split(_SEP):
                if pre and part.startswith(pre) and part.endswith(suf) and len(part) > least:
                    run.append(part)
                    continue
                if run:
                    objs.append(self._run(run))
                    run = []
                if part.find(b"\n") != -1:
                    return None
                obj = orjson.loads(part)
                objs.append(obj)
                if not pre and self.tries and type(obj) is dict:
                    self.learn(part, obj)
                    pre, suf = self.pre, self.suf
                    least = len(pre) + len(suf)
            if run:
                objs.append(self._run(run))
        except (ValueError, TypeError):
            return None
        return objs

    def _run(self, run: list[bytes]) -> Any:
        if len(run) > 1:
            return self.merge(run)
        if run[0].find(b"\n") != -1:
            raise ValueError("not a one-line event")
        return orjson.loads(run[0])
