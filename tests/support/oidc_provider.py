"""A local identity provider for tests: real keys, a real JWKS endpoint, signed tokens.

Shaped like Logto: issuer ``http://127.0.0.1:<port>/oidc``, a discovery document
at ``<issuer>/.well-known/openid-configuration`` naming the keys at
``<issuer>/jwks``, an EC P-384 key signing ES384 first. Keys are made here
with ``cryptography`` and tokens are signed with PyJWT; the JWKS server is
``http.server`` in a thread and counts the requests it gets.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

AUDIENCE = "https://api.licensed.test"


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    @property
    def public_jwk(self) -> dict[str, Any]:
        algorithm = ECAlgorithm if self.alg.startswith("ES") else RSAAlgorithm
        jwk: dict[str, Any] = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    @property
    def public_pem(self) -> bytes:
        return bytes(
            self.private.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES384", ec.generate_private_key(ec.SECP384R1()))


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Provider:
    """The JWKS server and the token minter of one test identity provider."""

    def __init__(self, key: SigningKey) -> None:
        self.published: list[SigningKey] = [key]
        self.signing = key
        self.mode = "ok"  # ok | error | huge[_undeclared] | garbage | no_usable_keys | stall
        self.requests = 0
        self.discovery_requests = 0
        self.discovered_issuer: str | None = None
        """The issuer the discovery document names (None: the real one)."""
        self.release = threading.Event()
        self._lock = threading.Lock()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with provider._lock:
                    if self.path != "/oidc/.well-known/openid-configuration":
                        provider.requests += 1  # key set fetches; discovery counts apart
                status, body = provider._answer(self.path)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                if provider.mode != "huge_undeclared":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), name="jwks", daemon=True
        )
        self.thread.start()
        self.running = True

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}/oidc"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/jwks"

    def _answer(self, path: str) -> tuple[int, bytes]:
        if path == "/oidc/.well-known/openid-configuration":
            self.discovery_requests += 1
            document = {
                "issuer": self.discovered_issuer or self.issuer,
                "jwks_uri": self.jwks_url,
                "id_token_signing_alg_values_supported": [self.signing.alg],
            }
            return 200, json.dumps(document).encode()
        if path != "/oidc/jwks":
            return 404, b'{"error":"not found"}'
        if self.mode == "error":
            return 500, b'{"error":"server_error"}'
        if self.mode in ("huge", "huge_undeclared"):
            return 200, json.dumps({"keys": [], "padding": "x" * 2_000_000}).encode()
        if self.mode == "garbage":
            return 200, b"<html>maintenance</html>"
        if self.mode == "no_usable_keys":
            return 200, json.dumps({"keys": [{"kty": "oct", "kid": "s", "k": "c2VjcmV0"}]}).encode()
        if self.mode == "stall":
            self.release.wait(5)
        return 200, json.dumps({"keys": [k.public_jwk for k in self.published]}).encode()

    def rotate(self, key: SigningKey, *, keep_old: bool = False) -> None:
        """The provider starts signing with ``key`` and publishes it."""
        self.published = [*self.published, key] if keep_old else [key]
        self.signing = key

    def stop(self) -> None:
        if self.running:
            self.release.set()
            self.server.shutdown()
            self.server.server_close()
            self.thread.join(timeout=5)
            self.running = False

    # --- tokens ---------------------------------------------------------------------

    def claims(self, now: int, **overrides: Any) -> dict[str, Any]:
        """Logto-like access-token claims for a user, valid for an hour from ``now``."""
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "user-1",
            "client_id": "desktop-app",
            "scope": "openid",
            "iat": now,
            "exp": now + 3600,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self, now: int, *, key: SigningKey | None = None, headers: dict[str, Any] | None = None, **claims: Any
    ) -> str:
        """A signed token; a header given as None is left out."""
        key = key or self.signing
        header = {"kid": key.kid, "typ": "at+jwt", **(headers or {})}
        return jwt.encode(
            self.claims(now, **claims),
            key.private,
            algorithm=key.alg,
            headers={k: v for k, v in header.items() if v is not None},
        )

    def unsigned_token(self, now: int, **claims: Any) -> str:
        """``alg: none``: no signature at all."""
        header = {"alg": "none", "typ": "at+jwt", "kid": self.signing.kid}
        return f"{_segment(header)}.{_segment(self.claims(now, **claims))}."

    def hmac_with_public_key(self, now: int, **claims: Any) -> str:
        """HS256 keyed with the provider's public key (the algorithm-confusion attack)."""
        header = {"alg": "HS256", "typ": "at+jwt", "kid": self.signing.kid}
        signing_input = f"{_segment(header)}.{_segment(self.claims(now, **claims))}"
        mac = hmac.new(self.signing.public_pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(mac)}"


def _segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())
