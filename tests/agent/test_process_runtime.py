"""The ``process`` runtime with real processes, network namespaces, veth pairs and cgroups.

Root-only tests skip without root or ``ip``, but fail under ``CI=true``. Every runtime here uses
a prefix of the test's own and a random /24, so parallel runs never collide, and every test
ends by checking that nothing with its prefix is left: no namespace, link, cgroup, record,
directory or process (processes are found by a marker in their environment).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from agent.runtimes.base import Address, InstanceSpec, InstanceStatus, RuntimeFailure, Stream
from agent.runtimes.process import LINE_CAP, InstanceRecord, ProcessRuntime, instance_name
from tests.conftest import require_tool

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNIFIED = CGROUP_ROOT / "unified"

# An instance: serves its environment as JSON on $PORT (and on 127.0.0.1:$LOOP_PORT when set),
# writes to both streams (one line longer than the runtime's cap), then tries the connections
# in $PROBES ("name:host:port,...", host "gateway" is the default route's) and prints each
# result.
APP = r"""
import http.server, json, os, socket, sys, threading

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps(dict(os.environ)).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

def serve(host, port):
    server = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()

def gateway():
    for line in open("/proc/net/route").read().splitlines()[1:]:
        fields = line.split()
        if fields[1] == "00000000":
            return socket.inet_ntoa(int(fields[2], 16).to_bytes(4, "little"))

serve("", int(os.environ["PORT"]))
if "LOOP_PORT" in os.environ:
    serve("127.0.0.1", int(os.environ["LOOP_PORT"]))
print("x" * 40000, flush=True)
print("listening on", os.environ["PORT"], flush=True)
print("hello on stderr", file=sys.stderr, flush=True)
for probe in filter(None, os.environ.get("PROBES", "").split(",")):
    name, host, port = probe.split(":")
    try:
        socket.create_connection((gateway() if host == "gateway" else host, int(port)), 1).close()
        print("probe", name, "open", flush=True)
    except OSError as exc:
        print("probe", name, "closed", type(exc).__name__, flush=True)
threading.Event().wait()
"""


def require_root() -> None:
    require_tool("ip")
    if os.geteuid() != 0:
        message = "needs root (network namespaces, veth pairs, cgroups)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: the suite must run as root)")
        pytest.skip(message)


def listing(path: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in path.iterdir())
    except OSError:
        return []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


@dataclass
class Rig:
    """Runtimes sharing one state directory, prefix and subnet; the output they hand over."""

    state_dir: Path
    app: Path
    prefix: str = field(default_factory=lambda: "zt" + secrets.token_hex(2))
    mark: str = field(default_factory=lambda: secrets.token_hex(8))
    subnet: str = field(default_factory=lambda: f"10.213.{random.randrange(256)}.0/24")
    lines: list[tuple[str, Stream, str]] = field(default_factory=list)
    made: list[dict[str, Any]] = field(default_factory=list)

    def runtime(self, **options: Any) -> ProcessRuntime:
        self.made.append(options)
        options = {"prefix": self.prefix, "subnet": self.subnet, **options}
        return ProcessRuntime(self.state_dir, self.on_output, **options)

    def on_output(self, instance_id: str, stream: Stream, line: str) -> None:
        self.lines.append((instance_id, stream, line))

    def spec(self, instance_id: str, command: str, **fields: Any) -> InstanceSpec:
        env = {"ZW_TEST_MARK": self.mark, **fields.pop("env", {})}
        values: dict[str, Any] = {
            "deployment_id": "dep-1",
            "deployment_name": "app-1",
            "image": None,
            "app_port": 8080,
            "vcpu": 1.0,
            "memory_mb": 256,
            **fields,
        }
        return InstanceSpec(instance_id=instance_id, command=command, env=env, **values)

    def app_spec(self, instance_id: str, **fields: Any) -> InstanceSpec:
        return self.spec(instance_id, f"exec {sys.executable} {self.app}", **fields)

    def output(self, instance_id: str, stream: Stream | None = None) -> list[str]:
        return [line for i, s, line in self.lines if i == instance_id and stream in (None, s)]

    async def wait_output(self, instance_id: str, line: str, within: float = 10) -> None:
        await wait_until(lambda: line in self.output(instance_id), within, f"{line!r}")

    def processes(self) -> list[int]:
        """Live processes with this rig's marker in their environment."""
        marker = f"ZW_TEST_MARK={self.mark}".encode()
        found = []
        for entry in listing(Path("/proc")):
            if not entry.isdigit():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0") and alive(int(entry)):
                found.append(int(entry))
        return found

    def leftovers(self) -> list[str]:
        """Everything with this rig's prefix that still exists."""
        named = f"{self.prefix}-"
        found = [f"netns {n}" for n in listing(Path("/run/netns")) if n.startswith(named)]
        found += [f"link {n}" for n in listing(Path("/sys/class/net")) if n.startswith(named)]
        for hierarchy in [CGROUP_ROOT, *(CGROUP_ROOT / n for n in listing(CGROUP_ROOT))]:
            parent = hierarchy / f"zeitwork-{self.prefix}"
            if parent.exists():
                found.append(f"cgroup {parent}")
        found += [f"state {n}" for n in listing(self.state_dir)]
        found += [f"process {pid}" for pid in self.processes()]
        return found


