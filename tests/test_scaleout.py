"""Scale-out: three real ``gateway serve`` processes sharing one Redis (limits, cache), one
Chroma server (RAG) and one PostgreSQL database (usage ledger), driven concurrently.

Each test states its expectation and prints what it measured (``pytest -s`` shows it).
The 2-process exact-limit test lives in tests/plugins/test_limit_e2e.py; this one uses three
replicas and adds the shared ledger, RAG, response cache, a Chroma server that stops answering
and a replica killed with SIGKILL under load.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from gateway.ledger.postgres import PostgresBackend
from tests.plugins.test_auth_support import USER_KEY
from tests.test_usage import BOB_KEY, auth_config

from .helpers import (
    ROOT,
    FakeUpstream,
    GatewayProcess,
    build_config,
    chroma_server,
    demo_model,
    fake_upstream,
    spawn_gateway,
)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13")
DATABASE_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
LIMIT = 15
#: One retrieval's budget: a Chroma server that stops answering costs a request at most this.
RAG_TIMEOUT_S = 1.0
DOCS = {
    "acme": "# Acme travel policy\n\nAcme staff book economy class for flights under six "
            "hours and may expense 45 EUR per day for meals.\n",
    "globex": "# Globex travel policy\n\nGlobex staff always fly business class. Internal "
              "approval code PAPAYA-4410.\n",
}  # fmt: skip
HEADERS = {USER_KEY: {"authorization": f"Bearer {USER_KEY}"},
           BOB_KEY: {"authorization": f"Bearer {BOB_KEY}"}}  # fmt: skip


def replica_config(upstream: str, prefix: str, chroma: str) -> dict[str, Any]:
    # Only "demo" is limited; "bulk" (the SIGKILL load) and "kb-assistant" (RAG) are not.
    rule = {"scope": "global", "model": "demo", "rpm": LIMIT}
    auth = auth_config()
    every_model = {"models": ["*"], "endpoints": ["chat"]}
    models = [demo_model(upstream), demo_model(upstream, "bulk"),
              demo_model(upstream, "kb-assistant")]  # fmt: skip
    return build_config(upstream, models=models, pipeline=[
        {"name": "auth", "config": {**auth, "roles": {**auth["roles"], "user": every_model}}},
        {"name": "limit", "config": {"store": REDIS_URL, "key_prefix": f"{prefix}-limit",
                                     "rules": [rule]}},
        {"name": "cache", "config": {"store": REDIS_URL, "key_prefix": f"{prefix}-cache"}},
        {"name": "rag", "config": {"store": {"url": chroma}, "default_collection": "policies",
                                   "models": {"kb-assistant": {"collection": "policies"}},
                                   "min_score": 0.0, "on_error": "skip",
                                   "timeout_s": RAG_TIMEOUT_S}},
    ], ledger={"url": DATABASE_URL, "table_prefix": f"{prefix.replace('-', '_')}_",
               "flush_interval_s": 0.1})  # fmt: skip


@dataclass
class Cluster:
    fake: FakeUpstream
    procs: list[GatewayProcess]
    prefix: str
    chroma: subprocess.Popen[bytes]
    chroma_url: str
    ledger: PostgresBackend


def ingest(config: dict[str, Any], tmp: Path) -> None:
    """``gateway rag ingest`` (the CLI) into the shared Chroma server, one tenant per file."""
    cfg = tmp / "ingest.yaml"
    cfg.write_text(yaml.safe_dump(config))
    for tenant, text in DOCS.items():
        doc = tmp / f"{tenant}-travel.md"
        doc.write_text(text)
        out = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "rag", "ingest", str(doc), "--config", str(cfg),
             "--collection", "policies", "--tenant", tenant, "--no-progress"],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    prefix = f"gwscale{uuid.uuid4().hex[:10]}"
    tmp = tmp_path_factory.mktemp("scaleout")
    ledger = PostgresBackend(DATABASE_URL, f"{prefix}_")
    with fake_upstream(record=10_000) as fake, chroma_server(tmp / "chroma") as (url, chroma):
        config = replica_config(fake.url, prefix, url)
        ingest(config, tmp)
        # Started in parallel; each loads the embedding model (slow on 2 shared cores).
        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(spawn_gateway, config, ready_timeout=240) for _ in range(3)]
        procs = [f.result() for f in futures if f.exception() is None]
        if len(procs) < 3:
            for p in procs:
                p.stop()
            raise next(e for f in futures if (e := f.exception()) is not None)
        try:
            yield Cluster(fake, procs, prefix, chroma, url, ledger)
        finally:
            for p in procs:
                p.stop()
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}-*"))
    if keys:
        client.delete(*keys)
    client.close()
    ledger.drop()


def _body(model: str = "demo", **extra: Any) -> dict[str, Any]:
    msgs = [{"role": "user", "content": f"hello {uuid.uuid4().hex[:6]}"}]
    return {"model": model, "messages": msgs, "max_tokens": 5, **extra}


def _clients(c: Cluster, key: str = USER_KEY) -> list[httpx.Client]:
    return [httpx.Client(base_url=p.url, timeout=20, headers=HEADERS[key]) for p in c.procs]


@pytest.mark.slow
def test_three_replicas_admit_exactly_the_global_rpm(cluster: Cluster) -> None:
    """Expectation: 4x the limit sent concurrently across three replicas -> exactly LIMIT 200s,
    the rest 429, and the upstream sees exactly LIMIT requests."""
    fake = cluster.fake
    fake.clear()
    clients = _clients(cluster)
    started = time.perf_counter()
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(
            lambda i: clients[i % 3].post("/v1/chat/completions", json=_body()), range(4 * LIMIT)
        ))  # fmt: skip
    elapsed = time.perf_counter() - started
    for c in clients:
        c.close()
    statuses = [r.status_code for r in responses]
    per_replica = [sum(1 for i, s in enumerate(statuses) if s == 200 and i % 3 == k)
                   for k in range(3)]  # fmt: skip
    print(f"\n[scaleout] 3 replicas, rpm={LIMIT}: {statuses.count(200)} admitted "
          f"(per replica {per_replica}), {statuses.count(429)} refused, "
          f"{len(fake.requests())} upstream, {elapsed:.2f}s")  # fmt: skip
    assert statuses.count(200) == LIMIT
    assert statuses.count(429) == 3 * LIMIT
    assert len(fake.requests()) == LIMIT


def _ledger_rows(c: Cluster, run: str) -> list[tuple[Any, ...]]:
    sql = (f"SELECT request_id, status, stream, prompt_tokens, completion_tokens, user_id "
           f"FROM {c.prefix}_usage WHERE request_id LIKE %s")  # fmt: skip
    return c.ledger.query(sql, [f"{run}-%"])


@pytest.mark.slow
def test_ledger_rows_equal_requests_made_across_replicas(cluster: Cluster) -> None:
    """Expectation: 120 concurrent requests (plain and streamed, two users) spread over three
    replicas writing to one PostgreSQL ledger -> exactly one row per request id the clients got
    back: none lost, none doubled, and each row's status and tokens match what the client saw."""
    run = f"led{uuid.uuid4().hex[:8]}"
    clients = _clients(cluster) + _clients(cluster, BOB_KEY)

    def one(i: int) -> tuple[str, int, bool, int]:
        rid = f"{run}-{i:03d}"
        stream = i % 2 == 1
        body = (
            _body("bulk", stream=stream, stream_options={"include_usage": True})
            if stream
            else _body("bulk")
        )
        r = clients[i % 6].post("/v1/chat/completions", json=body,
                                headers={"x-request-id": rid})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.headers["x-request-id"] == rid
        if stream:
            usage = [ln for ln in r.text.splitlines() if '"usage":{' in ln][-1]
            completion = int(usage.split('"completion_tokens":')[1].split(",")[0].rstrip("}"))
        else:
            completion = r.json()["usage"]["completion_tokens"]
        return rid, r.status_code, stream, completion

    started = time.perf_counter()
    with ThreadPoolExecutor(18) as pool:
        sent = list(pool.map(one, range(120)))
    elapsed = time.perf_counter() - started
    for c in clients:
        c.close()
    deadline = time.monotonic() + 15
    while len(rows := _ledger_rows(cluster, run)) < len(sent) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)  # anything doubled would show up now
    rows = _ledger_rows(cluster, run)
    ids = Counter(r[0] for r in rows)
    print(f"\n[scaleout] ledger: {len(sent)} requests over 3 replicas in {elapsed:.2f}s -> "
          f"{len(rows)} rows, {len(ids)} distinct ids, "
          f"{sum(1 for n in ids.values() if n > 1)} doubled")  # fmt: skip
    assert sorted(ids) == sorted(rid for rid, *_ in sent)
    assert set(ids.values()) == {1}
    by_id = {r[0]: r for r in rows}
    for rid, status, stream, completion in sent:
        row = by_id[rid]
        assert (row[1], bool(row[2]), row[4]) == (status, stream, completion)
        assert row[3] > 0
    users = Counter(r[5] for r in rows)
    assert users == {"user1-user": 60, "bob": 60}


