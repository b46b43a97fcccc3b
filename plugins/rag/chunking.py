"""Token-aware chunking with overlap, section by section.

A document is a list of sections (the heading path above some text). Each section is cut into
paragraphs, then sentences, then (a run-on sentence) token windows; the pieces are packed into
chunks of at most ``tokens`` tokens, and each chunk after the first starts with the last pieces
of the previous one (up to ``overlap`` tokens) so an answer straddling a boundary stays whole.
Chunks never span two sections, so every chunk has exact heading metadata.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.tokens import encoding

_PARA = re.compile(r"\n\s*\n")
_SENTENCE = re.compile(r"(?<=[.!?:;])\s+(?=\S)")


@dataclass(slots=True, frozen=True)
class Section:
    headings: tuple[str, ...]
    text: str


@dataclass(slots=True, frozen=True)
class Chunk:
    text: str
    headings: tuple[str, ...]
    tokens: int


def _count(text: str) -> int:
    return len(encoding().encode(text, disallowed_special=()))


def _windows(text: str, size: int, overlap: int) -> Iterator[str]:
    enc = encoding()
    toks = enc.encode(text, disallowed_special=())
    step = max(1, size - overlap)
    for start in range(0, len(toks), step):
        yield enc.decode(toks[start : start + size]).strip()
        if start + size >= len(toks):
            break


def _pieces(text: str, size: int, overlap: int) -> Iterator[tuple[str, int]]:
    """Paragraphs, or sentences of long paragraphs, or windows of long sentences."""
    for para in _PARA.split(text):
        para = " ".join(para.split())
        if not para:
            continue
        n = _count(para)
        if n <= size:
            yield para, n
            continue
        for sent in _SENTENCE.split(para):
            n = _count(sent)
            if n <= size:
                yield sent, n
            else:
                for win in _windows(sent, size, overlap):
                    yield win, _count(win)


def chunk_section(section: Section, size: int, overlap: int) -> list[Chunk]:
    chunks: list[Chunk] = []
    current: list[tuple[str, int]] = []
    total = 0
    fresh = 0  # tokens in ``current`` that are not carried over from the previous chunk

    def flush() -> None:
        if fresh:
            text = "\n\n".join(p for p, _ in current)
            chunks.append(Chunk(text, section.headings, total))

    for piece, n in _pieces(section.text, size, overlap):
        # Joining adds a separator token or so; keep a little headroom.
        if current and total + n + 1 > size:
            flush()
            carried: list[tuple[str, int]] = []
            carried_n = 0
            for p, pn in reversed(current):
                if carried_n + pn > overlap or carried_n + pn + n + 1 > size:
                    break
                carried.insert(0, (p, pn))
                carried_n += pn
            current, total, fresh = carried, carried_n, 0
        current.append((piece, n))
        total += n + (1 if len(current) > 1 else 0)
        fresh += n
    flush()
    return chunks


def chunk_sections(sections: list[Section], size: int, overlap: int) -> list[Chunk]:
    out: list[Chunk] = []
    for section in sections:
        out.extend(chunk_section(section, size, overlap))
    return out
