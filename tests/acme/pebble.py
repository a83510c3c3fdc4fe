"""Debian's ``pebble`` (Let's Encrypt's ACME test server) for the ACME tests, and what they
need around it: a CA for pebble's own HTTPS, a DNS server on loopback pointing the test's
domains at 127.0.0.1, and a stand-in for the edges' HTTP-01 answers.

Pebble validates HTTP-01 on ``http://<the domain's address>:<httpPort>``; it resolves the
domain with the DNS server given by ``-dnsserver``. Its root and intermediate are generated
at each start and served on the management port (``/roots/0``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

# dnslib has no type information.
from edge import localca
from edge.store import acme as acme_store
from tests.conftest import require_tool

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class TestCA:
    """A CA of the test's own for pebble's HTTPS listeners (Debian ships none)."""

    ca_pem: Path
    cert_pem: Path
    key_pem: Path


def make_listener_ca(directory: Path) -> TestCA:
    """The CA and certificate of pebble's own HTTPS listener (localhost and HOST)."""
    ca, ca_key = localca.new_ca("zeitwork test pebble CA", days=2)
    leaf, key = localca.issue(ca, ca_key, ["localhost", HOST], days=1)
    directory.mkdir(parents=True, exist_ok=True)
    paths = TestCA(directory / "ca.pem", directory / "cert.pem", directory / "key.pem")
    paths.ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths.key_pem.write_bytes(localca.key_pem(key))
    return paths


@dataclass
class Pebble:
    proc: subprocess.Popen[bytes]
    acme_port: int
    management_port: int
    http_port: int
    ca: TestCA
    log_path: Path

    @property
    def directory_url(self) -> str:
        return f"https://{HOST}:{self.acme_port}/dir"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca.ca_pem))

    def get(self, path: str) -> bytes:
        url = f"https://{HOST}:{self.management_port}{path}"
        with urllib.request.urlopen(url, timeout=10, context=self._context()) as answer:
            return bytes(answer.read())

    def root(self) -> x509.Certificate:
        """The root pebble issues under (generated at its start)."""
        return x509.load_pem_x509_certificate(self.get("/roots/0"))

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"pebble exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(
                    self.directory_url, timeout=2, context=self._context()
                ) as answer:
                    json.load(answer)
                self.root()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"pebble did not start:\n{self.log()}") from None
                time.sleep(0.05)


@contextlib.contextmanager
def running_pebble(directory: Path, *, dns_port: int, http_port: int) -> Iterator[Pebble]:
    """Pebble on free loopback ports, validating HTTP-01 on ``http_port`` and resolving
    names with the DNS server on ``dns_port``; fast and deterministic: no sleeps before
    validations, no nonces rejected at random, no authorization reused."""
    binary = require_tool("pebble")
    ca = make_listener_ca(directory / "listener")
    acme_port, management_port = free_port(), free_port()
    config = {
        "pebble": {
            "listenAddress": f"{HOST}:{acme_port}",
            "managementListenAddress": f"{HOST}:{management_port}",
            "certificate": str(ca.cert_pem),
            "privateKey": str(ca.key_pem),
            "httpPort": http_port,
            "tlsPort": free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
        }
    }
    config_path = directory / "pebble-config.json"
    config_path.write_text(json.dumps(config))
    log_path = directory / "pebble.log"
    env = {
        **os.environ,
        "PEBBLE_VA_NOSLEEP": "1",
        "PEBBLE_WFE_NONCEREJECT": "0",
        "PEBBLE_AUTHZREUSE": "0",
    }
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [binary, "-config", str(config_path), "-dnsserver", f"{HOST}:{dns_port}"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    pebble = Pebble(proc, acme_port, management_port, http_port, ca, log_path)
    try:
        pebble.wait_ready()
        yield pebble
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


@contextlib.asynccontextmanager
async def challenge_stand_in(
    pool: Any, port: int, *, on_answer: Callable[[], Awaitable[None]] | None = None
) -> AsyncIterator[list[str]]:
    """A STAND-IN for the edges' HTTP-01 answers, for tests that run no edge: a minimal
    HTTP server on ``port`` that answers ``/.well-known/acme-challenge/<token>`` from the
    ``acme_challenges`` table, as any edge must. ``on_answer`` runs before each answer
    found. Yields the paths it was asked for."""
    asked: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ", 2)[1].decode()
            asked.append(path)
            prefix = "/.well-known/acme-challenge/"
            found = None
            if path.startswith(prefix):
                found = await acme_store.get(pool, path.removeprefix(prefix))
            if found is None:
                status, body = "404 Not Found", b"not found\n"
            else:
                if on_answer is not None:
                    await on_answer()
                status, body = "200 OK", found.key_authorization.encode()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, IndexError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, HOST, port)
    try:
        yield asked
    finally:
        server.close()
        await server.wait_closed()
