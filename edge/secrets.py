"""Private keys at rest: AES-256-GCM under a key derived from the operator's secret.

Certificate and ACME account keys are stored in the database encrypted, so a copy of the
database (a backup, a replica, a leaked dump) does not hand out the platform's TLS keys. The
secret is a string every edge is given (``--certificate-secret-file`` or
``$ZEITWORK_CERTIFICATE_SECRET``); the AES key is derived from it with HKDF-SHA256. A blob is
``version (1 byte) | nonce (12 bytes) | ciphertext and GCM tag``, the version byte being
authenticated too.

Limits: HKDF does not stretch a weak secret, so the secret must be random (``openssl rand
-base64 32``), not a password; :func:`load_secret` refuses short ones. Changing the secret
makes every stored key undecryptable: the certificates must then be issued again.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ENV_VAR = "ZEITWORK_CERTIFICATE_SECRET"
MIN_SECRET_LENGTH = 16

VERSION = 1
_NONCE = 12
_TAG = 16
# Fixed per purpose: the same secret used elsewhere derives a different key.
_SALT = b"zeitwork certificate keys at rest"
_INFO = b"zeitwork/aes-256-gcm/v1"


class SecretError(ValueError):
    """A secret is missing or unusable, or a blob does not decrypt with it."""


def _aead(secret: str) -> AESGCM:
    if not secret:
        raise SecretError("the certificate secret is empty")
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=_SALT, info=_INFO).derive(secret.encode())
    return AESGCM(key)


def encrypt(secret: str, plaintext: bytes) -> bytes:
    """``plaintext`` (a PEM private key) encrypted under ``secret``, as a versioned blob."""
    nonce = os.urandom(_NONCE)
    header = bytes((VERSION,))
    return header + nonce + _aead(secret).encrypt(nonce, plaintext, header)


def decrypt(secret: str, blob: bytes) -> bytes:
    """The plaintext of a blob made by :func:`encrypt`; :class:`SecretError` when it does not
    decrypt (most likely: the secret is not the one the key was encrypted with)."""
    blob = bytes(blob)
    if len(blob) < 1 + _NONCE + _TAG:
        raise SecretError(f"not an encrypted key: {len(blob)} bytes is too short")
    if blob[0] != VERSION:
        raise SecretError(
            f"not an encrypted key of a known format (version {blob[0]}, this release"
            f" reads version {VERSION})"
        )
    header, nonce, ciphertext = blob[:1], blob[1 : 1 + _NONCE], blob[1 + _NONCE :]
    try:
        return _aead(secret).decrypt(nonce, ciphertext, header)
    except InvalidTag:
        raise SecretError(
            "cannot decrypt the stored private key: the certificate secret differs from the"
            " one it was encrypted with (is every edge given the same secret?), or the stored"
            " data is damaged"
        ) from None


def load_secret(path: Path | str | None) -> str | None:
    """The certificate secret: the file's content (surrounding whitespace dropped) when a
    path is given, else ``$ZEITWORK_CERTIFICATE_SECRET``, else None (no secret configured).

    :class:`SecretError` for an unreadable file or a secret shorter than 16 characters.
    """
    if path is not None:
        try:
            secret = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretError(f"cannot read the certificate secret file {path}: {exc}") from exc
        where = f"the certificate secret file {path}"
    else:
        value = os.environ.get(ENV_VAR)
        if value is None:
            return None
        secret = value.strip()
        where = f"${ENV_VAR}"
    if len(secret) < MIN_SECRET_LENGTH:
        raise SecretError(
            f"{where} holds {len(secret)} characters; the secret must have at least"
            f" {MIN_SECRET_LENGTH} random ones (e.g. from `openssl rand -base64 32`)"
        )
    return secret
