"""Customers free their own seats: machine labels, the machines list, release by id, stale seats.

A server dies or is reinstalled: its installation cannot deactivate itself, and
the new one meets TOO_MANY_MACHINES. Another installation holding the key lists
the machines and releases the dead one by its id; and a plan's
``release_after_days`` frees a seat nobody has used for that long.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from support.clock import DAY, T0
from support.live import Live
from support.oidc_provider import AUDIENCE, Provider, ec_key
from support.server_proc import run_cli

from licensed import keys
from licensed.config import Config
from licensed.oidc import OidcVerifier

ADMIN = "adm_machines_0123456789abcdefghijkl"


@pytest.fixture
def config(data_dir: Path) -> Config:
    return Config(data_dir=data_dir, app_base_url="http://licensed.test", admin_token=ADMIN)


def post(live: Live, action: str, body: dict[str, Any]) -> dict[str, Any]:
    answer = live.post(f"/api/license/{action}", body)
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()
    return data


def test_a_dead_machine_is_released_from_another_and_the_new_one_activates(live: Live) -> None:
    key = live.issue("pro-monthly", days=30)  # one seat
    assert post(live, "activate", {"key": key, "machine_id": "old-server", "label": "web-1"})["activated"]
    refused = post(live, "activate", {"key": key, "machine_id": "new-server", "label": "web-1 (reinstalled)"})
    assert refused["code"] == "TOO_MANY_MACHINES"

    [machine] = post(live, "machines", {"key": key})["machines"]
    assert machine["label"] == "web-1" and machine["id"].startswith("mch_")
    assert machine["activated_at"] == machine["last_seen_at"] == "2027-01-15T08:00:00Z"
    assert "old-server" not in machine["id"] and keys.machine_hash("old-server")[:12] not in machine["id"]

    released = post(live, "deactivate", {"key": key, "machine": machine["id"]})
    assert (released["code"], released["deactivated"], released["license"]["machines_used"]) == (
        "DEACTIVATED",
        True,
        0,
    )
    again = post(live, "deactivate", {"key": key, "machine": machine["id"]})
    assert again["code"] == "MACHINE_NOT_ACTIVATED"
    fresh = post(live, "activate", {"key": key, "machine_id": "new-server", "label": "web-1 (reinstalled)"})
    assert (fresh["code"], fresh["activated"]) == ("VALID", True)
    assert [m["label"] for m in post(live, "machines", {"key": key})["machines"]] == ["web-1 (reinstalled)"]


def test_a_machine_id_from_another_licence_releases_nothing(live: Live) -> None:
    mine, theirs = (
        live.issue("pro-monthly", days=30),
        live.issue("pro-monthly", days=30, email="o@example.com"),
    )
    post(live, "activate", {"key": theirs, "machine_id": "their-server"})
    [their_machine] = post(live, "machines", {"key": theirs})["machines"]
    answer = post(live, "deactivate", {"key": mine, "machine": their_machine["id"]})
    assert answer["code"] == "MACHINE_NOT_ACTIVATED"
    assert len(post(live, "machines", {"key": theirs})["machines"]) == 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"key": "DC-PRO-x"}, "exactly one of machine_id or machine"),
        (
            {"key": "DC-PRO-x", "machine_id": "m", "machine": "mch_abc"},
            "exactly one of machine_id or machine",
        ),
        ({"key": "DC-PRO-x", "machine": "not-an-id"}, "machine"),
    ],
)
def test_deactivate_names_one_machine(live: Live, body: dict[str, Any], message: str) -> None:
    answer = live.post("/api/license/deactivate", body)
    assert answer.status_code == 400 and message in answer.json()["error"]["message"]


def test_a_bad_key_lists_no_machines(live: Live) -> None:
    assert post(live, "machines", {"key": "DC-PRO-eyJhbGciOiJub25lIn0.e30."}) == {
        "valid": False,
        "code": "INVALID_KEY",
        "machines": [],
    }


def test_labels_are_printable_and_short(live: Live) -> None:
    key = live.issue("pro-monthly", days=30)
    for label in ("x" * 65, "tab\there", "\u202eevil"):
        answer = live.post("/api/license/activate", {"key": key, "machine_id": "m", "label": label})
        assert answer.status_code == 400, label


def test_a_seat_unused_for_the_plans_days_is_free_again(live: Live, data_dir: Path) -> None:
    plans = live.services.catalog.plans
    plans["pro-monthly"] = replace(plans["pro-monthly"], release_after_days=30)
    key = live.issue("pro-monthly", days=365)
    assert post(live, "activate", {"key": key, "machine_id": "laptop"})["activated"]
    live.clock.set(T0 + 29 * DAY)
    assert post(live, "activate", {"key": key, "machine_id": "desktop"})["code"] == "TOO_MANY_MACHINES"
    live.clock.set(T0 + 30 * DAY + 60)  # the laptop was last seen 30 days ago
    assert post(live, "machines", {"key": key})["machines"] == []
    desktop = post(live, "activate", {"key": key, "machine_id": "desktop"})
    assert (desktop["code"], desktop["license"]["machines_used"]) == ("VALID", 1)
    laptop = post(live, "activate", {"key": key, "machine_id": "laptop"})  # back: like a new machine
    assert laptop["code"] == "TOO_MANY_MACHINES"


def test_a_machine_in_use_keeps_its_seat_past_the_days(live: Live) -> None:
    plans = live.services.catalog.plans
    plans["pro-monthly"] = replace(plans["pro-monthly"], release_after_days=30)
    key = live.issue("pro-monthly", days=365)
    for day in range(0, 90, 20):
        live.clock.set(T0 + day * DAY)
        assert post(live, "validate", {"key": key, "machine_id": "always-on"})["activated"]
    assert post(live, "activate", {"key": key, "machine_id": "another"})["code"] == "TOO_MANY_MACHINES"


# --- linking a signed-in user whose token carries no e-mail -----------------------------------------


def test_admin_link_shows_a_hand_issued_licence_to_its_user(live: Live, tmp_path: Path) -> None:
    provider = Provider(ec_key("link-es384"))
    try:
        config = replace(live.services.config, oidc_issuer=provider.issuer, oidc_audience=AUDIENCE)
        live.services.config = config
        live.services.oidc = OidcVerifier.from_config(config)
        live.issue_license("pro-monthly", days=30, email="Owner@Example.com")
        token = provider.token(int(live.clock()), sub="logto-user-77")  # no e-mail claim
        headers = {"Authorization": f"Bearer {token}"}
        assert live.get("/api/subscriptions/status", headers=headers).json()["status"] == "none"

        env = {"DATA_DIR": str(live.services.config.data_dir), "PATH": "/usr/bin:/bin", "HOME": "/tmp"}
        done = run_cli(env, "admin", "link", "--sub", "logto-user-77", "--email", "owner@example.com")
        assert done.returncode == 0, done.stderr
        assert live.get("/api/subscriptions/status", headers=headers).json()["status"] == "active"

        via_api = live.post(
            "/api/admin/identities",
            {"sub": "logto-user-77", "email": "owner@example.com"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert via_api.status_code == 200 and via_api.json()["linked"] == []  # already linked
        unknown = live.post(
            "/api/admin/identities",
            {"sub": "x", "email": "nobody@example.com"},
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "CUSTOMER_NOT_FOUND")
    finally:
        provider.stop()
