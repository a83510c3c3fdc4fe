"""testssl.sh against the edge's HTTPS listener: protocols, cipher categories and the known
vulnerabilities it checks for (the slow server-defaults and client-simulation runs are left
out). The edge presents an RSA certificate here, so the checks of RSA key exchange (ROBOT,
DROWN) have something to look at."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.harness import HOST, free_port
from tests.integration import test_process as integration
from tests.integration.test_process import StartEdge, ThreadUpstream
from tests.tls.certs import CA
from tests.tls.conftest import https_args

APP = "app.zeitwork.app"

edge = integration.edge
upstream = integration.upstream

# Each must be in the report (so a changed testssl cannot pass by saying nothing).
PROTOCOLS = {"SSLv2", "SSLv3", "TLS1", "TLS1_1", "TLS1_2", "TLS1_3"}
WEAK_CIPHERS = {
    "cipherlist_NULL",
    "cipherlist_aNULL",
    "cipherlist_EXPORT",
    "cipherlist_LOW",  # 64-bit, DES, RC2, RC4
    "cipherlist_3DES_IDEA",
    "cipherlist_AVERAGE",  # obsolete CBC suites
}
VULNERABILITIES = {
    "heartbleed",
    "CCS",
    "ticketbleed",
    "ROBOT",
    "secure_renego",
    "secure_client_renego",
    "CRIME_TLS",
    "BREACH",
    "POODLE_SSL",
    "fallback_SCSV",
    "SWEET32",
    "FREAK",
    "DROWN",
    "LOGJAM",
    "BEAST",
    "LUCKY13",
    "RC4",
}
ACCEPTABLE = {"OK", "INFO", "LOW"}


def _testssl() -> str:
    return shutil.which("testssl.sh") or shutil.which("testssl") or require_tool("testssl.sh")


# Findings about testssl's own tools, not the server: an OpenSSL built without engines
# (Debian's current one) only means testssl cannot try GOST suites on any server.
ABOUT_THE_SCANNER = frozenset({"engine_problem"})


@pytest.mark.needs_tool("testssl.sh")
def test_testssl_finds_only_modern_tls_and_no_vulnerability(
    edge: StartEdge, upstream: ThreadUpstream, ca: CA, tmp_path: Path
) -> None:
    testssl = _testssl()
    cert_file, key_file = ca.issue(APP, rsa_bits=2048).write(tmp_path)
    https = free_port()
    edge(
        {APP: [upstream.address]},
        *https_args(https, cert_file, key_file),
    )
    report = tmp_path / "testssl.json"
    started = time.monotonic()
    done = subprocess.run(
        [
            testssl,
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            "--protocols",
            "--std",
            "--vulnerable",
            "--jsonfile",
            str(report),
            # The name is the SNI sent; it is reached at the loopback address.
            "--ip",
            HOST,
            f"{APP}:{https}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    took = time.monotonic() - started
    assert report.exists(), f"testssl exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    findings = {f["id"]: f for f in json.loads(report.read_text())}
    output = done.stdout

    missing = (PROTOCOLS | WEAK_CIPHERS | VULNERABILITIES) - set(findings)
    assert not missing, f"not in the report: {sorted(missing)}\n{output}"
    for protocol in ("SSLv2", "SSLv3", "TLS1", "TLS1_1"):
        assert findings[protocol]["finding"].startswith("not offered"), findings[protocol]
    for protocol in ("TLS1_2", "TLS1_3"):
        assert findings[protocol]["finding"].startswith("offered"), findings[protocol]
    for category in WEAK_CIPHERS:
        assert findings[category]["finding"] == "not offered", findings[category]
    assert findings["cipherlist_STRONG"]["finding"] == "offered"
    assert findings["ALPN"]["finding"] == "http/1.1"
    for name in VULNERABILITIES:
        assert findings[name]["severity"] == "OK", findings[name]
    worse = [
        f
        for f in findings.values()
        if f["severity"] not in ACCEPTABLE and f["id"] not in ABOUT_THE_SCANNER
    ]
    assert not worse, f"{worse}\n{output}"
    assert took < 90, f"testssl took {took:.0f}s"
