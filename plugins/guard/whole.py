"""The output guard on a whole (non-streamed) chat answer: every text the model wrote, its
citations, its logprobs' alternatives and its tool calls' names, checked before the body is
sent (streams go through :class:`plugins.guard.answer.AnswerGuard` block by block)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

from plugins.guard.annotations import check_annotations
from plugins.guard.delta import response_texts
from plugins.guard.logprobs import Alternatives, screen_answer
from plugins.guard.output import OutputGuard
from plugins.guard.scanner import Finding


def check_whole_answer(
    response: dict[str, Any],
    output: OutputGuard,
    alternatives: Alternatives,
    shadow: bool,
    act: Callable[[list[Finding]], None],
) -> None:
    """Redact ``response`` in place (unless ``shadow``); ``act`` gets each part's findings, a
    text's only when it has some (it raises to refuse the answer)."""
    for choice, msg, key in response_texts(response):
        text, findings = output.check(msg[key], json_text=key == "arguments")
        if findings:
            act(findings)
        if not shadow and text != msg[key]:
            msg[key] = text
            if isinstance(choice.get("logprobs"), dict):
                # Its tokens spell out what was redacted.
                choice["logprobs"] = None
    for option in response.get("choices") or ():
        said = option.get("message") if isinstance(option, dict) else None
        notes = said.get("annotations") if isinstance(said, dict) else None
        if isinstance(notes, list) and notes:
            kept, found = check_annotations(output, notes, not shadow)
            act(found)
            said["annotations"] = kept  # type: ignore[index]
        # (screen_answer's own first test, here: most answers have no logprobs to screen.)
        if not shadow and isinstance(option, dict) and isinstance(option.get("logprobs"), dict):
            screen_answer(option, alternatives)
        calls = said.get("tool_calls") if isinstance(said, dict) else None
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            name = fn.get("name") if isinstance(fn, dict) else None
            if isinstance(name, str) and name:
                # A call's name cannot be redacted: a finding blocks.
                _, found = output.check(name)
                act([replace(f, action="block") for f in found])
