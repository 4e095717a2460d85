"""The account pages over real HTTP: sign-in links by real SMTP (aiosmtpd), sessions, the forms
and their CSRF tokens, each customer's reach limited to their own licences."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import stripe_events as se
from support.clock import DAY, T0
from support.live import Live
from support.log_capture import captured_logs
from support.pages import Customer, csrf_of, deliver, machine_ids, paid_checkout, sign_in_links
from support.smtp_sink import SmtpSink
from support.stripe_double import StripeDouble, stripe_double

from licensed import accounts, admin, files, licensing, mailer, redact
from licensed.config import Config
from licensed.errors import ConfigError
from licensed.store import open_store

MAIL_FROM = "Licenses <licenses@shop.example>"


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    server = SmtpSink().start()
    yield server
    server.stop()


@pytest.fixture
def double() -> Iterator[StripeDouble]:
    with stripe_double() as running:
        yield running


@pytest.fixture
def config(data_dir: Path, sink: SmtpSink, double: StripeDouble) -> Config:
    return Config(
        data_dir=data_dir,
        app_base_url="http://licensed.test",
        website_url="https://shop.example.com",
        smtp_url=sink.url,
        mail_from=MAIL_FROM,
        stripe_secret_key="sk_test_double",
        stripe_api_base=double.url,
        stripe_webhook_secrets=("whsec_test_secret",),
    )


def customer(live: Live, sink: SmtpSink) -> Customer:
    return Customer(live, sink)


def activate(live: Live, key: str, machine: str, label: str | None = None) -> dict[str, object]:
    body: dict[str, object] = {"key": key, "machine_id": machine}
    if label:
        body["label"] = label
    answer = live.post("/api/license/activate", body)
    assert answer.status_code == 200, answer.text
    result: dict[str, object] = answer.json()
    return result


# --- signing in -------------------------------------------------------------------------------


def test_sign_in_by_mailed_link_shows_every_license_of_the_address(live: Live, sink: SmtpSink) -> None:
    first = live.issue_license("pro-monthly", email="Ada@Example.com")
    paid_checkout(live, email="ada@example.com")
    live.issue_license("pro-monthly", email="someone.else@example.com")
    page = customer(live, sink).sign_in("ADA@example.com")
    licenses = licensing_of(live, "ada@example.com")
    assert len(licenses) == 2 and first.id in {lic.id for lic in licenses}
    for lic in licenses:
        assert live.services.licensing.key(lic) in page
    assert page.count('class="key"') == 2
    assert "DashCaddy Pro, monthly" in page and "DashCaddy Pro, one year" in page
    assert "someone.else" not in page
    # The link went to the address on file, from MAIL_FROM, saying how long it works.
    [message] = [r.message for r in sink.received if r.message["Subject"] == "Your sign-in link"]
    assert str(message["To"]).lower() == "ada@example.com" and str(message["From"]) == MAIL_FROM
    assert "30 minutes" in message.get_body(("plain",)).get_content()


def licensing_of(live: Live, email: str) -> list[licensing.License]:
    return live.services.store.licenses_by_email(email)


def test_unknown_address_gets_the_same_page_and_no_mail(live: Live, sink: SmtpSink) -> None:
    live.issue_license("pro-monthly", email="known@example.com")
    who = customer(live, sink)
    known = who.ask_for_link("known@example.com")
    unknown = who.ask_for_link("nobody@example.com")
    assert known.status_code == unknown.status_code == 200
    assert known.text.replace("known@example.com", "X") == unknown.text.replace("nobody@example.com", "X")
    assert set(known.headers) == set(unknown.headers)
    who.send_mail()
    assert [r.rcpt_tos for r in sink.received] == [["known@example.com"]]
    # Both requests were recorded alike (they count towards the address's limit).
    rows = live.services.store.all("SELECT email FROM sign_ins ORDER BY created_at, email")
    assert sorted(r["email"] for r in rows) == ["known@example.com", "nobody@example.com"]


def test_a_malformed_address_is_asked_again_with_the_form(live: Live, sink: SmtpSink) -> None:
    who = customer(live, sink)
    for typed in ("not an address", "", "a@b", "<script>@x.y"):
        answer = who.ask_for_link(typed)
        assert answer.status_code == 400
        assert 'name="email"' in answer.text and "<script>@" not in answer.text
    assert live.services.store.one("SELECT COUNT(*) FROM sign_ins")[0] == 0


def test_at_most_five_links_an_hour_per_address(live: Live, sink: SmtpSink) -> None:
    live.issue_license("pro-monthly", email="ada@example.com")
    who = customer(live, sink)
    pages = [who.ask_for_link("ada@example.com" if n % 2 else "ADA@example.com") for n in range(7)]
    assert {p.status_code for p in pages} == {200} and len({p.text for p in pages}) <= 2
    who.send_mail()
    assert len(sign_in_links(sink)) == accounts.LINKS_PER_HOUR
    live.clock.advance(3601)
    who.ask_for_link("ada@example.com")
    who.send_mail()
    assert len(sign_in_links(sink)) == accounts.LINKS_PER_HOUR + 1


def test_the_sign_in_form_is_rate_limited_per_client_address(live: Live, sink: SmtpSink) -> None:
    from support.ops_helpers import live_with

    with live_with(live.services, live.clock, rate_limit_per_minute=3) as limited:
        who = customer(limited, sink)
        codes = [who.ask_for_link(f"user{n}@example.com").status_code for n in range(4)]
        refused = who.ask_for_link("user9@example.com")
    assert codes[:3] == [200, 200, 200] and codes[3] == 429
    assert refused.headers["Retry-After"] and refused.headers["Content-Type"].startswith("text/html")
    assert "Too many requests" in refused.text


def test_a_link_works_once(live: Live, sink: SmtpSink) -> None:
    live.issue_license("pro-monthly", email="ada@example.com")
    ada = customer(live, sink)
    ada.sign_in("ada@example.com")
    [link] = sign_in_links(sink)
    again = customer(live, sink).follow(link)
    assert again.status_code == 400
    assert "used already" in again.text and 'action="/account/sign-in"' in again.text
    assert "Set-Cookie" not in again.headers


def test_a_link_expires_thirty_minutes_after_its_mail_was_sent(live: Live, sink: SmtpSink) -> None:
    live.issue_license("pro-monthly", email="ada@example.com")
    who = customer(live, sink)
    who.ask_for_link("ada@example.com")
    # SMTP is down for two hours: the mail goes late, and its link still has its 30 minutes.
    sink.reply = "451 4.3.0 try later"
    who.send_mail()
    assert sign_in_links(sink) == []
    sink.reply = None
    live.clock.advance(2 * 3600)
    who.send_mail()
    [link] = sign_in_links(sink)
    live.clock.advance(accounts.LINK_VALID_SECONDS + 1)
    late = who.follow(link)
    assert late.status_code == 400 and "has expired" in late.text and 'name="email"' in late.text
    assert f"links work for {accounts.LINK_VALID_SECONDS // 60} minutes" in late.text
    assert "Set-Cookie" not in late.headers


def test_a_link_just_within_its_time_signs_in(live: Live, sink: SmtpSink) -> None:
    live.issue_license("pro-monthly", email="ada@example.com")
    who = customer(live, sink)
    who.ask_for_link("ada@example.com")
    who.send_mail()
    [link] = sign_in_links(sink)
    live.clock.advance(accounts.LINK_VALID_SECONDS)
    assert who.follow(link).status_code == 303


@pytest.mark.parametrize(
    "token",
    ["", "x", "A" * 43, "A" * 500, "../../etc/passwd", "%00", "<script>alert(1)</script>"],
)
def test_forged_links_get_a_page_with_the_form(live: Live, sink: SmtpSink, token: str) -> None:
    answer = customer(live, sink).get("/account/auth", params={"token": token})
    assert answer.status_code == 400
    assert "does not work" in answer.text and 'action="/account/sign-in"' in answer.text
    assert "<script>alert" not in answer.text
    assert answer.headers["Content-Type"] == "text/html; charset=utf-8"


def test_a_link_for_a_tampered_row_id_does_not_work(live: Live, sink: SmtpSink) -> None:
    """Tokens are HMACs of the row id under the server secret: knowing an id (from a database
    copy) gives no token."""
    live.issue_license("pro-monthly", email="ada@example.com")
    who = customer(live, sink)
    who.ask_for_link("ada@example.com")
    [row] = live.services.store.all("SELECT id FROM sign_ins")
    guessed = accounts.link_token(b"\0" * 32, row["id"])
    assert who.get("/account/auth", params={"token": guessed}).status_code == 400


def test_session_cookie_attributes(live: Live, sink: SmtpSink) -> None:
    live.issue_license("pro-monthly", email="ada@example.com")
    who = customer(live, sink)
    who.ask_for_link("ada@example.com")
    who.send_mail()
    [link] = sign_in_links(sink)
    answer = who.follow(link)
    assert answer.status_code == 303 and answer.headers["Location"] == "/account"
    cookie = answer.headers["Set-Cookie"]
    name, _, rest = cookie.partition("=")
    value, _, flags = rest.partition(";")
    assert name == "licensed_session" and len(value) >= 40
    parts = {p.strip().split("=")[0].lower(): p.strip() for p in flags.split(";")}
    assert parts["httponly"] and parts["samesite"] == "SameSite=Lax" and parts["path"] == "Path=/"
    assert parts["max-age"] == f"Max-Age={14 * DAY}"
    assert "secure" not in parts  # APP_BASE_URL is http here


def test_the_cookie_is_secure_when_the_base_url_is_https(live: Live, sink: SmtpSink) -> None:
    from support.ops_helpers import live_with

    live.issue_license("pro-monthly", email="ada@example.com")
    with live_with(live.services, live.clock, app_base_url="https://licenses.example.com") as https:
        who = customer(https, sink)
        who.ask_for_link("ada@example.com")
        mailer.send_due(https.services, https.services.now())
        [link] = sign_in_links(sink)
        assert link.startswith("https://licenses.example.com/account/auth?token=")
        answer = who.follow(link)
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("__Host-licensed_session=") and "; Secure" in cookie and "Path=/;" in cookie


def test_a_session_ends_after_fourteen_days(live: Live, sink: SmtpSink) -> None:
    live.issue_license("pro-monthly", email="ada@example.com")
    ada = customer(live, sink)
    ada.sign_in("ada@example.com")
    live.clock.advance(14 * DAY - 1)
    assert "Signed in as" in ada.account()
    live.clock.advance(1)
    assert 'action="/account/sign-in"' in ada.account()


def test_sign_out_ends_the_session_for_good(live: Live, sink: SmtpSink) -> None:
    live.issue_license("pro-monthly", email="ada@example.com")
    ada = customer(live, sink)
    ada.sign_in("ada@example.com")
    stolen = dict(ada.http.cookies)
    answer = ada.post("/account/sign-out", {"csrf": ada.csrf()})
    assert answer.status_code == 303 and answer.headers["Location"] == "/account"
    assert "Max-Age=0" in answer.headers["Set-Cookie"]
    assert 'action="/account/sign-in"' in ada.account()
    replay = customer(live, sink)
    replay.http.cookies.update(stolen)
    assert 'action="/account/sign-in"' in replay.account()
    assert live.services.store.one("SELECT COUNT(*) FROM account_sessions")[0] == 0


# --- forms: CSRF and whose licences ------------------------------------------------------------


def test_release_frees_the_seat_for_a_new_machine(live: Live, sink: SmtpSink) -> None:
    key = live.issue("pro-monthly", email="ada@example.com")
    activate(live, key, "dead-server", label="old-box")
    assert live.post("/api/license/activate", {"key": key, "machine_id": "new-server"}).json()["code"] == (
        "TOO_MANY_MACHINES"
    )
    ada = customer(live, sink)
    page = ada.sign_in("ada@example.com")
    assert "old-box" in page
    [machine] = machine_ids(page)
    answer = ada.post(f"/account/machines/{machine}/release", {"csrf": csrf_of(page)})
    assert answer.status_code == 303 and answer.headers["Location"] == "/account?done=released"
    after = ada.get(answer.headers["Location"]).text
    assert "was released" in after and "old-box" not in after
    assert activate(live, key, "new-server")["activated"] is True
    [entry] = [
        r
        for r in live.services.store.audit_entries(license_id=None, actor=None, before_id=None, limit=10)
        if r["action"] == "license.release_machine"
    ]
    assert entry["actor"] == "customer:ada@example.com"


@pytest.mark.parametrize("form", [{}, {"csrf": ""}, {"csrf": "forged"}, {"token": "x"}])
def test_forms_without_their_csrf_token_change_nothing(
    live: Live, sink: SmtpSink, form: dict[str, str]
) -> None:
    key = live.issue("pro-monthly", email="ada@example.com")
    activate(live, key, "box-1")
    ada = customer(live, sink)
    page = ada.sign_in("ada@example.com")
    [machine] = machine_ids(page)
    for path in (
        f"/account/machines/{machine}/release",
        "/account/resend",
        "/account/billing",
        "/account/sign-out",
    ):
        answer = ada.post(path, form)
        assert answer.status_code == 403, path
        assert "not accepted" in answer.text and "Nothing was changed" in answer.text
    assert machine_ids(ada.account()) == [machine]
    assert live.services.store.one("SELECT COUNT(*) FROM outbox WHERE kind = 'license_key_resend'")[0] == 0


def test_a_form_sent_as_json_or_multipart_is_refused_too(live: Live, sink: SmtpSink) -> None:
    live.issue("pro-monthly", email="ada@example.com")
    ada = customer(live, sink)
    ada.sign_in("ada@example.com")
    csrf = ada.csrf()
    assert ada.http.post(ada.url("/account/resend"), json={"csrf": csrf}, timeout=10).status_code == 403
    multipart = ada.http.post(ada.url("/account/resend"), files={"csrf": (None, csrf)}, timeout=10)
    assert multipart.status_code == 403


def test_another_sessions_csrf_token_is_refused(live: Live, sink: SmtpSink) -> None:
    key = live.issue("pro-monthly", email="ada@example.com")
    activate(live, key, "box-1")
    ada, ada_again = customer(live, sink), customer(live, sink)
    page = ada.sign_in("ada@example.com")
    other = ada_again.sign_in("ada@example.com")
    assert csrf_of(page) != csrf_of(other)
    [machine] = machine_ids(page)
    answer = ada.post(f"/account/machines/{machine}/release", {"csrf": csrf_of(other)})
    assert answer.status_code == 403 and machine_ids(ada.account()) == [machine]


def test_another_customers_session_cannot_release_a_machine(live: Live, sink: SmtpSink) -> None:
    key_a = live.issue("pro-monthly", email="ada@example.com")
    activate(live, key_a, "ada-box", label="ada-box")
    live.issue("pro-monthly", email="bob@example.com")
    ada, bob = customer(live, sink), customer(live, sink)
    [ada_machine] = machine_ids(ada.sign_in("ada@example.com"))
    bob_page = bob.sign_in("bob@example.com")
    assert "ada-box" not in bob_page
    answer = bob.post(f"/account/machines/{ada_machine}/release", {"csrf": csrf_of(bob_page)})
    assert answer.status_code == 303 and answer.headers["Location"] == "/account?done=not-yours"
    assert "not on your licenses" in bob.get(answer.headers["Location"]).text
    assert machine_ids(ada.account()) == [ada_machine]
    assert live.post("/api/license/validate", {"key": key_a, "machine_id": "ada-box"}).json()["activated"]


def test_signed_out_forms_are_refused_with_the_sign_in_form(live: Live, sink: SmtpSink) -> None:
    stranger = customer(live, sink)
    for path in ("/account/machines/mch_x/release", "/account/resend", "/account/billing"):
        answer = stranger.post(path, {"csrf": "x"})
        assert answer.status_code == 403 and 'action="/account/sign-in"' in answer.text
    assert stranger.post("/account/sign-out", {}).status_code == 303


def test_resend_mails_the_customers_own_key_only(live: Live, sink: SmtpSink) -> None:
    lic = live.issue_license("pro-monthly", email="ada@example.com", send_email=False)
    bobs = live.issue_license("pro-monthly", email="bob@example.com", send_email=False)
    ada = customer(live, sink)
    csrf = csrf_of(ada.sign_in("ada@example.com"))
    answer = ada.post("/account/resend", {"csrf": csrf, "license": lic.id})
    assert answer.headers["Location"] == "/account?done=resent"
    refused = ada.post("/account/resend", {"csrf": csrf, "license": bobs.id})
    assert refused.headers["Location"] == "/account?done=resend-not-yours"
    ada.send_mail()
    keys = [m for m in sink.received if "sent again" in str(m.message["Subject"])]
    assert [m.rcpt_tos for m in keys] == [["ada@example.com"]]
    assert live.key_of(lic) in keys[0].message.get_body(("plain",)).get_content()
    for _ in range(accounts.RESENDS_PER_HOUR):
        ada.post("/account/resend", {"csrf": csrf, "license": lic.id})
    limited = ada.post("/account/resend", {"csrf": csrf, "license": lic.id})
    assert limited.headers["Location"] == "/account?done=resend-limit"


def test_billing_opens_the_portal_of_the_customers_stripe_customer(
    live: Live, sink: SmtpSink, double: StripeDouble
) -> None:
    paid_checkout(live, email="ada@example.com", customer="cus_ada")
    ada = customer(live, sink)
    page = ada.sign_in("ada@example.com")
    assert 'action="/account/billing"' in page
    answer = ada.post("/account/billing", {"csrf": csrf_of(page)})
    assert answer.status_code == 303
    assert answer.headers["Location"].startswith("https://billing.stripe.test/p/session/")
    portal = [r for r in double.requests if r.path == "/v1/billing_portal/sessions"]
    assert [r.form["customer"] for r in portal] == ["cus_ada"]
    assert portal[0].form["return_url"] == "http://licensed.test/account"


def test_no_billing_button_without_a_stripe_purchase(
    live: Live, sink: SmtpSink, double: StripeDouble
) -> None:
    live.issue_license("pro-monthly", email="ada@example.com")
    ada = customer(live, sink)
    page = ada.sign_in("ada@example.com")
    assert 'action="/account/billing"' not in page
    answer = ada.post("/account/billing", {"csrf": csrf_of(page)})
    assert answer.headers["Location"] == "/account?done=no-billing"
    assert not [r for r in double.requests if r.path == "/v1/billing_portal/sessions"]


def test_billing_when_stripe_is_down_gets_a_page(live: Live, sink: SmtpSink, double: StripeDouble) -> None:
    paid_checkout(live, email="ada@example.com", customer="cus_ada")
    ada = customer(live, sink)
    csrf = csrf_of(ada.sign_in("ada@example.com"))
    double.fail_with = 500
    answer = ada.post("/account/billing", {"csrf": csrf})
    assert answer.status_code == 503 and answer.headers["Content-Type"].startswith("text/html")
    assert "Try again in a minute" in answer.text


# --- what the page says, and what it never leaks -------------------------------------------------


def test_values_are_escaped_by_the_template_engine(live: Live, sink: SmtpSink) -> None:
    key = live.issue("pro-monthly", email="ada@example.com")
    activate(live, key, "evil", label='<script>alert("x")</script>&')
    page = customer(live, sink).sign_in("ada@example.com")
    assert "<script>alert" not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;" in page


def test_status_and_what_to_do_next(live: Live, sink: SmtpSink) -> None:
    lic = live.issue_license("pro-monthly", email="ada@example.com", days=1)
    ada = customer(live, sink)
    assert "Active" in ada.sign_in("ada@example.com")
    store = live.services.store
    store.execute(
        "UPDATE licenses SET subscription_status = 'past_due', stripe_subscription_id = 'sub_x' WHERE id = ?",
        (lic.id,),
    )
    live.clock.advance(2 * DAY)
    page = ada.account()
    assert "Payment overdue" in page and "update your payment method" in page
    live.clock.advance(30 * DAY)  # past grace, and past the session's 14 days
    page = customer(live, sink).sign_in("ada@example.com")
    assert "Expired" in page and "Renew it under Manage billing" in page


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Every log record of the process, formatted by the server's own JSON formatter."""
    with captured_logs() as stream:
        yield stream


