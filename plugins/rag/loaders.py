"""Turning files into sections: plain text, Markdown, HTML, and PDF when ``pypdf`` is installed.

Only the structure that helps retrieval is kept: a title, and the heading path above each
block of text. HTML scripts, styles and other invisible parts are dropped.
"""

from __future__ import annotations

import codecs
import io
import re
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import PurePath

from plugins.rag.chunking import Section

KINDS = {
    ".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown",
    ".html": "html", ".htm": "html", ".pdf": "pdf",
}  # fmt: skip
CONTENT_TYPES = {
    "text/plain": "text", "text/markdown": "markdown", "text/x-markdown": "markdown",
    "text/html": "html", "application/pdf": "pdf",
}  # fmt: skip


class UnsupportedDocument(ValueError):
    """A file type we do not read (or PDF without pypdf)."""


@dataclass(slots=True)
class Parsed:
    title: str
    sections: list[Section]


def kind_for(name: str, content_type: str = "") -> str:
    ctype = content_type.split(";")[0].strip().lower()
    if ctype in CONTENT_TYPES:
        return CONTENT_TYPES[ctype]
    kind = KINDS.get(PurePath(name).suffix.lower())
    if kind is None:
        raise UnsupportedDocument(
            f"{name}: unsupported file type (supported: {', '.join(sorted(KINDS))})"
        )
    return kind


def charset_of(content_type: str) -> str:
    """The ``charset`` parameter of a Content-Type (``""`` when there is none)."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip("'\"").strip()
    return ""


def check_charset(charset: str) -> str:
    """Python's codec name for ``charset`` (``""`` stays ``""``: UTF-8), or UnsupportedDocument."""
    if not charset:
        return ""
    try:
        info = codecs.lookup(charset)
    except LookupError:
        info = None
    # Python also has bytes-to-bytes codecs (base64, rot13, zlib): not charsets.
    if info is None or not getattr(info, "_is_text_encoding", True):
        raise UnsupportedDocument(f"unknown charset {charset!r}")
    return info.name


def decode(data: bytes, name: str, charset: str = "") -> str:
    """The text of a document. With a declared ``charset``, decoded with it; without one, as
    UTF-8. Either way a leading byte order mark is dropped, and bytes that are not valid in the
    encoding are an error naming it, never silently replaced."""
    codec = check_charset(charset) or "utf-8"
    if codec == "utf-8":
        codec = "utf-8-sig"
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as e:
        declared = f"declared charset {charset!r}" if charset else "UTF-8 (no charset declared)"
        raise UnsupportedDocument(
            f"{name}: not valid {declared}: byte 0x{data[e.start]:02x} at offset {e.start}; "
            "convert it to UTF-8 or declare its charset (content-type: text/plain; "
            "charset=...)"
        ) from None
    return text.removeprefix("\ufeff")


def _stem_title(name: str) -> str:
    return re.sub(r"[-_]+", " ", PurePath(name).stem).strip() or name


# -- text -------------------------------------------------------------------------------------


def parse_text(text: str, name: str) -> Parsed:
    lines = text.strip().splitlines()
    title = _stem_title(name)
    if len(lines) > 1 and 0 < len(lines[0].strip()) <= 80:
        title = lines[0].strip()
    return Parsed(title, [Section((), text)])


# -- markdown ---------------------------------------------------------------------------------

_ATX = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_FRONT = re.compile(r"\A---\s*\n(.*?)\n---\s*\n", re.S)


def parse_markdown(text: str, name: str) -> Parsed:
    title = ""
    front = _FRONT.match(text)
    if front:
        for line in front.group(1).splitlines():
            key, _, value = line.partition(":")
            if key.strip().lower() == "title":
                title = value.strip().strip("'\"")
        text = text[front.end() :]
    sections: list[Section] = []
    path: list[tuple[int, str]] = []
    buf: list[str] = []
    fenced = False
    skip_next = False  # the underline of a setext heading
    lines = text.splitlines()

    def flush() -> None:
        body = "\n".join(buf).strip()
        if body:
            sections.append(Section(tuple(h for _, h in path), body))
        buf.clear()

    for i, line in enumerate(lines):
        if skip_next:
            skip_next = False
            continue
        if _FENCE.match(line):
            fenced = not fenced
        level, heading = 0, ""
        m = None if fenced else _ATX.match(line)
        if m:
            level, heading = len(m.group(1)), m.group(2)
        elif (
            not fenced
            and i + 1 < len(lines)
            and line.strip()
            and re.match(r"^ {0,3}(=+|-+)\s*$", lines[i + 1])
            and not (buf and buf[-1].strip())  # a setext heading starts a block
        ):
            level = 1 if lines[i + 1].strip().startswith("=") else 2
            heading = line.strip()
            skip_next = True
        if level:
            flush()
            path = [(lv, h) for lv, h in path if lv < level] + [(level, heading)]
            if level == 1 and not title:
                title = heading
            continue
        buf.append(line)
    flush()
    return Parsed(title or _stem_title(name), sections)


