"""Scale-out: three real ``gateway serve`` processes sharing one Redis, driven concurrently.

Each test states its expectation and prints what it measured (``pytest -s`` shows it).
The 2-process exact-limit test lives in tests/plugins/test_limit_e2e.py; this one uses three
replicas and adds the shared response cache and a replica killed with SIGKILL under load.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis

from .helpers import (
    FakeUpstream,
    GatewayProcess,
    build_config,
    demo_model,
    fake_upstream,
    spawn_gateway,
)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13")
LIMIT = 15


def replica_config(upstream: str, prefix: str) -> dict[str, Any]:
    # Only "demo" is limited; "bulk" (the SIGKILL load) is not.
    rule = {"scope": "global", "model": "demo", "rpm": LIMIT}
    return build_config(upstream, models=[demo_model(upstream), demo_model(upstream, "bulk")],
                        pipeline=[
        {"name": "limit", "config": {"store": REDIS_URL, "key_prefix": f"{prefix}-limit",
                                     "rules": [rule]}},
        {"name": "cache", "config": {"store": REDIS_URL, "key_prefix": f"{prefix}-cache"}},
    ])  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[FakeUpstream, list[GatewayProcess], str]]:
    prefix = f"gwscale-{uuid.uuid4().hex[:10]}"
    with fake_upstream(record=10_000) as fake:
        config = replica_config(fake.url, prefix)
        with ThreadPoolExecutor(3) as pool:  # start the three in parallel
            procs = list(pool.map(lambda _: spawn_gateway(config), range(3)))
        try:
            yield fake, procs, prefix
        finally:
            for p in procs:
                p.stop()
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}-*"))
    if keys:
        client.delete(*keys)
    client.close()


def _body(model: str = "demo", **extra: Any) -> dict[str, Any]:
    msgs = [{"role": "user", "content": f"hello {uuid.uuid4().hex[:6]}"}]
    return {"model": model, "messages": msgs, "max_tokens": 5, **extra}


@pytest.mark.slow
def test_three_replicas_admit_exactly_the_global_rpm(cluster: Any) -> None:
    """Expectation: 4x the limit sent concurrently across three replicas -> exactly LIMIT 200s,
    the rest 429, and the upstream sees exactly LIMIT requests."""
    fake, procs, _ = cluster
    fake.clear()
    clients = [httpx.Client(base_url=p.url, timeout=20) for p in procs]
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


@pytest.mark.slow
def test_cache_entry_written_by_one_replica_is_a_hit_on_the_others(cluster: Any) -> None:
    """Expectation: a deterministic answer cached by replica 1 is served by replicas 2 and 3
    without calling the upstream (the Redis cache is shared)."""
    fake, procs, _ = cluster
    fake.clear()
    body = _body("bulk", temperature=0)
    seen = []
    for p in procs:
        r = httpx.post(f"{p.url}/v1/chat/completions", json=body, timeout=20)
        assert r.status_code == 200, r.text
        seen.append(r.headers["x-gateway-cache"])
    print(
        f"\n[scaleout] shared cache across replicas: {seen}, upstream calls {len(fake.requests())}"
    )
    assert seen == ["miss", "hit", "hit"]
    assert len(fake.requests()) == 1


@pytest.mark.slow
def test_replica_killed_with_sigkill_under_load_other_replicas_see_no_errors(
    cluster: Any,
) -> None:
    """Expectation: while a fourth replica is SIGKILLed mid-load, every request sent to the
    other three replicas succeeds (0 errors); only requests to the dead one fail."""
    fake, procs, prefix = cluster
    victim = spawn_gateway(replica_config(fake.url, prefix))
    stop = threading.Event()
    results: dict[str, list[int | str]] = {"survivors": [], "victim": []}

    def drive(url: str, group: str) -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            while not stop.is_set():
                try:
                    r = c.post("/v1/chat/completions", json=_body("bulk"))
                    results[group].append(r.status_code)
                except httpx.HTTPError as e:
                    results[group].append(type(e).__name__)
                time.sleep(0.01)

    threads = [threading.Thread(target=drive, args=(victim.url, "victim"))]
    threads += [threading.Thread(target=drive, args=(p.url, "survivors")) for p in procs]
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
