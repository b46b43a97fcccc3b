"""Parsing a block of stream events for the parsed relay (``gateway.stream``).

Upstreams send every text event of a choice in the same envelope: only the string after
``"content":`` changes. :class:`Envelope` learns that envelope from the stream's first
text-only event and parses a block (the complete events of one upstream read) with it: a run of
events in the envelope becomes one :class:`TextChunk` (the envelope and the run's joined text),
every other event a dict, and the whole block takes one ``orjson.loads``. The relay hands the
plugins a ``TextChunk`` as it is when they all take one (``Plugin.text_chunks``: the output
guard), else as a dict, and writes its text straight back into the envelope's bytes.
"""

from __future__ import annotations

from typing import Any

import orjson

_SEP = b"\n\ndata: "


def join_reads(buffer: bytes, data: bytes) -> bytes:
    """The bytes of an SSE stream not parsed yet (``buffer``) and the next read, with CRLF line
    endings made LF; a ``"\\r\\n"`` may be split between two reads."""
    joined = buffer + data if buffer else data
    if data.find(b"\r") != -1 or buffer.endswith(b"\r"):
        joined = joined.replace(b"\r\n", b"\n")
    return joined


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


def _skip_spaces(data: bytes, i: int, step: int) -> int:
    """The first position from ``i`` on (``step`` 1) or back (-1) that is not a space."""
    n = len(data)
    while 0 <= i < n and data[i] == 0x20:
        i += step
    return i


class TextChunk:
    """A run of text-only events of the envelope's choice, as one chunk: only its text.

    What plugins with ``text_chunks`` get in ``on_chunks`` instead of the run's dict. They may
    set ``text`` (redact, hold back); the relay serialises the chunk as the envelope around it.
    """

    __slots__ = ("envelope", "index", "text")

    def __init__(self, envelope: Envelope, text: str) -> None:
        self.envelope = envelope
        #: The choice the text belongs to.
        self.index: Any = envelope.index
        self.text = text

    def payload(self) -> bytes:
        """The event's JSON: the envelope around ``text``."""
        return self.envelope.pre + orjson.dumps(self.text) + self.envelope.suf

    def as_dict(self) -> dict[str, Any]:
        """The chunk as the dict ``orjson.loads`` gives for ``payload()``."""
        return orjson.loads(self.payload())  # type: ignore[no-any-return]


