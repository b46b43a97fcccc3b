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

from plugins.guard.normalize import decoded_variants, variants
from plugins.guard.rules import RuleSet
from plugins.guard.secrets import find_secrets

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


def record_metrics(verdict: Verdict, shadow: bool) -> None:
    for f in verdict.findings:
        VERDICTS.labels(f.category, f"shadow_{f.action}" if shadow else f.action, f.layer).inc()


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
    ) -> None:
        self.rules = rules
        self.rules_action = rules_action
        self.decoders = decoders
        self.semantic = semantic
        self.semantic_threshold = semantic_threshold
        self.semantic_action = semantic_action
        self.secret_actions = secret_actions or {}
        # One thread for the model: inference is CPU-bound and the model is not shared safely
        # across threads; queueing here keeps the event loop free.
        self._executor = (
            ThreadPoolExecutor(1, thread_name_prefix="guard-semantic") if semantic else None
        )

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # --- rules ---------------------------------------------------------------------------------

    def rule_findings(self, text: str) -> list[Finding]:
        """Rules over the text's normalised forms and its decoded segments."""
        if self.rules is None or not len(self.rules) or not text:
            return []
        forms = variants(text)
        if self.decoders:
            for decoded in decoded_variants(text, self.decoders):
                forms.extend(variants(decoded))
        fired: set[int] = set()
        out: list[Finding] = []
        # Identical forms (a decoded segment equal to the text, ...) are matched once; a rule
        # that fired is not tried again on later forms.
        for form in dict.fromkeys(forms):
            new = self.rules.fired(form, fired)
            for i in sorted(new):
                rule = self.rules.rules[i]
                out.append(Finding("rules", rule.category, self.rules_action, rule.id))
            fired |= new
        return out

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
        if self.semantic is None or not texts:
            return [0.0] * len(texts)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.semantic.score, texts)

    def _semantic_findings(self, score: float) -> list[Finding]:
        if score >= self.semantic_threshold:
            return [Finding("semantic", "injection", self.semantic_action, "classifier", score)]
        return []

    # --- both ----------------------------------------------------------------------------------

    async def scan(
        self, texts: list[str], secrets: bool = True, offload_chars: int = 4096
    ) -> list[Verdict]:
        """All layers over ``texts``; large inputs are swept in a worker thread."""
        if sum(len(t) for t in texts) > offload_chars:
            verdicts = await asyncio.to_thread(self.scan_sync, texts, secrets)
        else:
            verdicts = self.scan_sync(texts, secrets)
        if self.semantic is not None:
            scores = await self.semantic_scores(texts)
            for v, s in zip(verdicts, scores, strict=True):
                v.findings.extend(self._semantic_findings(s))
        return verdicts

    async def scan_chunks(self, texts: list[str]) -> list[Verdict]:
        """One verdict per retrieved chunk (for RAG): injection layers only, no secrets.

        ``verdict.blocked`` means the chunk should be dropped; metrics are recorded here."""
        verdicts = await self.scan(texts, secrets=False)
        for v in verdicts:
            if v.findings:
                record_metrics(v, shadow=False)
        return verdicts
