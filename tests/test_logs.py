"""Logs: one JSON object per line, and never a key, a token, a secret or a raw machine id."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from support.clock import FrozenClock
from support.live import Live
from support.log_capture import captured_logs
from support.ops_helpers import live_with
from support.plans import TEST_PLANS

from licensed import logs, redact
from licensed.config import Config
from licensed.licensing import LicenseRequest, Licensing
from licensed.services import Services

ROOT = Path(__file__).resolve().parent.parent
MACHINE_ID = "machine-7f3a9c-QX-serial-0042"
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
# Text around a secret: anything, even glued to it.
AROUND = st.text(max_size=30)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every log record of the process, formatted by the server's own JSON formatter."""
    with captured_logs(secrets=["admin-token-0123456789"]) as stream:
        yield stream


def lines_of(stream: io.StringIO) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert all(isinstance(e, dict) for e in entries)
    return entries


def jws_of(key: str) -> str:
    return key.split("-", 2)[2]


# --- the masking itself ------------------------------------------------------------------


@settings(max_examples=200)
@given(
    before=AROUND,
    after=AROUND,
    secret=st.one_of(
        st.text(B64URL, min_size=8, max_size=60).map(lambda s: "whsec_" + s),
        st.text(B64URL.replace("-", ""), min_size=8, max_size=60).map(lambda s: "sk_live_" + s),
        st.text(B64URL.replace("-", ""), min_size=8, max_size=60).map(lambda s: "rk_test_" + s),
        st.text(B64URL.replace("-", ""), min_size=8, max_size=60).map(lambda s: "cs_test_" + s),
        st.tuples(*[st.text(B64URL, min_size=4, max_size=40)] * 3).map(lambda p: "eyJ" + ".".join(p)),
    ),
)
def test_secret_shapes_are_masked_anywhere(before: str, after: str, secret: str) -> None:
    cleaned = redact.redact_text(before + secret + after)
    assert secret not in cleaned
    assert redact.MASK in cleaned
    assert redact.redact_text(cleaned) == cleaned


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ("Authorization: Bearer s3cr3t-admin", "s3cr3t-admin"),
        ("bearer abc.def", "abc.def"),
        ("smtp://mailer:hunter2%21@mail.example.com:587", "hunter2"),
        ("connect smtps://u:p4ss@host failed", "p4ss"),
    ],
)
def test_tokens_and_url_passwords_are_masked(text: str, hidden: str) -> None:
    assert hidden not in redact.redact_text(text)


def test_real_keys_and_leases_are_masked(live: Live) -> None:
    key = live.issue("team-monthly")
    answer = live.post("/api/license/validate", {"key": key, "machine_id": MACHINE_ID}).json()
    lease = answer["lease"]
    text = f"key={key} lease={lease} cut={jws_of(key)[:40]}"
    cleaned = redact.redact_text(text)
    for secret in (key, jws_of(key), lease, jws_of(key)[:40]):
        assert secret not in cleaned


def test_fields_with_sensitive_names_are_masked_whole() -> None:
    entry = {
        "msg": "x",
        "machine_id": "plain-id",
        "extra": {"admin_token": "t", "stripe_secret": "s", "smtp_password": "p", "nested": [{"key": "k"}]},
        "kid": "2027-01",
        "count": 3,
    }
    cleaned = redact.Redactor().clean(entry)
    assert cleaned == {
        "msg": "x",
        "machine_id": redact.MASK,
        "extra": {
            "admin_token": redact.MASK,
            "stripe_secret": redact.MASK,
            "smtp_password": redact.MASK,
            "nested": [{"key": redact.MASK}],
        },
        "kid": "2027-01",
        "count": 3,
    }


@pytest.mark.parametrize(
    ("msg", "extra"),
    [
        ("a lone surrogate \ud800 in the message", {}),
        ("fields of every kind", {"counts": {1: "one", None: "none"}, "when": dt.date(2027, 1, 15)}),
    ],
)
def test_any_record_becomes_one_json_line(msg: str, extra: dict[str, Any]) -> None:
    record = logging.makeLogRecord({"msg": msg, "levelname": "INFO", "name": "licensed.test", **extra})
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line)["msg"] == msg


def test_configured_secrets_are_masked_as_literals() -> None:
    config = Config.from_mapping(
        {
            "ADMIN_TOKEN": "plain-admin-token-0123456789abcdefghij",
            "INTERNAL_API_KEY": "plain-internal-key-0123456789abcdefgh",
            "SMTP_URL": "smtp://mailer:pa%24%24word@127.0.0.1:2525",
            "MAIL_FROM": "shop@example.com",
        }
    )
    secrets = redact.config_secrets(config)
    configured = ("plain-admin-token-0123456789abcdefghij", "plain-internal-key-0123456789abcdefgh")
    text = f"tokens {configured[0]} {configured[1]} pa$$word pa%24%24word"
    cleaned = redact.Redactor(secrets).clean({"msg": text})["msg"]
    for secret in (*configured, "pa$$word", "pa%24%24word"):
        assert secret not in cleaned


# --- through the server ----------------------------------------------------------------