def _ask(c: httpx.Client) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    r = c.post(
        "/v1/chat/completions",
        json={"model": "kb-assistant", "messages": [{"role": "user", "content": "How do I fly?"}]},
    )
    return r, time.perf_counter() - started


def _system(upstream_body: dict[str, Any]) -> str:
    return "\n".join(m["content"] for m in upstream_body["messages"] if m["role"] == "system")


@pytest.mark.slow
def test_rag_answers_are_the_same_from_every_replica(cluster: Cluster) -> None:
    """Expectation: the same question asked of each replica retrieves the same sources from the
    shared Chroma server and sends the upstream the same context: the caller's tenant's
    document, never the other tenant's."""
    fake = cluster.fake
    for key, mine, other in ((USER_KEY, "economy class", "PAPAYA"),
                             (BOB_KEY, "PAPAYA-4410", "economy")):  # fmt: skip
        fake.clear()
        clients = _clients(cluster, key)
        answers = [_ask(c)[0] for c in clients]
        for c in clients:
            c.close()
        assert [r.status_code for r in answers] == [200, 200, 200]
        sources = [r.headers["x-gateway-rag-sources"] for r in answers]
        contexts = [_system(req["body"]) for req in fake.requests()]
        print(f"\n[scaleout] RAG for {HEADERS[key]['authorization'][7:20]}...: sources "
              f"{sources}, {len(set(contexts))} distinct context(s) upstream")  # fmt: skip
        assert len(set(sources)) == 1 and sources[0]
        assert len(contexts) == 3 and len(set(contexts)) == 1
        assert mine in contexts[0] and other not in contexts[0]


