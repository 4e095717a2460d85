"""Mail over real SMTP (aiosmtpd on 127.0.0.1): delivery, TLS and login, outages, races, crashes, retries."""

from __future__ import annotations

import collections
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest
from support import stripe_events as se
from support.clock import T0, FrozenClock
from support.live import Live
from support.server_proc import run_cli
from support.smtp_sink import DROP, SmtpSink, make_certificate, server_context

from licensed import addresses, licensing, mailer
from licensed.config import Config
from licensed.errors import InvalidEmail, MailUnavailable, MailUndeliverable
from licensed.services import Services, build_services

ROOT = Path(__file__).resolve().parents[1]
MAIL_FROM = "DashCaddy Licenses <licenses@shop.example>"
KEY = re.compile(r"\bDC-[A-Z]+-[A-Za-z0-9_.-]+")

# aiosmtpd warns when it takes a login without TLS: the loopback tests do that on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    server = SmtpSink().start()
    yield server
    server.release.set()
    server.stop()


@pytest.fixture
def config(data_dir: Path, sink: SmtpSink) -> Config:
    """The shared fixtures' config, with mail going to the sink."""
    return Config(
        data_dir=data_dir,
        app_base_url="http://licensed.test",
        website_url="https://shop.example",
        smtp_url=sink.url,
        mail_from=MAIL_FROM,
    )


def issue(services: Services, email: str = "buyer@example.com", name: str | None = None) -> str:
    lic = licensing.issue_license(
        services.store,
        services.ring,
        services.catalog.plans["pro-monthly"],
        email=email,
        name=name,
        now=services.now(),
        actor="test",
        days=30,
        send_email=True,
    )
    return lic.id


def mail_row(services: Services, license_id: str) -> dict[str, object]:
    rows = services.store.mail_for_license(license_id)
    assert len(rows) == 1
    return dict(rows[0])


def body(msg: EmailMessage, subtype: str) -> str:
    part = msg.get_body((subtype,))
    assert part is not None, f"no text/{subtype} part"
    return str(part.get_content())


def with_smtp(services: Services, url: str) -> Services:
    return replace(services, config=replace(services.config, smtp_url=url))


def cli_env(config: Config, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "SYSTEMROOT")}
    env.update(
        PYTHONPATH=str(ROOT),
        DATA_DIR=str(config.data_dir),
        APP_BASE_URL=config.app_base_url,
        LOG_LEVEL="WARNING",
    )
    if config.smtp_url and config.mail_from:
        env.update(SMTP_URL=config.smtp_url, MAIL_FROM=config.mail_from)
    env.update(extra)
    return env


def licensed_cli(config: Config, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    return run_cli(cli_env(config, **extra), *args)


# --- header injection ----------------------------------------------------------------------------

ENCODED_INJECTION = "=?utf-8?q?x=0D=0AReply-To:_a@evil.example=0D=0A=0D=0Ahello?="
"""A checkout name that is an RFC 2047 encoded word hiding CR LF: on Python builds without the
CVE-2024-6923 fix, folding it into To: wrote an extra Reply-To header and pushed the real
headers into the body."""
BUILT_HEADERS = sorted(
    [b"Auto-Submitted", b"Content-Type", b"Date", b"From", b"MIME-Version", b"Message-ID", b"Subject", b"To"]
)


def test_an_encoded_word_cannot_inject_a_header(live: Live, sink: SmtpSink) -> None:
    """A buyer's name from Stripe (signed webhook) with CR LF hidden in an encoded word: the key mail
    arrives with exactly the headers built, the name left out, no Reply-To, nothing in the body."""
    services = live.services
    services.config = replace(services.config, stripe_webhook_secrets=(se.SECRET,))
    session = se.checkout_session(
        session_id=se.uid("cs"), mode="payment", payment_intent="pi_inject", plan="pro-year"
    )
    session["customer_details"]["name"] = ENCODED_INJECTION
    body, headers = se.signed(se.event("checkout.session.completed", session, T0), T0)
    answer = live.http.post(live.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    assert mailer.send_due(services, services.now()).sent == 1
    raw = sink.received[0].raw
    head = raw.partition(b"\r\n\r\n")[0]
    names = sorted(line.split(b":")[0] for line in head.split(b"\r\n") if line[:1] not in (b" ", b"\t"))
    assert names == BUILT_HEADERS
    assert b"evil.example" not in raw
    assert b"Reply-To" not in raw


def test_a_message_whose_headers_are_not_as_built_is_never_sent() -> None:
    built = b"From: a@b.example\r\nTo: x@y.example\r\nReply-To: a@evil.example\r\n\r\nbody"
    with pytest.raises(MailUndeliverable, match="Reply-To"):
        mailer.check_headers(built)
    with pytest.raises(MailUndeliverable):
        mailer.check_headers(b"no header section at all")


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("=?utf-8?q?J=C3=BCrgen?=", "Jürgen"),
        ("=?utf-8?b?QWRh?= Lovelace", "Ada Lovelace"),
        ("Plain Name", "Plain Name"),
    ],
)
def test_encoded_names_are_decoded_before_they_are_checked(name: str, kept: str) -> None:
    assert addresses.check_display_name(name) == kept


