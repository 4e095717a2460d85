"""Customer accounts without passwords: one-time sign-in links by mail, sessions by cookie.

What is secret, and where it lives:

- **The server secret**: 32 random bytes in ``DATA_DIR/account.secret`` (0600),
  written by ``licensed init`` like the signing keys (or on first use by a data
  dir made before this file existed). Never in the database, a log or an export.
  Losing it costs nothing lasting: links in flight and open forms stop working,
  customers ask for a new link.
- **A sign-in link's token** is ``HMAC-SHA256(secret, "sign-in:" + row id)``,
  base64url. The ``sign_ins`` row stores only ``SHA-256(token)``. The outbox row
  of its mail holds only the row id: the mail is rendered when it is sent
  (:mod:`mailer`), which recomputes the token from the id with the secret. So
  the token is nowhere at rest but in the customer's mailbox: a copy of the
  database (a backup, a replica, the debug export) opens no account.
- **The link's validity** (30 minutes) starts when its mail is built, not when it
  was asked for: SMTP down means the mail arrives late, never dead on arrival.
  It works once: the statement that checks it also marks it used.
- **A session** is 32 random bytes in a cookie (``HttpOnly``, ``SameSite=Lax``,
  ``Secure`` over https, 14 days); the table keeps ``SHA-256`` of it.
- **A form's CSRF token** is ``HMAC-SHA256(secret, "csrf:" + session hash)``: tied
  to one session, checked in constant time, never stored.

Asking for a link (:func:`request_link`) does the same work for every address:
the address is normalised, its licences looked up, a row inserted (it also
counts towards the limit of :data:`LINKS_PER_HOUR`), old rows purged, one
commit; only a known address under its limit also gets an outbox row. The
answer never depends on any of it. Unknown addresses are sent nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from . import addresses, files, licensing, outbox
from .errors import ConfigError, NotFound, SignInLinkRefused
from .outbox import KIND_LICENSE_KEY_RESEND
from .store import License, Store, new_id, private_file

SECRET_FILE = "account.secret"  # noqa: S105 - a file name, not a secret
SECRET_BYTES = 32
LINK_VALID_SECONDS = 30 * 60
LINKS_PER_HOUR = 5
LINK_KEEP_SECONDS = 26 * 3600
"""A link's row outlives the mail's retries (about 20 hours) before it is purged."""
UNSENT_KEEP_SECONDS = 3600
"""Rows that send nothing (unknown address, over the limit) only count towards the limit."""
SESSION_SECONDS = 14 * 86400
PURGE_LIMIT = 50
"""Rows purged per sign-in request: a bounded cost, whatever piled up."""
RESENDS_PER_HOUR = 3
"""Key mails a signed-in customer may ask for, per licence and hour."""

_secrets: dict[Path, bytes] = {}
_secrets_lock = threading.Lock()


# --- the server secret ----------------------------------------------------------------------


def secret_path(data_dir: Path) -> Path:
    return data_dir / SECRET_FILE


def ensure_secret(data_dir: Path) -> list[str]:
    """Create the secret file if it is missing (``licensed init``); what was done."""
    path = secret_path(data_dir)
    if path.exists():
        return []
    load_secret(data_dir)
    return [f"created the account secret {path}"]


def load_secret(data_dir: Path) -> bytes:
    """The server secret, created (0600) when missing. The file appears under its name whole
    or not at all, and never replaces one that is there: two processes agree on the secret."""
    path = secret_path(data_dir).resolve()
    with _secrets_lock:
        cached = _secrets.get(path)
        if cached is not None:
            return cached
        try:
            try:
                value = path.read_bytes()
            except FileNotFoundError:
                value = _create_secret(path)
            private_file(path)
        except OSError as err:
            raise ConfigError(f"cannot read or create {path}: {err.strerror or err}") from err
        if len(value) != SECRET_BYTES:
            raise ConfigError(f"{path} is not a {SECRET_BYTES}-byte secret: delete it to make a new one")
        _secrets[path] = value
        return value


def _create_secret(path: Path) -> bytes:
    """Write a new secret to ``path``; the one there already when another process was first."""
    value = secrets.token_bytes(SECRET_BYTES)
    try:
        files.write_private(path, value, force=False)
    except files.NameTaken:
        return path.read_bytes()
    return value


def _mac(secret: bytes, purpose: str, value: str) -> str:
    digest = hmac.new(secret, f"{purpose}:{value}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


# --- sign-in links --------------------------------------------------------------------------


def link_token(secret: bytes, sign_in_id: str) -> str:
    """The token of a sign-in row, recomputed from its id whenever its mail is built."""
    return _mac(secret, "sign-in", sign_in_id)


def normal_email(value: str) -> str:
    """The form's address, checked (:class:`errors.InvalidEmail`) and lower-cased: accounts
    are per address, whatever its case."""
    return addresses.check_address(value.strip()).lower()


def request_link(store: Store, secret: bytes, email: str, now: int) -> bool:
    """Record a request for a sign-in link for ``email`` (already :func:`normal_email`) and queue
    its mail when the address holds licences and is under its limit. Returns whether a mail
    was queued, for tests and logs only: the caller answers the same whatever it is."""
    sign_in_id = new_id("sgn")
    token_hash = _sha256(link_token(secret, sign_in_id))
    with store.atomic():
        store.purge_account_rows(now, PURGE_LIMIT)
        recent = store.count_sign_ins(email, now - 3600)
        licenses = store.licenses_by_email(email)
        if recent >= LINKS_PER_HOUR:
            return False
        send = bool(licenses)
        store.insert_sign_in(
            sign_in_id, email, token_hash, now, now + (LINK_KEEP_SECONDS if send else UNSENT_KEEP_SECONDS)
        )
        if send:
            customer = store.get_customer(licenses[0].customer_id)
            to_addr = str(customer["email"]) if customer is not None and customer["email"] else email
            store.enqueue_sign_in_mail(sign_in_id, to_addr, now)
    return send


def link_for_mail(store: Store, secret: bytes, sign_in_id: str, now: int) -> str | None:
    """The token to put in a sign-in mail being built now, its 30 minutes starting now; None
    when the link is gone (purged) or was used."""
    if not store.arm_sign_in(sign_in_id, now + LINK_VALID_SECONDS):
        return None
    return link_token(secret, sign_in_id)


def link_email(store: Store, token: str, now: int) -> str:
    """The e-mail a link would sign in, leaving it unused; :class:`errors.SignInLinkRefused`
    otherwise.

    Opening the link only asks; the button on that page signs in
    (:func:`consume_link`). Mail scanners fetch the links in a mail before the
    customer does, and a link that signed in on the fetch would be used up by them.
    """
    email, expires_at, used = _sent_link(store, token)
    if not used and expires_at >= now:
        return email
    raise SignInLinkRefused("used" if used else "expired")


def consume_link(store: Store, token: str, now: int) -> str:
    """The e-mail a link signs in, consuming it; :class:`errors.SignInLinkRefused` otherwise."""
    _check_shape(token)
    with store.atomic():
        email = store.consume_sign_in(_sha256(token), now)
    if email is not None:
        return email
    _, _, used = _sent_link(store, token)
    raise SignInLinkRefused("used" if used else "expired")


def _check_shape(token: str) -> None:
    if not 20 <= len(token) <= 100:
        raise SignInLinkRefused("unknown")


def _sent_link(store: Store, token: str) -> tuple[str, int, bool]:
    """A sent link's e-mail, end of life and whether it was used; ``unknown`` for any
    other token."""
    _check_shape(token)
    row = store.sign_in_by_hash(_sha256(token))
    if row is None or row["expires_at"] is None:
        raise SignInLinkRefused("unknown")
    return str(row["email"]), int(row["expires_at"]), row["used_at"] is not None


# --- sessions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Session:
    """A signed-in customer: their address, and what their forms must carry."""

    id_hash: str
    email: str
    csrf: str

    def csrf_ok(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.csrf.encode())


def start_session(store: Store, email: str, now: int) -> str:
    """A new session for ``email``; returns the cookie's value (stored only as its hash)."""
    session_id = secrets.token_urlsafe(32)
    with store.atomic():
        store.insert_account_session(_sha256(session_id), email, now, now + SESSION_SECONDS)
    return session_id