def test_tokens_and_sessions_are_stored_and_logged_only_as_hashes(
    live: Live, sink: SmtpSink, captured: io.StringIO
) -> None:
    live.issue_license("pro-monthly", email="ada@example.com")
    ada = customer(live, sink)
    ada.sign_in("ada@example.com")
    ada.post("/account/resend", {"csrf": ada.csrf(), "license": "lic_x"})
    [link] = sign_in_links(sink)
    token = link.rsplit("=", 1)[1]
    session = ada.http.cookies["licensed_session"]
    csrf = ada.csrf()
    logged = captured.getvalue()
    assert '"path": "/account/auth"' in logged  # the request was logged, by its path
    for secret in (token, session, csrf):
        assert secret not in logged
    masked = "GET http://licensed.test/account/auth?token=[REDACTED] HTTP/1.1"
    assert redact.redact_text(f"GET {link} HTTP/1.1") == masked
    live.services.store.close()
    data = live.services.config.data_dir
    stored = b"".join(p.read_bytes() for p in data.glob("licensed.sqlite3*"))
    for secret in (token, session, csrf):
        assert secret.encode() not in stored
    secret_file = data / accounts.SECRET_FILE
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert secret_file.read_bytes() not in stored


def test_old_rows_are_purged_a_bounded_number_at_a_time(live: Live, sink: SmtpSink) -> None:
    store = live.services.store
    with store.atomic():
        for n in range(accounts.PURGE_LIMIT + 10):
            store.insert_sign_in(f"sgn_old{n}", "old@example.com", f"h{n}", T0 - 3 * DAY, T0 - 2 * DAY)
            store.insert_account_session(f"s{n}", "old@example.com", T0 - 20 * DAY, T0 - 6 * DAY)
    customer(live, sink).ask_for_link("x@example.com")
    assert store.one("SELECT COUNT(*) FROM sign_ins WHERE email = 'old@example.com'")[0] == 10
    assert store.one("SELECT COUNT(*) FROM account_sessions")[0] == 10
    customer(live, sink).ask_for_link("x@example.com")
    assert store.one("SELECT COUNT(*) FROM sign_ins WHERE email = 'old@example.com'")[0] == 0


