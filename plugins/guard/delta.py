"""Where the model's text is in an answer: the texts of a whole answer for the output guard
(:func:`response_texts`), and text it releases late (at a choice's ``finish_reason`` or the
stream's end) put back into a delta where the SDK expects each part (:func:`merge`)."""

from __future__ import annotations

from typing import Any

#: A choice's reasoning, as OpenAI-compatible servers send it (vLLM, DeepSeek, OpenRouter,
#: Groq): the model's text like its answer, and it often quotes the system prompt.
REASONING_FIELDS = ("reasoning_content", "reasoning")


def merge(delta: dict[str, Any], part: Any, released: str) -> None:
    """Put text released for ``part`` of a choice (``"refusal"``, ``"function_call"`` or a
    tool call's index) into ``delta``."""
    if part == "refusal" or part in REASONING_FIELDS:
        delta[part] = (delta.get(part) or "") + released
    elif part == "audio":
        audio = delta.get("audio")
        if type(audio) is not dict:
            audio = delta["audio"] = {}
        audio["transcript"] = (audio.get("transcript") or "") + released
    elif part == "function_call":
        fn = delta.get("function_call")
        if type(fn) is dict:
            fn["arguments"] = (fn.get("arguments") or "") + released
        else:
            delta["function_call"] = {"arguments": released}
    else:
        flushed = {"index": part, "function": {"arguments": released}}
        tool_calls = delta.get("tool_calls")
        if type(tool_calls) is list:
            tool_calls.append(flushed)
        else:
            delta["tool_calls"] = [flushed]


#: The keys of a message that has no reasoning, audio or calls (annotations are read apart).
_PLAIN_MESSAGE = frozenset({"role", "content", "refusal", "annotations"})


def response_texts(
    response: dict[str, Any],
) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
    """(choice, container, key) of each text in a non-streamed chat answer: content, refusal,
    reasoning (``reasoning_content`` / ``reasoning``, as OpenAI-compatible servers send it) and
    the arguments of its tool calls and legacy function call (a secret the model writes
    into a call leaves too)."""
    out = []
    for choice in response.get("choices") or ():
        msg = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(msg, dict):
            parts = msg.get("content")
            # (The usual message: only its content and refusal to read, without a look for
            # each other key; half the cost of reading a short answer.)
            plain = _PLAIN_MESSAGE.issuperset(msg)
            if plain:
                if isinstance(parts, str):
                    out.append((choice, msg, "content"))
                if isinstance(msg.get("refusal"), str):
                    out.append((choice, msg, "refusal"))
            else:
                for key in ("content", "refusal", "reasoning_content", "reasoning"):
                    if isinstance(msg.get(key), str):
                        out.append((choice, msg, key))
            if isinstance(parts, list):  # (content as parts, as some servers answer)
                out.extend(
                    (choice, p, "text")
                    for p in parts
                    if isinstance(p, dict) and isinstance(p.get("text"), str)
                )
            if plain:
                continue
            audio = msg.get("audio")
            if isinstance(audio, dict) and isinstance(audio.get("transcript"), str):
                out.append((choice, audio, "transcript"))
            calls = msg.get("tool_calls")
            fns = [c.get("function") if isinstance(c, dict) else None
                   for c in (calls if isinstance(calls, list) else ())]  # fmt: skip
            for fn in [*fns, msg.get("function_call")]:
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    out.append((choice, fn, "arguments"))
    return out
