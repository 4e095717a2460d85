"""The one error hierarchy of licensed.

Every failure that can reach a client is a :class:`LicensedError`. Each class
carries its HTTP status and its stable ``UPPER_SNAKE`` code, so the WSGI layer
needs exactly one function to turn any of them into the JSON error body. Low
level errors (``sqlite3``, ``nacl``, ``stripe``, ``tomllib``) are translated
into these at the edge of the module that meets them.
"""

from __future__ import annotations

from typing import Any


class LicensedError(Exception):
    """Root of every error this program raises on purpose."""

    status = 500
    code = "INTERNAL_ERROR"
    default_message = "internal error"

    def __init__(self, message: str | None = None, *, code: str | None = None) -> None:
        self.message = message or self.default_message
        if code is not None:
            self.code = code
        super().__init__(self.message)

    def headers(self) -> list[tuple[str, str]]:
        """Extra response headers this error needs (``Allow``, ``Retry-After``)."""
        return []


class BadRequest(LicensedError):
    status = 400
    code = "BAD_REQUEST"
    default_message = "the request is not valid"


class InvalidJSON(BadRequest):
    code = "INVALID_JSON"
    default_message = "the body is not valid JSON"


class ValidationFailed(BadRequest):
    code = "VALIDATION_ERROR"


class Unauthorized(LicensedError):
    status = 401
    code = "UNAUTHORIZED"
    default_message = "missing or wrong credentials"

    def headers(self) -> list[tuple[str, str]]:
        return [("WWW-Authenticate", 'Bearer realm="licensed"')]


class Forbidden(LicensedError):
    status = 403
    code = "FORBIDDEN"
    default_message = "this route is turned off"


class NotFound(LicensedError):
    status = 404
    code = "NOT_FOUND"
    default_message = "no such resource"


class MethodNotAllowed(LicensedError):
    status = 405
    code = "METHOD_NOT_ALLOWED"
    default_message = "method not allowed on this path"

    def __init__(self, allowed: list[str]) -> None:
        self.allowed = sorted(allowed)
        super().__init__(f"allowed: {', '.join(self.allowed)}")

    def headers(self) -> list[tuple[str, str]]:
        return [("Allow", ", ".join(self.allowed))]


class Conflict(LicensedError):
    status = 409
    code = "CONFLICT"
    default_message = "the request conflicts with the current state"


class PayloadTooLarge(LicensedError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"
    default_message = "the body is too large"


class UnsupportedMediaType(LicensedError):
    status = 415
    code = "UNSUPPORTED_MEDIA_TYPE"
    default_message = "the body must be application/json"


class RateLimited(LicensedError):
    status = 429
    code = "RATE_LIMITED"
    default_message = "too many requests"

    def __init__(self, retry_after: int) -> None:
        self.retry_after = max(1, retry_after)
        super().__init__(f"too many requests; retry in {self.retry_after} s")

    def headers(self) -> list[tuple[str, str]]:
        return [("Retry-After", str(self.retry_after))]


class ServiceUnavailable(LicensedError):
    status = 503
    code = "SERVICE_UNAVAILABLE"
    default_message = "temporarily unavailable"


class StorageUnavailable(ServiceUnavailable):
    """The database cannot be read or written (read-only file, disk full, locked)."""

    code = "STORAGE_UNAVAILABLE"
    default_message = "the database is not available"


class StripeNotConfigured(ServiceUnavailable):
    code = "STRIPE_NOT_CONFIGURED"
    default_message = "Stripe is not configured on this server"


class StripeUnavailable(ServiceUnavailable):
    code = "STRIPE_UNAVAILABLE"
    default_message = "Stripe could not be reached"


class InvalidToken(LicensedError):
    """A license key or lease that is malformed, forged or signed by an unknown key.

    On the license routes this is an outcome (``INVALID_KEY`` with 200), not an
    HTTP error; elsewhere it answers 400.
    """

    status = 400
    code = "INVALID_KEY"
    default_message = "the key is not valid"


class SignInLinkRefused(BadRequest):
    """A sign-in link that signs nobody in; ``reason`` is ``used``, ``expired`` or ``unknown``
    (forged, cut short, or purged: the page cannot tell them apart, and says so)."""

    code = "SIGN_IN_LINK_REFUSED"
    default_message = "this sign-in link does not work"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"sign-in link {reason}")