def test_a_purged_links_mail_is_not_sent(live: Live, sink: SmtpSink) -> None:
    live.issue_license("pro-monthly", email="ada@example.com")
    who = customer(live, sink)
    who.ask_for_link("ada@example.com")
    live.services.store.execute("DELETE FROM sign_ins")
    assert live.services.store.one("SELECT COUNT(*) FROM outbox")[0] == 0  # went with its link
    who.ask_for_link("ada@example.com")
    live.services.store.execute("UPDATE sign_ins SET used_at = ?", (T0,))
    summary = mailer.send_due(live.services, live.services.now())
    assert summary.failed == 1 and sink.received == []


def test_the_secret_survives_a_restart_and_is_made_once(live: Live, sink: SmtpSink, data_dir: Path) -> None:
    first = accounts.load_secret(data_dir)
    assert (data_dir / accounts.SECRET_FILE).read_bytes() == first and len(first) == 32
    assert accounts.ensure_secret(data_dir) == []


def test_a_secret_written_first_by_another_process_is_the_one_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    theirs = bytes(range(accounts.SECRET_BYTES))
    write_whole = files.write_whole

    def another_process_first(target: Path, fill: Callable[[Path], None], *, force: bool) -> None:
        target.write_bytes(theirs)
        write_whole(target, fill, force=force)

    monkeypatch.setattr(files, "write_whole", another_process_first)
    assert accounts.load_secret(tmp_path) == theirs
    assert (tmp_path / accounts.SECRET_FILE).read_bytes() == theirs
    assert [p.name for p in tmp_path.iterdir()] == [accounts.SECRET_FILE]


