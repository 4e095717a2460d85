"""Support tooling: every admin verb through the HTTP API and the command line, on record.

The verb tests run twice, through a live server with ``ADMIN_TOKEN`` set and
through ``python -m licensed admin … --json`` on the same database, and check
the same effects. Auth, the internal generate route and the debug export are
HTTP only.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import itertools
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import nacl.encoding
import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st
from support.clock import DAY, T0
from support.live import Live, issue_license
from support.server_proc import run_cli

from licensed import admin, export, keys, openapi
from licensed.app import App
from licensed.config import Config
from licensed.errors import Unauthorized
from licensed.redact import MASK, Redactor
from licensed.routes import guards
from licensed.services import Services
from licensed.store import Store
from licensed.web import Request

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "adm_9f8e7d6c5b4a39281706f5e4d3c2b1a0"
INTERNAL_KEY = "int_0a1b2c3d4e5f60718293a4b5c6d7e8f9"
CLI_USER = "support-alice"


@pytest.fixture
def tokens() -> dict[str, str | None]:
    """Which tokens the server is configured with; parametrize to turn routes off."""
    return {"admin_token": ADMIN_TOKEN, "internal_api_key": INTERNAL_KEY}


@pytest.fixture
def config(config: Config, tokens: dict[str, str | None]) -> Config:
    """The shared test config with the admin and internal tokens set."""
    return replace(config, **tokens)


def epoch(text: str) -> int:
    return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))


def sha(machine_id: str) -> str:
    return hashlib.sha256(machine_id.encode()).hexdigest()


def add_event(
    store: Store,
    event_id: str,
    *,
    status: str,
    received_at: int,
    license_id: str | None = None,
    payload: dict[str, Any] | None = None,
    error: str | None = None,
) -> None:
    """Record a Stripe event row the way the webhook does: through the store, in a transaction."""
    body = payload or {"id": event_id, "object": "event", "type": "invoice.paid", "data": {"object": {}}}
    with store.atomic():
        store.execute(
            "INSERT INTO stripe_events (id, type, created, status, attempts, error, license_id, payload,"
            " received_at, processed_at) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?, ?)",
            (
                event_id,
                body.get("type", "invoice.paid"),
                received_at,
                status,
                error,
                license_id,
                json.dumps(body),
                received_at,
                received_at,
            ),
        )


def checkout_completed(event_id: str, *, client_secret: str, note: str, email: str) -> dict[str, Any]:
    """A ``checkout.session.completed`` event around fields of Stripe's example session object."""
    session = {
        "id": "cs_test_a1YS1URlnyQCN5fUUduORoQ7Pw41PJqDWkIVQCpJPqkfIhd6tVY8XB1OLY",
        "object": "checkout.session",
        "cancel_url": "https://example.com/cancel",
        "client_secret": client_secret,
        "created": 1234567890,
        "customer": "cus_ExampleCustomer1",
        "customer_details": {"email": email, "name": None, "phone": None, "tax_exempt": "none"},
        "livemode": False,
        "metadata": {"note": note},
        "mode": "payment",
        "payment_intent": "pi_1PgafyB7WZ01zgkWSjxsAJo3",
        "payment_status": "paid",
        "status": "complete",
        "success_url": "https://example.com/success",
    }
    return {
        "id": event_id,
        "object": "event",
        "type": "checkout.session.completed",
        "created": T0,
        "data": {"object": session},
    }


# --- two ways in: HTTP and the command line ---------------------------------------------


