"""Regressions of an adversarial review of the running server: one test per finding.

Findings whose tests live with their subject elsewhere: weak and equal bearer
tokens (test_config_cli), failed tokens rate-limited (test_admin), the billing
portal for the signed-in customer only and rate-limited (test_checkout), mail
header injection through encoded words (test_mail_delivery), /health never
committing (test_storage_faults), file modes under umask 022 (test_serve),
OIDC token types and discovery (test_oidc).
"""

from __future__ import annotations

import json
import resource
import socket
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from support import stripe_events as se
from support.clock import DAY, T0
from support.live import Live
from support.server_proc import ServerProcess, make_data_dir, run_cli

from licensed import keys
from licensed.checkout import KEY_SHOWN_SECONDS
from licensed.config import Config
from licensed.plans import MAX_MACHINES
from licensed.redact import MASK
from licensed.routes.stripe import WEBHOOK_MAX_BODY

HELD = 1100


@pytest.fixture
def config(data_dir: Path) -> Config:
    return Config(
        data_dir=data_dir,
        app_base_url="http://licensed.test",
        stripe_webhook_secrets=(se.SECRET,),
        admin_token="adm_hardening_0123456789abcdefghij",
    )


def deliver(live: Live, event: dict[str, Any]) -> requests.Response:
    body, headers = se.signed(event, int(live.clock()))
    return live.http.post(live.url + "/api/stripe/webhook", data=body, headers=headers, timeout=30)


# --- 1. one client holding many half-sent requests -------------------------------------------------