def test_a_secret_that_fails_half_way_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def disk_full(path: Path) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(files, "fsync_path", disk_full)
        with pytest.raises(ConfigError, match="No space left"):
            accounts.load_secret(tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / f".{accounts.SECRET_FILE}.0000.tmp").write_bytes(b"")  # a crash's leftover
    umask = os.umask(0o277)
    try:
        made = accounts.load_secret(tmp_path)
    finally:
        os.umask(umask)
    assert len(made) == accounts.SECRET_BYTES and accounts.load_secret(tmp_path) == made
    secret_file = tmp_path / accounts.SECRET_FILE
    assert secret_file.read_bytes() == made and secret_file.stat().st_mode & 0o777 == 0o600


def test_the_migration_adds_the_tables_to_an_existing_database(tmp_path: Path) -> None:
    from licensed import store as store_module

    index = [name for name, _ in store_module.MIGRATIONS].index("customer sign-in links and sessions")
    older = tmp_path / "old.sqlite3"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:index])
        open_store(older, T0).close()
    store = open_store(older, T0)
    assert store.schema_version() == len(store_module.MIGRATIONS)
    assert store.one("SELECT COUNT(*) FROM sign_ins")[0] == 0
    store.close()


def test_pages_carry_their_security_headers_and_the_api_does_not(live: Live, sink: SmtpSink) -> None:
    page = customer(live, sink).get("/account")
    csp = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp and "style-src 'self'" in csp
    assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
    assert page.headers["X-Frame-Options"] == "DENY" and page.headers["Cache-Control"] == "no-store"
    assert page.headers["Referrer-Policy"] == "no-referrer"
    assert "<script>" not in page.text and not re.search(r"<script(?![^>]*\bsrc=)", page.text)
    api = live.get("/api/public/plans")
    assert "Content-Security-Policy" not in api.headers
    css = live.get(re.search(r'href="(/assets/site\.css\?v=\w+)"', page.text).group(1))  # type: ignore[union-attr]
    assert css.status_code == 200 and css.headers["Content-Type"] == "text/css; charset=utf-8"
    assert "immutable" in css.headers["Cache-Control"]
    assert live.get("/assets/nope.css").status_code == 404


