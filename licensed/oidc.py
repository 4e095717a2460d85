"""Customer identity: identity-provider access tokens, and which customers a user owns.

A desktop app whose user signed in with an OIDC provider sends that user's
access token. :class:`OidcVerifier` checks it with PyJWT against the keys the
provider publishes (its JWKS): signature, ``iss``, ``aud``, a mandatory
``exp`` and, when present, ``nbf`` and ``iat``. Logto is the model: issuer
``https://<tenant>/oidc``, keys at ``<issuer>/jwks``, ES384 by default.

Only asymmetric algorithms are accepted (never ``HS*`` or ``none``), and the
token's ``alg`` must fit the key it names, so a public key can never be used
as an HMAC secret. The time claims are checked here against the ``now`` the
caller passes (PyJWT would read the wall clock), with :data:`LEEWAY` seconds
of tolerance for clock skew.

Keys are cached. The set is fetched on first use, refreshed after
:data:`KEYS_MAX_AGE` seconds, and refetched early only for a ``kid`` it does
not hold (a key rotation at the provider): once per such ``kid``, and at most
once per :data:`UNKNOWN_KID_INTERVAL` seconds overall, so tokens naming bogus
keys cannot make this server hammer the provider. Fetches have a deadline and
a size cap. While the provider is down a cached set keeps working (up to
:data:`STALE_LIMIT`); with none, requests answer 503 ``OIDC_UNAVAILABLE``.

"""

from __future__ import annotations

import http.client
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, Any

import jwt

from .config import Config
from .errors import ConfigError, InvalidBearerToken, OidcUnavailable

log = logging.getLogger("licensed.oidc")

LEEWAY = 30
"""Seconds of clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""

FETCH_TIMEOUT = 5.0
"""Deadline, in seconds, for one JWKS fetch."""

MAX_JWKS_BYTES = 256 * 1024
MAX_JWKS_KEYS = 64
MAX_TOKEN_LENGTH = 16 * 1024

KEYS_MAX_AGE = 600
"""A fetched key set is used this many seconds before it is fetched again."""

STALE_LIMIT = 86400
"""While the provider is down an old key set keeps working, but not longer than this."""

RETRY_AFTER_FAILURE = 10
"""After a failed fetch, no new attempt for this many seconds (the provider is not hammered)."""

UNKNOWN_KID_INTERVAL = 30
"""At most one early refetch for an unknown ``kid`` per this many seconds."""

REMEMBERED_UNKNOWN_KIDS = 1024

# alg -> (kty, accepted curves or None for any)
ALGORITHMS: dict[str, tuple[str, frozenset[str] | None]] = {
    "ES256": ("EC", frozenset({"P-256"})),
    "ES384": ("EC", frozenset({"P-384"})),
    "ES512": ("EC", frozenset({"P-521"})),
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
}
"""The accepted signature algorithms: asymmetric only."""

ACCEPTED_TYPES = frozenset({"at+jwt", "application/at+jwt", "jwt"})
"""``typ`` headers of access tokens (RFC 9068, and plain JWT); an ID token or a logout
token carries another one, or none of these."""
DISCOVERY_PATH = "/.well-known/openid-configuration"


@dataclass(frozen=True)
class Identity:
    """A verified user: the provider's subject and, only when verified, the e-mail."""

    sub: str
    verified_email: str | None = None


