"""Client kit for a licensed server: drop this one module into a Python application.

What it does:

- ``activate(key, machine_id)`` takes a seat for this machine and stores the
  license key and the machine lease the server returns;
- ``validate()`` asks the server again (run it at start-up and periodically),
  stores a renewed key or a fresh lease, and falls back to the stored lease when
  the server cannot be reached;
- ``deactivate()`` frees this machine's seat so the license can move;
- ``machines()`` lists the machines holding the license's seats (with the label
  each one sent, e.g. its host name) and ``release(id)`` frees one of them by
  its id from that list: how a seat held by a dead or reinstalled machine is
  given back from a machine that works;
- ``check_offline()`` judges the stored key and lease with the public keys
  alone (the JWKS shipped with the application).

The rule when the server cannot be reached: the application stays licensed
until the stored lease's ``exp``, and not one second longer. A lease is only
ever trusted after its EdDSA signature verifies against the JWKS, its ``mid``
equals SHA-256 of this machine's id and its ``sub`` names the stored key's
license. An answer from the server that says "valid" is believed only with
such a lease; an answer that says "not valid" is believed at once and drops
the stored lease, so a revoked license stops at the next online check.

Needs PyJWT with its crypto extra (``pip install "pyjwt[crypto]"``); HTTP is
the standard library's urllib.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt

__all__ = [
    "CODES",
    "MESSAGES",
    "RELEASE_MESSAGES",
    "VALID_CODES",
    "LicenseClient",
    "LicenseClientError",
    "Machine",
    "MachineList",
    "Result",
    "ServerError",
    "ServerUnreachable",
    "machine_fingerprint",
    "machine_id",
    "machine_label",
]

__version__ = "0.1.0"

VALID = "VALID"
GRACE_PERIOD = "GRACE_PERIOD"
EXPIRED = "EXPIRED"
REVOKED = "REVOKED"
SUSPENDED = "SUSPENDED"
INVALID_KEY = "INVALID_KEY"
NOT_FOUND = "NOT_FOUND"
PRODUCT_MISMATCH = "PRODUCT_MISMATCH"
TOO_MANY_MACHINES = "TOO_MANY_MACHINES"
DEACTIVATED = "DEACTIVATED"
MACHINE_NOT_ACTIVATED = "MACHINE_NOT_ACTIVATED"

CODES = (
    VALID,
    GRACE_PERIOD,
    EXPIRED,
    REVOKED,
    SUSPENDED,
    INVALID_KEY,
    NOT_FOUND,
    PRODUCT_MISMATCH,
    TOO_MANY_MACHINES,
    DEACTIVATED,
    MACHINE_NOT_ACTIVATED,
)
VALID_CODES = frozenset({VALID, GRACE_PERIOD})
KEY_REFUSALS = frozenset({INVALID_KEY, NOT_FOUND, PRODUCT_MISMATCH})
"""Codes with which the server refuses the key itself (it lists no machines then)."""

MESSAGES: dict[str, str] = {
    VALID: "Your license is active.",
    GRACE_PERIOD: "Your last payment did not go through. The license keeps working for a few days: "
    "please update your payment method.",
    EXPIRED: "Your license has expired. Renew it to keep using the product.",
    REVOKED: "This license has been revoked. Please contact support.",
    SUSPENDED: "This license is suspended for now (payment dispute, paused subscription or on hold). "
    "Please contact support.",
    INVALID_KEY: "This license key is not valid. Check that it was copied completely.",
    NOT_FOUND: "This license key is not known to the license server.",
    PRODUCT_MISMATCH: "This license key belongs to another product.",
    TOO_MANY_MACHINES: "This license is in use on as many machines as it allows. "
    "Deactivate it on another machine first.",
    DEACTIVATED: "This machine has been deactivated. The license can now be activated on another machine.",
    MACHINE_NOT_ACTIVATED: "This machine is not activated. Enter your license key to activate it.",
}
"""What an application may show its user for each code."""

RELEASE_MESSAGES: dict[str, str] = {
    DEACTIVATED: "The machine has been released: its seat is free for another machine.",
    MACHINE_NOT_ACTIVATED: "That machine holds no seat any more (it may have been released already).",
}
"""What :meth:`LicenseClient.release` says for its own two outcomes (other codes: :data:`MESSAGES`)."""

ALGORITHM = "EdDSA"
MAX_TOKEN_LENGTH = 8192
MAX_ANSWER_BYTES = 1 << 20
STATE_FORMAT = 1
MAX_LABEL_LENGTH = 64

_DENIALS = frozenset(
    {EXPIRED, REVOKED, SUSPENDED, INVALID_KEY, NOT_FOUND, PRODUCT_MISMATCH, TOO_MANY_MACHINES}
)
"""Codes a server answer leaves in the state file: the offline check repeats them."""


# --- errors and results ---------------------------------------------------------------


class LicenseClientError(Exception):
    """Root of the errors this module raises."""


class ServerUnreachable(LicenseClientError):
    """No usable answer: network down, timeout, 429, 5xx, or an answer that does not verify."""


class ServerError(LicenseClientError):
    """The server refused the request itself (4xx with its error body): a bug or a misconfiguration."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Result:
    """What the application needs to decide and to tell its user.

    ``online`` says whether the server answered just now; when it is False the
    verdict comes from the stored key and lease. ``lease_expires_at`` is when
    offline use ends (epoch seconds), ``reason`` a technical detail for logs.
    """

    code: str
    valid: bool
    online: bool
    license: dict[str, Any] | None = None
    lease_expires_at: int | None = None
    reason: str = ""
    features: list[str] = field(default_factory=list)
    text: str = ""
    """Set by calls whose outcome needs other words than :data:`MESSAGES` (``release``)."""

    @property
    def message(self) -> str:
        return self.text or MESSAGES.get(self.code, self.code)


