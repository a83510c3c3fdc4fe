"""The ``process`` runtime: an instance is the deployment's command run by ``/bin/sh -c``.

As root each instance is isolated: its own network namespace ``<prefix>-<hash8>`` (the hash of
the instance id keeps the name under Linux's 15-character limit for interfaces), joined to the
host by a veth pair. The host side (named like the namespace) holds ``.1`` of a /30 taken from
the runtime's subnet, the instance side ``eth0`` holds ``.2`` and routes by default via ``.1``;
the instance's ``lo`` is its own, so instances cannot reach each other's loopback. Memory and
CPU limits go into a cgroup ``zeitwork-<prefix>/<name>`` (cgroup v2 under the unified root, v1
under the ``memory`` and ``cpu`` hierarchies) where the controllers are writable; the cgroup
also holds every process of the instance, so stopping it leaves nothing behind. Without root
instances are plain processes on free ``127.0.0.1`` ports (logged once).

Limits: there is no NAT or forwarding, so instances reach nothing beyond the host; the host's
services bound to all addresses are reachable from an instance through its ``.1``. Without
isolation, processes that leave their process group are only found again while the agent runs.

Every instance has a JSON record in the state directory (pid and its start time, namespace,
link, cgroups, address slot) so that ``sweep`` finds what a previous agent run left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.runtimes.base import (
    Address,
    InstanceSpec,
    InstanceStatus,
    OutputCallback,
    RuntimeFailure,
    Stream,
)

log = logging.getLogger("agent.runtime")

DEFAULT_SUBNET = "10.203.0.0/16"
DEFAULT_PREFIX = "zw"
# Lines longer than this reach on_output cut to this many bytes; the rest is dropped.
LINE_CAP = 16 * 1024
CPU_PERIOD_US = 100_000
IP_TIMEOUT = 10.0
# How long killed processes get to disappear (they cannot ignore SIGKILL, so only the kernel's
# own latency counts) and a stopped instance's pipes to reach end of file.
KILL_WAIT = 5.0
OUTPUT_DRAIN = 1.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NETNS_DIR = Path("/run/netns")
NET_CLASS_DIR = Path("/sys/class/net")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Inside a namespace the veth end needs no unique name.
INSTANCE_LINK = "eth0"

_PREFIX = re.compile(r"[a-z][a-z0-9]{0,5}")
# Joins the cgroups given before "--", then execs the rest: the process is in its cgroups
# before the instance's command runs, so nothing it forks escapes them.
_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


def instance_name(prefix: str, instance_id: str) -> str:
    """The name of an instance's namespace, host link, cgroup and record (15 chars at most)."""
    return f"{prefix}-{hashlib.sha256(instance_id.encode()).hexdigest()[:8]}"


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """What the runtime holds for one instance; saved as JSON for ``sweep``."""

    instance_id: str
    name: str
    home: str
    netns: str | None = None
    host_link: str | None = None
    slot: int | None = None
    host_ip: str | None = None
    instance_ip: str | None = None
    cgroup_version: int | None = None
    cgroups: tuple[str, ...] = ()
    # The limits actually written ("memory", "cpu").
    limits: tuple[str, ...] = ()
    pid: int | None = None
    pgid: int | None = None
    # Field 22 of /proc/<pid>/stat: tells the instance's process from a later one with its pid.
    start_time: int | None = None
    port: int | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> InstanceRecord:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        data["cgroups"] = tuple(data.get("cgroups", ()))
        data["limits"] = tuple(data.get("limits", ()))
        record = cls(**data)
        if not isinstance(record.instance_id, str) or not isinstance(record.name, str):
            raise ValueError("no instance id or name")
        return record


@dataclass(slots=True, eq=False)
class _Instance:
    record: InstanceRecord
    proc: asyncio.subprocess.Process | None = None
    address: Address | None = None
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    stopping: asyncio.Task[None] | None = None


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time) of a live or zombie process; None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[2]), int(fields[19])


