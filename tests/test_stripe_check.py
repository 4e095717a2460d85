"""``licensed stripe check``: the read-only go-live checks, against a Stripe double and a live server.

The double answers over real HTTP with Stripe's fixture objects (prices,
products, webhook endpoints, the balance); the server is the real app under
waitress, reached at ``APP_BASE_URL`` like Stripe reaches it. Each broken link
a go-live can have is made once and must give a FAIL line that names it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from support.live import start_server
from support.plans import TEST_PLANS
from support.server_proc import free_port, run_cli
from support.smtp_sink import SmtpSink
from support.stripe_double import StripeDouble, stripe_double

from licensed import preflight, stripe_sync
from licensed.config import Config
from licensed.plans import load_catalog
from licensed.preflight import Check, Status
from licensed.server import init_data_dir
from licensed.services import build_services
from licensed.stripe_api import StripeGateway

PUBLISHABLE = "pk_test_preflight"
SECRET = "whsec_preflight"
SUBSCRIPTION_PRICES = ("price_pro_monthly", "price_team_monthly", "price_basic_monthly")
ONE_TIME_PRICES = ("price_pro_year", "price_desktop_pro")


@dataclass
class Site:
    """A running licensed server and the data dir (plans) it shares with the checks."""

    url: str
    data_dir: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    data = tmp_path_factory.mktemp("preflight") / "data"
    data.mkdir(mode=0o700)
    (data / "plans.toml").write_text(TEST_PLANS, encoding="utf-8")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = Config(
        data_dir=data,
        app_base_url=url,
        stripe_publishable_key=PUBLISHABLE,
        stripe_webhook_secrets=(SECRET,),
    )
    init_data_dir(config, int(time.time()))
    services = build_services(config)
    running = start_server(services, port)
    try:
        yield Site(url, data)
    finally:
        running.stop()
        services.store.close()


@pytest.fixture
def double(site: Site) -> Iterator[StripeDouble]:
    """A Stripe account set up right: every plan's price, one endpoint with every handled type."""
    with stripe_double() as stripe:
        for price in SUBSCRIPTION_PRICES:
            stripe.add_price(price)
        for price in ONE_TIME_PRICES:
            stripe.add_price(price, recurring=False)
        stripe.add_endpoint(stripe_sync.webhook_url(site.url), stripe_sync.HANDLED_EVENTS)
        yield stripe


def settings(site: Site, double: StripeDouble) -> Config:
    """What the operator's settings file says: the same as the running server's."""
    return Config(
        data_dir=site.data_dir,
        app_base_url=site.url,
        stripe_secret_key="sk_test_preflight",
        stripe_publishable_key=PUBLISHABLE,
        stripe_webhook_secrets=(SECRET,),
        stripe_api_base=double.url,
    )


