"""Literal prefixes of the guard's rule patterns, and the sweeps that find them.

Most rule patterns start with literal text (``\\b(?:ignore|disregard) ...``). :func:`triggers`
derives those prefixes from the parsed pattern; :class:`Sweeps` compiles a set of them into a
few regexes (a trie per sweep) that find every position where any prefix occurs, so that
``RuleSet`` (``plugins.guard.rules``) tries a rule's regex only there.
"""

from __future__ import annotations

import re
from typing import Any

try:  # Python 3.11 has both; 3.13 deprecates the sre_* names.
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _p  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]

#: Most literal prefixes one rule may expand to (alternations multiply them).
_MAX_PREFIXES = 256
_Prefix = tuple[str, bool]  # (literal text, preceded by \b)
#: Prefix occurrences: (position, indexes owning the prefix found there).
Starts = list[tuple[int, tuple[int, ...]]]


#: Ends a prefix that must be followed by a separator, a non-word character or "_" (keywords
#: join their words with ``[\W_]{0,4}``): "do" then only stands for "do anything" where the next
#: character is one, not in every "does", "done" or "document".
SEP = "\x00"
_SEP_RE = r"(?=[\W_])"


def _is_separator_class(items: Any) -> bool:
    """Whether ``items`` is one character that is never a letter or digit (``[\\W_]``)."""
    if len(items) != 1:
        return False
    op, arg = items[0]
    if op is _c.LITERAL:
        return not chr(arg).isalnum() and chr(arg) != SEP
    if op is not _c.IN:
        return False
    for o, a in arg:
        if o is _c.CATEGORY and a in (_c.CATEGORY_NOT_WORD, _c.CATEGORY_SPACE):
            continue
        if o is _c.LITERAL and not chr(a).isalnum() and chr(a) != SEP:
            continue
        return False
    return True


def _expand(items: Any, prefixes: list[_Prefix]) -> tuple[list[_Prefix], bool]:
    """Extend ``prefixes`` with the literal text every match of ``items`` starts with.

    Returns the extended prefixes and whether ``items`` was literal to its end (so the caller
    may keep appending what follows). Alternations, optional literals (``s?``) and small
    character sets multiply the prefixes (up to :data:`_MAX_PREFIXES`); an optional run of
    separators (``[\\W_]{0,4}``) ends a prefix with :data:`SEP`; anything else stops."""
    items = list(items)
    for k, (op, arg) in enumerate(items):
        if op is _c.AT:
            if all(not t for t, _ in prefixes):
                if arg is _c.AT_BOUNDARY:
                    prefixes = [(t, True) for t, _ in prefixes]
                continue
            return prefixes, False
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            continue  # zero-width ((?<!how to )...): the literal text that follows still starts it
        if op is _c.LITERAL:
            if chr(arg) == SEP:
                return prefixes, False
            prefixes = [(t + chr(arg), b) for t, b in prefixes]
            continue
        if (
            op in (_c.MAX_REPEAT, _c.MIN_REPEAT)
            and arg[0] == 0
            and arg[1] > 1
            and all(t for t, _ in prefixes)
            and _is_separator_class(arg[2])
        ):
            # Either no separator (the literal text after it continues the prefix) or one or
            # more (the prefix ends, followed by a separator).
            rest, _ = _expand(items[k + 1 :], prefixes)
            ended = [(t + SEP, b) for t, b in prefixes]
            return list(dict.fromkeys(ended + rest)), False
        alts: list[list[_Prefix]] | None = None  # one list per way this item can start
        done = True
        if op is _c.IN and len(arg) <= 4 and all(o is _c.LITERAL for o, _ in arg):
            alts = [[(t + chr(ch), b) for t, b in prefixes] for _, ch in arg]
        elif op is _c.SUBPATTERN and arg[1] == 0 and arg[2] == 0:
            sub, done = _expand(arg[-1], prefixes)
            alts = [sub]
        elif op is _c.BRANCH:
            alts = []
            for br in arg[1]:
                sub, complete = _expand(br, prefixes)
                alts.append(sub)
                done = done and complete
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT) and arg[0] <= 1 and arg[1] == 1:
            sub, done = _expand(arg[2], prefixes)
            alts = [sub, prefixes] if arg[0] == 0 else [sub]
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT) and arg[0] >= 1:
            sub = prefixes
            for _ in range(min(arg[0], 8)):  # the mandatory repetitions only
                sub, complete = _expand(arg[2], sub)
                if not complete:
                    break
            return list(dict.fromkeys(sub)), False
        if alts is None:
            return prefixes, False
        merged = list(dict.fromkeys(p for alt in alts for p in alt))
        # Growing too large stops here (the prefixes so far are a valid, shorter, answer), except
        # for an alternation at the very start, where there is nothing shorter (each branch
        # capped its own growth).
        if len(merged) > _MAX_PREFIXES and any(t for t, _ in prefixes):
            return prefixes, False
        prefixes = merged
        if not done:
            return prefixes, False
    return prefixes, True