@pytest.mark.slow
def test_chroma_server_that_stops_answering_skips_retrieval_without_hanging(
    cluster: Cluster,
) -> None:
    """Expectation (``on_error: skip``, ``timeout_s: 1``): while the Chroma server is frozen
    (SIGSTOP: connections accepted, nothing answered), RAG requests on every replica still
    answer 200 without context within the retrieval budget plus a margin; once it resumes,
    context comes back."""
    fake = cluster.fake
    clients = _clients(cluster)
    try:
        cluster.chroma.send_signal(signal.SIGSTOP)
        fake.clear()
        with ThreadPoolExecutor(6) as pool:
            frozen = list(pool.map(lambda i: _ask(clients[i % 3]), range(6)))
        contexts = [_system(req["body"]) for req in fake.requests()]
    finally:
        cluster.chroma.send_signal(signal.SIGCONT)
    slowest = max(t for _, t in frozen)
    deadline = time.monotonic() + 20
    while True:  # the first calls after SIGCONT may still be the abandoned ones finishing
        fake.clear()
        after, _ = _ask(clients[0])
        if "x-gateway-rag-sources" in after.headers or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    for c in clients:
        c.close()
    print(f"\n[scaleout] Chroma frozen: {[r.status_code for r, _ in frozen]}, slowest "
          f"{slowest * 1000:.0f} ms (budget {RAG_TIMEOUT_S * 1000:.0f} ms); after resume: "
          f"sources {after.headers.get('x-gateway-rag-sources')}")  # fmt: skip
    assert [r.status_code for r, _ in frozen] == [200] * 6
    assert all("x-gateway-rag-sources" not in r.headers for r, _ in frozen)
    assert contexts == [""] * 6  # no system message: retrieval was skipped
    assert slowest < RAG_TIMEOUT_S + 1.5
    assert after.status_code == 200 and after.headers.get("x-gateway-rag-sources")