@dataclass(frozen=True)
class Machine:
    """A machine holding one of the license's seats, as the server lists it.

    ``id`` is opaque (``mch_…``), never the machine id: pass it to
    :meth:`LicenseClient.release`. ``label`` is what the machine sent (its host
    name by default), None for a machine activated without one. Times are epoch
    seconds.
    """

    id: str
    label: str | None
    activated_at: int
    last_seen_at: int


@dataclass(frozen=True)
class MachineList:
    """What :meth:`LicenseClient.machines` answers.

    ``code`` is None when the server took the key (``valid`` then says whether
    the license is in good standing), else why not (``INVALID_KEY``,
    ``NOT_FOUND``, ``PRODUCT_MISMATCH``, or ``MACHINE_NOT_ACTIVATED`` when no
    key was given or stored), with no machines.
    """

    code: str | None
    valid: bool
    online: bool
    machines: list[Machine] = field(default_factory=list)
    reason: str = ""

    @property
    def message(self) -> str:
        return MESSAGES.get(self.code, self.code) if self.code else ""


class _Refused(Exception):
    """A key or lease did not pass; ``code`` is the client state it leads to."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


# --- machine id -------------------------------------------------------------------------

_ASCII_SPACE = " \t\r\n"
"""Trimmed from a fingerprint's ends (files end in a newline); exactly these, in both kits."""


_LINUX_SOURCES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def machine_fingerprint() -> str:
    """A stable fact about this OS installation (never sent anywhere as is).

    Linux and the BSDs: ``/etc/machine-id`` (or D-Bus's copy); macOS: the
    IOPlatformUUID; Windows: the MachineGuid in the registry. Elsewhere the host
    name and the hardware address, which is stable but weaker.
    """
    system = platform.system()
    if system == "Windows":
        found = _windows_machine_guid()
        if found:
            return found
    elif system == "Darwin":
        found = _darwin_platform_uuid()
        if found:
            return found
    for source in _LINUX_SOURCES:
        try:
            text = Path(source).read_text(encoding="utf-8").strip(_ASCII_SPACE)
        except OSError:
            continue
        if text:
            return text
    node = uuid.getnode()
    hardware = f"{node:012x}" if not node & (1 << 40) else ""  # bit 40 set: a random stand-in
    return f"host:{socket.gethostname()}:{hardware}"


def _windows_machine_guid() -> str | None:
    if sys.platform != "win32":
        return None
    try:
        import winreg

        with winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, r"SOFTWARE\Microsoft\Cryptography") as handle:
            value, _kind = winreg.QueryValueEx(handle, "MachineGuid")
        return str(value).strip(_ASCII_SPACE) or None
    except OSError:
        return None


