"""Micro-benchmark of the per-request cost of ``auth``: ``python -m plugins.auth.bench -n 5000``.

Times ``on_request`` alone (no HTTP) for a config.yaml key, a Redis-store key served from the
in-memory cache (``--redis URL`` to include it), an HS256 JWT and an RS256 JWT, and prints the
median and p99 in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.context import RequestContext
from plugins.auth.config import AuthConfig
from plugins.auth.keys import KeyRecord, hash_key, mint_key
from plugins.auth.plugin import AuthPlugin

SECRET = "bench-secret-0123456789"
HS = "bench-hs-secret-0123456789-0123456789-0123"


def _ctx(token: str) -> RequestContext:
    headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
    return RequestContext("bench", "chat", "/v1/chat/completions", "POST", headers,
                          list(headers.items()), {}, model="demo")  # fmt: skip


async def _time(plugin: AuthPlugin, token: str, n: int) -> tuple[float, float]:
    ctx = _ctx(token)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        await plugin.on_request(ctx)
        samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return statistics.median(samples) / 1000, samples[int(len(samples) * 0.99)] / 1000


def _plugin(key: str, jwt_cfg: dict[str, Any], store: dict[str, Any]) -> AuthPlugin:
    cfg = {
        "key_secret": SECRET,
        "keys": [{"id": "bench", "hash": hash_key(SECRET.encode(), key).hex(), "user": "u"}],
        "store": store,
        "jwt": jwt_cfg,
    }
    return AuthPlugin(AuthConfig.model_validate(cfg))


async def main(n: int, redis_url: str) -> None:
    key = mint_key("bench")
    claims = {"sub": "u", "iss": "i", "aud": "gateway", "exp": int(time.time()) + 3600,
              "roles": ["user"]}  # fmt: skip
    jwt_base = {"enabled": True, "issuer": "i", "audience": "gateway"}
    hs_plugin = _plugin(key, {**jwt_base, "algorithms": ["HS256"], "secret": HS}, {})
    rows = [
        ("api key (config.yaml)", await _time(hs_plugin, key, n)),
        ("jwt HS256", await _time(hs_plugin, jwt.encode(claims, HS, "HS256"), n)),
    ]
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with tempfile.TemporaryDirectory() as tmp:
        pem = Path(tmp) / "pub.pem"
        pub = private.public_key()
        pem.write_bytes(
            pub.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        rs_plugin = _plugin(key, {**jwt_base, "algorithms": ["RS256"],
                                  "public_key_file": str(pem)}, {})  # fmt: skip
        rows.append(("jwt RS256", await _time(rs_plugin, jwt.encode(claims, private, "RS256"), n)))
    if redis_url:
        prefix = f"gwbench:{time.time_ns()}:"
        store_plugin = _plugin(key, {}, {"type": "redis", "url": redis_url, "prefix": prefix})
        await store_plugin.open()
        assert store_plugin.store is not None
        store_key = mint_key("bench")
        rec = KeyRecord(id="s", digest=hash_key(SECRET.encode(), store_key), user="u",
                        roles=("user",), source="store")  # fmt: skip
        await store_plugin.store.create(rec)
        try:
            rows.append(("api key (redis, cached)", await _time(store_plugin, store_key, n)))
        finally:
            await store_plugin.store.delete("s")
            await store_plugin.shutdown()
    print(f"auth on_request cost, n={n} each")
    for name, (p50, p99) in rows:
        print(f"  {name:<26} p50 {p50:7.1f} us   p99 {p99:7.1f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--redis", default="", help="also time a cached Redis-store key")
    args = parser.parse_args()
    asyncio.run(main(args.n, args.redis))
