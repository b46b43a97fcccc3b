"""The floor: the thinnest proxy we can write with the gateway's own stack, doing nothing else.

A raw ASGI callable (no framework, no parsing, no plugins) on uvicorn with uvloop + httptools,
forwarding each request body to the upstream through one shared aiohttp session and relaying the
response bytes as they arrive. The gateway's added latency over this is what its features cost;
this one's added latency over direct is what any Python proxy on this stack costs.

    python -m bench.null_proxy --port 9920 --upstream http://127.0.0.1:9911
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import aiohttp

Scope = dict[str, Any]
Receive = Any
Send = Any

# Headers the relay must not copy: hop-by-hop, and framing that the next hop redoes (aiohttp sets
# the request's Content-Length; uvicorn re-chunks a response that had Transfer-Encoding).
_SKIP_REQUEST = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
_SKIP_RESPONSE = {b"connection", b"keep-alive", b"transfer-encoding"}


class NullProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=1000),
                    cookie_jar=aiohttp.DummyCookieJar(),
                    auto_decompress=False,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.session is not None
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in scope["headers"]
            if k.decode("latin-1").lower() not in _SKIP_REQUEST
        ]
        url = self.upstream + scope["path"]
        async with self.session.request(
            scope["method"], url, data=body, headers=headers, allow_redirects=False
        ) as resp:
            out = [(k, v) for k, v in resp.raw_headers if k.lower() not in _SKIP_RESPONSE]
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            async for chunk in resp.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})


def app_from_env() -> NullProxy:
    """The app of each worker process with ``--workers`` (uvicorn imports it by name)."""
    return NullProxy(os.environ["NULL_PROXY_UPSTREAM"])


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m bench.null_proxy", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9920)
    p.add_argument("--upstream", default="http://127.0.0.1:9911")
    p.add_argument("--workers", type=int, default=1, help="processes (as gateway serve's)")
    args = p.parse_args(argv)
    app: Any = NullProxy(args.upstream)
    if args.workers > 1:
        os.environ["NULL_PROXY_UPSTREAM"] = args.upstream
        app = "bench.null_proxy:app_from_env"
    uvicorn.run(
        app,
        factory=args.workers > 1,
        workers=args.workers,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
    )


if __name__ == "__main__":
    main()
