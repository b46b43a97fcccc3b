"""The output guard's reading of JSON text (a tool call's arguments, streamed in fragments):
where a fragment may be cut without splitting an escape, and the escapes a check must read as
the characters they spell."""

from __future__ import annotations

import re

#: A JSON escape that spells a printable ASCII character (``\u0073`` is "s") or "/" (``\/``),
#: preceded by an even run of backslashes (an odd one would make it an escaped backslash).
_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\(?:u00([2-7][0-9a-fA-F])|/)")


def _plain(m: re.Match[str]) -> str:
    code = m.group(2)
    if code is None:
        return m.group(1) + "/"
    c = chr(int(code, 16))
    return m.group(0) if c in '"\\\x7f' else m.group(1) + c


#: An escape not yet whole at the end of a text: "\\u" and up to three hex digits.
_OPEN_ESCAPE = re.compile(r"\\u[0-9a-fA-F]{0,3}\Z")


def json_cut(text: str, cut: int) -> int:
    """``cut``, moved back so that ``text[:cut]`` does not end inside an escape of the JSON
    text: an unpaired backslash or an unfinished ``\\u`` escape goes to the held part, whose
    escapes are decoded on their own with the next piece (a cut between the two backslashes of
    an escaped backslash made the next ``u0041`` a "\\u0041" escape: invalid JSON)."""
    m = _OPEN_ESCAPE.search(text, max(0, cut - 5), cut)
    if m is not None:
        cut = m.start()
    run = 0
    while run < cut and text[cut - 1 - run] == "\\":
        run += 1
    return cut - 1 if run % 2 else cut


def plain_escapes(json_text: str) -> str:
    """JSON text (a tool call's arguments) with its escapes of printable ASCII written as the
    characters: the same JSON value, and what the checks must read, since the application
    decodes it before acting on it ("\\u0073k-proj-..." is the key "sk-proj-...")."""
    if "\\" not in json_text:
        return json_text
    return _ESCAPE.sub(_plain, json_text)
