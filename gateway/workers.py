"""``gateway serve --workers N``: uvicorn's process supervisor, with what the gateway needs.

* Each worker runs the gateway's own server class (``cli.server_class``), so SIGTERM drains as
  with one worker: ``/readyz`` answers 503 for ``drain_delay_s`` while requests are still
  served, then in-flight requests get ``drain_timeout_s``.
* The supervisor closes its own copy of the listening socket as soon as it is told to stop.
  Otherwise, once the workers stopped accepting, the kernel kept queueing new connections on
  the socket the supervisor still held, and they hung until it exited, then were reset.
* A worker that died (killed, crashed, retired by SIGHUP or SIGTTOU) is marked dead in the
  Prometheus multiprocess folder, so its share of live gauges (``gateway_in_flight_requests``)
  leaves the sums instead of staying there for good.
"""

from __future__ import annotations

import os
from socket import socket

from prometheus_client import multiprocess
from uvicorn.config import Config
from uvicorn.server import Server
from uvicorn.supervisors import multiprocess as uvicorn_multiprocess


class WorkerProcess(uvicorn_multiprocess.Process):
    """A worker that serves with the gateway's server class."""

    @property
    def server(self) -> Server:
        if self._server is None:
            from gateway.cli import server_class

            self._server = server_class()(config=self.config)
        return self._server


class Supervisor(uvicorn_multiprocess.Multiprocess):
    def __init__(self, config: Config, sockets: list[socket]) -> None:
        # uvicorn makes its workers from this module-level name; the gateway's CLI process is
        # the only user of the supervisor, so pointing it at the gateway's worker is safe.
        uvicorn_multiprocess.Process = WorkerProcess  # type: ignore[misc]
        super().__init__(config, sockets)

    def _pids(self) -> set[int]:
        return {p.pid for p in self.processes if p.pid is not None}

    def _forget_dead(self, before: set[int]) -> None:
        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return
        for pid in before - self._pids():
            multiprocess.mark_process_dead(pid)

    def keep_subprocess_alive(self) -> None:
        before = self._pids()
        super().keep_subprocess_alive()
        self._forget_dead(before)

    def handle_signals(self) -> None:  # SIGHUP restarts and SIGTTOU retires workers
        before = self._pids()
        super().handle_signals()
        self._forget_dead(before)

    def _close_listeners(self) -> None:
        for sock in self.sockets:
            sock.close()

    def handle_term(self) -> None:
        self._close_listeners()
        super().handle_term()

    def handle_int(self) -> None:
        self._close_listeners()
        super().handle_int()
