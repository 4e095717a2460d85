"""Configuration: one immutable object built once at start-up.

Settings come from the environment, or from a file of ``NAME=value`` lines
given with ``--env-file`` (the process environment wins over the file). Every
name is declared once in :data:`SETTINGS` with its converter; a malformed value,
or an unknown name in an env file, stops start-up with a message naming it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .addresses import parse_mailbox
from .errors import ConfigError, InvalidEmail

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _port(value: str) -> int:
    port = int(value)
    if not 0 <= port <= 65535:
        raise ValueError("must be 0..65535")
    return port


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


def _url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http(s) URL")
    return value.rstrip("/")


def _text(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value.strip()


MIN_TOKEN_LENGTH = 32


def _bearer_token(value: str) -> str:
    """A token guarding a route: long enough that guessing it is hopeless."""
    token = _text(value)
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"must be at least {MIN_TOKEN_LENGTH} characters"
            " (python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def _webhook_secrets(value: str) -> tuple[str, ...]:
    secrets = tuple(part.strip() for part in value.split(",") if part.strip())
    for secret in secrets:
        if not secret.startswith("whsec_"):
            raise ValueError("each secret must start with whsec_")
    return secrets


def _networks(value: str) -> tuple[IPNetwork, ...]:
    return tuple(
        ipaddress.ip_network(part.strip(), strict=False) for part in value.split(",") if part.strip()
    )


def _smtp_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
        raise ValueError("must be smtp://[user:pass@]host[:port] or smtps://…")
    parts.port  # noqa: B018 - raises ValueError on a bad port
    return value


def _mail_from(value: str) -> str:
    try:
        return str(parse_mailbox(value))
    except InvalidEmail as err:
        raise ValueError(
            f"must be an address, optionally with a name (Name <addr@host>): {err.message}"
        ) from err


PASSPHRASE_MIN_LENGTH = 12


def _passphrase(value: str) -> str:
    """Kept exactly as given: a changed passphrase would not open an earlier export."""
    if len(value) < PASSPHRASE_MIN_LENGTH:
        raise ValueError(f"must be at least {PASSPHRASE_MIN_LENGTH} characters")
    return value


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
    return level


def _cpu_affinity(value: str) -> str:
    choice = value.strip().lower()
    if choice in ("one", "all") or re.fullmatch(r"[0-9]{1,4}", choice):
        return choice
    raise ValueError("must be one, all or a CPU number")


@dataclass(frozen=True)
class Setting:
    name: str
    attr: str
    convert: Callable[[str], Any]
    default: Any = None
    aliases: tuple[str, ...] = ()


SETTINGS: tuple[Setting, ...] = (
    Setting("PORT", "port", _port, 3010),
    Setting("HOST", "host", _text, "127.0.0.1"),
    Setting("APP_BASE_URL", "app_base_url", _url, "http://127.0.0.1:3010"),
    Setting("WEBSITE_URL", "website_url", _url, None, aliases=("DASHCADDY_WEBSITE_URL",)),
    Setting("STRIPE_SECRET_KEY", "stripe_secret_key", _text),
    Setting("STRIPE_PUBLISHABLE_KEY", "stripe_publishable_key", _text),
    Setting("STRIPE_WEBHOOK_SECRET", "stripe_webhook_secrets", _webhook_secrets, ()),
    Setting("STRIPE_API_BASE", "stripe_api_base", _url),
    Setting("DATA_DIR", "data_dir", lambda v: Path(_text(v)), Path("data")),
    Setting("PLANS_FILE", "plans_file", lambda v: Path(_text(v))),
    Setting("ADMIN_TOKEN", "admin_token", _bearer_token),
    Setting("INTERNAL_API_KEY", "internal_api_key", _bearer_token),
    Setting("SMTP_URL", "smtp_url", _smtp_url),
    Setting("MAIL_FROM", "mail_from", _mail_from),
    Setting("OIDC_ISSUER", "oidc_issuer", _url),
    Setting("OIDC_AUDIENCE", "oidc_audience", _text),
    Setting("OIDC_JWKS_URL", "oidc_jwks_url", _url),
    Setting("LEASE_TTL_HOURS", "lease_ttl_hours", _positive_int, 168),
    Setting("TRUSTED_PROXIES", "trusted_proxies", _networks, _networks("127.0.0.1")),
    Setting("RATE_LIMIT_PER_MINUTE", "rate_limit_per_minute", _non_negative_int, 120),
    Setting("THREADS", "threads", _positive_int, 8),
    Setting("CPU_AFFINITY", "cpu_affinity", _cpu_affinity, "one"),
    Setting("MAX_BODY_BYTES", "max_body_bytes", _positive_int, 64 * 1024),
    Setting("LOG_LEVEL", "log_level", _log_level, "INFO"),
    Setting("LICENSED_KEYS_PASSPHRASE", "keys_passphrase", _passphrase),
    Setting("LITESTREAM_SOCKET", "litestream_socket", lambda v: Path(_text(v))),
)

_KNOWN = {name for s in SETTINGS for name in (s.name, *s.aliases)}


@dataclass(frozen=True)
class Config:
    port: int = 3010
    host: str = "127.0.0.1"
    app_base_url: str = "http://127.0.0.1:3010"
    website_url: str | None = None
    stripe_secret_key: str | None = None
    stripe_publishable_key: str | None = None
    stripe_webhook_secrets: tuple[str, ...] = ()
    stripe_api_base: str | None = None
    data_dir: Path = Path("data")
    plans_file: Path | None = None
    admin_token: str | None = None
    internal_api_key: str | None = None
    smtp_url: str | None = None
    mail_from: str | None = None
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_url: str | None = None
    lease_ttl_hours: int = 168
    trusted_proxies: tuple[IPNetwork, ...] = field(default_factory=lambda: _networks("127.0.0.1"))
    rate_limit_per_minute: int = 120
    threads: int = 8
    cpu_affinity: str = "one"
    max_body_bytes: int = 64 * 1024
    log_level: str = "INFO"
    keys_passphrase: str | None = field(default=None, repr=False)
    litestream_socket: Path | None = None

    @property
    def plans_path(self) -> Path:
        return self.plans_file or self.data_dir / "plans.toml"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "licensed.sqlite3"

    @property
    def keys_dir(self) -> Path:
        return self.data_dir / "keys"

    @classmethod
    def from_sources(cls, environ: Mapping[str, str], env_file: Path | None = None) -> Config:
        """Build the config from an optional env file overlaid by the environment."""
        values: dict[str, str] = {}
        if env_file is not None:
            values.update(read_env_file(env_file))
        values.update({k: v for k, v in environ.items() if k in _KNOWN})
        return cls.from_mapping(values)

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> Config:
        unknown = sorted(set(values) - _KNOWN)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]}")
        kwargs: dict[str, Any] = {}
        for setting in SETTINGS:
            for name in (setting.name, *setting.aliases):
                if name in values and values[name] != "":
                    try:
                        kwargs[setting.attr] = setting.convert(values[name])
                    except ValueError as err:
                        raise ConfigError(f"{name}: {err}") from err
                    break
        _check_oidc(kwargs)
        if kwargs.get("admin_token") and kwargs.get("admin_token") == kwargs.get("internal_api_key"):
            raise ConfigError("ADMIN_TOKEN and INTERNAL_API_KEY must differ: each opens other routes")
        if bool(kwargs.get("smtp_url")) != bool(kwargs.get("mail_from")):
            raise ConfigError("SMTP_URL and MAIL_FROM go together: set both or neither")
        return cls(**kwargs)


def _check_oidc(kwargs: Mapping[str, Any]) -> None:
    """OIDC settings come as a whole: an issuer and the audience its tokens are for.

    Without an audience any token the issuer signs for any other application
    would be accepted, so a lone issuer is refused rather than silently weak.
    """
    if not kwargs.get("oidc_issuer"):
        for name, attr in (("OIDC_AUDIENCE", "oidc_audience"), ("OIDC_JWKS_URL", "oidc_jwks_url")):
            if kwargs.get(attr):
                raise ConfigError(f"OIDC_ISSUER is required when {name} is set")
    elif not kwargs.get("oidc_audience"):
        raise ConfigError(
            "OIDC_AUDIENCE is required when OIDC_ISSUER is set (the API resource the access tokens are for)"
        )


_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")


def read_env_file(path: Path) -> dict[str, str]:
    """Read ``NAME=value`` lines; ``#`` comments and blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read env file {path}: {err.strerror}") from err
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if not match:
            raise ConfigError(f"{path}:{number}: expected NAME=value")
        name, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if name not in _KNOWN:
            raise ConfigError(f"{path}:{number}: unknown setting {name}")
        values[name] = value
    return values


def setting_names() -> list[str]:
    """Every accepted name, for documentation and the example env file."""
    return [f.name for f in SETTINGS]


assert {s.attr for s in SETTINGS} == {f.name for f in fields(Config)}