class AdminError(Exception):
    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class HttpDriver:
    """The admin verbs over HTTP with the admin bearer token."""

    actor = "admin-token"

    def __init__(self, live: Live) -> None:
        self.live = live

    def now(self) -> int:
        return self.live.services.now()

    def _call(
        self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        answer = self.live.http.request(
            method,
            self.live.url + path,
            json=body,
            params=params,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=10,
        )
        data: dict[str, Any] = answer.json()
        if answer.status_code >= 400:
            raise AdminError(answer.status_code, data["error"]["code"], data["error"]["message"])
        return data

    def find(self, **criteria: str) -> dict[str, Any]:
        return self._call("GET", "/api/admin/licenses", params=criteria)

    def show(self, license_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/admin/licenses/{license_id}")

    def issue(self, **body: Any) -> dict[str, Any]:
        return self._call("POST", "/api/admin/licenses", body)

    def extend(self, license_id: str, **body: Any) -> dict[str, Any]:
        return self._call("POST", f"/api/admin/licenses/{license_id}/extend", body)

    def action(self, verb: str, license_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/admin/licenses/{license_id}/{verb}")

    def remove_machine(self, license_id: str, **body: str) -> dict[str, Any]:
        return self._call("POST", f"/api/admin/licenses/{license_id}/remove-machine", body)

    def events(self, **params: Any) -> dict[str, Any]:
        return self._call("GET", "/api/admin/events", params=params)

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/api/admin/stats")

    def audit(self, **params: Any) -> dict[str, Any]:
        return self._call("GET", "/api/admin/audit", params=params)


class CliDriver:
    """The same verbs through ``python -m licensed admin … --json`` on the same data dir."""

    actor = f"cli:{CLI_USER}"

    def __init__(self, config: Config) -> None:
        self.env = {
            **os.environ,
            "DATA_DIR": str(config.data_dir),
            "APP_BASE_URL": config.app_base_url,
            "PYTHONPATH": str(ROOT),
            "USER": CLI_USER,
            "LOGNAME": CLI_USER,
        }

    def now(self) -> int:
        return int(time.time())

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, "admin", *argv)

    def _call(self, *argv: str) -> dict[str, Any]:
        done = self.run(*argv, "--json")
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1, done.stderr  # one clear line, no traceback
            raise AdminError(done.returncode, None, lines[0])
        data: dict[str, Any] = json.loads(done.stdout)
        return data

    def find(self, **criteria: str) -> dict[str, Any]:
        argv = ["find"]
        for name, value in criteria.items():
            argv += [value] if name == "q" else [f"--{name.replace('_', '-')}", value]
        return self._call(*argv)

    def show(self, license_id: str) -> dict[str, Any]:
        return self._call("show", license_id)

    def issue(self, **body: Any) -> dict[str, Any]:
        argv = ["issue", "--email", body.pop("email"), "--plan", body.pop("plan")]
        if body.pop("lifetime", False):
            argv.append("--lifetime")
        if body.pop("send_email", False):
            argv.append("--send-email")
        for name, flag in (("days", "--days"), ("expires_at", "--until"), ("max_machines", "--max-machines")):
            if name in body:
                argv += [flag, str(body.pop(name))]
        assert not body, body
        return self._call(*argv)

    def extend(
        self, license_id: str, days: int | None = None, paid_through: str | None = None
    ) -> dict[str, Any]:
        how = ["--days", str(days)] if days is not None else ["--until", str(paid_through)]
        return self._call("extend", license_id, *how)

    def action(self, verb: str, license_id: str) -> dict[str, Any]:
        return self._call(verb, license_id)

    def remove_machine(
        self, license_id: str, machine_id: str | None = None, machine_hash: str | None = None
    ) -> dict[str, Any]:
        which = ["--machine-id", machine_id] if machine_id is not None else ["--hash", str(machine_hash)]
        return self._call("remove-machine", license_id, *which)

    def events(self, **params: Any) -> dict[str, Any]:
        argv = ["events"]
        for name, value in params.items():
            argv += [f"--{name}", str(value)]
        return self._call(*argv)

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    def audit(self, **params: Any) -> dict[str, Any]:
        argv = ["audit"]
        for name, value in params.items():
            flag = "--license" if name == "license_id" else f"--{name.replace('_', '-')}"
            argv += [flag, str(value)]
        return self._call(*argv)


Driver = HttpDriver | CliDriver


@pytest.fixture(params=["http", "cli"])
def driver(request: pytest.FixtureRequest, live: Live) -> Driver:
    if request.param == "http":
        return HttpDriver(live)
    return CliDriver(live.services.config)


def validate(live: Live, key: str, machine_id: str | None = None) -> dict[str, Any]:
    body = {"key": key} if machine_id is None else {"key": key, "machine_id": machine_id}
    answer: dict[str, Any] = live.post("/api/license/validate", body).json()
    return answer


def with_stripe_ids(live: Live, license_id: str, suffix: str) -> dict[str, str]:
    """Give a licence the Stripe ids a checkout would have left on it."""
    store = live.services.store
    ids = {
        "stripe_customer_id": f"cus_Test{suffix}",
        "stripe_subscription_id": f"sub_Test{suffix}",
        "stripe_checkout_session_id": f"cs_test_{suffix}",
    }
    with store.atomic():
        lic = live.license(license_id)
        for name, value in ids.items():
            setattr(lic, name, value)
        store.save_license(lic, live.services.now())
    return ids


# --- the verbs, both ways ---------------------------------------------------------------------


def test_find_by_every_field(driver: Driver, live: Live) -> None:
    target = live.issue_license(email="Jane.Doe@Example.com")
    other = live.issue_license(email="someone.else@example.com")
    ids = with_stripe_ids(live, target.id, "Target1")
    with_stripe_ids(live, other.id, "Other22")
    searches = {
        "email": "jane.doe@example.COM",
        "key": live.key_of(target),
        "license_id": target.id,
        "customer_id": ids["stripe_customer_id"],
        "subscription_id": ids["stripe_subscription_id"],
        "session_id": ids["stripe_checkout_session_id"],
    }
    for field, value in searches.items():
        for criteria in ({field: value}, {"q": value}):
            answer = driver.find(**criteria)
            assert answer["by"] == field, criteria
            assert [x["id"] for x in answer["licenses"]] == [target.id], criteria
    own = driver.find(customer_id=target.customer_id)
    assert [x["id"] for x in own["licenses"]] == [target.id]
    found = own["licenses"][0]
    assert found["email"] == "Jane.Doe@example.com"  # the domain is stored in lower case
    assert found["entitlement"] == "VALID"
    assert driver.find(email="nobody@example.com")["licenses"] == []


def test_find_needs_exactly_one_criterion(driver: Driver, live: Live) -> None:
    lic = live.issue_license()
    with pytest.raises(AdminError):
        driver.find(email="buyer@example.com", license_id=lic.id)
    with pytest.raises(AdminError):
        driver.find()


def test_show_gathers_machines_events_mail_and_audit(driver: Driver, live: Live) -> None:
    store = live.services.store
    lic = live.issue_license("team-monthly", email="team@example.com")
    other = live.issue_license(email="other@example.com")
    key = live.key_of(lic)
    for machine in ("machine-alpha", "machine-beta"):
        assert validate(live, key, machine)["activated"] is True
    add_event(store, "evt_show_1", status="applied", received_at=T0, license_id=lic.id)
    add_event(store, "evt_show_2", status="failed", received_at=T0 + 5, license_id=lic.id, error="boom")
    add_event(store, "evt_show_other", status="applied", received_at=T0, license_id=other.id)
    with store.atomic():
        store.enqueue_mail(lic.id, "license_key", "team@example.com", None, T0)

    shown = driver.show(lic.id)

    assert shown["license"]["id"] == lic.id
    assert shown["license"]["machines_used"] == 2
    assert shown["key"] == key
    assert [m["machine_hash"] for m in shown["machines"]] == [sha("machine-alpha"), sha("machine-beta")]
    assert all(m["activated_at"] and m["last_seen_at"] for m in shown["machines"])
    assert "machine-alpha" not in json.dumps(shown)
    assert [e["id"] for e in shown["stripe_events"]] == ["evt_show_1", "evt_show_2"]
    assert shown["stripe_events"][1]["error"] == "boom"
    assert [(o["kind"], o["to_addr"], o["status"]) for o in shown["outbox"]] == [
        ("license_key", "team@example.com", "pending")
    ]
    assert [a["action"] for a in shown["audit"]] == ["license.issue"]
    with pytest.raises(AdminError) as missing:
        driver.show("lic_doesnotexist")
    assert missing.value.status in (1, 404)


def test_issue_a_lifetime_license_of_a_hidden_plan(driver: Driver, live: Live) -> None:
    answer = driver.issue(email="vip@example.com", plan="lifetime", lifetime=True, send_email=True)
    view = answer["license"]
    assert (view["plan"], view["tier"], view["lifetime"], view["entitlement"]) == (
        "lifetime",
        "LIFE",
        True,
        "VALID",
    )
    assert view["paid_through"] is None
    checked = validate(live, answer["key"], "vip-machine")
    assert (checked["code"], checked["license"]["tier"]) == ("VALID", "LIFE")
    outbox = live.services.store.outbox_for_license(view["id"])
    assert [(o["kind"], o["to_addr"]) for o in outbox] == [("license_key", "vip@example.com")]
    trail = driver.audit(license_id=view["id"])["entries"]
    assert [(e["action"], e["actor"]) for e in trail] == [("license.issue", driver.actor)]
    assert trail[0]["before"] is None and trail[0]["after"]["id"] == view["id"]


def test_issue_for_days_or_until_a_date(driver: Driver, live: Live) -> None:
    by_days = driver.issue(email="days@example.com", plan="pro-monthly", days=10, max_machines=4)
    row = live.license(by_days["license"]["id"])
    assert row.paid_through == row.created_at + 10 * DAY
    assert row.max_machines == 4
    until = driver.issue(email="until@example.com", plan="pro-monthly", expires_at="2031-05-01T12:00:00Z")
    assert live.license(until["license"]["id"]).paid_through == epoch("2031-05-01T12:00:00Z")
    with pytest.raises(AdminError):
        driver.issue(email="sub@example.com", plan="pro-monthly")  # a subscription plan needs an end
    with pytest.raises(AdminError):
        driver.issue(email="not-an-address", plan="pro-year")


def test_extend_moves_paid_through_and_reissues_the_key(driver: Driver, live: Live) -> None:
    lic = live.issue_license(days=30)
    old_key = live.key_of(lic)
    live.clock.advance(3600)
    answer = driver.extend(lic.id, days=10)
    row = live.license(lic.id)
    assert row.paid_through == T0 + 40 * DAY
    assert row.key_iat != lic.key_iat
    assert answer["key"] == live.key_of(row) != old_key
    # the client presenting its old key is handed the new one
    assert validate(live, old_key)["key"] == answer["key"]

    driver.extend(lic.id, paid_through="2031-01-31T00:00:00Z")
    assert live.license(lic.id).paid_through == epoch("2031-01-31T00:00:00Z")

    lifetime = live.issue_license("lifetime")
    with pytest.raises(AdminError):
        driver.extend(lifetime.id, days=5)
    with pytest.raises(AdminError):
        driver.extend(lic.id, paid_through="2001-01-01T00:00:00Z")  # not an extension


def test_suspend_reinstate_revoke(driver: Driver, live: Live) -> None:
    lic = live.issue_license(days=30)
    key = live.key_of(lic)

    suspended = driver.action("suspend", lic.id)["license"]
    assert (suspended["license_status"], suspended["status_reason"]) == ("suspended", "admin")
    assert suspended["entitlement"] == "SUSPENDED"
    assert validate(live, key)["code"] == "SUSPENDED"
    with pytest.raises(AdminError):
        driver.action("suspend", lic.id)

    assert driver.action("reinstate", lic.id)["license"]["entitlement"] == "VALID"
    assert validate(live, key)["code"] == "VALID"

    revoked = driver.action("revoke", lic.id)["license"]
    assert (revoked["license_status"], revoked["status_reason"]) == ("revoked", "admin")
    assert validate(live, key)["code"] == "REVOKED"
    with pytest.raises(AdminError):
        driver.action("revoke", lic.id)

    reinstated = driver.action("reinstate", lic.id)["license"]
    assert (reinstated["license_status"], reinstated["status_reason"]) == ("active", None)
    assert validate(live, key)["code"] == "VALID"
    with pytest.raises(AdminError):
        driver.action("reinstate", lic.id)


def test_remove_one_machine_or_reset_all(driver: Driver, live: Live) -> None:
    lic = live.issue_license("team-monthly")
    key = live.key_of(lic)
    for machine in ("m-1", "m-2", "m-3"):
        assert validate(live, key, machine)["activated"] is True
    assert validate(live, key, "m-4")["code"] == "TOO_MANY_MACHINES"

    by_id = driver.remove_machine(lic.id, machine_id="m-1")
    assert by_id["removed"] == sha("m-1")
    assert validate(live, key, "m-4")["activated"] is True

    driver.remove_machine(lic.id, machine_hash=sha("m-2").upper())
    assert [r["machine_hash"] for r in live.services.store.machine_rows(lic.id)] == [sha("m-3"), sha("m-4")]
    with pytest.raises(AdminError):
        driver.remove_machine(lic.id, machine_id="m-2")  # already gone

    reset = driver.action("reset-machines", lic.id)
    assert reset["removed"] == 2
    assert reset["license"]["machines_used"] == 0
    assert live.services.store.count_machines(lic.id) == 0


def test_resend_queues_the_key_mail(driver: Driver, live: Live) -> None:
    lic = live.issue_license(email="resend@example.com")
    answer = driver.action("resend", lic.id)
    assert answer["mail"]["to"] == "resend@example.com"
    outbox = live.services.store.outbox_for_license(lic.id)
    assert [(o["id"], o["kind"], o["to_addr"], o["status"]) for o in outbox] == [
        (answer["mail"]["id"], "license_key_resend", "resend@example.com", "pending")
    ]
    driver.action("resend", lic.id)
    assert len(live.services.store.outbox_for_license(lic.id)) == 2


def test_events_by_status(driver: Driver, live: Live) -> None:
    store = live.services.store
    add_event(store, "evt_fail_old", status="failed", received_at=T0 - 100, error="no plan")
    add_event(store, "evt_fail_new", status="failed", received_at=T0, error="db locked")
    add_event(store, "evt_ignored", status="ignored", received_at=T0)
    add_event(store, "evt_applied", status="applied", received_at=T0)
    failed = driver.events()
    assert [e["id"] for e in failed["events"]] == ["evt_fail_new", "evt_fail_old"]
    assert failed["events"][0]["error"] == "db locked"
    assert [e["id"] for e in driver.events(status="ignored")["events"]] == ["evt_ignored"]
    assert [e["id"] for e in driver.events(status="failed", limit=1)["events"]] == ["evt_fail_new"]


def test_stats(driver: Driver, live: Live) -> None:
    store = live.services.store
    far, past = epoch("2031-01-01T00:00:00Z"), epoch("2025-01-01T00:00:00Z")
    live.issue_license(expires_at=far, days=None)
    suspended = live.issue_license(expires_at=far, days=None)
    live.issue_license("pro-year")
    live.issue_license("lifetime")
    live.issue_license("basic-monthly", expires_at=past, days=None)
    driver.action("suspend", suspended.id)
    now = driver.now()
    add_event(store, "evt_today_1", status="applied", received_at=now)
    add_event(store, "evt_today_2", status="failed", received_at=now)
    add_event(store, "evt_long_ago", status="applied", received_at=now - 3 * DAY)
    with store.atomic():
        for _ in range(2):
            store.enqueue_mail(suspended.id, "license_key", "buyer@example.com", None, now)
        store.execute("UPDATE outbox SET status = 'failed' WHERE id = (SELECT MIN(id) FROM outbox)")

    answer = driver.stats()

    assert answer["licenses"]["total"] == 5
    assert answer["licenses"]["by_plan"] == {
        "basic-monthly": 1,
        "lifetime": 1,
        "pro-monthly": 2,
        "pro-year": 1,
    }
    assert answer["licenses"]["by_state"] == {"EXPIRED": 1, "SUSPENDED": 1, "VALID": 3}
    assert answer["stripe_events_today"]["by_status"] == {"applied": 1, "failed": 1}
    assert answer["outbox"] == {"failed": 1, "pending": 1}


def test_audit_trail_records_actor_before_and_after(driver: Driver, live: Live) -> None:
    lic = live.issue_license("team-monthly", days=30)
    assert validate(live, live.key_of(lic), "m-audit")["activated"] is True
    driver.extend(lic.id, days=5)
    driver.action("suspend", lic.id)
    driver.action("reinstate", lic.id)
    driver.remove_machine(lic.id, machine_id="m-audit")
    driver.action("resend", lic.id)
    driver.action("revoke", lic.id)

    entries = driver.audit(license_id=lic.id)["entries"]

    assert [e["action"] for e in entries] == [
        "license.revoke",
        "license.resend",
        "license.remove_machine",
        "license.reinstate",
        "license.suspend",
        "license.extend",
        "license.issue",
    ]
    assert {e["actor"] for e in entries[:-1]} == {driver.actor}
    changes = {e["action"]: (e["before"], e["after"]) for e in entries}
    before, after = changes["license.extend"]
    assert (before["paid_through"], after["paid_through"]) == (
        "2027-02-14T08:00:00Z",
        "2027-02-19T08:00:00Z",
    )
    before, after = changes["license.suspend"]
    assert (before["license_status"], after["license_status"]) == ("active", "suspended")
    before, after = changes["license.remove_machine"]
    assert (before["machines_used"], after["machines_used"]) == (1, 0)
    before, after = changes["license.revoke"]
    assert (before["entitlement"], after["entitlement"]) == ("VALID", "REVOKED")
    assert all("key" not in (e["after"] or {}) for e in entries)
    # the trail filters by actor, and pages backwards
    mine = driver.audit(actor=driver.actor)["entries"]
    assert [e["id"] for e in mine] == [e["id"] for e in entries[:-1]]
    older = driver.audit(license_id=lic.id, before_id=entries[2]["id"], limit=2)["entries"]
    assert [e["id"] for e in older] == [entries[3]["id"], entries[4]["id"]]


# --- the command line's own manners ----------------------------------------------------------


def test_cli_readable_output_and_one_line_errors(live: Live) -> None:
    cli = CliDriver(live.services.config)
    lic = live.issue_license(email="lines@example.com")
    done = cli.run("find", "lines@example.com")
    assert done.returncode == 0
    first = done.stdout.splitlines()[0].split("  ")
    assert first[:4] == [lic.id, "pro-monthly", "VALID", "lines@example.com"]

    issued = cli.run("issue", "--email", "key@example.com", "--plan", "pro-year")
    assert issued.returncode == 0
    printed = issued.stdout.strip()
    assert validate(live, printed)["code"] == "VALID"

    failed = cli.run("suspend", "lic_missing")
    assert failed.returncode != 0
    assert failed.stderr.strip() == "licensed: no license lic_missing"


# --- HTTP: tokens, bodies, the API description --------------------------------------------------


def _path(route_path: str, license_id: str) -> str:
    return route_path.replace("{license_id}", license_id).replace("{event_id}", "evt_test")


def _guarded(live: Live) -> list[tuple[str, str, str]]:
    """(method, path, token) for every route behind the admin or internal token."""
    app = App(live.services)
    lic = live.issue_license()
    routes = [
        (r.method, _path(r.path, lic.id), r.auth)
        for r in app.router.routes
        if r.auth in ("admin", "internal")
    ]
    assert {a for _, _, a in routes} == {"admin", "internal"}
    return [(m, p, ADMIN_TOKEN if a == "admin" else INTERNAL_KEY) for m, p, a in routes]


def _near_misses(token: str) -> list[dict[str, str]]:
    flip = "a" if token[-1] != "a" else "b"
    first = "Z" if token[0] != "Z" else "Y"
    return [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Bearer {token[:-1]}{flip}"},  # same length, last char off
        {"Authorization": f"Bearer {first}{token[1:]}"},  # same length, first char off
        {"Authorization": f"Bearer {token[:-1]}"},  # a prefix
        {"Authorization": f"Bearer {token[:8]}"},  # a short prefix
        {"Authorization": f"Bearer {token}x"},  # longer
        {"Authorization": f"Basic {token}"},
        {"Authorization": "Bearer "},
        {"Authorization": token},
    ]


def test_every_guarded_route_refuses_a_missing_wrong_or_near_miss_token(live: Live) -> None:
    guarded = _guarded(live)
    assert len(guarded) >= 15
    addresses = (f"10.0.{n // 250}.{n % 250 + 1}" for n in itertools.count())
    for method, path, token in guarded:
        for headers in _near_misses(token):
            # Each attempt from its own address (through the trusted proxy): failed attempts
            # from one address meet a 429, tested below.
            headers = {**headers, "X-Forwarded-For": next(addresses)}
            answer = live.http.request(method, live.url + path, headers=headers, timeout=10)
            assert answer.status_code == 401, (method, path, headers)
            assert answer.json()["error"]["code"] == "UNAUTHORIZED"
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
        # and the other service's token does not open it
        other = INTERNAL_KEY if token == ADMIN_TOKEN else ADMIN_TOKEN
        headers = {"Authorization": f"Bearer {other}", "X-Forwarded-For": next(addresses)}
        answer = live.http.request(method, live.url + path, headers=headers)
        assert answer.status_code == 401, (method, path)


def test_failed_tokens_from_one_address_meet_a_429(live: Live) -> None:
    """Guessing the admin token is slowed like any abuse: RATE_LIMIT_PER_MINUTE wrong tries, then 429."""
    wrong = {"Authorization": "Bearer not-the-admin-token-0123456789abcdef"}
    budget = live.services.config.rate_limit_per_minute
    codes = [live.get("/api/admin/stats", headers=wrong).status_code for _ in range(budget)]
    assert codes == [401] * budget
    refused = live.get("/api/admin/stats", headers=wrong)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "RATE_LIMITED"
    other = live.get("/api/admin/stats", headers={**wrong, "X-Forwarded-For": "10.9.9.9"})
    assert other.status_code == 401  # another address has its own budget
    right = live.get("/api/admin/stats", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert right.status_code == 200  # the right token is never slowed


def test_the_right_token_opens_the_route(live: Live) -> None:
    answer = live.get("/api/admin/stats", headers={"Authorization": f"bearer {ADMIN_TOKEN}"})
    assert answer.status_code == 200
    assert answer.json()["licenses"]["total"] == 0


@pytest.mark.parametrize(
    ("tokens", "off"),
    [
        ({}, {"admin": "ADMIN_DISABLED", "internal": "INTERNAL_API_DISABLED"}),
        ({"admin_token": ADMIN_TOKEN}, {"internal": "INTERNAL_API_DISABLED"}),
        ({"internal_api_key": INTERNAL_KEY}, {"admin": "ADMIN_DISABLED"}),
    ],
)
def test_routes_are_off_while_their_token_is_unset(
    tokens: dict[str, str], live: Live, off: dict[str, str]
) -> None:
    app = App(live.services)
    lic = live.issue_license()
    for route in app.router.routes:
        if route.auth not in ("admin", "internal"):
            continue
        token = ADMIN_TOKEN if route.auth == "admin" else INTERNAL_KEY
        answer = live.http.request(
            route.method,
            live.url + _path(route.path, lic.id),
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        if route.auth in off:
            assert answer.status_code == 403, route.path
            assert answer.json()["error"]["code"] == off[route.auth]
        else:
            assert answer.status_code != 403, route.path


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("POST", "/api/admin/licenses", {"email": "nope", "plan": "pro-year"}, 400, "VALIDATION_ERROR"),
        ("POST", "/api/admin/licenses", {"email": "a@example.com"}, 400, "VALIDATION_ERROR"),
        ("POST", "/api/admin/licenses", {"email": "a@example.com", "plan": "gold"}, 404, "NOT_FOUND"),
        ("POST", "/api/admin/licenses", {"email": "a@example.com", "plan": "pro-year", "days": 0}, 400, None),
        ("POST", "/api/admin/licenses", [1, 2], 400, "VALIDATION_ERROR"),
        ("POST", "/api/admin/licenses/{id}/extend", {"days": 3, "paid_through": "2031-01-01"}, 400, None),
        ("POST", "/api/admin/licenses/{id}/extend", {}, 400, "VALIDATION_ERROR"),
        ("POST", "/api/admin/licenses/{id}/extend", {"paid_through": "soon"}, 400, "VALIDATION_ERROR"),
        ("POST", "/api/admin/licenses/{id}/extend", {"days": "3"}, 400, "VALIDATION_ERROR"),
        ("POST", "/api/admin/licenses/{id}/remove-machine", {"machine_hash": "abc"}, 400, None),
        ("POST", "/api/admin/licenses/{id}/remove-machine", {}, 400, "VALIDATION_ERROR"),
        ("POST", "/api/admin/licenses/lic_missing/suspend", None, 404, "LICENSE_NOT_FOUND"),
        ("GET", "/api/admin/licenses?emial=a@example.com", None, 400, "VALIDATION_ERROR"),
        ("GET", "/api/admin/licenses?key=DC-PRO-garbage", None, 400, "INVALID_KEY"),
        ("GET", "/api/admin/events?status=lost", None, 400, "VALIDATION_ERROR"),
        ("GET", "/api/admin/events?limit=ten", None, 400, "VALIDATION_ERROR"),
        ("GET", "/api/admin/events?limit=0", None, 400, "VALIDATION_ERROR"),
        ("GET", "/api/admin/audit?before_id=x", None, 400, "VALIDATION_ERROR"),
        ("DELETE", "/api/admin/licenses/{id}", None, 405, "METHOD_NOT_ALLOWED"),
    ],
)
def test_bad_admin_requests_get_error_bodies(
    live: Live, method: str, path: str, body: Any, status: int, code: str | None
) -> None:
    lic = live.issue_license()
    answer = live.http.request(
        method,
        live.url + path.replace("{id}", lic.id),
        json=body,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    )
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["code"] == (code or error["code"]) and error["message"]
    assert live.license(lic.id).updated_at == lic.updated_at  # nothing changed


def test_openapi_documents_the_admin_and_internal_routes(live: Live) -> None:
    doc = live.get("/openapi.json").json()
    app = App(live.services)
    for route in app.router.routes:
        if route.auth not in ("admin", "internal"):
            continue
        operation = doc["paths"][route.path][route.method.lower()]
        assert operation["security"] == [{route.auth: []}]
        if route.body is not None:
            documented = operation["requestBody"]["content"]["application/json"]["schema"]
            assert documented == openapi._as_checked(route.body)
    find = doc["paths"]["/api/admin/licenses"]["get"]
    assert {p["name"] for p in find["parameters"] if p["in"] == "query"} == set(admin.FIND_FIELDS)


# --- POST /api/licenses/generate -------------------------------------------------------------------


def generate(live: Live, body: Any) -> requests.Response:
    return live.post("/api/licenses/generate", body, headers={"Authorization": f"Bearer {INTERNAL_KEY}"})


def test_generate_issues_a_license_with_its_key(live: Live) -> None:
    answer = generate(live, {"email": "svc@example.com", "plan": "pro-year", "send_email": True})
    assert answer.status_code == 201
    view = answer.json()["license"]
    assert (view["plan"], view["tier"], view["machines_used"]) == ("pro-year", "PRO", 0)
    assert "email" not in view
    assert validate(live, view["key"], "svc-machine")["code"] == "VALID"
    row = live.license(view["id"])
    assert (row.source, row.paid_through) == ("internal", T0 + 365 * DAY)
    outbox = live.services.store.outbox_for_license(view["id"])
    assert [(o["kind"], o["to_addr"]) for o in outbox] == [("license_key", "svc@example.com")]
    trail = live.services.store.audit_entries(license_id=view["id"], actor=None, before_id=None, limit=5)
    assert [(a["action"], a["actor"]) for a in trail] == [("license.issue", "internal-api-key")]


def test_generate_by_product_and_tier_with_expiry_and_seats(live: Live) -> None:
    answer = generate(
        live,
        {
            "email": "svc@example.com",
            "product": "desktop",
            "tier": "PRO",
            "expires_at": T0 + 90 * DAY,
            "max_machines": 5,
        },
    )
    assert answer.status_code == 201
    view = answer.json()["license"]
    assert (view["plan"], view["max_machines"]) == ("desktop-pro", 5)
    assert live.license(view["id"]).paid_through == T0 + 90 * DAY
    assert live.services.store.outbox_for_license(view["id"]) == []
    assert view["key"].startswith("DT-PRO-")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"email": "svc@example.com"}, 400),
        ({"email": "svc@example.com", "plan": "pro-year", "product": "desktop", "tier": "PRO"}, 400),
        ({"email": "svc@example.com", "product": "desktop"}, 400),
        ({"email": "svc@example.com", "product": "desktop", "tier": "GOLD"}, 404),
        ({"email": "svc@example.com", "plan": "gold"}, 404),
        ({"email": "svc@example.com", "plan": "pro-monthly"}, 400),
        ({"email": "svc@example.com", "plan": "pro-year", "expires_at": "2020-01-01"}, 400),
        ({"email": "svc@example.com", "plan": "pro-year", "max_machines": 0}, 400),
        ({"email": "svc@example.com", "plan": "pro-year", "send_email": "yes"}, 400),
        ({"email": "svc at example.com", "plan": "pro-year"}, 400),
    ],
)
def test_generate_rejects_bad_bodies(live: Live, body: dict[str, Any], status: int) -> None:
    answer = generate(live, body)
    assert answer.status_code == status
    assert answer.json()["error"]["message"]
    assert live.services.store.one("SELECT COUNT(*) FROM licenses")[0] == 0