def test_page_errors_are_pages(live: Live, sink: SmtpSink) -> None:
    who = customer(live, sink)
    big = who.post("/account/sign-in", {"email": "a" * (live.services.config.max_body_bytes + 10)})
    assert big.status_code == 413 and big.headers["Content-Type"].startswith("text/html")
    wrong = who.http.put(who.url("/account"), timeout=10)
    assert wrong.status_code == 405 and "<h1>" in wrong.text
    assert who.get("/account/nothing-here").status_code == 404
    assert live.get("/api/nothing-here").json()["error"]["code"] == "NOT_FOUND"


def test_a_name_no_header_may_carry_is_left_out_of_key_mail_sent_again(live: Live, sink: SmtpSink) -> None:
    """A buyer's name as Stripe holds it, hiding CR LF in an encoded word: the key mail still goes
    to the address on file, without the name, when the admin sends it again and when the customer
    asks for it ("Mail me this key")."""
    name = "=?utf-8?q?Ada=0D=0ABcc:_eve@evil.example?="
    session = se.checkout_session(
        session_id=se.uid("cs_test"),
        mode="payment",
        email="ada@example.com",
        payment_intent=se.uid("pi"),
        plan="pro-year",
    )
    session["customer_details"]["name"] = name
    paid = deliver(live, se.event("checkout.session.completed", session, int(live.clock())))
    assert paid.status_code == 200, paid.text
    [lic] = licensing_of(live, "ada@example.com")
    store = live.services.store
    assert store.get_customer(lic.customer_id)["name"] == name
    admin.resend(live.services, "test", live.services.now(), lic.id)
    ada = customer(live, sink)
    csrf = csrf_of(ada.sign_in("ada@example.com"))
    answer = ada.post("/account/resend", {"csrf": csrf, "license": lic.id})
    assert answer.headers["Location"] == "/account?done=resent"
    ada.send_mail()
    rows = [(r["kind"], r["to_addr"], r["to_name"], r["status"]) for r in store.mail_for_license(lic.id)]
    assert rows == [
        ("license_key", "ada@example.com", None, "sent"),  # the purchase's
        ("license_key_resend", "ada@example.com", None, "sent"),  # the admin's resend
        ("license_key_resend", "ada@example.com", None, "sent"),
    ]
    keys = [r for r in sink.received if str(r.message["Subject"]) != "Your sign-in link"]
    assert len(keys) == 3
    for received in keys:
        assert received.rcpt_tos == ["ada@example.com"] and str(received.message["To"]) == "ada@example.com"
        assert b"evil.example" not in received.raw


