"""Existing customers keep their keys: ``licensed admin import`` and what follows it.

The import runs as a real process (``python -m licensed admin import``) on the
data dir of a live server; the old keys are then presented to that server's
licence routes and admin API, and Stripe's events for an imported subscription
arrive as signed webhooks (and through the reconciler, from a Stripe double).
"""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import secrets
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from support import stripe_events as se
from support.clock import DAY, T0
from support.live import Live
from support.server_proc import run_cli
from support.stripe_double import stripe_double
from support.stripe_scenarios import HOUR, P1, P2, Stream

from licensed import keys, stripe_api, stripe_sync
from licensed.config import Config
from licensed.logs import JsonFormatter

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "adm_import_0123456789abcdef0123456789abcdef"
ISSUER = "http://licensed.test"


@pytest.fixture
def config(data_dir: Path) -> Config:
    return Config(
        data_dir=data_dir,
        app_base_url=ISSUER,
        stripe_webhook_secrets=(se.SECRET,),
        admin_token=ADMIN_TOKEN,
        rate_limit_per_minute=0,
    )


# --- helpers --------------------------------------------------------------------------------------


def run_import(live: Live, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m licensed admin import PATH`` on the live server's data dir."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": "/tmp",
        "DATA_DIR": str(live.services.config.data_dir),
        "APP_BASE_URL": ISSUER,
    }
    return run_cli(env, "admin", "import", str(path), *extra, timeout=120)


def write_lines(path: Path, lines: list[Any]) -> Path:
    """Each item as one line: dicts as JSON, strings as they are."""
    text = "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines)
    path.write_text(text, encoding="utf-8")
    return path


def iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def old_key(n: int) -> str:
    """Keys as other systems made them: any shape, some like ours, one like an e-mail address."""
    token = secrets.token_hex(10)
    shapes = [
        f"HMAC1.{n:04d}.{token}",
        f"DC-PRO-legacy{n}{token}",  # our prefix and tier, but no signature
        f"{token}-{n}-ÄÖÜ",
        f"k{n}.{token}@old-shop.example",
    ]
    return shapes[n % len(shapes)]


@dataclass
class Line:
    """One line of an import file, and what validation must say of its old key at T0."""

    record: dict[str, Any]
    code: str
    machines: list[str] = field(default_factory=list)


def licence_lines(count: int) -> list[Line]:
    """``count`` licences of every kind: subscriptions, one-time, lifetime, expired, with seats."""
    out = []
    for n in range(count):
        kind = n % 6
        machines = [f"machine-{n}-{i}-{secrets.token_hex(6)}" for i in range(kind % 3 + (kind == 2))]
        record: dict[str, Any] = {"email": f"buyer{n}@example.com", "key": old_key(n)}
        if kind == 0:
            record.update(plan="lifetime", machines=machines[:2], name=f"Buyer {n}")
            code = "VALID"
        elif kind == 1:
            record.update(plan="pro-monthly", expires_at=iso(T0 + 20 * DAY), machines=machines[:1])
            code = "VALID"
        elif kind == 2:
            record.update(plan="team-monthly", expires_at=T0 + 40 * DAY, machines=machines)
            code = "VALID"
        elif kind == 3:
            record.update(
                plan="pro-year",
                expires_at=iso(T0 + 200 * DAY),
                max_machines=5,
                created_at="2025-02-01T00:00:00Z",
            )
            code = "VALID"
        elif kind == 4:
            record.update(plan="desktop-pro", expires_at=iso(T0 - 5 * DAY), machines=machines[:1])
            code = "EXPIRED"
        else:
            record.update(plan="pro-monthly", lifetime=True, machines=machines[:1])  # a private lifetime one
            code = "VALID"
        out.append(Line(record, code, list(record.get("machines", []))))
    return out


