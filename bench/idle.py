"""Many idle keep-alive connections to a proxy, for the memory they cost it.

:func:`open_idle` opens ``count`` TCP connections, sends one small request on each, reads
the whole response and then leaves the connection open and idle: what a proxy holds for
browsers between their requests. It is one thread with non-blocking sockets and a
selector, with at most ``in_flight`` connections being set up at a time (a burst of 10,000
connects would overflow the listen backlog), and a deadline for the whole. Any failure (a
refused or reset connection, a bad answer, too many open files, no local port left) stops
it with one message naming the cause and how far it got, and closes what it opened.
"""

from __future__ import annotations

import contextlib
import errno
import resource
import selectors
import socket
import time
from dataclasses import dataclass, field

from bench.errors import BenchError

# File descriptors the benchmark needs besides the idle connections (wrk, logs, pipes).
FD_MARGIN = 1024


class IdleConnectionError(BenchError):
    """The idle connections could not all be opened."""


def raise_nofile_limit(needed: int) -> int:
    """Raise this process's RLIMIT_NOFILE to at least ``needed`` (servers started afterwards
    inherit it); the new soft limit. The hard limit is raised too where allowed (root)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
        except (ValueError, OSError):
            raise BenchError(
                f"{needed} open files are needed (the idle connections, and in the proxy one "
                f"for each), but RLIMIT_NOFILE's hard limit is {hard} and this process may "
                "not raise it: raise `ulimit -Hn` first, or ask for fewer connections"
            ) from None
        return needed
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    return needed


@dataclass
class _Pending:
    sock: socket.socket
    sent: bool = False
    received: bytearray = field(default_factory=bytearray)


def _response_complete(data: bytes) -> bool | None:
    """True when ``data`` holds a whole 200 response with a Content-Length body, False when
    more is needed; None when it is not a 200."""
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return False
    head = data[:head_end].decode("latin-1")
    status_line, *fields = head.split("\r\n")
    if status_line.split(" ", 2)[1:2] != ["200"]:
        return None
    length = 0
    for line in fields:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    return len(data) - (head_end + 4) >= length


class IdleConnections:
    """The open sockets; closing it closes them all."""

    def __init__(self, sockets: list[socket.socket], open_s: float) -> None:
        self.sockets = sockets
        # How long opening them all took.
        self.open_s = open_s

    def __enter__(self) -> IdleConnections:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.sockets)

    def closed_by_peer(self) -> int:
        """How many of the connections the server has closed (or reset) meanwhile."""
        closed = 0
        for sock in self.sockets:
            try:
                if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                    closed += 1
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        return closed

    def close(self) -> None:
        sockets, self.sockets = self.sockets, []
        for sock in sockets:
            sock.close()


def open_idle(
    host: str,
    port: int,
    count: int,
    request: bytes,
    *,
    in_flight: int = 256,
    timeout: float = 60.0,
) -> IdleConnections:
    """Open ``count`` connections to ``host:port``, each sending ``request`` and reading a
    whole 200 response; raises IdleConnectionError (after closing them) on any failure or
    when ``timeout`` seconds were not enough."""
    started = time.monotonic()
    deadline = started + timeout
    done: list[socket.socket] = []
    pending: dict[int, _Pending] = {}
    selector = selectors.DefaultSelector()

    def fail(reason: str) -> IdleConnectionError:
        return IdleConnectionError(
            f"idle connections to {host}:{port}: {reason} after {len(done)} of {count} "
            f"were open ({len(pending)} in progress, {time.monotonic() - started:.1f} s)"
        )

    try:
        while len(done) < count:
            while len(pending) < in_flight and len(done) + len(pending) < count:
                try:
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                except OSError as exc:
                    hint = " (raise RLIMIT_NOFILE)" if exc.errno == errno.EMFILE else ""
                    raise fail(f"cannot create a socket: {exc}{hint}") from None
                sock.setblocking(False)
                code = sock.connect_ex((host, port))
                if code not in (0, errno.EINPROGRESS):
                    sock.close()
                    hint = " (no local port left)" if code == errno.EADDRNOTAVAIL else ""
                    raise fail(f"connect failed: {errno.errorcode.get(code, code)}{hint}")
                pending[sock.fileno()] = _Pending(sock)
                selector.register(sock, selectors.EVENT_WRITE)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise fail(f"not done within {timeout:.0f} s")
            for key, _ in selector.select(min(remaining, 1.0)):
                state = pending[key.fd]
                sock = state.sock
                if not state.sent:
                    if code := sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                        raise fail(f"connect failed: {errno.errorcode.get(code, code)}")
                    # A small request fits in the empty socket buffer at once.
                    if sock.send(request) != len(request):
                        raise fail("request not sent in one write")
                    state.sent = True
                    selector.modify(sock, selectors.EVENT_READ)
                    continue
                try:
                    chunk = sock.recv(65536)
                except OSError as exc:
                    raise fail(f"reading the response: {exc}") from None
                if not chunk:
                    raise fail("the server closed a connection before answering")
                state.received += chunk
                complete = _response_complete(bytes(state.received))
                if complete is None:
                    first = bytes(state.received).partition(b"\r\n")[0]
                    raise fail(f"answer was not 200: {first!r}")
                if complete:
                    selector.unregister(sock)
                    del pending[key.fd]
                    done.append(sock)
    except BaseException:
        for sock in [*done, *(p.sock for p in pending.values())]:
            with contextlib.suppress(OSError):
                sock.close()
        raise
    finally:
        selector.close()
    return IdleConnections(done, time.monotonic() - started)
