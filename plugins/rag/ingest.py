"""Ingestion: files or uploads → chunks → embeddings → the store, idempotently.

Each source (a path, or an upload's name) is identified by ``(tenant, source)``. Its content
hash covers the bytes, how they are read (the document kind and the charset), the extra metadata,
the chunking settings and the embedding model, so re-ingesting an unchanged file adds nothing,
and a changed one (or the same bytes uploaded as another type) replaces all its chunks at once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from plugins.rag.chunking import chunk_sections
from plugins.rag.config import ChunkConfig
from plugins.rag.embed import Embedder
from plugins.rag.loaders import KINDS, UnsupportedDocument, check_charset, kind_for, parse
from plugins.rag.store import RESERVED, VectorStore

log = logging.getLogger("gateway.rag")

_META_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
_TENANT = re.compile(r"^[A-Za-z0-9_.:@-]{1,128}$")


@dataclass(slots=True)
class IngestResult:
    source: str
    #: "added" | "replaced" | "unchanged" | "empty" | "error"
    status: str
    chunks: int = 0
    error: str = ""


def check_tenant(tenant: str) -> str:
    if not _TENANT.match(tenant):
        raise ValueError(f"invalid tenant {tenant!r}")
    return tenant


def check_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in meta.items():
        if not isinstance(key, str) or not _META_KEY.match(key):
            raise ValueError(f"invalid metadata key {key!r}")
        if key in RESERVED:
            raise ValueError(f"metadata key {key!r} is set by the gateway")
        if not isinstance(value, (str, int, float, bool)):
            raise ValueError(f"metadata {key!r}: value must be a string, number or boolean")
        out[key] = value
    return out


def chunk_id(tenant: str, source: str, i: int) -> str:
    digest = hashlib.sha256(f"{tenant}\0{source}".encode()).hexdigest()[:24]
    return f"{digest}-{i}"


def embedding_text(title: str, headings: Iterable[str], text: str) -> str:
    """What the vector sees: the title and heading path give short chunks their topic."""
    head = " > ".join([title, *(h for h in headings if h != title)] if title else headings)
    return f"{head}\n{text}" if head else text


class Ingestor:
    def __init__(self, store: VectorStore, embedder: Embedder, chunk: ChunkConfig) -> None:
        self.store = store
        self.embedder = embedder
        self.chunk = chunk

    def content_hash(
        self, data: bytes, meta: Mapping[str, Any], kind: str = "", charset: str = ""
    ) -> str:
        h = hashlib.sha256(data)
        h.update(orjson.dumps(dict(meta), option=orjson.OPT_SORT_KEYS))
        h.update(f"{self.chunk.tokens}/{self.chunk.overlap}/{self.embedder.model_name}".encode())
        # The same bytes read another way (text/plain then text/html, another charset) are
        # another document.
        h.update(f"\0{kind}\0{charset}".encode())
        return h.hexdigest()

    def ingest_bytes(
        self,
        collection: str,
        tenant: str,
        source: str,
        data: bytes,
        *,
        kind: str = "",
        mtime: float = 0.0,
        meta: Mapping[str, Any] | None = None,
        charset: str = "",
    ) -> IngestResult:
        """``charset``: the text's encoding (a Content-Type's ``charset``); none means UTF-8.
        Bytes that are not valid in it raise ``UnsupportedDocument`` (a ``ValueError``)."""
        meta = check_meta(meta or {})
        check_tenant(tenant)
        kind = kind or kind_for(source)
        charset = "" if kind == "pdf" else check_charset(charset)
        if charset == "utf-8":
            charset = ""  # UTF-8 is the default: declaring it is not another reading
        digest = self.content_hash(data, meta, kind, charset)
        previous = self.store.source_hash(collection, tenant, source)
        if previous == digest:
            return IngestResult(source, "unchanged")
        parsed = parse(data, source, kind, charset)
        chunks = chunk_sections(parsed.sections, self.chunk.tokens, self.chunk.overlap)
        if not chunks:
            if previous is not None:
                self.store.delete(collection, tenant, source)
            return IngestResult(source, "empty")
        vectors = self.embedder.embed(
            [embedding_text(parsed.title, c.headings, c.text) for c in chunks]
        )
        metadatas = [
            {
                **meta,
                "tenant": tenant,
                "source": source,
                "title": parsed.title,
                "headings": " > ".join(c.headings),
                "mtime": float(mtime),
                "content_hash": digest,
                "chunk": i,
                "n_chunks": len(chunks),
                "kind": kind,
            }
            for i, c in enumerate(chunks)
        ]
        self.store.replace_source(
            collection,
            tenant,
            source,
            [chunk_id(tenant, source, i) for i in range(len(chunks))],
            [c.text for c in chunks],
            vectors,
            metadatas,
        )
        status = "added" if previous is None else "replaced"
        log.info(
            "rag_ingested",
            extra={"collection": collection, "tenant": tenant, "source": source,
                   "status": status, "chunks": len(chunks)},
        )  # fmt: skip
        return IngestResult(source, status, len(chunks))

    def ingest_file(
        self, path: Path, collection: str, tenant: str, meta: Mapping[str, Any] | None = None
    ) -> IngestResult:
        source = source_name(path)
        try:
            if not path.exists():
                return IngestResult(source, "error", error=f"{path}: no such file or directory")
            kind = kind_for(path.name)
            data = path.read_bytes()
            mtime = path.stat().st_mtime
            return self.ingest_bytes(
                collection, tenant, source, data, kind=kind, mtime=mtime, meta=meta
            )
        except (OSError, UnsupportedDocument, ValueError) as e:
            return IngestResult(source, "error", error=str(e))

    def ingest_paths(
        self,
        paths: Iterable[str | os.PathLike[str]],
        collection: str,
        tenant: str,
        meta: Mapping[str, Any] | None = None,
        progress: bool = True,
    ) -> list[IngestResult]:
        from tqdm import tqdm

        files = expand(paths)
        results: list[IngestResult] = []
        bar = tqdm(files, unit="file", disable=not progress, file=sys.stderr, desc="ingest")
        for path in bar:
            result = self.ingest_file(path, collection, tenant, meta)
            results.append(result)
            bar.set_postfix_str(f"{result.status} {path.name}", refresh=False)
        return results


def source_name(path: Path) -> str:
    """The source's identity: relative to the working directory when inside it."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def expand(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files named, plus the supported files under directories named (sorted, recursive)."""
    out: list[Path] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(
                sorted(
                    f for f in path.rglob("*")
                    if f.is_file() and f.suffix.lower() in KINDS
                    and not any(part.startswith(".") for part in f.relative_to(path).parts)
                )
            )  # fmt: skip
        else:
            out.append(path)
    return out
