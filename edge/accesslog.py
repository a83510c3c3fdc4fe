"""The optional access log: one JSON line per request, off by default.

Off, it costs the hot path one attribute test per request (``worker.access_log is None``).
On, each finished exchange becomes a line with the time, request id, client, host, method,
path, status, bytes in and out, duration, and the instance and region that answered; lines
are buffered and written out by the worker's ticker (at least once a second) and at
shutdown, so a busy worker does not make a system call per request. ``-`` writes to
standard error; a file is opened for appending and opened again on SIGHUP, so logrotate can
move it away (``postrotate: systemctl reload zeitwork-edge``).
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

# A buffer this large is written out at once rather than waiting for the tick.
_FLUSH_AT = 64 * 1024


class AccessLog:
    __slots__ = ("_buffer", "_file", "_size", "path")

    def __init__(self, path: str) -> None:
        self.path = path
        self._buffer: list[bytes] = []
        self._size = 0
        self._file: IO[bytes] = self._open()

    def _open(self) -> IO[bytes]:
        if self.path == "-":
            return sys.stderr.buffer
        return open(self.path, "ab")

    def record(self, fields: dict[str, Any]) -> None:
        line = json.dumps(fields, separators=(",", ":")).encode() + b"\n"
        self._buffer.append(line)
        self._size += len(line)
        if self._size >= _FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer.clear()
        self._size = 0
        try:
            self._file.write(data)
            self._file.flush()
        except OSError as exc:
            # A full disk must not stop the proxy; say so once per flush that fails.
            print(f"access log {self.path}: {exc}", file=sys.stderr)

    def reopen(self) -> None:
        """Write out what is buffered, then open the path again (after a log rotation)."""
        self.flush()
        if self.path != "-":
            self._file.close()
            self._file = self._open()

    def close(self) -> None:
        self.flush()
        if self.path != "-":
            self._file.close()


def timestamp(now: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds."""
    now = time.time() if now is None else now
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
