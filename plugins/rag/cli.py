"""``gateway rag``: ingest, list and delete documents, with the rag plugin's config block.

    gateway rag ingest docs/ --collection handbook --tenant acme --meta team=sales
    gateway rag list [--collection handbook] [--tenant acme] [--json]
    gateway rag delete --collection handbook --tenant acme [--source docs/old.md]
    gateway rag delete --collection handbook --all
    gateway rag migrate --collection handbook   # old all-tenants layout -> one per tenant

With the embedded store, stop the gateway (or use the admin upload route) while ingesting:
two processes must not write one Chroma directory. With a Chroma server (``store.url``) the
CLI and every replica share it safely.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter
from datetime import UTC, datetime
from typing import TextIO

import orjson

from gateway.config import ConfigError, format_validation_error, load_settings
from plugins.rag.config import RagConfig, check_collection


class CliError(Exception):
    pass


def load_config(path: str) -> RagConfig:
    from pydantic import ValidationError

    settings = load_settings(path)
    for i, entry in enumerate(settings.pipeline):
        if entry.name == "rag":
            try:
                return RagConfig.model_validate(entry.config)
            except ValidationError as e:
                raise ConfigError(
                    format_validation_error(settings.source, e, ("pipeline", i, "config"))
                ) from None
    raise ConfigError(f"{path}: no 'rag' plugin in the pipeline")


def _meta(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--meta {pair!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def _collection(value: str) -> str:
    try:
        return check_collection(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help="config.yaml to read")
    p = argparse.ArgumentParser(prog="gateway rag", description="manage RAG documents",
                                parents=[common])  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)

    ing = sub.add_parser("ingest", parents=[common], help="ingest files or directories")
    ing.add_argument("paths", nargs="+", metavar="PATH")
    ing.add_argument("--collection", type=_collection, help="default: default_collection")
    ing.add_argument("--tenant", default="default")
    ing.add_argument(
        "--meta",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra metadata on every chunk (repeatable), filterable per request",
    )
    ing.add_argument("--no-progress", action="store_true")

    ls = sub.add_parser(
        "list", parents=[common], help="list collections, or a collection's documents"
    )
    ls.add_argument("--collection", type=_collection)
    ls.add_argument("--tenant")
    ls.add_argument("--json", action="store_true")

    rm = sub.add_parser("delete", parents=[common], help="delete documents or a collection")
    rm.add_argument("--collection", type=_collection, required=True)
    rm.add_argument("--tenant")
    rm.add_argument("--source", help="one document (as shown by list)")
    rm.add_argument("--all", action="store_true", help="the whole collection, every tenant")

    mig = sub.add_parser(
        "migrate", parents=[common],
        help="split a collection stored in the old all-tenants layout into one per tenant",
    )  # fmt: skip
    mig.add_argument("--collection", type=_collection, required=True)
    return p


def _build(cfg: RagConfig) -> tuple[object, object]:
    from plugins.rag.embed import Embedder
    from plugins.rag.ingest import Ingestor
    from plugins.rag.store import VectorStore

    embedder = Embedder(cfg.embedding_model, cfg.embedding_batch)
    store = VectorStore(cfg.store, embedder, timeout_s=max(cfg.timeout_s, 30.0))
    return store, Ingestor(store, embedder, cfg.chunk)


def _ingest(args: argparse.Namespace, cfg: RagConfig, out: TextIO, err: TextIO) -> int:
    from plugins.rag.ingest import check_meta, check_tenant

    try:
        meta = check_meta(_meta(args.meta))
        check_tenant(args.tenant)
    except ValueError as e:
        raise CliError(str(e)) from None
    collection = args.collection or cfg.default_collection
    _, ingestor = _build(cfg)
    results = ingestor.ingest_paths(  # type: ignore[attr-defined]
        args.paths, collection, args.tenant, meta, progress=not args.no_progress
    )
    counts = Counter(r.status for r in results)
    for r in results:
        if r.status == "error":
            err.write(f"error: {r.source}: {r.error}\n")
    out.write(
        f"{collection} (tenant {args.tenant}): {counts['added']} added, "
        f"{counts['replaced']} replaced, {counts['unchanged']} unchanged, "
        f"{counts['empty']} empty, {counts['error']} failed; "
        f"{sum(r.chunks for r in results)} chunks written\n"
    )
    return 1 if counts["error"] else 0


def _list(args: argparse.Namespace, cfg: RagConfig, out: TextIO) -> int:
    store, _ = _build(cfg)
    if not args.collection:
        rows = store.list_collections()  # type: ignore[attr-defined]
        if args.json:
            out.write(orjson.dumps([dataclasses.asdict(r) for r in rows]).decode())
            out.write("\n")
            return 0
        for r in rows:
            if r.legacy:
                out.write(f"{r.collection}\t{r.chunks} chunks\told layout, not searched: "
                          f"gateway rag migrate --collection {r.collection}\n")  # fmt: skip
            else:
                out.write(f"{r.collection}\t{r.chunks} chunks\t{r.tenants} tenants\n")
        return 0
    sources = store.list_sources(args.collection, args.tenant)  # type: ignore[attr-defined]
    if args.json:
        out.write(orjson.dumps([dataclasses.asdict(s) for s in sources]).decode())
        out.write("\n")
        return 0
    for s in sources:
        when = datetime.fromtimestamp(s.mtime, UTC).strftime("%Y-%m-%d %H:%M") if s.mtime else "-"
        extra = " ".join(f"{k}={v}" for k, v in sorted(s.meta.items()))
        out.write(f"{s.tenant}\t{s.source}\t{s.chunks} chunks\t{when}\t{s.title}\t{extra}\n")
    return 0


def _delete(args: argparse.Namespace, cfg: RagConfig, out: TextIO) -> int:
    if args.all and (args.tenant or args.source):
        raise CliError(
            "--all deletes the whole collection: do not combine it with --tenant/--source"
        )
    if not args.all and not args.tenant:
        raise CliError("give --tenant (with --source for one document), or --all")
    store, _ = _build(cfg)
    if args.all:
        n = store.delete(args.collection)  # type: ignore[attr-defined]
    else:
        n = store.delete(args.collection, args.tenant, args.source)  # type: ignore[attr-defined]
    out.write(f"deleted {n} chunks\n")
    return 0


def _migrate(args: argparse.Namespace, cfg: RagConfig, out: TextIO, err: TextIO) -> int:
    store, _ = _build(cfg)
    moved, orphans = store.migrate(args.collection)  # type: ignore[attr-defined]
    if not moved and not orphans:
        out.write(f"{args.collection}: nothing in the old layout\n")
        return 0
    out.write(f"{args.collection}: moved {sum(moved.values())} chunks into "
              f"{len(moved)} tenant collections\n")  # fmt: skip
    if orphans:
        err.write(f"error: {orphans} chunks have no tenant; the old collection was kept\n")
        return 1
    return 0


def rag_main(argv: list[str] | None = None, out: TextIO | None = None,
             err: TextIO | None = None) -> int:  # fmt: skip
    out = out or sys.stdout
    err = err or sys.stderr
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(getattr(args, "config", "config.yaml"))
        if args.command == "ingest":
            return _ingest(args, cfg, out, err)
        if args.command == "list":
            return _list(args, cfg, out)
        if args.command == "migrate":
            return _migrate(args, cfg, out, err)
        return _delete(args, cfg, out)
    except (ConfigError, CliError) as e:
        err.write(f"error: {e}\n")
        return 2
    except Exception as e:
        from plugins.rag.store import StoreError

        if isinstance(e, StoreError):
            err.write(f"error: {e}\n")
            return 1
        raise
