"""The ``zeitwork`` command line."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from agent.cli import add_agent_command, agent_command
from edge import __version__, up
from edge.config import (
    DEFAULT_HTTPS_PORT,
    DEFAULT_TLS_CERT,
    DEFAULT_TLS_KEY,
    LETS_ENCRYPT,
    AcmeConfig,
    ConfigError,
    EdgeConfig,
    ProxyLimits,
    TlsConfig,
    parse_networks,
)
from edge.ratelimit import RateLimit
from edge.routing import FileRouteProvider, RoutesError
from scheduler.reconciler import Settings as SchedulerSettings

_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def size(text: str) -> int:
    """A byte size such as ``65536``, ``64k`` or ``100m``."""
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS else ""
    number = value[: len(value) - len(unit)]
    if not number.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 65536, 64k or 100m")
    return int(number) * _SIZE_UNITS[unit]


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def rate_limit(text: str) -> RateLimit:
    """``RATE`` or ``RATE/BURST`` (requests per second; the burst defaults to the rate)."""
    rate_text, _, burst_text = text.partition("/")
    try:
        rate = float(rate_text)
        burst = int(burst_text) if burst_text else max(1, math.ceil(rate))
        return RateLimit(rate, burst)
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a rate limit like 50 or 50/100 (requests per second/burst): {exc}"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zeitwork", description="Zeitwork platform")
    parser.add_argument("--version", action="version", version=f"zeitwork {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    edge = commands.add_parser(
        "edge",
        help="run the edge reverse proxy",
        description="Routes come from a routes file (--routes) or live from PostgreSQL "
        "(--database-url, else $DATABASE_URL); with neither, from an embedded PostgreSQL "
        "in --data-dir. The admin API listens on --admin-port; its token comes from "
        "$ZEITWORK_ADMIN_TOKEN or --admin-token-file, else it is generated into "
        "<data-dir>/admin-token on first start.",
    )
    edge.add_argument(
        "--routes",
        type=Path,
        default=None,
        metavar="FILE",
        help="routes file (JSON, reloaded on SIGHUP) instead of the database",
    )
    edge.add_argument(
        "--database-url",
        default=None,
        metavar="URL",
        help="PostgreSQL to route from, live (default: $DATABASE_URL unless --routes is given)",
    )
    edge.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the edge's data directory: the embedded PostgreSQL (used without a database "
        "URL) and a generated admin token (default /var/lib/zeitwork for root, else "
        "~/.local/share/zeitwork)",
    )
    edge.add_argument(
        "--apps-domain",
        default="zeitwork.app",
        help="domain of the deployment URLs <project>-<id>-<org>.DOMAIN (default zeitwork.app)",
    )
    edge.add_argument(
        "--region", default="", help="this edge's region: its instances are preferred"
    )
    edge.add_argument(
        "--routes-reload-interval",
        type=seconds,
        default=30.0,
        metavar="SECONDS",
        help="full reload of the database routing table (default 30)",
    )
    edge.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    edge.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    edge.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: the number of CPUs)"
    )
    edge.add_argument(
        "--trusted-proxy",
        action="append",
        default=[],
        metavar="CIDR",
        help="peer whose X-Forwarded-* and X-Request-Id are kept (repeatable)",
    )
    edge.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    edge.add_argument(
        "--access-log",
        default=None,
        metavar="FILE",
        help="write one JSON line per request to FILE ('-': standard error; default: none); "
        "the file is opened again on SIGHUP",
    )
    limiting = edge.add_argument_group("rate limiting")
    limiting.add_argument(
        "--rate-limit",
        type=rate_limit,
        default=None,
        metavar="RATE[/BURST]",
        help="requests per second per client address, and the burst allowed at once "
        "(e.g. 50/100; default: no limit); over it a client gets 429",
    )
    limiting.add_argument(
        "--rate-limit-max-clients",
        type=int,
        default=100_000,
        metavar="N",
        help="clients each worker keeps rate state for (least recently seen go first)",
    )
    tls = edge.add_argument_group(
        "HTTPS (on when a certificate is configured or --https-port is given)"
    )
    tls.add_argument(
        "--https-port",
        type=int,
        default=None,
        metavar="PORT",
        help=f"HTTPS port (default {DEFAULT_HTTPS_PORT} when a certificate is configured; "
        "0: no HTTPS)",
    )
    tls.add_argument(
        "--tls-cert",
        type=Path,
        default=None,
        metavar="FILE",
        help="PEM certificate chain of the apps wildcard, also the default certificate "
        f"(default {DEFAULT_TLS_CERT} if it exists); reloaded when it changes and on SIGHUP",
    )
    tls.add_argument(
        "--tls-key",
        type=Path,
        default=None,
        metavar="FILE",
        help=f"its PEM private key (default {DEFAULT_TLS_KEY} if it exists)",
    )
    tls.add_argument(
        "--certificate-secret-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="secret that the database's certificate keys are encrypted with "
        "(default: $ZEITWORK_CERTIFICATE_SECRET; neither: keys are stored as plain PEM)",
    )
    tls.add_argument(
        "--no-https-redirect",
        dest="https_redirect",
        action="store_false",
        help="serve plain HTTP as well, instead of answering it with 308 to HTTPS",
    )
    tls.add_argument(
        "--tls-handshake-timeout",
        type=seconds,
        default=ProxyLimits().tls_handshake_timeout,
        metavar="SECONDS",
        help="a TLS handshake must be done within this time (default 10)",
    )
    admin = edge.add_argument_group("admin API")
    admin.add_argument("--admin-host", default="0.0.0.0", help="address of the admin API")
    admin.add_argument(
        "--admin-port", type=int, default=8080, help="admin API port (default 8080; 0: off)"
    )
    admin.add_argument(
        "--admin-token-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="file holding the admin token (default: $ZEITWORK_ADMIN_TOKEN, else "
        "<data-dir>/admin-token, generated on first start)",
    )
    admin.add_argument(
        "--admin-rate-limit",
        type=rate_limit,
        default=RateLimit(20.0, 100),
        metavar="RATE[/BURST]",
        help="admin API requests per second per token, and the burst (default 20/100)",
    )
    admin.add_argument(
        "--edge-host",
        default="edge.zeitwork.com",
        help="host that customers' domains point at with a CNAME (default edge.zeitwork.com)",
    )
    admin.add_argument(
        "--nameserver",
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="nameserver for domain verification (repeatable; default: the system's)",
    )
    defaults = SchedulerSettings()
    scheduling = edge.add_argument_group(
        "scheduler (runs on the leader edge: the one holding the database's leader lock)"
    )
    scheduling.add_argument(
        "--start-timeout",
        type=seconds,
        default=defaults.start_timeout,
        metavar="SECONDS",
        help="a deployment not healthy this long after placement began fails (default 300)",
    )
    scheduling.add_argument(
        "--rollback-window",
        type=seconds,
        default=defaults.rollback_window,
        metavar="SECONDS",
        help="how long the replaced deployment keeps running for a rollback (default 600)",
    )
    scheduling.add_argument(
        "--heartbeat-timeout",
        type=seconds,
        default=defaults.heartbeat_timeout,
        metavar="SECONDS",
        help="a node silent this long is down and its instances are replaced (default 30)",
    )
    scheduling.add_argument(
        "--scheduler-interval",
        type=seconds,
        default=1.0,
        metavar="SECONDS",
        help="period of the pass that catches timeouts; changes wake it at once (default 1)",
    )
    scheduling.add_argument(
        "--domain-check-interval",
        type=seconds,
        default=3600.0,
        metavar="SECONDS",
        help="the leader checks each verified domain's DNS again this often (default 3600)",
    )
    acme = edge.add_argument_group(
        "certificates of custom domains (ACME HTTP-01, ordered by the leader; needs the "
        "certificate secret, which encrypts their keys in the database)"
    )
    acme.add_argument(
        "--acme-directory",
        default=LETS_ENCRYPT,
        metavar="URL",
        help="the CA's ACME directory (default Let's Encrypt's production)",
    )
    acme.add_argument("--acme-email", default=None, help="contact of the ACME account")
    acme.add_argument(
        "--acme-ca-bundle",
        type=Path,
        default=None,
        metavar="FILE",
        help="roots the ACME server's HTTPS chains to (default: the system's)",
    )
    acme.add_argument(
        "--no-acme",
        dest="acme",
        action="store_false",
        help="order no certificates (they are managed by other means)",
    )
    d = ProxyLimits()
    limits = edge.add_argument_group("limits and timeouts")
    limits.add_argument("--max-header-size", type=size, default=d.max_header_size)
    limits.add_argument("--max-body-size", type=size, default=d.max_body_size)
    limits.add_argument("--header-timeout", type=seconds, default=d.header_timeout)
    limits.add_argument("--body-timeout", type=seconds, default=d.body_timeout)
    limits.add_argument("--keepalive-timeout", type=seconds, default=d.keepalive_timeout)
    limits.add_argument(
        "--upstream-connect-timeout", type=seconds, default=d.upstream_connect_timeout
    )
    limits.add_argument(
        "--upstream-timeout",
        type=seconds,
        default=d.upstream_response_timeout,
        help="longest silence of an instance while answering",
    )
    limits.add_argument("--upstream-idle-timeout", type=seconds, default=d.upstream_idle_timeout)
    limits.add_argument(
        "--upstream-max-idle",
        type=int,
        default=d.upstream_max_idle,
        help="idle kept-alive connections per instance",
    )
    limits.add_argument("--retries", type=int, default=d.retries)
    limits.add_argument("--shutdown-timeout", type=seconds, default=d.shutdown_timeout)
    add_migrate_command(commands)
    add_agent_command(commands)
    up.add_commands(commands)
    return parser


def edge_config(args: argparse.Namespace) -> EdgeConfig:
    limits = ProxyLimits(
        max_header_size=args.max_header_size,
        max_body_size=args.max_body_size,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keepalive_timeout=args.keepalive_timeout,
        upstream_connect_timeout=args.upstream_connect_timeout,
        upstream_response_timeout=args.upstream_timeout,
        upstream_idle_timeout=args.upstream_idle_timeout,
        upstream_max_idle=args.upstream_max_idle,
        retries=args.retries,
        shutdown_timeout=args.shutdown_timeout,
        tls_handshake_timeout=args.tls_handshake_timeout,
    )
    kwargs = {}
    if args.workers is not None:
        kwargs["workers"] = args.workers
    database_url = args.database_url
    if database_url is None and args.routes is None:
        # $DATABASE_URL is a default, not a second source: an explicit --routes wins over it.
        database_url = os.environ.get("DATABASE_URL") or None
    if args.data_dir is not None:
        kwargs["data_dir"] = args.data_dir
    return EdgeConfig(
        routes_path=args.routes,
        database_url=database_url,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        admin_token=_admin_token(args.admin_token_file),
        bootstrap_token=os.environ.get("ZEITWORK_BOOTSTRAP_TOKEN") or None,
        edge_host=args.edge_host.strip().lower().rstrip("."),
        nameservers=tuple(args.nameserver),
        client_rate_limit=args.rate_limit,
        access_log=args.access_log,
        admin_rate_limit=args.admin_rate_limit,
        rate_limit_max_keys=args.rate_limit_max_clients,
        apps_domain=args.apps_domain.strip().lower().rstrip("."),
        region=args.region,
        routes_reload_interval=args.routes_reload_interval,
        scheduling=SchedulerSettings(
            start_timeout=args.start_timeout,
            rollback_window=args.rollback_window,
            heartbeat_timeout=args.heartbeat_timeout,
        ),
        scheduler_interval=args.scheduler_interval,
        domain_check_interval=args.domain_check_interval,
        acme=AcmeConfig(
            enabled=args.acme,
            directory_url=args.acme_directory,
            email=args.acme_email,
            ca_bundle=args.acme_ca_bundle,
        ),
        http_host=args.host,
        http_port=args.http_port,
        tls=tls_config(args),
        trusted_proxies=parse_networks(args.trusted_proxy),
        limits=limits,
        **kwargs,
    )


def tls_config(args: argparse.Namespace) -> TlsConfig:
    """HTTPS is on with a certificate (given, or the operations guide's files where both
    exist) or an explicit --https-port; ``--https-port 0`` turns it off."""
    cert, key = args.tls_cert, args.tls_key
    if cert is None and key is None:
        found = [path for path in (DEFAULT_TLS_CERT, DEFAULT_TLS_KEY) if path.exists()]
        if len(found) == 2:
            cert, key = DEFAULT_TLS_CERT, DEFAULT_TLS_KEY
        elif found:
            raise ConfigError(
                f"{found[0]} exists but not "
                f"{DEFAULT_TLS_KEY if found[0] == DEFAULT_TLS_CERT else DEFAULT_TLS_CERT}: "
                "give --tls-cert and --tls-key, or complete the pair"
            )
    port = args.https_port
    if port is None:
        port = DEFAULT_HTTPS_PORT if cert is not None else 0
    return TlsConfig(
        port=port,
        cert_file=cert,
        key_file=key,
        certificate_secret=_certificate_secret(args.certificate_secret_file),
        redirect=args.https_redirect,
    )


def _certificate_secret(secret_file: Path | None) -> str | None:
    if secret_file is None:
        return os.environ.get("ZEITWORK_CERTIFICATE_SECRET", "").strip() or None
    try:
        content = secret_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the certificate secret file {secret_file}: {exc.strerror}"
        ) from exc
    if not content:
        raise ConfigError(f"the certificate secret file {secret_file} is empty")
    return content


def _admin_token(token_file: Path | None) -> str | None:
    """The configured admin token: the file's content, else $ZEITWORK_ADMIN_TOKEN."""
    if token_file is None:
        return os.environ.get("ZEITWORK_ADMIN_TOKEN") or None
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the admin token file {token_file}: {exc.strerror}") from exc
    if not token:
        raise ConfigError(f"the admin token file {token_file} is empty")
    return token


