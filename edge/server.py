"""Process lifecycle of the edge: a master that supervises N proxy worker processes.

Each worker binds the HTTP port itself with SO_REUSEPORT, so the kernel spreads connections
over them. The master only supervises: it forwards SIGHUP (reload routes), turns SIGTERM and
the first SIGINT into a graceful stop, and a second SIGINT into an immediate one. A worker
that dies is started again with backoff.

Routes come from a routes file, or from PostgreSQL: then the master first applies the
schema migrations (once, not per worker), starting the embedded PostgreSQL when no database
URL is given (and stopping it after the workers), and each worker follows the table live
(:mod:`edge.live_routes`).

With HTTPS on, each worker also binds the HTTPS port and terminates TLS itself
(:mod:`edge.tls`). Certificates from the database follow its notifications in every worker;
the certificate files are watched by the master, which checks new ones once and then tells
the workers (SIGUSR1) to load them, so a bad file is one error in the log and never reaches
a worker.

The master also serves the admin API (:mod:`edge.admin`) on the admin port, and holds the
leader lock (:mod:`edge.leader`). Each worker stamps the time of its last routing table
install into an array shared with the master, which /health and /metrics report as the
table's age.
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
from collections.abc import MutableSequence
from dataclasses import replace
from multiprocessing.process import BaseProcess
from typing import Any

import uvloop

from edge import metrics
from edge.config import EdgeConfig
from edge.leader import LeaderLock
from edge.live_routes import LiveRoutes, PostgresRouteProvider
from edge.malloc import steady_heap
from edge.proxy.worker import ProxyWorker, listen_socket
from edge.ratelimit import Limiter
from edge.routing import FileRouteProvider, RouteProvider, RoutesError
from edge.store.db import connect, create_pool, describe_dsn
from edge.store.embedded import EmbeddedPostgres
from edge.store.errors import StoreError
from edge.store.migrate import migrate
from edge.tls import (
    CertificateError,
    CertificateStore,
    DatabaseCertificates,
    FileWatch,
    load_files,
)

log = logging.getLogger("edge.server")

# How often the master looks at the certificate files (seconds).
CERTIFICATE_FILES_CHECK = 1.0

# Exit status of a worker that cannot start at all (port taken, routes unreadable): the
# master gives up instead of restarting it forever.
EXIT_STARTUP = 3

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr, force=True)
    # pgserver narrates every initdb/pg_ctl run at INFO; its problems still show.
    logging.getLogger("pgserver").setLevel(max(logging.WARNING, logging.getLogger().level))


# -- worker process ---------------------------------------------------------------------


def worker_main(
    config: EdgeConfig,
    index: int,
    log_level: str,
    installed: MutableSequence[float],
    metrics_block: MutableSequence[float],
) -> None:
    """Entry point of a worker process; ``installed[index]`` gets the wall-clock time of
    each routing table install, ``metrics_block`` its counts (:mod:`edge.metrics`)."""
    setup_logging(log_level)
    # Ctrl-C reaches the whole process group; only the master decides what it means.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A reload asked for while the worker starts must not kill it (the default action): it
    # loads everything afresh anyway.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    steady_heap()
    code = uvloop.run(_serve_worker(config, index, installed, metrics_block))
    sys.exit(code)


async def _serve_worker(
    config: EdgeConfig,
    index: int,
    installed: MutableSequence[float] | None = None,
    metrics_block: MutableSequence[float] | None = None,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    provider: RouteProvider
    live: LiveRoutes | None = None
    store = _certificate_store(config, index)
    if store is not None:
        loop.add_signal_handler(signal.SIGUSR1, _reload_files, config, store, index)
    if config.database_url:
        provider = PostgresRouteProvider(config.database_url, config.apps_domain)
        worker = ProxyWorker(config, provider)
        worker.metrics_block = metrics_block
        worker.tls = store
        _stamp_installs(worker, index, installed)
        live = LiveRoutes(
            worker,
            provider,
            debounce=config.routes_debounce,
            reload_interval=config.routes_reload_interval,
            certificates=None
            if store is None
            else DatabaseCertificates(store, config.tls.certificate_secret),
        )
        live.start()
        # Not listening before the first table is in: with SO_REUSEPORT the kernel would queue
        # connections for this worker that it could only answer with 404. A worker restarted
        # while the database is down waits here (retrying) while its siblings serve.
        if not await _first_of(live.loaded, stop):
            await live.stop()
            return 0
        live_routes = live

        def reload() -> object:
            if worker.access_log is not None:
                worker.access_log.reopen()  # after a rotation, the path names a new file
            live_routes.request_reload()
            return None
    else:
        assert config.routes_path is not None
        provider = FileRouteProvider(config.routes_path)
        worker = ProxyWorker(config, provider)
        worker.metrics_block = metrics_block
        worker.tls = store
        _stamp_installs(worker, index, installed)

        def reload() -> object:
            return loop.create_task(worker.reload())

    sockets = []
    ports = [config.http_port] + ([config.tls.port] if store is not None else [])
    for port in ports:
        try:
            sockets.append(listen_socket(config.http_host, port, config.backlog))
        except OSError as exc:
            log.error(
                "worker %d: cannot listen on %s:%d: %s",
                index,
                config.http_host,
                port,
                exc.strerror or exc,
            )
            for sock in sockets:
                sock.close()
            if live is not None:
                await live.stop()
            return EXIT_STARTUP
    if live is None:
        try:
            worker.install(await provider.load())
        except RoutesError as exc:
            log.error("worker %d: %s", index, exc)
            for sock in sockets:
                sock.close()
            return EXIT_STARTUP
    await worker.start(sockets[0], sockets[1] if len(sockets) > 1 else None)
    loop.add_signal_handler(signal.SIGHUP, reload)
    if store is not None:
        log.info(
            "worker %d serving http://%s:%d and https://%s:%d",
            index,
            config.http_host,
            config.http_port,
            config.http_host,
            config.tls.port,
        )
    else:
        log.info("worker %d serving http://%s:%d", index, config.http_host, config.http_port)
    await stop.wait()
    log.info("worker %d stopping: finishing in-flight requests", index)
    if live is not None:
        await live.stop()
    await worker.shutdown()
    return 0


def _certificate_store(config: EdgeConfig, index: int) -> CertificateStore | None:
    """The worker's certificates with the files loaded (None: no HTTPS). Files that cannot
    be loaded leave the database's certificates (the command checked them at start)."""
    if not config.tls.enabled:
        return None
    store = CertificateStore(config.apps_domain)
    _reload_files(config, store, index)
    return store


