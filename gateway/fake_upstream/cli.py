"""``python -m gateway.fake_upstream``: serve the fake on a port."""

from __future__ import annotations

import argparse
import logging

import orjson
from aiohttp import web

from gateway.cli import port_number
from gateway.fake_upstream.app import create_app
from gateway.fake_upstream.state import FIELDS

log = logging.getLogger("gateway.fake_upstream")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway fake-upstream",
        description="A fake OpenAI-compatible upstream. Each flag sets the server default of "
        "the x-fake-* header of the same name.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port_number, default=9911)
    p.add_argument(
        "--record", type=int, default=100, help="requests kept for /_fake/requests (0: off)"
    )
    p.add_argument(
        "--behaviours", default="{}", help='per-model JSON, e.g. \'{"broken": {"status": 503}}\''
    )
    for name, field in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        if field.type == "bool":
            p.add_argument(flag, action="store_true", default=None)
        else:
            p.add_argument(flag, default=None, help=f"default {field.default!r}")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    defaults = {n: getattr(args, n) for n in FIELDS if getattr(args, n) is not None}
    try:
        behaviours = orjson.loads(args.behaviours)
        if not isinstance(behaviours, dict):
            raise ValueError("--behaviours must be a JSON object of model -> overrides")
        app = create_app(behaviours=behaviours, record=args.record, **defaults)
    except (ValueError, TypeError) as e:
        raise SystemExit(f"fake_upstream: {e}") from None
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # optional: only makes the benchmark target faster
        pass
    log.info("fake upstream listening", extra={"host": args.host, "port": args.port})
    web.run_app(
        app, host=args.host, port=args.port, access_log=None, handler_cancellation=True, print=None
    )