def test_live_logs_hold_no_key_and_no_machine_id(live: Live, captured: io.StringIO) -> None:
    key = live.issue()
    assert live.post("/api/license/validate", {"key": key, "machine_id": MACHINE_ID}).json()["valid"]
    assert live.post("/api/license/activate", {"key": key, "machine_id": MACHINE_ID}).json()["valid"]
    live.post("/api/license/deactivate", {"key": key, "machine_id": MACHINE_ID})
    live.post("/api/license/validate", {"key": key, "machine_id": MACHINE_ID, "product": 5})  # 400
    live.get(f"/api/license/{key}")  # a key in a path is logged as the path
    live.get("/health", headers={"Authorization": "Bearer admin-token-0123456789"})
    entries = lines_of(captured)
    requests_logged = [e for e in entries if e["msg"] == "request"]
    assert len(requests_logged) >= 6
    assert all(e["request_id"] for e in requests_logged)
    text = captured.getvalue()
    for secret in (key, jws_of(key), MACHINE_ID, "admin-token-0123456789"):
        assert secret not in text


def test_tracebacks_are_masked_too(
    services: Services, clock: FrozenClock, captured: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(self: Licensing, request: LicenseRequest, now: int) -> dict[str, Any]:
        """Fails with the request in the exception message, as a bug might."""
        raise RuntimeError(f"cannot handle {request!r}")

    monkeypatch.setattr(Licensing, "check", failing)
    with live_with(services, clock) as live:
        key = live.issue()
        answer = live.post("/api/license/validate", {"key": key, "machine_id": MACHINE_ID})
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "INTERNAL_ERROR"
    traces = [e["trace"] for e in lines_of(captured) if "trace" in e]
    assert traces and "RuntimeError: cannot handle" in traces[0]
    text = captured.getvalue()
    assert key not in text
    assert jws_of(key) not in text
    assert MACHINE_ID not in text


def test_served_process_logs_no_secrets(tmp_path: Path) -> None:
    """The real command line, as systemd runs it: every stderr line is JSON and free of secrets."""
    secrets = {
        "STRIPE_SECRET_KEY": "sk_test_51Hq9SecretStripeKeyAbCdEf",
        "STRIPE_WEBHOOK_SECRET": "whsec_OldSecretAbCdEf0123,whsec_NewSecretAbCdEf4567",
        "ADMIN_TOKEN": "adm-Q9x7-unguessable-token-0123456789",
        "INTERNAL_API_KEY": "int-Z2k4-unguessable-key-01234567890",
        "SMTP_URL": "smtp://mailer:smtp-Pw-9a8b7c@127.0.0.1:2525",
    }
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    (data / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
    env_file = tmp_path / "licensed.env"
    settings_text = {**secrets, "DATA_DIR": str(data), "PORT": "0", "LOG_LEVEL": "DEBUG"}
    settings_text["MAIL_FROM"] = "shop@example.com"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings_text.items()), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in Config.__dataclass_fields__}
    env["PYTHONPATH"] = str(ROOT)
    base = [sys.executable, "-m", "licensed", "--env-file", str(env_file)]
    subprocess.run([*base, "init"], capture_output=True, env=env, timeout=60, check=True)
    issued = subprocess.run(
        [*base, "admin", "issue", "--email", "buyer@example.com", "--plan", "pro-monthly", "--days", "30"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=True,
    )
    key = issued.stdout.strip().splitlines()[-1]
    assert key.startswith("DC-PRO-")

    server = subprocess.Popen([*base, "serve"], stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert server.stderr is not None
        for line in server.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        port = None
        deadline = time.monotonic() + 30
        while port is None and time.monotonic() < deadline:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "the server stopped: " + "".join(seen)
            seen.append(line)
            port = json.loads(line).get("port") if json.loads(line).get("msg") == "listening" else None
        assert port, "the server never said where it listens"
        url = f"http://127.0.0.1:{port}"
        with requests.Session() as http:
            body = {"key": key, "machine_id": MACHINE_ID}
            assert http.post(url + "/api/license/validate", json=body, timeout=10).json()["valid"]
            http.post(url + "/api/license/deactivate", json=body, timeout=10)
            http.get(url + f"/api/license/{key}", timeout=10)
            http.get(url + "/api/checkout/session/cs_test_a1B2c3D4e5F6g7H8", timeout=10)
            bearer = {"Authorization": f"Bearer {secrets['ADMIN_TOKEN']}"}
            http.get(url + "/health", headers=bearer, timeout=10)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    entries = [json.loads(line) for line in seen]
    assert sum(1 for e in entries if e.get("msg") == "request") == 5
    text = "".join(seen)
    forbidden = [
        key,
        jws_of(key),
        MACHINE_ID,
        "cs_test_a1B2c3D4e5F6g7H8",
        secrets["STRIPE_SECRET_KEY"],
        "whsec_OldSecretAbCdEf0123",
        "whsec_NewSecretAbCdEf4567",
        secrets["ADMIN_TOKEN"],
        secrets["INTERNAL_API_KEY"],
        "smtp-Pw-9a8b7c",
    ]
    for secret in forbidden:
        assert secret not in text
