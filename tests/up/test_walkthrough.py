"""The README's walkthrough, run as written against ``./scripts/up``.

``./scripts/up`` starts the whole platform (``zeitwork up``: embedded PostgreSQL, edge,
admin API, scheduler, one local agent running real processes) on the README's ports; the
shell blocks of the README's "Try it" section then run unchanged, in order, in one bash
session (as a newcomer pastes them into one terminal), and each block's output is checked.
Then Ctrl-C, as in the README: everything stops, and nothing is left running.

Its state goes to a temporary directory through ``$XDG_DATA_HOME``, which ``zeitwork`` reads
for its default data directory; the ports are the README's own (8000, 8080, 8081), so the test
fails clearly when another process holds one.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PORTS = (8000, 8443, 8080, 8081)
START_TIMEOUT = 180.0
WALK_TIMEOUT = 240.0
MARK = "@@block"


def readme_blocks() -> list[str]:
    """The ``sh`` blocks of the README's "Try it" section, in order."""
    text = README.read_text()
    section = text.split("\n## Try it", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)


def test_the_readme_has_the_walkthrough() -> None:
    blocks = readme_blocks()
    assert len(blocks) == 5, blocks
    assert blocks[0].startswith("source .venv/bin/activate\nTOKEN=$(zeitwork admin-token)")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_for_banner(log: Path, up: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while "Zeitwork is up." not in log.read_text(errors="replace"):
        if up.poll() is not None:
            raise AssertionError(f"zeitwork up exited with {up.returncode}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"zeitwork up did not come up:\n{log.read_text()}")
        time.sleep(0.2)


def _run_blocks(blocks: list[str], env: dict[str, str]) -> list[list[str]]:
    """Every block in one bash session; each block's output lines."""
    script = ["set -e -o pipefail"]
    for n, block in enumerate(blocks):
        script.append(f"echo '{MARK} {n}'")
        script.append(block)
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=WALK_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    outputs: list[list[str]] = []
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            outputs.append([])
        else:
            outputs[-1].append(line)
    assert len(outputs) == len(blocks), done.stdout
    return outputs


def test_readme_walkthrough(tmp_path: Path) -> None:
    require_tool("curl")
    require_tool("jq")
    promtool = require_tool("promtool")
    taken = [port for port in PORTS if not _port_free(port)]
    assert not taken, f"the README's ports {taken} are in use: stop what holds them"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "VIRTUAL_ENV")}
    env["XDG_DATA_HOME"] = str(tmp_path / "data")
    env.pop("ZEITWORK_ADMIN_TOKEN", None)
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        up = subprocess.Popen(
            ["./scripts/up"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_for_banner(log, up)
        outputs = _run_blocks(readme_blocks(), env)
        setup, project, first, second, rollback = outputs
        assert setup == []
        assert project == ["demo/hello"]
        name = r"hello-[a-z0-9]{7}-demo"
        v1 = first[0].removesuffix(" is active")
        assert re.fullmatch(name, v1), first
        assert first == [f"{v1} is active", "hello from v1", "hello from v1"]
        v2 = second[0].removesuffix(" is active")
        assert re.fullmatch(name, v2) and v2 != v1, second
        assert second == [f"{v2} is active", "hello from v2", v2, "draining"]
        assert rollback == [v1, v1, "draining"]

        token = (tmp_path / "data" / "zeitwork" / "admin-token").read_text().strip()
        # The agent shipped the instances' output: http.server logs each request on stderr.
        lines = _admin(f"/api/v1/deployments/{v1}/logs", token)["lines"]
        assert any('"GET / HTTP/1.1" 200' in entry["line"] for entry in lines), lines
        # The agent's own endpoints, and its scrape passes promtool.
        agent = json.loads(_get("http://127.0.0.1:8081/health"))
        assert agent["status"] == "ok" and agent["healthy_instances"] == 2, agent
        metrics = _get("http://127.0.0.1:8081/metrics")
        assert "zeitwork_instance_boot_seconds_bucket" in metrics
        check = subprocess.run(
            [promtool, "check", "metrics"],
            input=metrics,
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0 and not check.stdout.strip(), check
    finally:
        # Ctrl-C, as in the README.
        if up.poll() is None:
            os.kill(up.pid, signal.SIGINT)
        try:
            code = up.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            raise
    output = log.read_text(errors="replace")
    assert code == 0, output
    assert output.rstrip().endswith("stopped"), output
    assert "instance" in output and "stopped" in output
    # Nothing left running: no app process, nothing on the README's ports.
    leftovers = subprocess.run(
        ["pgrep", "-f", "python3 -m http.server"], capture_output=True, text=True, check=False
    )
    assert leftovers.stdout.strip() == "", leftovers.stdout
    assert all(_port_free(port) for port in PORTS)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())


def _admin(path: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:8080{path}")
    request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as answer:
        found: dict[str, Any] = json.loads(answer.read())
    return found


pytestmark = pytest.mark.timeout(600)
