"""The agent's client of the operators' admin API: JSON over HTTP/1.1 (h11), one kept-alive
connection per client object (each of the agent's loops has its own, so a long poll never
holds up a heartbeat).

Failures come in two kinds, because the agent handles them differently:
:class:`OperatorUnavailable` (cannot connect, timed out, connection lost, 5xx, 429: try again
later, with backoff) and :class:`OperatorRefused` (any other 4xx: the request itself is wrong,
retrying it unchanged does not help; the message is the API's own).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import h11

MAX_ANSWER = 16 * 1024 * 1024


class OperatorError(Exception):
    pass


class OperatorUnavailable(OperatorError):
    """The admin API cannot be reached or cannot answer now."""


class OperatorRefused(OperatorError):
    """The admin API refused the request (4xx other than 429)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


@dataclass(frozen=True, slots=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """``http://host:port`` (https is not spoken here: run the agent and the admin API on
        a private network, as the operations guide does)."""
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http":
            raise ValueError(f"operator URL {url!r}: only http:// is supported")
        if not parts.hostname:
            raise ValueError(f"operator URL {url!r} has no host")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"operator URL {url!r}: give only scheme, host and port")
        try:
            port = parts.port or 80
        except ValueError:
            raise ValueError(f"operator URL {url!r} has a bad port") from None
        return cls(parts.hostname, port)


class OperatorClient:
    def __init__(self, endpoint: Endpoint, token: str | None, *, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.token = token
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._conn: h11.Connection | None = None

    async def close(self) -> None:
        writer, self._writer, self._reader, self._conn = self._writer, None, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (bounds the whole exchange)
    ) -> Any:
        """The JSON answer of a 2xx; :class:`OperatorUnavailable` or :class:`OperatorRefused`
        otherwise. ``timeout`` (default the client's) bounds the whole exchange."""
        try:
            status, data = await asyncio.wait_for(
                self._exchange(method, path, body), timeout or self.timeout
            )
        except (OSError, EOFError, TimeoutError, h11.ProtocolError) as exc:
            await self.close()
            raise OperatorUnavailable(
                f"{method} {path} on {self.endpoint.host}:{self.endpoint.port}: "
                f"{type(exc).__name__}: {exc}".rstrip(": ")
            ) from None
        if 200 <= status < 300:
            return data
        message = _message(data)
        if status >= 500 or status == 429:
            raise OperatorUnavailable(f"{method} {path}: {status}: {message}")
        raise OperatorRefused(status, message)

    async def _exchange(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        for attempt in (1, 2):
            fresh = self._conn is None
            if fresh:
                await self._connect()
            try:
                return await self._send(method, path, body)
            except (ConnectionError, EOFError):
                # A kept-alive connection the server closed meanwhile: once more on a new one.
                await self.close()
                if fresh or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(
            self.endpoint.host, self.endpoint.port
        )
        self._conn = h11.Connection(h11.CLIENT)

    async def _send(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        conn, reader, writer = self._conn, self._reader, self._writer
        assert conn is not None and reader is not None and writer is not None
        payload = b"" if body is None else json.dumps(body).encode()
        headers = [
            ("Host", f"{self.endpoint.host}:{self.endpoint.port}"),
            ("Accept", "application/json"),
            ("Content-Length", str(len(payload))),
        ]
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        if self.token:
            headers.append(("Authorization", f"Bearer {self.token}"))
        writer.write(conn.send(h11.Request(method=method, target=path, headers=headers)) or b"")
        if payload:
            writer.write(conn.send(h11.Data(data=payload)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        status = 0
        chunks: list[bytes] = []
        size = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data and conn.their_state is h11.SEND_RESPONSE:
                    raise EOFError("the connection closed before an answer")
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_ANSWER:
                    raise h11.ProtocolError("answer too large")
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("the connection closed during the answer")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            await self.close()
        raw = b"".join(chunks)
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")


def _message(data: Any) -> str:
    if isinstance(data, dict):
        error = data.get("error")
        message = error.get("message") if isinstance(error, dict) else None
        if isinstance(message, str):
            return message
    return str(data)[:500]
