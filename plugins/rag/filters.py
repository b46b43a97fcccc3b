"""Metadata filters from clients, made safe.

A client filter may narrow what the caller's tenant sees, never widen it. Retrieval searches
only the caller's tenant's collection (``store.physical_name``), so a filter has nothing of
another tenant's to reach; management paths (ingest, list, delete) also AND the tenant
condition on top with ``with_tenant``. Conditions on ``tenant`` itself are dropped (or refused,
per ``tenant_filter``), and only the documented operator set is accepted, with the operand types
Chroma takes (range operators: numbers, not booleans; ``$in``/``$nin``: values of one type;
integers within int64), so a bad operand is the client's 400 rather than a failed retrieval.
"""

from __future__ import annotations

import math
import re
from typing import Any

from gateway.errors import InvalidRequestError

TENANT_KEY = "tenant"
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_VALUE_OPS = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin"})
_LOGIC_OPS = frozenset({"$and", "$or"})
_MAX_DEPTH = 4
_MAX_TERMS = 32
Scalar = str | int | float | bool


class _Dropped(Exception):
    """A tenant condition removed in ``ignore`` mode."""


def _bad(msg: str) -> InvalidRequestError:
    return InvalidRequestError(f"rag.filter: {msg}", param="rag.filter")


_INT64 = (-(2**63), 2**63 - 1)
_RANGE_OPS = frozenset({"$gt", "$gte", "$lt", "$lte"})


def _scalar(v: Any) -> bool:
    return isinstance(v, (str, int, float, bool))


def _kind(v: Any) -> str:
    """The operand's type as Chroma sees it (a bool is not a number there)."""
    return "boolean" if isinstance(v, bool) else "string" if isinstance(v, str) else (
        "integer" if isinstance(v, int) else "float")  # fmt: skip


def _check_number(op: str, v: Any) -> None:
    """What Chroma refuses at query time (a 503 otherwise) refused here as the client's error:
    integers outside int64, and infinite or NaN floats."""
    if isinstance(v, bool):
        return
    if isinstance(v, int) and not _INT64[0] <= v <= _INT64[1]:
        raise _bad(f"{op}: integer {v} is out of range (64-bit signed integers only)")
    if isinstance(v, float) and not math.isfinite(v):
        raise _bad(f"{op}: {v} is not a finite number")


def _condition(key: str, value: Any, reject_tenant: bool, dropped: list[str]) -> dict[str, Any]:
    if not isinstance(key, str) or not _KEY.match(key):
        raise _bad(f"invalid metadata key {key!r}")
    if key.lower() == TENANT_KEY:
        if reject_tenant:
            raise _bad("the tenant is set by the gateway and may not be filtered on")
        dropped.append(key)
        raise _Dropped
    if _scalar(value):
        _check_number(key, value)
        return {key: {"$eq": value}}
    if isinstance(value, dict) and len(value) == 1:
        op, arg = next(iter(value.items()))
        if op not in _VALUE_OPS:
            raise _bad(f"unsupported operator {op!r} (allowed: {', '.join(sorted(_VALUE_OPS))})")
        if op in ("$in", "$nin"):
            if not isinstance(arg, list) or not arg or not all(_scalar(a) for a in arg):
                raise _bad(f"{op} needs a non-empty list of strings or numbers")
            if len(arg) > _MAX_TERMS:
                raise _bad(f"{op} accepts at most {_MAX_TERMS} values")
            kinds = sorted({_kind(a) for a in arg})
            if len(kinds) > 1:
                raise _bad(
                    f"{op} on {key!r}: values must all be of one type (got {', '.join(kinds)})"
                )
            for a in arg:
                _check_number(f"{op} on {key!r}", a)
        elif not _scalar(arg):
            raise _bad(f"{op} needs a string or number")
        elif op in _RANGE_OPS and _kind(arg) not in ("integer", "float"):
            raise _bad(f"{op} on {key!r} needs a number, got {_kind(arg)} {arg!r}")
        else:
            _check_number(f"{op} on {key!r}", arg)
        return {key: {op: arg}}
    raise _bad(f"condition on {key!r} must be a value or {{operator: value}}")


def _clean(node: Any, depth: int, reject_tenant: bool, dropped: list[str]) -> dict[str, Any] | None:
    if depth > _MAX_DEPTH:
        raise _bad("nested too deeply")
    if not isinstance(node, dict):
        raise _bad("must be an object")
    parts: list[dict[str, Any]] = []
    for key, value in node.items():
        if key in _LOGIC_OPS:
            if not isinstance(value, list) or len(value) > _MAX_TERMS:
                raise _bad(f"{key} needs a list of at most {_MAX_TERMS} conditions")
            subs = [s for s in (_clean(v, depth + 1, reject_tenant, dropped) for v in value) if s]
            if not subs:
                continue
            parts.append(subs[0] if len(subs) == 1 else {key: subs})
        elif isinstance(key, str) and key.startswith("$"):
            raise _bad(f"unsupported operator {key!r} (allowed: $and, $or)")
        else:
            try:
                parts.append(_condition(key, value, reject_tenant, dropped))
            except _Dropped:
                continue
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else {"$and": parts}


def sanitize(
    client_filter: Any, *, reject_tenant: bool = False
) -> tuple[dict[str, Any] | None, list[str]]:
    """The client's filter in Chroma's ``where`` syntax (or None), and the tenant keys dropped."""
    if client_filter is None or client_filter == {}:
        return None, []
    dropped: list[str] = []
    return _clean(client_filter, 0, reject_tenant, dropped), dropped


def with_tenant(tenant: str, *filters: dict[str, Any] | None) -> dict[str, Any]:
    """The ``where`` the store gets: the tenant condition ANDed with every other filter."""
    terms: list[dict[str, Any]] = [{TENANT_KEY: {"$eq": tenant}}]
    terms.extend(f for f in filters if f)
    return terms[0] if len(terms) == 1 else {"$and": terms}