def add_migrate_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = commands.add_parser(
        "migrate",
        help="apply the database migrations",
        description="Brings the database schema up to date (what the edge also does at start).",
    )
    migrate.add_argument(
        "--database-url",
        default=None,
        metavar="URL",
        help="PostgreSQL to migrate (default: $DATABASE_URL; without either, the embedded "
        "PostgreSQL in --data-dir)",
    )
    migrate.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the edge's data directory, whose postgres/ holds the embedded PostgreSQL "
        "(default ~/.local/share/zeitwork, or /var/lib/zeitwork for root)",
    )


def migrate_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    # Imported here so the other commands do not load asyncpg.
    import asyncio  # noqa: PLC0415

    from edge.store.db import open_database  # noqa: PLC0415
    from edge.store.errors import DatabaseUnavailable, StoreError  # noqa: PLC0415
    from edge.store.migrate import migrate  # noqa: PLC0415

    database_url = args.database_url or os.environ.get("DATABASE_URL") or None

    async def run() -> list[str]:
        data_dir = args.data_dir / "postgres" if args.data_dir is not None else None
        db = await open_database(database_url, data_dir=data_dir, max_size=1)
        try:
            return await migrate(db.pool)
        finally:
            await db.close()

    try:
        applied = asyncio.run(run())
    except StoreError as exc:
        # Cannot reach the database (or start the embedded one): like a bad option, 2.
        status = 2 if isinstance(exc, DatabaseUnavailable) else 1
        parser.exit(status, f"zeitwork migrate: error: {exc}\n")
    for name in applied:
        print(f"applied {name}")
    if not applied:
        print("schema up to date")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "edge":
        try:
            config = edge_config(args)
            # Fail at start, in the terminal, on a routes file or certificate files the
            # workers could not load.
            if config.routes_path is not None:
                FileRouteProvider(config.routes_path).load_sync()
            tls = config.tls
            if tls.enabled and tls.cert_file is not None and tls.key_file is not None:
                from edge.tls import load_files  # noqa: PLC0415

                load_files(tls.cert_file, tls.key_file)
        except (ConfigError, RoutesError, ValueError) as exc:
            parser.exit(2, f"zeitwork edge: error: {exc}\n")
        # Imported here so `zeitwork --help` does not load uvloop and the proxy.
        from edge.server import Master, setup_logging  # noqa: PLC0415

        setup_logging(args.log_level)
        return Master(config, args.log_level).run()
    if args.command == "migrate":
        return migrate_command(args, parser)
    if args.command == "agent":
        return agent_command(args, parser)
    if args.command == "up":
        return up.up_command(args)
    if args.command == "admin-token":
        return up.admin_token_command(args)
    if args.command == "data-dir":
        return up.data_dir_command()
    parser.error(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
