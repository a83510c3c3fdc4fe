"""The real ``zeitwork edge`` with HTTPS: certificates replaced in the database and in the
files under steady TLS traffic with no failed request, bad files refused with one error,
plain HTTP's redirect, ACME challenges and HSTS from the database, and the handshake
metrics on the admin port."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped, unused-ignore]
import pytest
from prometheus_client.parser import text_string_to_metric_families

from edge import leader
from tests.harness import HOST, free_port
from tests.integration import test_process as integration
from tests.integration.test_process import (
    EdgeProcess,
    StartEdge,
    ThreadUpstream,
    run_edge_command,
    wait_for,
    zeitwork_command,
)
from tests.live_routes.seed import Seed
from tests.tls.certs import CA, Leaf
from tests.tls.conftest import https_args
from tests.tls.traffic import SteadyTraffic, fetch_fresh

APP = "app.zeitwork.app"
CUSTOMER = "app.customer.org"

# The integration tests' fixtures: `zeitwork edge` from a routes file, a threaded upstream.
edge = integration.edge
upstream = integration.upstream


def replace_files(leaf: Leaf, cert_file: Path, key_file: Path) -> None:
    """Put a new pair in place as an operator's copy would: each file replaced in one step,
    the certificate first."""
    staged_cert, staged_key = leaf.write(cert_file.parent, "staged")
    os.replace(staged_cert, cert_file)
    os.replace(staged_key, key_file)


def switched(traffic: SteadyTraffic, since: float, serial: int, count: int = 12) -> bool:
    """Whether the last ``count`` new handshakes after ``since`` all got ``serial`` (with
    two workers, new connections land on either)."""
    seen = traffic.serials_since(since)
    return len(seen) >= count and set(seen[-count:]) == {serial}


# -- from the files ------------------------------------------------------------------------


def test_certificate_files_replaced_under_traffic(
    edge: StartEdge, upstream: ThreadUpstream, ca: CA, tmp_path: Path
) -> None:
    old, new, newest = (ca.issue(f"*.{APP.partition('.')[2]}") for _ in range(3))
    cert_file, key_file = old.write(tmp_path)
    https = free_port()
    process = edge(
        {APP: [upstream.address]},
        *https_args(https, cert_file, key_file),
        "--no-https-redirect",
        workers=2,
    )
    ctx = ca.client_context()
    assert fetch_fresh(https, APP, ctx).serial == old.serial
    with SteadyTraffic(https, APP, ctx) as traffic:
        time.sleep(0.3)
        since = time.monotonic()
        replace_files(new, cert_file, key_file)
        process.signal(signal.SIGHUP)
        wait_for(lambda: switched(traffic, since, new.serial), 5, "the new certificate (SIGHUP)")
        # Without a signal: the master notices the files within a few seconds.
        since = time.monotonic()
        replace_files(newest, cert_file, key_file)
        wait_for(lambda: switched(traffic, since, newest.serial), 8, "the files to be noticed")
        time.sleep(0.2)
    assert traffic.failures == []
    assert traffic.kept_ok > 0
    # The kept-alive connections went on with the certificate they started with.
    assert traffic.kept_serials == {old.serial}
    log = process.log()
    assert log.count("TLS certificate reloaded in every worker") == 2, log
    assert "Traceback" not in log


def test_bad_certificate_files_keep_the_current_one(
    edge: StartEdge, upstream: ThreadUpstream, ca: CA, tmp_path: Path
) -> None:
    current = ca.issue(APP)
    cert_file, key_file = current.write(tmp_path)
    https = free_port()
    process = edge(
        {APP: [upstream.address]},
        *https_args(https, cert_file, key_file),
        workers=2,
    )
    ctx = ca.client_context()
    refused = "new TLS certificate files are invalid, workers keep the current"
    cert_file.write_bytes(b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    wait_for(lambda: refused in process.log(), 6, "the error about the bad file")
    time.sleep(2.5)  # several more looks at the files: still one error
    assert process.log().count(refused) == 1, process.log()
    for _ in range(6):
        assert fetch_fresh(https, APP, ctx).serial == current.serial
    # Asked for explicitly, the reload says it again; a key of another certificate is
    # refused the same way.
    other = ca.issue(APP)
    staged, _ = other.write(tmp_path, "staged")
    os.replace(staged, cert_file)
    process.signal(signal.SIGHUP)
    wait_for(lambda: process.log().count(refused) == 2, 5, "the error about the key")
    assert "does not belong to the certificate" in process.log()
    assert fetch_fresh(https, APP, ctx).serial == current.serial
    # Fixed: loaded.
    replace_files(other, cert_file, key_file)
    process.signal(signal.SIGHUP)

    def renewed() -> bool:
        return all(fetch_fresh(https, APP, ctx).serial == other.serial for _ in range(8))

    wait_for(renewed, 5, "the fixed certificate")
    log = process.log()
    assert "TLS certificate files not loaded" not in log  # no worker ever saw a bad file
    assert "Traceback" not in log
    assert process.proc.poll() is None


def test_a_bad_certificate_at_start_exits_2(ca: CA, tmp_path: Path) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text('{"routes": {}}')
    cert_file, _ = ca.issue(APP).write(tmp_path)
    _, other_key = ca.issue(APP).write(tmp_path, "other")
    done = run_edge_command(
        "--routes", str(routes), "--tls-cert", str(cert_file), "--tls-key", str(other_key)
    )
    assert done.returncode == 2
    err = done.stderr.decode()
    assert err.startswith("zeitwork edge: error: "), err
    assert "the private key does not belong to the certificate" in err
    done = run_edge_command("--routes", str(routes), "--tls-cert", str(cert_file))
    assert done.returncode == 2
    assert "needs its key file" in done.stderr.decode()


# -- from the database ---------------------------------------------------------------------


@dataclass
class DatabaseEdge:
    process: EdgeProcess
    url: str
    http_port: int
    https_port: int
    admin_port: int

    def sql(self, statement: str, *args: Any) -> Any:
        async def run() -> Any:
            conn = await asyncpg.connect(self.url)
            try:
                return await conn.fetchval(statement, *args)
            finally:
                await conn.close()

        return asyncio.run(run())

    def seed_app(self, instance_port: int) -> tuple[str, Any, Any]:
        """A project with a running deployment served by ``instance_port``; its deployment
        host, project and environment ids."""

        async def run() -> tuple[str, Any, Any]:
            conn = await asyncpg.connect(self.url)
            try:
                seed = await Seed.create(conn)
                project, environment, deployment, nano = await seed.app()
                await seed.instance(deployment, port=instance_port)
                return f"web-{nano}-acme.zeitwork.app", project, environment
            finally:
                await conn.close()

        return asyncio.run(run())


StartDatabaseEdge = Callable[..., DatabaseEdge]


@contextlib.contextmanager
def leadership_held(url: str) -> Iterator[None]:
    """Hold the leader lock from the test while the block runs, so the edge never leads and
    its scheduler leaves the seeded instances (which have no node) alone."""
    ready, stop = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    async def hold() -> None:
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", leader.KEY)
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
        finally:
            await conn.close()

    def run() -> None:
        try:
            asyncio.run(hold())
        except BaseException as exc:
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert ready.wait(10) and not errors, errors
        yield
    finally:
        stop.set()
        thread.join(10)


@pytest.fixture
def database_edge(empty_database_url: str, tmp_path: Path) -> Iterator[StartDatabaseEdge]:
    """``database_edge(*flags)``: ``zeitwork edge`` with two workers on the test's own
    database (migrated by the edge), HTTPS on, the admin API on a port of its own, and
    another holder of the leader lock."""
    started: list[EdgeProcess] = []

    def start(*flags: str) -> DatabaseEdge:
        http, https, admin = free_port(), free_port(), free_port()
        log_path = tmp_path / f"edge-{len(started)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    *zeitwork_command(),
                    "edge",
                    "--database-url",
                    empty_database_url,
                    "--host",
                    HOST,
                    "--http-port",
                    str(http),
                    "--https-port",
                    str(https),
                    "--workers",
                    "2",
                    "--admin-host",
                    HOST,
                    "--admin-port",
                    str(admin),
                    "--data-dir",
                    str(tmp_path / "data"),
                    *flags,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
            )
        process = EdgeProcess(proc, http, tmp_path / "unused.json", log_path, 2)
        started.append(process)
        process.wait_serving()
        return DatabaseEdge(process, empty_database_url, http, https, admin)

    with leadership_held(empty_database_url):
        try:
            yield start
        finally:
            for process in started:
                process.kill_everything()


def test_database_certificate_replaced_under_traffic(
    database_edge: StartDatabaseEdge, upstream: ThreadUpstream, ca: CA, tmp_path: Path
) -> None:
    cert_file, key_file = ca.issue(f"*.{APP.partition('.')[2]}").write(tmp_path)
    running = database_edge("--tls-cert", str(cert_file), "--tls-key", str(key_file))
    _, project, environment = running.seed_app(upstream.server.server_address[1])
    running.sql(
        "INSERT INTO domains (name, project_id, environment_id, verification_token,"
        " verified_at) VALUES ($1, $2, $3, 'token', now())",
        CUSTOMER,
        project,
        environment,
    )
    store = (
        "INSERT INTO certificates (domain, cert_pem, key_encrypted, not_before, not_after)"
        " VALUES ($1, $2, $3, now(), now() + interval '30 days') ON CONFLICT (domain) DO"
        " UPDATE SET cert_pem = excluded.cert_pem, key_encrypted = excluded.key_encrypted,"
        " created_at = now()"
    )
    first, renewed = ca.issue(CUSTOMER), ca.issue(CUSTOMER)
    running.sql(store, CUSTOMER, first.cert_pem.decode(), first.key_pem)
    ctx = ca.client_context()

    def serving(leaf: Leaf) -> bool:
        try:
            fresh = [fetch_fresh(running.https_port, CUSTOMER, ctx) for _ in range(8)]
        except OSError:
            return False
        return all(f.status == 200 and f.serial == leaf.serial for f in fresh)

    wait_for(lambda: serving(first), 5, "the domain's certificate in both workers")
    with SteadyTraffic(running.https_port, CUSTOMER, ctx) as traffic:
        time.sleep(0.3)
        since = time.monotonic()
        running.sql(store, CUSTOMER, renewed.cert_pem.decode(), renewed.key_pem)
        wait_for(lambda: switched(traffic, since, renewed.serial), 5, "the renewed certificate")
        took = min(at for at, serial in traffic.handshakes if serial == renewed.serial) - since
        time.sleep(0.2)
    assert traffic.failures == []
    assert traffic.kept_ok > 0 and traffic.kept_serials == {first.serial}
    assert took < 1.0, took  # a notification and a debounce, not the periodic reload
    assert "Traceback" not in running.process.log()


def _plain(port: int, host: str, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_redirect_challenges_hsts_and_metrics(
    database_edge: StartDatabaseEdge, upstream: ThreadUpstream, ca: CA, tmp_path: Path
) -> None:
    cert_file, key_file = ca.issue(f"*.{APP.partition('.')[2]}").write(tmp_path)
    running = database_edge("--tls-cert", str(cert_file), "--tls-key", str(key_file))
    host, project, _ = running.seed_app(upstream.server.server_address[1])
    ctx = ca.client_context()
    wait_for(lambda: fetch_fresh(running.https_port, host, ctx).status == 200, 5, "the route")

    status, headers, _ = _plain(running.http_port, host, "/some/where?x=1")
    assert status == 308
    assert headers["location"] == f"https://{host}:{running.https_port}/some/where?x=1"

    challenge = "/.well-known/acme-challenge/tok_123"
    assert _plain(running.http_port, CUSTOMER, challenge)[0] == 404
    running.sql(
        "INSERT INTO acme_challenges (token, key_authorization, domain, expires_at)"
        " VALUES ('tok_123', 'tok_123.thumb', $1, now() + interval '1 minute')",
        CUSTOMER,
    )

    def answered(expected: int) -> bool:
        # Both workers: several new connections in a row.
        return all(_plain(running.http_port, CUSTOMER, challenge)[0] == expected for _ in range(8))

    wait_for(lambda: answered(200), 5, "the challenge in both workers")
    assert _plain(running.http_port, CUSTOMER, challenge)[2] == b"tok_123.thumb"
    running.sql("DELETE FROM acme_challenges")
    wait_for(lambda: answered(404), 5, "the challenge to be gone")

    assert "strict-transport-security" not in fetch_fresh(running.https_port, host, ctx).headers
    running.sql("UPDATE projects SET hsts_max_age = 600 WHERE id = $1", project)

    def hsts() -> bool:
        return all(
            fetch_fresh(running.https_port, host, ctx).headers.get("strict-transport-security")
            == "max-age=600"
            for _ in range(8)
        )

    wait_for(hsts, 5, "the HSTS header")

    # A plain HTTP request to the HTTPS port fails its handshake: counted as a protocol error.
    with socket.create_connection((HOST, running.https_port), timeout=5) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        sock.recv(100)

    def scraped() -> dict[str, float]:
        with urllib.request.urlopen(f"http://{HOST}:{running.admin_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {
            s.name + "".join(f"{{{v}}}" for v in s.labels.values()): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name.startswith("zeitwork_tls_")
        }

    def published(samples: dict[str, float]) -> bool:
        # Each worker publishes its counts about once a second, each on its own tick.
        return (
            samples.get("zeitwork_tls_handshake_failures_total{protocol}", 0) >= 1
            and samples.get("zeitwork_tls_handshakes_total", 0) >= 10
        )

    wait_for(lambda: published(scraped()), 5, "the handshakes in the metrics")
    samples = scraped()
    assert samples["zeitwork_tls_handshakes_total"] >= 10, samples
    assert set(samples) == {"zeitwork_tls_handshakes_total"} | {
        f"zeitwork_tls_handshake_failures_total{{{reason}}}"
        for reason in ("timeout", "protocol", "no_certificate", "closed", "other")
    }
    assert "Traceback" not in running.process.log()