def _reload_files(config: EdgeConfig, store: CertificateStore, index: int) -> None:
    """Load the certificate files into ``store`` (SIGUSR1 from the master: they changed)."""
    tls = config.tls
    if tls.cert_file is None or tls.key_file is None:
        return
    try:
        certificate = load_files(tls.cert_file, tls.key_file)
    except CertificateError as exc:
        log.error(
            "worker %d: TLS certificate files not loaded, keeping the current: %s", index, exc
        )
        return
    store.set_files(certificate)
    log.debug("worker %d: TLS certificate %s", index, certificate.describe())


def _stamp_installs(
    worker: ProxyWorker, index: int, installed: MutableSequence[float] | None
) -> None:
    if installed is None:
        return

    def stamp() -> None:
        installed[index] = time.time()

    worker.on_install = stamp


async def _first_of(wanted: asyncio.Event, stop: asyncio.Event) -> bool:
    """Wait for ``wanted`` unless ``stop`` comes first; whether ``wanted`` came."""
    waits = [asyncio.ensure_future(wanted.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    return wanted.is_set() and not stop.is_set()


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
        self._embedded: EmbeddedPostgres | None = None
        # Wall-clock time of each worker's last routing table install (0: none yet).
        self._installed: MutableSequence[float] = self._ctx.Array("d", config.workers, lock=False)
        # Each worker's metric counts, and what workers that died had counted.
        self._metric_blocks: list[MutableSequence[float]] = [
            self._ctx.Array("d", metrics.SIZE, lock=False) for _ in range(config.workers)
        ]
        self._retired_metrics = [0.0] * metrics.SIZE
        self._admin: Any = None
        self._pool: Any = None
        self._leader: LeaderLock | None = None
        self._leader_loops: list[Any] = []
        tls = config.tls
        self._cert_watch: FileWatch | None = None
        if tls.enabled and tls.cert_file is not None and tls.key_file is not None:
            self._cert_watch = FileWatch(tls.cert_file, tls.key_file)

    def run(self) -> int:
        return uvloop.run(self._main())

    async def _main(self) -> int:
        try:
            if self.config.routes_path is None and not await self._prepare_database():
                return 1
            if not await self._start_admin():
                return 1
            try:
                return await self._run()
            finally:
                await self._stop_admin()
        finally:
            # After the workers: they read routes from it until they stop.
            if self._embedded is not None:
                log.info("stopping the embedded PostgreSQL")
                try:
                    await asyncio.to_thread(self._embedded.stop)
                except StoreError as exc:
                    log.error("%s", exc)

    async def _prepare_database(self) -> bool:
        """Start the embedded PostgreSQL if no database URL is given, then migrate, once for
        all workers; False (logged) when the database cannot be used."""
        dsn = self.config.database_url
        try:
            if not dsn:
                self._embedded = EmbeddedPostgres(self.config.postgres_dir)
                log.info("no database URL: starting PostgreSQL in %s", self._embedded.data_dir)
                dsn = await asyncio.to_thread(self._embedded.start)
                self.config = replace(self.config, database_url=dsn)
            conn = await connect(dsn)
            try:
                applied = await migrate(conn)
            finally:
                await conn.close()
        except StoreError as exc:
            log.error("%s", exc)
            return False
        if applied:
            log.info("database migrated: %s", ", ".join(applied))
        return True

    def routing_age(self) -> float | None:
        """Age of the oldest routing table among the live workers (None: none has one)."""
        alive = [i for i, p in self._workers.items() if p.is_alive()]
        stamps = [self._installed[i] for i in alive if self._installed[i] > 0]
        if not stamps:
            return None
        return max(0.0, time.time() - min(stamps))

    async def _start_admin(self) -> bool:
        """The admin API on the admin port (and the leader lock); False (logged) if the port
        cannot be had."""
        if not self.config.admin_port:
            return True
        # Imported here: a routes-file edge without an admin port needs none of it.
        from edge.admin.app import (  # noqa: PLC0415
            AdminContext,
            AdminMetrics,
            AdminServer,
            AdminSettings,
        )
        from edge.admin.auth import Authenticator, load_admin_token  # noqa: PLC0415

        dsn = self.config.database_url
        try:
            token, source = load_admin_token(self.config.admin_token, self.config.admin_token_file)
        except OSError as exc:
            log.error("cannot read or create the admin token file: %s", exc)
            return False
        try:
            if dsn:
                self._pool = await create_pool(dsn, min_size=1, max_size=10)
                self._leader = LeaderLock(dsn)
                self._leader.start()
        except StoreError as exc:
            log.error("%s", exc)
            return False
        leader = self._leader
        admin_metrics = AdminMetrics()
        metrics_registry = admin_metrics.registry
        if leader is not None and dsn:
            self._leader_loops = self._make_leader_loops(dsn, leader, metrics_registry)
        ctx = AdminContext(
            pool=self._pool,
            auth=Authenticator(self._pool, token, self.config.bootstrap_token),
            settings=AdminSettings(
                apps_domain=self.config.apps_domain,
                edge_host=self.config.edge_host,
                nameservers=self.config.nameservers,
                region=self.config.region,
            ),
            routing_age=self.routing_age,
            metrics=admin_metrics,
            collectors=(metrics.ProxyCollector(self._metric_blocks, self._retired_metrics),),
            limiter=None
            if self.config.admin_rate_limit is None
            else Limiter(self.config.admin_rate_limit, max_keys=10_000, name="admin"),
            is_leader=(lambda: leader.is_leader) if leader is not None else (lambda: False),
        )
        for loop in self._leader_loops:
            loop.start()
        if dsn:
            self._admin = AdminServer(ctx)
        else:
            # From a routes file there is no platform state: health and metrics only.
            from edge.admin import system  # noqa: PLC0415

            self._admin = AdminServer(ctx, api=system.api)
        host, port = self.config.admin_host, self.config.admin_port
        try:
            await self._admin.start(host, port)
        except OSError as exc:
            log.error("cannot listen on the admin port %s:%d: %s", host, port, exc.strerror or exc)
            self._admin = None
            await self._stop_admin()
            return False
        log.info("admin API on http://%s:%d (admin token from %s)", host, port, source)
        return True

    def _make_leader_loops(self, dsn: str, leader: LeaderLock, registry: Any) -> list[Any]:
        """What runs on the leader only: the scheduler, the DNS checks of verified domains,
        and (with a certificate secret to encrypt the keys) the ACME certificate orders."""
        from edge.acme import AcmeSettings, CertificateManager  # noqa: PLC0415
        from edge.domain_checks import DomainChecker  # noqa: PLC0415
        from edge.scheduling import SchedulerLoop  # noqa: PLC0415

        config = self.config
        loops: list[Any] = [
            SchedulerLoop(
                self._pool,
                dsn,
                leader,
                config.scheduling,
                interval=config.scheduler_interval,
                registry=registry,
            ),
            DomainChecker(
                self._pool,
                leader,
                config.edge_host,
                nameservers=config.nameservers,
                interval=config.domain_check_interval,
                registry=registry,
            ),
        ]
        secret = config.tls.certificate_secret
        if config.acme.enabled and secret is not None:
            settings = AcmeSettings(
                secret=secret,
                directory_url=config.acme.directory_url,
                email=config.acme.email,
                ca_bundle=str(config.acme.ca_bundle) if config.acme.ca_bundle else None,
            )
            loops.append(
                CertificateManager(self._pool, settings, leader=leader, dsn=dsn, registry=registry)
            )
        elif config.acme.enabled:
            log.warning(
                "no certificate secret ($ZEITWORK_CERTIFICATE_SECRET or "
                "--certificate-secret-file): certificates of custom domains are not ordered"
            )
        return loops

    async def _stop_admin(self) -> None:
        for loop in self._leader_loops:
            await loop.stop()
        self._leader_loops = []
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
        if self._leader is not None:
            await self._leader.stop()
            self._leader = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _certificates_source(self) -> str:
        tls = self.config.tls
        sources = []
        if tls.cert_file is not None:
            sources.append(f"{tls.cert_file} (the default)")
        if self.config.routes_path is None:
            sources.append("the database (live)")
        return " and ".join(sources) or "nowhere: every handshake fails"

    def _reload_certificate_files(self) -> None:
        """Check the certificate files, then have every worker load them (SIGUSR1); invalid
        ones are logged here once and the workers keep theirs."""
        tls = self.config.tls
        if self._cert_watch is None or tls.cert_file is None or tls.key_file is None:
            return
        self._cert_watch.loaded()
        try:
            certificate = load_files(tls.cert_file, tls.key_file)
        except CertificateError as exc:
            log.error("new TLS certificate files are invalid, workers keep the current: %s", exc)
            return
        log.info("TLS certificate reloaded in every worker: %s", certificate.describe())
        self._signal_workers(signal.SIGUSR1)

    def _routes_source(self) -> str:
        if self.config.routes_path is not None:
            return f"routes file {self.config.routes_path}"
        return f"PostgreSQL {describe_dsn(self.config.database_url or '')} (live)"

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop)
        loop.add_signal_handler(signal.SIGINT, self._on_interrupt)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        for index in range(self.config.workers):
            self._spawn(index)
        tls = self.config.tls
        log.info(
            "edge starting on http://%s:%d%s with %d worker(s), routes from %s",
            self.config.http_host,
            self.config.http_port,
            f" and https://{self.config.http_host}:{tls.port}" if tls.enabled else "",
            self.config.workers,
            self._routes_source(),
        )
        if tls.enabled:
            log.info("TLS certificates from %s", self._certificates_source())
        code = 0
        next_files_check = loop.time() + CERTIFICATE_FILES_CHECK
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 0.2)
            self._wake.clear()
            if self._cert_watch is not None and loop.time() >= next_files_check:
                next_files_check = loop.time() + CERTIFICATE_FILES_CHECK
                if self._cert_watch.changed() and not self._stopping:
                    log.info("TLS certificate files changed")
                    self._reload_certificate_files()
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
        # A successor starts counting from zero; its predecessor's counts stay in the sums.
        metrics.retire(self._metric_blocks[index], self._retired_metrics)
        proc = self._ctx.Process(
            target=worker_main,
            args=(
                self.config,
                index,
                self.log_level,
                self._installed,
                self._metric_blocks[index],
            ),
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
        what = "routes and certificates" if self.config.tls.enabled else "routes"
        log.info("SIGHUP: reloading %s in every worker", what)
        self._reload_certificate_files()
        if self.config.routes_path is not None:
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
