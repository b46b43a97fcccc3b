"""An answer's ``annotations`` (``url_citation``: a URL and a title the client shows as a link)
are the model's output too: a key or the canary in a cited URL or title leaves with them.

Every string in them is checked like the text (they arrive whole, streamed or not, so nothing
is held back). Text is redacted in place; a URL is never rewritten (a link with a placeholder in
it points somewhere else, and its citation's offsets would name a broken link): with a
``redact`` finding in it, the whole annotation is dropped. ``block`` ends the answer and
``flag`` reports, as for the text.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plugins.guard.output import OutputGuard
    from plugins.guard.scanner import Finding


def _strings(value: Any, out: list[tuple[Any, Any]], depth: int = 0) -> None:
    """(container, key) of every string inside ``value`` (bounded in depth)."""
    if depth > 8:
        return
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, v in items:
        if isinstance(v, str):
            if v:
                out.append((value, key))
        elif isinstance(v, (dict, list)):
            _strings(v, out, depth + 1)


def check_annotations(
    guard: OutputGuard, annotations: list[Any], apply: bool
) -> tuple[list[Any], list[Finding]]:
    """The annotations to send (redacted, without those whose URL held a secret to redact;
    ``annotations`` itself when nothing changes or ``apply`` is false: shadow mode) and the
    findings."""
    findings: list[Finding] = []
    kept: list[Any] = []
    changed = False
    for note in annotations:
        slots: list[tuple[Any, Any]] = []
        if isinstance(note, (dict, list)):
            _strings(note, slots)
        drop = False
        for container, key in slots:
            text = container[key]
            checked, found = guard.check(text)
            findings += found
            if checked == text or not apply:
                continue
            if key == "url" or text.startswith(("https://", "http://")):
                if any(f.action == "redact" for f in found):
                    drop = True
                elif not found:  # (only bidi controls removed: the same link)
                    container[key] = checked
            else:
                container[key] = checked
            changed = True
        if not drop:
            kept.append(note)
    return (kept if changed else annotations), findings