def environment(config: Config) -> dict[str, str]:
    """``config`` as the environment variables of a ``licensed`` process."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("STRIPE_", "ADMIN_", "SMTP_", "MAIL_"))}
    values = {
        "DATA_DIR": str(config.data_dir),
        "APP_BASE_URL": config.app_base_url,
        "STRIPE_SECRET_KEY": config.stripe_secret_key or "",
        "STRIPE_PUBLISHABLE_KEY": config.stripe_publishable_key or "",
        "STRIPE_WEBHOOK_SECRET": ",".join(config.stripe_webhook_secrets),
        "STRIPE_API_BASE": config.stripe_api_base or "",
        "ADMIN_TOKEN": config.admin_token or "",
        "SMTP_URL": config.smtp_url or "",
        "MAIL_FROM": config.mail_from or "",
        "LOG_LEVEL": "INFO",
    }
    return {**base, **values}


def checks(config: Config) -> list[Check]:
    gateway = (
        StripeGateway(config.stripe_secret_key, config.stripe_api_base) if config.stripe_secret_key else None
    )
    server = preflight.ServerClient(config.app_base_url, config.admin_token)
    return list(preflight.run(config, load_catalog(config.plans_path), gateway, server))


def failed(found: list[Check]) -> list[tuple[str, str]]:
    return [(c.subject, c.message) for c in found if c.status is Status.FAIL]


# --- everything right ----------------------------------------------------------------------------


def test_everything_right_passes_reading_only(site: Site, double: StripeDouble) -> None:
    run = run_cli(environment(settings(site, double)), "stripe", "check")
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[-1] == "all checks passed (3 warnings)"
    assert all(line.startswith(("ok  ", "warn")) for line in lines[:-1]), run.stdout
    for plan in ("pro-monthly", "team-monthly", "basic-monthly", "pro-year", "desktop-pro"):
        assert any(line.startswith(f"ok    plan {plan}: ") for line in lines), plan
    assert any(line.startswith("ok    webhook endpoint: ") for line in lines)
    assert any(line.startswith("ok    webhook secret: ") for line in lines)
    assert any(line.startswith(f"ok    public URL: {site.url}/health answers 200") for line in lines)
    # Warnings do not fail it: no SMTP, a loopback APP_BASE_URL in test mode.
    assert "warn  mail: SMTP_URL is not set" in run.stdout
    assert "warn  mail: MAIL_FROM is not set" in run.stdout
    assert "warn  public URL: " in run.stdout
    assert run.stderr == ""  # not even the stripe library's request log
    assert double.requests and {r.method for r in double.requests} == {"GET"}


def test_an_endpoint_sending_every_event_type_passes(site: Site, double: StripeDouble) -> None:
    double.endpoints[0]["enabled_events"] = ["*"]
    assert failed(checks(settings(site, double))) == []


# --- each broken link: a FAIL line naming it -------------------------------------------------


Breakage = Callable[[StripeDouble, Config], Config]


def missing_price(double: StripeDouble, config: Config) -> Config:
    del double.prices["price_team_monthly"]
    return config


def archived_price(double: StripeDouble, config: Config) -> Config:
    double.prices["price_basic_monthly"]["active"] = False
    return config


def inactive_product(double: StripeDouble, config: Config) -> Config:
    double.add_price("price_desktop_pro", product="prod_desktop", recurring=False)
    double.products["prod_desktop"]["active"] = False
    return config


def one_time_price_on_a_subscription_plan(double: StripeDouble, config: Config) -> Config:
    double.add_price("price_pro_monthly", recurring=False)
    return config


def recurring_price_on_a_one_time_plan(double: StripeDouble, config: Config) -> Config:
    double.add_price("price_pro_year", recurring=True, interval="year")
    return config


def endpoint_missing_invoice_paid(double: StripeDouble, config: Config) -> Config:
    double.endpoints[0]["enabled_events"].remove("invoice.paid")
    return config


def disabled_endpoint(double: StripeDouble, config: Config) -> Config:
    double.endpoints[0]["status"] = "disabled"
    return config


def endpoint_for_another_url(double: StripeDouble, config: Config) -> Config:
    double.endpoints[0]["url"] = "https://old.example.com/api/stripe/webhook"
    return config


def refused_secret_key(double: StripeDouble, config: Config) -> Config:
    double.keys = {"sk_test_the_real_one"}
    return config


def publishable_key_of_the_other_mode(double: StripeDouble, config: Config) -> Config:
    return replace(config, stripe_publishable_key="pk_live_preflight")


def live_keys_over_http(double: StripeDouble, config: Config) -> Config:
    double.livemode = True
    return replace(config, stripe_secret_key="sk_live_preflight", stripe_publishable_key=PUBLISHABLE)


def unreachable_public_url(double: StripeDouble, config: Config) -> Config:
    url = f"http://127.0.0.1:{free_port()}"
    double.endpoints[0]["url"] = stripe_sync.webhook_url(url)
    return replace(config, app_base_url=url)


def server_with_another_webhook_secret(double: StripeDouble, config: Config) -> Config:
    return replace(config, stripe_webhook_secrets=("whsec_rotated_but_not_restarted",))


def no_webhook_secret(double: StripeDouble, config: Config) -> Config:
    return replace(config, stripe_webhook_secrets=())


CASES: list[tuple[Breakage, list[tuple[str, str]]]] = [
    (missing_price, [("plan team-monthly", "price price_team_monthly does not exist in Stripe's test mode")]),
    (archived_price, [("plan basic-monthly", "price price_basic_monthly is archived")]),
    (
        inactive_product,
        [("plan desktop-pro", 'product "DashCaddy" (prod_desktop) of price price_desktop_pro')],
    ),
    (
        one_time_price_on_a_subscription_plan,
        [("plan pro-monthly", "price price_pro_monthly is one-time, but the plan needs a recurring price")],
    ),
    (
        recurring_price_on_a_one_time_plan,
        [("plan pro-year", "price price_pro_year is recurring, but the plan needs a one-time price")],
    ),
    (
        endpoint_missing_invoice_paid,
        [("webhook endpoint", "does not send invoice.paid: run `licensed stripe setup`")],
    ),
    (disabled_endpoint, [("webhook endpoint", "is disabled: run `licensed stripe setup`")]),
    (endpoint_for_another_url, [("webhook endpoint", "(Stripe has endpoints for https://old.example.com/")]),
    (refused_secret_key, [("secret key", "Stripe refused the secret key (401)")]),
    (
        publishable_key_of_the_other_mode,
        [
            ("publishable key", "a live-mode key but the secret key is a test-mode key"),
            ("running server", "another STRIPE_PUBLISHABLE_KEY (a test-mode key)"),
        ],
    ),
    (
        live_keys_over_http,
        [
            ("publishable key", "a test-mode key but the secret key is a live-mode key"),
            ("public URL", "Stripe sends live events to https only"),
            ("public URL", "is this machine only: Stripe cannot deliver events to it"),
        ],
    ),
    (unreachable_public_url, [("public URL", "cannot reach http://127.0.0.1:")]),
    (
        server_with_another_webhook_secret,
        [("webhook secret", "the running server refuses events signed with STRIPE_WEBHOOK_SECRET")],
    ),
    (no_webhook_secret, [("webhook secret", "STRIPE_WEBHOOK_SECRET is not set")]),
]


@pytest.mark.parametrize(("breakage", "expected"), CASES, ids=[c[0].__name__ for c in CASES])
def test_each_broken_link_fails_naming_it(
    site: Site, double: StripeDouble, breakage: Breakage, expected: list[tuple[str, str]]
) -> None:
    config = breakage(double, settings(site, double))
    found = failed(checks(config))
    assert len(found) == len(expected), found
    for (subject, fragment), (got_subject, got_message) in zip(expected, found, strict=True):
        assert got_subject == subject
        assert fragment in got_message, got_message
    assert {r.method for r in double.requests} <= {"GET"}


def test_a_missing_event_type_is_named_alone(site: Site, double: StripeDouble) -> None:
    double.endpoints[0]["enabled_events"] = [
        e for e in stripe_sync.HANDLED_EVENTS if e not in ("invoice.paid", "charge.refunded")
    ]
    [(subject, message)] = failed(checks(settings(site, double)))
    assert subject == "webhook endpoint"
    assert "does not send invoice.paid, charge.refunded:" in message
    assert "invoice.payment_failed" not in message


def test_a_refused_key_stops_the_stripe_checks(site: Site, double: StripeDouble) -> None:
    refused_secret_key(double, settings(site, double))
    checks(settings(site, double))
    assert [r.path for r in double.requests] == ["/v1/balance"]


def test_the_command_names_every_failure_and_exits_1(site: Site, double: StripeDouble) -> None:
    config = settings(site, double)
    for breakage in (missing_price, archived_price, inactive_product, one_time_price_on_a_subscription_plan):
        config = breakage(double, config)
    config = publishable_key_of_the_other_mode(double, endpoint_missing_invoice_paid(double, config))
    run = run_cli(environment(config), "stripe", "check")
    assert run.returncode == 1
    assert run.stderr == "licensed: 7 checks failed: a purchase may not become a license\n"
    fails = [line for line in run.stdout.splitlines() if line.startswith("FAIL  ")]
    assert [line.split(":", 1)[0] for line in fails] == [
        "FAIL  publishable key",
        "FAIL  plan pro-monthly",
        "FAIL  plan team-monthly",
        "FAIL  plan basic-monthly",
        "FAIL  plan desktop-pro",
        "FAIL  webhook endpoint",
        "FAIL  running server",
    ]
    assert "all checks passed" not in run.stdout


def test_an_unreachable_public_url_fails_the_command(site: Site, double: StripeDouble) -> None:
    config = unreachable_public_url(double, settings(site, double))
    run = run_cli(environment(config), "stripe", "check")
    assert run.returncode == 1
    [line] = [line for line in run.stdout.splitlines() if line.startswith("FAIL")]
    assert line.startswith(f"FAIL  public URL: cannot reach {config.app_base_url}/health: ")
    assert "is the server running" in line


def test_no_secret_key_is_one_failure_not_a_crash(site: Site, double: StripeDouble) -> None:
    run = run_cli(environment(replace(settings(site, double), stripe_secret_key=None)), "stripe", "check")
    assert run.returncode == 1
    assert "FAIL  secret key: STRIPE_SECRET_KEY is not set" in run.stdout
    assert "Traceback" not in run.stderr
    assert double.requests == []


# --- mail: warnings only ---------------------------------------------------------------------


def test_a_reachable_smtp_server_is_ok(site: Site, double: StripeDouble) -> None:
    sink = SmtpSink().start()
    try:
        config = replace(
            settings(site, double), smtp_url=sink.url, mail_from="Licenses <licenses@example.com>"
        )
        mail = [c for c in checks(config) if c.subject == "mail"]
    finally:
        sink.stop()
    assert [(c.status, c.message) for c in mail] == [
        (Status.OK, f"SMTP server 127.0.0.1:{sink.port} answers")
    ]


def test_an_unreachable_smtp_server_warns_and_passes(site: Site, double: StripeDouble) -> None:
    config = replace(
        settings(site, double),
        smtp_url=f"smtp://127.0.0.1:{free_port()}",
        mail_from="licenses@example.com",
    )
    run = run_cli(environment(config), "stripe", "check")
    assert run.returncode == 0, run.stdout + run.stderr
    [line] = [line for line in run.stdout.splitlines() if line.startswith("warn  mail")]
    assert "cannot reach SMTP server 127.0.0.1:" in line


# --- --e2e is refused before anything happens -----------------------------------------------


def test_e2e_is_refused_with_a_live_key(site: Site, double: StripeDouble) -> None:
    double.livemode = True
    config = replace(
        settings(site, double),
        stripe_secret_key="sk_live_preflight",
        stripe_publishable_key="pk_live_preflight",
        admin_token="a" * 40,
    )
    run = run_cli(environment(config), "stripe", "check", "--e2e")
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr.count("\n") == 1
    assert "--e2e buys with Stripe's test card and runs only with test-mode keys" in run.stderr
    assert double.requests == []


def test_e2e_needs_the_admin_token(site: Site, double: StripeDouble) -> None:
    run = run_cli(environment(settings(site, double)), "stripe", "check", "--e2e")
    assert run.returncode == 2
    assert run.stderr == (
        "licensed: --e2e needs ADMIN_TOKEN: it finds the test license through the server's admin API\n"
    )
    assert double.requests == []


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ("nope", "--plan nope: no such plan"),
        ("pro-year", "--plan pro-year: --e2e buys a subscription"),
    ],
)
def test_e2e_refuses_a_plan_it_cannot_buy(site: Site, double: StripeDouble, plan: str, message: str) -> None:
    config = replace(settings(site, double), admin_token="a" * 40)
    run = run_cli(environment(config), "stripe", "check", "--e2e", "--plan", plan)
    assert run.returncode == 2
    assert message in run.stderr
    assert double.requests == []


def test_e2e_does_not_buy_while_a_check_fails(site: Site, double: StripeDouble) -> None:
    config = replace(missing_price(double, settings(site, double)), admin_token="a" * 40)
    run = run_cli(environment(config), "stripe", "check", "--e2e")
    assert run.returncode == 1
    assert run.stderr == "licensed: 1 check failed; no test purchase until every check passes\n"
    assert {r.method for r in double.requests} == {"GET"}