class Envelope:
    """The bytes around the text of a stream's content-only events.

    Learnt from the first such event and checked (the envelope around another string parses to
    a content-only chunk with that string), it lets a run of those events be parsed as their
    strings alone and handed on as one :class:`TextChunk` with the run's text."""

    __slots__ = ("index", "pre", "suf", "tries")

    def __init__(self) -> None:
        self.pre = b""
        self.suf = b""
        #: The choice index in the envelope.
        self.index: Any = 0
        #: Events left to learn from (few: if the stream has an envelope, the first finds it).
        self.tries = 3

    def learn(self, payload: bytes) -> bool:
        """Take the envelope of ``payload`` if it is a content-only event (a delta whose only
        key is ``"content"``, a string): byte checks first, then one parse of a probe."""
        i = payload.find(_CONTENT_KEY)
        if i < 1:
            return False
        j = i - 1 if payload[i - 1] != 0x20 else _skip_spaces(payload, i - 1, -1)
        if payload[j] != 0x7B:  # "{": the delta's first key ...
            return False
        if payload.find(_CONTENT_KEY, i + 1) != -1 or payload.find(b"\n") != -1:
            return False
        self.tries -= 1
        a = i + len(_CONTENT_KEY)
        if payload[a : a + 2] != b':"':  # (compact JSON; any other spacing is looked at here)
            a = _skip_spaces(payload, a, 1)
            if payload[a : a + 1] != b":":
                return False
            a = _skip_spaces(payload, a + 1, 1)
            if payload[a : a + 1] != b'"':
                return False
        else:
            a += 1
        b = _string_end(payload, a)
        if b == -1:
            return False
        j = b if payload[b : b + 1] != b" " else _skip_spaces(payload, b, 1)
        if payload[j : j + 1] != b"}":  # ... and its only one
            return False
        pre, suf = payload[:a], payload[b:]
        # No escapes around the text: "content" can only be the key found above, and the
        # probe's "\x01" can only be the string put in its place.
        if pre.find(b"\\") != -1 or suf.find(b"\\") != -1:
            return False
        try:
            probe = orjson.loads(pre + b'"\\u0001"' + suf)
        except orjson.JSONDecodeError:
            return False
        if not _text_only(probe) or probe["choices"][0]["delta"]["content"] != "\x01":
            return False
        self.pre, self.suf = pre, suf
        self.index = probe["choices"][0].get("index", 0)
        return True

    def single(self, complete: bytes) -> TextChunk | None:
        """``complete`` as one :class:`TextChunk` when it is exactly one event in this envelope
        (what an upstream generating tokens sends per read), else None: the common case of
        :meth:`parse` without the lists around it."""
        pre = self.pre
        if not pre or complete.find(b"\n") != len(complete) - 2:  # one line, then "\n\n"
            return None
        body = complete[6:-2]
        text = body.removeprefix(pre).removesuffix(self.suf)
        if len(text) != len(body) - len(pre) - len(self.suf) or not complete.startswith(b"data: "):
            return None
        # Exactly one JSON string between the envelope's two halves (anything else, such as two
        # strings or a string with more after it, fails to parse or is no str).
        try:
            value = orjson.loads(text)
        except orjson.JSONDecodeError:
            return None
        return TextChunk(self, value) if type(value) is str else None

    def parse(self, complete: bytes) -> list[Any] | None:
        """The parsed payloads of ``complete`` when it is only one-line ``data: `` events (what
        OpenAI-style upstreams send), each run of events in this envelope as one
        :class:`TextChunk`; None otherwise, and the caller goes event by event (which also
        reports a malformed event).

        The block is parsed as one JSON array of its events, each run as an array of its
        strings; counting the values checks that each event held exactly one. (A malformed
        block could still parse differently from event by event, but whatever it parses to is
        what the plugins see and the client gets.)"""
        if not complete.startswith(b"data: "):
            return None
        parts = complete[6:-2].split(_SEP)
        if not self.pre:
            if not self.tries or not self._learn_from(parts):
                return self._load(parts, None)
        items: list[bytes] = []
        sizes: list[int] = []  # per item: 0 for one event, else the number of events in its run
        run: list[bytes] = []
        pre, suf = self.pre, self.suf
        cut = len(pre) + len(suf)
        for part in parts:
            # (removeprefix/removesuffix: the cheapest tests, about half of startswith's cost)
            text = part.removeprefix(pre).removesuffix(suf)
            if len(text) == len(part) - cut and text:
                run.append(text)
                continue
            if run:
                items.append(b"[" + b",".join(run) + b"]")
                sizes.append(len(run))
                run = []
            items.append(part)
            sizes.append(0)
        if run:
            items.append(b"[" + b",".join(run) + b"]")
            sizes.append(len(run))
        return self._load(items, sizes)

    def _load(self, items: list[bytes], sizes: list[int] | None) -> list[Any] | None:
        """Parse the JSON ``items`` (events, or arrays of a run's strings: ``sizes`` says how
        many per item, 0 for an event) in one go."""
        block = b"[" + b",".join(items) + b"]"
        # A line break left means an event of several lines, a comment or another field (the
        # envelope has none: learn() checks).
        if block.find(b"\n") != -1:
            return None
        try:
            values = orjson.loads(block)
        except orjson.JSONDecodeError:
            return None
        if len(values) != len(items):
            return None
        if sizes is None or not any(sizes):
            return values  # type: ignore[no-any-return]
        objs: list[Any] = []
        for value, size in zip(values, sizes, strict=True):
            if not size:
                objs.append(value)
            elif type(value) is list and len(value) == size:
                try:
                    objs.append(TextChunk(self, "".join(value)))
                except TypeError:  # not all strings
                    return None
            else:
                return None
        return objs

    def _learn_from(self, parts: list[bytes]) -> bool:
        """Learn the envelope from the first content-only event of ``parts`` that has one."""
        for part in parts:
            if not self.tries:
                break
            if self.learn(part):
                return True
        return False
