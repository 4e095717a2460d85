"""Mail: license keys reach the buyer through an outbox, so SMTP down means late, never lost.

The outbox row holds only the licence id (or, for a sign-in link, the link's
row id), the kind of message and the recipient; the body, and the key or link
in it, are rendered when the message is sent (keys and sign-in tokens are never
stored). Sending is at-least-once: a row is
claimed (``pending`` -> ``sending`` with a lease in ``claimed_until``) in one
write transaction, so two senders (the thread in ``licensed serve`` and a cron
``licensed mail flush``) never hold the same row. A sender that dies mid-send
leaves its row claimed until the lease runs out; the row is then sent again
under the same Message-ID, so the one possible duplicate is recognisable.

Addresses and display names are checked when a message is queued
(:func:`queue_mail`) and again when it is sent: no control characters (header
injection), a well-formed ASCII address with a real domain.

Nothing the rules modules import (``config``, ``licensing``, ``outbox``)
imports this module, so it may use them without an import cycle.
"""

from __future__ import annotations

import datetime as dt
import html
import ipaddress
import logging
import secrets
import smtplib
import ssl
import string
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from . import accounts
from .addresses import has_control, mailbox, parse_mailbox
from .errors import ConfigError, LicensedError, MailUnavailable, MailUndeliverable, ValidationFailed
from .outbox import KIND_LICENSE_KEY, KIND_LICENSE_KEY_RESEND, KIND_SIGN_IN_LINK, KINDS

if TYPE_CHECKING:
    import sqlite3

    from .services import Services
    from .store import License

log = logging.getLogger("licensed.mail")

LEASE_SECONDS = 600
"""How long a claim protects a row from other senders; far above one message's SMTP time."""

SMTP_TIMEOUT = 30.0
"""Seconds smtplib waits for any one network operation."""

BATCH_SECONDS = 120.0
"""A batch stops claiming after this long, so no claim is stamped with a stale ``now``."""

BATCH_LIMIT = 200
MAX_ATTEMPTS = 12
RETRY_BASE_SECONDS = 60
RETRY_CAP_SECONDS = 6 * 3600
"""Retries wait 1 min, 2, 4, … capped at 6 h: twelve attempts span about 20 hours."""

POLL_SECONDS = 10.0
POLL_MIN_SECONDS = 0.05
POLL_MAX_SECONDS = 300.0

# --- SMTP settings and connection -------------------------------------------------------


