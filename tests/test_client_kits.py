"""The client kits (clients/python, clients/node) against a real server.

Every scenario runs once per kit. The Python kit is called in-process; the
Node.js kit runs as a fresh ``node`` process per call (like an application
starting), through tests/client_kit_driver.mjs. Both get a new client object
per call, so everything that survives between calls is in the state file.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import nacl.signing
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from support.clock import DAY, T0, FrozenClock
from support.live import Restartable

from licensed import jws, keys, licensing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "clients" / "python"))

import licensed_client as lc  # noqa: E402

NODE_KIT = ROOT / "clients" / "node"
DRIVER = ROOT / "tests" / "client_kit_driver.mjs"
ISSUER = "http://licensed.test"
SALT = "dashcaddy-test"
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


class KitError(Exception):
    """A kit raised: ``kind`` is the error class name (ServerUnreachable, ServerError, …)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


def node_ready() -> None:
    node = shutil.which("node")
    if node is None or not (NODE_KIT / "node_modules" / "jose").is_dir():
        pytest.fail("the Node.js kit needs node and `npm ci --prefix clients/node` (make test does it)")


class NodeDriver:
    """One ``node`` process running tests/client_kit_driver.mjs: a request line in, an answer line out."""

    TIMEOUT = 30.0

    def __init__(self) -> None:
        node_ready()
        self.process = subprocess.Popen(
            ["node", str(DRIVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def call(self, args: dict[str, Any]) -> dict[str, Any]:
        process = self.process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(json.dumps(args) + "\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], self.TIMEOUT)
        line = process.stdout.readline() if ready else ""
        if not line:
            process.kill()
            _out, err = process.communicate(timeout=5)
            raise AssertionError(f"node driver gave no answer: {err}")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise KitError(answer["error"], answer["message"])
        result: dict[str, Any] = answer["ok"]
        return result

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture(scope="module")
def node_driver() -> Iterator[NodeDriver]:
    driver = NodeDriver()
    yield driver
    driver.close()


@dataclass
class Kit:
    """One installation: a kit, its state file, its machine id, its clock."""

    kind: str
    server_url: str
    jwks: dict[str, Any]
    state_path: Path
    machine_id: str
    clock: FrozenClock
    issuer: str | None = ISSUER
    product: str | None = "dashcaddy"
    key_prefix: str = "DC"
    persist_jwks: bool = False
    label: str | None = None
    driver: NodeDriver | None = None

    def activate(self, key: str, machine: str | None = None) -> dict[str, Any]:
        return self.call("activate", key=key, machine=machine)

    def validate(self) -> dict[str, Any]:
        return self.call("validate")

    def deactivate(self) -> dict[str, Any]:
        return self.call("deactivate")

    def offline(self) -> dict[str, Any]:
        return self.call("offline")

    def machines(self, key: str | None = None) -> dict[str, Any]:
        return self.call("machines", key=key)

    def release(self, machine: str, key: str | None = None) -> dict[str, Any]:
        return self.call("release", key=key, ref=machine)

    def state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {}
        loaded: dict[str, Any] = json.loads(self.state_path.read_text(encoding="utf-8"))
        return loaded

    def write_state(self, state: dict[str, Any]) -> None:
        self.state_path.write_text(json.dumps(state), encoding="utf-8")

    def call(
        self, op: str, key: str | None = None, machine: str | None = None, ref: str | None = None
    ) -> dict[str, Any]:
        if self.kind == "node":
            assert self.driver is not None
            answer = self.driver.call(
                {
                    "op": op,
                    "serverUrl": self.server_url,
                    "jwks": self.jwks,
                    "statePath": str(self.state_path),
                    "keyPrefix": self.key_prefix,
                    "product": self.product,
                    "issuer": self.issuer,
                    "machineId": self.machine_id,
                    "now": self.clock.now,
                    "persistJwks": self.persist_jwks,
                    "label": self.label,
                    "key": key,
                    "activateMachineId": machine,
                    "machine": ref,
                }
            )
            if op == "machines":
                answer["machines"] = [
                    {
                        "id": m["id"],
                        "label": m["label"],
                        "activated_at": m["activatedAt"],
                        "last_seen_at": m["lastSeenAt"],
                    }
                    for m in answer["machines"]
                ]
            else:
                answer["lease_expires_at"] = answer.pop("leaseExpiresAt")
            return answer
        client = lc.LicenseClient(
            self.server_url,
            self.jwks,
            self.state_path,
            key_prefix=self.key_prefix,
            product=self.product,
            issuer=self.issuer,
            machine_id=self.machine_id,
            now=self.clock,
            timeout=5,
            persist_jwks=self.persist_jwks,
            label=self.label,
        )
        try:
            if op == "machines":
                listing = client.machines(key)
                return {
                    "code": listing.code,
                    "valid": listing.valid,
                    "online": listing.online,
                    "machines": [dataclasses.asdict(m) for m in listing.machines],
                    "reason": listing.reason,
                    "message": listing.message,
                }
            if op == "activate":
                assert key is not None
                result = client.activate(key, machine)
            elif op == "release":
                assert ref is not None
                result = client.release(ref, key)
            elif op == "validate":
                result = client.validate()
            elif op == "deactivate":
                result = client.deactivate()
            else:
                result = client.check_offline()
        except lc.LicenseClientError as err:
            raise KitError(type(err).__name__, str(err)) from err
        return {
            "code": result.code,
            "valid": result.valid,
            "online": result.online,
            "license": result.license,
            "lease_expires_at": result.lease_expires_at,
            "features": result.features,
            "reason": result.reason,
            "message": result.message,
        }


def claims_of(token: str) -> dict[str, Any]:
    """The unverified claims of a JWS or a license key (for assertions only)."""
    payload = token.rsplit(".", 2)[1]
    data: dict[str, Any] = json.loads(jws.b64url_decode(payload))
    return data


def header_of(token: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(jws.b64url_decode(token.split(".")[0]))
    return data


def jws_of(key: str) -> str:
    """The JWS of ``DC-<TIER>-<JWS>``: strip the exact prefix, then the tier."""
    return key[len("DC-") :].partition("-")[2]


def mid(name: str) -> str:
    return lc.machine_id(SALT, f"fingerprint-{name}")


@pytest.fixture(params=["python", "node"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server(restartable: Restartable) -> Restartable:
    return restartable


@pytest.fixture
def bundled_jwks(server: Restartable) -> dict[str, Any]:
    """The JWKS an application ships with: the server's set as of its release."""
    answer: dict[str, Any] = server.get("/.well-known/jwks.json").json()
    return answer


MakeKit = Callable[..., Kit]


@pytest.fixture
def make_kit(
    server: Restartable,
    bundled_jwks: dict[str, Any],
    tmp_path: Path,
    kind: str,
    request: pytest.FixtureRequest,
) -> MakeKit:
    driver: NodeDriver | None = request.getfixturevalue("node_driver") if kind == "node" else None

    def make(name: str = "a", **options: Any) -> Kit:
        return Kit(
            kind=kind,
            server_url=server.url,
            jwks=bundled_jwks,
            state_path=tmp_path / f"state-{name}" / "license.json",
            machine_id=mid(name),
            clock=server.clock,
            driver=driver,
            **options,
        )

    return make


def ttl(server: Restartable) -> int:
    return server.services.config.lease_ttl_hours * 3600


# --- activate, go offline, expire -----------------------------------------------------


def test_offline_until_the_lease_expires_then_refused(server: Restartable, make_kit: MakeKit) -> None:
    key = server.issue("pro-monthly", days=30)
    kit = make_kit()
    first = kit.activate(key)
    assert (first["code"], first["valid"], first["online"]) == ("VALID", True, True)
    assert first["lease_expires_at"] == T0 + ttl(server)
    assert first["features"] == ["recipes", "sso"]
    stored = kit.state()
    assert stored["key"] == key
    assert claims_of(stored["lease"])["mid"] == hashlib.sha256(kit.machine_id.encode()).hexdigest()

    server.stop()
    for at in (T0, T0 + ttl(server) - 1):
        server.clock.set(at)
        offline = kit.validate()
        assert (offline["code"], offline["valid"], offline["online"]) == ("VALID", True, False)
        assert offline["lease_expires_at"] == T0 + ttl(server)
        assert "not reached" in offline["reason"]

    server.clock.set(T0 + ttl(server))
    for answer in (kit.validate(), kit.offline()):
        assert (answer["code"], answer["valid"], answer["online"]) == ("EXPIRED", False, False)
    with pytest.raises(KitError) as refused:
        make_kit("b").activate(key)
    assert refused.value.kind == "ServerUnreachable"
    with pytest.raises(KitError) as kept:
        kit.deactivate()
    assert kept.value.kind == "ServerUnreachable"

    server.start()
    back = kit.validate()
    assert (back["code"], back["valid"], back["online"]) == ("VALID", True, True)
    assert back["lease_expires_at"] == server.clock.now + ttl(server)


def test_grace_period_then_expired(server: Restartable, make_kit: MakeKit) -> None:
    key = server.issue("pro-monthly", days=30)
    kit = make_kit()
    kit.activate(key)
    server.clock.set(T0 + 30 * DAY + 60)
    grace = kit.validate()
    assert (grace["code"], grace["valid"], grace["online"]) == ("GRACE_PERIOD", True, True)
    assert grace["lease_expires_at"] == T0 + 37 * DAY  # the licence's end, before the TTL
    server.stop()
    offline = kit.validate()
    assert (offline["code"], offline["valid"], offline["online"]) == ("GRACE_PERIOD", True, False)
    server.start()
    server.clock.set(T0 + 37 * DAY + 1)
    ended = kit.validate()
    assert (ended["code"], ended["valid"], ended["online"]) == ("EXPIRED", False, True)
    assert "lease" not in kit.state()


# --- deactivate and move ---------------------------------------------------------------


def test_deactivate_then_activate_on_another_machine(server: Restartable, make_kit: MakeKit) -> None:
    key = server.issue("pro-monthly", days=30)
    here, there = make_kit("here"), make_kit("there")
    assert here.activate(key)["code"] == "VALID"

    full = there.activate(key)
    assert (full["code"], full["valid"], full["online"]) == ("TOO_MANY_MACHINES", False, True)
    assert not there.state_path.exists()

    moved = here.deactivate()
    assert (moved["code"], moved["valid"]) == ("DEACTIVATED", False)
    assert "key" not in here.state() and "lease" not in here.state()
    for answer in (here.offline(), here.validate()):
        assert (answer["code"], answer["valid"], answer["online"]) == ("DEACTIVATED", False, False)

    arrived = there.activate(key)
    assert (arrived["code"], arrived["valid"]) == ("VALID", True)
    sub = claims_of(jws_of(key))["sub"]
    assert [r["machine_hash"] for r in server.services.store.machine_rows(sub)] == [
        hashlib.sha256(there.machine_id.encode()).hexdigest()
    ]
    assert here.activate(key)["code"] == "TOO_MANY_MACHINES"


def test_state_file_copied_to_another_machine_is_worthless(server: Restartable, make_kit: MakeKit) -> None:
    key = server.issue("pro-monthly", days=30)
    original = make_kit("original")
    original.activate(key)
    server.stop()
    copy = make_kit("copy")
    copy.state_path.parent.mkdir(parents=True)
    shutil.copy(original.state_path, copy.state_path)
    answer = copy.offline()
    assert (answer["code"], answer["valid"]) == ("MACHINE_NOT_ACTIVATED", False)
    assert original.offline()["valid"] is True


# --- the machines list, release, labels -------------------------------------------------


def _mentions(listing: dict[str, Any], machine: str) -> bool:
    """Whether an answer carries a machine id, raw or hashed."""
    text = json.dumps(listing)
    return machine in text or hashlib.sha256(machine.encode()).hexdigest() in text


def test_a_dead_machine_is_released_from_the_new_one(server: Restartable, make_kit: MakeKit) -> None:
    """One seat, held by a server that died: its reinstalled successor, refused, lists the
    machines with the key the user entered, releases the dead one and activates."""
    key = server.issue("pro-monthly", days=30)
    dead = make_kit("dead", label="web-1")
    assert dead.activate(key)["code"] == "VALID"
    server.clock.advance(2 * DAY)
    new = make_kit("new", label="web-1 (reinstalled)")
    assert new.activate(key)["code"] == "TOO_MANY_MACHINES"

    listing = new.machines(key)
    assert (listing["code"], listing["valid"], listing["online"]) == ("VALID", True, True)
    [machine] = listing["machines"]
    assert machine["label"] == "web-1" and machine["id"].startswith("mch_")
    assert machine["activated_at"] == machine["last_seen_at"] == T0
    assert not _mentions(listing, dead.machine_id)

    released = new.release(machine["id"], key)
    assert (released["code"], released["valid"], released["online"]) == ("DEACTIVATED", True, True)
    assert released["license"]["machines_used"] == 0
    assert released["message"] == lc.RELEASE_MESSAGES["DEACTIVATED"]
    assert not new.state_path.exists()  # listing and releasing store nothing

    arrived = new.activate(key)
    assert (arrived["code"], arrived["valid"]) == ("VALID", True)
    [now_held] = new.machines()["machines"]  # the stored key from here on
    assert (now_held["label"], now_held["activated_at"]) == ("web-1 (reinstalled)", T0 + 2 * DAY)
    assert now_held["id"] != machine["id"]

    again = new.release(machine["id"])
    assert (again["code"], again["valid"], again["online"]) == ("MACHINE_NOT_ACTIVATED", True, True)
    assert again["message"] == lc.RELEASE_MESSAGES["MACHINE_NOT_ACTIVATED"]
    assert new.validate()["code"] == "VALID"
    assert dead.validate()["code"] == "TOO_MANY_MACHINES"  # back from the dead: its seat is gone


def test_a_live_machine_releases_a_dead_one(server: Restartable, make_kit: MakeKit) -> None:
    key = server.issue("team-monthly", days=30)  # three seats
    live = make_kit("live")  # no label given: the host name
    dead = make_kit("dead", label="old-nas\tbackup\u200b" + "x" * 80)
    quiet = make_kit("quiet", label="")  # sends none
    for kit in (live, dead, quiet):
        assert kit.activate(key)["code"] == "VALID"
        server.clock.advance(60)
    kept = live.state_path.read_bytes()

    listing = live.machines()
    labels = [m["label"] for m in listing["machines"]]
    assert labels == [lc.machine_label(), lc.machine_label(dead.label), None]
    assert labels[0] and labels[1] == "old-nas backup " + "x" * 49
    assert [m["activated_at"] for m in listing["machines"]] == [T0, T0 + 60, T0 + 120]
    ids = [m["id"] for m in listing["machines"]]
    assert len(set(ids)) == 3
    assert not any(_mentions(listing, kit.machine_id) for kit in (live, dead, quiet))

    released = live.release(ids[1])
    assert (released["code"], released["valid"], released["online"]) == ("DEACTIVATED", True, True)
    assert released["license"]["machines_used"] == 2
    assert live.state_path.read_bytes() == kept  # this machine's own licence is untouched
    assert live.validate()["code"] == "VALID"
    assert [m["id"] for m in live.machines()["machines"]] == [ids[0], ids[2]]

    unknown = live.release("mch_" + "0" * 24)
    assert (unknown["code"], unknown["valid"]) == ("MACHINE_NOT_ACTIVATED", True)
    assert len(live.machines()["machines"]) == 2

    # Released while it still runs: it takes a free seat again at its next check.
    back = dead.validate()
    assert (back["code"], back["valid"], back["online"]) == ("VALID", True, True)
    assert [m["label"] for m in live.machines()["machines"]][-1] == labels[1]


def test_machines_and_release_without_a_good_key(server: Restartable, make_kit: MakeKit) -> None:
    kit = make_kit()
    bad = "DC-PRO-not.a.key"
    listing = kit.machines(bad)
    assert (listing["code"], listing["valid"], listing["online"], listing["machines"]) == (
        "INVALID_KEY",
        False,
        True,
        [],
    )
    assert listing["message"] == lc.MESSAGES["INVALID_KEY"]
    refused = kit.release("mch_" + "0" * 24, bad)
    assert (refused["code"], refused["valid"], refused["online"]) == ("INVALID_KEY", False, True)
    assert refused["message"] == lc.MESSAGES["INVALID_KEY"]

    # No key given or stored: nothing to ask the server.
    assert (kit.machines()["code"], kit.machines()["online"]) == ("MACHINE_NOT_ACTIVATED", False)
    assert (kit.release("mch_x")["code"], kit.release("mch_x")["online"]) == ("MACHINE_NOT_ACTIVATED", False)
    assert not kit.state_path.exists()

    key = server.issue("pro-monthly", days=30)
    with pytest.raises(KitError) as malformed:
        kit.release("web-1", key)  # a label, not an id from the list
    assert malformed.value.kind == "ServerError" and "VALIDATION_ERROR" in str(malformed.value)
    server.stop()
    for call in (lambda: kit.machines(key), lambda: kit.release("mch_" + "0" * 24, key)):
        with pytest.raises(KitError) as down:
            call()
        assert down.value.kind == "ServerUnreachable"


def test_a_renamed_machine_shows_its_new_label(server: Restartable, make_kit: MakeKit) -> None:
    key = server.issue("pro-monthly", days=30)
    kit = make_kit(label="nas")
    kit.activate(key)
    kit.label = "nas-attic"
    server.clock.advance(3600)  # the server writes a seen machine at most hourly
    assert kit.validate()["code"] == "VALID"
    assert [m["label"] for m in kit.machines()["machines"]] == ["nas-attic"]


def test_the_machine_id_is_never_the_label(make_kit: MakeKit) -> None:
    kit = make_kit()
    kit.label = kit.machine_id
    with pytest.raises((ValueError, KitError), match="machine id"):
        kit.offline()


def test_a_machine_id_is_one_machine_however_spelled(server: Restartable, make_kit: MakeKit) -> None:
    """The server trims and NFC-normalises machine ids before hashing: the kits check a
    lease's ``mid`` the same way, so ids with spaces or decomposed letters still work."""
    key = server.issue("pro-monthly", days=30)  # one seat
    spaced = make_kit("nfd")
    spaced.machine_id = "  Ce\u0301line-box "
    first = spaced.activate(key)
    assert (first["code"], first["valid"]) == ("VALID", True)
    plain = make_kit("nfc")
    plain.machine_id = "C\u00e9line-box"
    assert plain.activate(key)["code"] == "VALID"  # the same machine: the same seat
    server.stop()
    for kit in (spaced, plain):
        assert kit.offline()["valid"] is True


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(max_size=100), min_size=1, max_size=20))
def test_both_kits_make_the_same_labels_and_the_server_takes_them(
    node_driver: NodeDriver, texts: list[str]
) -> None:
    fixed: list[str | None] = [None, "lone\ud800surrogate", "\U0001f5a5" * 70, "web-1\u200d\t\n"]
    ask = [*texts, *fixed]
    answer = node_driver.call({"op": "machine-label", "texts": ask})
    expected = [lc.machine_label(t) for t in ask]
    assert answer["labels"] == expected
    host = lc.machine_label(socket.gethostname())
    assert expected[-4:] == [host, "lone surrogate", "\U0001f5a5" * 64, "web-1"]
    for label in expected:
        if label is not None:
            assert 1 <= len(label) <= 64 and label == label.strip()
            assert re.fullmatch(licensing.MACHINE_ID_PATTERN, label), label


# --- the answer codes ------------------------------------------------------------------------


def test_the_python_kit_knows_exactly_the_servers_codes() -> None:
    assert len(lc.CODES) == len(set(lc.CODES))
    assert set(lc.CODES) == set(licensing.ALL_CODES)
    assert lc.VALID_CODES == licensing.VALID_CODES
    assert set(lc.MESSAGES) == set(lc.CODES)
    assert set(lc.RELEASE_MESSAGES) == {licensing.DEACTIVATED, licensing.MACHINE_NOT_ACTIVATED}
    # Every code has its handling: valid, a denial the state file keeps, or the two seat codes.
    handled = lc.VALID_CODES | lc._DENIALS | {lc.DEACTIVATED, lc.MACHINE_NOT_ACTIVATED}
    assert handled == set(lc.CODES)


def test_the_node_kit_knows_exactly_the_servers_codes(node_driver: NodeDriver) -> None:
    answer = node_driver.call({"op": "codes"})
    assert len(answer["codes"]) == len(set(answer["codes"]))
    assert set(answer["codes"]) == set(licensing.ALL_CODES)
    assert set(answer["valid"]) == licensing.VALID_CODES
    assert answer["messages"] == lc.MESSAGES  # both kits tell the user the same
    assert answer["releaseMessages"] == lc.RELEASE_MESSAGES


# --- renewal, revocation, suspension ---------------------------------------------------


def test_renewal_brings_a_new_key_that_the_client_keeps(server: Restartable, make_kit: MakeKit) -> None:
    key = server.issue("pro-monthly", days=30)
    sub = claims_of(jws_of(key))["sub"]
    kit = make_kit()
    kit.activate(key)
    assert claims_of(jws_of(key))["exp"] == T0 + 37 * DAY

    server.clock.set(T0 + 29 * DAY)
    now = server.services.now()
    with server.services.store.atomic():
        lic = server.license(sub)
        assert lic.paid_through is not None
        lic.paid_through += 30 * DAY
        licensing.restamp_key(lic, server.services.ring, now)
        server.services.store.save_license(lic, now)

    renewed = kit.validate()
    assert (renewed["code"], renewed["valid"], renewed["online"]) == ("VALID", True, True)
    new_key = kit.state()["key"]
    assert new_key != key
    assert new_key == server.key_of(sub)
    assert claims_of(jws_of(new_key))["exp"] == T0 + 67 * DAY
    # Any standard JWT library verifies the stored key with the public JWKS alone.
    signer = jwt.PyJWKSet.from_dict(server.get("/.well-known/jwks.json").json())[
        header_of(jws_of(new_key))["kid"]
    ]
    verified = jwt.decode(
        jws_of(new_key), signer.key, algorithms=["EdDSA"], options={"verify_exp": False, "verify_iat": False}
    )
    assert verified["sub"] == sub

    server.clock.set(T0 + 36 * DAY)
    assert kit.validate()["lease_expires_at"] == T0 + 43 * DAY
    server.stop()
    server.clock.set(T0 + 40 * DAY)  # past the old key's exp: only the new key carries on
    offline = kit.validate()
    assert (offline["code"], offline["valid"], offline["online"]) == ("VALID", True, False)
    state = kit.state()
    state["key"] = key
    kit.write_state(state)
    assert kit.offline()["code"] == "EXPIRED"


@pytest.mark.parametrize(("status", "code"), [("revoked", "REVOKED"), ("suspended", "SUSPENDED")])
def test_revoked_or_suspended_stops_at_the_next_online_check(
    server: Restartable, make_kit: MakeKit, status: str, code: str
) -> None:
    key = server.issue("pro-monthly", days=30)
    sub = claims_of(jws_of(key))["sub"]
    kit = make_kit()
    lease_end = kit.activate(key)["lease_expires_at"]

    lic = server.license(sub)
    lic.status = status
    server.services.store.save_license(lic, server.services.now())
    server.clock.advance(3600)
    assert kit.offline()["valid"] is True  # the lease alone would still carry on

    stopped = kit.validate()
    assert (stopped["code"], stopped["valid"], stopped["online"]) == (code, False, True)
    assert "lease" not in kit.state()
    server.stop()
    assert server.clock.now < lease_end
    for answer in (kit.validate(), kit.offline()):
        assert (answer["code"], answer["valid"], answer["online"]) == (code, False, False)

    server.start()
    lic.status = "active"
    server.services.store.save_license(lic, server.services.now())
    back = kit.validate()
    assert (back["code"], back["valid"]) == ("VALID", True)


# --- refusals from the server ----------------------------------------------------------


def test_server_refusals_map_to_codes(server: Restartable, make_kit: MakeKit) -> None:
    key = server.issue("pro-monthly", days=30)
    services = server.services
    ghost = licensing.new_license(
        plan=services.catalog.plans["pro-monthly"],
        customer_id="cus_none",
        ring=services.ring,
        now=services.now(),
        source="test",
        paid_through=services.now() + DAY,
    )
    unknown = licensing.license_key(ghost, services.catalog, services.ring, ISSUER)
    cases = [
        (make_kit("garbage"), "DC-PRO-not.a.key", "INVALID_KEY"),
        (make_kit("ghost"), unknown, "NOT_FOUND"),
        (make_kit("desktop", product="desktop", key_prefix="DT"), key, "PRODUCT_MISMATCH"),
    ]
    for kit, presented, code in cases:
        answer = kit.activate(presented)
        assert (answer["code"], answer["valid"], answer["online"]) == (code, False, True), kit.state_path
        assert answer["message"] == lc.MESSAGES[code]
        assert not kit.state_path.exists()

    with pytest.raises(KitError) as bad:
        make_kit("long").activate(key, machine="m" * 300)
    assert bad.value.kind == "ServerError"
    assert "VALIDATION_ERROR" in str(bad.value)


def test_answer_from_another_issuer_is_not_stored(server: Restartable, make_kit: MakeKit) -> None:
    key = server.issue("pro-monthly", days=30)
    kit = make_kit(issuer="https://licenses.elsewhere.example")
    with pytest.raises(KitError) as refused:
        kit.activate(key)
    assert refused.value.kind == "ServerUnreachable"
    assert "does not verify" in str(refused.value)
    assert not kit.state_path.exists()


# --- signing-key rotation --------------------------------------------------------------


@pytest.mark.parametrize(("persist", "offline_code"), [(False, "INVALID_KEY"), (True, "VALID")])
def test_rotated_signing_key_is_fetched_online(
    server: Restartable, make_kit: MakeKit, monkeypatch: pytest.MonkeyPatch, persist: bool, offline_code: str
) -> None:
    key = server.issue("pro-monthly", days=30)
    kit = make_kit(persist_jwks=persist)
    kit.activate(key)
    monkeypatch.setattr(server.services.ring, "RELOAD_EVERY", 0.0)
    newest = keys.create_key(server.services.config.keys_dir, now=server.clock.now)
    server.clock.advance(60)

    answer = kit.validate()
    assert (answer["code"], answer["valid"], answer["online"]) == ("VALID", True, True)
    state = kit.state()
    assert header_of(jws_of(state["key"]))["kid"] == newest.kid
    assert header_of(state["lease"])["kid"] == newest.kid
    assert ("jwks" in state) is persist

    server.stop()
    offline = kit.offline()
    assert (offline["code"], offline["valid"]) == (offline_code, persist)


# --- tampering with the state file -----------------------------------------------------


def _b64json(value: dict[str, Any]) -> str:
    return jws.b64url_encode(json.dumps(value, separators=(",", ":")).encode())


def _with_claims(token: str, **changes: Any) -> str:
    """Same header and signature, other claims."""
    head, _payload, sig = token.split(".")
    return f"{head}.{_b64json({**claims_of(token), **changes})}.{sig}"


def _attacker_token(claims: dict[str, Any], kid: str) -> str:
    return jws.sign(claims, nacl.signing.SigningKey.generate(), kid)


@dataclass
class Scene:
    server: Restartable
    kit: Kit
    key: str
    state: dict[str, Any]

    @property
    def lease(self) -> str:
        return str(self.state["lease"])

    @property
    def kid(self) -> str:
        return str(header_of(self.lease)["kid"])

    def genuine_lease(self, license_id: str, machine: str) -> str:
        services = self.server.services
        lic = self.server.license(license_id)
        return licensing.lease(
            lic, keys.machine_hash(machine), services.ring, ISSUER, ttl(self.server), services.now()
        )


def _far_future(scene: Scene) -> dict[str, Any]:
    return {**claims_of(scene.lease), "exp": T0 + 3650 * DAY}


def _hs256(scene: Scene) -> str:
    secret = scene.kit.jwks["keys"][0]["x"]
    return jwt.encode(_far_future(scene), secret, algorithm="HS256", headers={"kid": scene.kid})


def _alg_none(scene: Scene) -> str:
    head = _b64json({"alg": "none", "typ": "JWT", "kid": scene.kid})
    return f"{head}.{_b64json(_far_future(scene))}."


def _flip_signature(token: str) -> str:
    head, payload, sig = token.split(".")
    middle = len(sig) // 2
    swapped = "A" if sig[middle] != "A" else "B"
    return f"{head}.{payload}.{sig[:middle]}{swapped}{sig[middle + 1 :]}"


def _other_license(scene: Scene) -> str:
    other = scene.server.issue_license("pro-monthly", days=30)
    return scene.genuine_lease(other.id, scene.kit.machine_id)


Tamper = Callable[[Scene], tuple[str, str]]
TAMPERS: dict[str, tuple[Tamper, str]] = {
    "lease exp pushed out": (lambda s: ("lease", _with_claims(s.lease, exp=T0 + 3650 * DAY)), "INVALID_KEY"),
    "lease signature flipped": (lambda s: ("lease", _flip_signature(s.lease)), "INVALID_KEY"),
    "lease alg none": (lambda s: ("lease", _alg_none(s)), "INVALID_KEY"),
    "lease HS256 with the public key": (lambda s: ("lease", _hs256(s)), "INVALID_KEY"),
    "lease by a foreign key, real kid": (
        lambda s: ("lease", _attacker_token(_far_future(s), s.kid)),
        "INVALID_KEY",
    ),
    "lease by a foreign key, own kid": (
        lambda s: ("lease", _attacker_token(_far_future(s), "attacker")),
        "INVALID_KEY",
    ),
    "lease not a JWT": (lambda s: ("lease", "not-a-lease"), "INVALID_KEY"),
    "genuine lease of another machine": (
        lambda s: ("lease", s.genuine_lease(claims_of(s.lease)["sub"], mid("elsewhere"))),
        "MACHINE_NOT_ACTIVATED",
    ),
    "genuine lease of another license": (lambda s: ("lease", _other_license(s)), "MACHINE_NOT_ACTIVATED"),
    "key sub changed": (
        lambda s: ("key", "DC-PRO-" + _with_claims(jws_of(s.key), sub="lic_other")),
        "INVALID_KEY",
    ),
    "key exp pushed out": (
        lambda s: ("key", "DC-PRO-" + _with_claims(jws_of(s.key), exp=T0 + 3650 * DAY)),
        "INVALID_KEY",
    ),
    "key tier text changed": (lambda s: ("key", "DC-TEAM-" + jws_of(s.key)), "INVALID_KEY"),
    "key prefix changed": (lambda s: ("key", "DT-PRO-" + jws_of(s.key)), "INVALID_KEY"),
    "key signature flipped": (lambda s: ("key", "DC-PRO-" + _flip_signature(jws_of(s.key))), "INVALID_KEY"),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_tampered_state_is_refused_offline(server: Restartable, make_kit: MakeKit, tamper: str) -> None:
    key = server.issue("pro-monthly", days=30)
    kit = make_kit()
    kit.activate(key)
    scene = Scene(server, kit, key, kit.state())
    change, expected = TAMPERS[tamper]
    name, value = change(scene)
    server.stop()
    assert kit.offline()["valid"] is True
    kit.write_state({**scene.state, name: value})
    for answer in (kit.offline(), kit.validate()):
        assert (answer["code"], answer["valid"], answer["online"]) == (expected, False, False), answer


def test_injected_public_key_in_the_state_file_is_not_trusted(server: Restartable, make_kit: MakeKit) -> None:
    key = server.issue("pro-monthly", days=30)
    kit = make_kit()
    kit.activate(key)
    state = kit.state()
    attacker = nacl.signing.SigningKey.generate()
    jwk = {"kty": "OKP", "crv": "Ed25519", "kid": "mine", "alg": "EdDSA", "use": "sig"}
    jwk["x"] = jws.b64url_encode(bytes(attacker.verify_key))
    forged = jws.sign({**claims_of(state["lease"]), "exp": T0 + 3650 * DAY}, attacker, "mine")
    server.stop()
    kit.write_state({**state, "lease": forged, "jwks": {"keys": [jwk]}})
    answer = kit.offline()
    assert (answer["code"], answer["valid"]) == ("INVALID_KEY", False)


def _same_token(a: str, b: str) -> bool:
    """Whether two texts decode to the same JWS (base64url's last character has spare bits)."""
    head_a, _, sig_a = a.rpartition(".")
    head_b, _, sig_b = b.rpartition(".")
    if head_a != head_b:
        return False
    try:
        return base64.urlsafe_b64decode(sig_a + "==") == base64.urlsafe_b64decode(sig_b + "==")
    except ValueError:
        return False


def test_any_change_to_the_stored_key_or_lease_is_refused(server: Restartable, tmp_path: Path) -> None:
    """Python kit, offline: every one-character change that alters the token is refused."""
    jwks_set = server.get("/.well-known/jwks.json").json()
    kit = Kit("python", server.url, jwks_set, tmp_path / "license.json", mid("a"), server.clock)
    kit.activate(server.issue("pro-monthly", days=30))
    server.stop()
    state = kit.state()
    assert kit.offline()["valid"] is True

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        which=st.sampled_from(["key", "lease"]),
        index=st.integers(min_value=0, max_value=10_000),
        char=st.sampled_from(B64URL),
    )
    def check(which: str, index: int, char: str) -> None:
        original = state[which]
        at = index % len(original)
        tampered = original[:at] + char + original[at + 1 :]
        assume(tampered != original and not _same_token(tampered, original))
        kit.write_state({**state, which: tampered})
        assert kit.offline()["valid"] is False

    check()


# --- machine ids -------------------------------------------------------------------------


def test_machine_id_is_a_salted_hash_of_the_os_fingerprint() -> None:
    fingerprint = lc.machine_fingerprint()
    assert fingerprint and fingerprint == lc.machine_fingerprint()
    own = lc.machine_id(SALT)
    assert own == lc.machine_id(SALT, fingerprint)
    assert own == hmac.new(SALT.encode(), fingerprint.encode(), hashlib.sha256).hexdigest()
    assert len(own) == 64 and set(own) <= set("0123456789abcdef")
    assert fingerprint not in own
    assert lc.machine_id("another-app") != own
    if Path("/etc/machine-id").is_file() and Path("/etc/machine-id").read_text().strip():
        assert fingerprint == Path("/etc/machine-id").read_text().strip()
    with pytest.raises(ValueError, match="salt"):
        lc.machine_id("")


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=80)),
        min_size=1,
        max_size=25,
    )
)
def test_both_kits_derive_the_same_machine_id(node_driver: NodeDriver, pairs: list[tuple[str, str]]) -> None:
    ask: list[list[str | None]] = [[s, f] for s, f in pairs] + [[SALT, None]]
    answer = node_driver.call({"op": "machine-id", "pairs": ask})
    expected = [lc.machine_id(s, f) for s, f in pairs] + [lc.machine_id(SALT)]
    assert answer["ids"] == expected
    assert answer["fingerprint"] == lc.machine_fingerprint()


# --- the Node.js kit's own offline tests -------------------------------------------------


def test_node_kit_unit_tests_pass() -> None:
    node_ready()
    done = subprocess.run(
        ["node", "--test", str(NODE_KIT / "test" / "offline.test.mjs")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=NODE_KIT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# fail 0" in done.stdout


@pytest.fixture(autouse=True)
def _no_stray_files(tmp_path: Path) -> Iterator[None]:
    """Atomic writes leave no temporary files behind."""
    yield
    leftovers = [p for p in tmp_path.rglob("*.tmp")]
    assert not leftovers, leftovers


# --- the verification snippets of docs/integration.md --------------------------------------

DOC = ROOT / "docs" / "integration.md"


def doc_block(language: str, marker: str) -> str:
    blocks = [b.split("\n", 1) for b in DOC.read_text(encoding="utf-8").split("```")[1::2]]
    found = [body for info, body in blocks if info.strip() == language and marker in body]
    assert len(found) == 1, f"{marker} in {len(found)} blocks of {DOC.name}"
    return found[0]


@pytest.fixture
def genuine(server: Restartable, tmp_path: Path) -> dict[str, Any]:
    """A key and lease issued at the real time (PyJWT checks ``iat`` against the wall clock)."""
    server.clock.set(time.time())
    kit = Kit(
        "python",
        server.url,
        server.get("/.well-known/jwks.json").json(),
        tmp_path / "s.json",
        mid("doc"),
        server.clock,
    )
    kit.activate(server.issue("pro-monthly", days=30))
    state = kit.state()
    return {"key": state["key"], "lease": state["lease"], "machine": kit.machine_id, "jwks": kit.jwks}


@pytest.mark.parametrize("machine_ok", [True, False])
def test_doc_pyjwt_snippet_verifies(genuine: dict[str, Any], machine_ok: bool) -> None:
    namespace: dict[str, Any] = {}
    exec(compile(doc_block("python", "def verify_license"), str(DOC), "exec"), namespace)  # noqa: S102
    machine = genuine["machine"] if machine_ok else mid("elsewhere")
    args = (genuine["key"], genuine["lease"], machine, genuine["jwks"], "DC", ISSUER)
    if machine_ok:
        assert namespace["verify_license"](*args)["sub"] == claims_of(genuine["lease"])["sub"]
    else:
        with pytest.raises(ValueError, match="another machine"):
            namespace["verify_license"](*args)


@pytest.mark.parametrize("machine_ok", [True, False])
def test_doc_jose_snippet_verifies(genuine: dict[str, Any], machine_ok: bool) -> None:
    node_ready()
    machine = genuine["machine"] if machine_ok else mid("elsewhere")
    script = doc_block("js", "export async function verifyLicense") + (
        "\nconst a = JSON.parse(process.env.DOC_INPUT);\n"
        "const claims = await verifyLicense(a.key, a.lease, a.machine, a.jwks, 'DC', a.issuer);\n"
        "console.log(JSON.stringify(claims));\n"
    )
    done = subprocess.run(
        ["node", "--input-type=module", "-e", script],
        cwd=NODE_KIT,
        env={**os.environ, "DOC_INPUT": json.dumps({**genuine, "machine": machine, "issuer": ISSUER})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if machine_ok:
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["sub"] == claims_of(genuine["lease"])["sub"]
    else:
        assert done.returncode != 0
        assert "another machine" in done.stderr
