"""Retrieval-augmented generation: ingest documents, retrieve per tenant, inject with sources."""

from __future__ import annotations

from plugins.rag.plugin import RagPlugin

__all__ = ["RagPlugin"]