@pytest.mark.parametrize(
    "name", [ENCODED_INJECTION, "=?utf-8?b?SmFuZQ0KQmNjOiB2QGV4YW1wbGUub3Jn?=", "=?utf-8?q?a=00b?="]
)
def test_encoded_names_hiding_controls_are_refused(name: str) -> None:
    with pytest.raises(InvalidEmail):
        addresses.check_display_name(name)


# --- the message ---------------------------------------------------------------------------------


def test_the_key_arrives_and_validates(live: Live, sink: SmtpSink) -> None:
    services = live.services
    license_id = issue(services, "Buyer@Example.com", "Jane Doe")
    summary = mailer.send_due(services, services.now())
    assert (summary.sent, summary.retried, summary.failed) == (1, 0, 0)
    assert sink.count() == 1
    got = sink.received[0]
    row = mail_row(services, license_id)
    msg = got.message

    assert got.mail_from == "licenses@shop.example"
    assert got.rcpt_tos == ["Buyer@example.com"]
    assert msg["From"] == MAIL_FROM
    assert msg["To"] == "Jane Doe <Buyer@example.com>"
    assert msg["Subject"] == "Your DashCaddy license key"
    assert msg["Message-ID"] == row["message_id"]
    assert re.fullmatch(r"<licensed\.[0-9a-f]{24}@shop\.example>", str(msg["Message-ID"]))
    assert parsedate_to_datetime(str(msg["Date"])).timestamp() == T0
    assert row["status"] == "sent" and row["sent_at"] == T0 and row["attempts"] == 1

    assert msg.get_content_type() == "multipart/alternative"
    parts = [part.get_content_type() for part in msg.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    text, body_html = body(msg, "plain"), body(msg, "html")
    keys = KEY.findall(text)
    assert len(keys) == 1 and keys[0] in body_html
    assert "DashCaddy Pro, monthly" in text and "http://licensed.test/account" in text

    answer = live.post("/api/license/validate", {"key": keys[0], "machine_id": "m-1"}).json()
    assert answer["code"] == "VALID"
    assert answer["license"]["id"] == license_id


def _tls_files(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    cert, key = make_certificate(tmp_path)
    return server_context(cert, key), ssl.create_default_context(cafile=str(cert))


@pytest.mark.parametrize("mode", ["plain", "plain+auth", "starttls+auth", "smtps+auth"])
def test_tls_and_login_variants(services: Services, tmp_path: Path, mode: str) -> None:
    server_tls, client_tls = _tls_files(tmp_path)
    credentials = ("shop@example.com", "p@ss:w/rd%") if "auth" in mode else None
    server = SmtpSink(
        starttls=server_tls if mode.startswith("starttls") else None,
        implicit_tls=server_tls if mode.startswith("smtps") else None,
        credentials=credentials,
    ).start()
    try:
        here = with_smtp(services, server.url)
        license_id = issue(here)
        summary = mailer.send_due(here, here.now(), tls_context=client_tls)
        assert summary.sent == 1
        assert server.count() == 1
        got = server.received[0]
        assert got.tls is (mode != "plain" and mode != "plain+auth")
        assert got.login == (credentials[0] if credentials else None)
        assert got.message["Message-ID"] == mail_row(here, license_id)["message_id"]
    finally:
        server.stop()


@pytest.mark.parametrize("mode", ["starttls", "smtps"])
def test_an_untrusted_certificate_is_refused_without_spending_an_attempt(
    services: Services, tmp_path: Path, mode: str
) -> None:
    server_tls, _ = _tls_files(tmp_path)
    server = SmtpSink(
        starttls=server_tls if mode == "starttls" else None,
        implicit_tls=server_tls if mode == "smtps" else None,
    ).start()
    try:
        here = with_smtp(services, server.url)
        license_id = issue(here)
        with pytest.raises(MailUnavailable, match="certificate verify failed"):
            mailer.send_due(here, here.now())
        assert server.count() == 0
        row = mail_row(here, license_id)
        assert (row["status"], row["attempts"]) == ("pending", 0)
    finally:
        server.stop()


def test_a_wrong_password_is_reported_and_mail_stays_queued(services: Services) -> None:
    server = SmtpSink(credentials=("shop", "right")).start()
    try:
        here = with_smtp(services, f"smtp://shop:wrong@127.0.0.1:{server.port}")
        license_id = issue(here)
        with pytest.raises(MailUnavailable, match="refused the login: 535"):
            mailer.send_due(here, here.now())
        assert mail_row(here, license_id)["status"] == "pending"
        assert server.data_attempts == 0
    finally:
        server.stop()


# --- outages, races and crashes ------------------------------------------------------------------


def test_smtp_down_keeps_mail_queued_then_delivers_each_once(services: Services, sink: SmtpSink) -> None:
    sink.stop()
    ids = [issue(services, f"buyer{n}@example.com") for n in range(3)]
    for _ in range(2):
        with pytest.raises(MailUnavailable, match=f"cannot reach SMTP server 127.0.0.1:{sink.port}"):
            mailer.send_due(services, services.now())
    assert [(mail_row(services, i)["status"], mail_row(services, i)["attempts"]) for i in ids] == [
        ("pending", 0)
    ] * 3

    sink.start()
    assert mailer.send_due(services, services.now()).sent == 3
    assert mailer.send_due(services, services.now()).sent == 0
    assert sorted(r.rcpt_tos[0] for r in sink.received) == [f"buyer{n}@example.com" for n in range(3)]
    assert sink.data_attempts == 3
    assert {mail_row(services, i)["status"] for i in ids} == {"sent"}


@pytest.mark.parametrize("senders", [2, 4])
def test_concurrent_senders_deliver_each_message_once(
    services: Services, sink: SmtpSink, senders: int
) -> None:
    count = 24
    ids = [issue(services, f"buyer{n}@example.com") for n in range(count)]
    sink.delay = 0.005
    # Each sender has its own Store (its own SQLite connection), like a second process would.
    own = [build_services(services.config, services.clock) for _ in range(senders)]
    totals: list[int] = []
    start = threading.Barrier(senders)

    def run(each: Services) -> None:
        start.wait()
        sent = 0
        for _ in range(count):
            summary = mailer.send_due(each, each.now(), limit=3)
            sent += summary.sent
            if not summary.more:
                break
        totals.append(sent)

    threads = [threading.Thread(target=run, args=(each,)) for each in own]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for each in own:
        each.store.close()
    assert sum(totals) == count
    assert sink.count() == count
    assert len(set(sink.message_ids())) == count
    assert collections.Counter(r.rcpt_tos[0] for r in sink.received) == {
        f"buyer{n}@example.com": 1 for n in range(count)
    }
    assert {mail_row(services, i)["status"] for i in ids} == {"sent"}


def test_a_claim_whose_sender_died_is_resent_after_its_lease_with_the_same_message_id(
    services: Services, sink: SmtpSink, clock: FrozenClock
) -> None:
    license_id = issue(services)
    now = services.now()
    claimed = services.store.claim_mail(
        now, now + mailer.LEASE_SECONDS, mailer.MAX_ATTEMPTS, "<first@shop.example>"
    )
    assert claimed is not None and claimed["status"] == "sending"
    assert mailer.send_due(services, now + mailer.LEASE_SECONDS - 1).sent == 0
    assert sink.count() == 0
    summary = mailer.send_due(services, now + mailer.LEASE_SECONDS)
    assert summary.sent == 1
    assert sink.message_ids() == ["<first@shop.example>"]
    row = mail_row(services, license_id)
    assert (row["status"], row["attempts"], row["message_id"]) == ("sent", 2, "<first@shop.example>")


def test_an_interrupted_last_attempt_fails_the_message(services: Services, sink: SmtpSink) -> None:
    license_id = issue(services)
    now = services.now()
    assert services.store.claim_mail(now, now + 5, 1, "<m@shop.example>") is not None
    summary = mailer.send_due(services, now + 5, max_attempts=1)
    assert (summary.sent, summary.failed) == (0, 1)
    row = mail_row(services, license_id)
    assert row["status"] == "failed" and "interrupted" in str(row["last_error"])
    assert sink.count() == 0


def test_killed_mid_queue_loses_nothing_and_duplicates_only_the_message_in_flight(
    services: Services, sink: SmtpSink, clock: FrozenClock
) -> None:
    clock.set(int(time.time()))  # the flush subprocess runs on the real clock
    ids = [issue(services, f"buyer{n}@example.com") for n in range(6)]
    sink.hold_at = 3  # the third message is received, then its 250 never comes
    config = services.config
    proc = subprocess.Popen(
        [sys.executable, "-m", "licensed", "mail", "flush"],
        env=cli_env(config),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert sink.wait_for(3, timeout=30), "the flush never reached the third message"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    sink.release.set()
    statuses = [mail_row(services, i)["status"] for i in ids]
    assert statuses == ["sent", "sent", "sending", "pending", "pending", "pending"]

    again = licensed_cli(config, "mail", "flush")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "sent 3, retried 0, failed 0"
    assert [mail_row(services, i)["status"] for i in ids][2] == "sending"  # its lease still runs

    later = mailer.send_due(services, int(time.time()) + mailer.LEASE_SECONDS + 1)
    assert later.sent == 1
    rows = [mail_row(services, i) for i in ids]
    assert {r["status"] for r in rows} == {"sent"}
    received = collections.Counter(sink.message_ids())
    assert set(received) == {r["message_id"] for r in rows}
    assert received[str(rows[2]["message_id"])] == 2
    assert all(received[str(r["message_id"])] == 1 for n, r in enumerate(rows) if n != 2)
    assert sink.count() == 7


# --- retries -----------------------------------------------------------------------------------------


def test_refusals_back_off_then_fail_visibly(services: Services, sink: SmtpSink, clock: FrozenClock) -> None:
    license_id = issue(services)
    sink.reply = "451 4.3.0 mailbox busy, try later"
    delays = []
    for attempt in range(1, mailer.MAX_ATTEMPTS + 1):
        summary = mailer.send_due(services, services.now())
        row = mail_row(services, license_id)
        assert row["attempts"] == attempt
        if attempt == mailer.MAX_ATTEMPTS:
            assert (summary.retried, summary.failed) == (0, 1)
            break
        assert (summary.retried, summary.failed, row["status"]) == (1, 0, "pending")
        assert "451 4.3.0 mailbox busy" in str(row["last_error"])
        delay = int(str(row["next_attempt_at"])) - services.now()
        delays.append(delay)
        clock.advance(delay - 1)
        assert mailer.send_due(services, services.now()).retried == 0  # not due yet
        clock.advance(1)
    assert delays == [mailer.retry_delay(n) for n in range(1, mailer.MAX_ATTEMPTS)]
    assert delays == sorted(delays) and delays[0] == 60 and delays[-1] == mailer.RETRY_CAP_SECONDS
    row = mail_row(services, license_id)
    assert row["status"] == "failed" and "451" in str(row["last_error"])
    assert sink.data_attempts == mailer.MAX_ATTEMPTS
    sink.reply = None
    clock.advance(365 * 86400)
    assert mailer.send_due(services, services.now()).sent == 0  # failed stays failed (support resends)
    assert sink.count() == 0


def test_a_refused_message_does_not_block_the_next(services: Services, sink: SmtpSink) -> None:
    first, second = issue(services, "a@example.com"), issue(services, "b@example.com")
    sink.replies = ["452 4.2.2 over quota"]  # only the first DATA is refused
    summary = mailer.send_due(services, services.now())
    assert (summary.sent, summary.retried, summary.error) == (1, 1, None)
    assert mail_row(services, first)["status"] == "pending"
    assert mail_row(services, second)["status"] == "sent"
    assert sink.data_attempts == 2


@pytest.mark.parametrize("reply", [DROP, "421 4.3.2 shutting down"])
def test_a_connection_lost_mid_batch_spends_one_attempt_and_stops(
    services: Services, sink: SmtpSink, reply: str
) -> None:
    ids = [issue(services, f"buyer{n}@example.com") for n in range(4)]
    sink.replies = ["250 ok", reply]
    summary = mailer.send_due(services, services.now())
    assert (summary.sent, summary.retried, summary.failed) == (1, 1, 0)
    assert summary.error is not None and summary.error.startswith("connection to the SMTP server broke")
    rows = [mail_row(services, i) for i in ids]
    assert [(r["status"], r["attempts"]) for r in rows] == [
        ("sent", 1),
        ("pending", 1),
        ("pending", 0),
        ("pending", 0),
    ]
    assert sink.data_attempts == 2
    assert mailer.send_due(services, services.now()).sent == 2  # the retried one waits its minute


# --- injection at send time --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("to_addr", "to_name"),
    [
        ("buyer@example.com\r\nBcc: victim@example.org", None),
        ("buyer@example.com", "Jane\r\nBcc: victim@example.org"),
        ("buyer@example.com>, victim@example.org", None),
    ],
)
def test_rows_queued_around_the_check_are_refused_when_sent(
    services: Services, sink: SmtpSink, to_addr: str, to_name: str | None
) -> None:
    license_id = _license_without_mail(services)
    with services.store.atomic():
        services.store.enqueue_mail(license_id, "license_key", to_addr, to_name, services.now())
    summary = mailer.send_due(services, services.now())
    assert (summary.sent, summary.failed) == (0, 1)
    row = mail_row(services, license_id)
    assert row["status"] == "failed"
    assert str(row["last_error"]).startswith("invalid recipient:")
    assert sink.data_attempts == 0


def _license_without_mail(services: Services) -> str:
    return licensing.issue_license(
        services.store,
        services.ring,
        services.catalog.plans["pro-monthly"],
        email="buyer@example.com",
        now=services.now(),
        actor="test",
        days=30,
    ).id


# --- the command line and the server's sender thread ------------------------------------------------


def test_mail_flush_command(services: Services, sink: SmtpSink, clock: FrozenClock) -> None:
    config = services.config
    clock.set(int(time.time()))  # the command runs on the real clock
    idle = licensed_cli(config, "mail", "flush")
    assert (idle.returncode, idle.stdout.strip()) == (0, "sent 0, retried 0, failed 0")
    port = sink.port
    sink.stop()
    refused = f"licensed: cannot reach SMTP server 127.0.0.1:{port}: ConnectionRefusedError:"
    idle_down = licensed_cli(config, "mail", "flush")  # checks the server even with nothing due
    assert idle_down.returncode == 1 and idle_down.stderr.startswith(refused)
    ids = [issue(services, "a@example.com"), issue(services, "b@example.com")]
    down = licensed_cli(config, "mail", "flush")
    assert down.returncode == 1
    assert down.stderr.strip() == refused + " [Errno 111] Connection refused"
    assert [mail_row(services, i)["status"] for i in ids] == ["pending", "pending"]
    unset = licensed_cli(replace(config, smtp_url=None, mail_from=None), "mail", "flush")
    assert unset.returncode == 2 and "mail stays queued" in unset.stderr
    sink.start()
    up = licensed_cli(config, "mail", "flush")
    assert (up.returncode, up.stdout.strip()) == (0, "sent 2, retried 0, failed 0")
    assert sink.count() == 2


def test_admin_issue_send_email_queues_the_key_mail(services: Services, sink: SmtpSink) -> None:
    config = services.config
    done = licensed_cli(
        config,
        "admin",
        "issue",
        "--email",
        "cli@example.com",
        "--plan",
        "pro-monthly",
        "--days",
        "5",
        "--send-email",
    )
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert "queued" in done.stderr
    flushed = licensed_cli(config, "mail", "flush")
    assert flushed.stdout.strip() == "sent 1, retried 0, failed 0"
    text = body(sink.received[0].message, "plain")
    assert KEY.findall(text) == [key]
    assert sink.received[0].rcpt_tos == ["cli@example.com"]


def test_sender_thread_delivers_backs_off_and_stops(services: Services, sink: SmtpSink) -> None:
    port = sink.port
    sink.stop()
    issue(services, "thread@example.com")
    sender = mailer.MailSender(services, interval=0.05).start()
    try:
        time.sleep(0.3)  # a few failed polls while SMTP is down
        assert sender.running
        sink.port = port
        sink.start()
        assert sink.wait_for(1, timeout=15)
        issue(services, "second@example.com")
        assert sink.wait_for(2, timeout=15)
    finally:
        started = time.monotonic()
        sender.stop()
        stopped_in = time.monotonic() - started
    assert not sender.running and stopped_in < 2
    assert sink.count() == 2


def test_serve_sends_queued_mail_and_stops_cleanly(
    services: Services, sink: SmtpSink, clock: FrozenClock
) -> None:
    config = services.config
    clock.set(int(time.time()))  # the server runs on the real clock
    issue(services, "serve@example.com")
    proc = subprocess.Popen(
        [sys.executable, "-m", "licensed", "serve"],
        env=cli_env(config, PORT="0", LOG_LEVEL="INFO"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.wait_for(1, timeout=30)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    entries = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(entry.get("msg") == "mail sent" for entry in entries)
    assert sink.received[0].rcpt_tos == ["serve@example.com"]