@pytest.fixture
def descriptors() -> Iterator[None]:
    """Room in this process for the held connections (the server raises its own limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = HELD + 200
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard file limit ({hard}) is below {wanted}: cannot hold {HELD} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_held_connections_neither_crash_the_server_nor_starve_health(
    tmp_path: Path, descriptors: None
) -> None:
    """1,100 connections each sending half a request and waiting: the server keeps answering
    /health on a new connection and is alive afterwards (select() died past descriptor 1023)."""
    server = ServerProcess(make_data_dir(tmp_path / "data"))
    server.start()
    held: list[socket.socket] = []
    try:
        partial = b"POST /api/license/validate HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"
        for _ in range(HELD):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
            sock.sendall(partial)
            held.append(sock)
        started = time.monotonic()
        health = requests.get(server.url + "/health", timeout=10)
        assert health.status_code == 200
        assert time.monotonic() - started < 5
        assert server.proc is not None and server.proc.poll() is None
    finally:
        for sock in held:
            sock.close()
    assert requests.get(server.url + "/health", timeout=10).status_code == 200
    assert server.proc is not None and server.proc.poll() is None
    server.stop()
    assert "ValueError" not in server.stderr() and "Traceback" not in server.stderr()


# --- 3. the debug export and the checkout page's key -------------------------------------------------


def test_the_export_masks_checkout_session_ids_and_lists_every_column(live: Live) -> None:
    session_id = "cs_test_a1B2c3D4e5F6g7H8i9J0kLmNoPqRsTuVwXyZ"
    session = se.checkout_session(
        session_id=session_id, mode="payment", payment_intent="pi_x", plan="pro-year"
    )
    assert deliver(live, se.event("checkout.session.completed", session, T0)).status_code == 200
    answer = live.get(
        "/api/admin/debug/store", headers={"Authorization": f"Bearer {live.services.config.admin_token}"}
    )
    assert answer.status_code == 200
    assert session_id not in answer.text and session_id[8:] not in answer.text
    tables = answer.json()["tables"]
    [lic] = tables["licenses"]
    assert lic["stripe_checkout_session_id"] == MASK
    columns = {row[1] for row in live.services.store.all("PRAGMA table_info(licenses)")}
    assert set(lic) == columns
    assert {"snapshot_version", "status_version", "ended_at"} <= set(lic)
    assert "stripe_state_at" not in lic


def test_the_checkout_page_shows_the_key_for_a_day_only(live: Live) -> None:
    session_id = "cs_test_keyfor24hours0123456789"
    session = se.checkout_session(
        session_id=session_id, mode="payment", payment_intent="pi_y", plan="pro-year"
    )
    assert deliver(live, se.event("checkout.session.completed", session, T0)).status_code == 200
    live.clock.set(T0 + KEY_SHOWN_SECONDS)
    fresh = live.get(f"/api/checkout/session/{session_id}").json()
    assert fresh["status"] == "complete" and fresh["license"]["key"].startswith("DC-PRO-")
    live.clock.set(T0 + KEY_SHOWN_SECONDS + 1)
    late = live.get(f"/api/checkout/session/{session_id}").json()
    assert late["status"] == "complete" and "key" not in late["license"] and late["key_expired"] is True


# --- 6. terminal escapes in human-readable output ----------------------------------------------------


def test_cli_output_escapes_control_characters(live: Live) -> None:
    name = "Eve\x1b]0;owned\x07\x1b[2J"
    lic = live.issue_license("pro-year", email="eve@example.com")
    live.services.store.execute("UPDATE customers SET name = ? WHERE id = ?", (name, lic.customer_id))
    env = {"DATA_DIR": str(live.services.config.data_dir), "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
    done = run_cli(env, "admin", "show", lic.id)
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "Eve\\x1b]0;owned\\x07\\x1b[2J" in done.stdout
    as_json = run_cli(env, "admin", "show", lic.id, "--json")
    assert json.loads(as_json.stdout)["license"]["name"] == name  # JSON escapes them itself


# --- 9. smaller defects --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("host-A", "host-A "),
        ("host-A", "  host-A  "),
        (unicodedata.normalize("NFC", "serveur-é"), unicodedata.normalize("NFD", "serveur-é")),
    ],
)
def test_one_machine_however_its_id_is_spelled(live: Live, first: str, second: str) -> None:
    key = live.issue("pro-monthly", days=30)
    one = live.post("/api/license/activate", {"key": key, "machine_id": first}).json()
    again = live.post("/api/license/activate", {"key": key, "machine_id": second}).json()
    assert (one["code"], again["code"]) == ("VALID", "VALID")
    assert again["license"]["machines_used"] == 1


def test_a_machine_stored_before_ids_were_canonical_keeps_its_seat(live: Live) -> None:
    lic = live.issue_license("pro-monthly", days=30)
    raw = "host-B "  # stored under the hash of the id exactly as it was sent
    live.services.store.add_machine(lic.id, keys.machine_hash(raw), T0 - DAY)
    answer = live.post("/api/license/validate", {"key": live.key_of(lic), "machine_id": raw}).json()
    assert (answer["code"], answer["activated"], answer["license"]["machines_used"]) == ("VALID", True, 1)
    rows = live.services.store.machine_rows(lic.id)
    assert [r["machine_hash"] for r in rows] == [keys.machine_hash("host-B")]  # now under the canonical hash


@pytest.mark.parametrize("blank", [" ", "\t\n"])
def test_a_blank_machine_id_is_refused(live: Live, blank: str) -> None:
    answer = live.post(
        "/api/license/activate", {"key": live.issue("pro-monthly", days=30), "machine_id": blank}
    )
    assert (answer.status_code, answer.json()["error"]["code"]) == (400, "VALIDATION_ERROR")


def test_quantity_cannot_raise_seats_past_the_cap(live: Live) -> None:
    sub = se.subscription(
        sub_id=se.uid("sub"),
        customer="cus_q",
        price="price_team_monthly",
        period_end=T0 + 30 * DAY,
        quantity=10**9,
    )
    assert deliver(live, se.event("customer.subscription.created", sub, T0)).status_code == 200
    lic = live.services.store.find_license("stripe_subscription_id", sub["id"])
    assert lic is not None and lic.max_machines == MAX_MACHINES


def test_webhooks_take_bodies_up_to_a_mebibyte(live: Live) -> None:
    """Real events can exceed the other routes' 64 KiB (a subscription with many items)."""
    sub = se.subscription(
        sub_id=se.uid("sub"), customer="cus_big", price="price_pro_monthly", period_end=T0 + 30 * DAY
    )
    sub["metadata"] = {f"note{n}": "x" * 450 for n in range(300)}  # about 150 KiB
    event = se.event("customer.subscription.created", sub, T0)
    assert live.services.config.max_body_bytes < len(json.dumps(event)) < WEBHOOK_MAX_BODY
    assert deliver(live, event).status_code == 200
    sub["metadata"] = {f"note{n}": "x" * 450 for n in range(2400)}  # over 1 MiB
    too_big = deliver(live, se.event("customer.subscription.created", sub, T0))
    assert (too_big.status_code, too_big.json()["error"]["code"]) == (413, "PAYLOAD_TOO_LARGE")