class ConfigError(LicensedError):
    """Bad configuration: stops start-up with one line naming the culprit."""

    code = "CONFIG_ERROR"


# --- customer identity (OIDC) ---------------------------------------------------------


class InvalidBearerToken(Unauthorized):
    """An identity provider's access token that does not verify (RFC 6750 ``invalid_token``)."""

    code = "INVALID_TOKEN"
    default_message = "the access token is not valid"

    def headers(self) -> list[tuple[str, str]]:
        return [("WWW-Authenticate", 'Bearer realm="licensed", error="invalid_token"')]


class OidcNotConfigured(ServiceUnavailable):
    code = "OIDC_NOT_CONFIGURED"
    default_message = "sign-in with an identity provider is not configured on this server"


class OidcUnavailable(ServiceUnavailable):
    """The identity provider's keys (JWKS) cannot be fetched, so no token can be checked."""

    code = "OIDC_UNAVAILABLE"
    default_message = "the identity provider could not be reached"


# --- mail ---------------------------------------------------------------------


class InvalidEmail(ValidationFailed):
    """An e-mail address or display name that is malformed or could inject headers."""

    code = "INVALID_EMAIL"
    default_message = "not a valid e-mail address"


class MailUndeliverable(LicensedError):
    """A queued message that can never be sent as it is (bad recipient, unknown kind,
    licence gone, headers not as built): it is marked failed, not retried."""

    code = "MAIL_UNDELIVERABLE"


class MailUnavailable(ServiceUnavailable):
    """The SMTP server cannot be reached, refuses TLS or refuses the login."""

    code = "MAIL_UNAVAILABLE"
    default_message = "the mail server could not be reached"


# --- Stripe -------------------------------------------------------------------


class WebhookSignatureError(BadRequest):
    code = "INVALID_SIGNATURE"
    default_message = "the Stripe-Signature header does not verify"


class StripeRateLimited(StripeUnavailable):
    code = "STRIPE_RATE_LIMITED"


class StripeKeyRefused(StripeUnavailable):
    """Stripe refused the key (401), or a restricted key may not make this call (403)."""

    code = "STRIPE_KEY_REFUSED"
    default_message = "Stripe refused the secret key"


class ServerUnreachable(ServiceUnavailable):
    """This server's public URL (``APP_BASE_URL``) did not answer over the network."""

    code = "SERVER_UNREACHABLE"
    default_message = "the server at APP_BASE_URL could not be reached"


class PurchaseCheckFailed(LicensedError):
    """A step of the test purchase (``licensed stripe check --e2e``) did not happen in time."""

    code = "PURCHASE_CHECK_FAILED"


class WebhookFailed(LicensedError):
    """Processing failed and was rolled back; Stripe should retry."""

    status = 500
    code = "WEBHOOK_FAILED"


class NoLicenseYet(LicensedError):
    """The event refers to a licence not created yet: fail, so Stripe retries later."""

    status = 500
    code = "LICENSE_NOT_YET_KNOWN"


class ReconcileBusy(LicensedError):
    status = 409
    code = "RECONCILE_RUNNING"
    default_message = "another reconcile is running"


# --- storage ------------------------------------------------------------------


class BackupFailed(StorageUnavailable):
    code = "BACKUP_FAILED"
    default_message = "the backup failed"


class ImportRefused(ValidationFailed):
    """A licence import file with bad lines: nothing was imported.

    ``report`` is the import's summary with every offending line and why.
    """

    code = "IMPORT_REFUSED"

    def __init__(self, message: str, report: dict[str, Any]) -> None:
        super().__init__(message)
        self.report = report


# --- signing key export files ------------------------------------------------------


class KeyFileError(LicensedError):
    """A signing key export file that cannot be written, read or trusted."""

    status = 400
    code = "KEY_FILE_INVALID"
    default_message = "the key file is not valid"


class WrongPassphrase(KeyFileError):
    """Decryption failed: the passphrase differs from the export's, or the file was altered
    (authenticated encryption cannot tell the two apart)."""

    status = 403
    code = "WRONG_PASSPHRASE"
    default_message = "wrong passphrase, or the key file was altered"


class KeyConflict(KeyFileError):
    """The file holds a key whose kid names a different key here: kids are derived from
    the public key, so one of the two is forged or corrupt. Nothing is replaced."""

    status = 409
    code = "KEY_CONFLICT"
    default_message = "a different key with the same kid is already here"
