"""Text the output guard releases late (at a choice's ``finish_reason`` or the stream's end),
put back into a delta where the SDK expects each part."""

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
