"""RAG retrieval benchmark: recall@5 with and without re-ranking, and retrieval latency.

    python bench/rag_eval.py              # 10,000 chunks (the first run embeds filler: minutes)
    python bench/rag_eval.py --chunks 2000 --repeat 3

The labelled corpus is ``tests/data/rag``: ``docs/`` (27 handbook documents in Markdown, HTML
and text) and ``questions.jsonl`` (paraphrased questions, each with the source document and a
phrase of the chunk that answers it). A retrieved chunk answers a question when it comes from
that source and contains that phrase, so the labels survive changes to the chunking.

The collection is padded with synthetic filler chunks (same tenant, handbook-like vocabulary, so
they compete with the real ones) up to ``--chunks``. The store lives in ``--cache`` and
ingestion is idempotent, so only the first run pays for embedding (a cache from before the
per-tenant layout is migrated, vectors and all).

Reported per re-ranking method: recall@k (the answering chunk is among the first k), recall@1
and MRR@k (how high it ranks: re-ranking changes order inside the top k, which recall@k alone
does not show). Latency is the plugin's own retrieval path (query embedding on its thread,
Chroma query on the store threads, re-ranking), measured per question after a warm-up with the
query cache off; ``cached_p50_ms`` is the same path for a question asked before (cache on).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from plugins.rag.config import RagConfig  # noqa: E402
from plugins.rag.embed import Embedder  # noqa: E402
from plugins.rag.ingest import Ingestor, embedding_text  # noqa: E402
from plugins.rag.plugin import RagPlugin  # noqa: E402
from plugins.rag.store import VectorStore  # noqa: E402

DATA = ROOT / "tests" / "data" / "rag"
TENANT = "bench"
COLLECTION = "bench-handbook"

_OPENERS = [
    "Weekly sync notes of the {team} team.",
    "Incident ticket {ticket} was filed by {team}.",
    "Customer call summary for account {num}.",
    "Recipe of the month from the {team} kitchen club.",
    "Quarterly report excerpt, {team} division.",
    "Changelog entry for build {num}.",
    "Office facilities update for the {city} site.",
    "Hiring pipeline snapshot for {team}.",
    "Marketing campaign retrospective, wave {num}.",
    "Architecture decision record {num}.",
]
_BODIES = [
    "The {topic} item {verb}; follow-up on {other} by {day} {month}.",
    "Estimated cost {cost} EUR with {n} people involved and ticket {ticket}.",
    "Latency of the {other} service rose to {num} ms after the {topic} change.",
    "Mix {n} cups of flour with {num} grams of butter and bake for {day} minutes.",
    "Revenue in {city} grew {n}% while churn on the {topic} plan stayed flat.",
    "The {city} lobby gets new chairs; the {topic} room is closed until {day} {month}.",
    "Candidates for the {other} role: {n} screened, {day} interviewed, one offer.",
    "Click-through on the {topic} banner was {n}.{day}% against a goal of {num} visits.",
    "We chose {other} over {topic} because it halves operational load.",
    "Deprecated the {topic} flag; {other} now defaults to on for {n} regions.",
    "Weather in {city} delayed the {topic} shipment by {n} days.",
    "The team discussed {topic}, {other} and the {month} offsite in {city}.",
]
_CITIES = ["Oslo", "Porto", "Austin", "Kyoto", "Nairobi", "Lyon", "Denver", "Gdansk"]
_MONTHS = ["March", "June", "September", "November"]
_TOPICS = [
    "vacation",
    "expense",
    "travel",
    "laptop",
    "security",
    "pension",
    "release",
    "on-call",
    "budget",
    "office",
    "meeting",
    "support",
    "pricing",
    "backup",
    "onboarding",
    "review",
]
_VERBS = [
    "was discussed",
    "was postponed",
    "needs an owner",
    "was approved",
    "is blocked",
    "was escalated",
    "got new numbers",
    "will be revisited",
]
_TEAMS = ["platform", "finance", "people ops", "sales", "design", "data", "mobile", "infra"]


def filler(i: int) -> str:
    """Deterministic workplace-note text of mixed kinds that shares the handbook's vocabulary."""
    rnd = random.Random(i)
    topic, other = rnd.sample(_TOPICS, 2)
    values = {
        "team": rnd.choice(_TEAMS), "topic": topic, "other": other, "verb": rnd.choice(_VERBS),
        "day": rnd.randint(1, 28), "month": rnd.choice(_MONTHS), "city": rnd.choice(_CITIES),
        "cost": rnd.randint(2, 90) * 50, "n": rnd.randint(1, 9), "num": rnd.randint(100, 9999),
        "ticket": f"{rnd.choice('ABCDEFG')}-{rnd.randint(100, 9999)}",
    }  # fmt: skip
    parts = [rnd.choice(_OPENERS), *rnd.sample(_BODIES, rnd.randint(2, 4))]
    return " ".join(p.format(**values) for p in parts)


