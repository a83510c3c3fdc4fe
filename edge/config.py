"""Typed configuration of the edge, built without side effects.

The CLI turns flags into an :class:`EdgeConfig`; nothing here opens a socket or a file.
Values are validated on construction so a bad option fails at start with a message that
names it, never later on the hot path.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from edge.ratelimit import RateLimit
from edge.routing import RoutesError, normalize_host
from scheduler.reconciler import Settings as SchedulerSettings

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option."""


def default_data_dir() -> Path:
    """Where the edge keeps its state (the embedded PostgreSQL, a generated admin token):
    ``/var/lib/zeitwork`` for root, else ``$XDG_DATA_HOME/zeitwork`` or
    ``~/.local/share/zeitwork``."""
    if os.geteuid() == 0 and not os.environ.get("XDG_DATA_HOME"):
        return Path("/var/lib/zeitwork")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "zeitwork"


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    """Sizes and timeouts of the proxy (seconds and bytes)."""

    max_header_size: int = 64 * 1024
    max_body_size: int = 100 * 1024 * 1024
    # Slowloris guard: a request head must arrive completely within this time.
    header_timeout: float = 10.0
    # A request body that stalls for this long is abandoned with 408.
    body_timeout: float = 60.0
    keepalive_timeout: float = 60.0
    upstream_connect_timeout: float = 5.0
    # Longest silence from an instance while its response is awaited or streamed.
    upstream_response_timeout: float = 60.0
    # Idle pooled upstream connections are closed after this; kept short so an instance's
    # own keep-alive timeout rarely closes one under us.
    upstream_idle_timeout: float = 30.0
    upstream_max_idle: int = 64
    # Idle WebSocket (or other upgraded) tunnels are closed after this.
    tunnel_idle_timeout: float = 3600.0
    # Retries on another instance when connecting failed or a reused connection was found
    # closed before anything of the request was consumed.
    retries: int = 1
    # A TLS handshake must be done within this time (the request head's timeout starts after).
    tls_handshake_timeout: float = 10.0
    # Passive health: an instance that refused a connection or timed out is skipped for
    # ejection_time, doubling with each failure in a row up to max_ejection_time.
    ejection_time: float = 1.0
    max_ejection_time: float = 30.0
    write_high_water: int = 256 * 1024
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_header_size", "max_body_size", "upstream_max_idle", "write_high_water"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.retries < 0:
            raise ConfigError(f"retries must be >= 0, got {self.retries}")
        for name in (
            "header_timeout",
            "body_timeout",
            "keepalive_timeout",
            "upstream_connect_timeout",
            "upstream_response_timeout",
            "upstream_idle_timeout",
            "tunnel_idle_timeout",
            "tls_handshake_timeout",
            "shutdown_timeout",
            "ejection_time",
            "max_ejection_time",
        ):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value}")

    @property
    def tick(self) -> float:
        """How often the worker's clock advances and deadlines are checked."""
        shortest = min(
            self.header_timeout,
            self.body_timeout,
            self.keepalive_timeout,
            self.upstream_connect_timeout,
            self.upstream_response_timeout,
            self.upstream_idle_timeout,
            self.ejection_time,
        )
        return max(0.02, min(1.0, shortest / 5))


# Where the operations guide puts the apps wildcard certificate; used when both files exist.
DEFAULT_TLS_CERT = Path("/etc/zeitwork/certs/server.crt")
DEFAULT_TLS_KEY = Path("/etc/zeitwork/certs/server.key")
DEFAULT_HTTPS_PORT = 443


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """The HTTPS listener (``port`` 0: none) and where its certificates come from.

    Certificates: the files (the apps wildcard, which is also the default certificate) and,
    when routing from PostgreSQL, the ``certificates`` table, whose keys are decrypted with
    ``certificate_secret`` (None: stored as plain PEM).
    """

    port: int = 0
    cert_file: Path | None = None
    key_file: Path | None = None
    certificate_secret: str | None = field(default=None, repr=False)
    # Plain HTTP answers 308 to HTTPS (but ACME challenges) while the HTTPS listener is on.
    redirect: bool = True

    @property
    def enabled(self) -> bool:
        return self.port != 0

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ConfigError(f"https port must be 0-65535 (0: off), got {self.port}")
        if (self.cert_file is None) != (self.key_file is None):
            raise ConfigError("a TLS certificate file needs its key file, and the other way round")
        if self.certificate_secret is not None and len(self.certificate_secret) < 16:
            raise ConfigError("the certificate secret must be at least 16 characters")


LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


