"""Fixtures of the TLS tests: a test CA, and an edge worker in the test's loop that serves
HTTP and HTTPS on loopback ports with certificates the test gives it."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop

from edge.config import EdgeConfig, ProxyLimits, TlsConfig
from edge.proxy.worker import ProxyWorker, listen_socket
from edge.routing import FileRouteProvider, RoutingTable, parse_routes_document
from edge.tls import CertificateStore, load_files, load_pem
from tests.harness import HOST
from tests.integration import conftest as integration_conftest
from tests.tls.certs import CA, Leaf

APPS = "zeitwork.app"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """uvloop (what the edge runs on) and asyncio's loop: the edge builds each loop's own
    SSL protocol."""
    return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


def https_args(port: int, cert: Path, key: Path) -> tuple[str, ...]:
    """The edge's flags for HTTPS on ``port`` with the certificate files ``cert``/``key``."""
    return ("--https-port", str(port), "--tls-cert", str(cert), "--tls-key", str(key))


# The integration tests' fixture, shared (a fixture imported into a conftest is one here).
upstream = integration_conftest.upstream


@pytest.fixture(scope="session")
def ca() -> CA:
    return CA()


@dataclass
class TlsEdge:
    worker: ProxyWorker
    store: CertificateStore
    http_port: int
    https_port: int

    @property
    def counts(self) -> tuple[int, list[int]]:
        """(handshakes, failures by reason) counted so far."""
        m = self.worker.metrics
        return m.tls_handshakes, list(m.tls_failures)


@contextlib.asynccontextmanager
async def tls_edge(
    routes: dict[str, list[str]],
    tmp_path: Path,
    *,
    files: Leaf | None = None,
    database: Mapping[str, Leaf] | None = None,
    redirect: bool = True,
    hsts: Mapping[str, int] | None = None,
    challenges: Mapping[str, tuple[str, float]] | None = None,
    **limits: float,
) -> AsyncIterator[TlsEdge]:
    """A worker with ``routes`` (and, as the database would give them, ``hsts`` and
    ``challenges``), HTTPS with the ``files`` certificate (the default) and ``database``
    certificates by domain."""
    routes_path = tmp_path / "routes.json"
    routes_path.write_text(json.dumps({"routes": routes}))
    cert_file = key_file = None
    if files is not None:
        cert_file, key_file = files.write(tmp_path)
    http_sock = listen_socket(HOST, 0, 128)
    https_sock = listen_socket(HOST, 0, 128)
    https_port = https_sock.getsockname()[1]
    config = EdgeConfig(
        routes_path=routes_path,
        http_host=HOST,
        http_port=http_sock.getsockname()[1],
        workers=1,
        tls=TlsConfig(port=https_port, cert_file=cert_file, key_file=key_file, redirect=redirect),
        limits=ProxyLimits(**limits),  # type: ignore[arg-type]
    )
    store = CertificateStore(APPS)
    if cert_file is not None and key_file is not None:
        store.set_files(load_files(cert_file, key_file))
    if database:
        store.set_database(
            {
                domain: load_pem(leaf.cert_pem, leaf.key_pem, f"test {domain}")
                for domain, leaf in database.items()
            }
        )
    worker = ProxyWorker(config, FileRouteProvider(routes_path))
    worker.tls = store
    table = parse_routes_document({"routes": routes}, "test")
    worker.install(
        RoutingTable(table.routes, source="test", hsts=hsts or {}, challenges=challenges)
    )
    await worker.start(http_sock, https_sock)
    loop = asyncio.get_running_loop()
    escaped: list[dict[str, object]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: escaped.append(context))
    try:
        yield TlsEdge(worker, store, http_sock.getsockname()[1], https_port)
    finally:
        await worker.shutdown(grace=1.0)
        loop.set_exception_handler(previous)
    assert not escaped, f"exceptions escaped to the event loop: {escaped}"
