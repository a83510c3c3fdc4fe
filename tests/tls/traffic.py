"""Blocking HTTPS clients for the process tests: one request on a new connection (a new
handshake), and steady traffic in threads that records failures and the certificate each
new handshake was given."""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from tests.harness import HOST
from tests.tls.certs import peer_serial


class HttpsConnection(http.client.HTTPSConnection):
    """HTTPS to the edge on loopback, with ``server_name`` as SNI (and Host)."""

    def __init__(self, port: int, server_name: str, ctx: ssl.SSLContext, timeout: float = 5):
        super().__init__(HOST, port, context=ctx, timeout=timeout)
        self.server_name = server_name
        # The serial of the certificate of the connection's handshake.
        self.serial = 0

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), self.timeout)
        tls = self._context.wrap_socket(  # type: ignore[attr-defined]
            sock, server_hostname=self.server_name
        )
        self.sock = tls
        self.serial = peer_serial(tls)

    def get(self, path: str = "/", *, close: bool = False) -> http.client.HTTPResponse:
        headers = {"Host": self.server_name}
        if close:
            headers["Connection"] = "close"
        self.request("GET", path, headers=headers)
        response = self.getresponse()
        response.read()
        return response


@dataclass
class Fresh:
    status: int
    serial: int
    headers: dict[str, str]


def fetch_fresh(port: int, server_name: str, ctx: ssl.SSLContext, path: str = "/") -> Fresh:
    """One request on a new TLS connection."""
    conn = HttpsConnection(port, server_name, ctx)
    try:
        response = conn.get(path, close=True)
        return Fresh(response.status, conn.serial, {k.lower(): v for k, v in response.getheaders()})
    finally:
        conn.close()


class SteadyTraffic:
    """Requests in threads until stopped: ``kept`` threads each on one kept-alive connection
    for the whole run, ``fresh`` threads each making a new connection per request. Every
    request must answer 200; anything else is a failure."""

    def __init__(
        self, port: int, server_name: str, ctx: ssl.SSLContext, *, kept: int = 2, fresh: int = 2
    ) -> None:
        self.port = port
        self.server_name = server_name
        self.ctx = ctx
        self.failures: list[str] = []
        self.kept_ok = 0
        self.kept_serials: set[int] = set()
        # (monotonic time, serial) of each new handshake, in order per thread.
        self.handshakes: list[tuple[float, int]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._keep) for _ in range(kept)]
        self._threads += [threading.Thread(target=self._renew) for _ in range(fresh)]

    def __enter__(self) -> SteadyTraffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def _fail(self, what: str) -> None:
        with self._lock:
            self.failures.append(what)

    def _keep(self) -> None:
        conn = HttpsConnection(self.port, self.server_name, self.ctx)
        try:
            while not self._stop.is_set():
                try:
                    response = conn.get()
                except (OSError, http.client.HTTPException) as exc:
                    self._fail(f"kept-alive: {exc!r}")
                    return
                if response.status != 200:
                    self._fail(f"kept-alive: status {response.status}")
                with self._lock:
                    self.kept_ok += 1
                    self.kept_serials.add(conn.serial)
                time.sleep(0.002)
        finally:
            conn.close()

    def _renew(self) -> None:
        while not self._stop.is_set():
            try:
                fresh = fetch_fresh(self.port, self.server_name, self.ctx)
            except (OSError, http.client.HTTPException) as exc:
                self._fail(f"new connection: {exc!r}")
                continue
            if fresh.status != 200:
                self._fail(f"new connection: status {fresh.status}")
            with self._lock:
                self.handshakes.append((time.monotonic(), fresh.serial))

    def serials_since(self, moment: float) -> list[int]:
        with self._lock:
            return [serial for at, serial in self.handshakes if at > moment]
