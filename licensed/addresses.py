"""E-mail addresses and display names: the one rule every way in shares.

Buyers' addresses come from Stripe, the admin API, checkout requests and the
sign-in form; every one of them is checked here before it is stored, and again
before a message is built, so no header can be made to carry a line break.
"""

from __future__ import annotations

import re
import unicodedata
from email import errors as email_errors
from email.header import decode_header, make_header
from email.headerregistry import Address

from .errors import InvalidEmail

MAX_NAME_LENGTH = 128
MAX_ADDRESS_LENGTH = 254

SCHEMA_PATTERN = "^[^@\\x00-\\x20\\x7f]{1,64}@[^@\\x00-\\x20\\x7f]+\\.[^@\\x00-\\x20\\x7f]+$"
"""What an API document can say of an address (JSON Schema); :func:`check_address` says the rest."""

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_TLD = re.compile(r"^(?:[A-Za-z]{2,63}|xn--[A-Za-z0-9-]{1,59})$")
_MAILBOX = re.compile(r"^\s*(?P<name>[^<>]*?)\s*<(?P<addr>[^<>]*)>\s*$")


def has_control(value: str) -> bool:
    """Control characters and Unicode line/paragraph separators: anything that can break a header."""
    return any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in value)


def check_address(value: object) -> str:
    """The address, normalised (ASCII domain, lower case), or :class:`errors.InvalidEmail`.

    Strict on purpose: a plain ``local@domain.tld`` whose local part is ASCII
    (no SMTPUTF8 needed) and whose domain is a host name with a dot. Comments,
    quoting tricks, literals and trailing text are refused rather than fixed.
    """
    if not isinstance(value, str) or not value:
        raise InvalidEmail("an e-mail address is required")
    if has_control(value):
        raise InvalidEmail("the e-mail address contains a line break or control character")
    if len(value) > MAX_ADDRESS_LENGTH or any(ch.isspace() for ch in value):
        raise InvalidEmail(f"{value!r} is not a valid e-mail address")
    try:
        parsed = Address(addr_spec=value)
    except (ValueError, IndexError, email_errors.MessageError) as err:
        raise InvalidEmail(f"{value!r} is not a valid e-mail address") from err
    local, domain = parsed.username, parsed.domain
    if not local or not local.isascii() or len(local) > 64 or parsed.addr_spec != value:
        raise InvalidEmail(f"{value!r} is not a valid e-mail address")
    try:
        ascii_domain = domain.encode("idna").decode("ascii").lower()
    except UnicodeError as err:
        raise InvalidEmail(f"{value!r} has an invalid domain") from err
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels) or not _TLD.match(labels[-1]):
        raise InvalidEmail(f"{value!r} has an invalid domain")
    return Address(username=local, domain=ascii_domain).addr_spec


def check_display_name(value: object) -> str | None:
    """A display name safe for a header (``None`` when blank), or :class:`errors.InvalidEmail`.

    Checked after decoding: a name written as RFC 2047 encoded words
    (``=?utf-8?q?…?=``) can hide a line break that some Python versions
    put into the header when they fold it (CVE-2024-6923), so encoded
    words are decoded first and the decoded text is what is checked, and
    kept: the name is encoded again, safely, when a header is built.
    """
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEmail("the name must be text")
    if has_control(value):
        raise InvalidEmail("the name contains a line break or control character")
    if "=?" in value:
        try:
            value = str(make_header(decode_header(value)))
        except (ValueError, LookupError, UnicodeError, email_errors.HeaderParseError) as err:
            raise InvalidEmail("the name holds a malformed encoded word") from err
        if has_control(value):
            raise InvalidEmail("the name hides a line break or control character in an encoded word")
    name = value.strip()
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidEmail(f"the name is longer than {MAX_NAME_LENGTH} characters")
    return name or None


def mailbox(addr: object, name: object = None) -> Address:
    """A checked ``Address`` for a header: both parts checked, the name properly quoted by ``email``."""
    checked = check_address(addr)
    local, _, domain = checked.rpartition("@")
    return Address(display_name=check_display_name(name) or "", username=local, domain=domain)


def parse_mailbox(value: str) -> Address:
    """``Name <addr@host>`` or ``addr@host`` (``MAIL_FROM``), checked like any recipient."""
    if has_control(value):
        raise InvalidEmail("the address contains a line break or control character")
    match = _MAILBOX.match(value)
    if match is None:
        return mailbox(value.strip())
    name = match["name"]
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1]
    return mailbox(match["addr"].strip(), name)