@dataclass
class _KeySet:
    fetched_at: int
    keys: dict[str, dict[str, Any]]
    built: dict[tuple[str, str], jwt.PyJWK] = field(default_factory=dict)


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) only (urllib would also follow ftp)."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        if not newurl.lower().startswith(("http://", "https://")):
            raise urllib.error.HTTPError(newurl, code, "redirect to a non-HTTP URL", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class OidcVerifier:
    """Verifies one issuer's access tokens for one audience; thread-safe, one per server."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        jwks_url: str | None = None,
        *,
        timeout: float = FETCH_TIMEOUT,
        max_bytes: int = MAX_JWKS_BYTES,
        leeway: int = LEEWAY,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = audience
        self.jwks_url = jwks_url
        """Configured, or read from the provider's discovery document on first use."""
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.leeway = leeway
        self.fetches = 0
        # Providers differ on a trailing slash in iss (Auth0 has one, Logto not).
        self._issuers = [self.issuer, self.issuer + "/"]
        self._keyset: _KeySet | None = None
        self._lock = threading.Lock()
        self._last_failure: int | None = None
        self._last_unknown_fetch: int | None = None
        self._unknown_kids: OrderedDict[str, None] = OrderedDict()
        self._opener = urllib.request.build_opener(_HttpRedirectsOnly())

    @classmethod
    def from_config(cls, config: Config) -> OidcVerifier | None:
        """The verifier the settings describe, or None when OIDC is not configured."""
        if not config.oidc_issuer:
            return None
        if not config.oidc_audience:
            raise ConfigError("OIDC_AUDIENCE is required when OIDC_ISSUER is set")
        return cls(config.oidc_issuer, config.oidc_audience, config.oidc_jwks_url)

    # --- tokens -------------------------------------------------------------------

    def verify(self, token: str, now: int) -> Identity:
        """The identity in ``token``, or :class:`InvalidBearerToken` saying what is wrong.

        Raises :class:`OidcUnavailable` when the provider's keys are needed and
        cannot be fetched.
        """
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidBearerToken("the access token is too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            # Logto and others hand out opaque tokens unless a resource is asked for.
            raise InvalidBearerToken(
                f"the access token is not a JWT: request it for the API resource {self.audience}"
                " (OIDC_AUDIENCE), so the provider issues a JWT"
            ) from err
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.lower() not in ACCEPTED_TYPES):
            raise InvalidBearerToken("the token is not an access token (typ)")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in ALGORITHMS:
            shown = str(alg)[:20]
            raise InvalidBearerToken(f"access tokens signed with alg {shown!r} are not accepted")
        kid = header.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= 256:
            raise InvalidBearerToken("the access token names no signing key (kid)")
        key = self._key(kid, alg, now)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self._issuers,
                options={
                    # The time claims are checked below against the caller's clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "require": ["exp", "iss", "aud", "sub"],
                },
            )
        except jwt.MissingRequiredClaimError as err:
            raise InvalidBearerToken(f"the access token has no {err.claim} claim") from err
        except jwt.InvalidAudienceError as err:
            raise InvalidBearerToken("the access token is meant for another audience") from err
        except jwt.InvalidIssuerError as err:
            raise InvalidBearerToken("the access token comes from another issuer") from err
        except jwt.InvalidSignatureError as err:
            raise InvalidBearerToken("the access token's signature does not verify") from err
        except jwt.PyJWTError as err:
            raise InvalidBearerToken("the access token is malformed") from err
        self._check_times(claims, now)
        sub = claims["sub"]
        if not isinstance(sub, str) or not 0 < len(sub) <= 255:
            raise InvalidBearerToken("the access token's sub is not a usable subject")
        email = claims.get("email")
        verified = (
            email.strip()
            if claims.get("email_verified") is True and isinstance(email, str) and 3 <= len(email) <= 320
            else None
        )
        return Identity(sub=sub, verified_email=verified)

    def _check_times(self, claims: Mapping[str, Any], now: int) -> None:
        exp = claims["exp"]
        if not _is_time(exp):
            raise InvalidBearerToken("the access token's exp is not a time")
        if now >= exp + self.leeway:
            raise InvalidBearerToken("the access token has expired", code="TOKEN_EXPIRED")
        for name in ("nbf", "iat"):
            value = claims.get(name)
            if value is None:
                continue
            if not _is_time(value):
                raise InvalidBearerToken(f"the access token's {name} is not a time")
            if value > now + self.leeway:
                raise InvalidBearerToken(f"the access token is not valid yet ({name} is in the future)")

    # --- keys ------------------------------------------------------------------------

    def _key(self, kid: str, alg: str, now: int) -> jwt.PyJWK:
        keyset = self._keyset
        if keyset is None or not 0 <= now - keyset.fetched_at < KEYS_MAX_AGE:
            keyset = self._refresh(now)
        if kid not in keyset.keys:
            keyset = self._refresh_for_unknown(kid, now)
        return self._build(keyset, kid, alg)

    def _build(self, keyset: _KeySet, kid: str, alg: str) -> jwt.PyJWK:
        """The key ``kid`` for ``alg``, refused when its type or curve does not fit ``alg``."""
        data = keyset.keys[kid]
        kty, curves = ALGORITHMS[alg]
        if data.get("alg", alg) != alg or data["kty"] != kty or (curves and data.get("crv") not in curves):
            raise InvalidBearerToken(f"the provider's key {kid!r} does not sign with {alg}")
        built = keyset.built.get((kid, alg))
        if built is None:
            try:
                built = jwt.PyJWK(data, algorithm=alg)
            except jwt.PyJWTError as err:
                raise InvalidBearerToken(f"the provider's key {kid!r} is not usable") from err
            keyset.built[(kid, alg)] = built
        return built

    def _refresh(self, now: int) -> _KeySet:
        """A current key set: fetched now, or the cached one while the provider is unreachable."""
        with self._lock:
            keyset = self._keyset
            if keyset is not None and 0 <= now - keyset.fetched_at < KEYS_MAX_AGE:
                return keyset  # another thread fetched it meanwhile
            usable = keyset if keyset is not None and 0 <= now - keyset.fetched_at < STALE_LIMIT else None
            if self._last_failure is not None and 0 <= now - self._last_failure < RETRY_AFTER_FAILURE:
                if usable is not None:
                    return usable
                raise OidcUnavailable(
                    "the identity provider's keys could not be fetched; retrying within "
                    f"{RETRY_AFTER_FAILURE} s"
                )
            try:
                return self._fetch_locked(now)
            except OidcUnavailable:
                if usable is not None:
                    log.warning("using cached identity provider keys", extra={"age": now - usable.fetched_at})
                    return usable
                raise

    def _refresh_for_unknown(self, kid: str, now: int) -> _KeySet:
        """Refetch once for a ``kid`` not in the set: the provider may have rotated its keys."""
        with self._lock:
            keyset = self._keyset
            if keyset is not None and kid in keyset.keys:
                return keyset
            recently = self._last_unknown_fetch is not None and (
                0 <= now - self._last_unknown_fetch < UNKNOWN_KID_INTERVAL
            )
            if kid in self._unknown_kids or recently:
                raise InvalidBearerToken("the access token is signed by a key the provider does not publish")
            self._last_unknown_fetch = now
            keyset = self._fetch_locked(now)
            if kid not in keyset.keys:
                self._unknown_kids[kid] = None
                while len(self._unknown_kids) > REMEMBERED_UNKNOWN_KIDS:
                    self._unknown_kids.popitem(last=False)
                raise InvalidBearerToken("the access token is signed by a key the provider does not publish")
            return keyset

    def _jwks_location(self) -> str:
        """The JWKS URL: configured, or the discovery document's ``jwks_uri`` (fetched once)."""
        if self.jwks_url is None:
            document = _json_object(self._download(self.issuer + DISCOVERY_PATH), "discovery document")
            if str(document.get("issuer", "")).rstrip("/") != self.issuer:
                raise OidcUnavailable("the provider's discovery document names another issuer")
            location = document.get("jwks_uri")
            if not isinstance(location, str) or not location.lower().startswith(("https://", "http://")):
                raise OidcUnavailable("the provider's discovery document has no http(s) jwks_uri")
            self.jwks_url = location
        return self.jwks_url

    def _fetch_locked(self, now: int) -> _KeySet:
        try:
            keys = parse_jwks(self._download(self._jwks_location()))
        except OidcUnavailable as err:
            self._last_failure = now
            log.warning(
                "identity provider keys unavailable", extra={"url": self.jwks_url, "reason": err.message}
            )
            raise
        self._last_failure = None
        self.fetches += 1
        keyset = _KeySet(fetched_at=now, keys=keys)
        self._keyset = keyset
        log.info("fetched identity provider keys", extra={"url": self.jwks_url, "kids": sorted(keys)})
        return keyset

    def _download(self, url: str) -> bytes:
        """A document of the provider: at most ``max_bytes``, within ``timeout`` seconds."""
        request = urllib.request.Request(  # noqa: S310 - a configured or discovered http(s) URL
            url, headers={"Accept": "application/json", "User-Agent": "licensed"}
        )
        deadline = time.monotonic() + self.timeout
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                declared = response.headers.get("Content-Length")
                # isascii first: "²".isdigit() is true, and int("²") raises.
                if declared and declared.isascii() and declared.isdigit() and int(declared) > self.max_bytes:
                    raise OidcUnavailable(
                        f"the identity provider's answer is larger than {self.max_bytes} bytes"
                    )
                chunks: list[bytes] = []
                size = 0
                while chunk := response.read(16384):
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise OidcUnavailable(
                            f"the identity provider's answer is larger than {self.max_bytes} bytes"
                        )
                    if time.monotonic() > deadline:
                        raise OidcUnavailable("the identity provider's answer took too long to arrive")
                    chunks.append(chunk)
                return b"".join(chunks)
        except urllib.error.HTTPError as err:
            raise OidcUnavailable(f"the identity provider answered HTTP {err.code} for {url}") from err
        except urllib.error.URLError as err:
            raise OidcUnavailable(f"the identity provider could not be reached: {err.reason}") from err
        except (OSError, http.client.HTTPException) as err:
            raise OidcUnavailable(f"the identity provider could not be reached: {err}") from err


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise OidcUnavailable(f"the identity provider's {what} is not JSON") from err
    if not isinstance(document, dict):
        raise OidcUnavailable(f"the identity provider's {what} is not a JSON object")
    return document