# -- html -------------------------------------------------------------------------------------

_SKIP = {"script", "style", "noscript", "template", "svg", "head", "nav", "footer"}
_BLOCK = {
    "p", "div", "li", "ul", "ol", "br", "tr", "table", "pre", "blockquote", "section",
    "article", "dd", "dt", "hr", "td", "th",
}  # fmt: skip


class _HTML(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.title = ""
        self.sections: list[Section] = []
        self._path: list[tuple[int, str]] = []
        self._buf: list[str] = []
        self._skip = 0
        #: Of ``_skip``, how many are ``<head>``: the document's title lives there.
        self._head = 0
        self._in_title = False
        self._titled = False
        self._heading: tuple[int, list[str]] | None = None

    def _flush(self) -> None:
        body = re.sub(r"\n\s*\n+", "\n\n", "".join(self._buf)).strip()
        if body:
            self.sections.append(Section(tuple(h for _, h in self._path), body))
        self._buf.clear()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            # The document's title is the first <title> outside other skipped elements (an
            # <svg>'s <title> is an icon's tooltip).
            self._in_title = not self._titled and self._skip == self._head
            self._skip += 1
        elif tag in _SKIP:
            self._skip += 1
            self._head += tag == "head"
        elif re.fullmatch(r"h[1-6]", tag) and not self._skip:
            self._flush()
            self._heading = (int(tag[1]), [])
        elif tag in _BLOCK:
            self._buf.append("\n\n" if tag in ("p", "div", "section", "article") else "\n")

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            if self._in_title:
                self._titled = True
            self._in_title = False
            self._skip = max(0, self._skip - 1)
        elif tag in _SKIP:
            self._skip = max(0, self._skip - 1)
            if tag == "head":
                self._head = max(0, self._head - 1)
        elif re.fullmatch(r"h[1-6]", tag) and self._heading:
            level, parts = self._heading
            heading = " ".join("".join(parts).split())
            self._heading = None
            if heading:
                self._path = [(lv, h) for lv, h in self._path if lv < level] + [(level, heading)]
        elif tag in _BLOCK:
            self._buf.append("\n")

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif self._skip:
            return
        elif self._heading is not None:
            self._heading[1].append(data)
        else:
            self._buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def parse_html(text: str, name: str) -> Parsed:
    parser = _HTML()
    parser.feed(text)
    parser.close()
    title = " ".join(parser.title.split())
    if not title:
        firsts = [s.headings[0] for s in parser.sections if s.headings]
        title = firsts[0] if firsts else _stem_title(name)
    return Parsed(title, parser.sections)


# -- pdf --------------------------------------------------------------------------------------


def parse_pdf(data: bytes, name: str) -> Parsed:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise UnsupportedDocument(f"{name}: reading PDF needs the pypdf package") from None
    reader = PdfReader(io.BytesIO(data))
    title = ""
    if reader.metadata and reader.metadata.title:
        title = str(reader.metadata.title).strip()
    sections = []
    for i, page in enumerate(reader.pages, start=1):
        text = (page.extract_text() or "").strip()
        if text:
            sections.append(Section((f"page {i}",), text))
    return Parsed(title or _stem_title(name), sections)


def parse(data: bytes, name: str, kind: str, charset: str = "") -> Parsed:
    if kind == "pdf":
        return parse_pdf(data, name)
    text = decode(data, name, charset).replace("\r\n", "\n")
    if kind == "markdown":
        return parse_markdown(text, name)
    if kind == "html":
        return parse_html(text, name)
    return parse_text(text, name)
