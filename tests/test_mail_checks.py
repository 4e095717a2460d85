"""Mail without a network: address and name checks, SMTP_URL and MAIL_FROM, templates, queueing."""

from __future__ import annotations

import itertools
import string
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.clock import T0, FrozenClock

from licensed import addresses, licensing, mailer, outbox
from licensed.config import Config
from licensed.errors import ConfigError, InvalidEmail, ValidationFailed
from licensed.server import init_data_dir
from licensed.services import Services

CONTROL = [chr(c) for c in range(32)] + ["\x7f", "\x85", "\u2028", "\u2029"]


# --- addresses and names -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_addr", "expected"),
    [
        ("buyer@example.com", "buyer@example.com"),
        ("Buyer.Name+tag@Example.COM", "Buyer.Name+tag@example.com"),
        ("a_b-c@sub.example.co.uk", "a_b-c@sub.example.co.uk"),
        ("user@bücher.example", "user@xn--bcher-kva.example"),
    ],
)
def test_good_addresses_are_normalised(given_addr: str, expected: str) -> None:
    assert addresses.check_address(given_addr) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "plain",
        "a@b",
        "@example.com",
        "a@",
        "a@@example.com",
        "a@b@example.com",
        "a..b@example.com",
        "a b@example.com",
        "<a@example.com>",
        "Name <a@example.com>",
        "(comment)a@example.com",
        "a@example.com (comment)",
        '"quoted"@example.com',
        "a@[127.0.0.1]",
        "a@-example.com",
        "a@example.c",
        "jürgen@example.com",
        "a@example.com,b@example.com",
        "x" * 65 + "@example.com",
        "a@" + "b" * 250 + ".com",
        None,
        42,
    ],
)
def test_malformed_addresses_are_refused(bad: object) -> None:
    with pytest.raises(InvalidEmail) as caught:
        addresses.check_address(bad)
    assert caught.value.status == 400 and caught.value.code == "INVALID_EMAIL"


@pytest.mark.parametrize(
    "injection",
    [
        "buyer@example.com\r\nBcc: victim@example.org",
        "buyer@example.com\nBcc: victim@example.org",
        "buyer@example.com\rX: y",
        "buyer@example.com\x00",
        "buyer@example.com\u2028Bcc: victim@example.org",
    ],
)
def test_header_injection_in_address_names_the_problem(injection: str) -> None:
    with pytest.raises(InvalidEmail, match="line break or control character"):
        addresses.check_address(injection)


@given(
    st.text(alphabet=string.ascii_letters + string.digits + "@.-_", min_size=0, max_size=30),
    st.sampled_from(CONTROL),
    st.integers(min_value=0, max_value=30),
)
def test_no_address_with_a_control_character_passes(text: str, control: str, where: int) -> None:
    value = text[:where] + control + text[where:]
    with pytest.raises(InvalidEmail):
        addresses.check_address(value)
    with pytest.raises(InvalidEmail):
        addresses.check_display_name(value)


_ATOM = st.text(alphabet=string.ascii_lowercase + string.digits + "+_-", min_size=1, max_size=12)
_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@given(
    st.lists(_ATOM, min_size=1, max_size=3),
    st.lists(_LABEL, min_size=1, max_size=3),
    st.from_regex(r"[a-z]{2,6}", fullmatch=True),
)
def test_every_plain_address_passes_unchanged(local: list[str], labels: list[str], tld: str) -> None:
    value = ".".join(local) + "@" + ".".join([*labels, tld])
    assert addresses.check_address(value) == value
    header = str(addresses.mailbox(value, "Some Name"))
    assert header == f"Some Name <{value}>"


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("Jane Doe", "Jane Doe <jane@example.com>"),
        ("Doe, Jane", '"Doe, Jane" <jane@example.com>'),
        ('Jane "JD" Doe', '"Jane \\"JD\\" Doe" <jane@example.com>'),
        ("Jürgen", "Jürgen <jane@example.com>"),
        ("  ", "jane@example.com"),
        (None, "jane@example.com"),
    ],
)
def test_display_names_are_quoted_not_refused(name: str | None, header: str) -> None:
    assert str(addresses.mailbox("jane@example.com", name)) == header


@pytest.mark.parametrize(
    "name", ["Jane\r\nBcc: victim@example.org", "Jane\nDoe", "Jane\x00", "Jane\u2029", "x" * 129]
)
def test_bad_display_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidEmail):
        addresses.check_display_name(name)


# --- SMTP_URL and MAIL_FROM ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("smtp://mail.example.com", mailer.SmtpSettings("mail.example.com", 25, False)),
        ("smtps://mail.example.com", mailer.SmtpSettings("mail.example.com", 465, True)),
        (
            "smtp://us%40er:p%3Aa%2Fss%40w@mail.example.com:587",
            mailer.SmtpSettings("mail.example.com", 587, False, "us@er", "p:a/ss@w"),
        ),
        ("smtps://u:@[::1]:2465", mailer.SmtpSettings("::1", 2465, True, "u", "")),
    ],
)
def test_smtp_url_is_parsed_and_decoded(url: str, expected: mailer.SmtpSettings) -> None:
    assert mailer.parse_smtp_url(url) == expected


