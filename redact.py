"""Masking of secrets in log records, the last step before a line is written.

Logs are read by more people, and kept longer, than the database. Nothing
that grants access may reach them: license keys and leases (JWS), Stripe
secrets and webhook secrets, bearer tokens, passwords in URLs, checkout
session ids (they fetch a license key), and raw machine ids. Three nets:

- patterns: anything shaped like one of those secrets, wherever it appears;
- field names: a structured field called ``key``, ``machine_id``, ``*_token``,
  ``*secret*``, ``*password*``… is masked whole;
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

from config import Config

MASK = "[REDACTED]"
MIN_LITERAL = 4
"""Shorter request values are not masked as literals: they would mask ordinary words."""

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # A license key, PREFIX-TIER-<JWS>: masked whole.
    (re.compile(r"\b[A-Z0-9]{1,32}-[A-Z0-9_]{1,32}-eyJ[A-Za-z0-9_\-.]*"), MASK),
    # Any JWS/JWT (leases, OIDC tokens), whole or cut short: base64url of '{"'.
    (re.compile(r"eyJ[A-Za-z0-9_\-]{4,}(?:\.[A-Za-z0-9_\-]*){0,2}"), MASK),
    (re.compile(r"whsec_[A-Za-z0-9+/=_\-]+"), MASK),
    (re.compile(r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9_]+"), MASK),
    (re.compile(r"cs_(?:live|test)_[A-Za-z0-9_]+"), MASK),
    (re.compile(r"(?i)\b(bearer)(\s+)[^\s\"',;]+"), rf"\1\2{MASK}"),
    # user:password@ in any URL (SMTP_URL above all).
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^/\s:@\"']*):[^/\s@\"']*@"), rf"\1:{MASK}@"),
)

SENSITIVE_NAMES = frozenset(
    {"key", "machine_id", "lease", "authorization", "cookie", "password", "secret", "token", "body"}
)
_SENSITIVE_PARTS = ("secret", "password", "token", "authorization")

_request_values: ContextVar[tuple[str, ...]] = ContextVar("licensed_redact_request", default=())


def _suspect(text: str) -> bool:
    """Whether ``text`` may hold what a pattern above masks: each one needs one of
    these strings, in any case. Most log strings have none and skip the patterns.
    Lowering keeps every ASCII match, and what it adds only costs a full pass;
    six substring tests cost a third of one regex search for the same six."""
    lowered = text.lower()
    return (
        "eyj" in lowered
        or "whsec_" in lowered
        or "k_" in lowered
        or "cs_" in lowered
        or "://" in lowered
        or "bearer" in lowered
    )


@functools.lru_cache(maxsize=1024)
def is_sensitive_name(name: str) -> bool:
    lowered = name.lower()
    return (
        lowered in SENSITIVE_NAMES
        or lowered.endswith(("_key", "_secret", "_token", "_password", "_machine_id"))
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
        if value in text:
            text = text.replace(value, MASK)
    if _suspect(text):
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
    return text


def start_request() -> None:
    """Forget the previous request's values (waitress reuses its threads)."""
    _request_values.set(())


def remember_body(body: Any) -> None:
    """Mask this request's sensitive body fields (key, machine id…) in whatever it logs."""
    if type(body) is not dict and not isinstance(body, Mapping):
        return
    values = [v for k, v in body.items() if type(v) is str and len(v) >= MIN_LITERAL and is_sensitive_name(k)]
    values.sort(key=len, reverse=True)  # as _longest_first; a value given twice is only looked for twice
    _request_values.set(tuple(values))


def config_secrets(config: Config) -> tuple[str, ...]:
    """The configured secrets, to be masked as literals in every log line."""
    values = [
        config.stripe_secret_key,
        config.admin_token,
        config.internal_api_key,
        *config.stripe_webhook_secrets,
    ]
    if config.smtp_url:
        password = urlsplit(config.smtp_url).password
        if password:
            values += [password, unquote(password)]
    return tuple(v for v in values if v and len(v) >= MIN_LITERAL)


class Redactor:
    """Cleans one log entry (a JSON-ready dict) before it is written."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = tuple(s for s in secrets if s)
        self._secrets_ordered = _longest_first(self.secrets)
        self._request_memo: tuple[tuple[str, ...], tuple[str, ...]] = ((), self._secrets_ordered)

    def clean(self, value: Any, name: str | None = None) -> Any:
        literals = self._literals(_request_values.get())
        if type(value) is dict and name is None:
            flat = _clean_flat(value, literals)
            if flat is not None:
                return flat
        return self._clean(value, name, literals)

    def is_plain(self, text: str) -> bool:
        """Whether ``text`` would come out of :meth:`clean` unchanged (the request's
        values and the configured secrets count): callers that know the rest of
        their entry is numbers may then skip the walk."""
        return _plain(text, self._literals(_request_values.get()))

    def _literals(self, request: tuple[str, ...]) -> tuple[str, ...]:
        """The configured secrets and the request's values, longest first (once per request)."""
        if not request:
            return self._secrets_ordered
        if not self.secrets:
            return request  # already longest first
        memo = self._request_memo  # one read: another thread may replace it meanwhile
        if memo[0] is not request:
            memo = (request, _longest_first((*self.secrets, *request)))
            self._request_memo = memo
        return memo[1]

    def _clean(self, value: Any, name: str | None, literals: tuple[str, ...]) -> Any:
        if name is not None and is_sensitive_name(name) and value not in (None, "", [], {}):
            return MASK
        kind = type(value)
        if kind is str:
            return _redact(value, literals)
        if value is None or kind is int or kind is float or kind is bool:
            return value
        if isinstance(value, Mapping):
            return {str(k): self._clean(v, str(k), literals) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self._clean(v, None, literals) for v in value]
        if isinstance(value, bool | int | float):
            return value
        return _redact(str(value), literals)


_SCALAR_TYPES = frozenset({str, int, float, bool, type(None)})


def _clean_flat(entry: dict[Any, Any], literals: tuple[str, ...]) -> dict[Any, Any] | None:
    """A flat entry (scalar values only) with nothing secret-shaped in any of its text:
    only sensitive field names are masked. None when the full walk is needed.

    Most log lines are such entries; one search over all
    their text together replaces a search per field. Joining can only add
    matches across fields, never hide one, so a false alarm just takes the
    full walk. An entry with no sensitive field name is returned as it is.
    """
    values = entry.values()
    if not _SCALAR_TYPES.issuperset(map(type, values)):
        return None
    if not _plain("\n".join([value for value in values if type(value) is str]), literals):
        return None
    sensitive = _sensitive_names(tuple(entry))
    if not sensitive:
        return entry
    return {
        str(name): MASK if name in sensitive and value not in (None, "") else value
        for name, value in entry.items()
    }


def _plain(text: str, literals: tuple[str, ...]) -> bool:
    """Nothing in ``text`` needs masking: no secret's shape, none of ``literals``."""
    if _suspect(text):
        return False
    for literal in literals:  # noqa: SIM110 (a loop, not all(): no generator on the request path)
        if literal in text:
            return False
    return True


@functools.lru_cache(maxsize=256)
def _sensitive_names(names: tuple[Any, ...]) -> frozenset[Any]:
    """Which of an entry's field names are masked: log calls repeat a few sets of names."""
    return frozenset(name for name in names if is_sensitive_name(str(name)))