def validate(live: Live, key: str, machine: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"key": key, **extra}
    if machine is not None:
        body["machine_id"] = machine
    answer = live.post("/api/license/validate", body)
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def admin_get(live: Live, path: str, **params: str) -> dict[str, Any]:
    answer = live.get(path, params=params, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert answer.status_code == 200, answer.text
    result: dict[str, Any] = answer.json()
    return result


def pyjwt_claims(key: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """What an installation does offline with the key it stored: verify it with the JWKS alone."""
    token = key.split("-", 2)[2]
    kid = jwt.get_unverified_header(token)["kid"]
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == kid]
    claims: dict[str, Any] = jwt.decode(
        token,
        jwt.PyJWK(jwk),
        algorithms=["EdDSA"],
        issuer=ISSUER,
        options={"verify_exp": False, "verify_iat": False},
    )
    return claims


def db_bytes(live: Live) -> bytes:
    """The SQLite file with its WAL and shared memory, as they are on disk."""
    db = live.services.config.db_path
    return b"".join(p.read_bytes() for p in sorted(db.parent.glob(db.name + "*")))


@pytest.fixture
def logged() -> Iterator[io.StringIO]:
    """Every log line the server writes while the test runs, as it would reach a file."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


# --- a few hundred licences, through the real server ------------------------------------------------


def test_imported_keys_validate_with_their_seats_and_get_the_signed_key(
    live: Live, tmp_path: Path, logged: io.StringIO
) -> None:
    lines = licence_lines(300)
    path = write_lines(tmp_path / "old.jsonl", [line.record for line in lines])
    done = run_import(live, path)
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip()
        == "imported 300, skipped as already there 0, refused 0 (of 300 lines in old.jsonl)"
    )
    assert done.stderr == ""  # no progress lines: stderr is not a terminal

    jwks = live.get("/.well-known/jwks.json").json()
    seen_ids = set()
    for line in lines:
        old = line.record["key"]
        machine = line.machines[0] if line.machines else None
        answer = validate(live, old, machine)
        assert answer["code"] == line.code, (line.record["plan"], answer)
        view = answer["license"]
        assert view["plan"] == line.record["plan"]
        # Imported machines hold their seats: validating one of them takes no new seat.
        assert view["machines_used"] == len(line.machines)
        assert view["max_machines"] == line.record.get("max_machines", view["max_machines"])
        if line.code != "VALID":
            assert "key" not in answer and "lease" not in answer
            continue
        assert answer["activated"] is (machine is not None)
        signed = answer["key"]
        assert signed.startswith("DT-" if line.record["plan"] == "desktop-pro" else "DC-")
        claims = pyjwt_claims(signed, jwks)
        assert claims["sub"] == view["id"] and claims["max"] == view["max_machines"]
        again = validate(live, signed, machine)
        assert (again["code"], again["license"]["id"], "key" in again) == ("VALID", view["id"], False)
        seen_ids.add(view["id"])
    assert len(seen_ids) == sum(line.code == "VALID" for line in lines)

    lifetime = lines[0]
    assert validate(live, lifetime.record["key"])["license"]["lifetime"] is True
    private = lines[5]
    assert validate(live, private.record["key"])["license"]["lifetime"] is True
    assert validate(live, lines[1].record["key"])["license"]["paid_through"] == iso(T0 + 20 * DAY)
    assert validate(live, lines[4].record["key"], product="dashcaddy")["code"] == "PRODUCT_MISMATCH"
    assert validate(live, lines[1].record["key"], product="dashcaddy")["code"] == "VALID"
    assert validate(live, lines[1].record["key"] + "x")["code"] == "INVALID_KEY"

    # No raw key or machine id reached the database file (WAL included), the output or the logs.
    stored = db_bytes(live)
    written = done.stdout + done.stderr + logged.getvalue()
    assert "/api/license/validate" in logged.getvalue()  # the capture does see the server's lines
    for line in lines:
        for secret in [line.record["key"], *line.machines]:
            assert secret.encode() not in stored, secret
            assert secret not in written, secret


def test_imported_machines_hold_their_seats_until_deactivated(live: Live, tmp_path: Path) -> None:
    old, machine = "legacy-" + secrets.token_hex(8), "host-A"
    record = {"email": "a@example.com", "plan": "pro-monthly", "key": old, "expires_at": T0 + DAY}
    path = write_lines(tmp_path / "one.jsonl", [{**record, "machines": [machine + " "]}])
    assert run_import(live, path).returncode == 0
    # One seat, held by the imported machine (its id trimmed like validation trims it).
    assert validate(live, old, "host-B")["code"] == "TOO_MANY_MACHINES"
    assert validate(live, old, machine)["activated"] is True
    gone = live.post("/api/license/deactivate", {"key": old, "machine_id": machine}).json()
    assert (gone["code"], gone["deactivated"], gone["license"]["machines_used"]) == ("DEACTIVATED", True, 0)
    assert "key" in gone  # deactivate hands the signed key over too
    again = live.post("/api/license/deactivate", {"key": old, "machine_id": machine}).json()
    assert again["code"] == "MACHINE_NOT_ACTIVATED"
    taken = live.post("/api/license/activate", {"key": old, "machine_id": "host-B"}).json()
    assert (taken["code"], taken["activated"], taken["license"]["machines_used"]) == ("VALID", True, 1)
    assert "lease" in taken
    assert validate(live, gone["key"], "host-B")["code"] == "VALID"  # the signed key shares the seat


def test_the_python_kit_moves_an_old_key_to_the_signed_key(live: Live, tmp_path: Path) -> None:
    """docs/integration.md: activate with the old key; the kit stores the signed key it is
    handed and from then on verifies offline."""
    sys.path.insert(0, str(ROOT / "clients" / "python"))
    import licensed_client as lc

    old = "old-shop-" + secrets.token_hex(8)
    record = {"email": "kit@example.com", "plan": "pro-monthly", "key": old, "expires_at": iso(T0 + 30 * DAY)}
    assert run_import(live, write_lines(tmp_path / "kit.jsonl", [record])).returncode == 0
    state_path = tmp_path / "license.json"
    client = lc.LicenseClient(
        live.url,
        live.get("/.well-known/jwks.json").json(),
        state_path,
        key_prefix="DC",
        product="dashcaddy",
        issuer=ISSUER,
        machine_id="kit-machine",
        now=live.clock,
        timeout=5,
    )
    assert client.activate(old).code == "VALID"
    state = json.loads(state_path.read_text())
    assert state["key"].startswith("DC-PRO-") and old not in state_path.read_text()
    offline = client.check_offline()
    assert (offline.code, offline.online) == ("VALID", False)
    assert client.validate().code == "VALID"  # with the signed key now
    assert validate(live, state["key"], "kit-machine")["license"]["machines_used"] == 1


# --- admin: found by e-mail and by old key; revoking revokes both keys ------------------------------------


def test_imported_licence_is_found_by_old_key_and_revoked_with_both_keys(live: Live, tmp_path: Path) -> None:
    lines = licence_lines(8)
    path = write_lines(tmp_path / "few.jsonl", [line.record for line in lines])
    assert run_import(live, path).returncode == 0
    target = lines[3]  # its old key looks like an e-mail address
    old = target.record["key"]
    assert "@" in old
    signed = validate(live, old)["key"]
    lic_id = validate(live, signed)["license"]["id"]

    by_key = admin_get(live, "/api/admin/licenses", key=old)
    by_guess = admin_get(live, "/api/admin/licenses", q=old)
    by_email = admin_get(live, "/api/admin/licenses", q=target.record["email"])
    for found in (by_key, by_guess, by_email):
        assert [x["id"] for x in found["licenses"]] == [lic_id]
        assert found["licenses"][0]["source"] == "import"
    assert by_guess["by"] == "key"
    for other in lines[:3]:  # keys of other shapes, through q
        assert admin_get(live, "/api/admin/licenses", q=other.record["key"])["count"] == 1
    shown = admin_get(live, f"/api/admin/licenses/{lic_id}")
    assert shown["imported_keys"] == 1 and shown["key"] == signed
    assert [a["action"] for a in shown["audit"]] == ["license.import"]

    env = {"DATA_DIR": str(live.services.config.data_dir), "PATH": os.environ.get("PATH", ""), "HOME": "/tmp"}
    cli = run_cli(env, "admin", "find", "--key", old, "--json")
    assert cli.returncode == 0, cli.stderr
    assert [x["id"] for x in json.loads(cli.stdout)["licenses"]] == [lic_id]
    assert old not in cli.stdout

    exported = live.get("/api/admin/debug/store", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert exported.status_code == 200
    rows = exported.json()["tables"]["imported_keys"]
    assert len(rows) == len(lines) and set(rows[0]) == {"license_id", "owner", "imported_at"}
    assert not any(line.record["key"] in exported.text for line in lines)

    revoked = live.post(
        f"/api/admin/licenses/{lic_id}/revoke", {}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    assert revoked.status_code == 200, revoked.text
    for key in (old, signed):
        answer = validate(live, key, "any-machine")
        assert (answer["code"], answer["valid"], "key" in answer) == ("REVOKED", False, False)
    assert validate(live, lines[2].record["key"])["code"] == "VALID"  # the others are untouched


# --- bad files are refused whole, every bad line named ----------------------------------------------------


def test_bad_lines_of_every_kind_refuse_the_whole_file(live: Live, tmp_path: Path) -> None:
    taken_key = "taken-" + secrets.token_hex(6)
    first = write_lines(
        tmp_path / "first.jsonl",
        [
            {"email": "x@example.com", "plan": "lifetime", "key": taken_key},
            {"email": "y@example.com", "plan": "pro-monthly", "key": "y-key-1", "expires_at": T0,
             "stripe_customer": "cus_y", "stripe_subscription": "sub_taken"},
        ],
    )  # fmt: skip
    assert run_import(live, first).returncode == 0
    signed = live.issue()
    before = live.services.store.all("SELECT COUNT(*) FROM licenses")[0][0]

    good = {"email": "ok@example.com", "plan": "pro-monthly", "expires_at": T0 + DAY}
    lines: list[Any] = [
        {**good, "key": "good-1"},  # 1
        {**good, "key": "k2", "plan": "no-such-plan"},  # 2 unknown plan
        {**good, "key": "k3", "email": "not an address"},  # 3 malformed e-mail
        {**good, "key": "k4", "expires_at": "next tuesday"},  # 4 malformed time
        {"email": "ok@example.com", "plan": "pro-monthly", "key": "k5"},  # 5 a subscription plan needs an end
        {**good, "key": "k6", "max_machines": 0},  # 6 seats out of range
        {**good, "key": "k7", "machines": "host-a"},  # 7 machines not a list
        {**good, "key": "k8", "machines": ["a", "b"]},  # 8 more machines than seats
        {**good, "key": "k9", "machines": ["bad\u0000id"]},  # 9 a machine id with a control character
        {**good, "key": 10},  # 10 key not a string
        {**good},  # 11 key missing
        {**good, "key": "k12", "expiry": T0},  # 12 unknown field
        "{not json",  # 13
        "[1, 2]",  # 14 not an object
        {**good, "key": taken_key, "email": "other@example.com"},  # 15 key imported for another licence
        {**good, "key": "good-1", "email": "dup@example.com"},  # 16 duplicate key in the file
        {**good, "key": "k17", "stripe_subscription": "sub_taken"},  # 17 subscription already linked
        {**good, "key": "k18", "stripe_subscription": "sub_twice"},  # 18
        {**good, "key": "k19", "stripe_subscription": "sub_twice"},  # 19 duplicate subscription in the file
        {**good, "key": "k20", "lifetime": True},  # 20 lifetime with an end
        {**good, "key": "k21", "stripe_customer": "customer-21"},  # 21 not a Stripe id
        {**good, "key": "k22", "created_at": "2999-01-01T00:00:00Z"},  # 22 created in the future
        {**good, "key": signed},  # 23 already a key of this server
        {**good, "key": "k24", "lifetime": "yes"},  # 24 not a boolean
        {**good, "key": "x" * 8193},  # 25 longer than a key can be
        {**good, "key": "good-26", "machines": ["m-1"], "max_machines": 2},  # 26 fine
    ]
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with path.open("ab") as handle:
        handle.write(b'{"email": "\xff"}\n')  # 27 not UTF-8
        handle.write(b'{"key": "' + b"x" * (1 << 20) + b'"}\n')  # 28 longer than a line may be
    done = run_import(live, path)
    assert done.returncode == 1
    stderr = done.stderr.strip().splitlines()
    assert stderr == ["licensed: 25 bad lines in bad.jsonl; nothing imported"], done.stderr
    refused = {int(x.split(":")[0].removeprefix("line ")): x for x in done.stdout.splitlines()[:-1]}
    expected = set(range(1, 29)) - {1, 18, 26}  # the good lines: 1, 26, and 18 (19 repeats it)
    assert set(refused) == expected, done.stdout
    for number, words in {
        2: "unknown plan 'no-such-plan'",
        3: "email:",
        4: "expires_at must be",
        5: "give expires_at, or lifetime: true",
        6: "max_machines",
        7: "machines: must be a list",
        8: "2 machines but max_machines is 1",
        9: "machine 1 has characters",
        10: "key: must be a string",
        11: "key is required",
        12: "unknown field 'expiry'",
        13: "not JSON",
        14: "not a JSON object",
        15: "already imported for another license",
        16: "the same key as line 1",
        17: "sub_taken already belongs to license",
        19: "the same stripe_subscription as line 18",
        20: "a lifetime license has no expires_at",
        21: "stripe_customer: must be a Stripe id",
        22: "created_at is in the future",
        23: "already a key of this server",
        24: "lifetime: must be true or false",
        25: "key must be 1..8192 characters",
        27: "not UTF-8",
        28: "longer than",
    }.items():
        assert words in refused[number], (number, refused[number])
    assert done.stdout.splitlines()[-1] == (
        "imported 0, skipped as already there 0, refused 25 (of 28 lines in bad.jsonl)"
    )
    # Never a key in what is printed, not even a refused one.
    assert taken_key not in done.stdout and signed not in done.stdout and "good-1" not in done.stdout
    store = live.services.store
    assert store.all("SELECT COUNT(*) FROM licenses")[0][0] == before
    assert store.all("SELECT COUNT(*) FROM imported_keys")[0][0] == 2

    as_json = run_import(live, path, "--json", "--dry-run")
    assert as_json.returncode == 1
    report = json.loads(as_json.stdout)
    assert [p["line"] for p in report["problems"]] == sorted(expected)
    assert (report["imported"], report["refused"], report["lines"]) == (0, 25, 28)


def test_a_file_with_no_licences_or_no_file_is_refused(live: Live, tmp_path: Path) -> None:
    empty = write_lines(tmp_path / "empty.jsonl", ["", "   "])
    done = run_import(live, empty)
    assert done.returncode == 1 and done.stderr.strip() == "licensed: empty.jsonl holds no licenses"
    missing = run_import(live, tmp_path / "nope.jsonl")
    assert (
        missing.returncode == 1 and "cannot read" in missing.stderr and len(missing.stderr.splitlines()) == 1
    )


# --- idempotent, dry run, audited -----------------------------------------------------------------------


def _state(live: Live) -> dict[str, list[tuple[Any, ...]]]:
    store = live.services.store
    return {
        table: [tuple(r) for r in store.all(f"SELECT * FROM {table} ORDER BY 1")]
        for table in ("customers", "licenses", "machines", "imported_keys", "audit_log")
    }


def test_import_is_idempotent_dry_run_writes_nothing_and_it_is_audited(live: Live, tmp_path: Path) -> None:
    lines = licence_lines(40)
    path = write_lines(tmp_path / "old.jsonl", [line.record for line in lines])
    empty = _state(live)
    dry = run_import(live, path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == (
        "dry run, nothing written: would have imported 40, skipped as already there 0,"
        " refused 0 (of 40 lines in old.jsonl)"
    )
    assert _state(live) == empty

    assert run_import(live, path).returncode == 0
    after_first = _state(live)
    again = run_import(live, path, "--json")
    assert again.returncode == 0, again.stderr
    report = json.loads(again.stdout)
    assert (report["imported"], report["skipped"], report["refused"]) == (0, 40, 0)
    assert _state(live) == after_first  # nothing changed, not even the audit trail

    # Half the file is new: only that half is imported.
    more = licence_lines(20)
    write_lines(path, [line.record for line in lines[:20] + more])
    third = json.loads(run_import(live, path, "--json").stdout)
    assert (third["imported"], third["skipped"]) == (20, 20)

    audit = live.services.store.all("SELECT actor, action, license_id, after FROM audit_log ORDER BY id")
    actions = [row["action"] for row in audit]
    assert actions.count("license.import") == 60
    summaries = [json.loads(row["after"]) for row in audit if row["action"] == "licenses.import"]
    assert [(s["imported"], s["skipped"], s["file"]) for s in summaries] == [
        (40, 0, "old.jsonl"),
        (20, 20, "old.jsonl"),
    ]
    assert all(row["actor"].startswith("cli:") for row in audit)
    first_line = next(json.loads(r["after"]) for r in audit if r["action"] == "license.import")
    assert first_line["line"] == 1 and "key" not in first_line


def test_progress_is_shown_on_a_terminal_only(live: Live, tmp_path: Path) -> None:
    path = write_lines(tmp_path / "many.jsonl", [line.record for line in licence_lines(1200)])
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": "/tmp",
        "DATA_DIR": str(live.services.config.data_dir),
    }
    leader, follower = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "licensed", "admin", "import", str(path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=follower,
        cwd=ROOT,
    )
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed with the process
                break
            if not chunk:
                break
            shown += chunk
        elif process.poll() is not None:
            break
    os.close(leader)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 0
    assert out.decode().startswith("imported 1200,")
    text = shown.decode()
    assert "checking 100%" in text and "importing 1000/1200" in text and "importing 1200/1200" in text
    assert "\r" in text


# --- an imported subscription is kept in step by Stripe ---------------------------------------------------


def deliver(live: Live, event: dict[str, Any]) -> None:
    body, headers = se.signed(event, int(live.clock()))
    answer = live.http.post(live.url + "/api/stripe/webhook", data=body, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text


def import_subscription(live: Live, tmp_path: Path, stream: Stream) -> str:
    """An old key for a subscription paid up to P1, linked to Stripe; returns the old key."""
    old = "sub-key-" + secrets.token_hex(8)
    record = {
        "email": "subscriber@example.com",
        "plan": "pro-monthly",
        "key": old,
        "expires_at": iso(P1),
        "machines": ["office-server"],
        "stripe_customer": stream.customer,
        "stripe_subscription": stream.sub_id,
    }
    done = run_import(live, write_lines(tmp_path / "sub.jsonl", [record]))
    assert done.returncode == 0, done.stderr
    return old


def observe(live: Live, key: str, at: int) -> tuple[str, str | None, bool]:
    live.clock.set(at)
    answer = validate(live, key, "office-server")
    return answer["code"], answer["license"]["paid_through"], "key" in answer


def test_an_imported_subscription_renews_and_cancels_through_webhooks(live: Live, tmp_path: Path) -> None:
    s = Stream("imported")
    old = import_subscription(live, tmp_path, s)
    assert observe(live, old, P1 - DAY) == ("VALID", iso(P1), True)

    # Renewal: the period advances first; entitlement follows the money, not the period.
    live.clock.set(P1)
    for _kind, event in (
        s.subscription("updated", P1, "active", (P1, P2)),
        s.invoice("invoice.created", P1, "draft"),
    ):
        deliver(live, event)
    assert observe(live, old, P1 + HOUR) == ("GRACE_PERIOD", iso(P1), True)
    live.clock.set(P1 + HOUR)
    for _kind, event in (
        s.invoice("invoice.finalized", P1 + HOUR, "open"),
        s.invoice("invoice.paid", P1 + HOUR, "paid"),
        s.invoice("invoice.payment_succeeded", P1 + HOUR, "paid"),
    ):
        deliver(live, event)
    code, paid_through, _ = observe(live, old, P1 + 2 * HOUR)
    assert (code, paid_through) == ("VALID", iso(P2))
    renewed = validate(live, old, "office-server")["key"]
    assert pyjwt_claims(renewed, live.get("/.well-known/jwks.json").json())["exp"] == P2 + 7 * DAY
    assert validate(live, renewed, "office-server")["code"] == "VALID"

    # Cancelled ten days into the paid period: ended, no grace, for both keys.
    ended = P1 + 10 * DAY
    live.clock.set(ended)
    _kind, cancel = s.subscription("deleted", ended, "canceled", (P1, P2), ended_at=ended)
    deliver(live, cancel)
    assert observe(live, old, ended + 60) == ("EXPIRED", iso(ended), False)
    assert validate(live, renewed)["code"] == "EXPIRED"
    lic = live.services.store.find_license("stripe_subscription_id", s.sub_id)
    assert lic is not None and lic.source == "import" and lic.subscription_status == "canceled"
    assert live.services.store.count_machines(lic.id) == 1
    # The buyer already holds a key and the installation upgrades itself: no key mail out of the blue.
    assert live.services.store.mail_for_license(lic.id) == []


def test_the_reconciler_repairs_an_imported_subscription(live: Live, tmp_path: Path) -> None:
    """Webhooks lost: ``reconcile --full`` lists the subscription with its paid renewal invoice."""
    s = Stream("reconciled")
    old = import_subscription(live, tmp_path, s)
    sub = se.subscription(sub_id=s.sub_id, customer=s.customer, price="price_pro_monthly", period_end=P2)
    sub["items"]["data"][0]["current_period_start"] = P1
    sub["latest_invoice"] = se.invoice(sub_id=s.sub_id, period_end=P2, customer=s.customer, status="paid")

    def on_get(path: str, query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if path == "/v1/subscriptions":
            return 200, {"object": "list", "data": [sub], "has_more": False}
        return 200, {"object": "list", "data": [], "has_more": False}

    with stripe_double() as double:
        double.on_get = on_get
        gateway = stripe_api.StripeGateway("sk_test_double", double.url, sleep=lambda _s: None)
        report = stripe_sync.Reconciler(live.services, gateway).full(P1 + HOUR)
    assert (report.failed, report.repaired) == (0, 1)
    assert observe(live, old, P1 + 2 * HOUR) == ("VALID", iso(P2), True)


def test_migration_keeps_only_hashes(live: Live, tmp_path: Path) -> None:
    """The table holds the SHA-256 of each key, the licence and nothing of the line but its owner's hash."""
    old = "plain-" + secrets.token_hex(8)
    record = {"email": "h@example.com", "plan": "lifetime", "key": old}
    assert run_import(live, write_lines(tmp_path / "h.jsonl", [record])).returncode == 0
    rows = [dict(r) for r in live.services.store.all("SELECT * FROM imported_keys")]
    assert len(rows) == 1 and set(rows[0]) == {"key_hash", "license_id", "owner", "imported_at"}
    assert rows[0]["key_hash"] == keys.imported_key_hash(old)
    assert live.services.store.imported_key_license(keys.imported_key_hash(old)) == rows[0]["license_id"]
    names = [r[0] for r in live.services.store.all("SELECT name FROM schema_migrations ORDER BY version")]
    assert "keys from the system used before" in names


def test_a_database_of_the_previous_schema_gains_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The migration stands alone: a database written before it keeps its licences and
    accepts imported keys once opened by this version."""
    from licensed import store as store_module

    path = tmp_path / "licensed.sqlite3"
    index = [name for name, _ in store_module.MIGRATIONS].index("keys from the system used before")
    with monkeypatch.context() as patch:
        patch.setattr(store_module, "MIGRATIONS", store_module.MIGRATIONS[:index])
        older = store_module.open_store(path, T0)
        customer = older.upsert_customer(T0, email="before@example.com")
        older.close()
    newer = store_module.open_store(path, T0 + 1)
    try:
        assert newer.schema_version() == len(store_module.MIGRATIONS)
        assert newer.get_customer(customer) is not None
        assert newer.imported_key_license(keys.imported_key_hash("anything")) is None
    finally:
        newer.close()