# --- the debug export -----------------------------------------------------------------------------


def _secrets_of(services: Services) -> list[str]:
    """Every form a signing key's private seed could take in the output."""
    forms = []
    for path in services.config.keys_dir.glob(f"*{keys.KEY_SUFFIX}"):
        stored = json.loads(path.read_text())["seed"]
        raw = nacl.encoding.URLSafeBase64Encoder.decode(stored.encode())
        forms += [stored, base64.b64encode(raw).decode(), raw.hex(), stored.rstrip("=")]
    return forms


@pytest.fixture
def two_signing_keys(data_dir: Path) -> None:
    """A retired and a current signing key, made before the server starts."""
    keys.create_key(data_dir / "keys", now=T0 - DAY)
    keys.create_key(data_dir / "keys", now=T0)


def test_debug_export_streams_everything_but_secrets(two_signing_keys: None, live: Live) -> None:
    services = live.services
    store = services.store
    assert len(services.ring.keys) == 2
    licenses = [live.issue_license("team-monthly", email=f"user{i}@example.com") for i in range(3)]
    machine_ids = ["raw-machine-id-alpha", "raw-machine-id-beta"]
    for machine in machine_ids:
        validate(live, live.key_of(licenses[0]), machine)
    license_keys = [live.key_of(x) for x in licenses]
    client_secret = "cs_test_a1YS1URl_secret_Zm9vYmFyc2VjcmV0"
    add_event(
        store,
        "evt_export",
        status="applied",
        received_at=T0,
        license_id=licenses[0].id,
        payload=checkout_completed(
            "evt_export", client_secret=client_secret, note=license_keys[1], email="x@y.co"
        ),
    )
    with store.atomic():
        store.put_setting("stripe.webhook_secret", "whsec_doNotLeakThisValue123", T0)
        store.enqueue_mail(licenses[0].id, "license_key", "user0@example.com", None, T0)
    live.post(
        f"/api/admin/licenses/{licenses[2].id}/suspend",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )

    answer = live.http.get(
        live.url + "/api/admin/debug/store",
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        stream=True,
        timeout=10,
    )
    assert answer.status_code == 200
    assert "Content-Length" not in answer.headers
    assert answer.headers.get("Transfer-Encoding") == "chunked"
    raw = b"".join(answer.iter_content(chunk_size=None))
    data = json.loads(raw)

    tables = data["tables"]
    assert {x["id"] for x in tables["licenses"]} == {x.id for x in licenses}
    assert {m["machine_hash"] for m in tables["machines"]} == {sha(m) for m in machine_ids}
    assert [e["id"] for e in tables["stripe_events"]] == ["evt_export"]
    session = tables["stripe_events"][0]["payload"]["data"]["object"]
    assert session["customer_details"]["email"] == "x@y.co"
    assert session["client_secret"] == MASK
    assert "stripe.webhook_secret" in [s["key"] for s in tables["settings"]]
    assert all(set(s) == {"key", "updated_at"} for s in tables["settings"])
    assert [a["action"] for a in tables["audit_log"]][-2:] == ["license.suspend", "store.export"]
    assert len(tables["outbox"]) == 1
    forbidden = [
        *_secrets_of(services),
        *license_keys,
        *[k.rsplit(".", 1)[-1] for k in license_keys],
        *[k.split("-", 2)[2] for k in license_keys],
        *machine_ids,
        client_secret,
        "whsec_doNotLeakThisValue123",
    ]
    for secret in forbidden:
        assert secret.encode() not in raw, secret


