"""The rules layer: a curated ruleset (``rules.yaml``) plus operator changes, compiled once.

Rules match the *normalised* text (see :mod:`plugins.guard.normalize`): lower-case, lookalikes
and leetspeak folded, whitespace collapsed. A rule is either a ``pattern`` (a Python regular
expression) or ``keywords`` (phrases matched case-insensitively, whole words, with up to four
non-word characters between words: ``ignore--previous  instructions`` still matches).

Matching does not sweep every rule over the text: the literal text each pattern starts with is
derived from the parsed pattern, a few sweeps find where any of those prefixes occur, and a rule's
regex is tried only there (see :class:`RuleSet` and :mod:`plugins.guard.prefixes`).
"""

from __future__ import annotations

import bisect
import functools
import re
from importlib import resources
from typing import Literal

import yaml
from pydantic import field_validator, model_validator

from gateway.configbase import Strict
from plugins.guard.align import shared_runs
from plugins.guard.normalize import fold_pattern, light
from plugins.guard.prefixes import Starts, Sweeps, rot13, triggers

Category = Literal["injection", "jailbreak", "override", "exfiltration", "system_prompt_leak"]
CATEGORIES: tuple[str, ...] = Category.__args__  # type: ignore[attr-defined]
_ID = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")
_UPPER = re.compile(r"(?<!\\)[A-Z]")


