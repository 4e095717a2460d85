"""``licensed keys export`` / ``import``: every signing key in one passphrase-encrypted file.

The signing keys are not in the database, so a database restored on a new
machine (Litestream, a nightly backup) is useless without them: every key
ever sold would answer ``INVALID_KEY``. The export is the one file to keep
off the server, apart from its passphrase.

Format: one JSON object, ``{"format": "licensed-keys", "version": 1, "kdf":
"argon2id13", "opslimit", "memlimit", "salt", "box"}``. The box is libsodium's
SecretBox (XSalsa20-Poly1305, nonce first) under a key that Argon2id derives
from the passphrase with the stated limits and salt. A changed limit or salt
derives another key, so the header needs no authentication of its own; the
plaintext repeats format and version and lists the keys as their key files
hold them (kid, created_at, seed).

An import checks the whole file before writing anything, derives each kid
again from its key (kids name public keys, so a kid that does not match is a
corrupt or forged file), and never replaces a key file: a different key under
a kid already here is refused.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash
import nacl.secret

from . import keys
from .config import Config
from .errors import ConfigError, Conflict, KeyConflict, KeyFileError, WrongPassphrase
from .files import NameTaken, write_private
from .keys import KeyRing, SigningKey

FORMAT = "licensed-keys"
VERSION = 1
KDF = "argon2id13"
_ARGON = nacl.pwhash.argon2id

OPSLIMIT = _ARGON.OPSLIMIT_MODERATE
MEMLIMIT = _ARGON.MEMLIMIT_MODERATE
"""libsodium's "moderate" Argon2id limits: 256 MiB and about 0.6 s on the project's machine,
paid once per export or import."""
MAX_OPSLIMIT = _ARGON.OPSLIMIT_SENSITIVE
MAX_MEMLIMIT = _ARGON.MEMLIMIT_SENSITIVE
"""The most an import spends on a file's stated limits (1 GiB): a crafted header cannot
make it allocate more."""
MAX_FILE_BYTES = 1 << 20


@dataclass(frozen=True)
class ImportResult:
    imported: list[str]
    present: list[str]


def passphrase(config: Config) -> bytes:
    """The passphrase from ``LICENSED_KEYS_PASSPHRASE``; a clear error when it is not set."""
    if not config.keys_passphrase:
        raise ConfigError(
            "LICENSED_KEYS_PASSPHRASE is not set: give the passphrase of the key file in the "
            "environment or the env file (keep a copy of it off this server)"
        )
    return config.keys_passphrase.encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def _unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeyFileError(f"{what} is missing")
    try:
        return base64.urlsafe_b64decode(value.encode("ascii"))
    except (ValueError, binascii.Error) as err:
        raise KeyFileError(f"{what} is not base64") from err


def _box(secret: bytes, salt: bytes, opslimit: int, memlimit: int) -> nacl.secret.SecretBox:
    try:
        key = _ARGON.kdf(nacl.secret.SecretBox.KEY_SIZE, secret, salt, opslimit=opslimit, memlimit=memlimit)
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as err:
        raise KeyFileError(f"cannot derive the key from the passphrase: {err}") from err
    return nacl.secret.SecretBox(key)


def seal(
    ring_keys: list[SigningKey],
    secret: bytes,
    now: float,
    *,
    opslimit: int = OPSLIMIT,
    memlimit: int = MEMLIMIT,
) -> tuple[bytes, nacl.secret.SecretBox]:
    """The export file's bytes for ``ring_keys``, and the box that opens them."""
    salt = secrets.token_bytes(_ARGON.SALTBYTES)
    box = _box(secret, salt, opslimit, memlimit)
    plain = {
        "format": FORMAT,
        "version": VERSION,
        "exported_at": now,
        "keys": [keys.key_body(k) for k in ring_keys],
    }
    sealed = box.encrypt(json.dumps(plain, sort_keys=True).encode("utf-8"))
    envelope = {
        "format": FORMAT,
        "version": VERSION,
        "kdf": KDF,
        "opslimit": opslimit,
        "memlimit": memlimit,
        "salt": _b64(salt),
        "box": _b64(bytes(sealed)),
    }
    return (json.dumps(envelope, indent=1) + "\n").encode("ascii"), box


def _envelope(data: bytes) -> tuple[bytes, int, int, bytes]:
    """(salt, opslimit, memlimit, box) of a file, checked before any key is derived."""
    try:
        envelope = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise KeyFileError("not a licensed key file (not JSON)") from err
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise KeyFileError("not a licensed key file")
    if envelope.get("version") != VERSION or envelope.get("kdf") != KDF:
        raise KeyFileError(
            f"unsupported key file version {envelope.get('version')!r} ({envelope.get('kdf')!r}); "
            "a newer licensed wrote it"
        )
    limits: list[int] = []
    for name, low, high in (
        ("opslimit", _ARGON.OPSLIMIT_MIN, MAX_OPSLIMIT),
        ("memlimit", _ARGON.MEMLIMIT_MIN, MAX_MEMLIMIT),
    ):
        value = envelope.get(name)
        if type(value) is not int or not low <= value <= high:
            raise KeyFileError(f"{name} {value!r} is outside {low}..{high}")
        limits.append(value)
    salt = _unb64(envelope.get("salt"), "salt")
    if len(salt) != _ARGON.SALTBYTES:
        raise KeyFileError("salt has the wrong length")
    return salt, limits[0], limits[1], _unb64(envelope.get("box"), "box")