def parse_jwks(body: bytes) -> dict[str, dict[str, Any]]:
    """Usable signing keys of a JWKS document by ``kid``.

    Kept: public keys of an accepted type with a ``kid``, for signing, whose
    material PyJWT accepts. Symmetric (``oct``) and encryption keys are dropped,
    so no token can ever be checked with a shared secret.
    """
    raw_keys = _json_object(body, "JWKS").get("keys")
    if not isinstance(raw_keys, list):
        raise OidcUnavailable("the identity provider's JWKS has no keys list")
    kinds = {kty for kty, _ in ALGORITHMS.values()}
    keys: dict[str, dict[str, Any]] = {}
    for raw in raw_keys[:MAX_JWKS_KEYS]:
        if not isinstance(raw, dict):
            continue
        kid, kty, alg = raw.get("kid"), raw.get("kty"), raw.get("alg")
        if not isinstance(kid, str) or not kid or kid in keys or kty not in kinds:
            continue
        if raw.get("use", "sig") != "sig" or (alg is not None and alg not in ALGORITHMS):
            continue
        if any(p in raw for p in ("d", "p", "q", "k")):
            continue  # private or symmetric material has no place in a public key set
        try:
            jwt.PyJWK(raw)
        except jwt.PyJWTError:
            continue
        keys[kid] = raw
    if not keys:
        raise OidcUnavailable("the identity provider's JWKS holds no usable signing key")
    return keys


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
