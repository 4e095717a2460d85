"""Compact JWS with Ed25519 (``alg: EdDSA``), signed and verified with PyNaCl.

Only what licensed needs: one algorithm, pinned. Verification denies by
default: the header must be exactly ``EdDSA``/``JWT`` with a known ``kid``,
the signature must verify, and the payload must be a JSON object with an
integer ``exp``. Everything else is :class:`errors.InvalidToken`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import nacl.exceptions
import nacl.signing

from .errors import InvalidToken

ALGORITHM = "EdDSA"
MAX_TOKEN_LENGTH = 8192


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url, accepting only the one canonical spelling.

    The last character of a segment may carry unused bits; unless they are
    zero, up to 16 different strings would decode to the same signature, so a
    key could be altered and still verify.
    """
    if not _B64URL_TEXT.fullmatch(text) or len(text) % 4 == 1:
        raise InvalidToken("bad base64url")
    unused_bits = {2: 0b1111, 3: 0b11}.get(len(text) % 4, 0)
    if _B64URL_ALPHABET.index(text[-1]) & unused_bits:
        raise InvalidToken("non-canonical base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as err:
        raise InvalidToken("bad base64url") from err


_B64URL_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64URL_TEXT = re.compile(r"[A-Za-z0-9_-]+")


_COMPACT = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=True)


def compact_json(value: Mapping[str, Any]) -> bytes:
    """The exact bytes :func:`sign` signs for ``value``: keys sorted, no spaces, ASCII."""
    return _COMPACT.encode(value).encode()


def sign(claims: Mapping[str, Any], signing_key: nacl.signing.SigningKey, kid: str) -> str:
    """Sign ``claims``; deterministic, so the same claims give the same token."""
    if not isinstance(claims.get("exp"), int):
        raise ValueError("exp is mandatory")
    signing_input = f"{_header_segment(kid)}.{b64url_encode(compact_json(claims))}"
    signature = signing_key.sign(signing_input.encode("ascii")).signature
    return f"{signing_input}.{b64url_encode(signature)}"


@functools.lru_cache(maxsize=64)
def _header_segment(kid: str) -> str:
    """The encoded header: the same for every token a key signs."""
    return b64url_encode(compact_json({"alg": ALGORITHM, "typ": "JWT", "kid": kid}))


def verify(
    token: str, lookup: Callable[[str], nacl.signing.VerifyKey | None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(header, claims)`` of a token signed by a key ``lookup`` knows.

    Does not judge ``exp`` against a clock: callers decide what an expired
    token means (a server looks the licence up; an offline client refuses).
    """
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("token too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidToken("not a compact JWS")
    header = _json_object(b64url_decode(parts[0]))
    if header.get("alg") != ALGORITHM or header.get("typ", "JWT") != "JWT":
        raise InvalidToken("algorithm not allowed")
    if set(header) - {"alg", "typ", "kid"}:
        raise InvalidToken("unexpected header parameters")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise InvalidToken("kid missing")
    key = lookup(kid)
    if key is None:
        raise InvalidToken("unknown kid")
    signature = b64url_decode(parts[2])
    try:
        key.verify(f"{parts[0]}.{parts[1]}".encode("ascii"), signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, ValueError) as err:
        raise InvalidToken("bad signature") from err
    claims = _json_object(b64url_decode(parts[1]))
    exp = claims.get("exp")
    if not isinstance(exp, int) or isinstance(exp, bool):
        raise InvalidToken("exp missing")
    return header, claims


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise InvalidToken("not JSON") from err
    if not isinstance(value, dict):
        raise InvalidToken("not a JSON object")
    return value
