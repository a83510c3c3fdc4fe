"""The agent's own small HTTP server: ``GET /health`` and ``GET /metrics`` on the metrics port.

HTTP/1.1 with h11, one request per connection (a scrape or a check every few seconds needs no
keep-alive), a deadline for the whole request, GET and HEAD only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

import h11

log = logging.getLogger("agent.http")

REQUEST_TIMEOUT = 10.0
# (status, content type, body) for a path, or None for 404.
Handler = Callable[[str], tuple[int, str, bytes] | None]


def json_answer(status: int, data: Any) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(data, indent=2).encode() + b"\n"


class SmallServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(self._answer(reader, writer), REQUEST_TIMEOUT)
        except (TimeoutError, OSError, h11.ProtocolError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=16 * 1024)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data:
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                break
            return
        method = event.method.decode()
        path = event.target.decode().split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            status, kind, body = 405, "text/plain", b"only GET and HEAD\n"
        else:
            try:
                found = self.handler(path)
            except Exception:
                log.exception("agent HTTP: %s %s failed", method, path)
                found = 500, "text/plain", b"internal error\n"
            status, kind, body = found or (404, "text/plain", b"not found\n")
        headers = [
            ("Content-Type", kind),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        if status == 405:
            headers.append(("Allow", "GET, HEAD"))
        writer.write(conn.send(h11.Response(status_code=status, headers=headers)) or b"")
        if method != "HEAD":
            writer.write(conn.send(h11.Data(data=body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