@dataclass(frozen=True)
class SmtpSettings:
    """What ``SMTP_URL`` says: where, how (implicit TLS or STARTTLS when offered), who."""

    host: str
    port: int
    implicit_tls: bool
    username: str | None = None
    password: str | None = None

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse_smtp_url(url: str) -> SmtpSettings:
    """``smtp://[user:pass@]host[:port]`` (port 25) or ``smtps://…`` (port 465); user and pass URL-decoded."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise ConfigError(f"SMTP_URL: {err}") from err
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ConfigError("SMTP_URL must be smtp://[user:pass@]host[:port] or smtps://…")
    implicit = parts.scheme == "smtps"
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if username and password is None:
        raise ConfigError("SMTP_URL names a user but no password")
    return SmtpSettings(
        host=parts.hostname,
        port=port or (465 if implicit else 25),
        implicit_tls=implicit,
        username=username,
        password=password,
    )


def _smtp_reply(err: BaseException) -> str:
    """One readable line for an smtplib, socket or ssl error (goes to ``last_error``)."""
    if isinstance(err, smtplib.SMTPRecipientsRefused):
        replies = [f"{code} {_text(msg)}" for code, msg in err.recipients.values()]
        text = "recipient refused: " + "; ".join(replies)
    elif isinstance(err, smtplib.SMTPResponseException):
        text = f"{err.smtp_code} {_text(err.smtp_error)}"
    else:
        text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return " ".join(text.split())[:500]


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def connect(
    settings: SmtpSettings, local_hostname: str, tls_context: ssl.SSLContext | None = None
) -> smtplib.SMTP:
    """An SMTP session ready to send: TLS as configured, logged in when credentials are given.

    The certificate is always verified; ``tls_context`` can bring other trusted
    CAs (a private relay's, or a test's). A password is never sent in clear to
    anything but a loopback host: a server that stops offering STARTTLS (a
    downgrade) gets no credentials.
    """
    context = tls_context or ssl.create_default_context()
    smtp: smtplib.SMTP | None = None
    try:
        if settings.implicit_tls:
            smtp = smtplib.SMTP_SSL(
                settings.host,
                settings.port,
                local_hostname=local_hostname,
                timeout=SMTP_TIMEOUT,
                context=context,
            )
            smtp.ehlo()
            secure = True
        else:
            smtp = smtplib.SMTP(
                settings.host, settings.port, local_hostname=local_hostname, timeout=SMTP_TIMEOUT
            )
            smtp.ehlo()
            secure = smtp.has_extn("starttls")
            if secure:
                smtp.starttls(context=context)
                smtp.ehlo()
        if settings.username:
            if not secure and not settings.loopback:
                raise MailUnavailable(
                    f"SMTP server {settings.where} offers no STARTTLS: refusing to send the password in"
                    " clear (use smtps:// or a server with STARTTLS)"
                )
            smtp.login(settings.username, settings.password or "")
        return smtp
    except MailUnavailable:
        _close(smtp)
        raise
    except smtplib.SMTPAuthenticationError as err:
        _close(smtp)
        raise MailUnavailable(f"SMTP server {settings.where} refused the login: {_smtp_reply(err)}") from err
    except (OSError, UnicodeError) as err:
        _close(smtp)
        raise MailUnavailable(f"cannot reach SMTP server {settings.where}: {_smtp_reply(err)}") from err


def _close(smtp: smtplib.SMTP | None) -> None:
    if smtp is None:
        return
    try:
        smtp.quit()
    except (OSError, smtplib.SMTPException):
        smtp.close()


# --- templates --------------------------------------------------------------------------

_TXT_LICENSE_KEY = """\
Subject: Your $product_name license key

Hello$greeting,

thank you for buying $plan_name. Here is your license key:

$license_key

To activate, enter the key in $product_name on the machine that runs it: $product_name sends
the key and that machine's id to $activate_url, receives a signed lease and keeps working
offline until the lease runs out. Up to $machines can be active at once; deactivate one to
move the license to another machine.

$validity

$manage

License $license_id: please quote it when you write to us.
"""

_HTML_LICENSE_KEY = """\
<!doctype html>
<html lang="en">
<body style="font-family: sans-serif; line-height: 1.5">
<p>Hello$greeting,</p>
<p>thank you for buying $plan_name. Here is your license key:</p>
<p><code style="word-break: break-all; font-size: 90%">$license_key</code></p>
<p>To activate, enter the key in $product_name on the machine that runs it: $product_name sends
the key and that machine's id to <code>$activate_url</code>, receives a signed lease and keeps
working offline until the lease runs out. Up to $machines can be active at once; deactivate
one to move the license to another machine.</p>
<p>$validity</p>
<p>$manage_html</p>
<p style="color: #666">License $license_id: please quote it when you write to us.</p>
</body>
</html>
"""

_TXT_RESEND = _TXT_LICENSE_KEY.replace(
    "Subject: Your $product_name license key", "Subject: Your $product_name license key, sent again"
).replace("thank you for buying $plan_name. Here is", "as asked, here is again")
_HTML_RESEND = _HTML_LICENSE_KEY.replace(
    "thank you for buying $plan_name. Here is", "as asked, here is again"
)

_TXT_SIGN_IN = """\
Subject: Your sign-in link

Hello,

here is the link that signs you in to your licenses at $app_base_url:

$sign_in_url

It works once, within $valid_minutes minutes. If it has expired, ask for a new one at
$account_url.

