"""The guard's answer side, for a streamed delta's parts other than its text: refusal,
reasoning, audio transcript, annotations, tool calls and the legacy function call.

``AnswerParts`` is a mixin of :class:`plugins.guard.answer.AnswerGuard`, which calls
:meth:`AnswerParts._parts` for a chunk that carries any of them. Each is fed to the output guard
and held back like the text (under a ``(choice, part)`` key of ``held``); annotations and a
call's name, which arrive whole, are checked at once.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

from plugins.guard.annotations import check_annotations
from plugins.guard.delta import REASONING_FIELDS
from plugins.guard.logprobs import Alternatives, release_logprobs
from plugins.guard.output import OutputGuard

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from plugins.guard.scanner import Finding


class AnswerParts:
    """:class:`plugins.guard.answer.AnswerGuard`'s handling of a delta's non-text parts."""

    name: ClassVar[str]
    shadow: bool
    output: OutputGuard
    alternatives: Alternatives

    if TYPE_CHECKING:  # (AnswerGuard's: records the findings, raises to block)

        def _act(self, ctx: RequestContext, findings: list[Finding]) -> None: ...

    def _parts(
        self, ctx: RequestContext, held: dict[Any, str], idx: Any, delta: dict[str, Any],
        logprobs: Any,
    ) -> None:  # fmt: skip
        """A delta's parts other than its text: refusal, reasoning, audio transcript,
        annotations, tool calls, legacy function call (fed, or checked, and replaced)."""
        shadow = self.shadow
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            # A refusal is the model's text too (it may quote what it refuses to give).
            key = (idx, "refusal")
            before = len(held.get(key, ""))
            released, held[key], findings = self.output.feed(held.get(key, ""), refusal, False)
            if findings:
                self._act(ctx, findings)
            if not shadow:
                delta["refusal"] = released
                if isinstance(logprobs, dict):
                    consumed = before + len(refusal) - len(held[key])
                    release_logprobs(
                        ctx.scratch_for(self.name),
                        idx,
                        "refusal",
                        logprobs,
                        consumed,
                        bool(findings),
                        self.alternatives,
                    )
        for field in REASONING_FIELDS:
            reasoning = delta.get(field)
            if type(reasoning) is str and reasoning:
                key = (idx, field)
                released, held[key], findings = self.output.feed(
                    held.get(key, ""), reasoning, False
                )
                if findings:
                    self._act(ctx, findings)
                if not shadow:
                    delta[field] = released
        audio = delta.get("audio")
        if type(audio) is dict and type(audio.get("transcript")) is str and audio["transcript"]:
            # What the model says aloud is its text too.
            key = (idx, "audio")
            released, held[key], findings = self.output.feed(
                held.get(key, ""), audio["transcript"], False
            )
            if findings:
                self._act(ctx, findings)
            if not shadow:
                audio["transcript"] = released
        notes = delta.get("annotations")
        if type(notes) is list and notes:
            # (Cited URLs and titles arrive whole: checked at once, never held.)
            kept, findings = check_annotations(self.output, notes, not shadow)
            self._act(ctx, findings)
            delta["annotations"] = kept
        calls = delta.get("tool_calls")
        if calls:
            self._tool_calls(ctx, held, idx, calls)
        fn = delta.get("function_call")  # (the legacy single call)
        if type(fn) is dict and type(args := fn.get("arguments")) is str and args:
            key = (idx, "function_call")
            released, held[key], findings = self.output.feed(
                held.get(key, ""), args, False, json_text=True
            )
            if findings:
                self._act(ctx, findings)
            if not shadow:
                fn["arguments"] = released

    def _tool_calls(self, ctx: RequestContext, held: dict[Any, str], idx: Any, calls: Any) -> None:
        """The argument fragments of a choice's tool calls go through the output guard like
        its text, each call on its own (held under ``(choice, call index)``)."""
        for call in calls if type(calls) is list else ():
            fn = call.get("function") if type(call) is dict else None
            if type(fn) is dict and type(name := fn.get("name")) is str and name:
                # A call's name comes whole, and cannot be redacted: a finding blocks.
                _, found = self.output.check(name)
                if found:
                    self._act(ctx, [replace(f, action="block") for f in found])
            if type(fn) is not dict or type(args := fn.get("arguments")) is not str or not args:
                continue
            key = (idx, call.get("index", 0))
            released, held[key], findings = self.output.feed(
                held.get(key, ""), args, False, json_text=True
            )
            if findings:
                self._act(ctx, findings)
            if not self.shadow:
                fn["arguments"] = released