def unseal(data: bytes, secret: bytes) -> list[SigningKey]:
    """The keys of an export file's bytes; raises WrongPassphrase or KeyFileError."""
    salt, opslimit, memlimit, sealed = _envelope(data)
    box = _box(secret, salt, opslimit, memlimit)
    try:
        plain = box.decrypt(sealed)
    except (nacl.exceptions.CryptoError, ValueError) as err:
        raise WrongPassphrase(
            "cannot decrypt the key file: LICENSED_KEYS_PASSPHRASE is not the passphrase it was "
            "exported with, or the file was altered"
        ) from err
    return _keys_of(plain)


def _keys_of(plain: bytes) -> list[SigningKey]:
    try:
        body = json.loads(plain.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise KeyFileError("the decrypted content is not JSON") from err
    if not isinstance(body, dict) or body.get("format") != FORMAT or body.get("version") != VERSION:
        raise KeyFileError("the decrypted content is not a key list")
    entries = body.get("keys")
    if not isinstance(entries, list) or not entries:
        raise KeyFileError("the file holds no keys")
    found: dict[str, SigningKey] = {}
    for number, entry in enumerate(entries, start=1):
        try:
            key = keys.key_from_body(entry)
        except ValueError as err:
            kid = entry.get("kid") if isinstance(entry, dict) else None
            raise KeyFileError(f"key {number} ({kid!r}) is corrupt or forged: {err}") from err
        if key.kid in found:
            raise KeyFileError(f"key {key.kid} is listed twice")
        found[key.kid] = key
    return list(found.values())


def _exists(target: Path) -> Conflict:
    return Conflict(f"{target} exists; add --force to overwrite it", code="KEY_FILE_EXISTS")


def _write_private(target: Path, data: bytes, *, force: bool) -> None:
    """Write ``data`` to ``target`` with mode 0600 whatever the umask, never half a file."""
    if target.is_dir():
        raise KeyFileError(f"{target} is a directory; give a file name")
    if target.exists() and not force:
        raise _exists(target)
    if not target.parent.is_dir():
        raise KeyFileError(f"no directory {target.parent}")

    try:
        write_private(target, data, force=force)
    except NameTaken as err:
        raise _exists(target) from err
    except OSError as err:
        raise KeyFileError(f"cannot write {target}: {err.strerror or err}") from err


def export_keys(
    config: Config,
    target: Path,
    now: float,
    *,
    force: bool = False,
    opslimit: int = OPSLIMIT,
    memlimit: int = MEMLIMIT,
) -> list[str]:
    """Write every signing key of ``config`` to ``target``; returns their kids, oldest first.

    The written file is read back and opened with the same box before this
    returns, so an export that could not be imported is never reported done.
    """
    secret = passphrase(config)
    ring_keys = KeyRing(config.keys_dir).keys
    data, box = seal(ring_keys, secret, now, opslimit=opslimit, memlimit=memlimit)
    target = target.absolute()
    _write_private(target, data, force=force)
    try:
        written = target.read_bytes()
        check = _keys_of(box.decrypt(_envelope(written)[3]))
    except (OSError, nacl.exceptions.CryptoError) as err:
        raise KeyFileError(f"{target} does not read back: {err}") from err
    if [k.kid for k in check] != [k.kid for k in ring_keys]:
        raise KeyFileError(f"{target} does not read back the keys written")
    return [k.kid for k in ring_keys]


def _local_keys(keys_dir: Path) -> dict[str, SigningKey]:
    """The keys already here, by kid; an unreadable key file stops the import."""
    if not keys_dir.is_dir() or not any(keys_dir.glob(f"*{keys.KEY_SUFFIX}")):
        return {}
    return {k.kid: k for k in KeyRing(keys_dir).keys}


def _same(a: SigningKey, b: SigningKey) -> bool:
    return bytes(a.key) == bytes(b.key)


def import_keys(config: Config, source: Path) -> ImportResult:
    """Add the keys of the export file ``source`` that are not here yet; all or nothing."""
    secret = passphrase(config)
    try:
        with source.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as err:
        raise KeyFileError(f"cannot read {source}: {err.strerror or err}") from err
    if len(data) > MAX_FILE_BYTES:
        raise KeyFileError(f"{source} is larger than a key file can be")
    incoming = unseal(data, secret)
    here = _local_keys(config.keys_dir)
    imported: list[SigningKey] = []
    present: list[str] = []
    for key in incoming:
        mine = here.get(key.kid)
        path = keys.key_path(config.keys_dir, key.kid)
        if mine is None and path.exists():
            # A file under this kid's name that the ring does not know by that kid.
            raise KeyConflict(f"{path} exists and holds another key; nothing was imported")
        if mine is None:
            imported.append(key)
        elif _same(mine, key):
            present.append(key.kid)
        else:
            raise KeyConflict(
                f"key {key.kid} in {source} differs from the key of that kid here; one of them is "
                "forged or corrupt. Nothing was imported"
            )
    if imported:
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for key in imported:
        try:
            keys.write_key(config.keys_dir, key, replace=False)
        except NameTaken as err:
            raise KeyConflict(f"{err.filename} appeared during the import; it was left alone") from err
        except OSError as err:
            raise KeyFileError(f"cannot write {config.keys_dir}: {err.strerror or err}") from err
    return ImportResult(imported=[k.kid for k in imported], present=present)