async def wait_until(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"waited {within} s for {what}"
        await asyncio.sleep(0.02)


async def wait_joined(cgroup: Path, pid: int | None) -> None:
    """Wait for ``pid`` in the cgroup (its shell joins it, then execs the command)."""
    procs = cgroup / "cgroup.procs"
    await wait_until(lambda: str(pid) in procs.read_text().split(), 5, f"{pid} in {cgroup}")


async def wait_exit(runtime: ProcessRuntime, instance_id: str, within: float) -> InstanceStatus:
    deadline = time.monotonic() + within
    while (status := await runtime.status(instance_id)).state == "running":
        assert time.monotonic() < deadline, f"{instance_id} still runs after {within} s"
        await asyncio.sleep(0.02)
    return status


async def http_get(address: Address, within: float = 10) -> tuple[int, dict[str, str]]:
    """GET / (retried until the server listens); status and the JSON body."""
    deadline = time.monotonic() + within
    while True:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(address.host, address.port), 2
            )
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    try:
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def refused(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except OSError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def ip(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err


def limit_files(record: InstanceRecord) -> dict[str, str]:
    """The contents of the limit files of an instance's cgroups (v1 or v2)."""
    found: dict[str, str] = {}
    for path in map(Path, record.cgroups):
        for name in (
            "memory.max",
            "cpu.max",
            "memory.limit_in_bytes",
            "cpu.cfs_quota_us",
            "cpu.cfs_period_us",
        ):
            if (path / name).exists():
                found[name] = (path / name).read_text().strip()
    return found


def cpu_throttled(record: InstanceRecord) -> int:
    for path in map(Path, record.cgroups):
        if (path / "cpu.stat").exists():
            for line in (path / "cpu.stat").read_text().splitlines():
                key, value = line.split()
                if key == "nr_throttled":
                    return int(value)
    return 0


@pytest_asyncio.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    """A rig; afterwards every runtime's leftovers are swept and nothing may remain, and the
    loop may not have reported an error."""
    app = tmp_path / "app.py"
    app.write_text(APP)
    rig = Rig(tmp_path / "state", app)
    loop = asyncio.get_running_loop()
    loop_errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: loop_errors.append(context))
    try:
        yield rig
    finally:
        early = rig.leftovers()
        seen: list[dict[str, Any]] = []
        for options in rig.made:
            if options not in seen:
                seen.append(options)
                await rig.runtime(**options).sweep()
        loop.set_exception_handler(None)
    assert rig.leftovers() == []
    assert early == [], f"the test left {early}"
    assert loop_errors == []


@pytest.mark.asyncio
@pytest.mark.needs_tool("ip")
async def test_serves_http_in_its_namespace_with_env_and_output(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_root()
    monkeypatch.setenv("ZW_AGENT_ONLY", "not for instances")
    runtime = rig.runtime()
    assert runtime.isolated
    spec = rig.app_spec("web-1", env={"GREETING": "hello world", "PORT": "1"})
    await runtime.prepare(spec)
    address = await runtime.start(spec)
    record = runtime.record("web-1")
    assert record is not None and record.netns == instance_name(rig.prefix, "web-1")
    assert len(record.netns) <= 15
    # The first /30 of the subnet: the host side .1, the instance .2.
    network = rig.subnet.rsplit(".", 1)[0]
    assert (record.host_ip, record.instance_ip) == (f"{network}.1", f"{network}.2")
    assert address == Address(f"{network}.2", 8080) == runtime.address("web-1")

    status, env = await http_get(address)
    assert status == 200
    assert env["PORT"] == "8080" and env["GREETING"] == "hello world"
    assert env["HOME"] == record.home and env["LANG"] and env["PATH"]
    assert "ZW_AGENT_ONLY" not in env
    await rig.wait_output("web-1", "hello on stderr")
    assert rig.output("web-1", "stderr") == ["hello on stderr"]
    # The overlong line arrives cut to the cap; the next one whole.
    assert rig.output("web-1", "stdout") == ["x" * LINE_CAP, "listening on 8080"]
    assert await runtime.status("web-1") == InstanceStatus("running")

    await runtime.stop("web-1", 5)
    assert await runtime.status("web-1") == InstanceStatus("missing")
    assert runtime.address("web-1") is None and runtime.record("web-1") is None
    assert rig.leftovers() == []


@pytest.mark.asyncio
@pytest.mark.needs_tool("ip")
async def test_instances_cannot_reach_each_others_or_the_hosts_loopback(rig: Rig) -> None:
    require_root()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    host_server = await asyncio.start_server(answer, "127.0.0.1", 0)
    host_port = host_server.sockets[0].getsockname()[1]
    runtime = rig.runtime()
    try:
        a = rig.app_spec("a", env={"LOOP_PORT": "9101"})
        await runtime.prepare(a)
        a_address = await runtime.start(a)
        probes = {
            "own-loopback": "127.0.0.1:9102",
            "a-loopback-at-a": f"{a_address.host}:9101",
            "a-loopback-port": "127.0.0.1:9101",
            "host-loopback": f"127.0.0.1:{host_port}",
            "host-loopback-at-gateway": f"gateway:{host_port}",
        }
        b = rig.app_spec(
            "b",
            env={
                "LOOP_PORT": "9102",
                "PROBES": ",".join(f"{name}:{target}" for name, target in probes.items()),
            },
        )
        await runtime.prepare(b)
        b_address = await runtime.start(b)
        assert a_address.host != b_address.host

        def probed() -> dict[str, str]:
            return {
                line.split()[1]: line.split()[2]
                for line in rig.output("b", "stdout")
                if line.startswith("probe ")
            }

        await wait_until(lambda: len(probed()) == len(probes), 15, "b's probes")
        assert probed() == {
            "own-loopback": "open",  # the probe works
            "a-loopback-at-a": "closed",
            "a-loopback-port": "closed",
            "host-loopback": "closed",
            "host-loopback-at-gateway": "closed",
        }, rig.output("b")
        # The host reaches both at their addresses, but not a loopback-only server inside.
        assert (await http_get(a_address))[0] == 200
        assert (await http_get(b_address))[0] == 200
        assert await refused(a_address.host, 9101)
        assert not await refused("127.0.0.1", host_port)
    finally:
        host_server.close()
        await host_server.wait_closed()
        await runtime.stop("a", 2)
        await runtime.stop("b", 2)
    assert rig.leftovers() == []


@pytest.mark.asyncio
@pytest.mark.needs_tool("ip")
async def test_memory_and_cpu_limits_in_the_cgroup(rig: Rig) -> None:
    require_root()
    runtime = rig.runtime()
    busy = rig.spec("busy", "while :; do :; done", vcpu=0.1, memory_mb=64)
    hog = rig.spec(
        "hog",
        f"{sys.executable} -c 'import time; b = b\"x\" * (256 << 20); time.sleep(30)'",
        memory_mb=32,
    )
    try:
        await runtime.prepare(busy)
        await runtime.start(busy)
        record = runtime.record("busy")
        assert record is not None
        if not record.cgroups:
            pytest.skip("this kernel offers no writable cgroups")
        for path in record.cgroups:
            await wait_joined(Path(path), record.pid)
        files = limit_files(record)
        if "memory" in record.limits:
            memory = files.get("memory.max") or files["memory.limit_in_bytes"]
            assert memory == str(64 << 20)
        if "cpu" in record.limits:
            if record.cgroup_version == 2:
                assert files["cpu.max"] == "10000 100000"
            else:
                assert (files["cpu.cfs_quota_us"], files["cpu.cfs_period_us"]) == (
                    "10000",
                    "100000",
                )
            # A busy loop at 0.1 vCPU is throttled within a few periods.
            await wait_until(lambda: cpu_throttled(record) > 0, 5, "CPU throttling")
        if "memory" not in record.limits:
            pytest.skip(f"no memory controller here (limits applied: {record.limits})")

        await runtime.prepare(hog)
        await runtime.start(hog)
        status = await wait_exit(runtime, "hog", 15)
        # Killed by the OOM killer: SIGKILL, seen directly or through the shell.
        assert status == InstanceStatus("exited", -9) or status == InstanceStatus("exited", 137)
    finally:
        await runtime.stop("busy", 1)
        await runtime.stop("hog", 1)
    assert rig.leftovers() == []


@pytest.mark.asyncio
@pytest.mark.needs_tool("ip")
async def test_cgroup_v2_without_controllers_still_holds_and_cleans_up(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """On a hybrid host the unified hierarchy (v2, no controllers) stands in for a v2 host
    that delegates none: the cgroup still holds the instance; the missing limits are logged
    once."""
    require_root()
    if (CGROUP_ROOT / "cgroup.controllers").exists() or not (
        UNIFIED / "cgroup.controllers"
    ).exists():
        pytest.skip("no hybrid hierarchy here (a pure v2 host runs the v2 path everywhere)")
    caplog.set_level(logging.WARNING, "agent.runtime")
    runtime = rig.runtime(cgroup_root=UNIFIED)
    first, second = rig.spec("v2-a", "sleep 30"), rig.spec("v2-b", "sleep 30")
    for spec in (first, second):
        await runtime.prepare(spec)
        await runtime.start(spec)
    record = runtime.record("v2-a")
    assert record is not None and record.cgroup_version == 2
    leaf = UNIFIED / f"zeitwork-{rig.prefix}" / record.name
    assert record.cgroups == (str(leaf),)
    await wait_joined(leaf, record.pid)
    offered = set((UNIFIED / "cgroup.controllers").read_text().split())
    assert set(record.limits) == {"memory", "cpu"} & offered
    if set(record.limits) != {"memory", "cpu"}:
        warnings = [r.message for r in caplog.records if "limits are not applied" in r.message]
        assert len(warnings) == 1, warnings
    await runtime.stop("v2-a", 1)
    assert not leaf.exists() and (UNIFIED / f"zeitwork-{rig.prefix}").exists()
    await runtime.stop("v2-b", 1)
    # The last instance takes the runtime's parent cgroup with it.
    assert rig.leftovers() == []


@pytest.mark.asyncio
@pytest.mark.needs_tool("ip")
async def test_stop_sends_sigterm_then_sigkill_and_leaves_nothing(rig: Rig) -> None:
    require_root()
    runtime = rig.runtime()
    polite = rig.spec(
        "polite",
        "trap 'echo got TERM; exit 3' TERM; echo ready; while :; do sleep 0.05; done",
    )
    stubborn = rig.spec("stubborn", "trap '' TERM; echo ready; while :; do sleep 0.05; done")
    quitter = rig.spec("quitter", "echo bye; exit 7")
    for spec in (polite, stubborn, quitter):
        await runtime.prepare(spec)
        await runtime.start(spec)
    await rig.wait_output("polite", "ready")
    await rig.wait_output("stubborn", "ready")
    assert await wait_exit(runtime, "quitter", 10) == InstanceStatus("exited", 7)
    pids = [r.pid for r in map(runtime.record, ("polite", "stubborn")) if r is not None]
    records = [runtime.record(i) for i in ("polite", "stubborn", "quitter")]
    assert all(r is not None and r.netns and r.host_link for r in records)

    started = time.monotonic()
    await runtime.stop("polite", 5)
    assert time.monotonic() - started < 2
    assert rig.output("polite", "stdout") == ["ready", "got TERM"]

    started = time.monotonic()
    await runtime.stop("stubborn", 0.6)
    assert 0.6 <= time.monotonic() - started < 3
    await runtime.stop("quitter", 5)
    assert rig.output("quitter") == ["bye"]
    assert not any(alive(pid) for pid in pids if pid is not None)
    assert rig.leftovers() == []
    # Stopping again, or something never started, is not an error.
    await runtime.stop("polite", 1)
    await runtime.stop("never-there", 1)


@pytest.mark.asyncio
@pytest.mark.needs_tool("ip")
async def test_sweep_after_a_crash_kills_only_what_was_the_instances(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    require_root()
    caplog.set_level(logging.INFO, "agent.runtime")
    crashed = rig.runtime()
    for instance_id in ("left-a", "left-b"):
        spec = rig.app_spec(instance_id)
        await crashed.prepare(spec)
        await crashed.start(spec)
        await rig.wait_output(instance_id, "hello on stderr")
    # Things with the prefix no record names (a run that crashed while preparing).
    await ip("netns", "add", f"{rig.prefix}-0000beef")
    await ip(
        "link", "add", f"{rig.prefix}-0000feed", "type", "veth", "peer", f"{rig.prefix}-0000f00d"
    )
    record_a = crashed.record("left-a")
    assert record_a is not None
    if record_a.cgroups:
        (Path(record_a.cgroups[0]).parent / f"{rig.prefix}-0000cafe").mkdir()
    (rig.state_dir / f"{rig.prefix}-0000abcd").mkdir()
    # The pid in a record now belongs to an unrelated process.
    unrelated = await asyncio.create_subprocess_exec("sleep", "30", start_new_session=True)
    try:
        record_file = rig.state_dir / f"{record_a.name}.json"
        saved = json.loads(record_file.read_text())
        saved["pid"] = saved["pgid"] = unrelated.pid
        record_file.write_text(json.dumps(saved))

        restarted = rig.runtime()
        # Stopping an instance only a record knows releases it (before any sweep) ...
        await restarted.stop("left-b", 1)
        assert not (rig.state_dir / f"{instance_name(rig.prefix, 'left-b')}.json").exists()
        # ... and the sweep takes the rest.
        assert await restarted.sweep() == ["left-a"]
        assert alive(unrelated.pid)
        assert f"pid {unrelated.pid} of left-a is now another process's" in caplog.text
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert rig.leftovers() == []
        assert await restarted.sweep() == []
        # The crashed runtime's view: killed; stopping them is no error.
        for instance_id in ("left-a", "left-b"):
            assert await wait_exit(crashed, instance_id, 5) == InstanceStatus("exited", -9)
            await crashed.stop(instance_id, 1)
        assert alive(unrelated.pid)
    finally:
        unrelated.kill()
        await unrelated.wait()
    assert rig.leftovers() == []


@pytest.mark.asyncio
@pytest.mark.needs_tool("ip")
async def test_address_pool_is_deterministic_and_refuses_when_exhausted(rig: Rig) -> None:
    require_root()
    network = rig.subnet.rsplit(".", 1)[0]
    runtime = rig.runtime(subnet=f"{network}.0/29")  # two /30s
    specs = [rig.spec(f"pool-{n}", "sleep 30") for n in range(3)]
    await runtime.prepare(specs[0])
    await runtime.prepare(specs[1])
    with pytest.raises(RuntimeFailure, match=r"all 2 /30 slots of .*/29 are in use"):
        await runtime.prepare(specs[2])
    first = runtime.record("pool-0")
    assert first is not None and first.instance_ip == f"{network}.2"
    assert [r.instance_ip for r in map(runtime.record, ["pool-1"]) if r] == [f"{network}.6"]
    await runtime.stop("pool-0", 1)
    await runtime.prepare(specs[2])
    third = runtime.record("pool-2")
    assert third is not None and third.instance_ip == f"{network}.2"
    for spec in specs[1:]:
        await runtime.stop(spec.instance_id, 1)
    assert rig.leftovers() == []


@pytest.mark.asyncio
@pytest.mark.needs_tool("ip")
async def test_failing_ip_call_is_a_clear_failure_and_releases_what_was_made(rig: Rig) -> None:
    require_root()
    runtime = rig.runtime()
    name = instance_name(rig.prefix, "clash")
    await ip("netns", "add", name)  # not the runtime's: it must not be deleted
    try:
        with pytest.raises(RuntimeFailure) as failure:
            await runtime.prepare(rig.spec("clash", "sleep 30"))
        message = str(failure.value)
        assert f"prepare clash: `ip netns add {name}` failed (exit 1)" in message
        assert "File exists" in message
        assert runtime.record("clash") is None
        assert rig.leftovers() == [f"netns {name}"]
        # Its address slot went back to the pool.
        await runtime.prepare(rig.spec("next", "sleep 30"))
        record = runtime.record("next")
        assert record is not None and record.slot == 0
        await runtime.stop("next", 1)
    finally:
        await ip("netns", "del", name)
    assert rig.leftovers() == []


@pytest.mark.asyncio
async def test_without_isolation_localhost_and_a_free_port(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "agent.runtime")
    runtime = rig.runtime(isolate=False)
    assert not runtime.isolated
    assert [r.message for r in caplog.records] == [
        "process runtime: isolation is turned off; instances run as plain processes on"
        " 127.0.0.1 ports, without network namespaces or cgroup limits, and can reach each other"
    ]
    addresses = []
    for instance_id in ("plain-a", "plain-b"):
        spec = rig.app_spec(instance_id)
        await runtime.prepare(spec)
        address = await runtime.start(spec)
        assert address.host == "127.0.0.1"
        status, env = await http_get(address)
        assert status == 200 and env["PORT"] == str(address.port)
        addresses.append(address)
        record = runtime.record(instance_id)
        assert record is not None and record.netns is None and record.cgroups == ()
    assert addresses[0].port != addresses[1].port
    await runtime.stop("plain-a", 2)
    await runtime.stop("plain-b", 2)
    assert rig.leftovers() == []


@pytest.mark.asyncio
async def test_without_root_falls_back_and_says_why(
    rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, "agent.runtime")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert not rig.runtime().isolated
    assert "not running as root (euid 1000)" in caplog.text
    with pytest.raises(RuntimeFailure, match="isolation needs root"):
        ProcessRuntime(rig.state_dir, rig.on_output, isolate=True, prefix=rig.prefix)


@pytest.mark.asyncio
async def test_image_only_and_unprepared_instances_are_refused(rig: Rig) -> None:
    runtime = rig.runtime(isolate=False)
    image_only = InstanceSpec("img-1", "dep-1", "app-1", None, "ghcr.io/acme/app:1", 8080, 1, 256)
    for attempt in (runtime.prepare, runtime.start):
        with pytest.raises(RuntimeFailure, match="the process runtime runs commands only"):
            await attempt(image_only)
    with pytest.raises(RuntimeFailure, match="not prepared"):
        await runtime.start(rig.spec("unprepared", "sleep 1"))
    assert await runtime.status("img-1") == InstanceStatus("missing")
    assert rig.leftovers() == []