class RuleSpec(Strict):
    """One rule: a regular expression or a keyword list, in a category."""

    id: str
    category: Category
    #: Regular expression matched against the normalised (lower-case) text.
    pattern: str | None = None
    #: Phrases; any one matching fires the rule.
    keywords: tuple[str, ...] = ()
    #: Substrings one of which must occur for the rule to be tried (a speed hint, for patterns
    #: whose first characters are not literal; derived automatically otherwise).
    triggers: tuple[str, ...] = ()
    description: str = ""

    @field_validator("id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError(f"rule id {v!r} must be lower-case letters, digits, '-' or '_'")
        return v

    @model_validator(mode="after")
    def _compiles(self) -> RuleSpec:
        if (self.pattern is None) == (not self.keywords):
            raise ValueError(f"rule {self.id!r}: give exactly one of 'pattern' or 'keywords'")
        try:
            re.compile(self.regex())
        except re.error as e:
            raise ValueError(f"rule {self.id!r}: invalid regular expression: {e}") from None
        return self

    def regex(self) -> str:
        if self.pattern is not None:
            # Text is lower-cased before matching; an operator's "Ignore" should still work.
            # Its non-ASCII letters are folded as the text's are (Cyrillic lookalikes, case).
            pattern = fold_pattern(self.pattern)
            return f"(?i:{pattern})" if _UPPER.search(pattern) else pattern
        alts = []
        for kw in self.keywords:
            words = re.findall(r"\w+", light(kw))
            if words:
                alts.append(r"[\W_]{0,4}".join(re.escape(w) for w in words))
        return r"\b(?:" + "|".join(alts) + r")\b" if alts else r"(?!x)x"


@functools.cache
def default_rules() -> tuple[RuleSpec, ...]:
    """The shipped ruleset, parsed and validated once per process."""
    text = (resources.files("plugins.guard") / "rules.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    return tuple(RuleSpec.model_validate(r) for r in data.get("rules", ()))


class RulesConfig(Strict):
    enabled: bool = True
    #: What a match does: block (400) or flag (log and metric only).
    action: Literal["block", "flag"] = "block"
    #: Ids of shipped rules to turn off.
    disable: tuple[str, ...] = ()
    #: Extra rules; one with the id of a shipped rule replaces that rule.
    add: tuple[RuleSpec, ...] = ()
    #: True: drop the shipped ruleset entirely and use only ``add``.
    replace: bool = False

    @model_validator(mode="after")
    def _known_ids(self) -> RulesConfig:
        known = {r.id for r in default_rules()} | {r.id for r in self.add}
        for rid in self.disable:
            if rid not in known:
                raise ValueError(f"rules.disable: unknown rule id {rid!r}")
        seen: set[str] = set()
        for r in self.add:
            if r.id in seen:
                raise ValueError(f"rules.add: rule id {r.id!r} appears twice")
            seen.add(r.id)
        return self

    def effective(self) -> list[RuleSpec]:
        rules: dict[str, RuleSpec] = {} if self.replace else {r.id: r for r in default_rules()}
        for r in self.add:
            rules[r.id] = r
        off = set(self.disable)
        return [r for r in rules.values() if r.id not in off]


#: How far past the end of a window (see :meth:`RuleSet.fired`) a match may reach, and how far
#: before a folded character it may start, for the scanner to see it in the deobfuscated form.
WINDOW_REACH = 160


class RuleSet:
    """Compiled rules, matched without sweeping every rule over the text.

    Most patterns start with literal text (``\\b(?:ignore|disregard) ...``): those prefixes are
    derived from the parsed pattern, sweeps find every position where any rule's prefix
    occurs, and only there is that rule's regex tried (``rx.match`` at the position).
    Rules without a literal start run ``rx.search`` when one of their hand-written ``triggers``
    substrings occurs, or always when they have none. Equivalent to ``rx.search`` of each rule
    over the text (tests/plugins/test_guard_perf.py checks this).

    :meth:`fired_with_rot13` also matches the rules against the text's rot13 in the same sweeps:
    rot13 maps letters to letters and leaves every other character alone, so a prefix ``p``
    occurs in ``rot13(text)`` exactly where ``rot13(p)`` occurs in ``text``, with the same
    characters (word or not) around it. Sweeping for both sets of prefixes at once costs about
    what one sweep does; the rot13 text is only built when one of its prefixes occurs."""

    def __init__(self, rules: list[RuleSpec]) -> None:
        self.rules = rules
        self._regexes = [re.compile(r.regex()) for r in rules]
        #: Rule indexes with no literal start: (index, substrings one of which must occur).
        self._searched: list[tuple[int, tuple[str, ...] | None]] = []
        owners: dict[str, list[int]] = {}
        bounded: dict[str, bool] = {}
        for i, r in enumerate(rules):
            auto = triggers(r.regex())
            if auto is None:
                manual = tuple(light(t) for t in r.triggers) or None
                self._searched.append((i, manual))
                continue
            for text, b in auto:
                owners.setdefault(text, []).append(i)
                # A prefix shared by a rule without \b must be looked for everywhere.
                bounded[text] = bounded.get(text, True) and b
        self._plain = Sweeps(owners, bounded)
        # Plain prefixes own rule i, rot13'd ones i + n (a string may be both).
        n = len(rules)
        both = {t: list(v) for t, v in owners.items()}
        both_bounded = dict(bounded)
        for t, idx in owners.items():
            rot = rot13(t)
            both.setdefault(rot, []).extend(i + n for i in idx)
            both_bounded[rot] = both_bounded.get(rot, True) and bounded[t]
        self._both = Sweeps(both, both_bounded)

    def __len__(self) -> int:
        return len(self.rules)

    def match(self, text: str) -> list[RuleSpec]:
        """Rules that fire on ``text`` (already normalised)."""
        return [self.rules[i] for i in sorted(self.fired(text))]

    def _search(
        self,
        text: str,
        hits: set[int],
        skip: set[int] | frozenset[int],
        windows: list[tuple[int, int]] | None,
    ) -> None:
        """The rules without a literal start (into ``hits``)."""
        n = len(text)
        spans = windows if windows is not None else [(0, n)]
        rxs = self._regexes
        for i, trig in self._searched:
            if i in hits or i in skip:
                continue
            if trig is not None and not any(t in text for t in trig):
                continue
            rx = rxs[i]
            for lo, hi in spans:
                end = n if windows is None else min(n, hi + WINDOW_REACH)
                found = rx.search(text, lo, end)
                if found is not None and found.start() <= hi:
                    hits.add(i)
                    break

    def fired(
        self,
        text: str,
        skip: set[int] | frozenset[int] = frozenset(),
        windows: list[tuple[int, int]] | None = None,
        starts: Starts | None = None,
    ) -> set[int]:
        """Indexes of the rules that fire on ``text``, not trying those in ``skip``.

        ``windows``: only matches starting within one of these ``(first, last)`` position
        ranges count (the scanner's deobfuscated form differs from the plain one only around
        folded characters). Rules without a literal start then look :data:`WINDOW_REACH`
        characters past a window's end at most. ``starts`` (without ``windows``) receives the
        prefix occurrences found, for :meth:`fired_edited` on a text derived from this one."""
        hits: set[int] = set()
        rxs = self._regexes
        spans = windows if windows is not None else [(0, len(text))]
        found = self._plain.starts(text, spans)
        if starts is not None and windows is None:
            starts += found
        for pos, idx in found:
            for i in idx:
                if i not in hits and i not in skip and rxs[i].match(text, pos):
                    hits.add(i)
        if self._searched:
            self._search(text, hits, skip, windows)
        return hits

    def fired_with_rot13(
        self,
        text: str,
        skip: set[int] | frozenset[int] = frozenset(),
        starts: Starts | None = None,
    ) -> set[int]:
        """``fired(text, skip) | fired(rot13(text), skip)``, in one set of sweeps (``starts``:
        as for :meth:`fired`; the rot13 prefixes' owners in it are indexes past the rules')."""
        hits: set[int] = set()
        rxs = self._regexes
        n = len(self.rules)
        rot: str | None = None
        found = self._both.starts(text, [(0, len(text))])
        if starts is not None:
            starts += found
        for pos, idx in found:
            for i in idx:
                if i >= n:
                    i -= n
                    if i in hits or i in skip:
                        continue
                    if rot is None:
                        rot = rot13(text)
                    if rxs[i].match(rot, pos):
                        hits.add(i)
                elif i not in hits and i not in skip and rxs[i].match(text, pos):
                    hits.add(i)
        if self._searched:
            self._search(text, hits, skip, None)
            self._search(rot if rot is not None else rot13(text), hits, skip, None)
        return hits

    def fired_edited(
        self, text: str, base: str, base_starts: Starts, skip: set[int] | frozenset[int]
    ) -> set[int]:
        """``fired(text, skip)``, for a ``text`` that is ``base`` with a few characters deleted
        (the scanner's spelt-out words, joined, against the light form), given the prefix
        occurrences of a full sweep of ``base`` (the ``starts`` of :meth:`fired` or
        :meth:`fired_with_rot13`).

        Whether a prefix occurs at a position depends on the character before it and the next
        ``longest - 1`` characters alone (the sweeps' look-arounds read no further), so where
        ``text`` and ``base`` share all of that, the occurrence is the same in both: those are
        taken from ``base``'s sweep, shifted, and only the rest of ``text`` (around each
        deletion, and its first character) is swept. A rule's regex is then tried at every
        occurrence, as :meth:`fired` does: a match may run into a difference from anywhere."""
        runs = shared_runs(base, text)
        if runs is None:
            return self.fired(text, skip)
        reach = max(self._plain.longest, self._both.longest)
        # Positions of text whose whole window lies in one shared run: (first, last, shift).
        safe = [(tj + 1, tj + k - reach + 1, bi - tj) for bi, tj, k in runs if k >= reach]
        firsts = [lo + shift for lo, _, shift in safe]  # in base
        found: Starts = []
        for p, idx in base_starts:
            r = bisect.bisect_right(firsts, p) - 1
            if r >= 0 and p - safe[r][2] <= safe[r][1]:
                found.append((p - safe[r][2], idx))
        gaps: list[tuple[int, int]] = []
        prev = 0
        for lo, hi, _ in safe:
            if lo > prev:
                gaps.append((prev, lo - 1))
            prev = hi + 1
        if prev < len(text):
            gaps.append((prev, len(text) - 1))
        if gaps:
            found += self._plain.starts(text, gaps)
        hits: set[int] = set()
        rxs = self._regexes
        n = len(self.rules)
        for pos, idx in found:
            for i in idx:
                if i < n and i not in hits and i not in skip and rxs[i].match(text, pos):
                    hits.add(i)
        if self._searched:
            self._search(text, hits, skip, None)
        return hits


def match_windows(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Where a match touching one of ``spans`` may start: from :data:`WINDOW_REACH` characters
    before it to its end, overlapping ranges merged."""
    out: list[tuple[int, int]] = []
    for a, b in spans:
        lo = max(0, a - WINDOW_REACH)
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((lo, b))
    return out
