"""Texts as strings of character classes, searched with ``str.find`` instead of regexes.

A regex that starts with a character class (``[0-9@$!+]``, ``[ .\\-_*]``) is tried at every
character of that class: in prose, every space. The same test written as a substring of a class
string (``" a a "``) is one C scan: ``bytes.translate`` maps each character to its class and
``str.find`` looks for the sequence. Exact where every class is made of ASCII characters (a
non-ASCII character is encoded as "?", which belongs to no class).
"""

from __future__ import annotations


def byte_classes(classes: dict[bytes, bytes], other: bytes) -> bytes:
    """A ``bytes.translate`` table mapping each byte of each key to its class, the rest to
    ``other``."""
    table = bytearray(other * 256)
    for chars, cls in classes.items():
        for c in chars:
            table[c] = cls[0]
    return bytes(table)


#: ASCII characters by what deobfuscation looks for: "a" a letter of a light form ([a-z]), "d" a
#: character leetspeak folds (``[0-9@$!+]``; "€" is the one outside ASCII), " " a separator of
#: spaced-out letters (``[ .\-_*]``), "x" anything else.
SHAPE = byte_classes(
    {b"abcdefghijklmnopqrstuvwxyz": b"a", b"0123456789@$!+": b"d", b" .-_*": b" "}, b"x"
)
#: Whitespace (" ") against anything else ("w").
BLANKS = byte_classes({b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f": b" "}, b"w")


def classes(text: str, table: bytes) -> str:
    """``text`` as ``table``'s classes, one character for each of its characters (a non-ASCII
    one as the class of "?")."""
    raw = text.encode("ascii") if text.isascii() else text.encode("ascii", "replace")
    return raw.translate(table).decode("ascii")
