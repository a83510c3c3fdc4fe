"""HTTP/1.1 constants and the proxy's own (error) responses.

Kept apart from the protocols so both sides share one table of hop-by-hop headers and one
way of writing a response the proxy generates itself.
"""

from __future__ import annotations

from http import HTTPStatus

# Connection-specific headers (RFC 9110 7.6.1) plus the legacy ones proxies must not forward.
# Content-Length and Transfer-Encoding are re-derived from the framing the proxy chooses.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

VIA_TOKEN = b"1.1 zeitwork"

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# Methods the proxy forwards. CONNECT is refused: the edge is never an open forward proxy.
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"


def connection_options(value: bytes) -> list[bytes]:
    """Field names listed in a Connection header, besides close/keep-alive/upgrade."""
    lowered = value.lower()
    if lowered in _PLAIN_CONNECTION:
        return []
    return [
        name
        for name in (t.strip() for t in lowered.split(b","))
        if name and name not in _PLAIN_CONNECTION
    ]


_PLAIN_CONNECTION = frozenset({b"close", b"keep-alive", b"upgrade"})


def drop_fields(parts: list[bytes], start: int, names: list[bytes]) -> list[bytes]:
    """``parts`` without the fields called ``names`` (a head being built: ``start`` items of
    request or status line, then name, ": ", value, CRLF per field). Used for the fields a
    Connection header lists, which are rare, so a second pass is fine."""
    kept = parts[:start]
    for i in range(start, len(parts), 4):
        if parts[i].lower() not in names:
            kept += parts[i : i + 4]
    return kept


def reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b""


# Paths of ACME HTTP-01 challenges: never rate limited.
ACME_CHALLENGE = b"/.well-known/acme-challenge/"


class RequestRejected(Exception):
    """A request the proxy answers itself with ``status`` instead of forwarding it."""

    def __init__(
        self, status: int, message: str, *, close: bool = True, extra: bytes = b""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        # Header lines of the answer besides the usual ones (a 429's Retry-After ...).
        self.extra = extra


def error_response(
    status: int,
    message: str,
    *,
    close: bool,
    date: bytes,
    request_id: bytes = b"",
    extra: bytes = b"",
    head_only: bool = False,
) -> bytes:
    """A small plain-text response the proxy writes itself (404, 502, 503 ...)."""
    phrase = reason(status)
    body = b"%d %s\n%s\n" % (status, phrase, message.encode("utf-8", "replace"))
    parts = [
        b"HTTP/1.1 %d %s\r\n" % (status, phrase),
        b"Server: zeitwork\r\nDate: ",
        date,
        b"\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
        b"Connection: close\r\n" if close else b"",
        b"X-Request-Id: " + request_id + b"\r\n" if request_id else b"",
        extra,
        b"\r\n",
    ]
    if not head_only:
        parts.append(body)
    return b"".join(parts)