def triggers(regex: str) -> list[_Prefix] | None:
    """Literal prefixes one of which starts every match of ``regex`` (each with whether a
    ``\\b`` precedes it), or None when some match could start otherwise (the rule then always
    runs, or uses its hand-written ``triggers``)."""
    try:
        parsed = _p.parse(regex)
    except Exception:
        return None
    if parsed.state.flags & re.IGNORECASE:
        return None
    # Group flags such as (?i:...) stop the expansion (SUBPATTERN with flags is not expanded).
    out, _ = _expand(list(parsed), [("", False)])
    if not out or any(len(t.rstrip(SEP)) < 2 for t, _ in out):
        return None
    return out


def _trie_regex(words: list[str]) -> str:
    """A regex matching the longest of ``words`` at a position, factored by common prefixes: the
    engine tests one branch per distinct next character instead of every word."""
    tree: dict[str, Any] = {}
    for w in words:
        node = tree
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict[str, Any]) -> str:
        branches = [
            re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch not in ("", SEP)
        ]
        if SEP in node:
            # A word ending here if a separator follows; tried after the longer words.
            branches.append(_SEP_RE)
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # Greedy: the longer word is tried first, the word ending here is the fallback.
        return f"(?:{body})?" if "" in node else body

    return emit(tree)


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"  # what \w matches in a str pattern


def _closure(owners: dict[str, list[int]], words: list[str]) -> dict[str, tuple[int, ...]]:
    """For each text the trie can capture (a word, less a final :data:`SEP`): the rules owning
    it or any of ``words`` it starts with (every prefix that matches at a position is a prefix
    of the longest one that does). A prefix ending in :data:`SEP` counts when the captured text
    continues with a non-word character or "_" after it, or ends there."""
    out: dict[str, tuple[int, ...]] = {}
    for w in {w.rstrip(SEP) for w in words}:
        idx: set[int] = set()
        for k in range(1, len(w) + 1):
            idx.update(owners.get(w[:k], ()))
            if k == len(w) or not w[k].isalnum():
                idx.update(owners.get(w[:k] + SEP, ()))
        out[w] = tuple(sorted(idx))
    return out