If you did not ask for it, ignore this message: nobody can sign in without the link.
"""

_HTML_SIGN_IN = """\
<!doctype html>
<html lang="en">
<body style="font-family: sans-serif; line-height: 1.5">
<p>Hello,</p>
<p>here is the link that signs you in to your licenses at $app_base_url:</p>
<p><a href="$sign_in_url">Sign in to your licenses</a></p>
<p>It works once, within $valid_minutes minutes. If it has expired, ask for a new one at
<a href="$account_url">$account_url</a>.</p>
<p style="color: #666">If you did not ask for it, ignore this message: nobody can sign in without
the link.</p>
</body>
</html>
"""

DEFAULT_TEMPLATES: dict[str, dict[str, str]] = {
    KIND_LICENSE_KEY: {"txt": _TXT_LICENSE_KEY, "html": _HTML_LICENSE_KEY},
    KIND_LICENSE_KEY_RESEND: {"txt": _TXT_RESEND, "html": _HTML_RESEND},
    KIND_SIGN_IN_LINK: {"txt": _TXT_SIGN_IN, "html": _HTML_SIGN_IN},
}
assert set(DEFAULT_TEMPLATES) == set(KINDS)
_FALLBACK = {KIND_LICENSE_KEY_RESEND: KIND_LICENSE_KEY}
"""A kind without its own file in a directory borrows this kind's file from there."""


def templates_dir(data_dir: Path) -> Path:
    return data_dir / "templates"


def write_default_templates(data_dir: Path) -> list[str]:
    """Write the built-in templates for the vendor to edit; never overwrites a file."""
    folder = templates_dir(data_dir)
    done = []
    for kind, bodies in DEFAULT_TEMPLATES.items():
        for ext, text in bodies.items():
            path = folder / f"{kind}.{ext}"
            if path.exists():
                continue
            folder.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            done.append(f"wrote mail template {path}")
    return done


def load_template(data_dir: Path, product: str | None, kind: str, ext: str) -> str:
    """The first of ``<product>/<kind>``, ``<product>/<fallback>``, ``<kind>``, ``<fallback>``, built-in
    (mail about no licence, such as a sign-in link, has no product)."""
    folder = templates_dir(data_dir)
    names = [kind, *([_FALLBACK[kind]] if kind in _FALLBACK else [])]
    for base in (folder / product, folder) if product else (folder,):
        for name in names:
            path = base / f"{name}.{ext}"
            if path.is_file():
                return path.read_text(encoding="utf-8")
    return DEFAULT_TEMPLATES[kind][ext]


@dataclass(frozen=True)
class Rendered:
    subject: str
    text: str
    html: str