def _darwin_platform_uuid() -> str | None:
    try:
        out = subprocess.run(
            ["/usr/sbin/ioreg", "-rd1", "-c", "IOPlatformExpertDevice"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        if "IOPlatformUUID" in line:
            return line.split("=", 1)[-1].strip(_ASCII_SPACE).strip('"') or None
    return None


def machine_id(salt: str, fingerprint: str | None = None) -> str:
    """This machine's id for one application: HMAC-SHA256(salt, OS fingerprint), hex.

    The salt (a constant of the application, e.g. ``"dashcaddy"``) keeps ids of
    different products unlinkable; the raw fingerprint never leaves the machine.
    Spaces, tabs and line breaks at the fingerprint's ends are trimmed first. The
    Node.js kit derives the same id from the same fingerprint and salt.
    """
    if not salt:
        raise ValueError("machine_id needs an application-specific salt")
    raw = machine_fingerprint() if fingerprint is None else fingerprint
    trimmed = raw.strip(_ASCII_SPACE)
    return hmac.new(salt.encode("utf-8"), trimmed.encode("utf-8"), hashlib.sha256).hexdigest()


def machine_hash(machine: str) -> str:
    """SHA-256 of a machine id, hex: what a lease's ``mid`` holds for a canonical id."""
    return hashlib.sha256(machine.encode("utf-8")).hexdigest()


def _lease_mids(machine: str) -> tuple[str, str]:
    """The ``mid`` a lease for this machine may carry. The server hashes the id trimmed of
    white space at its ends and NFC-normalised (``"host-A "`` and ``"host-A"`` are one
    machine); leases it issued before it did that hash the id as sent."""
    canonical = unicodedata.normalize("NFC", machine.strip())
    return machine_hash(canonical), machine_hash(machine)


_UNPRINTABLE = re.compile(
    "[\\x00-\\x1f\\x7f-\\xa0\\xad\\u0600-\\u0605\\u061c\\u06dd\\u070f\\u1680\\u180e\\u2000-\\u200f"
    "\\u2028-\\u202f\\u205f-\\u206f\\u3000\\ud800-\\udfff\\ue000-\\uf8ff\\ufeff\\ufff9-\\ufffb]+"
)
"""What the server refuses in a label: controls, invisible format and separator characters,
private use, lone surrogates. The Node.js kit uses the same class."""


def machine_label(text: str | None = None) -> str | None:
    """A label the server accepts, made from ``text`` (by default this host's name).

    The label is what the customer sees for this machine in the machines list, so
    it names the machine the way its owner does; it is never the machine id.
    Characters the server refuses become a space, spaces at the ends go, and the
    rest is cut to 64 characters. None when nothing is left (or no host name).
    """
    if text is None:
        try:
            text = socket.gethostname()
        except OSError:
            return None
    cleaned = _UNPRINTABLE.sub(" ", text).strip(" ")
    return cleaned[:MAX_LABEL_LENGTH].rstrip(" ") or None


# --- the client ---------------------------------------------------------------------------


def _parse_jwks(jwks: Mapping[str, Any] | str) -> dict[str, jwt.PyJWK]:
    """The Ed25519 signing keys of a JWKS, by ``kid``; other kinds of key are ignored."""
    data = json.loads(jwks) if isinstance(jwks, str) else jwks
    if not isinstance(data, Mapping) or not isinstance(data.get("keys"), list):
        raise ValueError("a JWKS is an object with a list of keys")
    found: dict[str, jwt.PyJWK] = {}
    for entry in data["keys"]:
        if not isinstance(entry, Mapping):
            continue
        kid = entry.get("kid")
        if (
            entry.get("kty") != "OKP"
            or entry.get("crv") != "Ed25519"
            or entry.get("alg", ALGORITHM) != ALGORITHM
            or entry.get("use", "sig") != "sig"
            or not isinstance(kid, str)
        ):
            continue
        try:
            found[kid] = jwt.PyJWK(dict(entry), algorithm=ALGORITHM)
        except jwt.PyJWTError:
            continue
    return found


class LicenseClient:
    """One application's license on one machine.

    ``jwks`` is the server's JWKS as shipped with the application (a dict or
    its JSON text); ``key_prefix`` is the product's key prefix (``"DC"``),
    ``product`` its id (checked against the key's ``prod`` and sent to the
    server), ``issuer`` the server's ``APP_BASE_URL`` (checked against ``iss``
    when given). ``machine_id`` should be :func:`machine_id` of this machine:
    with it, a state file copied to another machine is worthless there.
    ``now`` returns epoch seconds; tests move it.

    ``label`` is what the customer sees for this machine in the machines list
    (:meth:`machines`, the account page): left out, it is this host's name; give
    the name your users know the installation by, or ``""`` to send none. It
    goes with every activation and validation (a renamed host shows its new name
    once the server next records the machine, at most hourly), cleaned by
    :func:`machine_label`.

    Keys fetched from ``/.well-known/jwks.json`` are trusted for the life of the
    object. ``persist_jwks=True`` also keeps them in the state file and trusts
    them after a restart, which carries offline use across a signing-key
    rotation, but lets whoever can edit the state file add a key of their own:
    use it only where that file is out of the user's reach.
    """

    def __init__(
        self,
        server_url: str,
        jwks: Mapping[str, Any] | str,
        state_path: str | os.PathLike[str],
        *,
        key_prefix: str,
        product: str | None = None,
        issuer: str | None = None,
        machine_id: str | None = None,
        now: Callable[[], float] = time.time,
        timeout: float = 10.0,
        persist_jwks: bool = False,
        label: str | None = None,
    ) -> None:
        scheme = urllib.parse.urlsplit(server_url).scheme
        if scheme not in ("http", "https"):
            raise ValueError(f"server_url must be http(s), not {server_url!r}")
        if not key_prefix or "-" in key_prefix:
            raise ValueError("key_prefix is the product's prefix, e.g. 'DC'")
        self.server_url = server_url.rstrip("/")
        self.state_path = Path(state_path)
        self.key_prefix = key_prefix
        self.product = product
        self.issuer = issuer
        self.machine_id = machine_id
        self.now = now
        self.timeout = timeout
        self.persist_jwks = persist_jwks
        self.label = machine_label(label) if label != "" else None
        if self.label is not None and self.label == machine_id:
            raise ValueError("the label is shown to the customer: name the machine, not its machine id")
        self._bundled = _parse_jwks(jwks)
        if not self._bundled:
            raise ValueError("the JWKS holds no Ed25519 key")
        self._fetched: dict[str, jwt.PyJWK] = {}
        self._fetched_jwks: dict[str, Any] | None = None
        if persist_jwks:
            cached = self._read_state().get("jwks")
            if isinstance(cached, dict):
                try:
                    self._fetched = _parse_jwks(cached)
                    self._fetched_jwks = cached
                except ValueError:
                    pass  # a broken cache is no cache

    # --- the calls ------------------------------------------------------------------

    def activate(self, key: str, machine_id: str | None = None) -> Result:
        """Take a seat for this machine; on success the key and lease are stored.

        Needs the server: raises :class:`ServerUnreachable` when it cannot be
        reached. A refusal (e.g. ``TOO_MANY_MACHINES``) leaves the state file as
        it was.
        """
        machine = machine_id or self.machine_id
        if not machine:
            raise ValueError("activate needs a machine id (see machine_id())")
        key = key.strip()
        answer = self._post("/api/license/activate", self._body(key, machine, labelled=True))
        code = self._code(answer)
        if code not in VALID_CODES:
            return Result(code, False, True, _license(answer), reason="refused by the server")
        result = self._accept(answer, key, machine, _kept(self._read_state()))
        self.machine_id = machine
        return result

    def validate(self) -> Result:
        """Check with the server; when it cannot be reached, judge the stored lease."""
        state = self._read_state()
        key = _text(state, "key")
        machine = self.machine_id or _text(state, "machine_id")
        if key is None or machine is None:
            return self._judge(state, online=False)
        try:
            answer = self._post("/api/license/validate", self._body(key, machine, labelled=True))
            code = self._code(answer)
            if code in VALID_CODES:
                return self._accept(answer, key, machine, state)
        except ServerUnreachable as err:
            return self._judge(state, online=False, note=f"server not reached: {err}")
        state.update(code=code, lease=None, license=_license(answer), checked_at=int(self.now()))
        self._write_state(state)
        return Result(code, False, True, _license(answer), reason="refused by the server")

    def deactivate(self) -> Result:
        """Free this machine's seat and forget the key and lease here.

        Needs the server (raises :class:`ServerUnreachable`): a seat freed only
        locally would stay taken on the server.
        """
        state = self._read_state()
        key = _text(state, "key")
        machine = self.machine_id or _text(state, "machine_id")
        if key is None or machine is None:
            return self._judge(state, online=False)
        answer = self._post("/api/license/deactivate", self._body(key, machine))
        code = self._code(answer)
        self._write_state({**_kept(state), "code": code, "checked_at": int(self.now())})
        return Result(code, False, True, _license(answer), reason="key and lease forgotten here")

    def machines(self, key: str | None = None) -> MachineList:
        """The machines holding the license's seats, oldest activation first.

        ``key`` defaults to the stored one; pass the key the user entered on a
        machine that has none yet (refused with ``TOO_MANY_MACHINES``: a seat is
        held by a machine that is gone). Needs the server: raises
        :class:`ServerUnreachable` when it cannot be reached. The state file is
        not touched.
        """
        presented = key.strip() if key is not None else _text(self._read_state(), "key")
        if not presented:
            return MachineList(MACHINE_NOT_ACTIVATED, False, False, reason="no license key given or stored")
        answer = self._post("/api/license/machines", self._body(presented))
        code = self._code(answer)
        valid = answer.get("valid")
        listed = answer.get("machines")
        if not isinstance(valid, bool) or not isinstance(listed, list):
            raise ServerUnreachable("the machines answer is not a machines list")
        machines = [_machine(entry) for entry in listed]
        refused = code in KEY_REFUSALS
        return MachineList(code, valid, True, machines, reason="refused by the server" if refused else "")

    def release(self, machine: str, key: str | None = None) -> Result:
        """Free the seat of another machine, named by its ``id`` from :meth:`machines`.

        For a machine that cannot deactivate itself (dead, reinstalled, out of
        reach). ``code`` is ``DEACTIVATED`` when the seat was freed (activate the
        new machine next), ``MACHINE_NOT_ACTIVATED`` when no machine with that id
        holds a seat (already released), or the key's refusal. ``valid`` is the
        license's standing: this machine's own state is not touched (a machine
        that releases itself gets its seat back at its next validation, if one
        is free). ``key`` as for :meth:`machines`. Needs the server (raises
        :class:`ServerUnreachable`).
        """
        if not isinstance(machine, str) or not machine:
            raise ValueError("release needs a machine's id from machines()")
        presented = key.strip() if key is not None else _text(self._read_state(), "key")
        if not presented:
            return Result(MACHINE_NOT_ACTIVATED, False, False, reason="no license key given or stored")
        answer = self._post("/api/license/deactivate", {**self._body(presented), "machine": machine})
        code = self._code(answer)
        valid = answer.get("valid") is True
        reason = {
            DEACTIVATED: f"machine {machine} released",
            MACHINE_NOT_ACTIVATED: f"no seat is held by machine {machine}",
        }.get(code, "refused by the server")
        return Result(code, valid, True, _license(answer), reason=reason, text=RELEASE_MESSAGES.get(code, ""))

    def check_offline(self) -> Result:
        """Judge the stored key and lease with the public keys alone, no network."""
        return self._judge(self._read_state(), online=False)

    def refresh_jwks(self) -> int:
        """Fetch the server's current public keys; returns how many are usable."""
        answer = self._request("GET", "/.well-known/jwks.json", None)
        try:
            fetched = _parse_jwks(answer)
        except ValueError as err:
            raise ServerUnreachable(f"the JWKS answer is not a JWKS: {err}") from err
        self._fetched = fetched
        self._fetched_jwks = answer
        if self.persist_jwks:
            self._write_state(self._read_state())
        return len(fetched)

    # --- answers -------------------------------------------------------------------

    def _body(self, key: str, machine: str | None = None, *, labelled: bool = False) -> dict[str, str]:
        body = {"key": key}
        if machine is not None:
            body["machine_id"] = machine
        if self.product:
            body["product"] = self.product
        if labelled and self.label is not None and self.label != machine:
            body["label"] = self.label
        return body

    @staticmethod
    def _code(answer: dict[str, Any]) -> str:
        code = answer.get("code")
        if code not in CODES:
            raise ServerUnreachable(f"unexpected answer code {code!r}")
        return str(code)

    def _accept(self, answer: dict[str, Any], key: str, machine: str, state: dict[str, Any]) -> Result:
        """Store a "valid" answer, but only once its key and lease verify."""
        new_key = answer.get("key") if isinstance(answer.get("key"), str) else key
        lease = answer.get("lease")
        now = int(self.now())
        try:
            assert isinstance(new_key, str)
            key_claims = self._verify_key(new_key, refresh=True)
            if not isinstance(lease, str):
                raise _Refused(INVALID_KEY, "the answer carries no lease")
            self._verify_lease(lease, machine, key_claims, refresh=True)
        except _Refused as err:
            raise ServerUnreachable(f"the server's answer does not verify: {err.reason}") from err
        state.update(
            format=STATE_FORMAT,
            key=new_key,
            lease=lease,
            machine_id=machine,
            code=self._code(answer),
            license=_license(answer),
            checked_at=now,
        )
        self._write_state(state)
        return self._judge(state, online=True)

    def _judge(self, state: dict[str, Any], *, online: bool, note: str = "") -> Result:
        """The verdict of the stored key and lease at ``now``; never touches the network."""
        lic = state.get("license") if isinstance(state.get("license"), dict) else None
        last = state.get("code")
        key = _text(state, "key")
        if key is None:
            code = DEACTIVATED if last == DEACTIVATED else MACHINE_NOT_ACTIVATED
            return Result(code, False, online, None, reason=note or "no license key stored")
        lease = _text(state, "lease")
        machine = self.machine_id or _text(state, "machine_id")
        try:
            key_claims = self._verify_key(key, refresh=False)
            if lease is None or machine is None:
                code = last if last in _DENIALS else MACHINE_NOT_ACTIVATED
                raise _Refused(str(code), "no lease stored")
            claims = self._verify_lease(lease, machine, key_claims, refresh=False)
        except _Refused as err:
            return Result(err.code, False, online, lic, reason=_join(note, err.reason))
        code = last if last in VALID_CODES else VALID
        return Result(
            str(code),
            True,
            online,
            lic,
            lease_expires_at=claims["exp"],
            reason=note,
            features=[f for f in claims.get("ent", []) if isinstance(f, str)],
        )

    # --- verification --------------------------------------------------------------

    def _decode(self, token: str, what: str, *, refresh: bool) -> dict[str, Any]:
        """Signature, pinned algorithm and claim types; ``exp`` is judged against ``now``."""
        if len(token) > MAX_TOKEN_LENGTH:
            raise _Refused(INVALID_KEY, f"{what} too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            raise _Refused(INVALID_KEY, f"{what} is not a JWT") from err
        if header.get("alg") != ALGORITHM:
            raise _Refused(INVALID_KEY, f"{what} algorithm {header.get('alg')!r} not allowed")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise _Refused(INVALID_KEY, f"{what} names no key")
        signer = self._bundled.get(kid) or self._fetched.get(kid)
        if signer is None and refresh:
            with contextlib.suppress(LicenseClientError):  # offline: the key stays unknown
                self.refresh_jwks()
            signer = self._fetched.get(kid)
        if signer is None:
            raise _Refused(INVALID_KEY, f"{what} signed by an unknown key {kid}")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                signer.key,
                algorithms=[ALGORITHM],
                options={
                    "require": ["exp", "iat", "sub"],
                    "verify_exp": False,  # judged below against the injectable clock
                    "verify_iat": False,
                    "verify_nbf": False,
                    "verify_aud": False,
                    "verify_iss": False,
                },
            )
        except jwt.PyJWTError as err:
            raise _Refused(INVALID_KEY, f"{what} does not verify: {err}") from err
        exp = claims.get("exp")
        if not isinstance(exp, int) or isinstance(exp, bool):
            raise _Refused(INVALID_KEY, f"{what} has no integer exp")
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise _Refused(INVALID_KEY, f"{what} has no sub")
        if self.issuer is not None and claims.get("iss") != self.issuer:
            raise _Refused(INVALID_KEY, f"{what} issued by {claims.get('iss')!r}")
        if self.product is not None and claims.get("prod", self.product) != self.product:
            raise _Refused(PRODUCT_MISMATCH, f"{what} is for product {claims.get('prod')!r}")
        if self.now() >= exp:
            raise _Refused(EXPIRED, f"{what} expired at {exp}")
        return claims

    def _verify_key(self, key: str, *, refresh: bool) -> dict[str, Any]:
        """A license key: ``<PREFIX>-<TIER>-<JWS>``, the exact prefix stripped (base64url has ``-``)."""
        prefix = f"{self.key_prefix}-"
        if not key.startswith(prefix):
            raise _Refused(INVALID_KEY, f"key does not start with {prefix}")
        tier, sep, token = key[len(prefix) :].partition("-")
        if not sep or not tier:
            raise _Refused(INVALID_KEY, "key has no tier")
        claims = self._decode(token, "key", refresh=refresh)
        if claims.get("tier") != tier:
            raise _Refused(INVALID_KEY, "key text does not match its tier claim")
        return claims

    def _verify_lease(
        self, lease: str, machine: str, key_claims: dict[str, Any], *, refresh: bool
    ) -> dict[str, Any]:
        claims = self._decode(lease, "lease", refresh=refresh)
        if claims.get("mid") not in _lease_mids(machine):
            raise _Refused(MACHINE_NOT_ACTIVATED, "lease is for another machine")
        if claims["sub"] != key_claims["sub"]:
            raise _Refused(MACHINE_NOT_ACTIVATED, "lease is for another license")
        return claims

    # --- HTTP ---------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", path, body)

    def _request(self, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """One JSON exchange. Anything but a JSON object from a 2xx is ServerUnreachable,
        except a 4xx error body (other than 429), which is a ServerError."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(  # noqa: S310 -- scheme checked in __init__
            self.server_url + path,
            data=data,
            method=method,
            headers={
                "Accept": "application/json",
                "Content-Type": "application/json",
                "User-Agent": f"licensed-client-python/{__version__}",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                raw = response.read(MAX_ANSWER_BYTES + 1)
        except urllib.error.HTTPError as err:
            status = err.code
            raw = err.read(MAX_ANSWER_BYTES)
            err.close()
            if status == 429 or status >= 500:
                raise ServerUnreachable(f"server answered {status}") from err
            error = _json_object(raw).get("error") if raw else None
            if isinstance(error, dict):
                raise ServerError(status, str(error.get("code")), str(error.get("message"))) from err
            raise ServerError(status, "HTTP_ERROR", f"server answered {status}") from err
        except (OSError, ValueError, http.client.HTTPException) as err:  # refused, timeouts, cut off
            raise ServerUnreachable(str(err)) from err
        if len(raw) > MAX_ANSWER_BYTES:
            raise ServerUnreachable("answer too large")
        answer = _json_object(raw)
        if not answer:
            raise ServerUnreachable("answer is not a JSON object")
        return answer

    # --- the state file ---------------------------------------------------------------

    def _read_state(self) -> dict[str, Any]:
        try:
            raw = self.state_path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as err:
            raise LicenseClientError(f"cannot read {self.state_path}: {err}") from err
        return _json_object(raw)

    def _write_state(self, state: dict[str, Any]) -> None:
        """Write-then-rename: a crash leaves the old file or the new one, never half of one."""
        if self.persist_jwks and self._fetched_jwks is not None:
            state = {**state, "jwks": self._fetched_jwks}
        folder = self.state_path.parent
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.state_path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({k: v for k, v in state.items() if v is not None}, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.state_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if os.name == "posix":
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)


def _json_object(raw: bytes) -> dict[str, Any]:
    """A JSON object, or {} for anything else (corrupt state, an HTML error page)."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _text(state: Mapping[str, Any], name: str) -> str | None:
    value = state.get(name)
    return value if isinstance(value, str) and value else None


def _kept(state: Mapping[str, Any]) -> dict[str, Any]:
    """What survives a new activation or a deactivation: the format and cached keys."""
    kept: dict[str, Any] = {"format": STATE_FORMAT}
    if isinstance(state.get("jwks"), dict):
        kept["jwks"] = state["jwks"]
    return kept


def _machine(entry: Any) -> Machine:
    """One entry of the machines list, checked: anything else means the answer is not usable."""
    if not isinstance(entry, dict):
        raise ServerUnreachable("a machines list entry is not an object")
    public_id, label = entry.get("id"), entry.get("label")
    if not isinstance(public_id, str) or not public_id:
        raise ServerUnreachable("a machines list entry has no id")
    if label is not None and not isinstance(label, str):
        raise ServerUnreachable("a machines list entry has a label that is not text")
    return Machine(public_id, label, _epoch(entry.get("activated_at")), _epoch(entry.get("last_seen_at")))


def _epoch(value: Any) -> int:
    """An ISO 8601 time of the server (``2027-01-15T08:00:00Z``) as epoch seconds."""
    try:
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise ServerUnreachable(f"the machines list has a time that is not one: {value!r}")
    return int(parsed.timestamp())


def _license(answer: Mapping[str, Any]) -> dict[str, Any] | None:
    value = answer.get("license")
    return value if isinstance(value, dict) else None


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
