"""Structured logs: JSON lines for the application log and the one-line-per-request log."""

from __future__ import annotations

import logging
import sys
import time
from typing import IO, Any

import orjson

_STD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STD_ATTRS and not key.startswith("_") and key != "color_message":
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


#: Libraries that log every HTTP call at INFO (Chroma's client uses httpx): one line per
#: retrieval would drown the request log. They speak at WARNING unless the level is debug.
_CHATTY = ("httpx", "httpcore", "chromadb")


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    for name in _CHATTY:
        logging.getLogger(name).setLevel("DEBUG" if level == "debug" else "WARNING")
    if any(getattr(h, "_gateway", False) for h in root.handlers):
        root.setLevel(level.upper())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._gateway = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())


def uvicorn_log_config(level: str = "info") -> dict[str, Any]:
    """uvicorn's own messages as JSON lines too (its default config prints plain text)."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    logger = {"handlers": ["default"], "level": level.upper(), "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "gateway.logs.JsonFormatter"}},
        "handlers": {"default": handler},
        "loggers": {"uvicorn": logger, "uvicorn.error": logger, "uvicorn.access": logger,
                    "gateway": logger},
    }  # fmt: skip


class RequestLog:
    """Writes one JSON line per request, buffered, flushed every second and at shutdown."""

    def __init__(self, target: str = "stdout") -> None:
        self._own = target not in ("stdout", "stderr", "none")
        self._enabled = target != "none"
        self._fh: IO[bytes]
        if target == "stdout":
            self._fh = sys.stdout.buffer
        elif target == "stderr":
            self._fh = sys.stderr.buffer
        elif self._own:
            self._fh = open(target, "ab", buffering=64 * 1024)
        self._pending: list[bytes] = []
        self._size = 0
        self._last = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        if not self._enabled:
            return
        line = orjson.dumps(record, default=str, option=orjson.OPT_APPEND_NEWLINE)
        self._pending.append(line)
        self._size += len(line)
        now = time.monotonic()
        if self._size > 32 * 1024 or now - self._last > 1.0:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        self._last = time.monotonic()
        data = b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        try:
            self._fh.write(data)
            self._fh.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.flush()
        if self._own:
            self._fh.close()
