"""Bearer tokens of the admin API: the admin token, node tokens, the bootstrap token.

- The admin token may do everything. It comes from configuration (``ZEITWORK_ADMIN_TOKEN``
  or ``--admin-token-file``); without one, the edge generates one on first start into its
  data directory (mode 0600) and logs where it is.
- A node token (``zwn_<node id>_<secret>``) is issued once when an agent registers; the
  database keeps only its SHA-256. It may call the agent endpoints of its own node only.
- The bootstrap token (optional, ``ZEITWORK_BOOTSTRAP_TOKEN``) may only register nodes, so
  a fleet's agents can be provisioned without the admin token.

Tokens are compared in constant time (``hmac.compare_digest``). Every 401 and 403 is logged
with the client address, the method and the path (never the token).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn
from uuid import UUID

from edge.admin.api import ApiError, Auth
from edge.admin.http import Request
from edge.store import nodes
from edge.store.errors import NotFound

log = logging.getLogger("edge.admin")

NODE_TOKEN_PREFIX = "zwn_"  # noqa: S105 (a prefix, not a secret)
ADMIN_TOKEN_PREFIX = "zwa_"  # noqa: S105


@dataclass(frozen=True, slots=True)
class Principal:
    kind: Literal["admin", "bootstrap", "node"]
    node_id: UUID | None = None

    @property
    def name(self) -> str:
        return f"node:{self.node_id}" if self.kind == "node" else self.kind


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_node_token(node_id: UUID) -> str:
    return f"{NODE_TOKEN_PREFIX}{node_id.hex}_{secrets.token_urlsafe(32)}"


def _node_id_of(token: str) -> UUID | None:
    if not token.startswith(NODE_TOKEN_PREFIX):
        return None
    hex_id, _, secret = token[len(NODE_TOKEN_PREFIX) :].partition("_")
    if not secret:
        return None
    try:
        return UUID(hex=hex_id)
    except ValueError:
        return None


def _same_id(text: str | None, principal: Principal) -> bool:
    try:
        return text is not None and UUID(text) == principal.node_id
    except ValueError:
        return False


def load_admin_token(configured: str | None, token_file: Path) -> tuple[str, str]:
    """The admin token and where it came from.

    A configured token wins. Otherwise the token in ``token_file``; when the file is
    missing, or empty (a truncated file holds no token, and an empty token would let no
    one in), a new token is generated into it with mode 0600. The file is read and written
    under an exclusive lock, so edges starting at once on one data directory agree on one
    token.
    """
    if configured and configured.strip():
        return configured.strip(), "configuration"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(token_file, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        token = handle.read().strip()
        if token:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & 0o077:
                log.warning(
                    "the admin token file %s is readable by others (mode %o); chmod 600 it",
                    token_file,
                    mode & 0o777,
                )
            return token, str(token_file)
        token = ADMIN_TOKEN_PREFIX + secrets.token_urlsafe(32)
        # The file may predate this (empty, with a loose mode): tighten before writing.
        os.fchmod(handle.fileno(), 0o600)
        handle.seek(0)
        handle.truncate()
        handle.write(token + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    log.warning("generated an admin token: it is in %s (readable by this user only)", token_file)
    return token, f"{token_file} (generated)"


class Authenticator:
    def __init__(self, pool: Any, admin_token: str, bootstrap_token: str | None = None) -> None:
        if not admin_token:
            raise ValueError("the admin token must not be empty")
        self.pool = pool
        self._admin = admin_token.encode()
        self._bootstrap = bootstrap_token.encode() if bootstrap_token else None

    async def authenticate(
        self, request: Request, auth: Auth, params: dict[str, str]
    ) -> Principal | None:
        if auth == "none":
            return None
        token = self._bearer(request)
        principal = await self._identify(request, token)
        if principal.kind == "admin":
            return principal
        allowed = (auth == "register" and principal.kind == "bootstrap") or (
            auth == "node" and principal.kind == "node" and _same_id(params.get("id"), principal)
        )
        if not allowed:
            self._deny(request, 403, f"a {principal.kind} token may not do this")
        return principal

    def _bearer(self, request: Request) -> str:
        header = request.headers.get("authorization")
        if header is None:
            self._deny(request, 401, "missing bearer token")
        scheme, _, token = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            self._deny(request, 401, "the Authorization header must be 'Bearer <token>'")
        return token.strip()

    async def _identify(self, request: Request, token: str) -> Principal:
        given = token.encode()
        if hmac.compare_digest(given, self._admin):
            return Principal("admin")
        if self._bootstrap is not None and hmac.compare_digest(given, self._bootstrap):
            return Principal("bootstrap")
        node_id = _node_id_of(token)
        # Without a database (an edge on a routes file) there are no nodes to know.
        if node_id is not None and self.pool is not None:
            try:
                node = await nodes.get(self.pool, node_id)
            except NotFound:
                node = None
            if (
                node is not None
                and node.token_hash
                and hmac.compare_digest(hash_token(token).encode(), node.token_hash.encode())
            ):
                return Principal("node", node.id)
        self._deny(request, 401, "invalid token")

    def _deny(self, request: Request, status: int, reason: str) -> NoReturn:
        code = "unauthorized" if status == 401 else "forbidden"
        log.warning(
            "admin API: %d %s: %s %s from %s: %s",
            status,
            code,
            request.method,
            request.raw_path,
            request.client,
            reason,
        )
        headers = [("www-authenticate", 'Bearer realm="zeitwork"')] if status == 401 else []
        raise ApiError(status, code, reason, headers=headers)
