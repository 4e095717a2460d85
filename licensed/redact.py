"""Masking of secrets: the last step before a log line is written or a row exported.

Logs and exports are read by more people, and kept longer, than the database.
Nothing that grants access may reach them: license keys and leases (JWS),
Stripe secrets and webhook secrets, bearer tokens, passwords in URLs, checkout
session ids (they fetch a license key), sign-in tokens, and raw machine ids.
Three nets:

- patterns: anything shaped like one of those secrets, wherever it appears;
- field names: a structured field called ``key``, ``machine_id``, ``*_token``,
  ``*secret*``, ``*password*``, ``*session_id``… is masked whole;
- literals: the configured secrets, and the sensitive fields of the request
  being served (its key and machine id), masked wherever they appear, even in
  a traceback.

Request bodies are never logged in the first place; this is the second line.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any
from urllib.parse import unquote, urlsplit

from .config import Config

MASK = "[REDACTED]"
MIN_LITERAL = 4
"""Shorter request values are not masked as literals: they would mask ordinary words."""

PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # A license key, PREFIX-TIER-<JWS>: masked whole.
    (re.compile(r"\b[A-Z0-9]{1,32}-[A-Z0-9_]{1,32}-eyJ[A-Za-z0-9_\-.]*"), MASK),
    # Any JWS/JWT (leases, OIDC tokens), whole or cut short: base64url of '{"'.
    (re.compile(r"eyJ[A-Za-z0-9_\-]{4,}(?:\.[A-Za-z0-9_\-]*){0,2}"), MASK),
    (re.compile(r"whsec_[A-Za-z0-9+/=_\-]+"), MASK),
    (re.compile(r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9_]+"), MASK),
    (re.compile(r"cs_(?:live|test)_[A-Za-z0-9_]+"), MASK),
    # A one-time sign-in link's token (or a checkout id) in a URL's query.
    (re.compile(r"([?&](?:token|session_id)=)[^&\s\"'#<>]+", re.IGNORECASE), rf"\1{MASK}"),
    (re.compile(r"\b(bearer)(\s+)[^\s\"',;]+", re.IGNORECASE), rf"\1\2{MASK}"),
    # user:password@ in any URL (SMTP_URL above all).
    (re.compile(r"\b([a-z][a-z0-9+.\-]*://[^/\s:@\"']*):[^/\s@\"']*@", re.IGNORECASE), rf"\1:{MASK}@"),
)

_ANY_PATTERN = re.compile(
    "|".join(f"(?{'i' if p.flags & re.IGNORECASE else ''}:{p.pattern})" for p, _ in PATTERNS)
)
"""Whether a text holds anything :data:`PATTERNS` would mask: one search instead of seven."""

SENSITIVE_NAMES = frozenset(
    {"key", "machine_id", "lease", "authorization", "cookie", "password", "secret", "token", "body", "csrf"}
)
_SENSITIVE_SUFFIXES = ("_key", "_secret", "_token", "_password", "_machine_id", "_session_id")
_SENSITIVE_PARTS = ("secret", "password", "token", "authorization")

_request_values: ContextVar[tuple[str, ...]] = ContextVar("licensed_redact_request", default=())


@functools.lru_cache(maxsize=1024)
def is_sensitive_name(name: str) -> bool:
    lowered = name.lower()
    return (
        lowered in SENSITIVE_NAMES
        or lowered.endswith(_SENSITIVE_SUFFIXES)
        or any(part in lowered for part in _SENSITIVE_PARTS)
    )


def redact_text(text: str, literals: Iterable[str] = ()) -> str:
    """``text`` with every secret-shaped run and every literal replaced by the mask."""
    return _redact(text, _longest_first(literals))


def _longest_first(literals: Iterable[str]) -> tuple[str, ...]:
    """Longer literals first, so one containing another is masked whole."""
    return tuple(sorted({v for v in literals if v}, key=len, reverse=True))


def _redact(text: str, literals: tuple[str, ...]) -> str:
    for value in literals:
        text = text.replace(value, MASK)
    if _ANY_PATTERN.search(text):
        for pattern, replacement in PATTERNS:
            text = pattern.sub(replacement, text)
    return text


def start_request() -> None:
    """Forget the previous request's values (waitress reuses its threads)."""
    _request_values.set(())


def remember_body(body: Any) -> None:
    """Mask this request's sensitive body fields (key, machine id…) in whatever it logs."""
    if isinstance(body, Mapping):
        values = [
            v
            for k, v in body.items()
            if isinstance(v, str) and len(v) >= MIN_LITERAL and is_sensitive_name(str(k))
        ]
        _request_values.set(tuple(values))


def config_secrets(config: Config) -> tuple[str, ...]:
    """The configured secrets, to be masked as literals in every log line."""
    values = [
        config.stripe_secret_key,
        config.admin_token,
        config.internal_api_key,
        config.keys_passphrase,
        *config.stripe_webhook_secrets,
    ]
    if config.smtp_url:
        password = urlsplit(config.smtp_url).password
        if password:
            values += [password, unquote(password)]
    return tuple(v for v in values if v and len(v) >= MIN_LITERAL)


class Redactor:
    """Cleans one log entry or exported row (a JSON-ready value) before it leaves."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = tuple(s for s in secrets if s)

    def clean(self, value: Any, name: str | None = None) -> Any:
        return self._clean(value, name, _longest_first((*self.secrets, *_request_values.get())))

    def _clean(self, value: Any, name: str | None, literals: tuple[str, ...]) -> Any:
        if name is not None and is_sensitive_name(name) and value not in (None, "", [], {}):
            return MASK
        if isinstance(value, str):
            return _redact(value, literals)
        if value is None or isinstance(value, bool | int | float):
            return value
        if isinstance(value, Mapping):
            return {str(k): self._clean(v, str(k), literals) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._clean(v, None, literals) for v in value]
        return _redact(str(value), literals)
