"""Mutual HMAC challenge-response over the WriteCache's shared peer token.

The client sends HELLO {node, nonce_c}; the server answers CHALLENGE {node, nonce_s,
proof_s = HMAC(token, "server" | nonce_c | nonce_s)}; the client checks proof_s (so it never
sends data to an impostor) and answers AUTH {proof_c = HMAC(token, "client" | nonce_s |
nonce_c)}; the server checks it and answers OK. The token never crosses the wire and is never
logged; the nonces are 32 random bytes each, so a recorded exchange cannot be replayed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

__all__ = ["NONCE_BYTES", "load_token", "new_nonce", "proof", "verify"]

NONCE_BYTES = 32
MIN_TOKEN_BYTES = 16


def load_token(path: str | Path) -> bytes:
    """The token from its file (a Secret key), stripped; ValueError when too short."""
    token = Path(path).read_bytes().strip()
    if len(token) < MIN_TOKEN_BYTES:
        raise ValueError(f"peer token file {path}: the token must be at least "
                         f"{MIN_TOKEN_BYTES} bytes")
    return token


def new_nonce() -> str:
    return os.urandom(NONCE_BYTES).hex()


def proof(token: bytes, role: str, first: str, second: str) -> str:
    return hmac.new(token, f"{role}|{first}|{second}".encode(), hashlib.sha256).hexdigest()


def verify(token: bytes, role: str, first: str, second: str, claimed: object) -> bool:
    return isinstance(claimed, str) and hmac.compare_digest(
        proof(token, role, first, second), claimed)