@dataclass(frozen=True, slots=True)
class AcmeConfig:
    enabled: bool = True
    directory_url: str = LETS_ENCRYPT
    email: str | None = None
    # Roots the ACME server's own HTTPS chains to (None: the system's).
    ca_bundle: Path | None = None

    def __post_init__(self) -> None:
        if not self.directory_url.startswith(("https://", "http://")):
            raise ConfigError(f"ACME directory {self.directory_url!r} is not an http(s) URL")


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    # The routing table's source: a routes file, or the platform database (exactly one; with
    # neither, the master starts the embedded PostgreSQL and fills in database_url).
    routes_path: Path | None = None
    http_host: str = "0.0.0.0"
    http_port: int = 8000
    tls: TlsConfig = field(default_factory=TlsConfig)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    trusted_proxies: tuple[IPNetwork, ...] = ()
    limits: ProxyLimits = field(default_factory=ProxyLimits)
    backlog: int = 2048
    # The region this edge runs in: its instances are preferred, others serve as failover.
    region: str = ""
    database_url: str | None = None
    # The edge's state: the embedded PostgreSQL in <data_dir>/postgres, a generated admin token.
    data_dir: Path = field(default_factory=default_data_dir)
    apps_domain: str = "zeitwork.app"
    # Full reload of a database routing table, covering notifications that never arrived.
    routes_reload_interval: float = 30.0
    # A burst of change notifications within this window costs one reload.
    routes_debounce: float = 0.05
    # The admin API (in the master process); port 0 turns it off.
    admin_host: str = "0.0.0.0"
    admin_port: int = 8080
    # The admin token; None: read <data_dir>/admin-token, generated there on first start.
    admin_token: str | None = field(default=None, repr=False)
    # A token that may only register nodes, for provisioning agents.
    bootstrap_token: str | None = field(default=None, repr=False)
    # The host customers' domains point at with a CNAME.
    edge_host: str = "edge.zeitwork.com"
    # Nameservers for domain verification ("host" or "host:port"); empty: the system's.
    nameservers: tuple[str, ...] = ()
    # Requests per client address (after trusted-proxy handling); None: not limited.
    client_rate_limit: RateLimit | None = None
    # Clients whose state each worker keeps at most (the least recently seen go first).
    rate_limit_max_keys: int = 100_000
    # Admin API requests per token; None: not limited.
    admin_rate_limit: RateLimit | None = field(default_factory=lambda: RateLimit(20.0, 100))
    # The access log: a file path, "-" for standard error, None for none.
    access_log: str | None = None
    # The embedded scheduler (it runs on the leader edge): its timeouts, and the period of
    # the pass that catches them.
    scheduling: SchedulerSettings = field(default_factory=SchedulerSettings)
    scheduler_interval: float = 1.0
    # Certificates of verified custom domains, ordered by the leader (with a secret to
    # encrypt their keys, edge.tls's certificate_secret).
    acme: AcmeConfig = field(default_factory=AcmeConfig)
    # The leader checks each verified domain's DNS again this often (seconds).
    domain_check_interval: float = 3600.0

    @property
    def postgres_dir(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def admin_token_file(self) -> Path:
        return self.data_dir / "admin-token"

    def __post_init__(self) -> None:
        if not 0 < self.http_port < 65536:
            raise ConfigError(f"http port must be 1-65535, got {self.http_port}")
        if self.tls.enabled and self.tls.port == self.http_port:
            raise ConfigError(f"the HTTPS port and the HTTP port are both {self.http_port}")
        if self.admin_port and self.tls.enabled and self.admin_port == self.tls.port:
            raise ConfigError(f"the admin port and the HTTPS port are both {self.admin_port}")
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        if self.backlog < 1:
            raise ConfigError(f"backlog must be positive, got {self.backlog}")
        if self.routes_path is not None and self.database_url:
            raise ConfigError("routes come from a routes file or a database URL, not both")
        try:
            valid = normalize_host(self.apps_domain) == self.apps_domain
        except RoutesError:
            valid = False
        if not valid:
            raise ConfigError(f"apps domain {self.apps_domain!r} is not a lower-case host name")
        if not self.routes_reload_interval > 0:
            raise ConfigError(
                f"routes reload interval must be positive, got {self.routes_reload_interval}"
            )
        if not self.routes_debounce >= 0:
            raise ConfigError(f"routes debounce must be >= 0, got {self.routes_debounce}")
        if not 0 <= self.admin_port < 65536:
            raise ConfigError(f"admin port must be 0-65535 (0: off), got {self.admin_port}")
        if self.admin_port and self.admin_port == self.http_port:
            raise ConfigError(f"the admin port and the HTTP port are both {self.http_port}")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ConfigError("the admin token must be at least 16 characters")
        if self.rate_limit_max_keys < 1:
            raise ConfigError(
                f"rate limit max keys must be positive, got {self.rate_limit_max_keys}"
            )
        if self.bootstrap_token is not None and len(self.bootstrap_token) < 16:
            raise ConfigError("the bootstrap token must be at least 16 characters")
        if not self.scheduler_interval > 0:
            raise ConfigError(
                f"scheduler interval must be a positive number of seconds, got "
                f"{self.scheduler_interval}"
            )


def parse_networks(values: list[str]) -> tuple[IPNetwork, ...]:
    """Parse ``--trusted-proxy`` values (addresses or CIDR networks)."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(f"trusted proxy {value!r} is not an IP address or network") from exc
    return tuple(networks)
