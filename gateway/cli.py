"""The ``gateway`` command: serve, check-config, fake-upstream, keys, rag."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.config import ConfigError, Settings, load_settings

if TYPE_CHECKING:
    from gateway.plugin import Plugin

log = logging.getLogger("gateway.cli")


def _load(path: str) -> Settings:
    try:
        return load_settings(path)
    except ConfigError as e:
        print(f"configuration error:\n{e}", file=sys.stderr)
        raise SystemExit(2) from None


def per_process_stores(plugins: list[Plugin]) -> list[str]:
    """The plugins whose state (rate limits, budgets, cached answers) lives in the memory of each
    worker process (``store: memory``) rather than in a store the workers share."""
    return [p.name for p in plugins if getattr(p.config, "store", None) == "memory"]


def check_config(args: argparse.Namespace) -> int:
    settings = _load(args.config)
    try:
        from gateway.pipeline import build_pipeline

        plugins = build_pipeline(settings)
    except ConfigError as e:
        print(f"configuration error:\n{e}", file=sys.stderr)
        return 2
    print(
        f"{args.config}: OK: {len(settings.models)} model(s) "
        f"({', '.join(m.name for m in settings.models)}); pipeline: "
        f"{' -> '.join(p.name for p in plugins) or '(empty)'}"
    )
    return 0


def graceful_timeout(settings: Settings) -> float:
    """uvicorn's ``timeout_graceful_shutdown`` for ``server.drain_timeout_s``: uvicorn reads
    None (and ``int(0.5) or None`` was None) as "wait forever", so 0 is a tiny wait."""
    return max(settings.server.drain_timeout_s, 0.001)


def _start_demo_upstream(settings: Settings) -> subprocess.Popen[bytes] | None:
    demo = settings.demo_upstream
    if not demo.enabled:
        return None
    import socket

    try:
        with socket.create_connection((demo.host, demo.port), timeout=0.2):
            in_use = True
    except OSError:
        in_use = False
    if in_use:
        # The readiness test below only connects: another process on the port (a gateway left
        # running, a second `make run`) passed it, and requests went to that process.
        raise SystemExit(
            f"configuration error:\n{settings.source}: demo_upstream.port: {demo.host}:"
            f"{demo.port} is already in use by another process (stop it, or set another port)"
        )
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.fake_upstream", "--host", demo.host, "--port",
         str(demo.port)],
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"demo upstream exited with status {proc.returncode}")
        try:
            with socket.create_connection((demo.host, demo.port), timeout=0.2):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("demo upstream did not start within 15 s")


def server_class() -> type:
    import asyncio
    import signal

    import uvicorn

    from gateway import state

    class GatewayServer(uvicorn.Server):
        """uvicorn's server with a drain phase: on SIGTERM ``/readyz`` turns 503 for
        ``drain_delay_s`` while requests are still served, then the normal graceful shutdown
        (stop accepting, wait up to ``drain_timeout_s``, lifespan shutdown flushes logs) runs
        and the process exits 0 rather than re-raising the signal."""

        def handle_exit(self, sig: int, frame: object) -> None:
            gw = state.CURRENT
            delay = gw.settings.server.drain_delay_s if gw is not None else 0
            if sig == signal.SIGTERM and gw is not None and not gw.draining and delay > 0:
                gw.draining, gw.ready = True, False
                loop = asyncio.get_event_loop()
                loop.call_soon_threadsafe(loop.call_later, delay, self._exit_now, sig)
                return
            self._exit_now(sig)

        def _exit_now(self, sig: int) -> None:
            super().handle_exit(sig, None)
            if sig == signal.SIGTERM:
                self._captured_signals = [s for s in self._captured_signals if s != sig]

    return GatewayServer


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.logs import uvicorn_log_config

    config_path = str(Path(args.config).resolve())
    settings = _load(config_path)
    from gateway.pipeline import build_pipeline

    try:
        plugins = build_pipeline(settings)  # fail before forking workers or starting anything
    except ConfigError as e:
        print(f"configuration error:\n{e}", file=sys.stderr)
        return 2
    host = args.host or settings.server.host
    port = args.port if args.port is not None else settings.server.port
    taken: dict[str, int] = {}
    if settings.metrics.port:  # (0: on the main port, nothing of its own)
        taken["metrics.port"] = settings.metrics.port
    if settings.demo_upstream.enabled:
        taken["demo_upstream.port"] = settings.demo_upstream.port
    for key, other in taken.items():
        if other == port:
            # (uvicorn's bare "address already in use" named neither the key nor the file)
            print(
                f"configuration error:\n{settings.source}: {key}: {other} is the port the "
                "gateway itself listens on (server.port or --port); give it another",
                file=sys.stderr,
            )
            return 2
    workers = args.workers or settings.server.workers
    os.environ["GATEWAY_CONFIG"] = config_path
    metrics_dir = None
    if workers > 1 and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        # Metrics from all workers are aggregated through files in this folder (removed when the
        # gateway stops: the next run starts its counters from zero anyway).
        metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    demo = _start_demo_upstream(settings)
    try:
        config = uvicorn.Config(
            "gateway.app:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            loop="uvloop",
            http="httptools",
            lifespan="on",
            access_log=settings.logging.access_log,
            log_level=settings.logging.level,
            log_config=uvicorn_log_config(settings.logging.level),
            timeout_graceful_shutdown=graceful_timeout(settings),  # type: ignore[arg-type]
            server_header=False,
            date_header=False,
        )  # (also applies the log configuration)
        shared = per_process_stores(plugins) if workers > 1 else []
        if shared:
            log.warning(
                "per_worker_state",
                extra={
                    "workers": workers,
                    "plugins": shared,
                    "detail": "store: memory keeps limits and caches in each worker process: "
                    "every worker counts alone, so a user may get up to workers x their limits; "
                    "set store: redis://... to share them",
                },
            )
        if workers > 1:
            from uvicorn.config import STARTUP_FAILURE

            from gateway.workers import Supervisor

            supervisor = Supervisor(config, sockets=[config.bind_socket()])
            supervisor.run()
            if any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes):
                return 3  # as one worker does: a supervisor must see the failure
        else:
            config.load()
            server = server_class()(config)
            server.run()
            if not server.started:
                return 3
    finally:
        if demo is not None:
            demo.terminate()
            demo.wait(5)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def port_number(text: str) -> int:
    """An argparse type: a TCP port number (0 picks a free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, not {value}")
    return value


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "fake-upstream":
        from gateway import fake_upstream

        fake_upstream.main(argv[1:])
        return 0
    if argv and argv[0] == "keys":
        from plugins.auth.cli import keys_main

        return keys_main(argv[1:])
    if argv and argv[0] == "rag":
        from plugins.rag.cli import rag_main

        return rag_main(argv[1:])
    parser = argparse.ArgumentParser(prog="gateway", description="Secure LLM Gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the gateway")
    p.add_argument("--config", default="config.yaml")
    p.add_argument("--host")
    p.add_argument("--port", type=port_number)
    p.add_argument("--workers", type=_positive)
    p.set_defaults(func=serve)
    p = sub.add_parser("check-config", help="validate the configuration and exit")
    p.add_argument("--config", default="config.yaml")
    p.set_defaults(func=check_config)
    sub.add_parser("fake-upstream", help="run the fake OpenAI-compatible upstream")
    sub.add_parser("keys", help="mint and manage API keys (gateway keys --help)")
    sub.add_parser("rag", help="ingest, list and delete RAG documents (gateway rag --help)")
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
