"""``guard``: blocks, redacts or flags prompts and answers.

Layers, each configurable and each reported in the verdict (``ctx.log["guard"]``, metric
``gateway_guard_verdicts_total``): input limits (``schema``), normalisation + rules (``rules``),
the embedding classifier (``semantic``), secrets/PII (``secrets``), and the output guard on
answers (``output``). ``mode: shadow`` evaluates and reports everything but changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, ClassVar

from gateway.accounting import fast_round
from gateway.errors import ContentPolicyError
from gateway.plugin import CHUNK_HOOKS, Plugin, StartupError
from gateway.redact import find_secrets, redact
from plugins.guard.answer import AnswerGuard
from plugins.guard.config import GuardConfig
from plugins.guard.logprobs import Alternatives
from plugins.guard.output import OutputGuard, hides_characters, seen_text
from plugins.guard.rules import RuleSet
from plugins.guard.scanner import Finding, Scanner, Verdict, record_metrics
from plugins.guard.schema import InputLimits, check_input
from plugins.guard.slots import URLS, USER_ONLY, Decoded, Slot, request_slots

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from gateway.state import Gateway

__all__ = ["GuardConfig", "GuardPlugin", "Scanner", "Verdict"]

log = logging.getLogger("gateway.guard")

BLOCKED_REQUEST = "The request was blocked by the gateway's content policy."


class GuardPlugin(AnswerGuard, Plugin):
    name = "guard"
    Config = GuardConfig
    endpoints: ClassVar[frozenset[str]] = frozenset({"chat", "embeddings"})
    text_chunks: ClassVar[bool] = True  # on_chunks handles a joined run of text as it is
    config: GuardConfig

    def __init__(self, config: GuardConfig) -> None:
        super().__init__(config)
        cfg = config
        self.shadow = cfg.mode == "shadow"
        self.secret_actions = {k: v for k, v in cfg.secrets.model_dump().items() if v != "allow"}
        self.secret_types = frozenset(self.secret_actions)
        self._scan_roles = frozenset(cfg.scan_roles)
        self._classified_roles = frozenset(cfg.semantic.roles)
        # Read on every request: plain attributes (a pydantic attribute read costs ~450
        # instructions).
        self._mode = cfg.mode
        self._limits = InputLimits(cfg.input)
        self._offload_chars = cfg.offload_chars
        o = cfg.output
        self._output_enabled = o.enabled and bool(o.secret_types or o.canary)
        #: Ready without ``startup`` (rules only) so unit tests and tools can use it directly;
        #: ``startup`` adds the semantic model.
        self.scanner = self._make_scanner(None)
        self.output = OutputGuard(cfg.output)
        self.alternatives = Alternatives(o.secret_types, o.canary)

    def _make_scanner(self, semantic: Any) -> Scanner:
        cfg = self.config
        rules = RuleSet(cfg.rules.effective()) if cfg.rules.enabled else None
        return Scanner(
            rules,
            rules_action=cfg.rules.action,
            decoders=tuple(cfg.normalize.decode),
            semantic=semantic,
            semantic_threshold=cfg.semantic.threshold,
            semantic_action=cfg.semantic.action,
            secret_actions=self.secret_actions,
            middle_windows=cfg.semantic.middle_windows,
        )

    async def startup(self, gateway: Gateway) -> None:
        # The deployments' keys, found in answers whatever their shape (see OutputGuard).
        providers = getattr(gateway, "providers", None) or {}  # (tests start it bare)
        self.output.set_credentials(s for p in providers.values() for s in p.secrets)
        sem = self.config.semantic
        if not sem.enabled:
            return
        try:
            from plugins.guard.semantic import SemanticDetector

            detector = SemanticDetector(sem.model_path, sem.threshold)
            await asyncio.to_thread(detector.load)
        except Exception as e:
            raise StartupError(
                f"guard: the semantic classifier could not be loaded "
                f"(model_path={sem.model_path or 'default'}): {e}. Fix the path or set "
                "guard semantic.enabled: false to run without it"
            ) from e
        self.scanner = self._make_scanner(detector)
        log.info("guard semantic classifier loaded", extra={"threshold": sem.threshold})

    async def shutdown(self) -> None:
        self.scanner.close()

    # --- request -----------------------------------------------------------------------------

    async def on_request(self, ctx: RequestContext) -> None:
        t0 = time.perf_counter()
        check_input(self._limits, ctx)
        slots = request_slots(ctx)
        roles = self._scan_roles if ctx.endpoint == "chat" else USER_ONLY
        # Injection layers over the scanned roles' texts, no secrets (done below, with spans);
        # the classifier only over its roles' texts.
        classify: list[bool] | None = None
        if self.scanner.semantic is None:
            # (A loop, not a comprehension: most requests have a slot or two, and a
            # comprehension costs a function call.)
            texts: list[str] = []
            for c, k, role in slots:
                if role in roles:
                    texts.append(c[k])
        else:
            scanned = [(c[k], role) for c, k, role in slots if role in roles]
            texts = [t for t, _ in scanned]
            classify = [role in self._classified_roles for _, role in scanned]
        findings = self.scanner.findings_now(texts, self._offload_chars, classify)
        if findings is None:  # a classifier or a thread to wait for
            findings = await self.scanner.findings(
                texts, self._offload_chars, self.shadow, classify
            )
        redactions: list[tuple[Slot, list[Any]]] = []
        if self.secret_types:
            actions = self.secret_actions
            for slot in slots:
                container, key, role = slot
                text = container[key]
                hits = find_secrets(text, self.secret_types)
                decoded = type(container) is Decoded
                if not hits and ((key == "arguments" and "\\" in text) or hides_characters(text)):
                    # Hidden from the patterns, not from the model: JSON escapes in call
                    # arguments, invisible characters. Found in the text as a reader sees it,
                    # which cannot be redacted in place: blocked. (C-speed tests first: a long
                    # prompt in another script is not read character by character.)
                    hits = find_secrets(seen_text(text), self.secret_types)
                    decoded = bool(hits)
                if not hits:  # the usual case
                    continue
                for h in hits:
                    action = actions[h.type]
                    if action == "redact" and role == URLS:
                        action = "flag"  # a rewritten URL breaks (its signature covers it)
                    elif action == "redact" and decoded:
                        action = "block"  # (token ids, a hidden key: nothing to redact in place)
                    findings.append(Finding("secrets", h.type, action, h.type))
                todo = [h for h in hits if actions[h.type] == "redact"]
                if todo and role != URLS and not decoded:
                    redactions.append((slot, todo))
        verdict = Verdict(findings) if findings else None
        self._report(ctx, verdict, "input", t0)
        if self.shadow or verdict is None:
            return None
        if verdict.blocked:
            raise ContentPolicyError(BLOCKED_REQUEST)
        for (container, key, _), hits in redactions:
            container[key] = redact(container[key], hits)
        return None

    def _report(self, ctx: RequestContext, verdict: Verdict | None, phase: str, t0: float) -> None:
        """The phase's entry in the request log; for a verdict with findings, metrics and a
        log line too. ``None``: nothing found."""
        entry = ctx.log.get("guard")
        if entry is None:
            entry = ctx.log["guard"] = {"mode": self._mode}
        ms = fast_round((time.perf_counter() - t0) * 1000, 3)
        if verdict is None or not verdict.findings:  # the usual case
            entry[phase] = {"action": "allow", "categories": [], "findings": [], "ms": ms}
            return
        data = verdict.as_dict()
        data["ms"] = ms
        entry[phase] = data
        record_metrics(verdict, self.shadow)
        log.info(
            "guard verdict",
            extra={"request_id": ctx.request_id, "phase": phase, "mode": self.config.mode,
                   "action": verdict.action, "categories": verdict.categories},
        )  # fmt: skip

    # --- response ------------------------------------------------------------------------------

    def _output_on(self) -> bool:
        return self._output_enabled

    def uses(self, hook: str) -> bool:
        # Without the output guard, streams need not be parsed for this plugin, and its
        # ``on_response`` has no answer to check and no output verdict to log (only the output
        # guard's checks record one).
        if (hook in CHUNK_HOOKS or hook == "on_response") and not self._output_enabled:
            return False
        return super().uses(hook)