def session(store: Store, secret: bytes, cookie_value: str | None, now: int) -> Session | None:
    """The live session a cookie names, or None."""
    if not cookie_value or len(cookie_value) > 100:
        return None
    id_hash = _sha256(cookie_value)
    email = store.account_session_email(id_hash, now)
    if email is None:
        return None
    return Session(id_hash=id_hash, email=email, csrf=_mac(secret, "csrf", id_hash))


def end_session(store: Store, id_hash: str) -> None:
    with store.atomic():
        store.delete_account_session(id_hash)


# --- what a signed-in customer may do to their own licences ---------------------------------


def licenses_of(store: Store, email: str) -> list[License]:
    """Every licence of the address (ASCII case-insensitive), oldest first."""
    return store.licenses_by_email(email)


def own_license(store: Store, email: str, license_id: str) -> License:
    for lic in licenses_of(store, email):
        if lic.id == license_id:
            return lic
    raise NotFound("no such license on this account")


def release_machine(store: Store, email: str, public_id: str, now: int) -> bool:
    """Free a seat of one of the customer's own licences; False when no licence of theirs
    holds that machine (someone else's, or released already)."""
    for lic in licenses_of(store, email):
        if licensing.release_machine(store, lic, public_id, now, actor=f"customer:{email}"):
            return True
    return False


def resend_key(store: Store, email: str, license_id: str, now: int) -> bool:
    """Queue the key mail again for one of the customer's own licences, to the address on
    file; False when :data:`RESENDS_PER_HOUR` were asked for already."""
    lic = own_license(store, email, license_id)
    customer = store.get_customer(lic.customer_id)
    to_addr = str(customer["email"]) if customer is not None and customer["email"] else email
    to_name = customer["name"] if customer is not None else None
    with store.atomic():
        if store.mail_count_since(lic.id, KIND_LICENSE_KEY_RESEND, now - 3600) >= RESENDS_PER_HOUR:
            return False
        mail_id = outbox.queue_mail(store, lic.id, KIND_LICENSE_KEY_RESEND, to_addr, to_name, now)
        store.audit(now, f"customer:{email}", "license.resend", lic.id, None, {"mail": mail_id})
    return True


def stripe_customers(store: Store, licenses: Iterable[License]) -> list[str]:
    """The customer ids behind these licences (an address's, :func:`licenses_of`) that Stripe
    knows, in the licences' order, each once (billing portal)."""
    found: list[str] = []
    seen: set[str] = set()
    for lic in licenses:
        if lic.customer_id in seen:
            continue
        seen.add(lic.customer_id)
        row = store.get_customer(lic.customer_id)
        if row is not None and row["stripe_customer_id"]:
            found.append(lic.customer_id)
    return found