def test_opening_a_link_only_asks_so_a_mail_scanner_uses_nothing_up(live: Live, sink: SmtpSink) -> None:
    """Mail scanners fetch every link of a mail before the customer reads it: the fetch shows
    a page with a button and signs nobody in; the customer's press still works, once."""
    live.issue_license("pro-monthly", email="ada@example.com")
    scanner, ada = customer(live, sink), customer(live, sink)
    ada.ask_for_link("ada@example.com")
    ada.send_mail()
    [link] = sign_in_links(sink)
    for _ in range(3):
        shown = scanner.open_link(link)
        assert shown.status_code == 200 and "Set-Cookie" not in shown.headers
        assert "ada@example.com" in shown.text and 'action="/account/auth"' in shown.text
        assert "<script" not in shown.text  # nothing presses the button
    answer = ada.follow(link)
    assert answer.status_code == 303 and answer.headers["Location"] == "/account"
    assert "Signed in as" in ada.get("/account").text
    used = scanner.open_link(link)
    assert used.status_code == 400 and "was used already" in used.text
    again = scanner.post("/account/auth", {"token": link.rsplit("=", 1)[1]})
    assert again.status_code == 400 and "was used already" in again.text
    assert "Set-Cookie" not in again.headers


@pytest.mark.parametrize("form", [{}, {"token": ""}, {"token": "A" * 43}, {"token": "x" * 500}])
def test_pressing_sign_in_without_a_live_token_gets_the_form(
    live: Live, sink: SmtpSink, form: dict[str, str]
) -> None:
    answer = customer(live, sink).post("/account/auth", form)
    assert answer.status_code == 400 and 'action="/account/sign-in"' in answer.text
    assert "Set-Cookie" not in answer.headers
