"""``zeitwork agent``: its options (each also from the environment, as the systemd unit's
``/etc/zeitwork/node-agent.env`` gives them) and its process: logging, signals, exit status.

Exit status: 0 after SIGTERM or Ctrl-C (every instance stopped), 1 when the agent cannot go on
(a refused registration, a node the operator no longer knows), 2 for a bad option.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from agent.agent import Agent, AgentConfig, AgentError
from agent.client import Endpoint

RUNTIMES = ("process",)


def default_data_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/zeitwork/agent")
    return Path.home() / ".local" / "share" / "zeitwork" / "agent"


def detect_memory_mb() -> int:
    """Total memory from /proc/meminfo, in MiB (1024 when it cannot be read)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1024


def detect_address() -> str:
    """The address this host uses to reach the outside (no packet is sent), else loopback."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: only selects the route
        return str(s.getsockname()[0])
    return "127.0.0.1"


def _env(name: str, default: Any = None) -> Any:
    return os.environ.get(name) or default


def _positive(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return parse


def add_agent_command(commands: Any) -> None:
    agent = commands.add_parser(
        "agent",
        help="run the node agent on a worker node",
        description="Registers this node with the operators' admin API (with a bootstrap "
        "token the first time; the node's identity is then kept in <data-dir>/node.json), "
        "heartbeats, runs the instances assigned to it and reports on them. Every option "
        "also reads the environment variable named in its help.",
    )
    agent.add_argument(
        "--operator",
        default=_env("ZEITWORK_OPERATOR_URL", "http://127.0.0.1:8080"),
        metavar="URL",
        help="the admin API ($ZEITWORK_OPERATOR_URL; default http://127.0.0.1:8080)",
    )
    agent.add_argument(
        "--token-file",
        type=Path,
        default=_env("ZEITWORK_NODE_TOKEN_FILE"),
        metavar="FILE",
        help="file holding the node token ($ZEITWORK_NODE_TOKEN_FILE, or the token itself in "
        "$ZEITWORK_NODE_TOKEN)",
    )
    agent.add_argument(
        "--bootstrap-token-file",
        type=Path,
        default=_env("ZEITWORK_BOOTSTRAP_TOKEN_FILE"),
        metavar="FILE",
        help="file holding a token that may register nodes, for the first start "
        "($ZEITWORK_BOOTSTRAP_TOKEN_FILE, or the token in $ZEITWORK_BOOTSTRAP_TOKEN)",
    )
    agent.add_argument(
        "--region", default=_env("ZEITWORK_REGION"), help="region code ($ZEITWORK_REGION)"
    )
    agent.add_argument(
        "--hostname",
        default=_env("ZEITWORK_HOSTNAME", socket.gethostname()),
        help="node name ($ZEITWORK_HOSTNAME; default this host's name)",
    )
    agent.add_argument(
        "--address",
        default=_env("ZEITWORK_NODE_ADDRESS"),
        help="where the edges reach this node ($ZEITWORK_NODE_ADDRESS; default: the address "
        "of the default route)",
    )
    agent.add_argument(
        "--vcpu",
        type=_positive(int),
        default=_env("ZEITWORK_VCPU", os.cpu_count() or 1),
        help="vCPUs to offer ($ZEITWORK_VCPU; default: this host's)",
    )
    agent.add_argument(
        "--memory",
        type=_positive(int),
        default=_env("ZEITWORK_MEMORY_MB", detect_memory_mb()),
        metavar="MIB",
        help="memory to offer in MiB ($ZEITWORK_MEMORY_MB; default: this host's)",
    )
    agent.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=_env("ZEITWORK_RUNTIME", "process"),
        help="how instances run ($ZEITWORK_RUNTIME; default process)",
    )
    agent.add_argument(
        "--data-dir",
        type=Path,
        default=_env("ZEITWORK_AGENT_DATA_DIR"),
        metavar="DIR",
        help="the node identity and the runtime's records ($ZEITWORK_AGENT_DATA_DIR; default "
        "/var/lib/zeitwork/agent for root, else ~/.local/share/zeitwork/agent)",
    )
    agent.add_argument(
        "--metrics-host",
        default=_env("ZEITWORK_METRICS_HOST", "0.0.0.0"),
        help="address of /health and /metrics ($ZEITWORK_METRICS_HOST)",
    )
    agent.add_argument(
        "--metrics-port",
        type=int,
        default=_env("ZEITWORK_METRICS_PORT", 8081),
        help="port of /health and /metrics ($ZEITWORK_METRICS_PORT; default 8081)",
    )
    agent.add_argument(
        "--boot-timeout",
        type=_positive(float),
        default=60.0,
        metavar="SECONDS",
        help="an instance not healthy this long after its start is reported unhealthy "
        "(checks go on; default 60)",
    )
    agent.add_argument(
        "--health-interval",
        type=_positive(float),
        default=5.0,
        metavar="SECONDS",
        help="health checks of a running instance (default every 5 s)",
    )
    agent.add_argument(
        "--stop-grace",
        type=_positive(float),
        default=10.0,
        metavar="SECONDS",
        help="SIGTERM, then SIGKILL after this long (default 10)",
    )
    agent.add_argument(
        "--heartbeat-interval",
        type=_positive(float),
        default=None,
        metavar="SECONDS",
        help="default: what the operator asks for (5 s)",
    )
    agent.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _token(path: Path | None, variable: str) -> str | None:
    if path is not None:
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
        if not token:
            raise ValueError(f"{path} is empty")
        return token
    return os.environ.get(variable) or None


def agent_config(args: argparse.Namespace) -> AgentConfig:
    """The agent's configuration from its options; ValueError naming a bad one."""
    if not args.region:
        raise ValueError("--region (or $ZEITWORK_REGION) is required")
    if not 0 <= int(args.metrics_port) < 65536:
        raise ValueError(f"--metrics-port must be 0-65535, not {args.metrics_port}")
    return AgentConfig(
        operator=Endpoint.parse(args.operator),
        data_dir=args.data_dir or default_data_dir(),
        region=args.region,
        hostname=args.hostname,
        address=args.address or detect_address(),
        vcpu=int(args.vcpu),
        memory_mb=int(args.memory),
        node_token=_token(args.token_file, "ZEITWORK_NODE_TOKEN"),
        bootstrap_token=_token(args.bootstrap_token_file, "ZEITWORK_BOOTSTRAP_TOKEN"),
        heartbeat_interval=args.heartbeat_interval,
        boot_timeout=args.boot_timeout,
        health_interval=args.health_interval,
        stop_grace=args.stop_grace,
        metrics_host=args.metrics_host,
        metrics_port=int(args.metrics_port),
    )


def agent_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        config = agent_config(args)
    except ValueError as exc:
        parser.exit(2, f"zeitwork agent: error: {exc}\n")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        asyncio.run(_run(config))
    except AgentError as exc:
        logging.getLogger("agent").error("%s", exc)
        return 1
    except OSError as exc:
        logging.getLogger("agent").error("cannot start: %s", exc)
        return 1
    return 0


async def _run(config: AgentConfig) -> None:
    from agent.runtimes.process import ProcessRuntime  # noqa: PLC0415

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    agent = Agent(
        config,
        lambda on_output: ProcessRuntime(
            state_dir=config.data_dir / "process", on_output=on_output
        ),
    )
    await agent.run(stop)