def _day(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def template_values(
    lic: License,
    key: str,
    *,
    product_name: str,
    plan_name: str,
    to_name: str | None,
    app_base_url: str,
    website_url: str | None,
) -> tuple[dict[str, str], dict[str, str]]:
    """The plain values every template may use, and the few pre-built HTML fragments."""
    if lic.lifetime:
        validity = "This is a lifetime license: it does not expire."
    elif lic.paid_through is not None:
        validity = f"The license is paid through {_day(lic.paid_through)} (UTC)."
        if lic.stripe_subscription_id:
            validity += " Each renewal of your subscription extends it; the key updates itself."
    else:
        validity = ""
    account_url = f"{app_base_url}/account"
    what = "Your licenses and their machines"
    if lic.stripe_customer_id:
        what += ", and the billing portal (invoices, payment method, plan changes, cancellation)"
    manage = f"{what}: sign in at {account_url} with this e-mail address."
    link = html.escape(account_url, quote=True)
    manage_html = f'{html.escape(what)}: sign in at <a href="{link}">{link}</a> with this e-mail address.'
    values = {
        "product": lic.product,
        "product_name": product_name,
        "plan": lic.plan,
        "plan_name": plan_name,
        "tier": lic.tier,
        "license_id": lic.id,
        "license_key": key,
        "max_machines": str(lic.max_machines),
        "machines": "1 machine" if lic.max_machines == 1 else f"{lic.max_machines} machines",
        "paid_through": _day(lic.paid_through) if lic.paid_through is not None else "",
        "validity": validity,
        "app_base_url": app_base_url,
        "activate_url": f"{app_base_url}/api/license/activate",
        "website_url": website_url or "",
        "account_url": account_url,
        "manage": manage,
        "name": to_name or "",
        "greeting": f" {to_name}" if to_name else "",
    }
    return values, {"manage_html": manage_html}


def render(
    data_dir: Path, product: str | None, kind: str, values: dict[str, str], html_raw: dict[str, str]
) -> Rendered:
    """Fill the kind's templates; every value is HTML-escaped in the HTML body.

    The subject is the plain template's first line when it reads ``Subject: …``.
    """
    if kind not in KINDS:
        raise ValidationFailed(f"unknown kind of mail {kind!r}")
    text_template = load_template(data_dir, product, kind, "txt")
    subject_template = "Your $product_name license key"
    first, _, rest = text_template.partition("\n")
    if first.lower().startswith("subject:"):
        subject_template, text_template = first[len("subject:") :], rest.lstrip("\n")
    subject = string.Template(subject_template).safe_substitute(values)
    subject = " ".join("".join(ch for ch in subject if ch.isspace() or not has_control(ch)).split())
    text = string.Template(text_template).safe_substitute(values)
    escaped = {name: html.escape(value, quote=True) for name, value in values.items()}
    body_html = string.Template(load_template(data_dir, product, kind, "html")).safe_substitute(
        {**escaped, **html_raw}
    )
    return Rendered(subject=subject or "Your license key", text=text, html=body_html)


# --- sending ------------------------------------------------------------------------------


@dataclass
class Summary:
    """What one :func:`send_due` call did."""

    sent: int = 0
    retried: int = 0
    failed: int = 0
    more: bool = False
    """Stopped at the batch limit or time budget with messages perhaps still due."""
    error: str | None = None
    """Set when the connection broke mid-batch (the rest waits for the next run)."""

    def line(self) -> str:
        return f"sent {self.sent}, retried {self.retried}, failed {self.failed}"


def retry_delay(attempts: int) -> int:
    """Seconds before the next try after ``attempts`` tries: doubling from 1 min, capped."""
    return int(min(RETRY_BASE_SECONDS * 2 ** max(0, attempts - 1), RETRY_CAP_SECONDS))


def new_message_id(domain: str) -> str:
    """A globally unique Message-ID; stored with the row at its first claim, so it is stable."""
    return f"<licensed.{secrets.token_hex(12)}@{domain}>"


def build_message(
    services: Services, row: sqlite3.Row, sender: Address, now: int
) -> tuple[EmailMessage, str]:
    """The message for one outbox row, and its checked envelope recipient."""
    try:
        recipient = mailbox(row["to_addr"], row["to_name"])
    except ValidationFailed as err:
        raise MailUndeliverable(f"invalid recipient: {err.message}") from err
    if row["kind"] not in KINDS:
        raise MailUndeliverable(f"unknown kind of mail {row['kind']!r}")
    if row["kind"] == KIND_SIGN_IN_LINK:
        rendered = _sign_in_message(services, row, now)
    else:
        rendered = _license_message(services, row, recipient)
    msg = EmailMessage()
    msg["Subject"] = rendered.subject
    msg["From"] = sender
    msg["To"] = recipient
    msg["Date"] = format_datetime(dt.datetime.fromtimestamp(now, dt.UTC))
    msg["Message-ID"] = row["message_id"]
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(rendered.text)
    msg.add_alternative(rendered.html, subtype="html")
    check_headers(msg.as_bytes())
    return msg, recipient.addr_spec


def _license_message(services: Services, row: sqlite3.Row, recipient: Address) -> Rendered:
    """The key mail of a licence, its key re-derived from the licence row."""
    store = services.store
    lic = store.get_license(row["license_id"]) if row["license_id"] else None
    if lic is None:
        raise MailUndeliverable("the license of this message no longer exists")
    product_name, plan_name = services.catalog.display_names(lic.product, lic.plan)
    values, html_raw = template_values(
        lic,
        services.licensing.key(lic),
        product_name=product_name,
        plan_name=plan_name,
        to_name=recipient.display_name or None,
        app_base_url=services.config.app_base_url,
        website_url=services.config.website_url,
    )
    return render(services.config.data_dir, lic.product, row["kind"], values, html_raw)


def _sign_in_message(services: Services, row: sqlite3.Row, now: int) -> Rendered:
    """A sign-in link's mail: its token recomputed from the row id (it is stored nowhere), its
    30 minutes starting now, as the message is built (:mod:`accounts`)."""
    config = services.config
    secret = accounts.load_secret(config.data_dir)
    sign_in_id = row["sign_in_id"]
    token = accounts.link_for_mail(services.store, secret, sign_in_id, now) if sign_in_id else None
    if token is None:
        raise MailUndeliverable("the sign-in link was used or has been purged")
    values = {
        "sign_in_url": f"{config.app_base_url}/account/auth?token={token}",
        "account_url": f"{config.app_base_url}/account",
        "app_base_url": config.app_base_url,
        "valid_minutes": str(accounts.LINK_VALID_SECONDS // 60),
        "website_url": config.website_url or "",
    }
    return render(config.data_dir, None, row["kind"], values, {})


MESSAGE_HEADERS = (
    "Subject",
    "From",
    "To",
    "Date",
    "Message-ID",
    "Auto-Submitted",
    "MIME-Version",
    "Content-Type",
)


def check_headers(raw: bytes) -> None:
    """The message as it will be sent carries exactly the headers built here, once each.

    The last line of defence against header injection, whatever the Python
    version's folding does: a name or subject that smuggled in a line break
    would show here as a header nobody set, or as the headers pushed into
    the body; such a message is never sent.
    """
    head, sep, _body = raw.partition(b"\r\n\r\n") if b"\r\n\r\n" in raw else raw.partition(b"\n\n")
    if not sep:
        raise MailUndeliverable("the message has no header section")
    names: list[str] = []
    for line in head.splitlines():
        if line[:1] in (b" ", b"\t"):
            continue  # a folded continuation of the previous header
        name, colon, _value = line.partition(b":")
        if not colon or not name or any(c <= 32 or c >= 127 for c in name):
            raise MailUndeliverable("the message's headers are malformed")
        names.append(name.decode("ascii"))
    if sorted(names) != sorted(MESSAGE_HEADERS):
        raise MailUndeliverable(f"the message's headers are not the ones built: {', '.join(names)}")


def send_due(
    services: Services,
    now: int,
    *,
    limit: int = BATCH_LIMIT,
    max_attempts: int = MAX_ATTEMPTS,
    tls_context: ssl.SSLContext | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    connect_when_idle: bool = False,
) -> Summary:
    """Send what is due at ``now``: claim, render, send, record; one SMTP session for the batch.

    Raises :class:`errors.MailUnavailable` when the server cannot be reached
    (nothing is claimed then, so no attempt is spent), and
    :class:`errors.ConfigError` when ``SMTP_URL`` is unset (mail stays queued).
    With nothing due the server is not contacted, unless ``connect_when_idle``
    (the command line's flush, which doubles as a check of the settings).
    """
    config = services.config
    if not config.smtp_url or not config.mail_from:
        raise ConfigError("SMTP_URL and MAIL_FROM are not set: mail stays queued")
    settings = parse_smtp_url(config.smtp_url)
    sender = parse_mailbox(config.mail_from)
    store = services.store
    summary = Summary(failed=store.fail_abandoned_mail(now, max_attempts))
    due = store.count_due_mail(now, max_attempts)
    if not due and not connect_when_idle:
        return summary
    local_hostname = urlsplit(config.app_base_url).hostname or "localhost"
    smtp = connect(settings, local_hostname, tls_context)
    started = time.monotonic()
    try:
        for _ in range(limit):
            if should_stop():
                return summary
            if time.monotonic() - started > BATCH_SECONDS:
                summary.more = True
                return summary
            row = store.claim_mail(now, now + LEASE_SECONDS, max_attempts, new_message_id(sender.domain))
            if row is None:
                return summary
            if not _send_one(services, smtp, row, sender, now, max_attempts, summary):
                return summary
        summary.more = True
        return summary
    finally:
        _close(smtp)


def _send_one(
    services: Services,
    smtp: smtplib.SMTP,
    row: sqlite3.Row,
    sender: Address,
    now: int,
    max_attempts: int,
    summary: Summary,
) -> bool:
    """Send one claimed row and record the outcome; False when the session is no longer usable."""
    store = services.store
    outbox_id, attempts = int(row["id"]), int(row["attempts"])
    fields = {"outbox_id": outbox_id, "license_id": row["license_id"], "attempt": attempts}
    try:
        msg, recipient = build_message(services, row, sender, now)
    except MailUndeliverable as err:
        store.fail_mail(outbox_id, attempts, str(err))
        summary.failed += 1
        log.error("mail failed", extra={**fields, "error": str(err)})
        return True
    except (OSError, UnicodeError) as err:
        _record_failure(services, row, f"cannot render the message: {err}", now, max_attempts, summary)
        return True
    try:
        smtp.send_message(msg, from_addr=sender.addr_spec, to_addrs=[recipient])
    except (OSError, UnicodeError) as err:
        reason = _smtp_reply(err)
        _record_failure(services, row, reason, now, max_attempts, summary)
        # A refusal leaves the session usable (smtplib resets it); a broken connection, or a
        # 421 after which smtplib closes it, does not.
        if isinstance(err, smtplib.SMTPException) and smtp.sock is not None:
            return True
        summary.error = f"connection to the SMTP server broke: {reason}"
        return False
    store.mark_mail_sent(outbox_id, now)
    summary.sent += 1
    log.info("mail sent", extra={**fields, "message_id": row["message_id"]})
    return True


def _record_failure(
    services: Services, row: sqlite3.Row, reason: str, now: int, max_attempts: int, summary: Summary
) -> None:
    """Schedule the next try with backoff, or give up after ``max_attempts`` tries."""
    store = services.store
    outbox_id, attempts = int(row["id"]), int(row["attempts"])
    fields = {"outbox_id": outbox_id, "license_id": row["license_id"], "attempt": attempts, "error": reason}
    if attempts >= max_attempts:
        store.fail_mail(outbox_id, attempts, reason)
        summary.failed += 1
        log.error("mail failed", extra=fields)
        return
    next_at = now + retry_delay(attempts)
    store.retry_mail(outbox_id, attempts, next_at, reason)
    summary.retried += 1
    log.warning("mail will be retried", extra={**fields, "next_attempt_at": next_at})


# --- the sender thread of ``licensed serve`` ---------------------------------------------------


class MailSender:
    """Sends due mail every ``interval`` seconds until :meth:`stop`; backs off while SMTP is down."""

    def __init__(
        self,
        services: Services,
        *,
        interval: float = POLL_SECONDS,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.services = services
        self.interval = min(max(interval, POLL_MIN_SECONDS), POLL_MAX_SECONDS)
        self.tls_context = tls_context
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mail-sender", daemon=True)

    def start(self) -> MailSender:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the loop to end and wait for it (it ends after the message in hand, if any)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        delay = 0.0
        failures = 0
        while not self._stop.wait(delay):
            delay = self.interval
            try:
                summary = send_due(
                    self.services,
                    self.services.now(),
                    tls_context=self.tls_context,
                    should_stop=self._stop.is_set,
                )
                failures = 0
                if summary.more:
                    delay = 0.0
            except MailUnavailable as err:
                failures += 1
                delay = min(self.interval * 2**failures, POLL_MAX_SECONDS)
                log.warning("mail server unavailable", extra={"error": err.message, "retry_in": delay})
            except LicensedError as err:
                log.error("mail sending failed", extra={"error": err.message})
            except Exception:
                log.exception("mail sender error")