def test_export_is_one_json_document_in_many_chunks(services: Services) -> None:
    for i in range(7):
        issue_license(services, "pro-year", email=f"c{i}@example.com")
    body = export.export(services, "admin-token", services.now(), chunk_rows=2)
    chunks = list(body)
    body.close()
    assert len(chunks) > 7
    data = json.loads(b"".join(chunks))
    assert len(data["tables"]["licenses"]) == 7
    assert data["exported_by"] == "admin-token"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            {"client_secret": "x", "nested": [{"api_key": "k", "fine": 1}]},
            {"client_secret": MASK, "nested": [{"api_key": MASK, "fine": 1}]},
        ),
        ("DC-PRO-eyJhbGciOi.eyJzdWIi.c2ln", MASK),
        ("sk_live_51Habc", MASK),
        ("whsec_abc", MASK),
        ("cs_live_a1b2c3d4e5", MASK),
        ("buyer@example.com", "buyer@example.com"),
        (42, 42),
    ],
)
def test_scrub(value: Any, expected: Any) -> None:
    assert Redactor().clean(value) == expected


# --- invariants over all inputs --------------------------------------------------------------------

_HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=80)


@settings(max_examples=300, deadline=None)
@given(presented=_HEADER_TEXT)
def test_the_guard_admits_exactly_the_configured_token(presented: str) -> None:
    guard = guards.bearer_guard(lambda: ADMIN_TOKEN, "ADMIN_DISABLED", "ADMIN_TOKEN")
    environ = {"REQUEST_METHOD": "GET", "HTTP_AUTHORIZATION": f"Bearer {presented}"}
    request = Request(environ, {}, 0)
    if presented.strip() == ADMIN_TOKEN:
        guard(request)
    else:
        with pytest.raises(Unauthorized):
            guard(request)


def _containers(value: Any) -> Iterator[list[Any] | dict[str, Any]]:
    if isinstance(value, list | dict):
        yield value
        for item in value.values() if isinstance(value, dict) else value:
            yield from _containers(item)


_JSONISH = st.recursive(
    st.none() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(document=_JSONISH, choice=st.integers(min_value=0, max_value=1000))
def test_scrub_removes_a_license_key_hidden_anywhere(document: Any, choice: int) -> None:
    key = "DC-PRO-eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJsaWNfeCJ9.c2lnbmF0dXJl"
    containers = list(_containers(document))
    if not containers:
        document = [document, key]
    else:
        target = containers[choice % len(containers)]
        if isinstance(target, list):
            target.insert(choice % (len(target) + 1), key)
        else:
            target[f"planted{choice}"] = key
    assert key in json.dumps(document)
    assert key not in json.dumps(Redactor().clean(document))