def _alive(pid: int, start_time: int | None) -> bool:
    """Whether ``pid`` is still the (unreaped zombies count as gone) process started then."""
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return start_time is None or stat[2] == start_time


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_until(predicate: Callable[[], bool], within: float) -> bool:
    """Poll ``predicate`` until it is true (True) or ``within`` seconds passed (False)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if predicate():
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)


class _Cgroups:
    """The cgroups of one runtime: ``zeitwork-<prefix>/<name>`` under cgroup v2's root or
    under the v1 ``memory`` and ``cpu`` hierarchies (whichever this host has)."""

    def __init__(self, root: Path, prefix: str) -> None:
        self.parent_name = f"zeitwork-{prefix}"
        self.hierarchies: dict[str, Path] = {}
        self.version: Literal[1, 2] | None = None
        if (root / "cgroup.controllers").exists():
            self.version = 2
            self.hierarchies["unified"] = root
        else:
            for controller in ("memory", "cpu"):
                if (root / controller / "cgroup.procs").exists():
                    self.hierarchies[controller] = root / controller
            if self.hierarchies:
                self.version = 1
        self.root = root

    def parents(self) -> list[Path]:
        return [path / self.parent_name for path in self.hierarchies.values()]

    def create(
        self, name: str, memory_mb: int, vcpu: float
    ) -> tuple[tuple[str, ...], tuple[str, ...], list[str]]:
        """Make an instance's cgroups and write its limits: (paths, limits written, why the
        others were not)."""
        if self.version is None:
            return (), (), [f"no cgroup v2 root and no v1 memory or cpu hierarchy in {self.root}"]
        problems: list[str] = []
        paths: list[Path] = []
        applied: list[str] = []
        memory_bytes = memory_mb * 1024 * 1024
        quota = max(1000, round(vcpu * CPU_PERIOD_US))
        if self.version == 2:
            parent = self.root / self.parent_name
            try:
                parent.mkdir(exist_ok=True)
            except OSError as exc:
                return (), (), [f"cannot create {parent}: {exc.strerror}"]
            offered = set((parent / "cgroup.controllers").read_text().split())
            for controller in ("memory", "cpu"):
                if controller not in offered:
                    problems.append(f"the {controller} controller is not enabled for {parent}")
                    continue
                try:
                    (parent / "cgroup.subtree_control").write_text(f"+{controller}")
                except OSError as exc:
                    problems.append(f"cannot enable {controller} in {parent}: {exc.strerror}")
            leaf = parent / name
            try:
                leaf.mkdir(exist_ok=True)
            except OSError as exc:
                return (), (), [f"cannot create {leaf}: {exc.strerror}"]
            paths.append(leaf)
            enabled = set((leaf / "cgroup.controllers").read_text().split())
            if "memory" in enabled and memory_mb > 0:
                try:
                    (leaf / "memory.max").write_text(str(memory_bytes))
                    if (leaf / "memory.swap.max").exists():
                        (leaf / "memory.swap.max").write_text("0")
                    # An instance out of memory goes as a whole, not one worker at a time.
                    (leaf / "memory.oom.group").write_text("1")
                    applied.append("memory")
                except OSError as exc:
                    problems.append(f"cannot write the memory limit in {leaf}: {exc.strerror}")
            if "cpu" in enabled and vcpu > 0:
                try:
                    (leaf / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
                    applied.append("cpu")
                except OSError as exc:
                    problems.append(f"cannot write the CPU quota in {leaf}: {exc.strerror}")
        else:
            for controller in ("memory", "cpu"):
                hierarchy = self.hierarchies.get(controller)
                if hierarchy is None:
                    problems.append(f"no cgroup v1 {controller} hierarchy in {self.root}")
                    continue
                leaf = hierarchy / self.parent_name / name
                try:
                    leaf.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    problems.append(f"cannot create {leaf}: {exc.strerror}")
                    continue
                paths.append(leaf)
                try:
                    if controller == "memory" and memory_mb > 0:
                        (leaf / "memory.limit_in_bytes").write_text(str(memory_bytes))
                        # Where swap is accounted, it counts against the same limit.
                        if (leaf / "memory.memsw.limit_in_bytes").exists():
                            (leaf / "memory.memsw.limit_in_bytes").write_text(str(memory_bytes))
                        applied.append("memory")
                    elif controller == "cpu" and vcpu > 0:
                        (leaf / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                        (leaf / "cpu.cfs_quota_us").write_text(str(quota))
                        applied.append("cpu")
                except OSError as exc:
                    problems.append(
                        f"cannot write the {controller} limit in {leaf}: {exc.strerror}"
                    )
        return tuple(str(path) for path in paths), tuple(applied), problems

    @staticmethod
    def members(path: Path) -> list[int]:
        try:
            return [int(line) for line in (path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    async def empty_and_remove(self, paths: list[Path]) -> list[str]:
        """Kill every process in the cgroups, then remove them; what could not be removed."""
        paths = [path for path in paths if path.exists()]
        for path in paths:
            kill_file = path / "cgroup.kill"
            if kill_file.exists():
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")

        def emptied() -> bool:
            members = [pid for path in paths for pid in self.members(path)]
            # Kill again: something may have forked while the first signals went out.
            _kill(members)
            return not members

        await _wait_until(emptied, KILL_WAIT)
        problems: list[str] = []
        for path in paths:

            def removed(path: Path = path) -> bool:
                try:
                    path.rmdir()
                except FileNotFoundError:
                    return True
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        problems.append(f"cannot remove {path}: {exc.strerror}")
                        return True
                    return False
                return True

            if not await _wait_until(removed, KILL_WAIT):
                problems.append(f"cannot remove {path}: processes {self.members(path)} remain")
        return problems

    def remove_parents(self) -> None:
        for parent in self.parents():
            # Still in use (another instance) or already gone: both fine.
            with contextlib.suppress(OSError):
                parent.rmdir()


class ProcessRuntime:
    """Runs instances as processes (see the module's docstring); implements ``Runtime``."""

    name = "process"

    def __init__(
        self,
        state_dir: Path,
        on_output: OutputCallback,
        *,
        isolate: bool | None = None,
        subnet: str = DEFAULT_SUBNET,
        prefix: str = DEFAULT_PREFIX,
        cgroup_root: Path = CGROUP_ROOT,
        ip_timeout: float = IP_TIMEOUT,
    ) -> None:
        if not _PREFIX.fullmatch(prefix):
            raise ValueError(
                f"prefix {prefix!r}: 1 to 6 lowercase letters or digits, a letter first"
            )
        network = ipaddress.ip_network(subnet)
        if not isinstance(network, ipaddress.IPv4Network) or network.prefixlen > 30:
            raise ValueError(f"subnet {subnet}: an IPv4 network of at least a /30")
        self.state_dir = state_dir
        self.prefix = prefix
        self._on_output = on_output
        self._network = network
        self._slots = network.num_addresses // 4
        self._ip_timeout = ip_timeout
        self._name_pattern = re.compile(rf"{prefix}-[0-9a-f]{{8}}")
        self._ip = shutil.which("ip") or shutil.which("ip", path="/usr/sbin:/sbin")
        euid = os.geteuid()
        reason: str | None = None
        if isolate is None:
            if euid != 0:
                reason = f"not running as root (euid {euid})"
            elif self._ip is None:
                reason = "`ip` (iproute2) is not installed"
        elif isolate:
            if euid != 0 or self._ip is None:
                raise RuntimeFailure(
                    "process runtime: isolation needs root and `ip` (iproute2)"
                    f" (euid {euid}, ip {self._ip or 'not installed'})"
                )
        else:
            reason = "isolation is turned off"
        self.isolated = reason is None
        if reason is not None:
            log.warning(
                "process runtime: %s; instances run as plain processes on 127.0.0.1 ports,"
                " without network namespaces or cgroup limits, and can reach each other",
                reason,
            )
        self._cgroups = _Cgroups(cgroup_root, prefix)
        self._cgroups_warned = False
        self._instances: dict[str, _Instance] = {}
        self._used_slots: set[int] = set()
        self._slot_lock = asyncio.Lock()

    # The Runtime interface.

    async def prepare(self, spec: InstanceSpec) -> None:
        self._require_command(spec)
        if spec.instance_id in self._instances:
            raise RuntimeFailure(f"instance {spec.instance_id} is already prepared")
        name = instance_name(self.prefix, spec.instance_id)
        for other in self._instances.values():
            if other.record.name == name:
                raise RuntimeFailure(
                    f"instance {spec.instance_id}: its name {name} is taken by instance"
                    f" {other.record.instance_id}"
                )
        home = self.state_dir / name
        inst = _Instance(InstanceRecord(spec.instance_id, name, str(home)))
        self._instances[spec.instance_id] = inst
        try:
            try:
                home.mkdir(parents=True, exist_ok=True)
                self._save(inst.record)
            except OSError as exc:
                raise RuntimeFailure(f"prepare {spec.instance_id}: {exc}") from exc
            if self.isolated:
                await self._prepare_network(inst, spec)
                self._prepare_cgroups(inst, spec)
        except BaseException:
            try:
                await self._release(inst.record)
            except RuntimeFailure as exc:
                log.warning("process runtime: cleaning up %s: %s", spec.instance_id, exc)
            self._instances.pop(spec.instance_id, None)
            raise

    async def start(self, spec: InstanceSpec) -> Address:
        command = self._require_command(spec)
        inst = self._instances.get(spec.instance_id)
        if inst is None:
            raise RuntimeFailure(f"instance {spec.instance_id} is not prepared (prepare first)")
        if inst.proc is not None or inst.stopping is not None:
            raise RuntimeFailure(f"instance {spec.instance_id} was already started")
        record = inst.record
        if self.isolated:
            assert record.instance_ip is not None and self._ip is not None
            address = Address(record.instance_ip, spec.app_port)
            argv = [self._ip, "netns", "exec", record.name, "/bin/sh", "-c", command]
            if record.cgroups:
                procs = [str(Path(path) / "cgroup.procs") for path in record.cgroups]
                argv = ["/bin/sh", "-c", _JOIN_CGROUPS, "zeitwork-join", *procs, "--", *argv]
        else:
            address = Address("127.0.0.1", _free_port())
            argv = ["/bin/sh", "-c", command]
        env = {
            "PATH": os.environ.get("PATH", DEFAULT_PATH),
            "HOME": record.home,
            "LANG": "C.UTF-8",
            **spec.env,
            "PORT": str(address.port),
        }
        spawn = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=record.home,
                start_new_session=True,
            )
        )
        try:
            proc = await asyncio.shield(spawn)
        except OSError as exc:
            raise RuntimeFailure(f"instance {spec.instance_id}: cannot start: {exc}") from exc
        except asyncio.CancelledError:
            # Cancelled while spawning: the process may exist all the same; stop must find it.
            with contextlib.suppress(Exception):
                self._started(inst, await spawn, address)
            raise
        self._started(inst, proc, address)
        return address

    def _started(self, inst: _Instance, proc: asyncio.subprocess.Process, address: Address) -> None:
        stat = _proc_stat(proc.pid)
        inst.proc = proc
        inst.address = address
        inst.record = dataclasses.replace(
            inst.record,
            pid=proc.pid,
            pgid=proc.pid,
            start_time=None if stat is None else stat[2],
            port=address.port,
        )
        instance_id = inst.record.instance_id
        try:
            self._save(inst.record)
        except OSError as exc:
            # It runs and this run knows it; only a sweep after a crash would miss its pid.
            log.error("process runtime: cannot save the record of %s: %s", instance_id, exc)
        assert proc.stdout is not None and proc.stderr is not None
        inst.readers = [
            asyncio.create_task(self._pump(instance_id, "stdout", proc.stdout)),
            asyncio.create_task(self._pump(instance_id, "stderr", proc.stderr)),
        ]
        log.info(
            "process runtime: started %s (pid %d) at %s:%d",
            instance_id,
            proc.pid,
            address.host,
            address.port,
        )

    async def status(self, instance_id: str) -> InstanceStatus:
        inst = self._instances.get(instance_id)
        if inst is None or inst.proc is None:
            return InstanceStatus("missing")
        code = inst.proc.returncode
        if code is None:
            return InstanceStatus("running")
        # Negative: killed by that signal (-9: SIGKILL, the kernel's OOM killer included).
        return InstanceStatus("exited", code)

    async def stop(self, instance_id: str, grace: float) -> None:
        inst = self._instances.get(instance_id)
        if inst is None:
            # Left by a previous run and not swept yet: its record says what to release.
            record = self._load(self.state_dir / f"{instance_name(self.prefix, instance_id)}.json")
            if record is not None and record.instance_id == instance_id:
                await self._sweep_record(record)
            return
        if inst.stopping is None:
            inst.stopping = asyncio.ensure_future(self._stop(inst, grace))
        stopping = inst.stopping
        try:
            # A cancelled caller does not leave the instance half stopped.
            await asyncio.shield(stopping)
        except RuntimeFailure:
            if inst.stopping is stopping:
                inst.stopping = None  # the next stop tries again
            raise

    def address(self, instance_id: str) -> Address | None:
        inst = self._instances.get(instance_id)
        return None if inst is None else inst.address

    async def sweep(self) -> list[str]:
        """Stop what a previous run left: recorded instances this runtime does not know, and
        namespaces, links, cgroups and directories with this runtime's prefix no record names.

        The ids of the instances stopped. What cannot be released is logged, never raised: a
        leftover must not keep the agent from starting; its record stays for the next sweep."""
        swept: list[str] = []
        problems: list[str] = []
        known = {inst.record.name for inst in self._instances.values()}
        for path in sorted(self.state_dir.glob("*.json*")):
            record = self._load(path)
            if record is None:
                log.warning("process runtime: removing unreadable record %s", path)
                path.unlink(missing_ok=True)
                continue
            if record.name in known:
                continue
            known.add(record.name)
            try:
                await self._sweep_record(record)
            except RuntimeFailure as exc:
                problems.append(str(exc))
                continue
            swept.append(record.instance_id)
        problems += await self._sweep_unrecorded(
            {inst.record.name for inst in self._instances.values()}
        )
        if swept:
            log.info("process runtime: swept %d instance(s) of a previous run", len(swept))
        for problem in problems:
            log.error("process runtime: sweep: %s", problem)
        return swept

    # Beyond the interface.

    def record(self, instance_id: str) -> InstanceRecord | None:
        """What the runtime holds for an instance (its namespace, cgroups, limits ...)."""
        inst = self._instances.get(instance_id)
        return None if inst is None else inst.record

    # Preparing.

    @staticmethod
    def _require_command(spec: InstanceSpec) -> str:
        if not spec.command or not spec.command.strip():
            what = f"only an image ({spec.image})" if spec.image else "no command"
            raise RuntimeFailure(
                f"instance {spec.instance_id} of {spec.deployment_name} has {what}: the process"
                " runtime runs commands only (images need the microvm or firecracker runtime)"
            )
        return spec.command

    async def _prepare_network(self, inst: _Instance, spec: InstanceSpec) -> None:
        name = inst.record.name
        slot = await self._allocate_slot()
        base = self._network.network_address + 4 * slot
        host_ip, instance_ip = str(base + 1), str(base + 2)
        inst.record = dataclasses.replace(
            inst.record, slot=slot, host_ip=host_ip, instance_ip=instance_ip
        )
        self._save(inst.record)
        what = f"prepare {spec.instance_id}"
        # Each resource enters the record once created, so a failure releases just those.
        await self._ip_run(what, "netns", "add", name)
        inst.record = dataclasses.replace(inst.record, netns=name)
        self._save(inst.record)
        await self._ip_run(
            what, "link", "add", name, "type", "veth", "peer", "name", INSTANCE_LINK, "netns", name
        )
        inst.record = dataclasses.replace(inst.record, host_link=name)
        self._save(inst.record)
        await self._ip_run(what, "addr", "add", f"{host_ip}/30", "dev", name)
        await self._ip_run(what, "link", "set", name, "up")
        await self._ip_run(
            what, "-n", name, "addr", "add", f"{instance_ip}/30", "dev", INSTANCE_LINK
        )
        await self._ip_run(what, "-n", name, "link", "set", INSTANCE_LINK, "up")
        await self._ip_run(what, "-n", name, "link", "set", "lo", "up")
        await self._ip_run(what, "-n", name, "route", "add", "default", "via", host_ip)

    def _prepare_cgroups(self, inst: _Instance, spec: InstanceSpec) -> None:
        try:
            paths, limits, problems = self._cgroups.create(
                inst.record.name, spec.memory_mb, spec.vcpu
            )
        except OSError as exc:
            paths, limits, problems = (), (), [f"cannot use cgroups: {exc}"]
        inst.record = dataclasses.replace(
            inst.record,
            cgroup_version=self._cgroups.version if paths else None,
            cgroups=paths,
            limits=limits,
        )
        self._save(inst.record)
        if problems and not self._cgroups_warned:
            self._cgroups_warned = True
            log.warning(
                "process runtime: memory/CPU limits are not applied where: %s",
                "; ".join(problems),
            )

    async def _allocate_slot(self) -> int:
        """The lowest /30 neither this runtime nor anything else on the host uses."""
        async with self._slot_lock:
            taken = await self._host_addresses()
            for slot in range(self._slots):
                if slot in self._used_slots:
                    continue
                base = self._network.network_address + 4 * slot
                if str(base + 1) in taken or str(base + 2) in taken:
                    continue
                self._used_slots.add(slot)
                return slot
        raise RuntimeFailure(
            f"no free address: all {self._slots} /30 slots of {self._network} are in use"
        )

    async def _host_addresses(self) -> set[str]:
        out = await self._ip_run("list the host's addresses", "-o", "-4", "addr", "show")
        taken: set[str] = set()
        for line in out.splitlines():
            words = line.split()
            if "inet" in words:
                taken.add(words[words.index("inet") + 1].split("/")[0])
        return taken

    # Running.

    async def _pump(self, instance_id: str, stream: Stream, reader: asyncio.StreamReader) -> None:
        """Hand the stream to on_output line by line, each cut to LINE_CAP bytes."""
        buffer = bytearray()
        cutting = False  # inside a line already handed over cut
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            buffer += chunk
            while True:
                end = buffer.find(b"\n")
                if end < 0:
                    if len(buffer) > LINE_CAP:
                        if not cutting:
                            self._emit(instance_id, stream, buffer[:LINE_CAP])
                            cutting = True
                        buffer.clear()
                    break
                if not cutting:
                    self._emit(instance_id, stream, buffer[: min(end, LINE_CAP)])
                cutting = False
                del buffer[: end + 1]
        if buffer and not cutting:
            self._emit(instance_id, stream, buffer[:LINE_CAP])

    def _emit(self, instance_id: str, stream: Stream, line: bytearray) -> None:
        text = line.decode("utf-8", errors="replace").removesuffix("\r")
        try:
            self._on_output(instance_id, stream, text)
        except Exception:
            log.exception("process runtime: on_output failed for %s", instance_id)

    # Stopping and releasing.

    async def _stop(self, inst: _Instance, grace: float) -> None:
        proc, record = inst.proc, inst.record
        if proc is not None and record.pgid is not None:
            if proc.returncode is None:
                _signal_group(record.pgid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), max(grace, 0.0))
                except TimeoutError:
                    log.info(
                        "process runtime: %s did not exit within %g s of SIGTERM; SIGKILL",
                        record.instance_id,
                        grace,
                    )
            # Whatever is left of the group (the main process too, after the grace period).
            _signal_group(record.pgid, signal.SIGKILL)
            try:
                await asyncio.wait_for(proc.wait(), KILL_WAIT)
            except TimeoutError:
                raise RuntimeFailure(
                    f"stop {record.instance_id}: pid {proc.pid} survived SIGKILL"
                    f" for {KILL_WAIT:g} s"
                ) from None
        await self._release(record)
        # The output of the last moments still reaches on_output; a pipe held open by a
        # process that escaped everything is not waited for.
        if inst.readers:
            _, pending = await asyncio.wait(inst.readers, timeout=OUTPUT_DRAIN)
            for task in pending:
                task.cancel()
        self._instances.pop(record.instance_id, None)
        self._maybe_remove_cgroup_parents()
        log.info("process runtime: stopped %s", record.instance_id)

    async def _release(self, record: InstanceRecord, *, owned: bool = True) -> None:
        """Kill what is left in the instance's namespace and cgroups, delete them, its link,
        record and home, and free its address slot (``owned``: a slot of this run's)."""
        problems: list[str] = []
        what = f"release {record.instance_id}"
        netns = record.netns if record.netns and (NETNS_DIR / record.netns).exists() else None
        if netns is not None:
            try:
                await self._kill_netns_members(what, netns)
            except RuntimeFailure as exc:
                problems.append(str(exc))
        problems += await self._cgroups.empty_and_remove([Path(path) for path in record.cgroups])
        if record.host_link and (NET_CLASS_DIR / record.host_link).exists():
            # Deleting one end deletes the pair, at once (a namespace's own go asynchronously).
            try:
                await self._ip_run(what, "link", "del", record.host_link)
            except RuntimeFailure as exc:
                problems.append(str(exc))
        if netns is not None:
            try:
                await self._ip_run(what, "netns", "del", netns)
            except RuntimeFailure as exc:
                problems.append(str(exc))
        if problems:
            raise RuntimeFailure("; ".join(problems))
        if owned and record.slot is not None:
            self._used_slots.discard(record.slot)
        (self.state_dir / f"{record.name}.json").unlink(missing_ok=True)
        await asyncio.to_thread(shutil.rmtree, record.home, ignore_errors=True)

    async def _kill_netns_members(self, what: str, netns: str) -> None:
        deadline = asyncio.get_running_loop().time() + KILL_WAIT
        while True:
            out = await self._ip_run(what, "netns", "pids", netns)
            pids = [int(word) for word in out.split()]
            live = [pid for pid in pids if _alive(pid, None)]
            if not live:
                return
            _kill(live)
            if asyncio.get_running_loop().time() >= deadline:
                raise RuntimeFailure(
                    f"{what}: processes {live} in namespace {netns} survive SIGKILL"
                )
            await asyncio.sleep(0.02)

    async def _sweep_record(self, record: InstanceRecord) -> None:
        pid, start_time = record.pid, record.start_time
        # Only a process with the recorded start time is the instance's; the namespace and the
        # cgroups find the rest of it whatever became of that pid.
        verified = pid is not None and start_time is not None and _alive(pid, start_time)
        if pid is not None and start_time is not None and verified:
            _signal_group(record.pgid or pid, signal.SIGKILL)
            _kill([pid])
        elif pid is not None and _alive(pid, None):
            log.warning(
                "process runtime: pid %d of %s is now another process's or unverifiable;"
                " not killed",
                pid,
                record.instance_id,
            )
        await self._release(record, owned=False)
        if (
            pid is not None
            and start_time is not None
            and verified
            and not await _wait_until(lambda: not _alive(pid, start_time), KILL_WAIT)
        ):
            raise RuntimeFailure(f"sweep {record.instance_id}: pid {pid} survives SIGKILL")
        log.info("process runtime: swept %s of a previous run", record.instance_id)

    async def _sweep_unrecorded(self, known: set[str]) -> list[str]:
        problems: list[str] = []

        def ours(names: list[str]) -> list[str]:
            return [n for n in names if self._name_pattern.fullmatch(n) and n not in known]

        def listing(path: Path) -> list[str]:
            try:
                return sorted(entry.name for entry in path.iterdir())
            except OSError:
                return []

        if self.isolated:
            for netns in ours(listing(NETNS_DIR)):
                try:
                    await self._kill_netns_members("sweep", netns)
                    await self._ip_run("sweep", "netns", "del", netns)
                except RuntimeFailure as exc:
                    problems.append(str(exc))
            for link in ours(listing(NET_CLASS_DIR)):
                if not (NET_CLASS_DIR / link).exists():
                    continue  # the other end of a pair deleted just before
                try:
                    await self._ip_run("sweep", "link", "del", link)
                except RuntimeFailure as exc:
                    problems.append(str(exc))
            leaves = [
                parent / name
                for parent in self._cgroups.parents()
                for name in ours(listing(parent))
            ]
            problems += await self._cgroups.empty_and_remove(leaves)
            self._maybe_remove_cgroup_parents()
        for name in ours(listing(self.state_dir)):
            home = self.state_dir / name
            if home.is_dir():
                await asyncio.to_thread(shutil.rmtree, home, ignore_errors=True)
        return problems

    def _maybe_remove_cgroup_parents(self) -> None:
        if not any(inst.record.cgroups for inst in self._instances.values()):
            self._cgroups.remove_parents()

    # Records and commands.

    def _save(self, record: InstanceRecord) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / f"{record.name}.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(record.to_json())
        os.replace(temporary, path)

    @staticmethod
    def _load(path: Path) -> InstanceRecord | None:
        if path.suffix != ".json":
            return None
        try:
            return InstanceRecord.from_json(path.read_text())
        except (OSError, ValueError, TypeError):
            return None

    async def _ip_run(self, what: str, *args: str) -> str:
        """Run ``ip`` with ``args``; its output, or a RuntimeFailure with its stderr."""
        if self._ip is None:
            raise RuntimeFailure(f"{what}: `ip` (iproute2) is not installed")
        command = "ip " + " ".join(args)
        try:
            proc = await asyncio.create_subprocess_exec(
                self._ip,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise RuntimeFailure(f"{what}: cannot run `{command}`: {exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), self._ip_timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeFailure(
                f"{what}: `{command}` did not finish within {self._ip_timeout:g} s"
            ) from None
        if proc.returncode != 0:
            message = err.decode(errors="replace").strip() or "no message"
            raise RuntimeFailure(f"{what}: `{command}` failed (exit {proc.returncode}): {message}")
        return out.decode(errors="replace")