@pytest.mark.slow
def test_cache_entry_written_by_one_replica_is_a_hit_on_the_others(cluster: Cluster) -> None:
    """Expectation: a deterministic answer cached by replica 1 is served by replicas 2 and 3
    without calling the upstream (the Redis cache is shared)."""
    fake = cluster.fake
    fake.clear()
    body = _body("bulk", temperature=0)
    seen = []
    for c in _clients(cluster):
        with c:
            r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        seen.append(r.headers["x-gateway-cache"])
    print(
        f"\n[scaleout] shared cache across replicas: {seen}, upstream calls {len(fake.requests())}"
    )
    assert seen == ["miss", "hit", "hit"]
    assert len(fake.requests()) == 1


@pytest.mark.slow
def test_replica_killed_with_sigkill_under_load_other_replicas_see_no_errors(
    cluster: Cluster,
) -> None:
    """Expectation: while a fourth replica is SIGKILLed mid-load, every request sent to the
    other three replicas succeeds (0 errors); only requests to the dead one fail."""
    victim = spawn_gateway(
        replica_config(cluster.fake.url, cluster.prefix, cluster.chroma_url), ready_timeout=240
    )
    stop = threading.Event()
    results: dict[str, list[int | str]] = {"survivors": [], "victim": []}

    def drive(url: str, group: str) -> None:
        with httpx.Client(base_url=url, timeout=10, headers=HEADERS[USER_KEY]) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/chat/completions", json=_body("bulk"))
                    results[group].append(r.status_code)
                except httpx.HTTPError as e:
                    results[group].append(type(e).__name__)
                time.sleep(0.01)

    threads = [threading.Thread(target=drive, args=(victim.url, "victim"))]
    threads += [threading.Thread(target=drive, args=(p.url, "survivors")) for p in cluster.procs]
    for t in threads:
        t.start()
    time.sleep(1.0)
    before = len(results["survivors"])
    victim.proc.send_signal(signal.SIGKILL)
    time.sleep(1.5)  # the survivors keep serving after the kill
    stop.set()
    for t in threads:
        t.join(15)
    survivors, dead = results["survivors"], results["victim"]
    errors = [s for s in survivors if s != 200]
    print(f"\n[scaleout] SIGKILL one replica under load: survivors {len(survivors)} requests, "
          f"{len(errors)} errors; victim answered {dead.count(200)} before dying, then "
          f"{len([s for s in dead if s != 200])} failed ({set(s for s in dead if s != 200)}); "
          f"survivor requests after the kill: {len(survivors) - before}")  # fmt: skip
    assert victim.proc.wait(5) == -signal.SIGKILL
    assert errors == []
    assert len(survivors) - before >= 30  # the survivors did serve after the kill
    assert dead.count(200) >= 1  # it was serving when it died
