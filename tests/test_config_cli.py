"""Configuration, the plans file and the command line.

Bad settings stop start-up with one line naming the culprit; the CLI is run
as a real process (``python -m licensed``) against a real data dir.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from support.clock import DAY
from support.forge import claims_of, split_key
from support.live import Live
from support.plans import TEST_PLANS
from support.server_proc import run_cli as run_licensed

from licensed import keys
from licensed.config import Config, read_env_file
from licensed.errors import ConfigError
from licensed.plans import load_catalog
from licensed.server import init_data_dir

ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m licensed ARGS`` with only the settings given (nothing inherited)."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "HOME": "/tmp"}
    return run_licensed({**clean, **(env or {})}, *args, timeout=timeout)


def one_line_failure(done: subprocess.CompletedProcess[str]) -> str:
    """A failure is a non-zero exit and exactly one line on stderr, no traceback."""
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("licensed: ")
    return lines[0]


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("PORT", "-1"),
        ("STRIPE_WEBHOOK_SECRET", "sk_live_123"),
        ("STRIPE_WEBHOOK_SECRET", "whsec_ok, not-a-secret"),
        ("APP_BASE_URL", "ftp://example.com"),
        ("APP_BASE_URL", "example.com"),
        ("DASHCADDY_WEBSITE_URL", "not a url"),
        ("LEASE_TTL_HOURS", "0"),
        ("RATE_LIMIT_PER_MINUTE", "-5"),
        ("TRUSTED_PROXIES", "10.0.0.0/8, not-an-ip"),
        ("SMTP_URL", "http://mail.example.com"),
        ("SMTP_URL", "smtp://mail.example.com:99999"),
        ("LOG_LEVEL", "LOUD"),
        ("THREADS", "many"),
        ("CPU_AFFINITY", "two"),
        ("CPU_AFFINITY", "-1"),
        ("CPU_AFFINITY", "0,1"),
        ("MAX_BODY_BYTES", "0"),
        ("HOST", "   "),
        ("ADMIN_TOKEN", "a"),
        ("ADMIN_TOKEN", "x" * 31),
        ("INTERNAL_API_KEY", "short-internal-key"),
    ],
)
def test_malformed_setting_names_the_variable(name: str, value: str) -> None:
    extra = {"MAIL_FROM": "shop@example.com"} if name == "SMTP_URL" else {}
    with pytest.raises(ConfigError) as caught:
        Config.from_mapping({name: value, **extra})
    assert caught.value.message.startswith(f"{name}: ")


def test_the_admin_token_and_the_internal_key_must_differ() -> None:
    token = "t" * 40
    with pytest.raises(ConfigError, match="ADMIN_TOKEN and INTERNAL_API_KEY must differ"):
        Config.from_mapping({"ADMIN_TOKEN": token, "INTERNAL_API_KEY": token})
    config = Config.from_mapping({"ADMIN_TOKEN": token, "INTERNAL_API_KEY": "u" * 32})
    assert (config.admin_token, config.internal_api_key) == (token, "u" * 32)


def test_a_weak_admin_token_stops_start_up_with_one_line(tmp_path: Path) -> None:
    done = run_cli("serve", env={"DATA_DIR": str(tmp_path / "data"), "ADMIN_TOKEN": "a", "PORT": "0"})
    assert done.returncode == 2
    assert "ADMIN_TOKEN: must be at least 32 characters" in one_line_failure(done)


def test_smtp_needs_mail_from() -> None:
    with pytest.raises(ConfigError, match="SMTP_URL and MAIL_FROM"):
        Config.from_mapping({"SMTP_URL": "smtp://mail.example.com"})


def test_good_settings() -> None:
    config = Config.from_mapping(
        {
            "PORT": "8080",
            "STRIPE_WEBHOOK_SECRET": "whsec_a, whsec_b",
            "DASHCADDY_WEBSITE_URL": "https://shop.example.com/",
            "TRUSTED_PROXIES": "127.0.0.1, 10.0.0.0/8",
            "OIDC_ISSUER": "https://tenant.example.com/oidc",
            "OIDC_AUDIENCE": "https://api.example.com",
        }
    )
    assert config.port == 8080
    assert config.stripe_webhook_secrets == ("whsec_a", "whsec_b")
    assert config.website_url == "https://shop.example.com"
    assert len(config.trusted_proxies) == 2
    assert config.oidc_jwks_url is None  # found through the discovery document


def test_env_file(tmp_path: Path) -> None:
    path = tmp_path / "licensed.env"
    path.write_text('# comment\n\nexport PORT=4000\nAPP_BASE_URL="https://lic.example.com"\n')
    assert read_env_file(path) == {"PORT": "4000", "APP_BASE_URL": "https://lic.example.com"}
    # The environment wins over the file; unrelated environment names are ignored.
    config = Config.from_sources({"PORT": "5000", "HOSTNAME": "box"}, path)
    assert (config.port, config.app_base_url) == (5000, "https://lic.example.com")


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        ("PORT=1\nPROT=2\n", ":2: unknown setting PROT"),
        ("PORT=1\njust words\n", ":2: expected NAME=value"),
        ("STRIPE_WEBHOOK_SECRET=sk_test_1\n", "STRIPE_WEBHOOK_SECRET: "),
        ("PORT=http\n", "PORT: "),
    ],
)
def test_bad_env_file(tmp_path: Path, text: str, culprit: str) -> None:
    path = tmp_path / "licensed.env"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        Config.from_sources({}, path)
    assert culprit in caught.value.message


def test_missing_env_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read env file"):
        Config.from_sources({}, tmp_path / "nope.env")


# --- the plans file -------------------------------------------------------------------------------

PRODUCT = '[products.dc]\nname = "DC"\nkey_prefix = "DC"\n'


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        pytest.param(PRODUCT + "[plans.p]\nproduct = \n", "line 5", id="bad-toml-value"),
        pytest.param(PRODUCT + "[plans.p]\nproduct = 'dc'\n[plans.p]\n", "line 6", id="toml-table-twice"),
        pytest.param(PRODUCT + "name = 'again'\n", "line 4", id="toml-key-twice"),
        pytest.param(
            PRODUCT + "[plans.p]\nproduct = 'dc'\ntier = 'PRO'\ncolour = 'red'\n",
            "plans.p.colour: unknown key",
            id="unknown-plan-key",
        ),
        pytest.param(
            '[products.dc]\nkey_prefix = "DC"\nlogo = "x.png"\n',
            "products.dc.logo: unknown key",
            id="unknown-product-key",
        ),
        pytest.param("[shop]\nx = 1\n", "unknown table 'shop'", id="unknown-table"),
        pytest.param(PRODUCT + "[plans.p]\ntier = 'PRO'\n", "plans.p: product is required", id="no-product"),
        pytest.param(
            PRODUCT + "[plans.p]\nproduct = 'desktop'\ntier = 'PRO'\n",
            "plans.p.product: no product 'desktop'",
            id="unknown-product",
        ),
        pytest.param("[plans.p]\nproduct = 'dc'\ntier = 'PRO'\n", "[products.<id>] is required", id="none"),
        pytest.param(
            PRODUCT
            + "[plans.a]\nproduct = 'dc'\ntier = 'A'\nstripe_price = 'price_1'\n"
            + "[plans.b]\nproduct = 'dc'\ntier = 'B'\nstripe_price = 'price_1'\n",
            "plans.a and plans.b share the stripe_price 'price_1'",
            id="duplicate-price",
        ),
        pytest.param(
            PRODUCT + '[products.other]\nkey_prefix = "DC"\n',
            "products.dc and products.other share the key_prefix 'DC'",
            id="duplicate-prefix",
        ),
        pytest.param(PRODUCT + "[plans.p]\nproduct = 'dc'\ntier = 'pro'\n", "plans.p.tier", id="lower-tier"),
        pytest.param(
            PRODUCT + "[plans.p]\nproduct = 'dc'\ntier = 'P'\nmax_machines = 0\n",
            "plans.p.max_machines",
            id="zero-seats",
        ),
        pytest.param(
            PRODUCT + "[plans.p]\nproduct = 'dc'\ntier = 'P'\nmax_machines = true\n",
            "plans.p.max_machines: must be int",
            id="bool-seats",
        ),
        pytest.param(
            PRODUCT + "[plans.p]\nproduct = 'dc'\ntier = 'P'\nlifetime = true\nduration_days = 3\n",
            "plans.p: lifetime and duration_days",
            id="lifetime-and-duration",
        ),
        pytest.param(
            PRODUCT + "[plans.p]\nproduct = 'dc'\ntier = 'P'\nfeatures = ['ok', 'not ok']\n",
            "plans.p.features",
            id="bad-feature",
        ),
        pytest.param(
            PRODUCT + "[plans.p]\nproduct = 'dc'\ntier = 'P'\ngrace_days = 400\n",
            "plans.p.grace_days",
            id="grace-too-long",
        ),
        pytest.param('[products.Dc]\nkey_prefix = "DC"\n', "products.Dc", id="bad-id"),
        pytest.param('[products.dc]\nkey_prefix = "D-C"\n', "products.dc.key_prefix", id="dash-in-prefix"),
    ],
)
def test_plans_file_errors_name_the_culprit(tmp_path: Path, text: str, culprit: str) -> None:
    path = tmp_path / "plans.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_catalog(path)
    assert str(path) in caught.value.message
    assert culprit in caught.value.message


def test_plans_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "plans.toml"
    path.write_bytes(b'[products.dc]\nname = "Caf\xe9"\nkey_prefix = "DC"\n')
    with pytest.raises(ConfigError, match="UTF-8"):
        load_catalog(path)


def test_the_test_and_example_plans_load(tmp_path: Path) -> None:
    path = tmp_path / "plans.toml"
    path.write_text(TEST_PLANS, encoding="utf-8")
    catalog = load_catalog(path)
    assert catalog.plan_for_price("price_team_monthly").id == "team-monthly"  # type: ignore[union-attr]
    assert catalog.product_for_key("DT-PRO-x").id == "desktop"  # type: ignore[union-attr]
    assert catalog.product_for_key("DTX-PRO-x") is None


# --- start-up refusals, as a process --------------------------------------------------------------


def fresh_data_dir(tmp_path: Path) -> Path:
    """What ``licensed init`` makes (tested as a process below), made in-process."""
    data = tmp_path / "data"
    init_data_dir(Config(data_dir=data), int(time.time()))
    return data


def test_serve_refuses_a_key_readable_by_others(tmp_path: Path) -> None:
    data = fresh_data_dir(tmp_path)
    (key_file,) = (data / "keys").glob(f"*{keys.KEY_SUFFIX}")
    key_file.chmod(0o644)
    line = one_line_failure(run_cli("serve", env={"DATA_DIR": str(data), "PORT": "0"}))
    assert str(key_file) in line and "chmod 600" in line


@pytest.mark.parametrize(
    ("env_file", "environ", "culprit"),
    [
        ("PORT=1\nNOT_A_SETTING=1\n", {}, "unknown setting NOT_A_SETTING"),
        ("", {"PORT": "eighty"}, "PORT: "),
        ("STRIPE_WEBHOOK_SECRET=nope\n", {}, "STRIPE_WEBHOOK_SECRET: "),
    ],
)
def test_serve_refuses_bad_settings(
    tmp_path: Path, env_file: str, environ: dict[str, str], culprit: str
) -> None:
    path = tmp_path / "licensed.env"
    path.write_text(env_file)
    done = run_cli("--env-file", str(path), "serve", env={"DATA_DIR": str(tmp_path / "data"), **environ})
    assert culprit in one_line_failure(done)
    assert done.returncode == 2
    assert not (tmp_path / "data").exists()  # refused before touching anything


def test_serve_refuses_a_bad_plans_file(tmp_path: Path) -> None:
    data = fresh_data_dir(tmp_path)
    (data / "plans.toml").write_text(PRODUCT + "[plans.p]\nproduct = 'dc'\ntier = 'P'\nprice = 3\n")
    line = one_line_failure(run_cli("serve", env={"DATA_DIR": str(data), "PORT": "0"}))
    assert "plans.p.price: unknown key" in line


def test_unusable_data_dir_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = run_cli("init", env={"DATA_DIR": str(blocker / "data")})
    assert str(blocker) in one_line_failure(done)


def test_serve_answers_and_stops_on_interrupt(tmp_path: Path) -> None:
    data = tmp_path / "data"
    clean = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": "/tmp"}
    env = {**clean, "DATA_DIR": str(data), "PORT": "0", "THREADS": "2"}
    process = subprocess.Popen(
        [sys.executable, "-m", "licensed", "serve"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stderr is not None
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            entry = json.loads(line)  # the log is one JSON object per line
            url = entry.get("url") if entry.get("msg") == "listening" else None
        assert url, "the server never said it was listening"
        assert requests.get(url + "/health", timeout=10).json()["status"] == "ok"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5)
    assert stat.S_IMODE(data.stat().st_mode) == 0o700


# --- init, keys, admin issue ------------------------------------------------------------------------


def test_init_creates_what_a_first_start_needs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    done = run_cli("init", env={"DATA_DIR": str(data)})
    assert done.returncode == 0, done.stderr
    (key_file,) = (data / "keys").glob(f"*{keys.KEY_SUFFIX}")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert (data / "licensed.sqlite3").exists()
    assert load_catalog(data / "plans.toml").plans  # the example plans load
    assert key_file.name.split(".")[0] in done.stdout
    plans_before = (data / "plans.toml").read_text()

    again = run_cli("init", env={"DATA_DIR": str(data)})
    assert again.returncode == 0 and again.stdout.strip() == "nothing to do"
    assert list((data / "keys").glob(f"*{keys.KEY_SUFFIX}")) == [key_file]
    assert (data / "plans.toml").read_text() == plans_before


def test_keys_list_and_rotate(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(fresh_data_dir(tmp_path))}
    listed = run_cli("keys", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    ((first_kid, created, state),) = [line.split() for line in listed.stdout.splitlines()]
    assert state == "signing" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", created)

    rotated = run_cli("keys", "rotate", env=env)
    assert rotated.returncode == 0, rotated.stderr
    listed = run_cli("keys", "list", env=env)
    rows = {line.split()[0]: line.split()[2] for line in listed.stdout.splitlines()}
    assert rows[first_kid] == "retired"
    (new_kid,) = [kid for kid, state in rows.items() if state == "signing"]
    assert new_kid in rotated.stdout


def test_keys_list_without_keys(tmp_path: Path) -> None:
    line = one_line_failure(run_cli("keys", "list", env={"DATA_DIR": str(tmp_path)}))
    assert "licensed init" in line


def issue_with_cli(live: Live, *args: str) -> str:
    env = {"DATA_DIR": str(live.services.config.data_dir), "APP_BASE_URL": "http://licensed.test"}
    done = run_cli("admin", "issue", "--email", "cli@example.com", *args, env=env)
    assert done.returncode == 0, done.stderr
    key = done.stdout.strip()
    assert "\n" not in key
    return key


@pytest.mark.parametrize(
    ("args", "prefix", "days", "lifetime"),
    [
        (["--plan", "pro-monthly", "--days", "30"], "DC-PRO-", 30, False),
        (["--plan", "team-monthly", "--lifetime"], "DC-TEAM-", None, True),
        (["--plan", "pro-year"], "DC-PRO-", 365, False),
        (["--plan", "lifetime"], "DC-LIFE-", None, True),
        (["--plan", "desktop-pro", "--days", "3"], "DT-PRO-", 3, False),
    ],
)
def test_admin_issue_prints_a_key_that_validates(
    live: Live, args: list[str], prefix: str, days: int | None, lifetime: bool
) -> None:
    before = int(time.time())
    key = issue_with_cli(live, *args)
    after = int(time.time())
    assert key.startswith(prefix)
    live.clock.set(after)  # the CLI issued at the real time
    body = live.post("/api/license/activate", {"key": key, "machine_id": "m-1"}).json()
    assert body["code"] == "VALID" and body["activated"] is True
    assert body["license"]["lifetime"] is lifetime
    lic = live.license(claims_of(split_key(key)[2])["sub"])
    if days is None:
        assert lic.paid_through is None
    else:
        assert lic.paid_through is not None and before + days * DAY <= lic.paid_through <= after + days * DAY
    audit = live.services.store.all("SELECT actor, action FROM audit_log WHERE license_id = ?", (lic.id,))
    assert [(row["action"], row["actor"].startswith("cli:")) for row in audit] == [("license.issue", True)]


def test_admin_issue_max_machines(live: Live) -> None:
    key = issue_with_cli(live, "--plan", "pro-monthly", "--days", "5", "--max-machines", "4")
    assert claims_of(split_key(key)[2])["max"] == 4


@pytest.mark.parametrize(
    ("args", "culprit", "code"),
    [
        (["--plan", "nope", "--days", "3"], "no plan 'nope'", 1),
        (["--plan", "pro-monthly"], "give a number of days", 1),
        (["--plan", "pro-monthly", "--days", "0"], "days must be 1..36500", 1),
        (["--plan", "pro-monthly", "--days", "3", "--max-machines", "0"], "max_machines must be 1..10000", 1),
    ],
)
def test_admin_issue_refusals(live: Live, args: list[str], culprit: str, code: int) -> None:
    env = {"DATA_DIR": str(live.services.config.data_dir)}
    done = run_cli("admin", "issue", "--email", "cli@example.com", *args, env=env)
    assert done.returncode == code, done.stderr
    assert culprit in done.stderr
    assert live.services.store.all("SELECT id FROM licenses") == []


@pytest.mark.parametrize("email", ["a@b", "x y@example.com"])
def test_admin_issue_checks_the_email(live: Live, email: str) -> None:
    env = {"DATA_DIR": str(live.services.config.data_dir)}
    done = run_cli("admin", "issue", "--email", email, "--plan", "pro-year", env=env)
    line = one_line_failure(done)
    assert f"{email!r}" in line and ("invalid domain" in line or "not a valid e-mail address" in line)


def test_a_cpu_the_server_may_not_use_stops_start_up_with_one_line(tmp_path: Path) -> None:
    done = run_cli("serve", env={"DATA_DIR": str(tmp_path / "data"), "CPU_AFFINITY": "4095", "PORT": "0"})
    assert done.returncode == 2
    assert "CPU_AFFINITY: CPU 4095 is not one this process may use" in one_line_failure(done)
