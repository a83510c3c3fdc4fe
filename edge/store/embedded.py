"""The embedded PostgreSQL: a server of the ``pgserver`` package in a data directory.

Used when no ``DATABASE_URL`` is given, so one command runs the whole platform on a laptop
with the same code path as production. The data directory (default
``$XDG_DATA_HOME/zeitwork/postgres``, else ``~/.local/share/zeitwork/postgres``, and
``/var/lib/zeitwork/postgres`` for root) keeps the data across restarts. The server listens
only on a Unix socket in that directory.

Processes that open the same directory share one server (pgserver keeps a list of them in
the directory); the last one to stop it shuts it down. ``start`` and ``stop`` block (initdb
and ``pg_ctl`` run as subprocesses, about a second): async code calls them in a thread.

Running as root: PostgreSQL refuses to run as root, so pgserver creates a system user
``pgserver`` (``useradd``), gives it the data directory and makes the directories above it
traversable (``o+rx``). A machine without ``useradd`` gets a clear error; run as an
ordinary user or set ``DATABASE_URL`` there.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

from edge import config
from edge.store.errors import DatabaseUnavailable

# pgserver's list of the processes using the server, in the data directory.
_HANDLES = ".handle_pids.json"


class EmbeddedError(DatabaseUnavailable):
    """The embedded PostgreSQL could not be started or stopped."""


def default_data_dir() -> Path:
    # As root (a service), a system path: pgserver would otherwise make the directories
    # above a data directory under /root traversable for its own user.
    return config.default_data_dir() / "postgres"


def _pgserver() -> Any:
    # pgserver's import reads the runtime directory; without XDG_RUNTIME_DIR (containers,
    # CI, root shells) platformdirs warns and falls back to /tmp/runtime-<uid>, which is fine.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import pgserver  # noqa: PLC0415

    return pgserver


class EmbeddedPostgres:
    """``with EmbeddedPostgres(dir) as pg: pg.dsn`` -- or ``start()`` and ``stop()``."""

    def __init__(self, data_dir: Path | None = None) -> None:
        self.data_dir = (data_dir or default_data_dir()).expanduser().resolve()
        self._server: Any = None
        self._dsn: str | None = None

    @property
    def dsn(self) -> str:
        if self._dsn is None:
            raise EmbeddedError("the embedded PostgreSQL is not started")
        return self._dsn

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> str:
        """Start the server (initialising the directory the first time); its DSN."""
        if self._server is not None:
            return self.dsn
        try:
            self.data_dir.parent.mkdir(parents=True, exist_ok=True)
            pgserver = _pgserver()
            with pgserver.PostgresServer._lock:
                _forget_dead_handles(self.data_dir)
            try:
                self._server = self._get_server(pgserver)
            except subprocess.TimeoutExpired:
                # pg_ctl -w now and then misses a server that did come up (seen here under
                # load); pgserver then attaches to the running server on a second try.
                self._server = self._get_server(pgserver)
            self._dsn = str(self._server.get_uri())
        except (OSError, subprocess.SubprocessError, AssertionError, RuntimeError) as exc:
            self._server = None
            _stop_orphan(self.data_dir)
            raise EmbeddedError(
                f"cannot start the embedded PostgreSQL in {self.data_dir}: {_reason(exc)}"
                f" (server log: {self.data_dir / 'log'})"
            ) from exc
        return self._dsn

    def _get_server(self, pgserver: Any) -> Any:
        try:
            # cleanup_mode "stop": pgserver also stops it at exit should stop() be skipped.
            return pgserver.get_server(self.data_dir, cleanup_mode="stop")
        except BaseException:
            # pgserver caches a handle before starting the server: a failed start would be
            # returned by every later get_server of this directory.
            pgserver.PostgresServer._instances.pop(self.data_dir, None)
            raise

    def stop(self) -> None:
        """Stop the server unless another process still uses it; the data stays."""
        server, self._server, self._dsn = self._server, None, None
        if server is None:
            return
        try:
            server.cleanup()
            # pgserver registered the same cleanup to run at exit; done now, and at exit it
            # would log into streams already closed (pytest's, a daemon's).
            atexit.unregister(server._cleanup)
        except (OSError, subprocess.SubprocessError) as exc:
            raise EmbeddedError(
                f"cannot stop the embedded PostgreSQL in {self.data_dir}: {_reason(exc)}"
            ) from exc

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _forget_dead_handles(data_dir: Path) -> None:
    """Drop the processes that died without stopping (SIGKILL, a crash) from pgserver's list
    of the server's users: pgserver stops the server only when the list is down to the last
    one, so a dead entry would keep it running after everyone is gone."""
    path = data_dir / _HANDLES
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _stop_orphan(data_dir: Path) -> None:
    """Shut down a server that came up although starting it failed, so none is left behind
    (unless other processes use it)."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        users = (
            json.loads((data_dir / _HANDLES).read_text()) if (data_dir / _HANDLES).exists() else []
        )
    except (OSError, ValueError):
        return
    if any(user != os.getpid() and _alive(user) for user in users):
        return
    with contextlib.suppress(OSError):
        # SIGINT is PostgreSQL's "fast" shutdown: clients are disconnected, data is kept.
        os.kill(pid, signal.SIGINT)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, subprocess.CalledProcessError):
        command = Path(str(exc.cmd[0] if isinstance(exc.cmd, list) else exc.cmd)).name
        if command == "useradd":
            return "running as root needs a 'pgserver' system user and useradd failed"
        return f"{command} exited with status {exc.returncode}"
    if isinstance(exc, FileNotFoundError) and exc.filename == "useradd":
        return "running as root needs a 'pgserver' system user, and useradd is missing"
    return str(exc) or type(exc).__name__