class Sweeps:
    """Finds where any of a set of literal prefixes occurs, and whose they are.

    ``owners`` maps each prefix to the indexes owning it; ``bounded`` says whether every owner
    has ``\\b`` before it. Sweeps, each starting with a literal or a character class so that the
    engine skips ahead in C instead of trying every position: prefixes after \\b that start with
    a word character (a word start is the text's start or follows a non-word character), and
    the rest anywhere, one branch per first character. Each captures the longest prefix at its
    position; the closures map it to every owner of a prefix of it."""

    def __init__(self, owners: dict[str, list[int]], bounded: dict[str, bool]) -> None:
        #: Longest prefix (plus the character before it), for bounding window sweeps.
        self.longest = 2 + max((len(t) for t in owners), default=0)
        words = sorted(t for t in owners if bounded[t] and _is_word(t[0]))
        word_set = set(words)
        free = sorted(t for t in owners if t not in word_set)
        self.word_owners = _closure({t: owners[t] for t in words}, words)
        self.free_owners = _closure({t: owners[t] for t in free}, free)
        self.word_start: re.Pattern[str] | None = None
        self.after_nonword: tuple[re.Pattern[str], ...] = ()
        self.ascii_after_nonword: tuple[re.Pattern[str], ...] = ()
        self.free: re.Pattern[str] | None = None
        self.ascii_free: re.Pattern[str] | None = None
        if words:
            trie = _trie_regex(words)
            self.word_start = re.compile(f"({trie})")
            # A word starts after a non-word character: after a space (most of them; a literal
            # first character is the engine's fastest skip), or after ASCII punctuation or a
            # non-ASCII non-word character. Explicit ranges compile to a bitmap the engine
            # skips along cheaply; "\W" is a category test per character, 3x slower in all.
            self.after_nonword = (
                re.compile(f" (?=({trie}))"),
                re.compile(rf"[\x00-\x1f!-/:-@\[-^`{{-~\x7f-\U0010ffff](?<=\W)(?=({trie}))"),
            )
            # In ASCII text (most prompts) one sweep does both: every ASCII non-word character,
            # the space included, is one bitmap test; none needs the look-behind.
            self.ascii_after_nonword = (re.compile(rf"[\x00-/:-@\[-^`{{-\x7f](?=({trie}))"),)
        if free:
            firsts: dict[str, list[str]] = {}
            for t in free:
                firsts.setdefault(t[0], []).append(t[1:])
            branches = {c: f"{re.escape(c)}(?=({_trie_regex(r)}))" for c, r in firsts.items()}
            self.free = re.compile("|".join(branches.values()))
            # In ASCII text only the branches of ASCII first characters can match. Without the
            # others (CJK prefixes) the first characters fit the engine's 256-bit map, a test
            # per character of the text instead of a walk along a list (~40 instructions less
            # per character).
            ascii_branches = [b for c, b in branches.items() if c.isascii()]
            if ascii_branches:
                self.ascii_free = re.compile("|".join(ascii_branches))

    def starts(self, text: str, spans: list[tuple[int, int]]) -> Starts:
        """``(position, owners)`` of each prefix occurrence starting within one of ``spans``."""
        starts: Starts = []
        longest = self.longest
        if text.isascii():
            nonword, free = self.ascii_after_nonword, self.ascii_free
        else:
            nonword, free = self.after_nonword, self.free
        # search() from where the last match ended, as finditer() would (every match is one
        # character wide), without an iterator and a match object per sweep.
        for lo, hi in spans:
            end = hi + longest  # where a prefix starting in the window could end
            if self.word_start is not None:
                word_owners = self.word_owners
                if lo == 0:
                    m = self.word_start.match(text)
                    if m is not None:
                        starts.append((0, word_owners[m.group(1)]))
                for rx in nonword:
                    m = rx.search(text, max(lo - 1, 0), end)
                    while m is not None:
                        pos = m.end()
                        if pos > hi:
                            break
                        starts.append((pos, word_owners[m.group(1)]))
                        m = rx.search(text, pos, end)
            if free is not None:
                free_owners = self.free_owners
                m = free.search(text, lo, end)
                while m is not None:
                    pos = m.start()
                    if pos > hi:
                        break
                    starts.append((pos, free_owners[text[pos] + m.group(m.lastindex or 0)]))
                    m = free.search(text, pos + 1, end)
        return starts


_ROT13_BYTES = bytes.maketrans(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    b"NOPQRSTUVWXYZABCDEFGHIJKLMnopqrstuvwxyzabcdefghijklm",
)


def rot13(s: str) -> str:
    """``codecs.encode(s, "rot13")``, which maps the ASCII letters and leaves every other
    character alone. That codec translates through a dict, one lookup per character, for any
    text that is not ASCII (~0.15 ms on 2,000 tokens with one curly quote); in UTF-8 an ASCII
    letter is one byte and every other character's bytes are all over 0x7f, so translating the
    bytes is the same map at C speed. "surrogatepass" keeps lone surrogates (from JSON escapes)
    as they were."""
    if s.isascii():
        return s.encode("ascii").translate(_ROT13_BYTES).decode("ascii")
    raw = s.encode("utf-8", "surrogatepass").translate(_ROT13_BYTES)
    return raw.decode("utf-8", "surrogatepass")
