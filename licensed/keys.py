"""Ed25519 signing keys, license keys, machine leases and the JWKS.

Signing keys live as one file each under ``DATA_DIR/keys`` (mode 0600; a key
readable by group or others is refused). The newest key signs; older keys
only verify, and the JWKS lists them until everything they signed has expired.

License key: ``<PREFIX>-<TIER>-<JWS>``. The JWS is deterministic (Ed25519 and
sorted JSON), so a key is re-derived from its licence row whenever needed and
never stored.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.encoding
import nacl.exceptions
import nacl.signing

from . import jws
from .errors import ConfigError, InvalidToken
from .files import write_private
from .plans import Catalog, Product

LIFETIME_SECONDS = 100 * 365 * 86400
"""Offline life of a lifetime licence's key: ``exp`` is mandatory, so a century."""

KEY_SUFFIX = ".ed25519.json"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    created_at: float
    key: nacl.signing.SigningKey

    @property
    def verify_key(self) -> nacl.signing.VerifyKey:
        return self.key.verify_key

    def jwk(self) -> dict[str, str]:
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
            "x": jws.b64url_encode(bytes(self.verify_key)),
        }


def kid_for(verify_key: nacl.signing.VerifyKey) -> str:
    """A stable id derived from the public key itself."""
    return jws.b64url_encode(hashlib.sha256(bytes(verify_key)).digest()[:12])


def _check_private(path: Path) -> None:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"signing key {path} is readable by others (mode {stat.S_IMODE(mode):o}); run: chmod 600 on it"
        )


