"""The rules layer: a curated ruleset (``rules.yaml``) plus operator changes, compiled once.

Rules match the *normalised* text (see :mod:`plugins.guard.normalize`): lower-case, lookalikes
and leetspeak folded, whitespace collapsed. A rule is either a ``pattern`` (a Python regular
expression) or ``keywords`` (phrases matched case-insensitively, whole words, with up to four
non-word characters between words: ``ignore--previous  instructions`` still matches).

All rules compile into one alternation with one named group per rule, so a prompt is swept once
whatever the number of rules (``m.lastgroup`` names the rule that fired).
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any, Literal

import yaml

try:  # Python 3.11 has both; 3.13 deprecates the sre_* names.
    from re import _constants as _c  # type: ignore[attr-defined]
    from re import _parser as _p  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _p  # type: ignore[no-redef]
from pydantic import field_validator, model_validator

from gateway.configbase import Strict
from plugins.guard.normalize import light

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
            return f"(?i:{self.pattern})" if _UPPER.search(self.pattern) else self.pattern
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


def _leading_literal(items: Any) -> str | None:
    """The literal text every match of ``items`` starts with (after ``\\b``), if any."""
    out: list[str] = []
    for op, arg in items:
        if op is _c.AT:
            if out:
                break
            continue
        if op is _c.LITERAL:
            out.append(chr(arg))
            continue
        break
    return "".join(out) if len(out) >= 2 else None


def _triggers(items: Any) -> list[str] | None:
    """Substrings one of which must occur for the pattern to match, or None (always run).

    Derived from the parsed pattern: a leading alternation of words (``\\b(?:ignore|forget)``)
    gives one trigger per branch; anything less literal gives None."""
    items = list(items)
    while items and items[0][0] is _c.AT:
        items = items[1:]
    if not items:
        return None
    op, arg = items[0]
    if op is _c.BRANCH:
        branches = arg[1]
    elif op is _c.SUBPATTERN and len(arg[-1]) == 1 and arg[-1][0][0] is _c.BRANCH:
        branches = arg[-1][0][1][1]
    elif op is _c.SUBPATTERN:
        return _triggers(list(arg[-1]) + items[1:]) if arg[1] == 0 and arg[2] == 0 else None
    else:
        lit = _leading_literal(items)
        return [lit] if lit else None
    out: list[str] = []
    for br in branches:
        sub = _triggers(br)
        if sub is None:
            return None
        out.extend(sub)
    return out


def triggers(regex: str) -> list[str] | None:
    try:
        return _triggers(_p.parse(regex))
    except Exception:
        return None


class RuleSet:
    """Compiled rules. Each rule is guarded by cheap substring triggers derived from its pattern
    (``str.__contains__`` is far faster than running a regex over the text), so on ordinary text
    almost no regex runs at all."""

    def __init__(self, rules: list[RuleSpec]) -> None:
        self.rules = rules
        #: (rule, regex, triggers, anchored): anchored triggers start every match, so the regex
        #: is only tried at their positions.
        self._compiled: list[tuple[RuleSpec, re.Pattern[str], tuple[str, ...] | None, bool]] = []
        for r in rules:
            regex = r.regex()
            auto = triggers(regex)
            if auto:
                self._compiled.append((r, re.compile(regex), tuple(dict.fromkeys(auto)), True))
            else:
                manual = tuple(light(t) for t in r.triggers) or None
                self._compiled.append((r, re.compile(regex), manual, False))

    def __len__(self) -> int:
        return len(self.rules)

    def match(self, text: str) -> list[RuleSpec]:
        """Rules that fire on ``text`` (already normalised)."""
        fired = []
        for rule, rx, trig, anchored in self._compiled:
            if trig is None:
                hit = rx.search(text) is not None
            elif not anchored:
                hit = any(t in text for t in trig) and rx.search(text) is not None
            else:
                hit = False
                for t in trig:
                    i = text.find(t)
                    while i != -1:
                        if rx.match(text, i):
                            hit = True
                            break
                        i = text.find(t, i + 1)
                    if hit:
                        break
            if hit:
                fired.append(rule)
        return fired
