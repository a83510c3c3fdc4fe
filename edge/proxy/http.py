"""HTTP/1.1 constants and the proxy's own (error) responses.

Kept apart from the protocols so both sides share one table of hop-by-hop headers and one
way of writing a response the proxy generates itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from http import HTTPStatus
from typing import Final, cast

import httptools

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

VIA_TOKEN: Final = b"1.1 zeitwork"

CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"

# Methods the proxy forwards. CONNECT is refused: the edge is never an open forward proxy.
ALLOWED_METHODS: Final = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE"


def as_protocol(protocol: object) -> asyncio.BaseProtocol:
    """``protocol`` as the loop's APIs type it: the proxy's connection classes have asyncio's
    protocol methods without subclassing :class:`asyncio.Protocol` (mypyc compiles them, and
    a compiled class cannot subclass an interpreted one)."""
    return cast(asyncio.BaseProtocol, protocol)


class _NoCallbacks:
    """A parser's protocol that wants no callbacks."""


# What a closed connection holds instead of its parser: the parser's callbacks are bound
# methods of the connection, a reference cycle that would leave every closed connection to
# the cyclic garbage collector instead of freeing it at once.
CLOSED_REQUEST_PARSER: Final = httptools.HttpRequestParser(_NoCallbacks())
CLOSED_RESPONSE_PARSER: Final = httptools.HttpResponseParser(_NoCallbacks())


def length_mask(names: Iterable[bytes]) -> int:
    """Bit n set when one of ``names`` has n bytes: a field whose name's bit is clear is none
    of them, told without lowering and hashing the name."""
    return sum(1 << n for n in {len(name) for name in names})


def connection_options(value: bytes) -> list[bytes]:
    """Field names listed in a Connection header, besides close/keep-alive/upgrade."""
    # What nearly every message says: two compiled comparisons, no lowering or hashing.
    if value == b"keep-alive" or value == b"close":  # noqa: PLR1714
        return []
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


# Paths of ACME HTTP-01 challenges: never rate limited, never redirected to HTTPS.
ACME_CHALLENGE: Final = b"/.well-known/acme-challenge/"

# What a Host may hold for a redirect to be built from it: a name or IPv4 address, or an
# IPv6 literal in brackets; then a port, which the redirect drops.
_NAME_BYTES = b"abcdefghijklmnopqrstuvwxyz0123456789-."
_IPV6_BYTES = b"0123456789abcdef:."


def https_location(host: bytes, target: bytes, port_suffix: bytes) -> bytes | None:
    """``https://<host><port_suffix><target>`` for a plain HTTP request to ``host`` (its port
    dropped); None when the Host is not a plain host name or address."""
    name = host.lower()
    if name[:1] == b"[":
        literal, bracket, port = name[1:].partition(b"]")
        if not bracket or not literal or literal.translate(None, _IPV6_BYTES):
            return None
        if port and not (port[:1] == b":" and port[1:].isdigit()):
            return None
        name = b"[" + literal + b"]"
    else:
        name, colon, port = name.partition(b":")
        if colon and not port.isdigit():
            return None
        if not name or name.translate(None, _NAME_BYTES) or name[:1] in (b".", b"-"):
            return None
    if target[:1] != b"/":
        target = b"/"  # OPTIONS *
    return b"https://" + name + port_suffix + target


class RequestRejected(Exception):
    """A request the proxy answers itself with ``status`` instead of forwarding it (mostly
    refusals; also a redirect to HTTPS and an ACME challenge's answer)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        close: bool = True,
        extra: bytes = b"",
        body: bytes | None = None,
        content_type: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.close = close
        # Header lines of the answer besides the usual ones (a 429's Retry-After ...).
        self.extra = extra
        # The exact body and its type, instead of the short page naming status and message.
        self.body = body
        self.content_type = content_type


def error_response(
    status: int,
    message: str,
    *,
    close: bool,
    date: bytes,
    request_id: bytes = b"",
    extra: bytes = b"",
    head_only: bool = False,
    body: bytes | None = None,
    content_type: bytes = b"",
) -> bytes:
    """A small plain-text response the proxy writes itself (404, 502, 503 ...), or with
    ``body`` of ``content_type`` (an ACME challenge's key authorization)."""
    phrase = reason(status)
    if body is None:
        body = b"%d %s\n%s\n" % (status, phrase, message.encode("utf-8", "replace"))
    parts = [
        b"HTTP/1.1 %d %s\r\n" % (status, phrase),
        b"Server: zeitwork\r\nDate: ",
        date,
        b"\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
        % (content_type or b"text/plain; charset=utf-8", len(body)),
        b"Connection: close\r\n" if close else b"",
        b"X-Request-Id: " + request_id + b"\r\n" if request_id else b"",
        extra,
        b"\r\n",
    ]
    if not head_only:
        parts.append(body)
    return b"".join(parts)
