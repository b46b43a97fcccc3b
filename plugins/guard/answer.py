"""The guard's answer side: secrets and the canary in what the model writes, streamed or not.

``AnswerGuard`` is a mixin of :class:`plugins.guard.GuardPlugin` (its response hooks); the
checks themselves are :class:`plugins.guard.output.OutputGuard`'s. Streams arrive as relay
blocks (``on_chunks``): a choice's text, its refusal and each call's arguments are held back
and released apart, and a choice's ``logprobs`` go out with the text they spell. A delta's
parts other than its text are :class:`plugins.guard.answerparts.AnswerParts`'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gateway.envelope import TextChunk
from gateway.errors import ContentPolicyError
from plugins.guard.answerparts import AnswerParts
from plugins.guard.delta import REASONING_FIELDS
from plugins.guard.delta import merge as _merge
from plugins.guard.logprobs import flush_logprobs, queued, release_logprobs
from plugins.guard.scanner import Finding, Verdict, record_metrics
from plugins.guard.whole import check_whole_answer

if TYPE_CHECKING:
    from gateway.context import RequestContext
    from plugins.guard.config import GuardConfig

BLOCKED_RESPONSE = "The response was stopped by the gateway's content policy."


def _role_only(choice: Any, delta: Any) -> bool:
    """Whether a stream's chunk (its one ``choice``, ``delta`` its delta) only gives the role,
    with no text or an empty one (a stream's first chunk): nothing in it to check or hold."""
    return (
        type(delta) is dict
        and "role" in delta
        and len(delta) == 1 + ("content" in delta)
        and delta.get("content", "") == ""
        and choice.get("finish_reason") is None
    )


class AnswerGuard(AnswerParts):
    """The response hooks of the guard plugin (set up by its ``__init__``)."""

    config: GuardConfig
    _output_enabled: bool

    def _act(self, ctx: RequestContext, findings: list[Finding]) -> None:
        if not findings:
            return
        state = ctx.scratch_for(self.name)
        state.setdefault("output", []).extend(findings)
        v = Verdict(findings)
        record_metrics(v, self.shadow)
        if v.blocked and not self.shadow:
            self._log_output(ctx)
            raise ContentPolicyError(BLOCKED_RESPONSE)

    def _log_output(self, ctx: RequestContext) -> None:
        state = ctx.scratch.get(self.name)  # (no dict made for it: a clean answer has none)
        findings = state.get("output") if state is not None else None
        if findings:
            entry = ctx.log.setdefault("guard", {"mode": self.config.mode})
            entry["output"] = Verdict(findings).as_dict()

    async def on_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        return await self.on_chunks(ctx, [chunk])

    async def on_chunks(self, ctx: RequestContext, chunks: list[Any]) -> list[Any]:
        """One relay block. A chunk that only adds text to one choice (the bulk of a stream) is
        not scanned on its own: the text of a run of them is fed to the output guard once per
        choice, and what it releases goes on as one chunk per choice (the run's last chunk of
        that choice, rewritten) where the run ends. Any other chunk (role, finish_reason, tool
        calls, logprobs, several choices) ends the run and is handled alone. Each choice's text
        is the same as event by event: the guard holds back text on the same rules (only the
        points where it is cut differ, and none falls inside a secret or the canary). A
        ``TextChunk`` (a run the relay already joined) is such a text-only chunk."""
        if not chunks or not self._output_enabled:
            return chunks
        state = ctx.scratch_for(self.name)
        held: dict[Any, str] | None = state.get("held")
        if held is None:
            held = state["held"] = {}
            state["first"] = chunks[0]  # on_stream_end's template, if it needs one
        shadow = self.shadow
        if len(chunks) == 1 and type(one := chunks[0]) is TextChunk:
            # One text event per read (a model generating tokens): no run to collect.
            early = self._thought_ends(ctx, held, one.index)
            go = self._feed_run(ctx, held, one.index, one.text, one)
            if early is None:
                return chunks if go else []
            return [early, one] if go else [early]
        out: list[Any] = []
        texts: dict[Any, list[str]] = {}  # choice index -> text of the current run
        last: dict[Any, Any] = {}  # choice index -> the run's last chunk
        for chunk in chunks:
            if type(chunk) is TextChunk:
                idx, text = chunk.index, chunk.text
            else:
                choices = chunk.get("choices")
                # (the text-only test of gateway.envelope, inline: it runs for every chunk)
                choice: Any = choices[0] if type(choices) is list and len(choices) == 1 else None
                delta = choice.get("delta") if type(choice) is dict else None
                if not (
                    type(delta) is dict
                    and len(delta) == 1
                    and type(content := delta.get("content")) is str
                    and choice.get("finish_reason") is None
                    and not choice.get("logprobs")
                ):
                    if texts:
                        self._release(ctx, held, texts, last, out)
                        texts, last = {}, {}
                    if _role_only(choice, delta):
                        out.append(chunk)  # (what _chunk keeps, unchanged: no text to check)
                        continue
                    if held and type(choices) is list:
                        self._answers_begin(ctx, held, choices, out)
                    if self._chunk(ctx, held, chunk):
                        out.append(chunk)
                    continue
                idx, text = choice.get("index", 0), content
            parts = texts.get(idx)
            if parts is None:
                if (early := self._thought_ends(ctx, held, idx)) is not None:
                    out.append(early)
                texts[idx] = [text]
            else:
                parts.append(text)
            last[idx] = chunk
            if shadow:  # shadow changes nothing: every chunk goes on as it came
                out.append(chunk)
        if texts:
            self._release(ctx, held, texts, last, out)
        return out

    def _thought_ends(self, ctx: RequestContext, held: dict[Any, str], idx: Any) -> Any:
        """A choice's answer begins: what is still held of its reasoning goes out first, as a
        chunk of its own (None if nothing is). Else the reasoning's last words, held in case
        they begin a secret, went out after the answer's first ones, at ``finish_reason``."""
        if len(held) == (idx in held):
            return None  # (only the answer's own text held: the usual case)
        delta: dict[str, Any] = {}
        for field in REASONING_FIELDS:
            if held.get((idx, field)):
                released, _ = self._flush(ctx, held, (idx, field))
                if released:
                    delta[field] = released
        if not delta or self.shadow:
            return None
        chunk = self._template(ctx.scratch_for(self.name).get("first"))
        chunk["choices"] = [{"index": idx, "delta": delta, "finish_reason": None}]
        return chunk

    def _answers_begin(
        self, ctx: RequestContext, held: dict[Any, str], choices: list[Any], out: list[Any]
    ) -> None:
        """:meth:`_thought_ends` for each choice of a chunk that begins its answer (text, a
        refusal or tool calls) and adds no reasoning of its own."""
        for choice in choices:
            delta = choice.get("delta") if type(choice) is dict else None
            if (
                type(delta) is dict
                and (delta.get("content") or delta.get("refusal") or delta.get("tool_calls"))
                and not any(delta.get(f) for f in REASONING_FIELDS)
                and (early := self._thought_ends(ctx, held, choice.get("index", 0))) is not None
            ):
                out.append(early)

    def _release(
        self,
        ctx: RequestContext,
        held: dict[Any, str],
        texts: dict[Any, list[str]],
        last: dict[Any, Any],
        out: list[Any],
    ) -> None:
        """Feed a run's text per choice; what is released goes out in the run's last chunk."""
        for idx, parts in texts.items():
            text = parts[0] if len(parts) == 1 else "".join(parts)
            if self._feed_run(ctx, held, idx, text, last[idx]) and not self.shadow:
                out.append(last[idx])

    def _feed_run(
        self, ctx: RequestContext, held: dict[Any, str], idx: Any, text: str, chunk: Any
    ) -> bool:
        """Feed one choice's run of text; True if ``chunk`` (the run's last) should go on:
        rewritten to carry what is released (shadow mode changes nothing and releases all)."""
        released, held[idx], findings = self.output.feed(held.get(idx, ""), text, False)
        if findings:
            self._act(ctx, findings)
        if self.shadow:
            return True
        if not released:
            return False
        if type(chunk) is TextChunk:
            chunk.text = released
        else:
            chunk["choices"][0]["delta"]["content"] = released
        return True

    def _chunk(self, ctx: RequestContext, held: dict[Any, str], chunk: dict[str, Any]) -> bool:
        """Any other chunk, alone: its text, refusal and call arguments are fed (flushing at
        ``finish_reason``) and replaced by what is released; True if the chunk should go on."""
        keep = False
        shadow = self.shadow
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                keep = True
                continue
            idx = choice.get("index", 0)
            content = delta.get("content")
            final = choice.get("finish_reason") is not None
            logprobs = choice.get("logprobs")
            if isinstance(content, str) or (final and held.get(idx)):
                released = ""
                if content or final:  # ("" adds nothing: the role chunk)
                    before = len(held.get(idx, ""))
                    released, held[idx], findings = self.output.feed(
                        held.get(idx, ""), content or "", final
                    )
                    if findings:
                        self._act(ctx, findings)
                    if not shadow and (
                        isinstance(logprobs, dict) or queued(ctx.scratch_for(self.name), idx)
                    ):
                        # (A chunk without logprobs of its own, the finish chunk say, still
                        # releases text that queued entries spell.)
                        if not isinstance(logprobs, dict):
                            logprobs = choice["logprobs"] = {"content": None, "refusal": None}
                        consumed = before + len(content or "") - len(held[idx])
                        release_logprobs(
                            ctx.scratch_for(self.name),
                            idx,
                            "content",
                            logprobs,
                            consumed,
                            bool(findings),
                            self.alternatives,
                        )
                if not shadow:
                    if content is not None or released:
                        delta["content"] = released
                if released:
                    keep = True
            if len(delta) > ("content" in delta) + ("role" in delta):
                # (Only text and the role: the usual chunk, with none of the other parts.)
                self._parts(ctx, held, idx, delta, logprobs)
            if final:
                self._flush_choice(ctx, held, idx, delta, choice)
            # (keys other than "content": role, tool calls ...)
            if final or shadow or len(delta) > ("content" in delta) or logprobs:
                keep = True
        return keep

    def _flush_choice(
        self, ctx: RequestContext, held: dict[Any, str], idx: Any, delta: dict[str, Any],
        choice: dict[str, Any],
    ) -> None:  # fmt: skip
        """At a choice's ``finish_reason``: what is still held of its refusal and calls goes
        out in that chunk's delta (its text was flushed by the feed), with the logprobs."""
        found: set[Any] = set()  # parts whose flushed text held a finding
        if len(held) != (idx in held):  # (else nothing but the choice's text, already flushed)
            for key in [k for k, v in held.items() if v and type(k) is tuple and k[0] == idx]:
                released, hit = self._flush(ctx, held, key)
                if hit:
                    found.add(key[1])
                if released and not self.shadow:
                    _merge(delta, key[1], released)
        state = ctx.scratch_for(self.name)
        if not self.shadow and state.get("logprobs"):  # (entries queued: the rare case)
            flush_logprobs(state, idx, choice, found, self.alternatives)

    def _flush(self, ctx: RequestContext, held: dict[Any, str], key: Any) -> tuple[str, bool]:
        """Release everything held under ``key`` (a choice's text, refusal, reasoning or call
        arguments); and whether it held a finding."""
        released, _, findings = self.output.feed(held[key], "", final=True)
        held[key] = ""
        self._act(ctx, findings)
        return released, bool(findings)

    @staticmethod
    def _template(first: Any) -> dict[str, Any]:
        """The top-level fields of a chunk that releases held text at the end of a stream,
        taken from the stream's first chunk."""
        if type(first) is TextChunk:
            first = first.as_dict()
        if not isinstance(first, dict):
            return {}
        return {k: first[k] for k in ("id", "object", "created", "model") if k in first}

    async def on_stream_end(self, ctx: RequestContext) -> list[dict[str, Any]]:
        state = ctx.scratch_for(self.name)
        held: dict[Any, str] | None = state.get("held")
        if not held or not any(held.values()):
            return []  # (the usual end: finish_reason released it all)
        out = []

        # Choices' text first, then refusals and calls' arguments ((choice, part) keys).
        def order(item: tuple[Any, str]) -> tuple[bool, str, str]:
            key = item[0]
            return (True, str(key[0]), str(key[1])) if type(key) is tuple else (False, str(key), "")

        for key, text in sorted(held.items(), key=order):
            if not text:
                continue
            released, _ = self._flush(ctx, held, key)
            delta: dict[str, Any] = {}
            if type(key) is tuple:
                _merge(delta, key[1], released)
                idx = key[0]
            else:
                delta, idx = {"content": released}, key
            if self.shadow:
                continue
            chunk = self._template(state.get("first"))
            chunk["choices"] = [{"index": idx, "delta": delta, "finish_reason": None}]
            out.append(chunk)
        return out

    async def on_response(self, ctx: RequestContext) -> None:
        # Streams were handled block by block; this only logs. Non-streamed answers are checked
        # here, before the body is sent.
        if ctx.response is not None and ctx.endpoint == "chat" and self._output_enabled:
            check_whole_answer(
                ctx.response, self.output, self.alternatives, self.shadow,
                lambda found: self._act(ctx, found),
            )  # fmt: skip
        self._log_output(ctx)