@pytest.mark.parametrize("url", ["http://mail.example.com", "smtp://", "smtp://h:99999", "smtp://user@h"])
def test_bad_smtp_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="SMTP_URL"):
        mailer.parse_smtp_url(url)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("localhost", True), ("mail.example.com", False)],
)
def test_only_loopback_hosts_may_get_a_password_without_tls(host: str, loopback: bool) -> None:
    assert mailer.SmtpSettings(host, 25, False, "u", "p").loopback is loopback


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("shop@example.com", "shop@example.com"),
        ("Shop <shop@example.com>", "Shop <shop@example.com>"),
        ('"Shop, Inc." <shop@example.com>', '"Shop, Inc." <shop@example.com>'),
    ],
)
def test_mail_from_is_checked_at_start_up(value: str, stored: str) -> None:
    config = Config.from_mapping({"SMTP_URL": "smtp://127.0.0.1:2525", "MAIL_FROM": value})
    assert config.mail_from == stored


@pytest.mark.parametrize(
    "value", ["not an address", "Shop <shop@example.com>\nBcc: x@example.org", "Shop <shop@localhost>", "<>"]
)
def test_bad_mail_from_stops_start_up_naming_it(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^MAIL_FROM: "):
        Config.from_mapping({"SMTP_URL": "smtp://127.0.0.1:2525", "MAIL_FROM": value})


# --- queueing ---------------------------------------------------------------------------------


def _issue(services: Services, email: str, name: str | None = None, send_email: bool = True) -> str:
    lic = licensing.issue_license(
        services.store,
        services.ring,
        services.catalog.plans["pro-monthly"],
        email=email,
        name=name,
        now=services.now(),
        actor="test",
        days=30,
        send_email=send_email,
    )
    return lic.id


def test_issue_with_send_email_queues_one_mail_in_the_same_transaction(services: Services) -> None:
    license_id = _issue(services, "Buyer@Example.com", "Jane Doe")
    rows = services.store.mail_for_license(license_id)
    assert [(r["kind"], r["to_addr"], r["to_name"], r["status"]) for r in rows] == [
        ("license_key", "Buyer@example.com", "Jane Doe", "pending")
    ]
    assert rows[0]["next_attempt_at"] == T0 and rows[0]["attempts"] == 0
    assert services.store.mail_for_license(_issue(services, "other@example.com", send_email=False)) == []


@pytest.mark.parametrize(
    ("email", "name"),
    [
        ("buyer@example.com\r\nBcc: victim@example.org", None),
        ("buyer@example.com", "Jane\r\nBcc: victim@example.org"),
        ("not-an-address", None),
    ],
)
def test_injection_when_issuing_is_refused_and_nothing_is_written(
    services: Services, email: str, name: str | None
) -> None:
    with pytest.raises(InvalidEmail):
        _issue(services, email, name)
    assert services.store.one("SELECT COUNT(*) FROM licenses")[0] == 0
    assert services.store.one("SELECT COUNT(*) FROM outbox")[0] == 0


def test_queue_mail_checks_recipient_and_kind(services: Services) -> None:
    license_id = _issue(services, "buyer@example.com", send_email=False)
    store = services.store
    with pytest.raises(InvalidEmail), store.atomic():
        outbox.queue_mail(store, license_id, "license_key", "a@example.com\nBcc: b@example.org", None, T0)
    with pytest.raises(ValidationFailed, match="unknown kind"), store.atomic():
        outbox.queue_mail(store, license_id, "newsletter", "a@example.com", None, T0)
    with store.atomic():
        outbox.queue_mail(store, license_id, "license_key_resend", "a@example.com", "A", T0)
    assert [r["kind"] for r in store.mail_for_license(license_id)] == ["license_key_resend"]


@pytest.mark.parametrize(
    "name", ["Jane\r\nBcc: victim@example.org", "=?utf-8?q?Jane=0D=0ABcc:_v@example.org?="]
)
def test_queue_mail_leaves_out_a_name_no_header_may_carry(
    services: Services, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The mail goes to the address without the name, and a warning says so."""
    license_id = _issue(services, "buyer@example.com", send_email=False)
    store = services.store
    with store.atomic():
        outbox.queue_mail(store, license_id, outbox.KIND_LICENSE_KEY, "buyer@example.com", name, T0)
    rows = [(r["kind"], r["to_addr"], r["to_name"]) for r in store.mail_for_license(license_id)]
    assert rows == [("license_key", "buyer@example.com", None)]
    assert [r.getMessage() for r in caplog.records] == ["recipient's name left out of the mail"]


# --- templates ------------------------------------------------------------------------------------


def test_init_writes_editable_templates_once(config: Config, clock: FrozenClock) -> None:
    done = init_data_dir(config, int(clock()))
    folder = config.data_dir / "templates"
    written = sorted(p.name for p in folder.iterdir())
    assert written == [
        "license_key.html",
        "license_key.txt",
        "license_key_resend.html",
        "license_key_resend.txt",
        "sign_in_link.html",
        "sign_in_link.txt",
    ]
    assert sum("mail template" in line for line in done) == 6
    (folder / "license_key.txt").write_text("Subject: mine\n\nedited", encoding="utf-8")
    assert not any("mail template" in line for line in init_data_dir(config, int(clock())))
    assert (folder / "license_key.txt").read_text(encoding="utf-8") == "Subject: mine\n\nedited"


def _render(services: Services, kind: str = "license_key", name: str | None = "Jane") -> mailer.Rendered:
    license_id = _issue(services, "buyer@example.com", send_email=False)
    lic = services.store.get_license(license_id)
    assert lic is not None
    values, raw = mailer.template_values(
        lic,
        services.licensing.key(lic),
        product_name="DashCaddy",
        plan_name="DashCaddy Pro, monthly",
        to_name=name,
        app_base_url="http://licensed.test",
        website_url="https://shop.example/account?a=1&b=2",
    )
    return mailer.render(services.config.data_dir, lic.product, kind, values, raw)


def test_default_body_says_key_plan_activation_and_billing(services: Services) -> None:
    rendered = _render(services)
    assert rendered.subject == "Your DashCaddy license key"
    text = rendered.text
    for needle in (
        "Hello Jane,",
        "DashCaddy Pro, monthly",
        "DC-PRO-",
        "http://licensed.test/api/license/activate",
        "machine's id",
        "1 machine",
        "sign in at http://licensed.test/account with this e-mail address",
    ):
        assert needle in text
    assert 'href="http://licensed.test/account"' in rendered.html


def test_a_stripe_buyer_is_told_where_billing_is(services: Services) -> None:
    """The account page opens Stripe's billing portal for what was bought through Stripe."""
    lic = services.store.get_license(_issue(services, "buyer@example.com", send_email=False))
    assert lic is not None
    args = {"product_name": "P", "plan_name": "N", "to_name": None, "app_base_url": "https://l.example"}
    plain, _ = mailer.template_values(lic, "KEY", website_url=None, **args)
    assert "billing portal" not in plain["manage"]
    lic.stripe_customer_id = "cus_1"
    paid, html_raw = mailer.template_values(lic, "KEY", website_url=None, **args)
    assert "billing portal" in paid["manage"] and "https://l.example/account" in paid["manage"]
    assert 'href="https://l.example/account"' in html_raw["manage_html"]


def test_html_body_escapes_every_value(services: Services) -> None:
    rendered = _render(services, name="<script>alert(1)</script> & Co")
    assert "<script>" not in rendered.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; Co" in rendered.html
    assert "Hello <script>alert(1)</script> & Co," in rendered.text


def test_product_template_wins_over_shared_and_default(services: Services) -> None:
    folder = services.config.data_dir / "templates"
    (folder / "dashcaddy").mkdir(parents=True)
    (folder / "license_key.txt").write_text("Subject: shared $product_name\n\nshared $license_id", "utf-8")
    assert _render(services).subject == "shared DashCaddy"
    (folder / "dashcaddy" / "license_key.txt").write_text("Subject: own $plan_name\n\n$license_key", "utf-8")
    (folder / "dashcaddy" / "license_key.html").write_text("<p>$greeting</p>", "utf-8")
    rendered = _render(services, name="<Jo>")
    assert rendered.subject == "own DashCaddy Pro, monthly"
    assert rendered.text.startswith("DC-PRO-")
    assert rendered.html == "<p> &lt;Jo&gt;</p>"
    # A resend borrows the product's license_key files when it has none of its own.
    assert _render(services, kind="license_key_resend").subject == "own DashCaddy Pro, monthly"


def test_subject_cannot_carry_a_header(services: Services, data_dir: Path) -> None:
    folder = data_dir / "templates"
    folder.mkdir(exist_ok=True)
    (folder / "license_key.txt").write_text("Subject: a $name\n\nbody", "utf-8")
    license_id = _issue(services, "buyer@example.com", send_email=False)
    lic = services.store.get_license(license_id)
    assert lic is not None
    values, raw = mailer.template_values(
        lic, "KEY", product_name="P", plan_name="N", to_name=None, app_base_url="u", website_url=None
    )
    values["name"] = "x\r\nBcc: victim@example.org\x00"
    rendered = mailer.render(data_dir, lic.product, "license_key", values, raw)
    assert rendered.subject == "a x Bcc: victim@example.org"


def test_retry_delay_doubles_from_a_minute_up_to_the_cap() -> None:
    delays = [mailer.retry_delay(n) for n in range(1, mailer.MAX_ATTEMPTS + 1)]
    assert delays[:4] == [60, 120, 240, 480]
    assert all(b == min(2 * a, mailer.RETRY_CAP_SECONDS) for a, b in itertools.pairwise(delays))
    assert delays[-1] == mailer.RETRY_CAP_SECONDS
