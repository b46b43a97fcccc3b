"""The reusable scanner: normalisation + rules (+ semantic) + secrets over a list of texts.

The guard plugin uses it on prompts; the RAG plugin uses it on retrieved chunks before injecting
them (``gateway.pipeline.find("guard").scanner.scan_chunks(texts)``). A :class:`Verdict` says
what was found and what the configured action is, never the matched text itself.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from gateway.digest import text_digest
from gateway.redact import find_secrets
from plugins.guard.decode import (
    ROT13_ALWAYS_BELOW,
    ascii_clues,
    decoded_variants,
    may_deobfuscate,
    rot13_windows,
)
from plugins.guard.hidden import reveal_tags
from plugins.guard.markup import unmask, unmasked_segments
from plugins.guard.middle import middle_segments
from plugins.guard.normalize import deobfuscate_spans, light, variants
from plugins.guard.prefixes import Starts, rot13
from plugins.guard.rules import RuleSet, match_windows
from plugins.guard.spelt import spelt_fired

if TYPE_CHECKING:
    from plugins.guard.semantic import SemanticDetector

log = logging.getLogger("gateway.guard")

VERDICTS = Counter(
    "gateway_guard_verdicts_total",
    "Guard findings by category, action taken (shadow_* in shadow mode) and layer.",
    ["category", "action", "layer"],
)

#: Actions in increasing severity; a verdict's action is its most severe finding's.
SEVERITY = {"allow": 0, "flag": 1, "redact": 2, "block": 3}


@dataclass(slots=True)
class Finding:
    layer: str  # "schema" | "rules" | "semantic" | "secrets" | "output"
    category: str
    action: str
    #: Rule id or secret type (never the matched text).
    rule: str = ""
    score: float | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layer": self.layer, "category": self.category, "action": self.action}
        if self.rule:
            d["rule"] = self.rule
        if self.score is not None:
            d["score"] = round(self.score, 4)
        return d


@dataclass(slots=True)
class Verdict:
    findings: list[Finding] = field(default_factory=list)

    @property
    def action(self) -> str:
        return max((f.action for f in self.findings), key=SEVERITY.__getitem__, default="allow")

    @property
    def blocked(self) -> bool:
        return self.action == "block"

    @property
    def categories(self) -> list[str]:
        return sorted({f.category for f in self.findings})

    def merge(self, other: Verdict) -> None:
        self.findings.extend(other.findings)

    def as_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "categories": self.categories,
            "findings": [f.as_dict() for f in self.findings],
        }


#: Classifier scores remembered per scanner (then the memo starts over).
_MEMO_MAX = 4096


def record_metrics(verdict: Verdict, shadow: bool) -> None:
    for f in verdict.findings:
        VERDICTS.labels(f.category, f"shadow_{f.action}" if shadow else f.action, f.layer).inc()


#: Decoded payloads of one text the classifier scores, besides the text itself (and the text
#: with its markup decoded).
MAX_DECODED_SCORED = 2
#: The least score a decoded form counts with (the threshold, if higher): a decoded text is
#: further from what the classifier learnt from ("lorem ipsum dolor sit amet" scores 0.79).
#: The same for the text with its markup decoded, so that no benign prompt the classifier
#: passed before is blocked for its entities or tags (its raw score still counts as ever).
DECODED_THRESHOLD = 0.9
#: The most spans of a long text's middle the classifier may score besides the text (see
#: :mod:`plugins.guard.middle`; ``semantic.middle_windows`` in the config, 0 by default): each
#: is one forward pass more.
MAX_MIDDLE_SCORED = 8
#: The least score such a span counts with (the threshold, if higher): a sentence out of its
#: document, scored alone, reads more like a prompt than the document did.
MIDDLE_THRESHOLD = 0.98


class Scanner:
    """Injection scanning of texts. Thread-safe: compiled regexes and the model are read-only."""

    def __init__(
        self,
        rules: RuleSet | None,
        rules_action: str = "block",
        decoders: tuple[str, ...] = (),
        semantic: SemanticDetector | None = None,
        semantic_threshold: float = 0.5,
        semantic_action: str = "block",
        secret_actions: dict[str, str] | None = None,
        middle_windows: int = 0,
    ) -> None:
        self.rules = rules
        #: The rules to match, or None (read per text: ``len(rules)`` is a Python call).
        self._rules = rules if rules is not None and len(rules) else None
        self.rules_action = rules_action
        self.decoders = decoders
        self._decoders_but_rot13 = tuple(k for k in decoders if k != "rot13")
        self._rot13 = "rot13" in decoders
        self.semantic = semantic
        self.semantic_threshold = semantic_threshold
        self.semantic_action = semantic_action
        self.middle_windows = middle_windows
        self.secret_actions = secret_actions or {}
        # One thread for the model: inference is CPU-bound and the model is not shared safely
        # across threads; queueing here keeps the event loop free.
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="guard-semantic") if semantic else None
        )
        #: digest of a text -> its classifier score (see :meth:`semantic_scores`).
        self._scores: dict[bytes, float] = {}

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # --- rules ---------------------------------------------------------------------------------

    def rule_findings(self, text: str) -> list[Finding]:
        """Rules over the text's normalised forms and its decoded segments.

        Forms: the light form (:func:`light`); the deobfuscated one (leetspeak, spaced letters)
        only around what deobfuscation changed, since elsewhere it is the light form; the parts
        of the text that markup and escapes change (HTML references, tags and comments, JSON
        escapes, quoted-printable), decoded, both ways; each decoded base64/hex/%-escaped
        segment, both ways; and the rot13 of the light form. A rule that fired is not tried
        again on later forms."""
        rules = self._rules
        if rules is None or not text:
            return []
        lit = light(text)
        kinds = self._decoders_but_rot13
        # Short texts' rot13 is matched whole (what rot13_windows says, without asking it).
        whole_rot13 = self._rot13 and len(text) < ROT13_ALWAYS_BELOW
        rot13_windows_ = rot13_windows(text, lit) if self._rot13 and not whole_rot13 else []
        starts: Starts = []  # the light form's prefix occurrences, for the spelt-out form
        if whole_rot13 or rot13_windows_ == [(0, len(lit))]:
            # The whole rot13 too: in the same sweeps as the light form.
            fired = rules.fired_with_rot13(lit, starts=starts)
            rot13_windows_ = []
        else:
            fired = rules.fired(lit, starts=starts)
        # Most prompts are ASCII with nothing to deobfuscate or decode: cheap exact tests first
        # (for other texts, decoded_variants makes its own).
        if text.isascii():
            deobfuscate, decode = ascii_clues(text, lit)
        else:
            deobfuscate, decode = may_deobfuscate(lit), True
        if deobfuscate:
            self._fired_deobfuscated(text, lit, fired, starts)
        # Markup and escapes (HTML references and tags, JSON escapes, quoted-printable): the
        # text as it reads, in the same forms, around each place they change it.
        for unmasked in unmasked_segments(text):
            ulit = light(unmasked)
            fired |= rules.fired(ulit, fired)
            if may_deobfuscate(ulit):
                # (Not spelt out: the raw text's pass reads those, tags and all, and that
                # pass over a whole page cost more than the rest of the decoded form's.)
                self._fired_deobfuscated(unmasked, ulit, fired)
        if kinds and decode:
            for decoded in dict.fromkeys(decoded_variants(text, kinds)):
                for form in variants(decoded):
                    fired |= rules.fired(form, fired)
        if rot13_windows_:
            fired |= rules.fired(rot13(lit), fired, rot13_windows_)
        if not fired:
            return []
        return [
            Finding("rules", rules.rules[i].category, self.rules_action, rules.rules[i].id)
            for i in sorted(fired)
        ]

    def _fired_deobfuscated(
        self, text: str, lit: str, fired: set[int], starts: Starts | None = None
    ) -> None:
        """Adds to ``fired`` the rules matching the deobfuscated form of ``lit``
        (``light(text)``) around what deobfuscation changed, and (given ``starts``, the prefix
        occurrences of ``lit``'s sweep) the form of words spelt out letter by letter."""
        rules = self.rules
        assert rules is not None
        full, changed = deobfuscate_spans(lit)
        if changed:
            fired |= rules.fired(full, fired, match_windows(changed))
            # Words spelt out letter by letter, two spaces apart: the light form lost the
            # gaps between them ("ignoreallprevious"), this form keeps them.
            if starts is not None and "  " in text:
                fired |= spelt_fired(rules, text, lit, starts, fired)

    def secret_findings(self, text: str) -> list[Finding]:
        if not self.secret_actions:
            return []
        types = frozenset(t for t, a in self.secret_actions.items() if a != "allow")
        return [
            Finding("secrets", h.type, self.secret_actions[h.type], h.type)
            for h in find_secrets(text, types)
        ]

    def scan_sync(self, texts: list[str], secrets: bool = True) -> list[Verdict]:
        """Rules (and secrets) for each text; no semantic layer. Blocking, CPU only."""
        out = []
        for t in texts:
            v = Verdict(self.rule_findings(t))
            if secrets:
                v.findings.extend(self.secret_findings(t))
            out.append(v)
        return out

    # --- semantic ------------------------------------------------------------------------------

    async def semantic_scores(self, texts: list[str]) -> list[float]:
        """The classifier's score for each text. Scores are remembered by a digest of the text:
        a conversation sends every earlier user turn again with each request, and RAG retrieves
        the same chunks again, so without this each request would re-score them all (one
        forward pass each, ~4 ms)."""
        if self.semantic is None or not texts:
            return [0.0] * len(texts)
        # Text hidden in tag characters is read as the ASCII it shadows (some models do).
        texts = [reveal_tags(t) for t in texts]
        keys = [text_digest(t, "guard-score") for t in texts]
        memo = self._scores
        scores = [memo.get(k, -1.0) for k in keys]  # scores are probabilities: -1 is "unknown"
        todo = [i for i, s in enumerate(scores) if s < 0.0]
        if todo:
            loop = asyncio.get_running_loop()
            fresh = await loop.run_in_executor(
                self._executor, self.semantic.score, [texts[i] for i in todo]
            )
            if len(memo) + len(todo) > _MEMO_MAX:
                memo.clear()
            for i, s in zip(todo, fresh, strict=True):
                scores[i] = memo[keys[i]] = s
        return scores

    def _semantic_findings(self, score: float) -> list[Finding]:
        if score >= self.semantic_threshold:
            return [Finding("semantic", "injection", self.semantic_action, "classifier", score)]
        return []

    # --- both ----------------------------------------------------------------------------------

    async def scan(
        self,
        texts: list[str],
        secrets: bool = True,
        offload_chars: int = 4096,
        exhaustive: bool = False,
        classify: list[bool] | None = None,
    ) -> list[Verdict]:
        """All layers over ``texts``; large inputs are swept in a worker thread.

        The classifier (the costly layer) only scores texts the cheaper layers did not already
        block, unless ``exhaustive`` (shadow mode reports every layer's opinion), and of those
        only the ones ``classify`` marks (None: all)."""
        if sum(map(len, texts)) > offload_chars:
            verdicts = await asyncio.to_thread(self.scan_sync, texts, secrets)
        else:
            verdicts = self.scan_sync(texts, secrets)
        if self.semantic is not None:
            todo = [
                i
                for i, v in enumerate(verdicts)
                if (classify is None or classify[i]) and (exhaustive or not v.blocked)
            ]
            batch: list[str] = []
            owner: list[tuple[int, float]] = []  # each batch text's owner, and its floor
            decoded = max(self.semantic_threshold, DECODED_THRESHOLD)
            middle = max(self.semantic_threshold, MIDDLE_THRESHOLD)
            for i in todo:
                batch.append(texts[i])
                owner.append((i, 0.0))
                for t in self._decoded_prose(texts[i]):
                    batch.append(t)
                    owner.append((i, decoded))
                for t in self.middle_spans(texts[i]):
                    batch.append(t)
                    owner.append((i, middle))
            best: dict[int, float] = {}
            for (i, floor), s in zip(owner, await self.semantic_scores(batch), strict=True):
                if s >= floor:
                    best[i] = max(best.get(i, 0.0), s)
            for i in todo:
                verdicts[i].findings.extend(self._semantic_findings(best[i]))
        return verdicts

    def _decoded_prose(self, text: str) -> list[str]:
        """Decoded forms of ``text`` for the classifier: the text with its markup and escapes
        decoded (:func:`unmask`), when it has any, then the payloads it hides (base64, hex,
        %-escapes) that read as prose, at most :data:`MAX_DECODED_SCORED` of them. Encoding a
        paraphrase the rules do not know used to be enough to get it past both layers. Each is
        one forward pass more."""
        unmasked = unmask(text)
        out = [] if unmasked is None else [unmasked]
        kinds = self._decoders_but_rot13
        if not kinds or (text.isascii() and not ascii_clues(text, light(text))[1]):
            return out
        payloads = 0
        for d in dict.fromkeys(decoded_variants(text, kinds)):
            letters = sum(c.isalpha() or c.isspace() for c in d)
            if len(d) >= 16 and letters >= 0.85 * len(d) and " " in d.strip():
                out.append(d)
                payloads += 1
                if payloads == MAX_DECODED_SCORED:
                    break
        return out

    def middle_spans(self, text: str) -> list[str]:
        """Spans of a long text's middle, which the classifier's one window leaves out, that
        hold the words injections are written with: a paraphrase there was read by the rules
        alone. At most ``middle_windows``, each one forward pass more."""
        if self.semantic is None:
            return []
        return middle_segments(text, self.middle_windows, self.semantic.unseen)

    async def findings(
        self,
        texts: list[str],
        offload_chars: int = 4096,
        exhaustive: bool = False,
        classify: list[bool] | None = None,
    ) -> list[Finding]:
        """The findings of :meth:`scan` (injection layers only, no secrets) over all ``texts``,
        in order; the classifier over those ``classify`` marks (None: all). Without a
        classifier, texts too small for a thread are swept here, with no verdict per text (the
        guard's usual request)."""
        swept = self.findings_now(texts, offload_chars, classify)
        if swept is not None:
            return swept
        verdicts = await self.scan(texts, False, offload_chars, exhaustive, classify)
        return [f for v in verdicts for f in v.findings]

    def findings_now(
        self, texts: list[str], offload_chars: int = 4096, classify: list[bool] | None = None
    ) -> list[Finding] | None:
        """What :meth:`findings` gives when it has nothing to wait for (no classifier, or no
        text for it, and texts too small for a thread), without a coroutine; None when it
        has."""
        if sum(map(len, texts)) > offload_chars or (
            self.semantic is not None and (classify is None or any(classify))
        ):
            return None
        out: list[Finding] = []
        for t in texts:
            out += self.rule_findings(t)
        return out

    async def scan_chunks(self, texts: list[str]) -> list[Verdict]:
        """One verdict per retrieved chunk (for RAG): injection layers only, no secrets.

        ``verdict.blocked`` means the chunk should be dropped; metrics are recorded here."""
        verdicts = await self.scan(texts, secrets=False)
        for v in verdicts:
            if v.findings:
                record_metrics(v, shadow=False)
        return verdicts
