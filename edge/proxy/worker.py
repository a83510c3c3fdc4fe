"""One proxy worker process: its listening socket, routes, pools, clock and shutdown.

Per-connection timeouts are deadlines on the connection objects, checked by one ticker per
worker (like HAProxy's and nginx's cached clocks): the hot path only stores a float instead
of arming and cancelling a timer per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import socket
from collections.abc import Callable, MutableSequence
from email.utils import formatdate
from random import random
from time import perf_counter as _clock

from edge.accesslog import AccessLog
from edge.config import EdgeConfig
from edge.metrics import ProxyMetrics
from edge.proxy.client import ClientConnection
from edge.proxy.http import as_protocol
from edge.proxy.upstream import UpstreamConnection, UpstreamPool
from edge.ratelimit import Limiter, LogThrottle, RateLimit
from edge.routing import Address, RouteProvider, RoutesError, RoutingTable
from edge.tls import CertificateStore, TlsServer

log = logging.getLogger("edge.worker")

# Rate limiter keys looked at per second for expiry: bounded work per tick at any size.
SWEEP_BUDGET = 2000


class Route:
    """A host's live route in one worker: its instances' pools and how one is chosen.

    Instances of the edge's own region are preferred; the others serve only while none of
    those is available (region failover). Among the candidates, power of two choices on
    in-flight requests; an ejected instance (recent connect failure or timeout) is skipped
    until its ejection ends, unless every instance is ejected.
    """

    __slots__ = ("host", "hsts", "limiter", "local", "pools", "remote")

    def __init__(self, host: str, pools: list[UpstreamPool], region: str = "") -> None:
        self.host = host
        self.pools = pools
        # The project's rate limit, shared by all its hosts (None: not limited).
        self.limiter: Limiter | None = None
        # The Strict-Transport-Security line of its HTTPS responses (b"": none).
        self.hsts = b""
        if region:
            self.local = [p for p in pools if p.region == region]
            self.remote = [p for p in pools if p.region != region]
        else:
            self.local, self.remote = pools, []
        if not self.local:  # no instance in this region at all: every region is as good
            self.local, self.remote = self.remote, []

    def pick(self, now: float, avoid: UpstreamPool | None) -> UpstreamPool:
        """An instance for the next request, other than ``avoid`` (a failed attempt) if any
        other can be had."""
        pool = _two_choices(self.local, now, avoid)
        if pool is None and self.remote:
            pool = _two_choices(self.remote, now, avoid)
        if pool is None:
            # Everything is ejected: try the one whose ejection ends first rather than refuse.
            others = [p for p in self.pools if p is not avoid] or self.pools
            pool = min(others, key=_ejected_until)
        return pool


def _ejected_until(pool: UpstreamPool) -> float:
    return pool.down_until


def _two_choices(
    pools: list[UpstreamPool], now: float, avoid: UpstreamPool | None
) -> UpstreamPool | None:
    """Power of two choices: of two random available instances, the one with fewer requests
    in flight; None when no instance of ``pools`` is available."""
    n = len(pools)
    if n == 1:
        pool = pools[0]
        return pool if pool is not avoid and pool.down_until <= now else None
    i = int(random() * n)
    j = int(random() * (n - 1))
    if j >= i:
        j += 1
    a, b = pools[i], pools[j]
    a_ok = a is not avoid and a.down_until <= now
    b_ok = b is not avoid and b.down_until <= now
    if a_ok and b_ok:
        return a if a.busy <= b.busy else b
    if a_ok or b_ok:
        return a if a_ok else b
    available = [p for p in pools if p is not avoid and p.down_until <= now]
    return min(available, key=_in_flight) if available else None


def _in_flight(pool: UpstreamPool) -> int:
    return pool.busy


class ProxyWorker:
    def __init__(self, config: EdgeConfig, provider: RouteProvider):
        self.config = config
        self.limits = config.limits
        self.provider = provider
        self.loop = asyncio.get_running_loop()
        self.now = self.loop.time()
        self.date = formatdate(usegmt=True).encode()
        self.routes: dict[bytes, Route] = {}
        self.pools: dict[Address, UpstreamPool] = {}
        self.table: RoutingTable | None = None
        # ACME HTTP-01 challenges answered on plain HTTP: token -> (key authorization, expiry
        # as a Unix time); None: challenge paths are proxied (the routes file has none).
        self.challenges: dict[bytes, tuple[bytes, float]] | None = None
        # The certificates of the HTTPS listener (None: no HTTPS).
        self.tls: CertificateStore | None = None
        tls = config.tls
        # Plain HTTP answers 308 to https://host<suffix><target> (None: it is served).
        self.https_redirect: bytes | None = None
        if tls.enabled and tls.redirect:
            self.https_redirect = b"" if tls.port == 443 else b":%d" % tls.port
        # Called after each install (the process reports its table's age to the master).
        self.on_install: Callable[[], None] | None = None
        self.clients: set[ClientConnection] = set()
        self.upstreams: set[UpstreamConnection] = set()
        self.metrics = ProxyMetrics()
        # One limiter per rate-limited project, kept across table reloads.
        self.project_limiters: dict[str, Limiter] = {}
        limit = config.client_rate_limit
        self.client_limiter = (
            None
            if limit is None
            else Limiter(limit, max_keys=config.rate_limit_max_keys, name="client")
        )
        self.access_log = None if config.access_log is None else AccessLog(config.access_log)
        # A flood of refusals logs a line a second, not a line a request.
        self._limit_log = LogThrottle(1.0)
        # The shared block the master reads the counts from (None: nobody reads them).
        self.metrics_block: MutableSequence[float] | None = None
        self.shutting_down = False
        self._trusted = config.trusted_proxies
        self._trusted_cache: dict[str, bool] = {}
        # Request ids: a random prefix per worker and a counter (unique, no syscall per id).
        self.request_id_prefix = os.urandom(10).hex().encode()
        self.request_count = 0
        self._server: asyncio.AbstractServer | None = None
        self._tls_server: asyncio.AbstractServer | None = None
        self._ticker: asyncio.Task[None] | None = None

    # -- routing ---------------------------------------------------------------------

    def install(self, table: RoutingTable) -> None:
        """Swap in a new routing table; pools of instances still named are kept."""
        # Building hundreds of thousands of objects in one go would run the cyclic collector
        # over and over (most of the time for large tables); nothing built here needs it.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._install(table)
        finally:
            if collecting:
                gc.enable()
        if self.on_install is not None:
            self.on_install()

    def _install(self, table: RoutingTable) -> None:
        pools: dict[Address, UpstreamPool] = {}
        routes: dict[bytes, Route] = {}
        regions = table.regions
        region = self.config.region
        for host, addresses in table.routes.items():
            route_pools = []
            for address in addresses:
                pool = pools.get(address)
                if pool is None:  # first seen in this table: kept from the last one or new
                    pool = self.pools.get(address) or UpstreamPool(self, address)
                    pool.region = regions.get(address, "")
                    pools[address] = pool
                route_pools.append(pool)
            routes[host.encode()] = Route(host, route_pools, region)
        self._install_limits(table, routes)
        for host, max_age in table.hsts.items():
            route = routes.get(host.encode())
            if route is not None:
                route.hsts = b"Strict-Transport-Security: max-age=%d\r\n" % max_age
        for address, pool in self.pools.items():
            if address not in pools:
                pool.close()
        self.pools = pools
        self.routes = routes  # one reference swap: requests see the old or the new table
        self.table = table
        if table.challenges is None:
            self.challenges = None
        else:
            self.challenges = {
                token.encode(): (key.encode(), expires)
                for token, (key, expires) in table.challenges.items()
            }

    def _install_limits(self, table: RoutingTable, routes: dict[bytes, Route]) -> None:
        """Give each host of a rate-limited project its project's limiter: a project keeps
        its limiter (and its state) across reloads, with the policy updated in place."""
        limiters: dict[str, Limiter] = {}
        for host, (project, rate, burst) in table.limits.items():
            route = routes.get(host.encode())
            if route is None:
                continue
            limiter = limiters.get(project)
            if limiter is None:
                try:
                    policy = RateLimit(rate, burst)
                except ValueError as exc:  # the schema's checks make this unlikely
                    log.error("project %s: rate limit not applied: %s", project, exc)
                    continue
                limiter = self.project_limiters.get(project)
                if limiter is None:
                    limiter = Limiter(policy, max_keys=1, name="project")
                else:
                    limiter.replace_limit(policy)
                limiters[project] = limiter
            route.limiter = limiter
        self.project_limiters = limiters

    async def reload(self) -> bool:
        if self.access_log is not None:
            self.access_log.reopen()  # after a rotation, the path names a new file
        try:
            table = await self.provider.load()
        except RoutesError as exc:
            log.error("routes not reloaded, keeping the current table: %s", exc)
            return False
        self.install(table)
        log.info("routes loaded from %s: %d hosts", self.provider.describe(), len(table))
        return True

    # -- per-request helpers ---------------------------------------------------------

    def is_trusted(self, ip: str) -> bool:
        if not self._trusted:
            return False
        cached = self._trusted_cache.get(ip)
        if cached is None:
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                cached = False
            else:
                cached = any(address in net for net in self._trusted)
            if len(self._trusted_cache) > 10_000:
                self._trusted_cache.clear()
            self._trusted_cache[ip] = cached
        return cached

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, sock: socket.socket, tls_sock: socket.socket | None = None) -> None:
        """Serve plain HTTP on ``sock`` and, with ``tls_sock`` (and :attr:`tls` set), HTTPS."""
        self._server = await self.loop.create_server(
            lambda: as_protocol(ClientConnection(self)), sock=sock, backlog=self.config.backlog
        )
        if tls_sock is not None:
            assert self.tls is not None, "HTTPS needs the worker's certificates"
            factory = TlsServer(
                self.tls,
                lambda: ClientConnection(self, tls=True),
                self.metrics,
                handshake_timeout=self.limits.tls_handshake_timeout,
            )
            self._tls_server = await self.loop.create_server(
                factory, sock=tls_sock, backlog=self.config.backlog
            )
        self._ticker = self.loop.create_task(self._tick())

    async def _tick(self) -> None:
        tick = self.limits.tick
        last_date = 0
        while True:
            await asyncio.sleep(tick)
            now = self.now = self.loop.time()
            second = int(now)
            if second != last_date:
                last_date = second
                self.date = formatdate(usegmt=True).encode()
                self.publish_metrics()
                if self.access_log is not None:
                    self.access_log.flush()
                if self.client_limiter is not None:
                    self.client_limiter.sweep(_clock(), SWEEP_BUDGET)
            for client in [c for c in self.clients if c.deadline < now]:
                client.on_timeout()
            for upstream in [u for u in self.upstreams if u.deadline < now]:
                upstream.on_timeout()

    def rate_limited(self, client: bytes, host: bytes, limiter: Limiter, scope: int) -> None:
        """Count a 429, and log it unless a line was logged within the last second."""
        self.metrics.limited[scope] += 1
        held_back = self._limit_log.allow(self.now)
        if held_back is not None:
            log.warning(
                "rate limit: client %s host %s over %s (%s)%s",
                client.decode("latin-1"),
                host.decode("latin-1"),
                limiter.limit,
                limiter.name,
                f"; {held_back} more refused since the last line" if held_back else "",
            )

    def publish_metrics(self) -> None:
        if self.metrics_block is not None:
            self.metrics.publish(self.metrics_block, len(self.clients), len(self.routes))

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish (up to ``grace`` s), then close."""
        if grace is None:
            grace = self.limits.shutdown_timeout
        self.shutting_down = True
        for server in (self._server, self._tls_server):
            if server is not None:
                server.close()
        for client in list(self.clients):
            client.shutdown()
        deadline = self.loop.time() + grace
        while self.clients and self.loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        for client in list(self.clients):
            if client.transport is not None:
                client.transport.abort()
            client.close()
        for pool in self.pools.values():
            pool.close()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        for server in (self._server, self._tls_server):
            if server is not None:
                await server.wait_closed()
        # Let transports run their connection_lost callbacks.
        await asyncio.sleep(0)
        self.publish_metrics()
        if self.access_log is not None:
            self.access_log.close()


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT, so every worker accepts on the same port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