def _read_key(path: Path) -> SigningKey:
    _check_private(path)
    try:
        return key_from_body(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as err:
        raise ConfigError(f"signing key {path} cannot be read: {err}") from err


def create_key(keys_dir: Path, now: float | None = None) -> SigningKey:
    """Write a new signing key; it becomes the newest, so it signs from now on."""
    key = nacl.signing.SigningKey.generate()
    signing = SigningKey(kid=kid_for(key.verify_key), created_at=time.time() if now is None else now, key=key)
    write_key(keys_dir, signing)
    return signing


def key_body(key: SigningKey) -> dict[str, Any]:
    """The JSON a key file holds: what :func:`key_from_body` reads back."""
    return {
        "kid": key.kid,
        "created_at": key.created_at,
        "seed": key.key.encode(encoder=nacl.encoding.URLSafeBase64Encoder).decode("ascii"),
    }


def key_from_body(data: Any) -> SigningKey:
    """A key from its JSON body; raises ValueError when malformed or when its kid is not its own."""
    try:
        key = nacl.signing.SigningKey(data["seed"], encoder=nacl.encoding.URLSafeBase64Encoder)
        created = float(data["created_at"])
    except (ValueError, KeyError, TypeError, nacl.exceptions.CryptoError) as err:
        raise ValueError(f"not a signing key: {err}") from err
    kid = kid_for(key.verify_key)
    if data.get("kid") != kid:
        raise ValueError("kid does not match its key")
    return SigningKey(kid=kid, created_at=created, key=key)


def key_path(keys_dir: Path, kid: str) -> Path:
    return keys_dir / f"{kid}{KEY_SUFFIX}"


def write_key(keys_dir: Path, key: SigningKey, *, replace: bool = True) -> Path:
    """Write ``key`` to its file (mode 0600, written whole: see :func:`files.write_private`).

    With ``replace=False`` an existing file of that name is never overwritten:
    :class:`files.NameTaken` is raised instead.
    """
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = key_path(keys_dir, key.kid)
    write_private(path, json.dumps(key_body(key)).encode(), force=replace)
    return path


class KeyRing:
    """All signing keys of this server, newest last; reloads when the folder changes."""

    RELOAD_EVERY = 2.0

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir
        self._lock = threading.Lock()
        self._keys: list[SigningKey] = []
        self._by_kid: dict[str, SigningKey] = {}
        self._stamp: int = -1
        self._checked = 0.0
        self._load()

    def _load(self) -> None:
        if not self.keys_dir.is_dir():
            raise ConfigError(f"no signing keys in {self.keys_dir}: run `licensed init`")
        stamp = self.keys_dir.stat().st_mtime_ns
        keys = sorted(
            (_read_key(p) for p in self.keys_dir.glob(f"*{KEY_SUFFIX}")),
            key=lambda k: (k.created_at, k.kid),
        )
        if not keys:
            raise ConfigError(f"no signing keys in {self.keys_dir}: run `licensed init`")
        self._keys = keys
        self._by_kid = {k.kid: k for k in keys}
        self._stamp = stamp

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.RELOAD_EVERY:
            return
        with self._lock:
            self._checked = now
            try:
                if self.keys_dir.stat().st_mtime_ns != self._stamp:
                    self._load()
            except (OSError, ConfigError):
                # Keep signing with the keys already loaded; start-up checks are strict.
                pass

    @property
    def keys(self) -> list[SigningKey]:
        self._maybe_reload()
        return list(self._keys)

    @property
    def current(self) -> SigningKey:
        self._maybe_reload()
        return self._keys[-1]

    def get(self, kid: str) -> SigningKey | None:
        self._maybe_reload()
        return self._by_kid.get(kid)

    def verify_key(self, kid: str) -> nacl.signing.VerifyKey | None:
        key = self.get(kid)
        return key.verify_key if key else None

    def jwks(self, still_needed: Callable[[SigningKey, float], bool]) -> dict[str, Any]:
        """Keys able to verify something unexpired: the current one, and each
        retired key for which ``still_needed(key, retired_at)`` holds."""
        keys = self.keys
        listed = [keys[-1]]
        for older, newer in itertools.pairwise(keys):
            if still_needed(older, newer.created_at):
                listed.append(older)
        return {"keys": [k.jwk() for k in sorted(listed, key=lambda k: -k.created_at)]}


# --- license keys and leases -------------------------------------------------


def machine_hash(machine_id: str) -> str:
    return hashlib.sha256(machine_id.encode("utf-8")).hexdigest()


def imported_key_hash(key: str) -> str:
    """What an imported key (one sold before licensed, any text) is stored and found as:
    the SHA-256 of its exact text, never the text."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


VERIFIED_CACHE_SIZE = 20_000
"""Keys whose signature verified (by a digest of their exact text): more than a vendor's installations."""

_verified: dict[bytes, tuple[str, str]] = {}
"""A verified token's digest → its kid and its claims as JSON text: a few hundred bytes each."""


def sign_claims(ring: KeyRing, claims: dict[str, Any], kid: str | None = None) -> str:
    key = ring.get(kid) if kid else ring.current
    if key is None:
        raise InvalidToken("signing key is gone")
    return jws.sign(claims, key.key, key.kid)


def verify_token(token: str, ring: KeyRing) -> tuple[dict[str, Any], dict[str, Any]]:
    """``jws.verify`` against the ring, remembering tokens that verified.

    A token is immutable, so its signature needs checking once; a remembered
    one still needs its signing key in the ring, so a key taken out of the ring
    stops verifying what it signed. The memory is emptied when full.
    """
    digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
    known = _verified.get(digest)
    if known is not None and ring.get(known[0]) is not None:
        return {"alg": jws.ALGORITHM, "typ": "JWT", "kid": known[0]}, json.loads(known[1])
    header, claims = jws.verify(token, ring.verify_key)
    if len(_verified) >= VERIFIED_CACHE_SIZE:
        _verified.clear()
    _verified[digest] = (str(header["kid"]), json.dumps(claims))
    return header, claims


def format_license_key(prefix: str, tier: str, token: str) -> str:
    return f"{prefix}-{tier}-{token}"


@dataclass(frozen=True)
class ParsedKey:
    product: Product
    tier: str
    kid: str
    claims: dict[str, Any]


def parse_license_key(key: str, catalog: Catalog, ring: KeyRing) -> ParsedKey:
    """Verify a presented license key; raises InvalidToken on anything wrong."""
    if not isinstance(key, str) or len(key) > jws.MAX_TOKEN_LENGTH:
        raise InvalidToken("not a license key")
    product = catalog.product_for_key(key)
    if product is None:
        raise InvalidToken("unknown key prefix")
    rest = key[len(product.key_prefix) + 1 :]
    tier, sep, token = rest.partition("-")
    if not sep or not tier:
        raise InvalidToken("tier missing")
    header, claims = verify_token(token, ring)
    if claims.get("prod") != product.id or claims.get("tier") != tier:
        raise InvalidToken("key text does not match its claims")
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise InvalidToken("sub missing")
    # Leases are signed by the same keys and carry sub/prod/tier too: a key has
    # ``max`` and never ``mid``, so a lease cannot pass for a license key.
    if "mid" in claims or not isinstance(claims.get("max"), int):
        raise InvalidToken("not a license key")
    return ParsedKey(product=product, tier=tier, kid=header["kid"], claims=claims)


def verify_lease(lease: str, ring: KeyRing) -> dict[str, Any]:
    _header, claims = jws.verify(lease, ring.verify_key)
    if not isinstance(claims.get("mid"), str):
        raise InvalidToken("not a lease")
    return claims
