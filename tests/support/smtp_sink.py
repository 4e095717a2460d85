"""A real SMTP server for tests: aiosmtpd on 127.0.0.1, on a free port, recording what it accepts.

It can answer DATA with a chosen error, hold the n-th message (recorded, not
yet acknowledged) until the test releases it, require a login, and speak
STARTTLS or implicit TLS with a self-signed certificate made by
:func:`make_certificate`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import ssl
import threading
import time
from dataclasses import dataclass
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOLD_LIMIT_SECONDS = 30.0
DROP = "drop"
"""A reply that closes the connection instead of answering."""


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    tls: bool
    login: str | None
    raw: bytes
    """The DATA exactly as it arrived."""


class _FreePortController(Controller):
    """Binds port 0 and learns the port the system chose, before aiosmtpd's self-check connects."""

    def _trigger_server(self) -> None:
        assert self.server is not None
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        sink = self.sink
        with sink.lock:
            sink.data_attempts += 1
            reply = sink.replies.pop(0) if sink.replies else sink.reply
        if reply == DROP:
            server.transport.close()
            return "421 4.4.2 closing"
        if reply is not None:
            return reply
        message = message_from_bytes(envelope.content, policy=policy.default)
        login = session.auth_data.login.decode() if isinstance(session.auth_data, LoginPassword) else None
        received = Received(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            message=message,
            tls=server.transport.get_extra_info("ssl_object") is not None,
            login=login,
            raw=bytes(envelope.content),
        )
        with sink.lock:
            sink.received.append(received)
            number = len(sink.received)
        if sink.hold_at == number:
            deadline = time.monotonic() + HOLD_LIMIT_SECONDS
            while not sink.release.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        if sink.delay:
            await asyncio.sleep(sink.delay)
        return "250 2.0.0 accepted"


class SmtpSink:
    """One aiosmtpd server; :attr:`url` is the ``SMTP_URL`` that reaches it."""

    def __init__(
        self,
        *,
        starttls: ssl.SSLContext | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        self.starttls = starttls
        self.implicit_tls = implicit_tls
        self.credentials = credentials
        self.delay = delay
        self.reply: str | None = None
        """Answer every DATA with this instead of accepting."""
        self.replies: list[str] = []
        """Answers for the next DATA commands, one each, before ``reply`` applies."""
        self.hold_at: int | None = None
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.data_attempts = 0
        self.port = 0
        self._controller: Controller | None = None

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            self.credentials is not None
            and isinstance(auth_data, LoginPassword)
            and (auth_data.login.decode(), auth_data.password.decode()) == self.credentials
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def start(self) -> SmtpSink:
        kwargs: dict[str, Any] = {"server_hostname": "sink.test"}
        if self.starttls is not None:
            kwargs["tls_context"] = self.starttls
        if self.credentials is not None:
            kwargs.update(
                authenticator=self._authenticate,
                auth_required=True,
                # Over implicit TLS aiosmtpd does not know the line is encrypted.
                auth_require_tls=self.starttls is not None,
            )
        controller = _FreePortController(
            _Handler(self), hostname="127.0.0.1", port=self.port, ssl_context=self.implicit_tls, **kwargs
        )
        controller.start()
        self.port = controller.port
        self._controller = controller
        return self

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    @property
    def url(self) -> str:
        scheme = "smtps" if self.implicit_tls is not None else "smtp"
        auth = ""
        if self.credentials is not None:
            from urllib.parse import quote

            auth = f"{quote(self.credentials[0], safe='')}:{quote(self.credentials[1], safe='')}@"
        return f"{scheme}://{auth}127.0.0.1:{self.port}"

    def count(self) -> int:
        with self.lock:
            return len(self.received)

    def wait_for(self, count: int, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= count:
                return True
            time.sleep(0.01)
        return self.count() >= count

    def message_ids(self) -> list[str]:
        with self.lock:
            return [str(r.message["Message-ID"]) for r in self.received]


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and ``localhost``); returns (cert, key) paths."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "licensed test SMTP")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "smtp-cert.pem", folder / "smtp-key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context
