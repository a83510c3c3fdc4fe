"""An instance's health check: one HTTP/1.1 GET of its health path, healthy on 2xx or 3xx.

A fresh connection each time (``Connection: close``), bounded by a timeout for the whole
exchange, and only the status line and headers are read: the body is the app's business.
"""

from __future__ import annotations

import asyncio
import contextlib

import h11

MAX_HEAD = 64 * 1024


async def check(
    host: str,
    port: int,
    path: str,
    *,
    timeout: float = 2.0,  # noqa: ASYNC109 (bounds connect, request and answer)
) -> tuple[bool, str]:
    """(healthy, what was seen: ``"200"``, ``"500"``, ``"connection refused"``, ...)."""
    try:
        status = await asyncio.wait_for(_get(host, port, path), timeout)
    except TimeoutError:
        return False, f"no answer within {timeout:g} s"
    except ConnectionRefusedError:
        return False, "connection refused"
    except (OSError, EOFError, h11.ProtocolError) as exc:
        return False, str(exc) or type(exc).__name__
    return 200 <= status < 400, str(status)


async def _get(host: str, port: int, path: str) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        request = h11.Request(
            method="GET",
            target=path,
            headers=[
                ("Host", authority),
                ("User-Agent", "zeitwork-agent"),
                ("Connection", "close"),
            ],
        )
        writer.write(conn.send(request) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data:
                    raise EOFError("the instance closed the connection without an answer")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                return int(event.status_code)
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("the instance closed the connection without an answer")
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), 1.0)
