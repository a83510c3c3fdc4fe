"""DNS look-ups that verify a customer's domain points at the edge.

A domain is verified when its CNAME is the edge host, or when the TXT record
``_zeitwork.<domain>`` holds the domain's verification token (for apex domains, which
cannot have a CNAME, and for customers behind another proxy). Look-ups go through c-ares
(aiodns) to the configured nameservers, or the system's; each is bounded by a timeout.

Limits: only the domain's own CNAME record counts (a chain through another name is not
followed), and a failed look-up is a result, never an exception: its reason (``NXDOMAIN``,
``NODATA``, ``timeout`` ...) is part of the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import aiodns
import pycares
from pycares import errno as ares_errno

# Per-look-up bound of a verification (seconds).
LOOKUP_TIMEOUT = 3.0
TXT_PREFIX = "_zeitwork."

# c-ares status codes as DNS people say them.
_REASONS = {
    ares_errno.ARES_ENOTFOUND: "NXDOMAIN",
    ares_errno.ARES_ENODATA: "NODATA",
    ares_errno.ARES_ETIMEOUT: "timeout",
    ares_errno.ARES_ESERVFAIL: "SERVFAIL",
    ares_errno.ARES_EREFUSED: "REFUSED",
    ares_errno.ARES_ECONNREFUSED: "nameserver unreachable",
    ares_errno.ARES_EBADNAME: "bad name",
}


def normalize(name: str) -> str:
    """A host name as DNS compares it: no trailing dot, lower case."""
    return name.strip().rstrip(".").lower()


def txt_name(domain: str) -> str:
    return TXT_PREFIX + domain


@dataclass(frozen=True, slots=True)
class Lookup:
    """The records of one type found for a name, or why there are none."""

    values: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class DomainCheck:
    cname: str | None
    cname_error: str | None
    txt_found: bool
    txt_error: str | None
    # The CNAME is the edge host.
    pointing: bool

    @property
    def verified(self) -> bool:
        return self.pointing or self.txt_found

    @property
    def verified_by(self) -> Literal["cname", "txt"] | None:
        if self.pointing:
            return "cname"
        return "txt" if self.txt_found else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    code = exc.args[0] if exc.args else None
    if isinstance(code, int) and code in _REASONS:
        return _REASONS[code]
    return str(exc.args[1]) if len(exc.args) > 1 else str(exc) or type(exc).__name__


async def _query(
    resolver: aiodns.DNSResolver, name: str, qtype: Literal["CNAME", "TXT"], seconds: float
) -> Lookup:
    wanted = pycares.QUERY_TYPE_CNAME if qtype == "CNAME" else pycares.QUERY_TYPE_TXT
    try:
        result = await asyncio.wait_for(resolver.query_dns(name, qtype), seconds)
    except (aiodns.error.DNSError, TimeoutError) as exc:
        return Lookup(error=_reason(exc))
    values: list[str] = []
    for record in result.answer:
        if record.type != wanted:
            continue
        data = record.data
        if isinstance(data, pycares.CNAMERecordData):
            values.append(normalize(data.cname))
        elif isinstance(data, pycares.TXTRecordData):
            values.append(data.data.decode("utf-8", "replace"))
    return Lookup(tuple(values)) if values else Lookup(error="NODATA")


async def lookup(
    names: Sequence[tuple[str, Literal["CNAME", "TXT"]]],
    *,
    nameservers: Sequence[str] = (),
    seconds: float = LOOKUP_TIMEOUT,
) -> list[Lookup]:
    """Each ``(name, type)`` looked up at once, each within ``seconds``; ``nameservers`` are
    ``host`` or ``host:port`` (``[v6]:port``), none meaning the system's."""
    try:
        # A lost UDP answer is retried once within the bound.
        resolver = aiodns.DNSResolver(
            nameservers=list(nameservers) or None, timeout=seconds / 2, tries=2
        )
    except (pycares.AresError, ValueError) as exc:
        reason = f"nameservers {','.join(nameservers)!r} unusable: {_reason(exc)}"
        return [Lookup(error=reason) for _ in names]
    try:
        return list(
            await asyncio.gather(*(_query(resolver, name, qtype, seconds) for name, qtype in names))
        )
    finally:
        await resolver.close()


async def check_domain(
    domain: str,
    token: str,
    edge_host: str,
    *,
    nameservers: Sequence[str] = (),
    seconds: float = LOOKUP_TIMEOUT,
) -> DomainCheck:
    """Whether ``domain`` has the edge host as its CNAME, or ``token`` in its TXT record."""
    cname, txt = await lookup(
        [(domain, "CNAME"), (txt_name(domain), "TXT")], nameservers=nameservers, seconds=seconds
    )
    target = cname.values[0] if cname.values else None
    return DomainCheck(
        cname=target,
        cname_error=cname.error,
        txt_found=any(value.strip() == token for value in txt.values),
        txt_error=txt.error,
        pointing=target is not None and target == normalize(edge_host),
    )
