"""``zeitwork up``: the whole platform on one machine, for a newcomer or a laptop.

It runs two child processes and watches them: ``zeitwork edge`` (the embedded PostgreSQL unless
``--database-url``, HTTP on 8000, HTTPS on 8443 with a certificate of a local CA
(:mod:`edge.localca`) that curl trusts with ``--cacert``, the admin API and the scheduler on
8080) and, once the admin
API answers, ``zeitwork agent`` for one local node (region ``local``, created if missing; the
agent registers itself with a bootstrap token made for this run). Their logs go to this
terminal. It prints where everything is once the node is registered.

Ctrl-C (or SIGTERM) stops the agent first, so it stops its instances while the admin API still
takes its reports, then the edge; a second Ctrl-C kills both at once. If either child dies the
other is stopped and ``up`` exits with status 1. The children run in their own sessions so the
terminal's Ctrl-C reaches only ``up``, which orders the shutdown.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edge import localca
from edge.config import default_data_dir

# `zeitwork up` serves the default apps domain.
APPS_DOMAIN = "zeitwork.app"

READY_TIMEOUT = 120.0
STOP_TIMEOUT = 40.0


class UpError(Exception):
    pass


def zeitwork() -> list[str]:
    """How to run this same ``zeitwork`` (the console script beside this Python, else the
    module)."""
    script = Path(sys.executable).parent / "zeitwork"
    return [str(script)] if script.exists() else [sys.executable, "-m", "edge.cli"]


def read_admin_token(data_dir: Path) -> str:
    token = os.environ.get("ZEITWORK_ADMIN_TOKEN")
    if token:
        return token.strip()
    path = data_dir / "admin-token"
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise UpError(
            f"no admin token: $ZEITWORK_ADMIN_TOKEN is not set and {path} cannot be read "
            f"({exc.strerror or exc}); has `zeitwork edge` or `zeitwork up` run with this "
            "data directory?"
        ) from None


def _call(url: str, token: str | None = None, body: Any = None, method: str = "GET") -> Any:
    data = None if body is None else json.dumps(body).encode()
    # Always http://127.0.0.1:<port>/..., built here.
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310
        return json.loads(answer.read() or b"null")


class Up:
    def __init__(self, args: Any) -> None:
        self.args = args
        self.data_dir: Path = args.data_dir or default_data_dir()
        self.admin = f"http://127.0.0.1:{args.admin_port}"
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._stopping = False

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._interrupt)
        signal.signal(signal.SIGTERM, self._interrupt)
        try:
            self._start()
            self._watch()
        except UpError as exc:
            print(f"zeitwork up: error: {exc}", file=sys.stderr, flush=True)
            self._stop()
            return 1
        except KeyboardInterrupt:
            pass
        self._stop()
        return 0

    def _interrupt(self, signum: int, frame: object) -> None:
        if self._stopping:
            for _, child in self.children:
                _kill(child)
            os._exit(130)
        raise KeyboardInterrupt

    def _spawn(self, name: str, argv: Sequence[str], env: dict[str, str]) -> None:
        child = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        self.children.append((name, child))

    def _start(self) -> None:
        args = self.args
        for port in (args.http_port, args.https_port, args.admin_port, args.agent_port):
            _check_free(port)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tls = localca.ensure(self.data_dir / "tls", APPS_DOMAIN)
        bootstrap = secrets.token_urlsafe(32)
        env = dict(os.environ, ZEITWORK_BOOTSTRAP_TOKEN=bootstrap)
        env.pop("DATABASE_URL", None)
        edge = [
            *zeitwork(),
            "edge",
            "--http-port",
            str(args.http_port),
            # HTTPS with the local CA's certificate; plain HTTP keeps serving (no redirect).
            "--https-port",
            str(args.https_port),
            "--tls-cert",
            str(self.tls.server_cert),
            "--tls-key",
            str(self.tls.server_key),
            "--no-https-redirect",
            # No public CA can reach a laptop: no ACME orders.
            "--no-acme",
            "--admin-host",
            "127.0.0.1",
            "--admin-port",
            str(args.admin_port),
            "--data-dir",
            str(self.data_dir),
            "--workers",
            str(args.workers),
        ]
        if args.database_url:
            edge += ["--database-url", args.database_url]
        print(f"starting the edge (data in {self.data_dir}) ...", flush=True)
        self._spawn("edge", edge, env)
        self._wait_for(f"{self.admin}/health", "the admin API")
        token = read_admin_token(self.data_dir)
        regions = _call(f"{self.admin}/api/v1/regions", token)
        if not any(region["code"] == args.region for region in regions):
            _call(
                f"{self.admin}/api/v1/regions",
                token,
                {"code": args.region, "name": "Local", "country": "Local"},
                "POST",
            )
        agent = [
            *zeitwork(),
            "agent",
            "--operator",
            self.admin,
            "--region",
            args.region,
            "--hostname",
            f"{socket.gethostname().split('.')[0].lower()}-local",
            "--address",
            "127.0.0.1",
            "--data-dir",
            str(self.data_dir / "agent"),
            "--metrics-host",
            "127.0.0.1",
            "--metrics-port",
            str(args.agent_port),
        ]
        print("starting the node agent ...", flush=True)
        self._spawn("agent", agent, env)
        self._wait_for(f"http://127.0.0.1:{args.agent_port}/health", "the node agent")
        self._wait_registered(token)
        print(self._banner(), flush=True)

    def _wait_for(self, url: str, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self._check_children()
            try:
                with urllib.request.urlopen(url, timeout=2):  # noqa: S310 (ours, http)
                    return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                time.sleep(0.2)
        raise UpError(f"{what} did not answer on {url} within {READY_TIMEOUT:g} s")

    def _wait_registered(self, token: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self._check_children()
            nodes = _call(f"{self.admin}/api/v1/nodes?region={self.args.region}", token)
            if any(node["state"] == "ready" for node in nodes):
                return
            time.sleep(0.2)
        raise UpError(f"no node of region {self.args.region} became ready")

    def _banner(self) -> str:
        args = self.args
        token_file = self.data_dir / "admin-token"
        return "\n".join(
            [
                "",
                "Zeitwork is up.",
                f"  apps       http://127.0.0.1:{args.http_port}  "
                "(Host: <project>-<nanoid>-<org>.zeitwork.app)",
                f"             https://127.0.0.1:{args.https_port}  (certificates of the local CA "
                f"{self.tls.ca_cert})",
                f"  admin API  {self.admin}  (token in {token_file}; "
                "TOKEN=$(zeitwork admin-token))",
                f"  node agent http://127.0.0.1:{args.agent_port}/health  (region {args.region})",
                f"  data       {self.data_dir}",
                "curl trusts the local CA with --cacert, e.g.:",
                f"  curl --cacert {self.tls.ca_cert} --resolve "
                f"<name>.{APPS_DOMAIN}:{args.https_port}:127.0.0.1 "
                f"https://<name>.{APPS_DOMAIN}:{args.https_port}/",
                "Press Ctrl-C to stop.",
                "",
            ]
        )

    def _check_children(self) -> None:
        for name, child in self.children:
            code = child.poll()
            if code is not None:
                raise UpError(f"the {name} exited with status {code} (its log is above)")

    def _watch(self) -> None:
        while True:
            self._check_children()
            time.sleep(0.5)

    def _stop(self) -> None:
        """The agent first (it stops its instances and reports), then the edge."""
        self._stopping = True
        print("stopping ...", file=sys.stderr, flush=True)
        for _name, child in reversed(self.children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
                try:
                    child.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    _kill(child)
        print("stopped", file=sys.stderr, flush=True)


def _kill(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(5)


def _check_free(port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise UpError(
                f"port {port} is in use (is zeitwork already up?); choose others with "
                "--http-port, --admin-port and --agent-port"
            ) from None


def add_commands(commands: Any) -> None:
    up = commands.add_parser(
        "up",
        help="run the whole platform on this machine (edge, admin API, scheduler, one agent)",
        description="Starts the edge (embedded PostgreSQL, HTTP on --http-port, the admin API "
        "and the scheduler on --admin-port) and one node agent of region 'local'. Ctrl-C "
        "stops them.",
    )
    up.add_argument("--http-port", type=int, default=8000, help="public HTTP (default 8000)")
    up.add_argument("--https-port", type=int, default=8443, help="public HTTPS (default 8443)")
    up.add_argument("--admin-port", type=int, default=8080, help="admin API (default 8080)")
    up.add_argument(
        "--agent-port", type=int, default=8081, help="the agent's /health, /metrics (8081)"
    )
    up.add_argument("--region", default="local", help="the local node's region (local)")
    up.add_argument("--workers", type=int, default=1, help="edge worker processes (1)")
    up.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="state (default ~/.local/share/zeitwork, or /var/lib/zeitwork for root)",
    )
    up.add_argument(
        "--database-url",
        default=None,
        metavar="URL",
        help="use this PostgreSQL instead of the embedded one",
    )
    token = commands.add_parser(
        "admin-token",
        help="print the admin token",
        description="Prints $ZEITWORK_ADMIN_TOKEN, else the token the edge generated in its "
        "data directory: TOKEN=$(zeitwork admin-token).",
    )
    token.add_argument("--data-dir", type=Path, default=None, metavar="DIR")
    commands.add_parser(
        "data-dir",
        help="print the default data directory",
        description="Where `zeitwork up` and `zeitwork edge` keep their state by default "
        "(the admin token, the embedded PostgreSQL, tls/ca.crt of `zeitwork up`).",
    )


def up_command(args: Any) -> int:
    for port in (args.http_port, args.https_port, args.admin_port, args.agent_port):
        if not 0 < port < 65536:
            print(f"zeitwork up: error: port {port} is not 1-65535", file=sys.stderr)
            return 2
    return Up(args).run()


def data_dir_command() -> int:
    print(default_data_dir())
    return 0


def admin_token_command(args: Any) -> int:
    try:
        print(read_admin_token(args.data_dir or default_data_dir()))
    except UpError as exc:
        print(f"zeitwork admin-token: error: {exc}", file=sys.stderr)
        return 1
    return 0
