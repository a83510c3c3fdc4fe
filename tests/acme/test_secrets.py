"""Private keys at rest (edge/secrets.py): AES-256-GCM under the configured secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge import secrets
from edge.secrets import SecretError, decrypt, encrypt, load_secret

SECRET = "a secret of at least 16 characters"
KEY = (
    b"-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n"
    b"-----END PRIVATE KEY-----\n"
)


def test_round_trip() -> None:
    blob = encrypt(SECRET, KEY)
    assert decrypt(SECRET, blob) == KEY
    assert KEY not in blob and b"PRIVATE" not in blob
    # Version byte, 12-byte nonce, ciphertext and 16-byte tag.
    assert blob[0] == secrets.VERSION and len(blob) == 1 + 12 + len(KEY) + 16
    # A fresh nonce every time: the same key never encrypts to the same blob.
    assert encrypt(SECRET, KEY) != blob
    assert decrypt(SECRET, encrypt(SECRET, b"")) == b""


def test_a_wrong_secret_says_so() -> None:
    blob = encrypt(SECRET, KEY)
    with pytest.raises(SecretError, match="certificate secret differs") as exc:
        decrypt("another secret of 16 characters", blob)
    assert "same secret" in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_damaged_or_foreign_blobs_are_refused() -> None:
    blob = bytearray(encrypt(SECRET, KEY))
    blob[-1] ^= 1
    with pytest.raises(SecretError, match="damaged"):
        decrypt(SECRET, bytes(blob))
    # The version byte is authenticated too.
    with pytest.raises(SecretError, match="version 2"):
        decrypt(SECRET, b"\x02" + bytes(blob[1:]))
    with pytest.raises(SecretError, match="too short"):
        decrypt(SECRET, b"\x01abc")
    # A plain PEM key (what a store without encryption would hold) is not a blob.
    with pytest.raises(SecretError, match="known format"):
        decrypt(SECRET, KEY)
    with pytest.raises(SecretError, match="empty"):
        encrypt("", KEY)


def test_load_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(secrets.ENV_VAR, raising=False)
    assert load_secret(None) is None
    monkeypatch.setenv(secrets.ENV_VAR, f"  {SECRET}\n")
    assert load_secret(None) == SECRET
    path = tmp_path / "secret"
    path.write_text(f"{SECRET}-from-the-file\n")
    # The file wins over the environment.
    assert load_secret(path) == f"{SECRET}-from-the-file"
    assert load_secret(str(path)) == f"{SECRET}-from-the-file"
    with pytest.raises(SecretError, match=r"cannot read the certificate secret file .*missing"):
        load_secret(tmp_path / "missing")
    path.write_text("short\n")
    with pytest.raises(SecretError, match=r"holds 5 characters; .* at least 16"):
        load_secret(path)
    monkeypatch.setenv(secrets.ENV_VAR, "")
    with pytest.raises(SecretError, match=r"\$ZEITWORK_CERTIFICATE_SECRET holds 0 characters"):
        load_secret(None)
