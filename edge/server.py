"""Process lifecycle of the edge: a master that supervises N proxy worker processes.

Each worker binds the HTTP port itself with SO_REUSEPORT, so the kernel spreads connections
over them. The master only supervises: it forwards SIGHUP (reload routes), turns SIGTERM and
the first SIGINT into a graceful stop, and a second SIGINT into an immediate one. A worker
that dies is started again with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import time
from multiprocessing.process import BaseProcess

import uvloop

from edge.config import EdgeConfig
from edge.proxy.worker import ProxyWorker, listen_socket
from edge.routing import FileRouteProvider, RoutesError

log = logging.getLogger("edge.server")

# Exit status of a worker that cannot start at all (port taken, routes unreadable): the
# master gives up instead of restarting it forever.
EXIT_STARTUP = 3

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)


# -- worker process ---------------------------------------------------------------------


def worker_main(config: EdgeConfig, index: int, log_level: str) -> None:
    """Entry point of a worker process."""
    setup_logging(log_level)
    # Ctrl-C reaches the whole process group; only the master decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = uvloop.run(_serve_worker(config, index))
    sys.exit(code)


async def _serve_worker(config: EdgeConfig, index: int) -> int:
    loop = asyncio.get_running_loop()
    provider = FileRouteProvider(config.routes_path)
    try:
        sock = listen_socket(config.http_host, config.http_port, config.backlog)
    except OSError as exc:
        log.error(
            "worker %d: cannot listen on %s:%d: %s",
            index,
            config.http_host,
            config.http_port,
            exc.strerror or exc,
        )
        return EXIT_STARTUP
    worker = ProxyWorker(config, provider)
    try:
        worker.install(await provider.load())
    except RoutesError as exc:
        log.error("worker %d: %s", index, exc)
        sock.close()
        return EXIT_STARTUP
    await worker.start(sock)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(worker.reload()))
    log.info("worker %d serving http://%s:%d", index, config.http_host, config.http_port)
    await stop.wait()
    log.info("worker %d stopping: finishing in-flight requests", index)
    await worker.shutdown()
    return 0


# -- master process ---------------------------------------------------------------------


class Master:
    """Starts the workers and supervises them until told to stop."""

    def __init__(self, config: EdgeConfig, log_level: str = "info") -> None:
        self.config = config
        self.log_level = log_level
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: dict[int, BaseProcess] = {}
        self._started: dict[int, float] = {}
        self._failures: dict[int, int] = {}
        self._stopping = False
        self._interrupts = 0
        self._wake: asyncio.Event | None = None

    def run(self) -> int:
        return uvloop.run(self._run())

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop)
        loop.add_signal_handler(signal.SIGINT, self._on_interrupt)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        for index in range(self.config.workers):
            self._spawn(index)
        log.info(
            "edge starting on http://%s:%d with %d worker(s), routes from %s",
            self.config.http_host,
            self.config.http_port,
            self.config.workers,
            self.config.routes_path,
        )
        code = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.2)
            self._wake.clear()
            if self._interrupts >= 2:
                self._kill_all()
                return 130
            alive = {i: p for i, p in self._workers.items() if p.is_alive()}
            if self._stopping and not alive:
                return code
            for index, proc in list(self._workers.items()):
                if index in alive:
                    continue
                proc.join(0)
                del self._workers[index]
                if self._stopping:
                    continue
                if proc.exitcode == EXIT_STARTUP:
                    log.error("worker %d could not start; stopping the edge", index)
                    code = 1
                    self._on_stop()
                    continue
                await self._restart(index, proc.exitcode)

    async def _restart(self, index: int, exitcode: int | None) -> None:
        lived = time.monotonic() - self._started.get(index, 0.0)
        failures = self._failures[index] = 1 if lived > 60 else self._failures.get(index, 0) + 1
        delay = min(30.0, 0.1 * 2**failures)
        log.error("worker %d exited with %s; starting it again in %.1fs", index, exitcode, delay)
        await asyncio.sleep(delay)
        if not self._stopping:
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        proc = self._ctx.Process(
            target=worker_main,
            args=(self.config, index, self.log_level),
            name=f"zeitwork-edge-worker-{index}",
        )
        proc.start()
        self._workers[index] = proc
        self._started[index] = time.monotonic()

    def _signal_workers(self, signum: int) -> None:
        for proc in self._workers.values():
            if proc.pid is not None and proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signum)

    def _on_stop(self) -> None:
        if not self._stopping:
            log.info(
                "stopping gracefully (in-flight requests get %.0fs)",
                self.config.limits.shutdown_timeout,
            )
        self._stopping = True
        self._signal_workers(signal.SIGTERM)
        if self._wake is not None:
            self._wake.set()

    def _on_interrupt(self) -> None:
        self._interrupts += 1
        if self._interrupts == 1:
            log.info("interrupt: stopping gracefully; interrupt again to exit at once")
            self._on_stop()
        elif self._wake is not None:
            self._wake.set()

    def _on_reload(self) -> None:
        log.info("SIGHUP: reloading routes in every worker")
        try:
            FileRouteProvider(self.config.routes_path).load_sync()
        except RoutesError as exc:
            log.error("new routes are invalid, workers keep the current ones: %s", exc)
            return
        self._signal_workers(signal.SIGHUP)

    def _kill_all(self) -> None:
        log.warning("second interrupt: exiting at once")
        self._signal_workers(signal.SIGKILL)
        for proc in self._workers.values():
            proc.join(1)
