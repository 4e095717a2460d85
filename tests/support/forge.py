"""Hand-built tokens for tests: forgeries and lookalikes the server must refuse.

These are written without :mod:`jws` on purpose, so a test does not trust the
code it is checking to build the attack.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import nacl.signing


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def segment(value: dict[str, Any]) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def split_key(key: str) -> tuple[str, str, str]:
    """``(prefix, tier, jws)``: prefix and tier hold no ``-``, the JWS may."""
    prefix, tier, token = key.split("-", 2)
    return prefix, tier, token


def header_of(token: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(unb64(token.split(".")[0]))
    return value


def claims_of(token: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(unb64(token.split(".")[1]))
    return value


def ed25519_token(header: dict[str, Any], claims: dict[str, Any], key: nacl.signing.SigningKey) -> str:
    signing_input = f"{segment(header)}.{segment(claims)}"
    return f"{signing_input}.{b64(key.sign(signing_input.encode()).signature)}"


def hs256_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = f"{segment(header)}.{segment(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def unsigned_token(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{segment(header)}.{segment(claims)}."


def flip(text: str, index: int) -> str:
    """``text`` with one base64url character at ``index`` replaced by another."""
    old = text[index]
    new = "A" if old != "A" else "B"
    return text[:index] + new + text[index + 1 :]