def build(cache: Path, total: int, cfg: RagConfig) -> tuple[int, float]:
    """Ingest the corpus and pad with filler; returns (chunks in collection, seconds spent)."""
    started = time.perf_counter()
    embedder = Embedder(cfg.embedding_model, batch_size=64)
    store = VectorStore(cfg.store, embedder)
    ingestor = Ingestor(store, embedder, cfg.chunk)
    store.migrate(COLLECTION)  # a cache built before the per-tenant layout: reuse its vectors
    ingestor.ingest_paths([DATA / "docs"], COLLECTION, TENANT, progress=False)
    coll = store.collection(COLLECTION, TENANT, create=True)
    assert coll is not None
    have = coll.count()
    if have < total:
        existing = set(coll.get(where={"kind": "filler"}, include=[])["ids"])
        todo = [i for i in range(total) if f"filler-{i}" not in existing][: total - have]
        from tqdm import tqdm

        for start in tqdm(range(0, len(todo), 512), desc="filler", unit="batch", file=sys.stderr):
            ids = todo[start : start + 512]
            texts = [filler(i) for i in ids]
            vectors = embedder.embed([embedding_text("Meeting notes", (), t) for t in texts])
            coll.add(
                ids=[f"filler-{i}" for i in ids], documents=texts, embeddings=vectors,
                metadatas=[{"tenant": TENANT, "source": f"notes/{i}.md", "title": "Meeting notes",
                            "headings": "", "kind": "filler", "chunk": 0} for i in ids],
            )  # fmt: skip
    count = coll.count()
    store.close()
    return count, time.perf_counter() - started


def answered(hit: Any, label: dict[str, str]) -> bool:
    text = " ".join(hit.text.split())
    return str(hit.metadata.get("source", "")).endswith(label["source"]) and label["answer"] in text


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def evaluate(cfg_raw: dict[str, Any], questions: list[dict[str, str]], k: int,
                   repeat: int, alpha: float) -> dict[str, Any]:  # fmt: skip
    results: dict[str, Any] = {}
    for method in ("none", "hybrid", "mmr"):
        # No query cache: every measured retrieval embeds its question (the cold path).
        raw = {**cfg_raw, "rerank": {"method": method, "alpha": alpha}, "scan": "off",
               "min_score": 0.0, "timeout_s": 30, "query_cache": 0}  # fmt: skip
        plugin = RagPlugin(RagConfig.model_validate(raw))
        await plugin.startup(None)
        spec = {"collection": COLLECTION, "top_k": k, "where": None}
        hits_at_k = hits_at_1 = 0
        rr = 0.0
        for q in questions:
            hits, _ = await plugin._retrieve(q["q"], TENANT, spec)
            ranks = [i for i, h in enumerate(hits[:k], start=1) if answered(h, q)]
            hits_at_k += bool(ranks)
            hits_at_1 += ranks[:1] == [1]
            rr += 1 / ranks[0] if ranks else 0.0
        await plugin._retrieve(questions[0]["q"], TENANT, spec)  # warm-up
        latencies: list[float] = []
        for _ in range(repeat):
            for q in questions:
                t0 = time.perf_counter()
                await plugin._retrieve(q["q"], TENANT, spec)
                latencies.append((time.perf_counter() - t0) * 1000)
        # The same questions again with the query cache on: what a repeated question costs.
        assert plugin.embedder is not None
        plugin.embedder.cache_size = len(questions)
        for q in questions:
            await plugin._retrieve(q["q"], TENANT, spec)
        repeated: list[float] = []
        for q in questions:
            t0 = time.perf_counter()
            await plugin._retrieve(q["q"], TENANT, spec)
            repeated.append((time.perf_counter() - t0) * 1000)
        await plugin.shutdown()
        results[method] = {
            f"recall@{k}": round(hits_at_k / len(questions), 3),
            "recall@1": round(hits_at_1 / len(questions), 3),
            f"mrr@{k}": round(rr / len(questions), 3),
            "p50_ms": round(pct(latencies, 50), 1),
            "p99_ms": round(pct(latencies, 99), 1),
            "samples": len(latencies),
            "cached_p50_ms": round(pct(repeated, 50), 1),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chunks", type=int, default=10_000, help="chunks in the collection")
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "gateway-rag-eval"),
                   help="Chroma directory kept between runs")  # fmt: skip
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--repeat", type=int, default=5, help="latency passes over the questions")
    p.add_argument(
        "--alpha",
        type=float,
        default=RagConfig.model_validate({}).rerank.alpha,
        help="rerank.alpha (vector weight for hybrid, relevance weight for mmr)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (the server uses 1)")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(max(1, args.threads))
    cache = Path(args.cache) / f"n{args.chunks}"
    cfg_raw = {"store": {"path": str(cache)}, "default_collection": COLLECTION}
    questions = [json.loads(line) for line in (DATA / "questions.jsonl").read_text().splitlines()
                 if line.strip()]  # fmt: skip
    count, build_s = build(cache, args.chunks, RagConfig.model_validate(cfg_raw))
    results = asyncio.run(evaluate(cfg_raw, questions, args.k, args.repeat, args.alpha))
    report = {"chunks": count, "questions": len(questions), "build_s": round(build_s, 1),
              "torch_threads": args.threads, "alpha": args.alpha, "methods": results}  # fmt: skip
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
