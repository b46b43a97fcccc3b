"""A streamed choice's ``logprobs`` kept in step with the text the output guard holds back:
each entry's ``token`` is a piece of the text, so it goes out only with the text it spells,
and never where that text held a finding."""

from __future__ import annotations

from typing import Any


def queued(state: dict[str, Any], idx: Any) -> bool:
    """Whether logprobs entries of a choice's text wait for the text they spell (``state``:
    the guard's scratch of the request)."""
    pending = state.get("logprobs")
    return bool(pending and pending.get((idx, "content")))


def release_logprobs(
    scratch: dict[str, Any],
    idx: Any,
    field: str,
    logprobs: dict[str, Any],
    consumed: int,
    found: bool,
) -> None:
    """Set ``logprobs[field]`` to the entries whose text has now been released (``consumed``:
    characters of the upstream's text released so far in this step), none where that text held
    a finding (they would carry the secret out); the rest wait in ``scratch``."""
    entries = logprobs.get(field)
    state = scratch.setdefault("logprobs", {})
    queue: list[Any] = state.setdefault((idx, field), [])
    if type(entries) is list:
        queue.extend(entries)
    elif not queue:
        return
    out: list[Any] = []
    total = state.get((idx, field, "released"), 0) + consumed
    covered = state.get((idx, field, "covered"), 0)
    while queue:
        token = queue[0].get("token") if type(queue[0]) is dict else None
        size = len(token) if type(token) is str else 0
        if covered + size > total:
            break
        covered += size
        out.append(queue.pop(0))
    state[(idx, field, "released")] = total
    state[(idx, field, "covered")] = covered
    logprobs[field] = [] if found else out
